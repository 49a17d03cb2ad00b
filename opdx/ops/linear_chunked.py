"""Fused lm_head + generalized JSD as one weighted sum, in row chunks, with the gradients computed in the forward.

`linear_generalized_jsd` returns per-token losses, so its backward must wait for the per-token upstream gradient and
recompute the logits tile by tile (8 GEMM-equivalents for a forward + backward). A training loss only needs the
weighted sum Σ_r w_r·GJSD_r, whose upstream gradient is one scalar: the gradients can be formed in the forward and
rescaled afterwards. Per chunk of rows the forward runs 4 GEMMs over the whole vocabulary (student and teacher logits,
grad_h = G·W_s, grad_W += Gᵀ·h) with G = w_r·∂GJSD_r/∂logits from the existing `generalized_jsd_fwd` kernel; the
backward multiplies the stored gradients by the scalar (no recompute).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from opdx.ops._checks import FLOAT_DTYPES, acc_dtype, check_nonempty, check_same_device, check_temperature, check_tensor
from opdx.ops.generalized_jsd import _check_beta
from opdx.ops.linear import _check_hidden_pair, _check_linear, _check_tile, _check_vocab_size

CHUNK_LOGITS = 8 * 2**20  # default rows per chunk: about this many logits ([chunk, V] float32, three such buffers)
_LOW = (torch.bfloat16, torch.float16)


def _check_weights(weights, lead: tuple, student_hidden: torch.Tensor) -> torch.Tensor | None:
    """Optional per-token float weights of the hidden states' leading dims; returns them flat (or None)."""
    if weights is None:
        return None
    check_tensor("weights", weights, dtypes=FLOAT_DTYPES)
    if tuple(weights.shape) != lead:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)} but must match the hidden states' leading dims {lead} "
            "(one weight per token, e.g. mask.float() / mask.sum())"
        )
    check_same_device(student_hidden=student_hidden, weights=weights)
    return weights.detach().reshape(-1)


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b in the accumulation dtype ``acc``: bf16/fp16 CUDA operands with fp32 output from one GEMM, otherwise
    operands upcast (aten::mm.dtype has no CPU kernel)."""
    if a.dtype == b.dtype and a.dtype in _LOW and a.is_cuda:
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc))


def _add_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, out in the accumulation dtype (bf16/fp16 CUDA operands: fp32 accumulation in the GEMM)."""
    if a.dtype == b.dtype and a.dtype in _LOW and a.is_cuda:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


def _operand(w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The weight as the chunk GEMMs read it: itself, or (bf16/fp16 on CPU) one fp32 copy shared by all chunks."""
    return w if (w.is_cuda or w.dtype not in _LOW) else w.to(acc)


def _chunk_logits(h, w, b, acc):
    out = _mm(h, w.t(), acc)
    if b is not None:
        out += b
    return out


class _LinearGJSDSum(torch.autograd.Function):
    """Σ_r w_r·GJSD_r of the two lm_heads; inputs validated by `linear_generalized_jsd_mean`."""

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, weights, has_mask, vocab, beta, inv_t, chunk, need_h, need_w):
        n, acc = sh.shape[0], acc_dtype(sh.dtype)
        w_s, w_t = _operand(sw[:vocab], acc), _operand(tw[:vocab], acc)
        b_s = sb[:vocab].to(acc) if sb is not None else None
        b_t = tb[:vocab].to(acc) if tb is not None else None
        need_grad = need_h or need_w
        grad_h = torch.empty_like(sh) if need_h else None
        grad_w = torch.zeros(sw.shape, dtype=acc, device=sw.device) if need_w else None
        grad_b = torch.zeros(sw.shape[0], dtype=acc, device=sw.device) if need_w and sb is not None else None
        total = torch.zeros((), dtype=acc, device=sh.device)
        for r0 in range(0, n, chunk):
            h_c, w_c = sh[r0:r0 + chunk], weights[r0:r0 + chunk]
            ls = _chunk_logits(h_c, w_s, b_s, acc)
            lt = _chunk_logits(th[r0:r0 + chunk], w_t, b_t, acc)
            mask = w_c != 0 if has_mask else None
            loss, g = torch.ops.opdx.generalized_jsd_fwd(ls, lt, mask, beta, inv_t, need_grad, False)
            del ls, lt
            total += torch.dot(loss, w_c)
            if not need_grad:
                continue
            torch.ops.opdx.generalized_jsd_scale_grad_(g, w_c)
            g_op = g.to(sh.dtype) if sh.is_cuda and sh.dtype in _LOW else g
            if need_h and g_op.dtype == w_s.dtype == sh.dtype:
                torch.mm(g_op, w_s, out=grad_h[r0:r0 + chunk])
            elif need_h:
                grad_h[r0:r0 + chunk] = _mm(g_op, w_s, acc)
            if need_w:
                _add_mm_(grad_w[:vocab], g_op.t(), h_c)
                if grad_b is not None:
                    grad_b[:vocab] += g.sum(0)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(sw.dtype),
                     None if grad_b is None else grad_b.to(sb.dtype))
        ctx.reusable = sh.dtype == torch.float64  # the checking path (gradcheck runs backward twice on one graph)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "opdx.ops.linear_generalized_jsd_mean: its gradients (computed in the forward) were already used by "
                "an earlier backward (they are scaled in place); back-propagating twice through one call "
                "(retain_graph=True) is not supported: call the op again"
            )
        grads = ctx.grads
        if ctx.reusable:
            grads = [None if g is None else g * grad_out.to(g.dtype) for g in grads]
        else:
            ctx.grads = None
            for g in grads:
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        grad_h, grad_w, grad_b = grads
        return grad_h, grad_w, grad_b, *([None] * 11)


def linear_generalized_jsd_mean(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    weights: torch.Tensor | None = None,
    vocab_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    row_chunk: int | None = None,
) -> torch.Tensor:
    """Σ_r weights_r·GJSD_r of the student's and teacher's lm_head outputs (default weights 1/N: the mean), with the
    gradients computed in the forward, chunk of rows by chunk of rows.

    The per-token GJSD_r is `linear_generalized_jsd`'s (same arguments, same numerics); rows with weight 0 give 0
    loss and 0 gradient. 4 GEMMs over the vocabulary (student and teacher logits, grad_h, grad_W; 3 for a frozen
    lm_head or without grad) instead of `linear_generalized_jsd`'s 8, at the cost of holding the gradients from the
    forward to the backward.

    Args:
        student_hidden, teacher_hidden, student_weight, teacher_weight, beta, temperature, vocab_size, student_bias,
            teacher_bias: as in `linear_generalized_jsd`.
        weights: optional float ``[...]`` (= ``student_hidden.shape[:-1]``) per-token weights, e.g.
            ``mask / mask.sum()``; treated as constants (no gradient).
        row_chunk: rows per chunk (None: about 8M logits per [chunk, V] buffer, at least 1 row).

    Returns:
        A float32 scalar (float64 for float64 inputs), differentiable w.r.t. the student's hidden, weight and bias
        (gradients in their dtypes; the teacher gets none). Only the gradients autograd needs are formed. The
        gradients are scaled in place by the backward, so a call can be back-propagated once (a second backward
        through it raises); float64 inputs keep them intact (gradcheck).

    Memory: three [chunk, V] float32 buffers (student and teacher logits, gradient: chunk·V·12 bytes) plus a float32
    grad_W accumulator [V, d_s]; held until the backward: grad_h [N, d_s] and grad_W [V, d_s] in their dtypes. bf16 /
    fp16 on CPU: float32 copies of both weights.
    """
    sh, sw, sb = _check_linear("student_", student_hidden, student_weight, student_bias)
    th, tw, tb = _check_linear("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    check_nonempty("student_hidden", student_hidden)
    check_same_device(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    lead = _check_hidden_pair(student_hidden, teacher_hidden)
    vocab = _check_vocab_size(vocab_size, sw.shape[0], tw.shape[0])
    b = _check_beta(beta)
    inv_t = 1.0 / check_temperature(temperature)
    flat_w = _check_weights(weights, lead, student_hidden)
    chunk = _check_tile(row_chunk, "row_chunk") or max(1, CHUNK_LOGITS // vocab)
    acc = acc_dtype(sh.dtype)
    n = sh.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=acc, device=sh.device) if flat_w is None else flat_w.to(acc).contiguous()
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and sh.requires_grad
    need_w = grad_on and (sw.requires_grad or (sb is not None and sb.requires_grad))
    return _LinearGJSDSum.apply(sh, sw, sb, th.detach(), tw.detach(), None if tb is None else tb.detach(), w,
                                flat_w is not None, vocab, b, inv_t, chunk, need_h, need_w)
