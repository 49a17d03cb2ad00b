"""MiniLLM (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models") on student samples, same tokenizer.

The objective is the sequence-level reverse KL KL(π_S‖π_T). With per-token rewards r_t = log π_T(y_t) − log π_S(y_t)
(detached), the paper's policy gradient decomposes into

- a long-term term: −R_{t+1}·∇ log π_S(y_t), with R_{t+1} the (discounted, length-normalized) sum of the rewards of
  the tokens *after* t, and
- a single-step term: the exact gradient of the full-vocabulary reverse KL KL(π_S(·|y_<t)‖π_T(·|y_<t)) at each
  position (our GJSD kernel at β = 1), which replaces the noisy one-sample estimate of the current token's reward.

Teacher-mixed sampling (the paper's variant: tokens drawn from p̃ = α·π_T + (1 − α)·π_S by
`opdx.rollout.mixed.TeacherMixedRollout`) weighs both terms at each position by the single-step importance weight
w_t = π_S(y_t) / p̃(y_t) (detached; the paper's approximation of the sequence-level ratio), ``weights`` below.
For α < 1, w_t ≤ 1 / (1 − α).
"""

from __future__ import annotations

import torch


def future_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                   length_normalize: bool = True) -> torch.Tensor:
    """``[B, T]`` R_{t+1} = Σ_{k>t, valid} γ^{k−t−1}·r_k, divided by Σ_{k>t, valid} γ^{k−t−1} when length_normalize
    (γ = 1: the mean reward of the later tokens; 0 where no valid token follows). Invalid positions k add nothing;
    the exponent counts positions. Builds a ``[T, T]`` discount matrix (T = 4096: 64 MiB in fp32)."""
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1] (discount of later rewards), got {gamma!r}")
    t = rewards.shape[-1]
    pos = torch.arange(t, device=rewards.device)
    lag = pos[None, :] - pos[:, None] - 1  # [t, k]: k − t − 1
    later = lag >= 0
    discount = torch.where(later, torch.tensor(float(gamma), dtype=rewards.dtype, device=rewards.device)
                           .pow(lag.clamp_min(0).to(rewards.dtype)), torch.zeros((), dtype=rewards.dtype))
    valid = mask.to(rewards.dtype)
    returns = (rewards * valid) @ discount.T
    if length_normalize:
        weight = valid @ discount.T
        returns = torch.where(weight > 0, returns / weight.clamp_min(torch.finfo(rewards.dtype).tiny), 0.0)
    return returns


def minillm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor, *, gamma: float = 1.0, length_normalize: bool = True,
                 single_step_weight: float = 1.0, temperature: float = 1.0,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """MiniLLM loss on student samples: mean over valid tokens of −R_{t+1}·log π_S(y_t) (see `future_returns`)
    plus single_step_weight · the mean full-vocabulary reverse KL KL(π_S‖π_T) per position.

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` (row t predicts targets[:, t]; same tokenizer and vocab).
        targets: ``[B, T]`` the sampled tokens; mask: bool ``[B, T]``, True at the trained (generated) tokens.
        gamma, length_normalize: see `future_returns` (the paper: γ = 1, normalized).
        temperature: divides both logits.
        weights: optional ``[B, T]`` per-token importance weights (detached) multiplying both terms (teacher-mixed
            sampling); None = 1.

    Returns (loss, stats) with stats {reward_mean, single_step_kl, k1} (python floats); the teacher gets no gradient.
    """
    from opdx.ops import generalized_jsd, token_logprobs

    if student_logits.dim() != 3 or student_logits.shape[:2] != targets.shape or mask.shape != targets.shape:
        raise ValueError(f"student_logits must be [B, T, V] with targets and mask [B, T]; got "
                         f"{tuple(student_logits.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = trained token), got {mask.dtype}")
    teacher_logits = teacher_logits.detach()
    safe_targets = targets.masked_fill(~mask, -100)
    student_logp = token_logprobs(student_logits, safe_targets, temperature=temperature)
    with torch.no_grad():
        teacher_logp = token_logprobs(teacher_logits, safe_targets, temperature=temperature)
        rewards = (teacher_logp - student_logp).masked_fill(~mask, 0.0)
        returns = future_returns(rewards, mask, gamma=gamma, length_normalize=length_normalize)
    n = mask.sum().clamp_min(1)
    w = 1.0 if weights is None else weights.detach().to(student_logp.dtype).masked_fill(~mask, 0.0)
    long_term = -(w * returns * student_logp).masked_fill(~mask, 0.0).sum() / n
    kl = generalized_jsd(student_logits, teacher_logits.to(student_logits.dtype), beta=1.0,
                         temperature=temperature, mask=mask)
    single_step = (w * kl).sum() / n
    stats = {"reward_mean": float(rewards.sum() / n), "single_step_kl": float(single_step.detach()),
             "k1": float(-rewards.sum() / n)}
    return long_term + float(single_step_weight) * single_step, stats
