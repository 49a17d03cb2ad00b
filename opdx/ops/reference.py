"""Pure-torch references: the executable specification of every opdx op. Float64-capable, deliberately simple
(they materialize [N, V]); tests compare the kernels against these on upcast inputs."""

from __future__ import annotations

import math

import torch


def token_logprobs(logits, targets, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log softmax(logits / T)[targets] (0 where targets == ignore_index) and optionally the entropy."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.gather(logp_all, -1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)  # 0·log 0 = 0, with finite gradients
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0, mask=None):
    """Per-token generalized JSD(β) between softmax(student / T) and softmax(teacher / T), shape ``[...]``.

    β = 0 is exactly KL(P_T‖P_S), β = 1 exactly KL(P_S‖P_T), otherwise β·KL(P_T‖M) + (1−β)·KL(P_S‖M) with
    M = β·P_T + (1−β)·P_S. 0·log 0 = 0 for −inf logits. ``mask`` (bool, shape ``[...]``): False rows give 0.
    Differentiable (autograd through the materialized [..., V] tensors); use float64 inputs for a tight reference.
    """
    beta = float(beta)
    log_ps = torch.log_softmax(student_logits / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits / temperature, dim=-1)

    def kl(log_p, log_q):  # Σ p·(log p − log q), with 0 where p == 0
        p = log_p.exp()
        diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
        return (p * diff).sum(-1)

    if beta == 0.0:
        loss = kl(log_pt, log_ps)
    elif beta == 1.0:
        loss = kl(log_ps, log_pt)
    else:
        # Entries that are −inf on both sides have M = 0 and contribute 0; give logaddexp finite stand-ins there so
        # its backward (exp(a − out) with a = out = −inf) does not turn the zero upstream gradient into NaN.
        both = torch.isneginf(log_ps) & torch.isneginf(log_pt)
        safe_pt = log_pt.masked_fill(both, 0.0)
        safe_ps = log_ps.masked_fill(both, 0.0)
        log_m = torch.logaddexp(safe_pt + math.log(beta), safe_ps + math.log1p(-beta))
        loss = beta * kl(log_pt, log_m) + (1.0 - beta) * kl(log_ps, log_m)
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss

def _gjsd_buckets(log_ps, log_pt, beta):
    """Generalized JSD(β) between two distributions given as log-probs over the last dim (0·log 0 = 0)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0.0:
        return torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    if beta == 1.0:
        return torch.where(ps > 0, ps * (log_ps - log_pt), torch.zeros_like(ps)).sum(-1)
    log_m = torch.logaddexp(log_pt + torch.log(torch.tensor(beta, dtype=log_pt.dtype)),
                            log_ps + torch.log(torch.tensor(1.0 - beta, dtype=log_ps.dtype)))
    kl_t = torch.where(pt > 0, pt * (log_pt - log_m), torch.zeros_like(pt)).sum(-1)
    kl_s = torch.where(ps > 0, ps * (log_ps - log_m), torch.zeros_like(ps)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def _log_tail(log_mass, tiny):
    """log(1 − Σ p) from log Σ p, clamped below at log(tiny) (as the kernels do)."""
    tail = -torch.expm1(log_mass.clamp(max=0.0))
    return torch.log(tail.clamp(min=tiny))


def topk_kl_from_logits(student_logits, topk_ids, teacher_logprobs, beta=0.0, temperature=1.0, mask=None,
                        tail=False):
    """Top-k GJSD(β): gather the student's logits / T at the teacher's ids, renormalize both sides over the K ids
    (or, with tail, keep full-vocab probabilities and add a (K+1)-th bucket 1 − Σ_K p on both sides), GJSD over the
    buckets. Masked-out rows give 0. Materializes everything; float64-capable."""
    x = student_logits / temperature
    z = torch.gather(x, -1, topk_ids)
    t = teacher_logprobs.to(z.dtype)
    if tail:
        tiny = 1e-300 if z.dtype == torch.float64 else 1e-30
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        log_ps = z - lse
        log_ps = torch.cat([log_ps, _log_tail(torch.logsumexp(log_ps, -1, keepdim=True), tiny)], -1)
        log_pt = torch.cat([t, _log_tail(torch.logsumexp(t, -1, keepdim=True), tiny)], -1)
    else:
        log_ps = torch.log_softmax(z, -1)
        log_pt = torch.log_softmax(t, -1)
    loss = _gjsd_buckets(log_ps, log_pt, beta)
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss


def topk_kl(hidden, weight, topk_ids, teacher_logprobs, bias=None, beta=0.0, temperature=1.0, mask=None,
            tail=False):
    """`topk_kl_from_logits` of the materialized student logits hidden·weightᵀ (+ bias)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return topk_kl_from_logits(logits, topk_ids, teacher_logprobs, beta, temperature, mask, tail)


def teacher_topk(logits, k, temperature=1.0):
    """(ids, full-vocab log-probs, logsumexp) of the k largest logits / T per row."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp, ids = torch.topk(logp, k, dim=-1)
    return ids, lp, torch.logsumexp(logits / temperature, dim=-1)
