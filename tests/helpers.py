"""Shared test utilities: random inputs that exercise the edge cases, and error metrics against float64 refs."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute norm when ref is ~0). NaN in either is an error (returns inf)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return float("inf")
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)) or not torch.equal(out[~finite], ref[~finite]):
        return float("inf")
    diff = (out[finite] - ref[finite]).norm().item()
    denom = ref[finite].norm().item()
    return diff / denom if denom > 1e-12 else diff


def random_logits(shape, dtype=torch.float32, device="cpu", scale=3.0, neg_inf_frac=0.0, huge=False):
    """Random logits; optionally with −inf entries (never a whole row) or |values| up to 1e4."""
    x = torch.randn(shape, dtype=torch.float64, device=device) * scale
    if huge:
        x = x * (1e4 / max(x.abs().max().item(), 1e-12))
    if neg_inf_frac > 0 and shape[-1] > 1:
        mask = torch.rand(shape, device=device) < neg_inf_frac
        mask[..., 0] = False
        x = x.masked_fill(mask, float("-inf"))
    return x.to(dtype)


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))
