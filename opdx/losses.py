"""Loss functions built on opdx ops.

`generalized_jsd_loss` has the signature and values of TRL's ``GKDTrainer.generalized_jsd_loss`` (the version with a
``labels`` argument; its β convention is the one of DESIGN.md: β = 0 → KL(P_T‖P_S), β = 1 → KL(P_S‖P_T), mixture
M = β·P_T + (1−β)·P_S — so no mapping is needed). Early TRL releases (no ``labels`` argument) used a log-linear
mixture with β swapped; that variant is not reproduced. Differences, all deliberate: the loss is float32 (TRL's is in
the logits' dtype, e.g. bf16) and more accurate; reduction="none" returns the per-vocabulary terms as TRL does, but
materializes them (use `opdx.ops.generalized_jsd` for per-token values without [N, V] temporaries).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opdx.ops.generalized_jsd import generalized_jsd

_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _elementwise_jsd(student_logits, teacher_logits, beta, temperature):
    """Per-vocabulary-entry terms (the 'none' reduction), in float32 (float64 for float64 inputs)."""
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_ps = torch.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.to(dt) / temperature, dim=-1)

    def kl_terms(log_p, log_q):
        return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))

    if beta == 0.0:
        return kl_terms(log_pt, log_ps)
    if beta == 1.0:
        return kl_terms(log_ps, log_pt)
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    return beta * kl_terms(log_pt, log_m) + (1.0 - beta) * kl_terms(log_ps, log_m)


def generalized_jsd_loss(
    student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"
):
    """Generalized JSD loss with TRL ``GKDTrainer.generalized_jsd_loss`` semantics (a drop-in replacement).

    Args:
        student_logits, teacher_logits: ``[batch, seq, V]`` (any ``[..., V]`` works).
        labels: optional ``[batch, seq]``; positions equal to -100 are ignored.
        beta, temperature: as in `opdx.ops.generalized_jsd`.
        reduction: "batchmean": sum / number of tokens with labels != -100 when labels are given, else
            sum / (shape[0] · shape[1]) (batch · seq for 3-D logits; TRL's definition, literally); "sum";
            "mean": sum / number of (kept token, vocabulary entry) pairs, as torch's mean over TRL's elementwise
            tensor; "none": the elementwise ``[..., V]`` terms (``[kept tokens, V]`` with labels), materialized.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    mask = None
    if labels is not None:
        mask = labels != -100
    if reduction == "none":
        jsd = _elementwise_jsd(student_logits, teacher_logits, float(beta), float(temperature))
        return jsd[mask] if mask is not None else jsd
    per_token = generalized_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature, mask=mask)
    total = per_token.sum()
    if reduction == "sum":
        return total
    vocab = student_logits.shape[-1]
    if reduction == "batchmean":
        if mask is not None:
            return total / mask.sum()
        return total / (student_logits.shape[0] * student_logits.shape[1])
    # "mean"
    count = mask.sum() if mask is not None else per_token.numel()
    return total / (count * vocab)


class GeneralizedJSDLoss(nn.Module):
    """``nn.Module`` form of `generalized_jsd_loss`: ``GeneralizedJSDLoss(beta=0.5)(student_logits, teacher_logits,
    labels)``."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits, labels=None):
        return generalized_jsd_loss(
            student_logits, teacher_logits, labels, beta=self.beta, temperature=self.temperature,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}"


# ====================================================================================================
# Trainer loss composition.
# Self-contained functions used by `opdx.train` (each takes already-shifted, already-masked inputs; see
# `opdx.data.build_batch` for the one place labels are shifted):
#
# - `opd_loss`      reverse-KL REINFORCE on student samples (+ k1/k3 reverse-KL estimates)
# - `opd_is_loss`   importance-sampled OPD with the sampler's logprobs (Tinker's recipe; optional discount, PPO clip)
# - `gjsd_loss`     generalized JSD(beta) over the full vocabulary (opdx.ops.generalized_jsd)
# - `topk_loss`     top-k renormalized KL from the teacher's top-k (opdx.ops.topk_kl on hidden states + lm_head)
# - `sft_loss`      cross-entropy on non-student sequences (`loss.sft_alpha`)
# - `reverse_kl_estimates` k1 / k3 per-token estimates from student and teacher token logprobs
# ====================================================================================================

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def reverse_kl_estimates(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor):
    """Per-token estimates of KL(student || teacher) on student samples: k1 = log s - log t,
    k3 = (t/s - 1) - log(t/s). Returns (k1_mean, k3_mean, k1_sum, count) over the masked tokens (detached)."""
    with torch.no_grad():
        mask = mask.bool()
        log_ratio = (teacher_logp - student_logp).float()
        k1 = -log_ratio
        k3 = torch.expm1(log_ratio.clamp(max=30.0)) - log_ratio
        n = mask.sum()
        k1_sum = k1[mask].sum()
        return k1_sum / n.clamp_min(1), k3[mask].sum() / n.clamp_min(1), k1_sum, n


def opd_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, *,
             normalize: bool = True, eps: float = 1e-6):
    """Reverse-KL REINFORCE. reward_t = teacher_logp_t - student_logp_t (detached); normalized over the valid
    tokens (mean/std) when ``normalize``; loss = -mean(reward * student_logp) over valid tokens.

    Returns ``(loss, stats)`` with stats = {k1, k3, reward_mean, reward_std} (python floats)."""
    mask = mask.bool()
    reward = (teacher_logp.detach().float() - student_logp.detach().float()).masked_fill(~mask, 0.0)
    n = mask.sum().clamp_min(1)
    mean = reward.sum() / n
    var = ((reward - mean).masked_fill(~mask, 0.0) ** 2).sum() / n
    std = var.sqrt()
    if normalize:
        reward = ((reward - mean) / (std + eps)).masked_fill(~mask, 0.0)
    loss = -_masked_mean(reward * student_logp.float(), mask)
    k1, k3, _, _ = reverse_kl_estimates(student_logp, teacher_logp, mask)
    return loss, {"k1": float(k1), "k3": float(k3), "reward_mean": float(mean), "reward_std": float(std)}


def gjsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float, temperature: float = 1.0):
    """Mean generalized JSD(beta) over rows of ``[N, V]`` student/teacher logits already restricted to the trained
    positions (opdx.ops.generalized_jsd)."""
    from opdx.ops import generalized_jsd

    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    per_token = generalized_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature)
    return per_token.float().mean()


def topk_loss(hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor, *,
              bias=None, beta: float = 0.0, temperature: float = 1.0, tail: bool = False):
    """Mean top-k renormalized KL over rows: student logits at the teacher's top-k ids computed from ``hidden``
    ``[N, d]`` and the lm_head ``weight`` ``[V, d]`` without forming ``[N, V]`` (opdx.ops.topk_kl)."""
    from opdx.ops import topk_kl

    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    per_token = topk_kl(hidden, weight, topk_ids, teacher_logprobs, bias=bias, beta=beta, temperature=temperature,
                        tail=tail)
    return per_token.float().mean()


def sft_loss(student_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy (negative log-likelihood) of the masked targets."""
    return -_masked_mean(student_logp.float(), mask.bool())


def _check_opd_is_args(student_logp, sampler_logp, teacher_logp, mask, kl_coef, discount, is_clip) -> None:
    shape = tuple(student_logp.shape)
    for name, t in (("sampler_logp", sampler_logp), ("teacher_logp", teacher_logp), ("mask", mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"opd_is_loss: {name} has shape {tuple(t.shape)}, student_logp has {shape}; all four "
                             "inputs must be [B, T] over the same (already shifted) target positions")
    if student_logp.dim() != 2:
        raise ValueError(f"opd_is_loss: inputs must be [B, T], got {student_logp.dim()}-D tensors of shape {shape}")
    if not kl_coef >= 0:
        raise ValueError(f"opd_is_loss: kl_coef must be >= 0, got {kl_coef}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"opd_is_loss: discount must be in [0, 1] (0 = per-token advantage), got {discount}")
    if is_clip is not None and not is_clip > 0:
        raise ValueError(f"opd_is_loss: is_clip must be > 0 (the PPO trust-region width ε) or None for no "
                         f"clipping, got {is_clip}")


def discounted_future_sum(values: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = Σ_{u ≥ t} γ^{k_u − k_t}·a_u over the valid tokens u of the same row, where k counts valid tokens (gaps
    in the mask do not decay the sum). [B, T] in, [B, T] out (0 at masked positions), no gradient.

    Computed with one [B, T, T] weight tensor whose exponents are ≥ 0 (γ^k ∈ [0, 1]: no overflow or underflow of
    the kind a γ^{−t}-scaled reverse cumulative sum would have)."""
    with torch.no_grad():
        mask = mask.bool()
        values = values.masked_fill(~mask, 0.0)
        if discount == 0.0:
            return values
        k = mask.to(values.dtype).cumsum(-1)  # valid-token index (1-based) at each position
        steps = k[:, None, :] - k[:, :, None]  # [B, t, u] = k_u - k_t
        n = values.shape[-1]
        later = torch.ones(n, n, dtype=torch.bool, device=values.device).triu()  # u >= t
        weights = torch.where(later & mask[:, None, :], torch.pow(discount, steps.clamp_min(0.0)), 0.0)
        return (weights @ values[..., None]).squeeze(-1).masked_fill(~mask, 0.0)


def opd_is_loss(student_logp: torch.Tensor, sampler_logp: torch.Tensor, teacher_logp: torch.Tensor,
                mask: torch.Tensor, *, kl_coef: float = 1.0, discount: float = 0.0, is_clip: float | None = None,
                baseline: bool = False):
    """Importance-sampled on-policy distillation (Tinker's recipe, DESIGN.md "OPD with importance sampling").

    Inputs ``[B, T]``, already shifted and masked like `opd_loss`: ``student_logp`` = log π_θ(x_t) (with grad,
    temperature 1), ``sampler_logp`` = q_t, the rollout engine's logprob of the sampled token, ``teacher_logp`` =
    log π_T(x_t); ``mask`` marks the trained tokens.

    Advantage a_t = −kl_coef·(q_t − log π_T(x_t)) (detached), discounted over the row's later valid tokens when
    ``discount`` > 0 (`discounted_future_sum`). Ratio ρ_t = exp(log π_θ(x_t) − q_t); loss = −Σ_t ρ_t·A_t / n_valid.
    At ρ = 1 the gradient is REINFORCE's −A·∇log π_θ / n_valid. ``is_clip`` = ε: PPO's pessimistic
    min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) — a token with A > 0 stops pushing once ρ > 1+ε, one with A < 0 once ρ < 1−ε
    (zero gradient there); inside the trust region (and on the other side of it) the unclipped term is kept.
    ``baseline``: subtract the mean advantage over the valid tokens (a constant baseline: the gradient stays unbiased
    since E[∇log π] = 0 at every position; it removes the large common part of the advantage a weak student has,
    without the rescaling of `opd_loss`'s normalization, which amplifies noise once the student is close).

    Returns ``(loss, stats)``; stats (python floats, over valid tokens): k1, k3 (reverse-KL estimates of the trained
    student vs the teacher), is_ratio_mean, is_clip_frac (tokens whose clipped term was the active one),
    advantage_mean."""
    _check_opd_is_args(student_logp, sampler_logp, teacher_logp, mask, kl_coef, discount, is_clip)
    dt = torch.float64 if student_logp.dtype == torch.float64 else torch.float32
    mask = mask.bool()
    n = mask.sum().clamp_min(1)
    sampler = sampler_logp.detach().to(dt)
    advantage = discounted_future_sum(-kl_coef * (sampler - teacher_logp.detach().to(dt)), mask, discount)
    if baseline:
        advantage = (advantage - advantage.sum() / n).masked_fill(~mask, 0.0)
    ratio = torch.exp((student_logp.to(dt) - sampler).masked_fill(~mask, 0.0))
    objective = ratio * advantage
    clipped_active = torch.zeros_like(mask)
    if is_clip is not None:
        clipped = ratio.clamp(1.0 - is_clip, 1.0 + is_clip) * advantage
        clipped_active = (clipped < objective) & mask
        objective = torch.where(clipped_active, clipped, objective)  # = min(ρ·A, clip(ρ)·A)
    loss = -objective.sum() / n  # masked tokens hold ρ = 1, A = 0
    k1, k3, _, _ = reverse_kl_estimates(student_logp, teacher_logp, mask)
    with torch.no_grad():
        stats = {"k1": float(k1), "k3": float(k3), "is_ratio_mean": float(ratio.masked_fill(~mask, 0.0).sum() / n),
                 "is_clip_frac": int(clipped_active.sum()) / int(n), "advantage_mean": float(advantage.sum() / n)}
    return loss, stats
