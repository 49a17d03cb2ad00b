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


def linear_token_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """token_logprobs of the explicitly formed logits hidden @ weight.T (+ bias)."""
    logits = hidden @ weight.transpose(0, 1)
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, targets, temperature, ignore_index)


def linear_generalized_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, beta=0.5, temperature=1.0,
                           mask=None, vocab_size=None, student_bias=None, teacher_bias=None):
    """generalized_jsd of the explicitly formed logits h·Wᵀ (+ b) of both sides, over the first vocab_size columns."""
    s = student_hidden @ student_weight.transpose(0, 1)
    t = teacher_hidden @ teacher_weight.transpose(0, 1)
    if student_bias is not None:
        s = s + student_bias
    if teacher_bias is not None:
        t = t + teacher_bias
    if vocab_size is not None:
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    return generalized_jsd(s, t, beta, temperature, mask)


# TEMPORARY copy of the `gjsd` branch reference (not yet on main); the merge keeps that branch's version.
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
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        loss = beta * kl(log_pt, log_m) + (1.0 - beta) * kl(log_ps, log_m)
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss
