"""Input validation shared by the op faces. Kernels assume validated input; errors name the argument and the fix."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ops accumulate and return in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, *, dtypes=None, min_dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one row and one vocabulary entry")


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; move them to the same device"
            )


def check_temperature(temperature) -> float:
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_targets(name: str, targets: torch.Tensor, expected_shape, vocab: int, ignore_index: int) -> torch.Tensor:
    """Integer targets of `expected_shape` in [0, vocab) or == ignore_index; returns them flat, int64, contiguous."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids (int64), got {targets.dtype}")
    if tuple(targets.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name} has shape {tuple(targets.shape)} but must match logits.shape[:-1] = {tuple(expected_shape)}"
        )
    flat = targets.reshape(-1).to(torch.int64).contiguous()
    if not torch.compiler.is_compiling() and flat.numel() > 0:
        bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
        if bool(bad.any()):
            first = int(flat[bad][0])
            raise ValueError(
                f"{name} contains id {first} outside [0, {vocab}) (and != ignore_index={ignore_index}); "
                "check the tokenizer/model vocabulary sizes"
            )
    return flat


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels need stride 1 along the vocabulary and at most 4 strided leading dims; other layouts are copied."""
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        return t.contiguous()
    if t.dim() > 5:
        return t.reshape(-1, t.size(-1))
    return t
