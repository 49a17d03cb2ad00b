"""loss.kind=minillm in the trainer: the objective against a float64 reference (loss and gradients), also with the
importance weights of teacher-mixed samples; teacher-mixed sampling (loss.teacher_mix_alpha, opdx.rollout.mixed)
against plain student / teacher sampling and the mixture's logprobs; its config errors; `python -m opdx.train`
smoke runs on a tiny same-tokenizer pair."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_tiny_pair  # noqa: E402
from xtok_helpers import TINY, Engine, assert_same_grads, grads_of, minillm_reference, train_run  # noqa: E402

from opdx.config import ConfigError, load_config  # noqa: E402


@pytest.fixture(scope="module")
def same(tmp_path_factory):
    """A tiny pair sharing one tokenizer, loaded in process."""
    from transformers import AutoModelForCausalLM

    from opdx.models import aligned_vocab_size, load_tokenizer

    t_dir, s_dir = make_tiny_pair(str(tmp_path_factory.mktemp("minillm") / "models"))
    tok = load_tokenizer(s_dir)
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32)
    return {"tok": tok, "student": student, "teacher": teacher, "vocab": aligned_vocab_size(tok, student, teacher)}


def _prompts(tok) -> list[list[int]]:
    return [tok("the quick brown fox " * (i + 1))["input_ids"] for i in range(3)]


def _rollouts(same, alpha: float, **kw):
    """(plain student HFRollout, the teacher's HFRollout, TeacherMixedRollout at ``alpha``), same settings."""
    from opdx.rollout.hf import HFRollout
    from opdx.rollout.mixed import TeacherMixedRollout

    tok = same["tok"]
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.eos_token_id, vocab_size=same["vocab"], **kw)
    student, teacher = HFRollout(same["student"], **kw), HFRollout(same["teacher"], **kw)
    return student, teacher, TeacherMixedRollout(student, same["teacher"], alpha)


def _forward_logprobs(model, batch, vocab: int) -> torch.Tensor:
    """float64 log-softmax rows [B, T, vocab] of ``batch`` from one full forward (no KV cache)."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, :-1, :vocab].double().log_softmax(-1)


def _mixture_at_targets(same, batch, alpha: float) -> torch.Tensor:
    """[B, T] float64 log(α·p_T + (1 − α)·p_S) of the batch's targets, 0 off the trained positions."""
    vocab, y = same["vocab"], batch.targets.clamp(min=0)[..., None]
    p_s = _forward_logprobs(same["student"], batch, vocab).exp().gather(-1, y)[..., 0]
    p_t = _forward_logprobs(same["teacher"], batch, vocab).exp().gather(-1, y)[..., 0]
    return torch.log(alpha * p_t + (1 - alpha) * p_s).masked_fill(~batch.loss_mask, 0.0)


# ------------------------------------------------------------------------------------------------ objective
@pytest.mark.parametrize("gamma, normalize, alpha", [(1.0, True, 0.0), (0.8, False, 0.0), (1.0, True, 0.5)])
def test_minillm_objective_matches_float64_reference(same, gamma, normalize, alpha):
    """Plain student samples (α = 0), and teacher-mixed ones (α = 0.5) whose importance weights
    p_S / mixture come from independent full forwards."""
    from opdx.data import build_batch
    from opdx.teacher.local import LocalTeacher
    from opdx.train.objectives import make_objective, teacher_signal

    tok, vocab, student, teacher = same["tok"], same["vocab"], same["student"], same["teacher"]
    plain, _, mixed = _rollouts(same, alpha, max_new_tokens=8)
    prompts = _prompts(tok)
    rb = (mixed if alpha else plain).generate(prompts, seed=int(torch.randint(0, 1000, ())))
    batch = build_batch(prompts, rb.completions(), tok.eos_token_id)
    cfg = load_config(TINY, ["loss.kind=minillm", f"loss.gamma={gamma}", f"loss.length_normalize={normalize}",
                             f"loss.teacher_mix_alpha={alpha}"])
    objective = make_objective(cfg, vocab)
    signal = teacher_signal(LocalTeacher(teacher), batch, objective.signal_spec(), vocab)
    student.zero_grad(set_to_none=True)
    loss, stats = objective.compute(Engine(student), batch, signal, "student", rollout=rb)
    loss.backward()
    got = grads_of(student)
    student.zero_grad(set_to_none=True)
    s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab].double()
    with torch.no_grad():
        t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab].double()
    y = batch.targets.clamp(min=0)
    iw = None
    if alpha:
        s_lp = s.detach().log_softmax(-1).gather(-1, y[..., None])[..., 0]
        iw = torch.exp(s_lp - _mixture_at_targets(same, batch, alpha))
        assert float(iw[batch.loss_mask].max()) <= 1 / (1 - alpha) + 1e-6
    ref = minillm_reference(s, t, y, batch.loss_mask, gamma, normalize, 1.0, iw)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    assert_same_grads(got, student)
    assert stats.n == float(batch.loss_mask.sum()) and stats.k3_sum >= 0


# ------------------------------------------------------------------------------------------------ mixed sampling
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_teacher_mix_follows_the_student_at_0_and_the_teacher_at_1(same, temperature, top_p):
    """α = 0 draws exactly the plain student rollout's tokens under the same seed, α = 1 the teacher's own
    generate; the sampling logprobs are the sampling side's, from a full forward over the shared vocabulary."""
    from opdx.data import build_batch

    seed = int(torch.randint(0, 10_000, ()))
    prompts = _prompts(same["tok"])
    for alpha, model in ((0.0, "student"), (1.0, "teacher")):
        plain, teacher, mixed = _rollouts(same, alpha, max_new_tokens=10, temperature=temperature, top_p=top_p)
        got = mixed.generate(prompts, seed=seed)
        want = (plain if alpha == 0 else teacher).generate(prompts, seed=seed)
        assert torch.equal(got.sequences, want.sequences), (alpha, got.sequences, want.sequences)
        assert torch.equal(got.completion_mask, want.completion_mask) and got.finish_reasons == want.finish_reasons
        batch = build_batch(prompts, got.completions(), same["tok"].eos_token_id)
        ref = _forward_logprobs(same[model], batch, same["vocab"]).gather(-1, batch.targets.clamp(min=0)[..., None])
        assert torch.allclose(got.sampling_logprobs[got.completion_mask].double(), ref[..., 0][batch.loss_mask],
                              atol=1e-4)


def test_teacher_mix_logprobs_are_the_mixture(same):
    """α = 0.3: samples differ from both plain rollouts somewhere, and each token's sampling logprob is
    log(α·p_T + (1 − α)·p_S) from independent full forwards (the KV-cached steps agree with them)."""
    from opdx.data import build_batch

    plain, teacher, mixed = _rollouts(same, 0.3, max_new_tokens=12)
    prompts, seed = _prompts(same["tok"]), int(torch.randint(0, 10_000, ()))
    got = mixed.generate(prompts, seed=seed)
    batch = build_batch(prompts, got.completions(), same["tok"].eos_token_id)
    want = _mixture_at_targets(same, batch, 0.3)[batch.loss_mask]
    assert torch.allclose(got.sampling_logprobs[got.completion_mask].double(), want, atol=1e-4)
    others = [r.generate(prompts, seed=seed).sequences for r in (plain, teacher)]
    assert not all(o.shape == got.sequences.shape and torch.equal(o, got.sequences) for o in others)


@pytest.mark.parametrize("overrides, needle", [
    (["loss.kind=minillm", "loss.teacher_mix_alpha=1.5"], "loss.teacher_mix_alpha must be in [0, 1]"),
    (["loss.kind=minillm", "loss.teacher_mix_alpha=-0.1"], "loss.teacher_mix_alpha must be in [0, 1]"),
    (["loss.kind=gold", "loss.teacher_mix_alpha=0.5"], "needs one tokenizer"),
    (["loss.kind=opd", "loss.teacher_mix_alpha=0.5"], "set loss.kind=minillm or loss.teacher_mix_alpha=0"),
    (["loss.kind=minillm", "loss.teacher_mix_alpha=0.5", "rollout.engine=vllm"], "needs rollout.engine=hf"),
    (["loss.kind=minillm", "loss.teacher_mix_alpha=0.5", "rollout.engine=vllm", "rollout.mode=server",
      "rollout.server_url=http://127.0.0.1:1", "rollout.sync_dir=/tmp/x"], "needs rollout.engine=hf"),
])
def test_teacher_mix_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert needle in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_minillm_smoke_run(tmp_path, alpha):
    rows = train_run(["loss.kind=minillm", "train.max_steps=2", f"loss.teacher_mix_alpha={alpha}"], tmp_path / "run")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e6 and r["tokens"] > 0 for r in train)
