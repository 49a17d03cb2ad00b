"""One side's differentiable inputs to the cross-tokenizer losses, with one dense pass in backward.

The ULD / GOLD losses read a side's ``[N, V]`` next-token logits only through (a) the log-probability of each
observed token (the "observed" rule's scale, the group-KL statistics) and (b) the log-probabilities of a few
columns of each group's first row (the top-M, the string-matched sub-vocabulary). The gradient of every such term
with respect to a row is ``g·(onehot(column) − softmax(row))``, so the whole gradient is

    grad[r] = c_r·(onehot(y_r) − softmax_r) + Σ_k g_k·onehot(col_k) − (Σ_k g_k)·onehot(y_r)   (first rows only)

with c_r = g_obs[r] + Σ_k g_k: one streaming pass of the fused token-logprob backward kernel plus a sparse
correction on the G first rows. Through plain autograd the same gradient costs a zero-filled [N, V] buffer for the
row selection, another [G, V] per gather / top-k, and their sums.
"""

from __future__ import annotations

import torch


class _GatheredLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, first, shared_cols, group_cols, inv_temperature, observed):
        if observed is None:
            logp, lse, _ = torch.ops.opdx.token_logprobs_fwd(logits, targets, inv_temperature, -100, False, False)
        else:  # the caller's token log-probs: lse = x[y] / T − log p(y), without another pass over the rows
            logp = observed.clone()  # an output, not the input itself
            lse = logits.gather(1, targets[:, None])[:, 0].to(observed.dtype) * inv_temperature - observed
        lse_first = lse.index_select(0, first)[:, None]
        rows = first[:, None]
        ctx.every_column = _every_column(shared_cols, logits.shape[1])
        shared = logits.index_select(0, first) if ctx.every_column else logits[rows, shared_cols[None, :]]
        shared = _scaled_minus(shared, lse, inv_temperature, lse_first)
        grouped = _scaled_minus(logits[rows, group_cols], lse, inv_temperature, lse_first)
        ctx.save_for_backward(logits, targets, first, shared_cols, group_cols, lse)
        ctx.inv_temperature = inv_temperature
        return logp, shared, grouped

    @staticmethod
    def backward(ctx, g_logp, g_shared, g_grouped):
        logits, targets, first, shared_cols, group_cols, lse = ctx.saved_tensors
        inv_t = ctx.inv_temperature
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.contiguous()
        g_shared = torch.zeros(first.numel(), shared_cols.numel(), dtype=lse.dtype, device=lse.device) \
            if g_shared is None else g_shared
        g_grouped = torch.zeros_like(group_cols, dtype=lse.dtype) if g_grouped is None else g_grouped
        selected = g_shared.sum(-1) + g_grouped.sum(-1)  # [G]: the softmax coefficient the columns add per first row
        coef = g_logp.index_add(0, first, selected)
        grad = torch.ops.opdx.token_logprobs_bwd(coef, None, logits, targets, lse, None, inv_t, -100)
        rows = first[:, None]
        scale = (lambda v: v * inv_t) if inv_t != 1.0 else (lambda v: v)
        if ctx.every_column:  # a dense [G, V] block on distinct rows: one row-wise add
            grad.index_add_(0, first, scale(g_shared).to(grad.dtype))
            shared = ()
        else:
            shared = ((shared_cols[None, :], g_shared),)
        # (row, column) pairs repeat only across the index sets: accumulate
        for cols, values in (*shared, (group_cols, g_grouped),
                             (targets.index_select(0, first)[:, None], -selected[:, None])):
            grad.index_put_((rows, cols), scale(values).to(grad.dtype), accumulate=True)
        return grad, None, None, None, None, None, None


def _every_column(cols: torch.Tensor, vocab: int) -> bool:
    """Whether cols is 0..V−1 in order (the whole row: no column gather, a dense backward)."""
    return cols.numel() == vocab and bool((cols == torch.arange(vocab, device=cols.device)).all())


def _scaled_minus(values: torch.Tensor, like: torch.Tensor, scale: float, shift: torch.Tensor) -> torch.Tensor:
    """values · scale − shift in like's dtype, in place on the fresh gathered tensor."""
    values = values.to(like.dtype)
    if scale != 1.0:
        values.mul_(scale)
    return values.sub_(shift)


def gathered_logprobs(logits: torch.Tensor, targets: torch.Tensor, first: torch.Tensor, *,
                      shared_cols: torch.Tensor | None = None, group_cols: torch.Tensor | None = None,
                      temperature: float = 1.0, observed: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(observed ``[N]``, shared ``[G, K1]``, grouped ``[G, K2]``) log-probabilities of softmax(logits / T):
    observed[j] at token j's own target, shared[g, k] at column shared_cols[k] of row first[g], grouped[g, k] at
    column group_cols[g, k] of row first[g] (first: G distinct row indices). Differentiable in ``logits`` with
    the one-pass backward of this module; float32 results for half-precision logits. ``observed`` (detached, as
    `opdx.ops.token_logprobs` gives them): the observed log-probs when the caller has them (saves a pass)."""
    device = logits.device
    shared_cols = torch.zeros(0, dtype=torch.int64, device=device) if shared_cols is None else shared_cols
    group_cols = torch.zeros(first.numel(), 0, dtype=torch.int64, device=device) if group_cols is None \
        else group_cols
    return _GatheredLogprobs.apply(logits.contiguous(), targets.to(torch.int64).contiguous(),
                                   first.to(torch.int64), shared_cols.to(torch.int64), group_cols.to(torch.int64),
                                   1.0 / float(temperature), None if observed is None else observed.detach())
