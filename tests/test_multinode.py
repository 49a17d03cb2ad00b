"""Multi-node training as a tested feature: 2 simulated nodes on localhost (torchrun --nnodes 2 --nproc_per_node 1,
gloo, HF rollouts, both node processes started here) give the metrics, checkpoints and resume of a 1-node 2-rank
run of the same config (examples/launch/torchrun_multinode.sh is the same command for real nodes)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from tests.test_train import ROOT, TIMING_KEYS, TINY, _env, _overrides, metrics, tiny, torchrun  # noqa: F401

STEPS = ("train.max_steps=4", "save.every=2", "eval.every=2", "save.final=false", "log.plot=false",
         "log.tensorboard=false")
NODE_TIMEOUT = 300  # seconds, per run of the 2 nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], log_dir) -> str:
    """One run of 2 torchrun "nodes" (1 rank each) rendezvousing at 127.0.0.1; both must exit 0. -> node 0's log"""
    port = free_port()
    procs, logs = [], [log_dir / f"node{r}.log" for r in (0, 1)]
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "opdx.train", "--config", TINY, *args]
        with open(logs[node_rank], "w") as log:
            procs.append(subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        for p in procs:
            p.wait(timeout=NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"2-node run did not finish within {NODE_TIMEOUT} s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for node_rank, p in enumerate(procs):
        assert p.returncode == 0, f"node {node_rank} exited {p.returncode}\n{logs[node_rank].read_text()[-5000:]}"
    return logs[0].read_text()


def assert_same_metrics(want: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        assert set(a) == set(b), (a["step"], set(a) ^ set(b))
        for k in a:
            if k in TIMING_KEYS:
                continue
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])
            else:
                assert b[k] == a[k], (a["step"], k)


def model_states(out, step) -> dict:
    (f,) = (out / "checkpoints" / f"step_{step}").rglob("mp_rank_00_model_states.pt")
    return torch.load(f, map_location="cpu", weights_only=False)["module"]


@pytest.mark.slow  # 3 launches: 114 s on the shared 2-core CPU box (load ~6), over the default suite's budget
def test_two_nodes_match_one_node(tiny, tmp_path):
    one = tmp_path / "one_node"
    torchrun(tiny, one, *STEPS, timeout=NODE_TIMEOUT)  # 1 node, 2 ranks
    two = tmp_path / "two_nodes"
    two_nodes(_overrides(tiny, two, *STEPS), tmp_path)
    want = metrics(one)
    assert [r["step"] for r in want if "loss" in r] == [1, 2, 3, 4]
    assert_same_metrics(want, metrics(two))
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_2", "step_4"]
    a, b = model_states(one, 4), model_states(two, 4)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)

    # resume on 2 nodes from step 2 (as after a crash between the checkpoints): steps 3-4 as in one run
    shutil.rmtree(two / "checkpoints" / "step_4")
    log = two_nodes(_overrides(tiny, two, *STEPS, "train.resume=true"), tmp_path)
    assert "resumed from" in log and "(step 2)" in log
    assert_same_metrics(want, metrics(two))
