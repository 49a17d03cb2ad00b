"""Fused log-softmax gather: per-token log-probabilities (and entropy) without any [N, V] temporary."""

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
    last_dim_contiguous,
)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
):
    """log softmax(logits / temperature)[targets], computed row by row in one streaming pass.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 for gradcheck). The last dim must be contiguous;
            leading dims may have any strides (e.g. ``logits[:, :-1]``) and are not copied.
        targets: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        temperature: > 0; logits are divided by it.
        ignore_index: positions with this target give 0 and receive zero gradient.
        return_entropy: also return the per-token entropy of softmax(logits / temperature).
        inplace_backward: write the gradient into ``logits``' own buffer in backward (saves one [N, V] tensor);
            the caller promises not to read ``logits`` after backward.

    Returns:
        float32 log-probabilities of shape ``targets.shape`` (float64 for float64 logits), and with
        ``return_entropy`` a tuple ``(logprobs, entropy)``.

    Extra memory is O(N): the forward saves only the row logsumexp (and the entropy).
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_nonempty("logits", logits)
    check_same_device(logits=logits, targets=targets)
    flat_targets = check_targets("targets", targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    inv_temperature = 1.0 / check_temperature(temperature)
    logp, _lse, entropy = torch.ops.opdx.token_logprobs_fwd(
        last_dim_contiguous(logits), flat_targets, inv_temperature, int(ignore_index), bool(return_entropy),
        bool(inplace_backward),
    )
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp


@torch.library.register_fake("opdx::token_logprobs_fwd")
def _token_logprobs_fwd_fake(logits, targets, inv_temperature, ignore_index, compute_entropy, inplace_backward):
    n = targets.numel()
    acc = _acc_dtype(logits.dtype)
    return (
        logits.new_empty(n, dtype=acc),
        logits.new_empty(n, dtype=acc),
        logits.new_empty(n if compute_entropy else 0, dtype=acc),
    )


@torch.library.register_fake("opdx::token_logprobs_bwd")
def _token_logprobs_bwd_fake(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("opdx::token_logprobs_bwd_inplace")
def _token_logprobs_bwd_inplace_fake(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature,
                                     ignore_index):
    return None


def _setup_context(ctx, inputs, output):
    logits, targets, inv_temperature, ignore_index, compute_entropy, inplace_backward = inputs
    _logp, lse, entropy = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.inv_temperature = inv_temperature
    ctx.ignore_index = ignore_index
    ctx.compute_entropy = compute_entropy
    ctx.inplace_backward = inplace_backward


def _backward(ctx, grad_logp, _grad_lse, grad_entropy):
    logits, targets, lse, entropy = ctx.saved_tensors
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    if ctx.compute_entropy and grad_entropy is not None:
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
    else:
        grad_entropy = None
    args = (grad_logp, grad_entropy, logits, targets, lse, entropy, ctx.inv_temperature, ctx.ignore_index)
    if ctx.inplace_backward:
        torch.ops.opdx.token_logprobs_bwd_inplace(*args)
        grad_logits = logits
    else:
        grad_logits = torch.ops.opdx.token_logprobs_bwd(*args)
    return grad_logits, None, None, None, None, None


torch.library.register_autograd("opdx::token_logprobs_fwd", _backward, setup_context=_setup_context)
