"""The cross-tokenizer losses against a teacher known only by its top-k log-probs (a server teacher,
`opdx.teacher.server.ServerTeacher`: vLLM's prompt logprobs of the teacher's own tokens).

Per aligned group the teacher is its first position's top-k tokens and log-probs (full-vocabulary normalized) plus
the mass outside them (1 − Σ top-k), scaled by the merge rule like a full side (`TopSide`, `merge_topk_groups`).

- ``uld``: the teacher's sorted buckets are its top-k probabilities and one tail bucket (as `uld_per_group` does for
  a full side with top_m = k); exact when k ≥ loss.uld_topm and the tail is what a full side's tail would hold.
- ``gold`` (`gold_loss_topk`): the matched sub-vocabulary of a group is the string-matched tokens *among the
  teacher's top-k* (mapped to student ids): GJSD(β) between the two sides renormalized over those columns, ULD over
  the rest (the teacher's unmatched top-k + its tail, the student's top-M outside the group's matched columns + its
  tail), weighted by the teacher's matched share within its top-k. A group whose top-k holds no matched token
  gets the ULD term only (weight 0 on the GJSD term, whatever loss.gold_weight says).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opdx.xtok.losses import (GroupedSide, gold_mean, group_first_and_scale, row_logsumexp, side_logprobs,
                              sorted_buckets, uld_distance)


@dataclass(frozen=True)
class TopSide:
    """A teacher's merged distribution per group known by its top-k: top_ids ``[G, k]`` (teacher vocabulary),
    top_logp ``[G, k]`` (descending, full-vocabulary normalized log-probs of the first position), log_scale ``[G]``
    (the rule's factor, as in `GroupedSide`)."""

    top_ids: torch.Tensor
    top_logp: torch.Tensor
    log_scale: torch.Tensor


def merge_topk_groups(observed_logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                      groups: torch.Tensor, num_groups: int, *, rule: str = "observed") -> TopSide:
    """`merge_groups` for a top-k side: ``observed_logp [N]`` the log-prob of each of its tokens, ``top_ids`` /
    ``top_logp [N, k]`` its top-k at each position (descending), ``groups [N]`` as for `merge_groups`."""
    if top_ids.shape != top_logp.shape or top_ids.dim() != 2 or top_ids.shape[0] != observed_logp.shape[0]:
        raise ValueError(f"top_ids / top_logp must be [N, k] with N = {observed_logp.shape[0]} (one row per token); "
                         f"got {tuple(top_ids.shape)} and {tuple(top_logp.shape)}")
    first, log_scale = group_first_and_scale(observed_logp.float(), groups, num_groups, rule=rule, name="teacher")
    return TopSide(top_ids.index_select(0, first), top_logp.float().index_select(0, first), log_scale)


def _student_columns(vocab_map, top_ids: torch.Tensor) -> torch.Tensor:
    """``[G, k]`` the student id string-matched to each teacher top-k id, −1 where there is none."""
    t_ids, s_ids = vocab_map.teacher_ids.to(top_ids.device), vocab_map.student_ids.to(top_ids.device)
    size = max(int(top_ids.max()) if top_ids.numel() else 0, int(t_ids.max()) if t_ids.numel() else 0) + 1
    lookup = torch.full((size,), -1, dtype=torch.int64, device=top_ids.device)
    lookup[t_ids] = s_ids
    return lookup[top_ids]


def _unmatched_columns(student: GroupedSide, cols: torch.Tensor, matched: torch.Tensor, top_m: int):
    """(``[G, M]`` the student's top-M columns of each group's first row outside that group's matched columns,
    ``[G, M]`` True where a row ran out of them: those entries hold no probability)."""
    with torch.no_grad():
        x = student.first_logits.detach().clone()
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(cols)
        x[rows[matched], cols[matched]] = -math.inf
        fewest = int(matched.sum(-1).min()) if matched.numel() else 0
        values, idx = torch.topk(x, max(0, min(int(top_m), x.shape[-1] - fewest)), dim=-1)
        return idx, values == -math.inf


def gold_loss_topk(student: GroupedSide, teacher: TopSide, vocab_map, *, beta: float = 0.5, top_m: int = 64,
                   p: float = 1.0, matched_weight: float | None = None) -> tuple[torch.Tensor, dict]:
    """`opdx.xtok.gold_loss` against a `TopSide` teacher (the module docstring: the matched sub-vocabulary of a
    group is the string-matched part of the teacher's top-k). Returns (loss, stats) like `gold_loss`."""
    from opdx.ops import generalized_jsd

    s_cols = _student_columns(vocab_map, teacher.top_ids)
    matched = s_cols >= 0
    has = matched.any(-1)
    cols = s_cols.clamp_min(0)
    k = cols.shape[1]
    others, empty = _unmatched_columns(student, cols, matched, top_m)
    _, s_lp, s_scale = side_logprobs(student, group_cols=torch.cat([cols, others], 1))
    neg_inf = torch.tensor(-math.inf, dtype=s_lp.dtype, device=s_lp.device)
    s_m = torch.where(matched, s_lp[:, :k], neg_inf).where(has[:, None], 0.0)  # no match: two equal rows, GJSD 0
    t_lp = teacher.top_logp.to(s_lp.dtype)
    t_m = torch.where(matched, t_lp, neg_inf).where(has[:, None], 0.0)
    jsd = generalized_jsd(s_m, t_m, beta=beta)
    s_mass = torch.where(has, row_logsumexp(s_m).exp(), 0.0)
    t_mass = torch.where(matched, t_lp.exp(), 0.0).sum(-1)
    with torch.no_grad():
        t_other = torch.where(matched, neg_inf, t_lp)
        t_other = torch.topk(t_other, min(int(top_m), k), dim=-1).values  # its top-M unmatched, like the student's
        t_buckets = sorted_buckets(t_other, teacher.log_scale, 1.0 - t_mass)
    s_other = torch.where(empty, neg_inf, s_lp[:, k:])
    uld = uld_distance(sorted_buckets(s_other, s_scale, 1.0 - s_mass), t_buckets, p)
    w = t_mass if matched_weight is None else torch.full_like(t_mass, float(matched_weight))
    return gold_mean(jsd, uld, torch.where(has, w, 0.0), t_mass)
