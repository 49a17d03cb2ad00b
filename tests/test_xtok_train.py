"""loss.kind=minillm / uld / gold in the trainer: the objectives against float64 references (loss and gradients),
the cross-tokenizer teacher's re-tokenization and byte alignment, training on a fixed batch, the config errors, and
`python -m opdx.train` end to end (single process) on tiny models with the same and with different tokenizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_tiny_pair  # noqa: E402
from xtok_helpers import (  # noqa: E402
    align_reference,
    gold_reference,
    make_xtok_tokenizers,
    merged_reference,
    minillm_reference,
    ref_distance,
    sorted_ref,
)

from opdx.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "examples" / "configs" / "tiny.yaml")
RESPONSES = ["héllo wörld, café", "I ❤️ 🍕 pizza", "Zwölf Boxkämpfer 🎉", "the answer is 42", "naïve  façade\n\nok"]


class _Engine:
    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict, model) -> None:
    assert got, "no gradient reached the student"
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().max() > 0:
            assert torch.allclose(got[n].double(), p.grad.double(), rtol=1e-3, atol=1e-6), n


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def same(tmp_path_factory):
    """A tiny pair sharing one tokenizer, loaded in process (minillm)."""
    from transformers import AutoModelForCausalLM

    from opdx.models import aligned_vocab_size, load_tokenizer

    t_dir, s_dir = make_tiny_pair(str(tmp_path_factory.mktemp("minillm") / "models"))
    tok = load_tokenizer(s_dir)
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32)
    return {"tok": tok, "student": student, "teacher": teacher, "vocab": aligned_vocab_size(tok, student, teacher)}


def make_xtok_pair(out_dir: Path) -> dict:
    """Tiny random Llamas (opdx.models.make_tiny_models, 420 rows) given the two different byte-level BPE
    tokenizers of tests/xtok_helpers.py (student 300 tokens, teacher 420), and a prompt file whose responses hold
    multi-byte UTF-8."""
    from opdx.models import make_tiny_models

    t_dir, s_dir = make_tiny_models(out_dir / "models", vocab_size=420)
    s_tok, t_tok = make_xtok_tokenizers()
    s_tok.save_pretrained(s_dir)
    t_tok.save_pretrained(t_dir)
    data = out_dir / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: say something about {w}", "response": r}) + "\n"
                            for i, (w, r) in enumerate(zip(["pizza", "love", "boxing", "numbers", "façades"] * 2,
                                                           RESPONSES * 2))))
    return {"teacher": t_dir, "student": s_dir, "data": str(data)}


@pytest.fixture(scope="module")
def xtok(tmp_path_factory):
    return make_xtok_pair(tmp_path_factory.mktemp("xtok"))


def _path_overrides(pair: dict, *extra) -> list[str]:
    return ["model.source=path", f"model.path={pair['student']}", f"teacher.path={pair['teacher']}",
            f"data.train={pair['data']}", f"data.eval={pair['data']}", *extra]


def _xtok_setup(pair: dict, kind: str, *extra):
    """The trainer's own set-up path (prepare_data + cross_tokenizer_teacher) without DeepSpeed."""
    from transformers import AutoModelForCausalLM

    from opdx.teacher.local import LocalTeacher
    from opdx.train.build import load_data, prepare_data
    from opdx.train.objectives import make_objective
    from opdx.train.xtok_scoring import cross_tokenizer_teacher

    cfg = load_config(TINY, _path_overrides(pair, f"loss.kind={kind}", *extra))
    data = prepare_data(cfg, *load_data(cfg))
    student = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32)
    t_model = AutoModelForCausalLM.from_pretrained(pair["teacher"], dtype=torch.float32)
    teacher = cross_tokenizer_teacher(cfg, LocalTeacher(t_model), data, t_model)
    return cfg, data, student, t_model, teacher, make_objective(cfg, len(data.tokenizer))


def _dataset_batch(data, n: int = 5):
    from opdx.data import build_batch

    return build_batch(data.train_prompts[:n], data.train_responses[:n], data.pad_id)


# ------------------------------------------------------------------------------------------------ minillm
@pytest.mark.parametrize("gamma, normalize", [(1.0, True), (0.8, False)])
def test_minillm_objective_matches_float64_reference(same, gamma, normalize):
    from opdx.data import build_batch
    from opdx.rollout.hf import HFRollout
    from opdx.teacher.local import LocalTeacher
    from opdx.train.objectives import make_objective, teacher_signal

    tok, vocab, student, teacher = same["tok"], same["vocab"], same["student"], same["teacher"]
    rollout = HFRollout(student, eos_ids=[tok.eos_token_id], pad_id=tok.eos_token_id, max_new_tokens=8,
                        vocab_size=vocab)
    prompts = [tok("the quick brown fox " * (i + 1))["input_ids"] for i in range(3)]
    rb = rollout.generate(prompts, seed=int(torch.randint(0, 1000, ())))
    batch = build_batch(prompts, rb.completions(), tok.eos_token_id)
    cfg = load_config(TINY, ["loss.kind=minillm", f"loss.gamma={gamma}", f"loss.length_normalize={normalize}"])
    objective = make_objective(cfg, vocab)
    signal = teacher_signal(LocalTeacher(teacher), batch, objective.signal_spec(), vocab)
    student.zero_grad(set_to_none=True)
    loss, stats = objective.compute(_Engine(student), batch, signal, "student", rollout=rb)
    loss.backward()
    got = _grads(student)
    student.zero_grad(set_to_none=True)
    s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab].double()
    with torch.no_grad():
        t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab].double()
    ref = minillm_reference(s, t, batch.targets.clamp(min=0), batch.loss_mask, gamma, normalize, 1.0)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    _assert_same_grads(got, student)
    assert stats.n == float(batch.loss_mask.sum()) and stats.k3_sum >= 0


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, needle", [
    (["loss.kind=uld", "teacher.server_url=http://127.0.0.1:1"], "loss.kind=uld with teacher.server_url is not"),
    (["loss.kind=gold", "loss.lmbda=0.5", "loss.seq_kd=true"], "loss.kind=gold with loss.seq_kd=true is not"),
    (["loss.kind=gold", "loss.gold_weight=1.5"], "loss.gold_weight must be 'matched'"),
    (["loss.kind=gold", "loss.gold_weight=most"], "loss.gold_weight must be 'matched'"),
    (["loss.kind=uld", "loss.uld_topm=0"], "loss.uld_topm must be >= 1"),
    (["loss.kind=uld", "loss.uld_p=0.5"], "loss.uld_p must be a finite number >= 1"),
    (["loss.kind=uld", "loss.merge_rule=last"], "loss.merge_rule must be one of 'observed', 'first'"),
    (["loss.kind=uld", "loss.fused_linear=true"], "loss.kind=uld needs the student's full logits"),
    (["loss.kind=minillm", "loss.lmbda=0.5"], "loss.kind=minillm is a policy gradient"),
    (["loss.kind=minillm", "loss.gamma=1.5"], "loss.gamma must be in [0, 1]"),
    (["loss.kind=minillm", "teacher.server_url=http://127.0.0.1:1"], "loss.kind=minillm needs full teacher logits"),
])
def test_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert needle in str(e.value), str(e.value)


def test_config_accepts_cross_tokenizer_keys():
    cfg = load_config(TINY, ["loss.kind=gold", "loss.gold_weight=0.25", "loss.uld_topm=8", "loss.merge_rule=first",
                             "loss.lmbda=0.5"])
    assert (cfg.loss.gold_weight, cfg.loss.uld_topm, cfg.loss.merge_rule) == ("0.25", 8, "first")


def test_different_tokenizers_need_uld_or_gold(xtok):
    from opdx.train.build import load_data, prepare_data

    cfg = load_config(TINY, _path_overrides(xtok, "loss.kind=opd"))
    with pytest.raises(ConfigError, match="incompatible tokenizers.*loss.kind=uld or loss.kind=gold"):
        prepare_data(cfg, *load_data(cfg))


# ------------------------------------------------------------------------------------------------ alignment
def _side_bytes(tok, ids: list[int]) -> bytes:
    from opdx.xtok.tokens import completion_bytes

    return completion_bytes(tok, ids)


def _byte_ends(tok, ids: list[int], *, whole_chars: bool = False) -> list[int]:
    """Byte end of each token; ``whole_chars``: rounded up to the end of the character it ends in (what a
    re-tokenized side's offset mapping tells)."""
    out, total = [], 0
    raw = _side_bytes(tok, ids)
    for i in ids:
        total += len(_side_bytes(tok, [i]))
        end = total
        while whole_chars and end < len(raw) and raw[end] & 0xC0 == 0x80:  # a continuation byte
            end += 1
        out.append(end)
    return out


def test_teacher_retokenizes_and_aligns_by_bytes(xtok):
    """Dataset responses (multi-byte UTF-8) and a sampled row with a split character: the teacher sees the prompt
    through its own chat template and the completion's bytes through its own tokenizer; every aligned group spells
    the same bytes on both sides, and the groups are those of the plain Python two-pointer alignment."""
    from opdx.data import build_batch, encode_prompt

    cfg, data, _, _, teacher, _ = _xtok_setup(xtok, "uld")
    s_tok, t_tok = data.tokenizer, data.teacher_tokenizer
    pizza = s_tok("🍕", add_special_tokens=False)["input_ids"]  # four byte tokens in the student's vocabulary
    cut = s_tok("ok ", add_special_tokens=False)["input_ids"] + pizza[:1]
    with pytest.raises(UnicodeDecodeError):
        _side_bytes(s_tok, cut).decode()
    completions = data.train_responses[:4] + [cut]
    batch = build_batch(data.train_prompts[:5], completions, data.pad_id)
    t_batch, alignment = teacher.teacher_batch(batch)
    prompts = _prompt_texts(xtok)
    for b in range(5):
        t_prompt = t_batch.input_ids[b, :t_batch.prompt_lens[b]].tolist()
        assert t_prompt == encode_prompt(t_tok, prompts[b])
        s_ids = batch.targets[b][batch.loss_mask[b]].tolist()
        t_ids = t_batch.targets[b][t_batch.loss_mask[b]].tolist()
        assert (s_ids[-1] == data.eos_ids[0]) == (t_ids[-1] == t_tok.eos_token_id)
        s_groups = alignment.student_groups[b][: len(s_ids)].tolist()
        t_groups = alignment.teacher_groups[b][: len(t_ids)].tolist()
        if b < 4:  # valid UTF-8 (row 4 ends inside a character: its bytes reach the teacher as U+FFFD)
            assert (s_groups, t_groups) == align_reference(_byte_ends(s_tok, s_ids),
                                                           _byte_ends(t_tok, t_ids, whole_chars=True))
        for g in range(int(alignment.num_groups[b])):
            s_bytes = _side_bytes(s_tok, [i for i, k in zip(s_ids, s_groups) if k == g])
            t_bytes = _side_bytes(t_tok, [i for i, k in zip(t_ids, t_groups) if k == g])
            assert s_bytes == t_bytes or (b == 4 and t_bytes == "\ufffd".encode()), (b, g, s_bytes, t_bytes)
    assert int(alignment.num_groups.sum()) < int(batch.loss_mask.sum())  # some groups merge several tokens


# ------------------------------------------------------------------------------------------------ uld / gold
def _prompt_texts(pair: dict) -> list[str]:
    with open(pair["data"]) as f:
        return [json.loads(line)["prompt"] for line in f]


def _reference_inputs(data, student, t_model, batch, prompts):
    """Independently of opdx.train.xtok_scoring: float64 student rows (with grad) and teacher rows of every
    completion token, their targets and batch-global groups (plain Python alignment)."""
    from opdx.data import encode_prompt

    s_tok, t_tok, vocab = data.tokenizer, data.teacher_tokenizer, len(data.tokenizer)
    s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab]
    rows = {k: [] for k in ("sl", "sy", "sg", "tl", "ty", "tg")}
    offset = 0
    for b in range(batch.input_ids.shape[0]):
        s_ids = batch.targets[b][batch.loss_mask[b]].tolist()
        text = _side_bytes(s_tok, s_ids).decode()
        t_prompt = encode_prompt(t_tok, prompts[b])
        t_ids = t_tok(text, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
        with torch.no_grad():
            t_logits = t_model(input_ids=torch.tensor([t_prompt + t_ids])).logits[0, :, :len(t_tok)].double()
        sg, tg = align_reference(_byte_ends(s_tok, s_ids), _byte_ends(t_tok, t_ids, whole_chars=True))
        rows["sl"].append(s_logits[b][batch.loss_mask[b]].double())
        rows["tl"].append(t_logits[len(t_prompt) - 1:len(t_prompt) - 1 + len(t_ids)])
        rows["sy"] += s_ids
        rows["ty"] += t_ids
        rows["sg"] += [g + offset for g in sg]
        rows["tg"] += [g + offset for g in tg]
        offset += max(sg) + 1
    cat = {k: torch.cat(v) if k.endswith("l") else torch.tensor(v) for k, v in rows.items()}
    return cat["sl"], cat["sy"], cat["sg"], cat["tl"], cat["ty"], cat["tg"], offset


def _uld_reference(sl, sy, sg, tl, ty, tg, n, top_m, p):
    total = 0.0
    for g in range(n):
        ps, pt = merged_reference(sl, sy, sg, g, "observed"), merged_reference(tl, ty, tg, g, "observed")
        total = total + ref_distance(sorted_ref(ps, top_m), sorted_ref(pt, top_m), p)
    return total / n


@pytest.mark.parametrize("kind, extra", [("uld", ["loss.uld_topm=16", "loss.uld_p=1.5"]),
                                         ("gold", ["loss.uld_topm=16", "loss.beta=0.3"]),
                                         ("gold", ["loss.gold_weight=0.4"])])
def test_cross_tokenizer_objective_matches_float64_reference(xtok, kind, extra):
    cfg, data, student, t_model, teacher, objective = _xtok_setup(xtok, kind, *extra)
    batch = _dataset_batch(data)
    signal = teacher.score(batch, objective.signal_spec().teacher_kind, vocab_size=len(data.tokenizer))
    loss, stats = objective.compute(_Engine(student), batch, signal, "dataset")
    loss.backward()
    got = _grads(student)
    student.zero_grad(set_to_none=True)
    sl, sy, sg, tl, ty, tg, n = _reference_inputs(data, student, t_model, batch, _prompt_texts(xtok))
    assert n == signal.num_groups and torch.equal(sg, signal.student_groups)
    c = cfg.loss
    if kind == "uld":
        ref = _uld_reference(sl, sy, sg, tl, ty, tg, n, c.uld_topm, c.uld_p)
    else:
        weight = None if c.gold_weight == "matched" else float(c.gold_weight)
        ref = gold_reference(sl, sy, sg, tl, ty, tg, n, teacher.vocab_map, c.beta, c.uld_topm, weight)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    _assert_same_grads(got, student)
    assert stats.n == float(batch.loss_mask.sum()) and stats.k1_sum == stats.k1_sum


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_cross_tokenizer_trains_on_a_fixed_batch(xtok, kind):
    """A few AdamW steps at a high learning rate on one batch of dataset responses: the loss falls by a fifth, the
    gradients are finite and non-zero, the per-group statistics finite (on dataset text the group log-ratio is not
    a KL estimate, so its sign is free)."""
    _, data, student, _, teacher, objective = _xtok_setup(xtok, kind)
    batch = _dataset_batch(data)
    signal = teacher.score(batch, "gjsd", vocab_size=len(data.tokenizer))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses, kls = [], []
    for _ in range(12):
        opt.zero_grad(set_to_none=True)
        loss, stats = objective.compute(_Engine(student), batch, signal, "dataset")
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        assert torch.isfinite(grads).all() and grads.abs().max() > 0
        opt.step()
        losses.append(float(loss.detach()))
        kls.append(stats.k1_sum / signal.num_groups)
    assert torch.isfinite(torch.tensor(losses + kls)).all(), (losses, kls)
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------------------------------------ end to end
def _train(args: list[str], out: Path, timeout: int = 300) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "opdx.train", "--config", TINY, f"train.output_dir={out}",
                        "log.plot=false", "log.tensorboard=false", "save.every=0", "save.final=false",
                        "eval.num_prompts=4", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_minillm_smoke_run(tmp_path):
    rows = _train(["loss.kind=minillm", "train.max_steps=2"], tmp_path / "run")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["tokens"] > 0 for r in train)


def test_cross_tokenizer_run_end_to_end(xtok, tmp_path):
    """`python -m opdx.train` with a student and a teacher whose tokenizers differ (gold; λ = 0.5 mixes student
    rollouts and dataset responses): finite losses, and the held-out metric is the per-group reverse KL."""
    rows = _train(_path_overrides(xtok, "loss.kind=gold", "loss.lmbda=0.5", "train.max_steps=3", "eval.every=0",
                                  "rollout.max_new_tokens=12"), tmp_path / "run")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_group_reverse_kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e6 and r["tokens"] > 0 for r in train)
    assert {r["source"] for r in train} <= {"student", "dataset"}
    assert [r["step"] for r in evals] == [0, 3]
    assert all(r["eval_group_reverse_kl"] == r["eval_group_reverse_kl"] for r in evals)
    assert not any("eval_top1_agreement" in r or "eval_reverse_kl" in r for r in rows)
    # the completions log: the student's tokens and logprobs; no per-token teacher logprobs across tokenizers
    events = [json.loads(ln) for ln in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [0, 3]
    for c in (c for e in events for c in e["completions"]):
        assert len(c["tokens"]) == len(c["student_logprobs"]) > 0
        assert c["teacher_logprobs"] is None and c["logprob_diff"] is None and c["teacher"] is None
