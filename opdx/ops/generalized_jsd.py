"""Generalized Jensen-Shannon divergence (GKD loss) per token, with the student gradient computed in the forward."""

from __future__ import annotations

import math

import torch

from opdx.ops._checks import acc_dtype as _acc_dtype

from opdx.ops._checks import (
    FLOAT_DTYPES,
    check_nonempty,
    check_same_device,
    check_temperature,
    check_tensor,
    last_dim_contiguous,
)


def _check_beta(beta) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise TypeError(f"beta must be a number in [0, 1], got {type(beta).__name__}") from None
    if not (math.isfinite(b) and 0.0 <= b <= 1.0):
        raise ValueError(
            f"beta must be in [0, 1] (0: KL(teacher‖student), 1: KL(student‖teacher), else the mixture), got {beta!r}"
        )
    return b


def _align_vocab(student: torch.Tensor, teacher: torch.Tensor, vocab_size):
    vs, vt = student.shape[-1], teacher.shape[-1]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"student_logits has vocabulary size {vs} but teacher_logits has {vt}. Models of one family often pad "
                "the lm_head differently (e.g. Qwen2.5 checkpoints with 151936 vs 152064 columns); pass "
                "vocab_size=<the tokenizer's vocabulary size> to use only the first vocab_size columns of each "
                f"(e.g. vocab_size={min(vs, vt)})"
            )
        return student, teacher
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= min(vs, vt):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {min(vs, vt)}] (student has {vs} columns, teacher {vt})"
        )
    # A narrower view with the same row strides: no copy.
    return student[..., :vocab_size], teacher[..., :vocab_size]


def _check_logit_pair(student_logits, teacher_logits, mask) -> None:
    """Both logits: float tensors, non-empty, on one device (with the mask), one dtype, equal leading dims."""
    check_tensor("student_logits", student_logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("teacher_logits", teacher_logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_nonempty("student_logits", student_logits)
    check_nonempty("teacher_logits", teacher_logits)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(
            f"student_logits is {student_logits.dtype} but teacher_logits is {teacher_logits.dtype}; "
            "cast one of them (e.g. teacher_logits.to(student_logits.dtype))"
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has "
            f"{tuple(teacher_logits.shape)}; the leading (token) dims must match"
        )


def _check_mask(mask, lead: tuple) -> torch.Tensor | None:
    """Optional bool mask of the logits' leading dims; returns it flat and contiguous (or None)."""
    if mask is None:
        return None
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = trained token), got {mask.dtype}")
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but must match the logits' leading dims {lead}")
    return mask.reshape(-1).contiguous()


def _stores_fp32_grad(grad_dtype, dtype: torch.dtype) -> bool:
    """Whether the stored student gradient is float32 rather than the student dtype."""
    if grad_dtype is None or grad_dtype == dtype:
        return False
    if grad_dtype == torch.float32 and dtype != torch.float64:
        return True
    raise ValueError(f"grad_dtype must be None, {dtype} or torch.float32, got {grad_dtype}")


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token generalized JSD(β) between softmax(student / T) and softmax(teacher / T), streamed row by row.

    β = 0 is exactly KL(P_T‖P_S), β = 1 exactly KL(P_S‖P_T), 0 < β < 1 is β·KL(P_T‖M) + (1−β)·KL(P_S‖M) with
    M = β·P_T + (1−β)·P_S (the convention of TRL's GKDTrainer and the GKD paper). Reference:
    ``opdx.ops.reference.generalized_jsd``.

    Args:
        student_logits, teacher_logits: ``[..., V]`` with equal shapes and dtypes: float32 / bfloat16 / float16
            (float64 too, e.g. for gradcheck). The last dim must be contiguous; leading dims may have any strides
            (e.g. ``logits[:, :-1]``) and are not copied. bf16/fp16 values are upcast before any arithmetic.
        beta: in [0, 1].
        temperature: > 0; divides both logits.
        mask: optional bool ``[...]``; **True marks the tokens that are trained**, False rows give 0 loss and 0
            gradient (like ``labels != -100``).
        vocab_size: use only the first ``vocab_size`` columns of each input (for checkpoints whose lm_heads are
            padded differently, e.g. 151936 vs 152064); required when the last dims differ.
        grad_dtype: dtype of the stored student gradient: None (the student dtype) or torch.float32.

    Returns:
        The per-token loss, float32 (float64 for float64 inputs), shape ``[...]``; >= 0 up to fp32 rounding.

    Autograd: the gradient w.r.t. the student logits is computed during the forward (only when the student requires
    grad) and stored; backward scales it by the incoming per-token gradient, in place (so a graph can be
    back-propagated once; ``retain_graph=True`` reuse raises). The teacher is a constant: it gets no gradient.
    Extra memory: the stored gradient plus O(N).
    """
    _check_logit_pair(student_logits, teacher_logits, mask)
    student, teacher = _align_vocab(student_logits, teacher_logits, vocab_size)
    b = _check_beta(beta)
    inv_temperature = 1.0 / check_temperature(temperature)
    lead = tuple(student.shape[:-1])
    flat_mask = _check_mask(mask, lead)
    grad_fp32 = _stores_fp32_grad(grad_dtype, student.dtype)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    loss, _grad = torch.ops.opdx.generalized_jsd_fwd(
        last_dim_contiguous(student), last_dim_contiguous(teacher), flat_mask, b, inv_temperature,
        bool(compute_grad), bool(grad_fp32),
    )
    return loss.view(lead)


@torch.library.register_fake("opdx::generalized_jsd_fwd")
def _generalized_jsd_fwd_fake(student, teacher, mask, beta, inv_temperature, compute_grad, grad_fp32):
    torch._check(student.shape == teacher.shape, lambda: "student and teacher shapes differ")
    torch._check(student.dtype == teacher.dtype, lambda: "student and teacher dtypes differ")
    n = 1
    for d in student.shape[:-1]:
        n = n * d
    loss = student.new_empty(n, dtype=_acc_dtype(student.dtype))
    gdt = torch.float32 if (grad_fp32 and student.dtype != torch.float64) else student.dtype
    grad = student.new_empty(student.shape if compute_grad else (0,), dtype=gdt)
    return loss, grad


@torch.library.register_fake("opdx::generalized_jsd_scale_grad_")
def _generalized_jsd_scale_grad_fake(grad, scale):
    return None


def _setup_context(ctx, inputs, output):
    _loss, grad = output
    ctx.save_for_backward(grad)
    ctx.consumed = False
    # The stored-gradient output never receives a gradient; without this autograd would materialize a zero
    # [N, V] tensor for it in backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 or grad_loss is None:  # the student did not require grad
        return None, None, None, None, None, None, None
    if ctx.consumed:
        raise RuntimeError(
            "opdx.ops.generalized_jsd: its stored gradient was already used by an earlier backward (it is scaled "
            "in place); back-propagating twice through one call (retain_graph=True) is not supported"
        )
    scale = grad_loss.reshape(grad.shape[:-1] + (1,))
    if torch.compiler.is_compiling() or grad.dtype == torch.float64:
        # float64 is the checking path (gradcheck re-runs backward on one graph): keep the stored gradient intact
        grad_student = (grad * scale).to(grad.dtype)
    else:
        ctx.consumed = True
        # in place, one fused pass (no second [N, V] buffer; a broadcast bf16 × fp32 mul_ ran at a quarter of it)
        torch.ops.opdx.generalized_jsd_scale_grad_(grad, grad_loss.reshape(-1).to(torch.float32).contiguous())
        grad_student = grad
    # The teacher is treated as a constant: no gradient.
    return grad_student, None, None, None, None, None, None


torch.library.register_autograd("opdx::generalized_jsd_fwd", _backward, setup_context=_setup_context)
