"""Cross-tokenizer distillation losses over aligned token groups (see `opdx.xtok.align`).

Inputs are flat over the trained completion tokens of one side: ``logits [N, V]`` where row j is the distribution
that predicts token j (already shifted), the observed token ids ``targets [N]``, and the batch-global group id of each
token ``groups [N]`` (non-decreasing, every group 0..G-1 present; `Alignment.flat` gives them).

- `merge_groups` → `GroupedSide`: one (unnormalized) distribution per group and side, by the "observed" or the
  "first" rule.
- `uld_loss`: Universal Logit Distillation — distance between the sorted probability vectors of the two sides.
- `gold_loss`: hybrid — GJSD(β) over the tokens whose strings match in both vocabularies (`opdx.xtok.vocab`), ULD
  over the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RULES = ("observed", "first")


@dataclass(frozen=True)
class _Rows:
    """A side whose logits require grad, as `merge_groups` keeps it: the losses gather its log-probs through
    `opdx.xtok.gathered.gathered_logprobs` (one dense backward pass)."""

    logits: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor
    first: torch.Tensor
    rule: str
    temperature: float
    observed: torch.Tensor  # the token log-probs merge_groups computed (no grad): gathered_logprobs reuses them


@dataclass(frozen=True)
class GroupedSide:
    """One side's merged distribution per group: log P_g(v) = first_logits[g, v] − lse[g] + log_scale[g].

    first_logits ``[G, V]``: logits / temperature at each group's first token; lse ``[G]``: their logsumexp;
    log_scale ``[G]``: log of the factor the rule multiplies that distribution by (0 for the "first" rule).
    rows: set by `merge_groups` for logits that require grad; the three tensors are then detached values and the
    losses take their gradient through `side_logprobs`."""

    first_logits: torch.Tensor
    lse: torch.Tensor
    log_scale: torch.Tensor
    rows: _Rows | None = None


def _check_groups(groups: torch.Tensor, num_groups: int, n: int, name: str) -> torch.Tensor:
    """Validates flat group ids and returns each group's token count ``[G]``."""
    if not isinstance(groups, torch.Tensor) or groups.dtype not in (torch.int32, torch.int64) or groups.shape != (n,):
        raise ValueError(f"{name}_groups must be an int tensor of shape [{n}] (one group id per row of "
                         f"{name}_logits), got {getattr(groups, 'dtype', type(groups).__name__)} "
                         f"{tuple(getattr(groups, 'shape', ()))}")
    groups = groups.to(torch.int64)
    if n and (bool((groups[1:] < groups[:-1]).any()) or int(groups[0]) < 0 or int(groups[-1]) >= num_groups):
        raise ValueError(f"{name}_groups must be non-decreasing ids in [0, num_groups={num_groups}) "
                         "(use Alignment.flat())")
    counts = torch.bincount(groups, minlength=num_groups)
    if bool((counts == 0).any()):
        missing = int(torch.nonzero(counts == 0)[0, 0])
        raise ValueError(f"group {missing} has no {name} token: every group needs tokens on both sides "
                         "(use Alignment.flat() of one alignment for both)")
    return counts


def group_first_and_scale(observed_logp: torch.Tensor, groups: torch.Tensor, num_groups: int, *,
                          rule: str = "observed", name: str = "side") -> tuple[torch.Tensor, torch.Tensor]:
    """(first ``[G]``, log_scale ``[G]``): the row index of each group's first token and the log factor of the rule.

    "observed": log_scale[g] = Σ_{j ∈ g, j ≠ first(g)} log p_j(y_j), the log-probabilities of the tokens actually
    observed after the first one inside the group; "first": 0. Usable on top-k log-probs from a teacher server too
    (then observed_logp is the server's log-prob of each of its tokens)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    counts = _check_groups(groups, num_groups, observed_logp.shape[0], name)
    first = torch.cumsum(counts, 0) - counts
    if rule == "first":
        return first, observed_logp.new_zeros(num_groups)
    later = torch.ones_like(observed_logp, dtype=torch.bool)
    later[first] = False
    later_logp = torch.where(later, observed_logp, torch.zeros_like(observed_logp))
    log_scale = observed_logp.new_zeros(num_groups).index_add(0, groups.to(torch.int64), later_logp)
    return first, log_scale


def merge_groups(logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, num_groups: int, *,
                 rule: str = "observed", temperature: float = 1.0, name: str = "side",
                 observed: torch.Tensor | None = None) -> GroupedSide:
    """Merges one side's per-token next-token distributions into one distribution per aligned group.

    Let group g hold this side's tokens j = f, f+1, ..., l (f its first), p_j = softmax(logits[j] / T) and y_j the
    observed tokens. The "observed" rule (default) gives

        log P_g(v) = log p_f(v) + Σ_{j=f+1..l} log p_j(y_j),

    i.e. the probability that the group starts with token v and then continues with the tokens actually observed
    (the continuation's probabilities are those computed after y_f, so for v ≠ y_f it is the usual approximation).
    P_g sums to Π_{j>f} p_j(y_j) ≤ 1 and is not renormalized: a side that needs several tokens for the group's text
    is charged for the uncertainty of the continuation. The "first" rule keeps log P_g = log p_f (normalized).
    Gradients flow through both terms. ``observed`` (no-grad logits only): the token log-probs of ``logits`` at
    ``targets`` when the caller has them already (saves a pass over the rows)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"{name}_logits must be [N, V] and {name}_targets [N]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(f"{name}_targets must be the observed token ids in [0, {logits.shape[1]}) (no ignore_index: "
                         "pass only the trained completion tokens)")
    from opdx.ops import token_logprobs

    differentiable = logits.requires_grad and torch.is_grad_enabled()
    with torch.set_grad_enabled(torch.is_grad_enabled() and not differentiable):
        if observed is None or differentiable:
            observed = token_logprobs(logits, targets, temperature=temperature)
        first, log_scale = group_first_and_scale(observed, groups, num_groups, rule=rule, name=name)
        first_logits = logits.index_select(0, first)
        if temperature != 1.0:
            first_logits = first_logits / temperature
        # lse = x[y] − log p(y): the fused kernel's logsumexp, without another pass (and its backward) over [G, V]
        observed_logit = first_logits.gather(1, targets.index_select(0, first)[:, None])[:, 0].to(observed.dtype)
        lse = observed_logit - observed.index_select(0, first)
    rows = _Rows(logits, targets, groups.to(torch.int64), first, rule, float(temperature), observed) \
        if differentiable else None
    return GroupedSide(first_logits, lse, log_scale, rows)


def side_logprobs(side: GroupedSide, *, shared_cols: torch.Tensor | None = None,
                  group_cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shared ``[G, K1]``, grouped ``[G, K2]``, log_scale ``[G]``): the log-probs of each group's first position at
    the columns ``shared_cols [K1]`` (the same for every group) and ``group_cols [G, K2]``, and the rule's log
    scale, differentiable in the side's logits (one dense backward pass for a `merge_groups` side)."""
    lse = side.lse[:, None]
    device = side.first_logits.device
    shared_cols = torch.zeros(0, dtype=torch.int64, device=device) if shared_cols is None else shared_cols
    group_cols = side.first_logits.new_zeros(lse.shape[0], 0, dtype=torch.int64) if group_cols is None else group_cols
    if side.rows is None:
        logits = side.first_logits
        return (logits.index_select(1, shared_cols).to(lse.dtype) - lse,
                logits.gather(1, group_cols).to(lse.dtype) - lse, side.log_scale)
    from opdx.xtok.gathered import gathered_logprobs

    r = side.rows
    observed, shared, grouped = gathered_logprobs(r.logits, r.targets, r.first, shared_cols=shared_cols,
                                                  group_cols=group_cols, temperature=r.temperature,
                                                  observed=r.observed)
    _, log_scale = group_first_and_scale(observed, r.groups, lse.shape[0], rule=r.rule)
    return shared, grouped, log_scale


def top_columns(side: GroupedSide, top_m: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``[G, min(top_m, V − |exclude|)]`` the columns of the largest logits of each group's first position,
    descending, leaving out the columns ``exclude`` (no gradient: the selection)."""
    with torch.no_grad():
        logits = side.first_logits.detach()
        if exclude is None:
            return torch.topk(logits, min(int(top_m), logits.shape[-1]), dim=-1).indices
        keep = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[exclude] = False
        keep = keep.nonzero()[:, 0]  # the top-M of the kept columns only (not a −inf-filled copy of every row)
        return keep[torch.topk(logits.index_select(1, keep), min(int(top_m), keep.numel()), dim=-1).indices]


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``[G]`` logsumexp over the last dim of ``x [G, K]``; differentiable in x, through the fused log-softmax
    gather (lse = x[t] − log softmax(x)[t] at each row's largest entry t) instead of torch.logsumexp's passes."""
    from opdx.ops import teacher_topk, token_logprobs

    if x.shape[0] == 0 or x.shape[1] == 0:
        return torch.logsumexp(x, -1)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return teacher_topk(x, 1)[2]  # one fused pass: the logsumexp (and a top-1 nobody needs)
    top = x.detach().argmax(-1)
    x_top = x.gather(1, top[:, None])[:, 0].to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x_top - token_logprobs(x, top)


def top_log_probs(side: GroupedSide, top_m: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``[G, min(top_m, V − |exclude|)]`` the largest full-vocabulary log-probs of each group's first position,
    descending, leaving out the columns ``exclude`` (they still count in the normalization)."""
    return side_logprobs(side, group_cols=top_columns(side, top_m, exclude))[1]


def sorted_buckets(top_logp: torch.Tensor, log_scale: torch.Tensor, total_mass: torch.Tensor | float = 1.0):
    """``[G, M + 1]`` probability buckets sorted descending: the M top probabilities scaled by exp(log_scale) and
    one tail bucket holding the rest of the mass, exp(log_scale)·(total_mass − Σ top). total_mass (``[G]`` or a
    float) is the mass of the vocabulary subset the top values were drawn from (1 for the whole vocabulary)."""
    scale = log_scale.exp()[:, None]
    top = top_logp.exp()
    total = torch.as_tensor(total_mass, dtype=top.dtype, device=top.device).reshape(-1, 1)
    tail = (total - top.sum(-1, keepdim=True)).clamp_min(0.0)
    buckets = torch.cat([top, tail.expand(top.shape[0], 1)], -1) * scale
    return torch.sort(buckets, dim=-1, descending=True).values


def uld_distance(student_buckets: torch.Tensor, teacher_buckets: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """``[G]`` Σ_i |s_i − t_i|^p of two sorted bucket vectors, the shorter zero-padded (p = 1: the L1 distance)."""
    if not (p >= 1.0 and math.isfinite(p)):
        raise ValueError(f"p must be a finite number >= 1 (1: L1 distance), got {p!r}")
    width = max(student_buckets.shape[-1], teacher_buckets.shape[-1])
    pad = torch.nn.functional.pad
    s = pad(student_buckets, (0, width - student_buckets.shape[-1]))
    t = pad(teacher_buckets, (0, width - teacher_buckets.shape[-1])).to(s.dtype)
    diff = (s - t).abs()
    return diff.sum(-1) if p == 1.0 else diff.pow(p).sum(-1)


def _check_pair(student: GroupedSide, teacher, top_m) -> None:
    if student.log_scale.shape[0] != teacher.log_scale.shape[0]:
        raise ValueError(f"student has {student.log_scale.shape[0]} groups but teacher "
                         f"{teacher.log_scale.shape[0]}; merge both sides with the same alignment")
    if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1:
        raise ValueError(f"top_m must be an int >= 1 (sorted probabilities kept per side), got {top_m!r}")


def uld_per_group(student: GroupedSide, teacher: GroupedSide, *, top_m: int = 64, p: float = 1.0) -> torch.Tensor:
    """``[G]`` ULD distance per group: each side's top-M merged probabilities plus one tail bucket, sorted
    descending, zero-padded to a common length, Σ|Δ|^p. With top_m >= V on both sides this is exactly the
    full-vocabulary sorted distance. Extra memory O(G·M) besides the inputs. ``teacher`` may also be a
    `opdx.xtok.TopSide` (a server teacher's top-k; its tail bucket is the mass outside them)."""
    _check_pair(student, teacher, top_m)
    with torch.no_grad():
        t_top = teacher.top_logp[:, :top_m] if hasattr(teacher, "top_logp") else top_log_probs(teacher, top_m)
        t_buckets = sorted_buckets(t_top, teacher.log_scale)
    _, s_top, s_scale = side_logprobs(student, group_cols=top_columns(student, top_m))
    return uld_distance(sorted_buckets(s_top, s_scale), t_buckets, p)


def uld_loss(student: GroupedSide, teacher: GroupedSide, *, top_m: int = 64, p: float = 1.0) -> torch.Tensor:
    """Mean over groups of `uld_per_group`. The teacher gets no gradient."""
    per_group = uld_per_group(student, teacher, top_m=top_m, p=p)
    return per_group.mean() if per_group.numel() else per_group.sum()


def _teacher_matched(teacher: GroupedSide, vocab_map, top_m: int):
    """(matched logits ``[G, |matched|]``, matched mass ``[G]``, unmatched buckets) of the teacher side (no grad)."""
    t_ids = vocab_map.teacher_ids.to(teacher.first_logits.device)
    with torch.no_grad():
        t_m = teacher.first_logits.detach().index_select(1, t_ids)
        t_mass = (row_logsumexp(t_m).to(teacher.lse.dtype) - teacher.lse).exp()
        return t_m, t_mass, _unmatched_buckets(teacher, t_ids, t_mass, top_m)


def _unmatched_buckets(side: GroupedSide, ids: torch.Tensor, matched_mass, top_m: int, top=None, log_scale=None):
    """Sorted buckets of the side's top-M unmatched probabilities plus their tail (``top``/``log_scale`` given: the
    student's differentiable ones)."""
    if side.first_logits.shape[-1] == ids.numel():  # every token matched: the unmatched part is empty
        return side.first_logits.new_zeros(side.first_logits.shape[0], 1, dtype=side.lse.dtype)
    if top is None:
        top, log_scale = top_log_probs(side, top_m, exclude=ids), side.log_scale
    return sorted_buckets(top, log_scale, 1.0 - matched_mass)


def gold_loss(student: GroupedSide, teacher: GroupedSide, vocab_map, *, beta: float = 0.5, top_m: int = 64,
              p: float = 1.0, matched_weight: float | None = None) -> tuple[torch.Tensor, dict]:
    """Hybrid GOLD-style loss, mean over groups of w·GJSD_matched + (1 − w)·ULD_unmatched.

    GJSD_matched: `opdx.ops.generalized_jsd` (β convention of DESIGN.md) between the two sides' merged
    distributions restricted to the string-matched sub-vocabulary (``vocab_map``, `build_vocab_map`) and
    renormalized there. ULD_unmatched: `uld_distance` of the sorted top-M probabilities of the remaining tokens of
    each side (scaled by the rule, not renormalized) plus their tail bucket. w: ``matched_weight`` when given (a
    constant in [0, 1]), else the teacher's matched share of each group, Σ_{v matched} P_T,g(v) / Σ_v P_T,g(v)
    (detached). Memory: O(G·|matched|) for the matched columns plus O(G·M). Returns (loss, stats) with stats
    {matched_share, gjsd, uld} (python floats, group means)."""
    _check_pair(student, teacher, top_m)
    if vocab_map.student_ids.numel() == 0:
        raise ValueError("vocab_map has no token whose string matches in both vocabularies; gold needs matches "
                         "(use uld for tokenizers that share no tokens)")
    if matched_weight is not None and not 0.0 <= float(matched_weight) <= 1.0:
        raise ValueError(f"matched_weight must be None (teacher's matched share) or in [0, 1], got {matched_weight}")
    if hasattr(teacher, "top_logp"):
        raise TypeError("gold_loss needs a full teacher side (GroupedSide); for a top-k teacher (TopSide) use "
                        "opdx.xtok.gold_loss_topk")
    from opdx.ops import generalized_jsd

    t_m, t_mass, t_buckets = _teacher_matched(teacher, vocab_map, top_m)
    s_ids = vocab_map.student_ids.to(student.first_logits.device)
    every = student.first_logits.shape[-1] == s_ids.numel()
    s_m, s_top, s_scale = side_logprobs(student, shared_cols=s_ids,
                                        group_cols=None if every else top_columns(student, top_m, exclude=s_ids))
    jsd = generalized_jsd(s_m, t_m.to(s_m.dtype), beta=beta)  # the renormalization is GJSD's own log-softmax
    s_mass = None if every else row_logsumexp(s_m).exp()  # every token matched: the unmatched part is empty
    uld = uld_distance(_unmatched_buckets(student, s_ids, s_mass, top_m, s_top, s_scale), t_buckets, p)
    w = t_mass.detach() if matched_weight is None else torch.full_like(t_mass, float(matched_weight))
    return gold_mean(jsd, uld, w, t_mass)


def gold_mean(jsd: torch.Tensor, uld: torch.Tensor, weight: torch.Tensor, matched_share: torch.Tensor):
    """(mean over groups of weight·jsd + (1 − weight)·uld, stats {matched_share, gjsd, uld}): the GOLD mix of
    `gold_loss` and `opdx.xtok.gold_loss_topk`."""
    per_group = weight * jsd + (1.0 - weight) * uld
    if per_group.numel() == 0:
        return per_group.sum(), {"matched_share": 0.0, "gjsd": 0.0, "uld": 0.0}
    stats = {"matched_share": float(matched_share.mean()), "gjsd": float(jsd.detach().mean()),
             "uld": float(uld.detach().mean())}
    return per_group.mean(), stats
