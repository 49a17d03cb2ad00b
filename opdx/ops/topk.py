"""Top-k renormalized KL straight from hidden states (never forming [N, V] logits), and a bounded teacher top-k.

Building blocks (C++/CUDA ops; autograd + fake kernels registered in `opdx.ops._topk_autograd`):
  torch.ops.opdx.topk_gather_dot   z = (h·W[ids]ᵀ + b[ids]) / T                 [N, K], backward deterministic
  torch.ops.opdx.topk_gjsd         GJSD(β) over the K (or K+1 with tail) buckets, and ∂L/∂z, ∂L/∂lse
  torch.ops.opdx.topk_vocab_lse    student full-vocab logsumexp streamed over vocab tiles (tail only)
  torch.ops.opdx.teacher_topk      fused per-row top-k + logsumexp in one streaming pass
"""

from __future__ import annotations

import math

import torch

from opdx.ops._checks import (
    FLOAT_DTYPES,
    check_nonempty,
    check_same_device,
    check_temperature,
    check_tensor,
    last_dim_contiguous,
)
from opdx.ops._topk_autograd import _acc_dtype  # importing it also registers the ops' autograd and fake kernels

DEFAULT_VOCAB_TILE = 4096
# Teacher log-probs in (0, _LOGPROB_SLACK] are rounding noise of a log-softmax and are clamped to 0; larger is an error.
_LOGPROB_SLACK = 1e-4


def _check_beta(beta) -> float:
    b = float(beta)
    if not (0.0 <= b <= 1.0):
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta!r}")
    return b


def _check_topk_ids(topk_ids, lead_shape, vocab: int, valid_rows) -> torch.Tensor:
    """[*lead, K] integer ids in [0, vocab), distinct within each row; returns them as int64 [N, K]."""
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor of token ids, got {type(topk_ids).__name__}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor of token ids (int64), got {topk_ids.dtype}")
    if topk_ids.dim() != len(lead_shape) + 1 or tuple(topk_ids.shape[:-1]) != tuple(lead_shape):
        raise ValueError(
            f"topk_ids has shape {tuple(topk_ids.shape)} but must be [*hidden.shape[:-1], K] = "
            f"{tuple(lead_shape) + ('K',)}"
        )
    k = topk_ids.shape[-1]
    if k < 1:
        raise ValueError("topk_ids has K = 0 ids per row; pass at least one")
    if k > vocab:
        raise ValueError(f"topk_ids has K = {k} ids per row but the vocabulary has only V = {vocab} entries (K > V)")
    ids = topk_ids.reshape(-1, k).to(torch.int64).contiguous()
    if not torch.compiler.is_compiling() and ids.numel() > 0:
        check = ids if valid_rows is None else ids[valid_rows]
        bad = (check < 0) | (check >= vocab)
        if bool(bad.any()):
            first = int(check[bad][0])
            raise ValueError(
                f"topk_ids contains id {first} outside [0, {vocab}); check the teacher/student vocabulary sizes"
            )
        if k > 1 and check.numel() > 0:
            s = check.sort(dim=-1).values
            dup = (s[:, 1:] == s[:, :-1]).any(dim=-1)
            if bool(dup.any()):
                row = int(dup.nonzero()[0, 0])
                raise ValueError(
                    f"topk_ids has a duplicate id in a row (first offending valid row {row}); each row must list K "
                    "distinct token ids"
                )
    return ids


def _check_teacher_logprobs(teacher_logprobs, ids_shape, acc, valid_rows) -> torch.Tensor:
    check_tensor("teacher_logprobs", teacher_logprobs, dtypes=FLOAT_DTYPES)
    if tuple(teacher_logprobs.shape) != tuple(ids_shape):
        raise ValueError(
            f"teacher_logprobs has shape {tuple(teacher_logprobs.shape)} but must match topk_ids {tuple(ids_shape)}"
        )
    t = teacher_logprobs.reshape(-1, ids_shape[-1]).to(acc)
    if not torch.compiler.is_compiling() and t.numel() > 0:
        check = t if valid_rows is None else t[valid_rows]
        if bool(torch.isnan(check).any()):
            raise ValueError("teacher_logprobs contains NaN; they must be finite log-probabilities (<= 0)")
        if bool((check > _LOGPROB_SLACK).any()):
            raise ValueError(
                f"teacher_logprobs contains a value > 0 (max {float(check.max()):.4g}); they must be full-vocab "
                "normalized log-probabilities (log_softmax), not raw logits"
            )
    return t.clamp(max=0.0).contiguous()


def _check_mask(mask, lead_shape, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but must match the token shape {tuple(lead_shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the inputs are on {device}; move them to the same device")
    return mask.reshape(-1).bool()


def _neutralize(ids, t, mask):
    """Masked rows may hold anything (padding); give them valid distinct ids and a valid distribution."""
    if mask is None:
        return ids, t
    k = ids.shape[-1]
    fill_ids = torch.arange(k, device=ids.device, dtype=ids.dtype).expand_as(ids)
    ids = torch.where(mask[:, None], ids, fill_ids).contiguous()
    t = torch.where(mask[:, None], t, torch.full_like(t, -math.log(k) - 1.0)).contiguous()
    return ids, t


def _check_hidden_weight(hidden, weight, bias):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    check_nonempty("hidden", hidden)
    if weight.dim() != 2:
        raise ValueError(f"weight must be the lm_head weight [V, d], got shape {tuple(weight.shape)}")
    check_nonempty("weight", weight)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden's last dim is {hidden.shape[-1]}; weight must be "
            "[V, d] with d = hidden.shape[-1]"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; cast them to the same dtype")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)} but must be [V] = ({weight.shape[0]},)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}")


def topk_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tail: bool = False,
    vocab_tile: int = DEFAULT_VOCAB_TILE,
    deterministic: bool = True,
) -> torch.Tensor:
    """Per-token top-k GJSD(β) between teacher and student, with student logits computed only at the teacher's ids.

    Args:
        hidden: ``[..., d]`` student final hidden states (float32 / bfloat16 / float16; float64 for gradcheck).
        weight: ``[V, d]`` lm_head weight, same dtype as hidden. bias: optional ``[V]``.
        topk_ids: ``[..., K]`` int64 teacher top-k token ids, distinct within a row.
        teacher_logprobs: ``[..., K]`` the teacher's full-vocab-normalized log-probs at those ids (<= 0).
        beta: 0 → KL(P_T‖P_S) (forward), 1 → KL(P_S‖P_T) (reverse), else generalized JSD.
        temperature: student logits are divided by it (the teacher log-probs are taken as given).
        mask: ``[...]`` bool; False rows give 0 and no gradient (their ids/log-probs are not validated).
        tail: add a (K+1)-th bucket holding 1 − Σ_K p on both sides (no renormalization); needs the student's
            full-vocab logsumexp, streamed over ``weight`` in tiles of ``vocab_tile`` rows.
        deterministic: the grad_weight reduction is deterministic (sorted ids); False allows atomics on CUDA.

    Returns:
        float32 (float64 for float64 inputs) per-token loss of shape ``hidden.shape[:-1]``. Extra memory is
        O(N·K + N·d) (O(N·vocab_tile) with tail), never O(N·V).
    """
    _check_hidden_weight(hidden, weight, bias)
    check_tensor("topk_ids", topk_ids)
    check_tensor("teacher_logprobs", teacher_logprobs)
    check_same_device(hidden=hidden, weight=weight, bias=bias, topk_ids=topk_ids, teacher_logprobs=teacher_logprobs)
    lead = hidden.shape[:-1]
    inv_t = 1.0 / check_temperature(temperature)
    beta = _check_beta(beta)
    if int(vocab_tile) <= 0:
        raise ValueError(f"vocab_tile must be > 0, got {vocab_tile!r}")
    acc = _acc_dtype(hidden.dtype)
    m = _check_mask(mask, lead, hidden.device)
    ids = _check_topk_ids(topk_ids, lead, weight.shape[0], m)
    t = _check_teacher_logprobs(teacher_logprobs, topk_ids.shape, acc, m)
    ids, t = _neutralize(ids, t, m)
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    if tail:
        z, lse = torch.ops.opdx.topk_logits_tail(h, w, b, ids, inv_t, int(vocab_tile), bool(deterministic))
    else:
        z, lse = torch.ops.opdx.topk_gather_dot(h, w, b, ids, inv_t, bool(deterministic)), None
    loss, _, _ = torch.ops.opdx.topk_gjsd(z, t, lse, beta)
    if m is not None:
        loss = torch.where(m, loss, torch.zeros_like(loss))
    return loss.view(lead)


class _TopkTailFromLogits(torch.autograd.Function):
    """Top-k GJSD with the tail bucket from full student logits [N, V]. The gradient w.r.t. a top-k logit is the sum
    of its bucket term and the lse (tail) term, which cancel for rows whose top-k holds almost all the mass (both
    scale with 1/p_tail): they are added in fp32 and rounded to the logits' dtype once. Summing two separately
    rounded bf16 gradients (gather + full-row logsumexp) lost up to 8% of the gradient there."""

    @staticmethod
    def forward(ctx, x, ids, t, beta, inv_t):
        acc = _acc_dtype(x.dtype)
        z = (x.gather(-1, ids).to(acc) * inv_t).contiguous()
        # the row logsumexp of x/T from the fused streaming kernel: no [N, V] temporary
        _, lse, _ = torch.ops.opdx.token_logprobs_fwd(x, ids[:, 0].contiguous(), inv_t, -100, False, False)
        lse = lse.to(acc).contiguous()
        loss, dz, dlse = torch.ops.opdx.topk_gjsd(z, t, lse, beta)
        ctx.save_for_backward(x, ids, z, lse, dz, dlse)
        ctx.inv_t = inv_t
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, ids, z, lse, dz, dlse = ctx.saved_tensors
        g = grad_loss.to(dz.dtype)
        g_lse = (dlse * g).contiguous()
        # full row: ∂lse/∂x_v = p_v/T, from the token-logprobs backward (−g_lse·(1[v=y0] − p_v)/T; y0 is overwritten)
        grad_x = torch.ops.opdx.token_logprobs_bwd((-g_lse).to(lse.dtype), None, x, ids[:, 0].contiguous(), lse,
                                                   None, ctx.inv_t, -100)
        top = (dz * g[:, None] + g_lse[:, None] * torch.exp(z - lse[:, None])) * ctx.inv_t
        grad_x.scatter_(-1, ids, top.to(grad_x.dtype))
        return grad_x, None, None, None, None


def topk_kl_from_logits(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tail: bool = False,
) -> torch.Tensor:
    """`topk_kl` when the caller already has the student's logits ``[..., V]``: gathers them at the ids; with
    ``tail`` the full-row logsumexp comes from the fused streaming token-logprobs kernel (no extra [N, V] copy)."""
    check_tensor("student_logits", student_logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_nonempty("student_logits", student_logits)
    check_tensor("topk_ids", topk_ids)
    check_tensor("teacher_logprobs", teacher_logprobs)
    check_same_device(student_logits=student_logits, topk_ids=topk_ids, teacher_logprobs=teacher_logprobs)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    inv_t = 1.0 / check_temperature(temperature)
    beta = _check_beta(beta)
    acc = _acc_dtype(student_logits.dtype)
    m = _check_mask(mask, lead, student_logits.device)
    ids = _check_topk_ids(topk_ids, lead, vocab, m)
    t = _check_teacher_logprobs(teacher_logprobs, topk_ids.shape, acc, m)
    ids, t = _neutralize(ids, t, m)
    x = last_dim_contiguous(student_logits).reshape(-1, vocab)
    if tail:
        loss = _TopkTailFromLogits.apply(x, ids, t, beta, inv_t)
    else:
        z = (x.gather(-1, ids).to(acc) * inv_t).contiguous()
        loss, _, _ = torch.ops.opdx.topk_gjsd(z, t, None, beta)
    if m is not None:
        loss = torch.where(m, loss, torch.zeros_like(loss))
    return loss.view(lead)


def teacher_topk(logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """(ids ``[..., k]`` int64, full-vocab log-probs ``[..., k]`` fp32, logsumexp ``[...]`` fp32) of logits / T, in one
    streaming pass (fused top-k + online logsumexp). Sorted by value, descending; ties go to the smaller id.
    No gradient (teacher side)."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_nonempty("logits", logits)
    k = int(k)
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V] = [1, {vocab}], got {k}")
    inv_t = 1.0 / check_temperature(temperature)
    lead = logits.shape[:-1]
    ids, lp, lse = torch.ops.opdx.teacher_topk(last_dim_contiguous(logits.detach()), k, inv_t)
    return ids.view(*lead, k), lp.view(*lead, k), lse.view(lead)


@torch.no_grad()
def teacher_topk_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_tile: int = 8192,
):
    """`teacher_topk` of ``hidden·weightᵀ (+ bias)`` for a local teacher, tiling the vocabulary: each tile's logits
    ``[N, vocab_tile]`` go through the fused top-k kernel and are merged into a running top-k and logsumexp, so the
    [N, V] logits never exist. Memory O(N·(vocab_tile + k)). Same ordering/tie rule as `teacher_topk`."""
    _check_hidden_weight(hidden, weight, bias)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    k = int(k)
    vocab = weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V] = [1, {vocab}], got {k}")
    if int(vocab_tile) <= 0:
        raise ValueError(f"vocab_tile must be > 0, got {vocab_tile!r}")
    inv_t = 1.0 / check_temperature(temperature)
    lead = hidden.shape[:-1]
    acc = _acc_dtype(hidden.dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    low_precision_gpu = h.is_cuda and h.dtype in (torch.bfloat16, torch.float16)
    if not low_precision_gpu:
        h = h.to(acc)
    tile = max(int(vocab_tile), k)
    run_x = run_ids = run_lse = None
    for v0 in range(0, vocab, tile):
        v1 = min(vocab, v0 + tile)
        w = weight[v0:v1].to(h.dtype)
        logits = h @ w.t()
        if bias is not None:
            logits = logits + bias[v0:v1].to(h.dtype)
        kt = min(k, v1 - v0)
        ids_t, lp_t, lse_t = torch.ops.opdx.teacher_topk(logits.contiguous(), kt, inv_t)
        del logits
        x_t = lp_t + lse_t[:, None]  # scaled logits of the tile's top entries
        ids_t = ids_t + v0
        if run_x is None:
            run_x, run_ids, run_lse = x_t, ids_t, lse_t
            continue
        # Earlier tiles hold smaller ids and each list is sorted (value desc, id asc): a stable descending sort keeps
        # the smaller id first among equal values, as the single-pass kernel does.
        cat_x = torch.cat([run_x, x_t], dim=1)
        cat_ids = torch.cat([run_ids, ids_t], dim=1)
        sorted_x, order = torch.sort(cat_x, dim=1, descending=True, stable=True)
        keep = min(k, cat_x.shape[1])
        run_x = sorted_x[:, :keep]
        run_ids = cat_ids.gather(1, order[:, :keep])
        run_lse = torch.logaddexp(run_lse, lse_t)
    lp = run_x - run_lse[:, None]
    return run_ids.view(*lead, k), lp.view(*lead, k), run_lse.view(lead)


@torch.no_grad()
def topk_diagnostics(
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_tile: int = 8192,
) -> dict:
    """Trainer-log diagnostics of a top-k batch, as 0-dim float32 tensors averaged over (masked) tokens:

    - ``teacher_topk_mass``: Σ_K p_T (how much of the teacher's distribution the top-k keeps);
    - ``student_topk_mass``: Σ_K p_S at the teacher's ids (full-vocab normalized student);
    - ``top1_agreement``: fraction of tokens where the student's argmax is the teacher's top-1 id.

    The student side comes from ``student_logits [..., V]`` or from ``hidden``/``weight`` (vocab-tiled, no [N, V]).
    """
    if (student_logits is None) == (hidden is None or weight is None):
        raise ValueError("pass either student_logits or both hidden and weight")
    k = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1, k).to(torch.int64)
    t = teacher_logprobs.reshape(-1, k).float()
    inv_t = 1.0 / check_temperature(temperature)
    if student_logits is not None:
        x = last_dim_contiguous(student_logits).reshape(-1, student_logits.shape[-1])
        s_ids, _, s_lse = teacher_topk(x, 1, temperature=temperature)
        z = x.gather(-1, ids).float() * inv_t
    else:
        _check_hidden_weight(hidden, weight, bias)
        h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        s_ids, _, s_lse = teacher_topk_from_hidden(h, weight, 1, bias=bias, temperature=temperature,
                                                   vocab_tile=vocab_tile)
        z = torch.ops.opdx.topk_gather_dot(h, weight.contiguous(), None if bias is None else bias.contiguous(), ids,
                                           inv_t, True).float()
    teacher_mass = t.exp().sum(-1)
    student_mass = (z - s_lse.float()[:, None]).exp().sum(-1)
    teacher_top1 = ids.gather(1, t.argmax(-1, keepdim=True)).squeeze(1)
    agree = (s_ids.reshape(-1) == teacher_top1).float()
    w = torch.ones_like(teacher_mass) if mask is None else mask.reshape(-1).float()
    denom = w.sum().clamp(min=1.0)
    return {
        "teacher_topk_mass": (teacher_mass * w).sum() / denom,
        "student_topk_mass": (student_mass * w).sum() / denom,
        "top1_agreement": (agree * w).sum() / denom,
    }
