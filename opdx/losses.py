"""Losses built on opdx.ops.

# ================================================================================ trainer loss composition
Self-contained functions used by `opdx.train` (each takes already-shifted, already-masked inputs; see
`opdx.data.build_batch` for the one place labels are shifted):

- `opd_loss`      reverse-KL REINFORCE on student samples (+ k1/k3 reverse-KL estimates)
- `gjsd_loss`     generalized JSD(beta) over the full vocabulary (opdx.ops.generalized_jsd)
- `topk_loss`     top-k renormalized KL from the teacher's top-k (opdx.ops.topk_kl on hidden states + lm_head)
- `sft_loss`      cross-entropy on non-student sequences (`loss.sft_alpha`)
- `reverse_kl_estimates` k1 / k3 per-token estimates from student and teacher token logprobs
"""

from __future__ import annotations

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
