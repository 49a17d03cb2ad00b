"""Cross-tokenizer distillation cost: the byte alignment (opdx.xtok.align_byte_ends) vs a plain Python two-pointer
implementation of the same alignment (tests/xtok_helpers.align_reference) at B=8 completions of ~256 student tokens
(and B=32 of ~1024), the same with the re-tokenization of both sides (token_byte_ends), the ULD / GOLD losses'
forward + backward at B=8 x 256 against a full-vocabulary sort, and (`test_xtok_step_share`) one step's alignment +
loss next to its teacher-scoring time (the demo teacher's forward). Run:
`PYTHONPATH=. python -m pytest benchmarks/test_xtok.py -q -s` (results: benchmarks/results/<device>-xtok_*.json).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.common import measure, record
from opdx.xtok import VocabMap, align_byte_ends, gold_loss, merge_groups, token_byte_ends, uld_loss
from tests.xtok_helpers import align_reference, make_xtok_tokenizers

CASES = [dict(B=8, tokens=256), dict(B=32, tokens=1024)]  # the case, and one to show the scaling
LOSS_CASE = dict(B=8, tokens=256, V_student=32768, V_teacher=49152, top_m=64, dtype="float32")

_WORDS = ("the quick brown fox jumps over héllo wörld café naïve I ❤️ 🍕 Zwölf Boxkämpfer 42 answer "
          "def add(a, b): return a + b; SELECT name FROM users").split(" ")


def make_texts(tok, batch: int, tokens: int) -> list[str]:
    """``batch`` different texts, each cut at the character where the student tokenizer reaches ``tokens`` tokens."""
    g = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(batch):
        words = [_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (tokens,), generator=g)]
        long = " ".join(words) + "\n\n" + " ".join(reversed(words))
        offsets = tok(long, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        texts.append(long[: offsets[min(tokens, len(offsets)) - 1][1]])
    return texts


def _rows(ends: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [ends[b, : int(lengths[b])].tolist() for b in range(ends.shape[0])]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['B']}-L{c['tokens']}")
def test_xtok_alignment(benchmark, case):
    s_tok, t_tok = make_xtok_tokenizers()
    texts = make_texts(s_tok, case["B"], case["tokens"])
    _, s_ends, s_len = token_byte_ends(s_tok, texts)
    _, t_ends, t_len = token_byte_ends(t_tok, texts)
    s_rows, t_rows = _rows(s_ends, s_len), _rows(t_ends, t_len)
    vectorized = align_byte_ends(s_ends, t_ends, s_len, t_len)
    for b in range(len(texts)):  # same groups first
        ref_s, _ = align_reference(s_rows[b], t_rows[b])
        assert vectorized.student_groups[b, : len(ref_s)].tolist() == ref_s
    impls = {
        "opdx_vectorized": lambda: align_byte_ends(s_ends, t_ends, s_len, t_len),
        "python_reference": lambda: [align_reference(s, t) for s, t in zip(s_rows, t_rows)],
        "tokenize_both+opdx_vectorized": lambda: align_byte_ends(*_tokenized_ends(s_tok, t_tok, texts)),
    }
    benchmark.pedantic(impls["opdx_vectorized"], rounds=5, warmup_rounds=1, iterations=1)
    n_student, n_teacher = int(s_len.sum()), int(t_len.sum())
    rows = {name: measure(fn, "cpu", reps=20) for name, fn in impls.items()}
    for name, row in rows.items():
        row.update(student_tokens=n_student, teacher_tokens=n_teacher,
                   tokens_per_s=n_student / (row["time_ms"] / 1e3),
                   speedup_vs_python=rows["python_reference"]["time_ms"] / row["time_ms"])
        record("xtok_align", "cpu", case, name, row)
        print(f"{name:32s} {row['time_ms']:8.3f} ms  {row['tokens_per_s']:12.0f} student tokens/s")


def _tokenized_ends(s_tok, t_tok, texts):
    _, s_ends, s_len = token_byte_ends(s_tok, texts)
    _, t_ends, t_len = token_byte_ends(t_tok, texts)
    return s_ends, t_ends, s_len, t_len


def _loss_inputs(case):
    """Real alignment groups of the benchmark texts, random logits of the given vocabulary sizes."""
    s_tok, t_tok = make_xtok_tokenizers()
    texts = make_texts(s_tok, case["B"], case["tokens"])
    s_ids, s_ends, s_len = token_byte_ends(s_tok, texts)
    t_ids, t_ends, t_len = token_byte_ends(t_tok, texts)
    s_groups, t_groups, n_groups = align_byte_ends(s_ends, t_ends, s_len, t_len).flat()
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    s_logits = (torch.randn(len(s_groups), case["V_student"], generator=g) * 3).to(dtype).requires_grad_(True)
    t_logits = (torch.randn(len(t_groups), case["V_teacher"], generator=g) * 3).to(dtype)
    s_y = s_ids[torch.arange(s_ids.shape[1])[None, :] < s_len[:, None]]
    t_y = t_ids[torch.arange(t_ids.shape[1])[None, :] < t_len[:, None]]
    half = case["V_student"] // 2  # half of the student vocabulary string-matches the teacher's
    vmap = VocabMap(torch.arange(half), torch.randperm(case["V_teacher"], generator=g)[:half])
    return (s_logits, s_y, s_groups), (t_logits, t_y, t_groups), n_groups, vmap


def _full_sort_uld(student, teacher):
    """ULD over the whole vocabulary (the O(N·V log V) path the top-M buckets replace)."""
    ps = torch.sort((torch.log_softmax(student.first_logits, -1) + student.log_scale[:, None]).exp(), -1, True)[0]
    pt = torch.sort((torch.log_softmax(teacher.first_logits, -1) + teacher.log_scale[:, None]).exp(), -1, True)[0]
    width = max(ps.shape[1], pt.shape[1])
    pad = torch.nn.functional.pad
    return (pad(ps, (0, width - ps.shape[1])) - pad(pt, (0, width - pt.shape[1]))).abs().sum(-1).mean()


@pytest.mark.parametrize("impl", ["uld_top_m", "gold_top_m", "uld_full_sort_eager"])
def test_xtok_losses(benchmark, impl):
    (sl, sy, sg), (tl, ty, tg), n, vmap = _loss_inputs(LOSS_CASE)
    with torch.no_grad():
        teacher = merge_groups(tl, ty, tg, n)
    top_m = LOSS_CASE["top_m"]
    losses = {
        "uld_top_m": lambda s: uld_loss(s, teacher, top_m=top_m),
        "gold_top_m": lambda s: gold_loss(s, teacher, vmap, top_m=top_m)[0],
        "uld_full_sort_eager": lambda s: _full_sort_uld(s, teacher),
    }

    def run():
        loss = losses[impl](merge_groups(sl, sy, sg, n))
        return torch.autograd.grad(loss, sl)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    row = measure(run, "cpu", reps=3)
    row.update(student_tokens=len(sg), teacher_tokens=len(tg), groups=n,
               logits_mb=sl.numel() * sl.element_size() / 2**20)
    record("xtok_losses", "cpu", LOSS_CASE, impl, row)
    print(f"{impl:24s} fwd+bwd {row['time_ms']:9.2f} ms  peak {row['peak_mem_mb']:8.1f} MB  groups {n}")


# ------------------------------------------------------------------------------------------------ one step's share
STEP_CASE = dict(B=8, tokens=256, teacher="SmolLM2-135M-Instruct", V_student=32768, dtype="float32")


def _step_inputs(case):
    """(CrossTokenizerTeacher on the demo teacher, student batch of B texts of ``tokens`` student tokens + EOS)."""
    from opdx.data import build_batch, encode_prompt
    from opdx.models import ensure_demo_models, load_causal_lm, load_tokenizer, truncated_tokenizer
    from opdx.teacher.local import LocalTeacher
    from opdx.train.xtok_scoring import CrossTokenizerTeacher
    from opdx.xtok import build_vocab_map

    teacher_dir, _ = ensure_demo_models(progress=False)
    t_tok, s_tok = load_tokenizer(teacher_dir), truncated_tokenizer(teacher_dir, case["V_student"])
    texts = make_texts(s_tok, case["B"], case["tokens"])
    questions = [f"Question {i}: write about foxes, food and numbers." for i in range(case["B"])]
    s_prompts = [encode_prompt(s_tok, q) for q in questions]
    prompt_map = {tuple(s): encode_prompt(t_tok, q) for s, q in zip(s_prompts, questions)}
    completions = [s_tok(t, add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id] for t in texts]
    batch = build_batch(s_prompts, completions, s_tok.pad_token_id)
    model = load_causal_lm(teacher_dir, dtype=getattr(torch, case["dtype"]))
    teacher = CrossTokenizerTeacher(LocalTeacher(model), student_tokenizer=s_tok, teacher_tokenizer=t_tok,
                                    teacher_prompts=prompt_map, vocab=len(t_tok), student_eos_ids=[s_tok.eos_token_id],
                                    vocab_map=build_vocab_map(s_tok, t_tok))
    return teacher, batch


def test_xtok_step_share(benchmark):
    """B=8 completions of 256 student tokens: the teacher's scoring forward (full logits at its completion
    positions) vs what the cross-tokenizer path adds per step: re-tokenization + byte alignment (teacher_batch), the
    teacher's group merge, and the student's group merge + ULD / GOLD loss forward + backward (random student logits
    over V_student; the student's own forward is the same for every loss kind and not counted)."""
    from opdx.ops import token_logprobs
    from opdx.train.xtok_scoring import group_sums

    case = STEP_CASE
    teacher, batch = _step_inputs(case)
    t_batch, alignment = teacher.teacher_batch(batch)
    s_groups, t_groups, n = alignment.flat()
    t_logits = teacher.teacher.score(t_batch, "gjsd", vocab_size=teacher.vocab).logits
    t_y, s_y = t_batch.targets[t_batch.loss_mask], batch.targets[batch.loss_mask]
    with torch.no_grad():
        t_side = merge_groups(t_logits, t_y, t_groups, n)
    g = torch.Generator().manual_seed(0)
    s_logits = (torch.randn(len(s_y), case["V_student"], generator=g) * 3).requires_grad_(True)

    def loss_step(kind):
        side = merge_groups(s_logits, s_y, s_groups, n)
        loss = uld_loss(side, t_side) if kind == "uld" else gold_loss(side, t_side, teacher.vocab_map)[0]
        return torch.autograd.grad(loss, s_logits)

    def teacher_merge():  # as CrossTokenizerTeacher.score: the token log-probs once, for both
        with torch.no_grad():
            observed = token_logprobs(t_logits, t_y)
            merge_groups(t_logits, t_y, t_groups, n, observed=observed)
            group_sums(observed, t_groups, n)

    phases = {
        "teacher_scoring": lambda: teacher.teacher.score(t_batch, "gjsd", vocab_size=teacher.vocab),
        "retokenize_align": lambda: teacher.teacher_batch(batch),
        "teacher_group_merge": teacher_merge,
        "uld_student_merge_loss_fwd_bwd": lambda: loss_step("uld"),
        "gold_student_merge_loss_fwd_bwd": lambda: loss_step("gold"),
    }
    benchmark.pedantic(phases["retokenize_align"], rounds=3, warmup_rounds=1, iterations=1)
    load = os.getloadavg()[0]
    rows = {name: measure(fn, "cpu", reps=3) for name, fn in phases.items()}
    shared = rows["retokenize_align"]["time_ms"] + rows["teacher_group_merge"]["time_ms"]
    for kind in ("uld", "gold"):
        total = shared + rows[f"{kind}_student_merge_loss_fwd_bwd"]["time_ms"]
        rows[f"{kind}_alignment+loss"] = {"time_ms": total}
    scoring = rows["teacher_scoring"]["time_ms"]
    for name, row in rows.items():
        row.update(student_tokens=len(s_y), teacher_tokens=len(t_y), groups=n, loadavg_1m_before=load,
                   pct_of_teacher_scoring=100.0 * row["time_ms"] / scoring)
        record("xtok_step", "cpu", case, name, row)
        print(f"{name:34s} {row['time_ms']:10.2f} ms  {row['pct_of_teacher_scoring']:6.1f}% of teacher scoring")
