"""Cross-tokenizer test helpers: two tiny byte-level BPE tokenizers with different vocab sizes and merges (built
offline), a plain Python reference of the byte alignment (also the benchmark's baseline), and float64 references of
the merged-group losses and MiniLLM, and the trainer helpers the cross-tokenizer / MiniLLM tests share."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "examples" / "configs" / "tiny.yaml")

# Two different training texts, so the merges differ (not only the vocabulary size). Both hold multi-byte UTF-8
# (accents, emoji) often enough that some multi-byte characters become single tokens on one side only.
_CORPUS_A = """\
The quick brown fox jumps over the lazy dog. héllo wörld, café au lait, naïve façade.
I ❤️ 🍕 and I ❤️ pasta. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. The answer is 42.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))
""" * 3

_CORPUS_B = """\
Hello world! Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 🍕🍕 pizza time 🎉.
Le cœur a ses raisons que la raison ne connaît point. ❤️ ❤️ love.  Spaces   and\ttabs\n\nnewlines.
SELECT name FROM users WHERE id = 7; -- query
""" * 3


@functools.lru_cache(maxsize=None)
def make_xtok_tokenizers():
    """(student_tokenizer, teacher_tokenizer): byte-level BPE + ChatML specials, vocab 300 trained on one text and
    420 on another (different merges). Deterministic; transformers fast tokenizers (offset mapping available)."""
    return _byte_bpe(300, _CORPUS_A), _byte_bpe(420, _CORPUS_B)


def _byte_bpe(vocab_size: int, corpus: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from opdx.models.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([corpus], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def align_reference(student_ends: list[int], teacher_ends: list[int]) -> tuple[list[int], list[int]]:
    """Plain Python two-pointer alignment of one row: walk both token lists in byte order; a group closes when both
    sides have covered exactly the same bytes. Returns the group id of every student and teacher token."""
    s_groups, t_groups = [0] * len(student_ends), [0] * len(teacher_ends)
    i = j = group = 0
    s_pos = t_pos = 0
    inf = float("inf")
    while i < len(student_ends) or j < len(teacher_ends):
        end = min(student_ends[i] if i < len(student_ends) else inf, teacher_ends[j] if j < len(teacher_ends) else inf)
        while i < len(student_ends) and student_ends[i] == end:
            s_groups[i], s_pos, i = group, end, i + 1
        while j < len(teacher_ends) and teacher_ends[j] == end:
            t_groups[j], t_pos, j = group, end, j + 1
        if s_pos == t_pos == end:
            group += 1
    return s_groups, t_groups


# float64 references of the losses, written independently of opdx.xtok (explicit loops over groups and tokens)


def merged_reference(logits, targets, groups, g, rule):
    rows = [j for j in range(len(groups)) if int(groups[j]) == g]
    p = torch.softmax(logits[rows[0]], -1)
    if rule == "observed":
        for j in rows[1:]:
            p = p * torch.softmax(logits[j], -1)[targets[j]]
    return p


def sorted_ref(p, m, exclude=()):
    keep = torch.tensor([v for v in range(p.shape[0]) if v not in set(exclude)], dtype=torch.int64)
    q = p[keep]
    top = torch.sort(q, descending=True).values[:m]
    tail = q.sum() - top.sum()
    return torch.sort(torch.cat([top, tail.reshape(1)]), descending=True).values


def ref_distance(a, b, p):
    width = max(len(a), len(b))
    a = torch.cat([a, a.new_zeros(width - len(a))])
    b = torch.cat([b, b.new_zeros(width - len(b))])
    return ((a - b).abs() ** p).sum()


def problem(n_groups=4, vs=13, vt=17, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    sizes_s = torch.randint(1, 4, (n_groups,), generator=gen)
    sizes_t = torch.randint(1, 4, (n_groups,), generator=gen)
    s_groups = torch.repeat_interleave(torch.arange(n_groups), sizes_s)
    t_groups = torch.repeat_interleave(torch.arange(n_groups), sizes_t)
    s_logits = (torch.randn(len(s_groups), vs, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    t_logits = torch.randn(len(t_groups), vt, generator=gen, dtype=torch.float64) * 2
    s_targets = torch.randint(0, vs, (len(s_groups),), generator=gen)
    t_targets = torch.randint(0, vt, (len(t_groups),), generator=gen)
    return (s_logits, s_targets, s_groups), (t_logits, t_targets, t_groups), n_groups


def gjsd_ref(ps, pt, beta):
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt / m).log()).sum() + (1 - beta) * (ps * (ps / m).log()).sum()


def gold_reference(sl, sy, sg, tl, ty, tg, n, vmap, beta, top_m, weight):
    s_ids, t_ids = vmap.student_ids.tolist(), vmap.teacher_ids.tolist()
    total = 0.0
    for g in range(n):
        ps = merged_reference(sl, sy, sg, g, "observed")
        pt = merged_reference(tl, ty, tg, g, "observed")
        jsd = gjsd_ref(ps[s_ids] / ps[s_ids].sum(), pt[t_ids] / pt[t_ids].sum(), beta)
        uld = ref_distance(sorted_ref(ps, top_m, s_ids), sorted_ref(pt, top_m, t_ids), 1.0)
        w = pt[t_ids].sum() / pt.sum() if weight is None else weight
        total = total + w * jsd + (1 - w) * uld
    return total / n


def minillm_reference(s, t, y, mask, gamma, normalize, weight, iw=None):
    """MiniLLM in float64 loops: per trained token −w·R_{t+1}·log p_S(y_t) + weight·w·KL(p_S‖p_T), w = ``iw`` (the
    importance weights of teacher-mixed samples) or 1."""
    log_s, log_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    s_lp = log_s.gather(-1, y[..., None])[..., 0]
    t_lp = log_t.gather(-1, y[..., None])[..., 0]
    r = (t_lp - s_lp).detach()
    b, n = y.shape
    total, count = 0.0, int(mask.sum())
    for i in range(b):
        for j in range(n):
            if not mask[i, j]:
                continue
            num = sum(gamma ** (k - j - 1) * r[i, k] for k in range(j + 1, n) if mask[i, k])
            den = sum(gamma ** (k - j - 1) for k in range(j + 1, n) if mask[i, k])
            ret = (num / den if den else 0.0) if normalize else num
            kl = (log_s[i, j].exp() * (log_s[i, j] - log_t[i, j])).sum()
            w = 1.0 if iw is None else iw[i, j]
            total = total - w * ret * s_lp[i, j] + weight * w * kl
    return total / count


# ------------------------------------------------------------------------------------------------ trainer
class Engine:
    """The objectives' view of a DeepSpeed engine: ``engine(**inputs)`` runs ``engine.module``."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def grads_of(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, model) -> None:
    assert got, "no gradient reached the student"
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().max() > 0:
            assert torch.allclose(got[n].double(), p.grad.double(), rtol=1e-3, atol=1e-6), n


def train_run(args: list[str], out: Path, timeout: int = 300) -> list[dict]:
    """`python -m opdx.train` on examples/configs/tiny.yaml + ``args`` into ``out``: the metrics.jsonl rows."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "opdx.train", "--config", TINY, f"train.output_dir={out}",
                        "log.plot=false", "log.tensorboard=false", "save.every=0", "save.final=false",
                        "eval.num_prompts=4", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
