"""The trainer's opd objective (importance-sampled per-token reverse-KL advantage from the rollout engine's own
logprobs), the EOS carrying teacher signal when pad == eos, and the greedy quality metrics of the held-out eval,
in process on tiny models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import load_tiny_pair  # noqa: E402

from opdx.config import load_config  # noqa: E402

TINY = str(Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny.yaml")


class _Engine:
    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from opdx.models import aligned_vocab_size

    m = load_tiny_pair(str(tmp_path_factory.mktemp("opd") / "models"))
    return {**m, "vocab": aligned_vocab_size(m["tok"], m["student"], m["teacher"])}


def _rollout(models, n=3, max_new=8, seed=0):
    from opdx.data import build_batch
    from opdx.rollout.hf import HFRollout

    tok, vocab = models["tok"], models["vocab"]
    rollout = HFRollout(models["student"], eos_ids=[tok.eos_token_id], pad_id=tok.eos_token_id,
                        max_new_tokens=max_new, vocab_size=vocab)
    prompts = [tok("the quick brown fox " * (i + 1))["input_ids"] for i in range(n)]
    rb = rollout.generate(prompts, seed=seed)
    return rb, build_batch(prompts, rb.completions(), tok.eos_token_id)


def _opd(models, overrides, batch, rb):
    from opdx.teacher.local import LocalTeacher
    from opdx.train.objectives import make_objective

    cfg = load_config(TINY, ["loss.kind=opd", *overrides])
    signal = LocalTeacher(models["teacher"]).score(batch, "opd", vocab_size=models["vocab"])
    models["student"].zero_grad(set_to_none=True)
    loss, stats = make_objective(cfg, models["vocab"]).compute(_Engine(models["student"]), batch, signal, "student",
                                                               rollout=rb)
    return loss, stats, signal


def _reference(models, batch, q, t_logp, kl_coef=1.0, clip=None, baseline=True):
    """float64: -sum(rho * A) / n with rho = exp(logp - q), A = -kl_coef (q - t), from a fresh student forward;
    logp in the sampler's convention: temperature 1 over every lm_head row (the tiny models pad 512 -> 576)."""
    logits = models["student"](input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.double(), -1)
    logp = logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
    m = batch.loss_mask
    rho = torch.exp(logp[m] - q[m].double())
    adv = -kl_coef * (q[m].double() - t_logp[m].double())
    if baseline:
        adv = adv - adv.mean()
    term = rho * adv
    if clip is not None:
        term = torch.minimum(term, rho.clamp(1 - clip, 1 + clip) * adv)
    return -term.sum() / m.sum()


@pytest.mark.parametrize("shift, clip, baseline", [(0.0, None, True), (0.4, None, True), (0.4, 0.2, True),
                                                   (0.4, 0.2, False)])
def test_opd_importance_ratio_uses_sampler_logprobs(models, shift, clip, baseline):
    """The ratio is exp(trainer logp - sampler logp): 1 for HF rollouts of the live student (raw logprobs), e^shift
    when the sampler's logprobs are lowered by ``shift``; loss and gradients match a float64 reference."""
    rb, batch = _rollout(models)
    rb.sampling_logprobs = rb.sampling_logprobs - shift * rb.completion_mask
    overrides = ["loss.kl_coef=0.7", f"loss.baseline={baseline}"] + ([f"loss.is_clip={clip}"] if clip else [])
    loss, stats, signal = _opd(models, overrides, batch, rb)
    assert stats.is_ratio_sum / stats.n == pytest.approx(float(torch.exp(torch.tensor(shift))), rel=1e-4)
    if clip:
        assert stats.is_clip_sum / stats.n > 0
    loss.backward()
    got = {n: p.grad.clone() for n, p in models["student"].named_parameters() if p.grad is not None}
    q = torch.zeros(batch.targets.shape)
    q[batch.loss_mask] = rb.sampling_logprobs[rb.completion_mask]
    models["student"].zero_grad(set_to_none=True)
    ref = _reference(models, batch, q, signal.token_logprobs, kl_coef=0.7, clip=clip, baseline=baseline)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-4, abs=1e-6)
    for n, p in models["student"].named_parameters():
        if p.grad is not None and p.grad.abs().max() > 0:
            assert torch.allclose(got[n].double(), p.grad.double(), rtol=1e-3, atol=1e-6), n


def test_opd_normalize_reward_keeps_the_old_reinforce(models):
    from opdx.losses import opd_loss

    rb, batch = _rollout(models, seed=3)
    loss, stats, signal = _opd(models, ["loss.normalize_reward=true"], batch, rb)
    assert stats.is_ratio_sum == 0.0
    with torch.no_grad():
        logits = models["student"](input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logp = torch.log_softmax(logits[..., :models["vocab"]], -1)
        logp = logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
    ref, _ = opd_loss(logp, signal.token_logprobs, batch.loss_mask, normalize=True)
    assert float(loss) == pytest.approx(float(ref), rel=1e-4, abs=1e-6)


def test_sampler_logprobs_row_mismatch_is_an_error(models):
    from opdx.train.objectives import sampler_logprobs
    from opdx.train.scoring import student_view

    rb, batch = _rollout(models, seed=5)
    view = student_view("logits", _Engine(models["student"]), batch, vocab=models["vocab"])
    q = sampler_logprobs(rb, view)
    assert torch.equal(q[view.mask], rb.sampling_logprobs[rb.completion_mask])
    rb.completion_mask[0, 0] = ~rb.completion_mask[0, 0]
    with pytest.raises(RuntimeError, match="generated tokens per row"):
        sampler_logprobs(rb, view)


def test_eos_carries_teacher_signal_when_pad_is_eos(models):
    """pad == eos: the generated EOS is a trained target (its teacher logprob moves the loss), the padding after
    it is not."""
    from opdx.data import build_batch
    from opdx.teacher import TeacherSignal
    from opdx.train.objectives import make_objective

    tok = models["tok"]
    eos = tok.eos_token_id
    assert tok.pad_token_id in (None, eos)
    prompts = [tok("hello there")["input_ids"], tok("a longer prompt here ok")["input_ids"]]
    batch = build_batch(prompts, [[11, 12, eos], [13, 14, 15, 16, eos]], eos)
    cfg = load_config(TINY, ["loss.kind=opd", "loss.baseline=false"])  # the value moves (a baseline centers it)
    objective = make_objective(cfg, models["vocab"])
    base = -torch.rand(batch.targets.shape) - 0.1

    def loss_with(t_logp):
        with torch.no_grad():
            return float(objective.compute(_Engine(models["student"]), batch, TeacherSignal(token_logprobs=t_logp),
                                           "student")[0])

    eos_pos = (batch.targets == eos) & batch.loss_mask
    pad_pos = (batch.input_ids[:, 1:] == eos) & ~batch.loss_mask
    assert int(eos_pos.sum()) == 2 and int(pad_pos.sum()) >= 1
    moved = base.clone()
    moved[eos_pos] -= 3.0
    assert loss_with(moved) != pytest.approx(loss_with(base))
    padded = base.clone()
    padded[pad_pos] -= 3.0
    assert loss_with(padded) == pytest.approx(loss_with(base))


def test_eval_greedy_quality_metrics_and_teacher_reference(models):
    from opdx.data_eval import completion_stats
    from opdx.rollout.hf import HFRollout
    from opdx.teacher.local import LocalTeacher
    from opdx.train.evaluate import evaluate, teacher_reference

    tok, vocab = models["tok"], models["vocab"]
    eos = [tok.eos_token_id]
    cfg = load_config(TINY, ["eval.num_prompts=4", "eval.batch_size=3", "rollout.max_new_tokens=6",
                             "log.completions.num=4"])
    rollout = HFRollout(models["student"], eos_ids=eos, pad_id=eos[0], max_new_tokens=6, vocab_size=vocab)
    prompts = [tok("one two three " * (i + 1))["input_ids"] for i in range(4)]
    teacher = LocalTeacher(models["teacher"])
    traced = []
    out = evaluate(cfg, rollout, teacher, models["student"], prompts, vocab=vocab, pad_id=eos[0],
                   device=torch.device("cpu"), tokenizer=tok, eos_ids=eos, samples_out=traced)
    # the completions log reuses the eval's own scoring of its samples (both batches): its per-token student -
    # teacher logprobs average to eval_reverse_kl, its lengths to eval_sample_response_len
    assert len(traced) == 4
    assert all(len(r["ids"]) == len(r["student_logprobs"]) == len(r["teacher_logprobs"]) > 0 for r in traced)
    diffs = [s - t for r in traced for s, t in zip(r["student_logprobs"], r["teacher_logprobs"])]
    assert sum(diffs) / len(diffs) == pytest.approx(out["eval_reverse_kl"], rel=1e-5, abs=1e-6)
    assert sum(len(r["ids"]) for r in traced) / 4 == pytest.approx(out["eval_sample_response_len"])
    greedy = rollout.generate(prompts, seed=0, temperature=0.0).completions()
    want = completion_stats(greedy, eos)
    assert out["eval_response_len"] == pytest.approx(want["response_len"])
    assert out["eval_stop_rate"] == pytest.approx(want["stop_rate"])
    assert out["eval_repeat_frac"] == pytest.approx(want["repeat_frac"])
    assert "eval_sample_response_len" in out and "eval_task_accuracy" not in out
    ref = teacher_reference(cfg, teacher, prompts, task=[], tokenizer=tok, eos_ids=eos, pad_id=eos[0], vocab=vocab)
    t_greedy = HFRollout(models["teacher"], eos_ids=eos, pad_id=eos[0], max_new_tokens=6, vocab_size=vocab) \
        .generate(prompts, seed=0, temperature=0.0).completions()
    assert ref["eval_teacher_response_len"] == pytest.approx(completion_stats(t_greedy, eos)["response_len"])
    assert set(ref) == {"eval_teacher_response_len", "eval_teacher_stop_rate", "eval_teacher_repeat_frac"}


def test_eval_generates_each_distinct_greedy_prompt_once():
    """The task records and the held-out quality prompts overlap: one greedy generation per distinct prompt, each
    list's completions in its own order."""
    from opdx.train.evaluate import _greedy_once

    calls = []

    def generate(prompts):
        calls.append([list(p) for p in prompts])
        return [[sum(p)] for p in prompts]

    task, quality = [[1, 2], [3], [4, 5]], [[3], [6], [1, 2]]
    done_task, done_quality = _greedy_once(generate, [task, quality])
    assert calls == [[[1, 2], [3], [4, 5], [6]]]
    assert done_task == [[3], [3], [9]] and done_quality == [[3], [6], [3]]
    assert _greedy_once(generate, [[], []]) == [[], []] and len(calls) == 1
