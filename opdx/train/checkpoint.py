"""Checkpoints under output_dir/checkpoints/step_N (DeepSpeed state, sampler position, per-rank RNG state), written
atomically, and the final save_pretrained model under output_dir/final."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from opdx.config import Config, ConfigError
from opdx.data import Sampler
from opdx.train.distributed import barrier, rank, world
from opdx.train.scoring import base_model


def _ckpt_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the finished checkpoints, oldest first."""
    return sorted((int(p.name[5:]), p) for p in root.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit())


def newest_checkpoint(cfg: Config) -> Path | None:
    root = _ckpt_root(cfg)
    if not root.is_dir():
        return None
    done = [(n, p) for n, p in _step_dirs(root) if (p / "trainer_state.json").is_file()]
    return done[-1][1] if done else None


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(cfg: Config, engine, step: int, sampler_state: dict, teacher_tokens: int = 0) -> None:
    """``sampler_state``: the sampler's position after step ``step`` (opdx.train.inputs). Atomic: every rank writes
    into checkpoints/.tmp_step_N, then rank 0 renames it to step_N and keeps the newest save.keep."""
    root = _ckpt_root(cfg)
    tmp, final = root / f".tmp_step_{step}", root / f"step_{step}"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{rank()}.pt")
    barrier()
    if rank() == 0:
        state = {"step": step, "sampler": sampler_state, "world_size": world(),
                 "teacher_tokens": int(teacher_tokens)}
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump(state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, p in _step_dirs(root)[:-max(1, cfg.save.keep)]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()


def load_checkpoint(cfg: Config, engine, sampler: Sampler, path: Path) -> tuple[int, int]:
    """-> (step, teacher-scored tokens trained on so far)."""
    with open(path / "trainer_state.json") as f:
        state = json.load(f)
    if state.get("world_size") != world():
        raise ConfigError(f"checkpoint {path} was written by {state.get('world_size')} ranks, now {world()}")
    load_path, _ = engine.load_checkpoint(str(path), tag="ds")
    if load_path is None:
        raise ConfigError(f"checkpoint {path} could not be loaded by DeepSpeed")
    sampler.load_state_dict(state["sampler"])
    rng = path / f"rng_rank{rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"]), int(state.get("teacher_tokens", 0))


def _save_lora_zero3(module, tmp: Path, rank0: bool) -> None:
    """The engine's parameters are partitioned: gather the adapter, then the merged weights a layer at a time."""
    import deepspeed

    from opdx.models import iter_merged_weights

    adapter = [p for p in module.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(adapter, modifier_rank=None):
        if rank0:
            module.save_pretrained(str(tmp / "adapter"))
    state = {}
    for name, t in iter_merged_weights(module, device="cpu"):  # tied weights: one tensor under both names
        if rank0:
            state[name] = t
    if rank0:
        base_model(module).save_pretrained(str(tmp), state_dict=state)


def save_final(cfg: Config, engine, tokenizer, final_dir: Path) -> None:
    """save_pretrained under output_dir/final: the full model (ZeRO-3 weights consolidated), and with LoRA the
    adapter under final/adapter plus the model with the adapter merged into its base weights under final/.
    Collective under ZeRO-3 (every rank calls it); rank 0 writes."""
    module = engine.module
    zero3 = cfg.deepspeed.zero_stage == 3
    rank0 = rank() == 0
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.model.lora and zero3:
        _save_lora_zero3(module, tmp, rank0)
    elif cfg.model.lora:
        if rank0:
            module.save_pretrained(str(tmp / "adapter"))
            module.merge_and_unload().save_pretrained(str(tmp))
    else:
        state = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
        if rank0:
            module.save_pretrained(str(tmp), state_dict=state)
    if rank0:
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)
    barrier()
