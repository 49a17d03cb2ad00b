"""Pure-torch references: the executable specification of every opdx op. Float64-capable, deliberately simple
(they materialize [N, V]); tests compare the kernels against these on upcast inputs."""

from __future__ import annotations

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
