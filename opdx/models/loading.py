"""Loading tokenizers and causal LMs from local checkpoint directories (or Hub ids), with errors that name the fix.

`load_tokenizer(path)` sets pad = eos when a tokenizer has no pad token (see `opdx.models`' docstring, "pad == eos").
"""
from __future__ import annotations

import importlib.util
import os

import torch


def _looks_like_hub_id(path: str) -> bool:
    return (not path.startswith(("/", ".", "~")) and path.count("/") == 1 and "\\" not in path
            and all(part for part in path.split("/")))


def _resolve(path: str | os.PathLike, what: str, need: str) -> tuple[str, bool]:
    """Returns (path, is_local). Local directories must exist and contain `need`; a `name/model` string that is
    not a local path is treated as a Hugging Face Hub id."""
    p = os.path.expanduser(os.fspath(path))
    if os.path.isdir(p):
        if need and not os.path.exists(os.path.join(p, need)):
            raise FileNotFoundError(
                f"{what} directory {p!r} has no {need}: is it a saved transformers checkpoint? (save with "
                f"save_pretrained, or create the demo/tiny models with `python -m opdx.models demo` / "
                f"`python -m opdx.models tiny DIR`)")
        return p, True
    if os.path.exists(p):
        raise FileNotFoundError(f"{what} path {p!r} is a file; pass the checkpoint directory that contains it")
    if _looks_like_hub_id(p):
        return p, False
    raise FileNotFoundError(
        f"{what} path {p!r} does not exist. Create the demo models with `python -m opdx.models demo` "
        f"(or opdx.models.ensure_demo_models()), tiny test models with `python -m opdx.models tiny DIR`, or fix "
        f"the path in your config")


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer from a local checkpoint directory (or a Hub id, when not a local path).

    Ensures a pad token exists: when the tokenizer has none, pad = eos (the SmolLM2 situation; see the module
    docstring). Padding side is left as saved; set it where you batch (left for generation)."""
    from transformers import AutoTokenizer

    p, local = _resolve(path, "tokenizer", "")
    if local and not any(os.path.exists(os.path.join(p, f)) for f in
                         ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"tokenizer directory {p!r} has no tokenizer files (tokenizer.json / "
                                f"tokenizer_config.json); save the tokenizer there with tokenizer.save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=local)
    except OSError as exc:
        raise OSError(f"could not load the tokenizer from {p!r}: {exc}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {p!r} has neither a pad nor an eos token; set one before training")
        tok.pad_token = tok.eos_token
    return tok


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[key]


def load_causal_lm(path: str | os.PathLike, *, dtype: torch.dtype | str, attn_implementation: str = "sdpa",
                   device: str | torch.device | None = None):
    """Loads an `AutoModelForCausalLM` from a local checkpoint directory (or a Hub id) in `dtype`, eval mode.

    `attn_implementation`: "sdpa" (default; works on CPU), "eager", "flash_attention_2" (needs flash-attn and
    CUDA). `device`: where to move the model (default: stay on CPU)."""
    from transformers import AutoModelForCausalLM

    td = _as_dtype(dtype)
    p, local = _resolve(path, "model", "config.json")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError("attn_implementation='flash_attention_2' needs the flash-attn package (CUDA only); "
                          "use attn_implementation='sdpa'")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=td, attn_implementation=attn_implementation,
                                                     local_files_only=local)
    except OSError as exc:
        raise OSError(f"could not load a causal LM from {p!r}: {exc}") from exc
    if device is not None:
        model.to(device)
    model.eval()
    return model
