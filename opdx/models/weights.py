"""The full weights of a (ZeRO-3 partitioned, LoRA-wrapped) student, one tensor at a time: `iter_merged_weights`."""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def _gathered(params, zero3: bool) -> Iterator[None]:
    """Under ZeRO-3, the partitioned ``params`` gathered (read-only) for the block; otherwise nothing."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if zero3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _lora_layers(base: Any) -> dict[str, Any]:
    """The peft LoRA layers of ``base`` by module name."""
    return {name: m for name, m in base.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "get_base_layer") and hasattr(m, "get_delta_weight")}


def _merged_lora_params(name: str, m: Any, zero3: bool) -> dict[str, torch.Tensor]:
    """The base layer's parameters of the LoRA layer ``m`` with its active adapters added, out of place."""
    layer = m.get_base_layer()
    with _gathered(list(m.parameters()), zero3), torch.no_grad():
        merged = {pn: p.detach().clone() for pn, p in layer.named_parameters(recurse=False)}
        for adapter in m.active_adapters:
            if adapter not in m.lora_A or adapter in getattr(m, "merged_adapters", ()):
                continue
            if getattr(m, "lora_variant", {}).get(adapter) is not None or \
                    getattr(m, "use_dora", {}).get(adapter, False):
                raise NotImplementedError(f"merging the LoRA variant of {name} (e.g. DoRA) out of place")
            merged["weight"] += m.get_delta_weight(adapter).to(merged["weight"].dtype)
            if getattr(m, "lora_bias", {}).get(adapter, False):
                merged["bias"] += (m.lora_B[adapter].bias * m.scaling[adapter]).to(merged["bias"].dtype)
    return merged


def iter_merged_weights(model: Any, device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every entry of the plain transformers state dict of ``model`` (a causal LM, a
    peft model around one, or a DeepSpeed engine around either): full tensors, LoRA adapters merged into their base
    weights, names as ``merge_and_unload().state_dict()`` has them (``...q_proj.weight``).

    Under DeepSpeed ZeRO-3 the parameters are gathered a few at a time (one LoRA layer's, or one other parameter)
    with ``deepspeed.zero.GatheredParameters`` and released again: a collective, every rank must call it and
    consume it in the same order. A merged weight is computed out of place (base + peft's ``get_delta_weight``),
    so the live module is never modified. The yielded tensors are detached copies on ``device`` (default: the
    parameters' device); a parameter that appears under several names (tied embeddings) is yielded as the same
    tensor each time, as ``state_dict()`` does."""
    model = getattr(model, "module", model)  # DeepSpeed engine
    peft = hasattr(model, "get_base_model") and hasattr(model, "peft_config")
    base = model.get_base_model() if peft else model
    lora_layers = _lora_layers(base) if peft else {}
    zero3 = any(hasattr(p, "ds_id") for p in base.parameters())
    state = base.state_dict(keep_vars=True)
    uses = Counter(id(t) for t in state.values())
    seen: dict[int, torch.Tensor] = {}  # tensors under several names (tied weights), yielded as one tensor
    done_layers = set()
    for key, t in state.items():
        owner = next((n for n in lora_layers if key.startswith(n + ".")), None)
        if owner is not None:
            if owner not in done_layers:
                done_layers.add(owner)
                for pn, v in _merged_lora_params(owner, lora_layers[owner], zero3).items():
                    yield f"{owner}.{pn}", v.to(device) if device is not None else v
            continue
        if id(t) in seen:
            yield key, seen[id(t)]
            continue
        with _gathered([t], zero3):
            v = t.detach().to(device, copy=True) if device is not None else t.detach().clone()
        if uses[id(t)] > 1:
            seen[id(t)] = v
        yield key, v
