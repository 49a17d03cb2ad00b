"""Fake (meta) kernels and autograd registrations of the top-k ops used by `opdx.ops.topk`:
opdx::topk_gather_dot, topk_gjsd, topk_vocab_lse, topk_logits_tail (and their backward ops) and teacher_topk."""

from __future__ import annotations

import torch

from opdx.ops._checks import acc_dtype as _acc_dtype


@torch.library.register_fake("opdx::topk_gather_dot")
def _gather_dot_fake(hidden, weight, bias, ids, inv_temperature, deterministic):
    return hidden.new_empty(ids.shape, dtype=_acc_dtype(hidden.dtype))


def _head_grads_fake(hidden, weight, has_bias: bool, acc_out: bool):
    """(grad hidden, grad weight, grad bias or an empty tensor) of an lm_head backward, fp32 with ``acc_out``."""
    dtype = _acc_dtype(hidden.dtype) if acc_out else hidden.dtype
    return (
        hidden.new_empty(hidden.shape, dtype=dtype),
        weight.new_empty(weight.shape, dtype=dtype),
        weight.new_empty(weight.shape[0] if has_bias else 0, dtype=dtype),
    )


@torch.library.register_fake("opdx::topk_gather_dot_bwd")
def _gather_dot_bwd_fake(grad_z, hidden, weight, ids, inv_temperature, has_bias, deterministic, acc_out):
    return _head_grads_fake(hidden, weight, has_bias, acc_out)


@torch.library.register_fake("opdx::topk_gjsd")
def _gjsd_fake(z, teacher_logprobs, student_lse, beta):
    n = z.shape[0]
    return z.new_empty(n), z.new_empty(z.shape), z.new_empty(n if student_lse is not None else 0)


@torch.library.register_fake("opdx::topk_vocab_lse")
def _vocab_lse_fake(hidden, weight, bias, inv_temperature, vocab_tile):
    return hidden.new_empty(hidden.shape[0], dtype=_acc_dtype(hidden.dtype))


@torch.library.register_fake("opdx::topk_vocab_lse_bwd")
def _vocab_lse_bwd_fake(grad_lse, hidden, weight, bias, lse, inv_temperature, vocab_tile, acc_out):
    return _head_grads_fake(hidden, weight, bias is not None, acc_out)


@torch.library.register_fake("opdx::topk_logits_tail")
def _logits_tail_fake(hidden, weight, bias, ids, inv_temperature, vocab_tile, deterministic):
    acc = _acc_dtype(hidden.dtype)
    return hidden.new_empty(ids.shape, dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc)


@torch.library.register_fake("opdx::teacher_topk")
def _teacher_topk_fake(logits, k, inv_temperature):
    n = logits.numel() // logits.shape[-1]
    acc = _acc_dtype(logits.dtype)
    return (
        logits.new_empty((n, k), dtype=torch.int64),
        logits.new_empty((n, k), dtype=acc),
        logits.new_empty(n, dtype=acc),
    )


def _gather_dot_setup(ctx, inputs, output):
    hidden, weight, bias, ids, inv_temperature, deterministic = inputs
    ctx.save_for_backward(hidden, weight, ids)
    ctx.has_bias = bias is not None
    ctx.inv_temperature = inv_temperature
    ctx.deterministic = deterministic


def _gather_dot_backward(ctx, grad_z):
    hidden, weight, ids = ctx.saved_tensors
    grad_z = grad_z.to(_acc_dtype(hidden.dtype)).contiguous()
    gh, gw, gb = torch.ops.opdx.topk_gather_dot_bwd(grad_z, hidden, weight, ids, ctx.inv_temperature, ctx.has_bias,
                                                    ctx.deterministic, False)
    return gh, gw, (gb if ctx.has_bias else None), None, None, None


torch.library.register_autograd("opdx::topk_gather_dot", _gather_dot_backward, setup_context=_gather_dot_setup)


def _gjsd_setup(ctx, inputs, output):
    _z, _t, student_lse, _beta = inputs
    _loss, dz, dlse = output
    ctx.save_for_backward(dz, dlse)
    ctx.tail = student_lse is not None


def _gjsd_backward(ctx, grad_loss, _grad_dz, _grad_dlse):
    dz, dlse = ctx.saved_tensors
    grad_loss = grad_loss.to(dz.dtype)
    grad_z = dz * grad_loss[:, None]
    grad_lse = dlse * grad_loss if ctx.tail else None
    return grad_z, None, grad_lse, None


torch.library.register_autograd("opdx::topk_gjsd", _gjsd_backward, setup_context=_gjsd_setup)


def _vocab_lse_setup(ctx, inputs, output):
    hidden, weight, bias, inv_temperature, vocab_tile = inputs
    ctx.save_for_backward(hidden, weight, bias, output)
    ctx.inv_temperature = inv_temperature
    ctx.vocab_tile = vocab_tile


def _vocab_lse_backward(ctx, grad_lse):
    hidden, weight, bias, lse = ctx.saved_tensors
    gh, gw, gb = torch.ops.opdx.topk_vocab_lse_bwd(grad_lse.contiguous(), hidden, weight, bias, lse,
                                                   ctx.inv_temperature, ctx.vocab_tile, False)
    return gh, gw, (gb if bias is not None else None), None, None


torch.library.register_autograd("opdx::topk_vocab_lse", _vocab_lse_backward, setup_context=_vocab_lse_setup)


def _logits_tail_setup(ctx, inputs, output):
    hidden, weight, bias, ids, inv_temperature, vocab_tile, deterministic = inputs
    _z, lse = output
    ctx.save_for_backward(hidden, weight, bias, ids, lse)
    ctx.inv_temperature = inv_temperature
    ctx.vocab_tile = vocab_tile
    ctx.deterministic = deterministic


def _logits_tail_backward(ctx, grad_z, grad_lse):
    """Both contributions (gather at the ids, softmax-weighted full vocab) come back in the accumulation dtype and are
    added before one rounding to the parameter dtype: for bf16 they largely cancel on the top-k rows."""
    hidden, weight, bias, ids, lse = ctx.saved_tensors
    acc = lse.dtype
    grad_z = torch.zeros(ids.shape, dtype=acc, device=lse.device) if grad_z is None else grad_z.to(acc).contiguous()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(acc).contiguous()
    has_bias = bias is not None
    gh, gw, gb = torch.ops.opdx.topk_gather_dot_bwd(grad_z, hidden, weight, ids, ctx.inv_temperature, has_bias,
                                                    ctx.deterministic, True)
    gh2, gw2, gb2 = torch.ops.opdx.topk_vocab_lse_bwd(grad_lse, hidden, weight, bias, lse, ctx.inv_temperature,
                                                      ctx.vocab_tile, True)
    gh = gh.add_(gh2).to(hidden.dtype)
    del gh2
    gw = gw.add_(gw2).to(weight.dtype)
    del gw2
    gb = gb.add_(gb2).to(weight.dtype) if has_bias else None
    return gh, gw, gb, None, None, None, None


torch.library.register_autograd("opdx::topk_logits_tail", _logits_tail_backward, setup_context=_logits_tail_setup)
