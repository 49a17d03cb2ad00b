"""Fused lm_head + loss: token log-probabilities and generalized JSD computed from hidden states and lm_head weights,
tile by tile over the vocabulary, never forming the [N, V] logits.

Sweeps (see csrc/cpu/linear_losses.cpp): the forward computes the row logsumexps over vocabulary tiles (and, for the
JSD, a second sweep for the row loss and the row total its gradient needs); the backward recomputes each tile's
logits from the saved O(N) row statistics and feeds the gradient coefficients of the tile straight into the two
gradient GEMMs (grad_h += G·W_tile, grad_W_tile = Gᵀ·h).

Why the backward recomputes instead of the forward storing gradients: the ops return per-token values, so the upstream
gradient is a vector g [N], and grad_W = Σ_r g_r·(∂L_r/∂logits_r)ᵀ·h_r cannot be rescaled after the fact unless g is
uniform. Storing gradients in the forward would also hold grad_W ([V, d]) and grad_h from the forward until the
backward. For token logprobs the forward needs only one sweep, so the recompute costs one tile GEMM per tile, exactly
what a second forward sweep would; for the JSD the gradient needs the row total, which is only known after the second
sweep, so a third pass over the tiles is needed either way. Saved for backward: the inputs (references, no copies) and
two (token logprobs: one) float32 [N] row statistics plus the row total.
"""

from __future__ import annotations

import torch

from opdx.ops._checks import (
    FLOAT_DTYPES,
    check_nonempty,
    check_same_device,
    check_targets,
    check_temperature,
    check_tensor,
)


def _check_tile(vocab_tile) -> int:
    if vocab_tile is None:
        return 0
    if isinstance(vocab_tile, bool) or not isinstance(vocab_tile, int) or vocab_tile < 1:
        raise ValueError(f"vocab_tile must be a positive int or None (automatic), got {vocab_tile!r}")
    return vocab_tile


def _check_linear(prefix: str, hidden, weight, bias):
    """Validates one lm_head (hidden [..., d], weight [V, d], bias [V] or None); returns (hidden [N, d], weight, bias)."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    check_tensor(h_name, hidden, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor(w_name, weight, dtypes=FLOAT_DTYPES)
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must be the lm_head weight of shape [V, d], got shape {tuple(weight.shape)}")
    check_nonempty(w_name, weight)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{h_name} has hidden size {hidden.shape[-1]} but {w_name} is [V, d] with d = {weight.shape[1]}; "
            "pass the lm_head weight as stored by nn.Linear (out_features x in_features)"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{h_name} is {hidden.dtype} but {w_name} is {weight.dtype}; cast them to one dtype (values are upcast "
            "to float32 inside the op)"
        )
    check_same_device(**{h_name: hidden, w_name: weight, b_name: bias})
    if bias is not None:
        check_tensor(b_name, bias, dtypes=(weight.dtype,))
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape [{weight.shape[0]}] (= {w_name}.shape[0]), got {tuple(bias.shape)}")
        bias = bias.contiguous()
    return hidden.reshape(-1, hidden.shape[-1]), weight.contiguous(), bias


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_tile: int | None = None,
) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[targets] without forming the [N, V] logits.

    Args:
        hidden: ``[..., d]`` float32 / bfloat16 / float16 (float64 for gradcheck) hidden states.
        weight: ``[V, d]`` lm_head weight (``nn.Linear.weight``), same dtype as hidden.
        targets: ``[...]`` (= ``hidden.shape[:-1]``) integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` lm_head bias.
        temperature: > 0; the logits are divided by it.
        ignore_index: positions with this target give 0 and receive zero gradient.
        vocab_tile: vocabulary rows per tile (None: about 8M logits per tile buffer, at most 16384 columns).

    Returns:
        float32 log-probabilities of shape ``targets.shape`` (float64 for float64 inputs). Differentiable w.r.t.
        hidden, weight and bias (gradients in their dtypes).

    bf16/fp16 inputs are upcast to float32 before the tile GEMMs (float32 logits and accumulation). Extra memory:
    one [N, tile] float32 buffer, an upcast copy of hidden (bf16/fp16 only), O(N) statistics; the backward also holds
    grad_weight ([V, d], which it returns) and a float32 grad_hidden.
    """
    h2, w, b = _check_linear("", hidden, weight, bias)
    check_nonempty("hidden", hidden)
    check_same_device(hidden=hidden, targets=targets)
    vocab = w.shape[0]
    flat_targets = check_targets("targets", targets, hidden.shape[:-1], vocab, ignore_index)
    inv_t = 1.0 / check_temperature(temperature)
    logp, _lse = torch.ops.opdx.linear_token_logprobs_fwd(h2, w, b, flat_targets, inv_t, int(ignore_index),
                                                         _check_tile(vocab_tile))
    return logp.view(targets.shape)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("opdx::linear_token_logprobs_fwd")
def _ltl_fwd_fake(hidden, weight, bias, targets, inv_temperature, ignore_index, tile):
    n = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)


@torch.library.register_fake("opdx::linear_token_logprobs_bwd")
def _ltl_bwd_fake(grad_logp, hidden, weight, bias, targets, lse, inv_temperature, ignore_index, tile):
    return (
        torch.empty_like(hidden),
        torch.empty_like(weight),
        weight.new_empty(weight.shape[0] if bias is not None else 0),
    )


def _ltl_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temperature, ignore_index, tile = inputs
    _logp, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse)
    ctx.args = (inv_temperature, ignore_index, tile)
    ctx.has_bias = bias is not None


def _ltl_backward(ctx, grad_logp, _grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    gh, gw, gb = torch.ops.opdx.linear_token_logprobs_bwd(grad_logp, hidden, weight, bias, targets, lse, *ctx.args)
    return gh, gw, (gb if ctx.has_bias else None), None, None, None, None


torch.library.register_autograd("opdx::linear_token_logprobs_fwd", _ltl_backward, setup_context=_ltl_setup_context)
