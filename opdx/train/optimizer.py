"""The student's DeepSpeed engine: its AdamW (optim.impl), the warm-up/cosine learning-rate schedule and the
DeepSpeed config.

optim.impl picks the AdamW implementation (`resolve_optimizer_impl`). ``fused`` / ``foreach`` build a
``torch.optim.AdamW(fused=True | foreach=True)`` and hand it to ``deepspeed.initialize`` as the client optimizer;
``deepspeed`` lets DeepSpeed build its AdamW from the config (``torch_adam``: torch's for-loop implementation).
DeepSpeed 0.19.8 keeps a client ``torch.optim.AdamW`` as its basic optimizer at every ZeRO stage 0-3 (it is on
ZeRO's supported-optimizer list) and under its bf16/fp16 wrappers, which step it on fp32 master weights (ZeRO: flat
fp32 partitions), so the choice depends only on whether torch has a fused AdamW kernel for the device.
"""

from __future__ import annotations

import functools
import math

import torch

from opdx.config import Config, ConfigError
from opdx.config_checks import OPTIM_IMPLS


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch's ``AdamW(fused=True)`` steps fp32 tensors on ``device`` (probed on one element: torch checks the
    device only at the first step)."""
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.zeros_like(p)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except RuntimeError:
        return False
    return True


def resolve_optimizer_impl(impl: str, device: torch.device) -> str:
    """optim.impl -> ``fused`` | ``foreach`` | ``deepspeed``: ``auto`` is ``fused`` where torch has the kernel for
    ``device`` (CPU, CUDA, ...) and ``deepspeed`` elsewhere; an explicit ``fused`` there is a ConfigError."""
    if impl not in OPTIM_IMPLS:
        raise ConfigError(f"optim.impl must be one of {', '.join(repr(i) for i in OPTIM_IMPLS)}, got {impl!r}")
    if impl not in ("auto", "fused"):
        return impl
    if fused_adamw_supported(device):
        return "fused"
    if impl == "fused":
        raise ConfigError(f"optim.impl=fused: torch has no fused AdamW kernel for device {device.type!r}; use "
                          f"optim.impl=auto, foreach or deepspeed")
    return "deepspeed"


def client_optimizer(cfg: Config, params: list, impl: str):
    """The torch AdamW that DeepSpeed steps for impl ``fused`` / ``foreach``; None for ``deepspeed`` (built by
    DeepSpeed from `deepspeed_config`'s "optimizer" section)."""
    if impl == "deepspeed":
        return None
    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             **{impl: True})


def lr_at(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine down to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(cfg: Config):
    """The schedule as ``f(step) -> factor`` (torch LambdaLR)."""
    return functools.partial(lr_at, warmup=cfg.optim.warmup_steps, total=max(cfg.train.max_steps, 1),
                             floor=cfg.optim.min_lr_ratio)


def deepspeed_config(cfg: Config, optimizer_impl: str = "deepspeed") -> dict:
    """The engine's DeepSpeed config; the "optimizer" section only when DeepSpeed builds the AdamW itself."""
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if cfg.deepspeed.param_persistence_threshold >= 0:
            zero["stage3_param_persistence_threshold"] = cfg.deepspeed.param_persistence_threshold
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optimizer_impl == "deepspeed":
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": True}}
    return ds


def init_engine(cfg: Config, student, device: torch.device):
    """deepspeed.initialize on the trainable parameters, the optim.impl AdamW + the warm-up/cosine schedule."""
    import deepspeed

    impl = resolve_optimizer_impl(cfg.optim.impl, device)
    params = [p for p in student.parameters() if p.requires_grad]
    scheduler = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=params,
                                           optimizer=client_optimizer(cfg, params, impl),
                                           config=deepspeed_config(cfg, impl), lr_scheduler=scheduler)
    return engine
