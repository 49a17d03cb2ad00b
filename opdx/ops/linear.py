"""Fused lm_head + loss: token log-probabilities and generalized JSD computed from hidden states and lm_head weights,
tile by tile over the vocabulary, never forming the [N, V] logits.

Sweeps (see csrc/cpu/linear_losses.cpp): the forward computes the row logsumexps over vocabulary tiles (and, for the
JSD, a second sweep for the row loss and the row total its gradient needs); the backward recomputes each tile's
logits from the saved O(N) row statistics and feeds the gradient coefficients of the tile straight into the two
gradient GEMMs (grad_h += G·W_tile, grad_W_tile = Gᵀ·h; skipped, with grad_W, when the lm_head is frozen).

Why the backward recomputes instead of the forward storing gradients: the ops return per-token values, so the upstream
gradient is a vector g [N], and grad_W = Σ_r g_r·(∂L_r/∂logits_r)ᵀ·h_r cannot be rescaled after the fact unless g is
uniform. Storing gradients in the forward would also hold grad_W ([V, d]) and grad_h from the forward until the
backward. For token logprobs the forward needs only one sweep, so the recompute costs one tile GEMM per tile, exactly
what a second forward sweep would; for the JSD the gradient needs the row total, which is only known after the second
sweep, so a third pass over the tiles is needed either way. Saved for backward: the inputs (references, no copies) and
O(N) float32 row statistics (token logprobs: lse; JSD: lse_s, lse_t, the gradient anchor and the row total).
"""

from __future__ import annotations

import torch

from opdx.ops._checks import acc_dtype as _acc_dtype

from opdx.ops._checks import (
    FLOAT_DTYPES,
    check_nonempty,
    check_same_device,
    check_targets,
    check_temperature,
    check_tensor,
)
from opdx.ops.generalized_jsd import _check_beta  # the same β validation and messages as generalized_jsd


def _check_tile(tile, name: str = "vocab_tile") -> int:
    """A tile / chunk size: a positive int, or None (automatic) -> 0."""
    if tile is None:
        return 0
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{name} must be a positive int or None (automatic), got {tile!r}")
    return tile


def _check_linear(prefix: str, hidden, weight, bias):
    """Validates one lm_head (hidden [..., d], weight [V, d], bias [V] or None).

    Returns (hidden as [N, d], weight contiguous, bias contiguous or None)."""
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
            raise ValueError(
                f"{b_name} must have shape [{weight.shape[0]}] (= {w_name}.shape[0]), got {tuple(bias.shape)}"
            )
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


@torch.library.register_fake("opdx::linear_token_logprobs_fwd")
def _ltl_fwd_fake(hidden, weight, bias, targets, inv_temperature, ignore_index, tile):
    n = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)


@torch.library.register_fake("opdx::linear_token_logprobs_bwd")
def _ltl_bwd_fake(grad_logp, hidden, weight, bias, targets, lse, inv_temperature, ignore_index, tile, weight_grad):
    return _linear_grads_fake(hidden, weight, bias, weight_grad)


def _linear_grads_fake(hidden, weight, bias, weight_grad):
    return (
        torch.empty_like(hidden),
        torch.empty_like(weight) if weight_grad else weight.new_empty(0),
        weight.new_empty(weight.shape[0] if bias is not None and weight_grad else 0),
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
    weight_grad = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    gh, gw, gb = torch.ops.opdx.linear_token_logprobs_bwd(grad_logp, hidden, weight, bias, targets, lse, *ctx.args,
                                                          weight_grad)
    return (gh if ctx.needs_input_grad[0] else None, gw if weight_grad else None,
            gb if ctx.has_bias and weight_grad else None, None, None, None, None)


torch.library.register_autograd("opdx::linear_token_logprobs_fwd", _ltl_backward, setup_context=_ltl_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# linear_generalized_jsd
# ---------------------------------------------------------------------------------------------------------------------


def _check_vocab_size(vocab_size, vs: int, vt: int) -> int:
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"student_weight has {vs} vocabulary rows but teacher_weight has {vt}. Models of one family often pad "
                "the lm_head differently (e.g. 151936 vs 152064 rows); pass vocab_size=<the tokenizer's vocabulary "
                f"size> to use only the first vocab_size rows of each (e.g. vocab_size={min(vs, vt)})"
            )
        return vs
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {min(vs, vt)}] (student has {vs} rows, teacher {vt})")
    return vocab_size


def _check_hidden_pair(student_hidden, teacher_hidden) -> tuple:
    """Equal leading (token) dims and one dtype for both sides; returns the leading dims."""
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(
            f"student_hidden is {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)}: their "
            "leading (token) dims must match"
        )
    if student_hidden.dtype != teacher_hidden.dtype:
        raise TypeError(
            f"student is {student_hidden.dtype} but teacher is {teacher_hidden.dtype}; cast the teacher's hidden states "
            "and lm_head to the student's dtype (values are upcast to float32 inside the op)"
        )
    return lead


def _check_mask(mask, lead: tuple) -> torch.Tensor | None:
    """Optional bool mask of the hidden states' leading dims; returns it flat and contiguous (or None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor (True = trained token), e.g. labels != -100")
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but must match the hidden states' leading dims {lead}")
    return mask.reshape(-1).contiguous()


def linear_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_tile: int | None = None,
) -> torch.Tensor:
    """Per-token generalized JSD(β) of the student's and teacher's lm_head outputs, without forming [N, V] logits.

    Equals ``generalized_jsd(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T +
    teacher_bias, beta=..., temperature=..., mask=..., vocab_size=...)`` to fp32 rounding, with the same numerics (the
    shared per-entry JSD terms): β = 0 is exactly KL(P_T‖P_S), β = 1 exactly KL(P_S‖P_T), otherwise
    β·KL(P_T‖M) + (1−β)·KL(P_S‖M) with M = β·P_T + (1−β)·P_S; per-token losses are >= 0.

    Args:
        student_hidden, teacher_hidden: ``[..., d_s]`` and ``[..., d_t]`` with equal leading dims (the hidden sizes may
            differ) and one dtype: float32 / bfloat16 / float16 (float64 for gradcheck); bf16/fp16 are upcast to
            float32 before the tile GEMMs.
        student_weight, teacher_weight: ``[V_s, d_s]`` / ``[V_t, d_t]`` lm_head weights (dtype of their hidden).
        beta: in [0, 1]. temperature: > 0, divides both logits.
        mask: optional bool ``[...]``; True marks trained tokens, False rows give 0 loss and 0 gradient.
        vocab_size: use only the first ``vocab_size`` rows of each weight (lm_heads padded differently); required
            when V_s != V_t. The student's gradient is 0 in the rows beyond it.
        student_bias, teacher_bias: optional ``[V_s]`` / ``[V_t]`` lm_head biases.
        vocab_tile: vocabulary rows per tile (None: automatic).

    Returns:
        float32 per-token loss of shape ``student_hidden.shape[:-1]`` (float64 for float64 inputs). Differentiable
        w.r.t. the student's hidden, weight and bias only; the teacher gets no gradient.
    """
    sh, sw, sb = _check_linear("student_", student_hidden, student_weight, student_bias)
    th, tw, tb = _check_linear("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    check_nonempty("student_hidden", student_hidden)
    check_same_device(student_hidden=student_hidden, teacher_hidden=teacher_hidden, mask=mask)
    lead = _check_hidden_pair(student_hidden, teacher_hidden)
    vocab = _check_vocab_size(vocab_size, sw.shape[0], tw.shape[0])
    b = _check_beta(beta)
    inv_t = 1.0 / check_temperature(temperature)
    flat_mask = _check_mask(mask, lead)
    loss, _stats = torch.ops.opdx.linear_generalized_jsd_fwd(
        sh, sw, sb, th.detach(), tw.detach(), None if tb is None else tb.detach(), flat_mask, vocab, b, inv_t,
        _check_tile(vocab_tile),
    )
    return loss.view(lead)


@torch.library.register_fake("opdx::linear_generalized_jsd_fwd")
def _lgjsd_fwd_fake(sh, sw, sb, th, tw, tb, mask, vocab_size, beta, inv_temperature, tile):
    n = sh.shape[0]
    acc = _acc_dtype(sh.dtype)
    return sh.new_empty(n, dtype=acc), sh.new_empty((4, n), dtype=acc)


@torch.library.register_fake("opdx::linear_generalized_jsd_bwd")
def _lgjsd_bwd_fake(grad, sh, sw, sb, th, tw, tb, mask, stats, vocab_size, beta, inv_temperature, tile, weight_grad):
    return _linear_grads_fake(sh, sw, sb, weight_grad)


def _lgjsd_setup_context(ctx, inputs, output):
    sh, sw, sb, th, tw, tb, mask, vocab_size, beta, inv_temperature, tile = inputs
    _loss, stats = output
    ctx.save_for_backward(sh, sw, sb, th, tw, tb, mask, stats)
    ctx.args = (vocab_size, beta, inv_temperature, tile)
    ctx.has_bias = sb is not None


def _lgjsd_backward(ctx, grad_loss, _grad_stats):
    sh, sw, sb, th, tw, tb, mask, stats = ctx.saved_tensors
    grad_loss = torch.zeros_like(stats[0]) if grad_loss is None else grad_loss.to(stats.dtype).contiguous()
    weight_grad = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    gh, gw, gb = torch.ops.opdx.linear_generalized_jsd_bwd(grad_loss, sh, sw, sb, th, tw, tb, mask, stats, *ctx.args,
                                                           weight_grad)
    return (gh if ctx.needs_input_grad[0] else None, gw if weight_grad else None,
            gb if ctx.has_bias and weight_grad else None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("opdx::linear_generalized_jsd_fwd", _lgjsd_backward,
                                setup_context=_lgjsd_setup_context)
