"""Removing decoder layers from a causal LM in place: `prune_layers` (the demo student is the pruned teacher)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .checks import _config_of


def _even_indices(n_layers: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n_layers), always including 0 and n_layers - 1 (count >= 2)."""
    if not 1 <= count <= n_layers:
        raise ValueError(f"keep={count} must be between 1 and the model's {n_layers} layers")
    if count == 1:
        return [0]
    # integer round-half-up of i * (n - 1) / (count - 1): strictly increasing because the step is >= 1
    return [(2 * i * (n_layers - 1) + (count - 1)) // (2 * (count - 1)) for i in range(count)]


def _decoder_layers(model: Any, n_layers: int) -> tuple[Any, str, torch.nn.ModuleList]:
    """Finds the ModuleList holding the decoder layers (e.g. `model.model.layers`); returns (parent, attr, list)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers",
                 "model.language_model.layers"):
        parent, ok = model, True
        parts = path.split(".")
        for part in parts[:-1]:
            parent = getattr(parent, part, None)
            if parent is None:
                ok = False
                break
        layers = getattr(parent, parts[-1], None) if ok else None
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == n_layers:
            return parent, parts[-1], layers
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if len(candidates) == 1:
        name, layers = candidates[0]
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        return parent, name.rsplit(".", 1)[-1], layers
    raise ValueError(f"cannot find the decoder layer list ({n_layers} layers) in {type(model).__name__}")


_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


def prune_layers(model: Any, keep: int | Sequence[int]) -> Any:
    """Removes decoder layers in place and returns the model.

    `keep`: a count (that many layers, evenly spaced, first and last always kept) or an explicit strictly
    increasing list of layer indices. Updates `config.num_hidden_layers`, per-layer config lists
    (`layer_types`, `no_rope_layers`) and the `layer_idx` attribute of every submodule (attention modules use it
    to index the KV cache), so the pruned model saves, reloads and generates correctly."""
    cfg = _config_of(model)
    n = int(cfg.num_hidden_layers)
    if isinstance(keep, bool):
        raise TypeError("keep must be an int count or a sequence of layer indices")
    if isinstance(keep, int):
        idx = _even_indices(n, keep)
    else:
        idx = [int(i) for i in keep]
        if not idx:
            raise ValueError("keep must name at least one layer")
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"keep has layer indices {bad} outside 0..{n - 1}")
        if any(b <= a for a, b in zip(idx, idx[1:])):
            raise ValueError(f"keep must be strictly increasing (no duplicates, original order), got {idx}")
    parent, attr, layers = _decoder_layers(model, n)
    new_layers = torch.nn.ModuleList([layers[i] for i in idx])
    for new_i, layer in enumerate(new_layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_i
    setattr(parent, attr, new_layers)
    cfg.num_hidden_layers = len(idx)
    for name in _PER_LAYER_CONFIG_LISTS:
        val = getattr(cfg, name, None)
        if isinstance(val, (list, tuple)) and len(val) == n:
            setattr(cfg, name, [val[i] for i in idx])
    return model
