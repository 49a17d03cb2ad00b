"""rollout.overlap: step k+1's student rollouts sampled in a background thread while step k trains.

The policy lag (samples of step k come from the weights after step k-2), the sampler position a checkpoint saves,
the engine never used by two threads at once, background failures surfacing, config errors, and a 2-process run
whose draws and checkpoints match the sequential run's."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_train import TINY, check_run, metrics, tiny, torchrun  # noqa: E402,F401

from opdx.config import ConfigError, load_config  # noqa: E402
from opdx.data import Sampler  # noqa: E402
from opdx.train.inputs import StepInputs  # noqa: E402


class VersionedEngine:
    """A rollout engine whose "weights" are a version number; it records the version each prompt batch was
    sampled with and fails on concurrent use."""

    def __init__(self, fail_at=None):
        self.version, self.sampled, self.busy, self.fail_at = 0, [], threading.Lock(), fail_at

    def generate(self, prompts, *, seed):
        assert self.busy.acquire(blocking=False), "two threads in one rollout engine"
        try:
            time.sleep(0.01)
            if self.fail_at is not None and self.version == self.fail_at:
                raise RuntimeError("rollout failed")
            self.sampled.append((tuple(prompts[0]), self.version))
            return SimpleNamespace(completions=lambda: [[1]] * len(prompts))
        finally:
            self.busy.release()

    def sync_weights(self, engine):
        assert self.busy.acquire(blocking=False), "weights synced while a rollout is in flight"
        self.version = engine.version
        self.busy.release()


def fake_trainer(engine, *, steps=6, grad_accum=2, lmbda=1.0):
    cfg = load_config(TINY, [f"train.max_steps={steps}", f"train.grad_accum={grad_accum}", f"loss.lmbda={lmbda}"])
    data = SimpleNamespace(train_prompts=[[i] for i in range(40)], pad_id=0)
    return SimpleNamespace(cfg=cfg, data=data, sampler=Sampler(40, 2, seed=0), train_rollout=engine, rollout=engine,
                           engine=SimpleNamespace(version=0), device="cpu", teacher=None, objective=None, vocab=8)


def run_steps(t, inputs, steps):
    """The loop's use of StepInputs: take, make the sequences, "train" (a new weight version), after_update."""
    got = {}
    for step in range(1, steps + 1):
        mbs = inputs.take(step)
        got[step] = [(tuple(mb.idx), mb.source, inputs.sequences(mb).batch.input_ids.shape[0]) for mb in mbs]
        time.sleep(0.02)  # training, while the background samples step + 1
        t.engine.version = step
        inputs.after_update(step)
    inputs.close()
    return got


def test_one_step_of_policy_lag_and_same_draws():
    seq_engine, ov_engine = VersionedEngine(), VersionedEngine()
    t0, t1 = fake_trainer(seq_engine), fake_trainer(ov_engine)
    want = run_steps(t0, StepInputs(t0), 6)
    got = run_steps(t1, StepInputs(t1, ov_engine), 6)
    assert got == want  # same prompts, sources and batches, step by step
    prompt_step = {idx[0]: step for step, mbs in want.items() for idx, _, _ in mbs}
    for engine, lag in ((seq_engine, 1), (ov_engine, 2)):
        versions = {prompt_step[p[0]]: v for p, v in engine.sampled}
        # step k trains from the weights after step k-1: sequential samples them, overlap those of step k-2
        assert versions == {k: max(k - lag, 0) for k in range(1, 7)}


def test_checkpoint_sampler_state_is_the_sequential_one():
    engine = VersionedEngine()
    t0, t1 = fake_trainer(VersionedEngine()), fake_trainer(engine)
    seq, ov = StepInputs(t0), StepInputs(t1, engine)
    for step in range(1, 5):
        for inputs, t in ((seq, t0), (ov, t1)):
            for mb in inputs.take(step):
                inputs.sequences(mb)
            t.engine.version = step
            inputs.after_update(step)
        assert ov.sampler_state() == seq.sampler_state() == t0.sampler.state_dict()
        assert t1.sampler.state_dict() != t0.sampler.state_dict()  # the overlapped sampler is a step ahead
    ov.close()


def test_a_background_failure_is_raised_in_the_loop():
    engine = VersionedEngine(fail_at=1)  # the rollouts of step 3 (sampled with the weights of step 1) fail
    t = fake_trainer(engine)
    with pytest.raises(RuntimeError, match="rollout failed"):
        run_steps(t, StepInputs(t, engine), 6)


def test_a_server_teacher_scores_the_next_step_in_the_background():
    engine = VersionedEngine()
    t = fake_trainer(engine, steps=3, grad_accum=1)
    t.cfg.teacher.server_url = "http://127.0.0.1:1"
    threads = []

    def score(batch, kind, **kw):
        threads.append(threading.current_thread().name)
        return ("signal", kind)

    t.teacher = SimpleNamespace(score=score)
    t.objective = SimpleNamespace(signal_spec=lambda: SimpleNamespace(teacher_kind="logprobs", temperature=1.0,
                                                                      topk=0))
    inputs = StepInputs(t, engine)
    for step in (1, 2, 3):
        (mb,) = inputs.take(step)
        assert mb.signal == ("signal", "logprobs")
        t.engine.version = step
        inputs.after_update(step)
    inputs.close()
    # step 1 is scored before the background thread starts; steps 2 and 3 in it, while the step before trained
    assert threads[0] == threading.main_thread().name
    assert all(name.startswith("opdx-rollout") for name in threads[1:]) and len(threads) == 3


@pytest.mark.parametrize("override, message", [
    (["deepspeed.zero_stage=3"], "ZeRO-3"),
    (["loss.teacher_mix_alpha=0.5", "loss.kind=minillm", "loss.lmbda=1"], "teacher_mix_alpha"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, ["rollout.overlap=true", *override])


def test_overlapped_run_matches_the_sequential_draws(tiny, tmp_path):
    args = ("train.max_steps=6", "train.grad_accum=2", "loss.lmbda=0.5", "save.every=3", "eval.every=6")
    seq, ov = tmp_path / "seq", tmp_path / "ov"
    torchrun(tiny, seq, *args)
    torchrun(tiny, ov, *args, "rollout.overlap=true")
    check_run(ov, 6)
    a, b = [r for r in metrics(seq) if "loss" in r], [r for r in metrics(ov) if "loss" in r]
    assert [r["source"] for r in a] == [r["source"] for r in b]
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5, abs=1e-7)  # step 1: nothing sampled ahead yet
    lagged = [r["is_ratio"] for r in b[1:] if "student" in r["source"]]
    assert lagged and any(abs(x - 1) > 1e-4 for x in lagged)  # the importance ratio sees the lag
    for step in (3, 6):
        states = [json.loads((d / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())["sampler"]
                  for d in (seq, ov)]
        assert states[0] == states[1]
