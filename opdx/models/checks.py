"""Tokenizer and vocabulary checks for logit distillation: `check_tokenizers_compatible`, `aligned_vocab_size`."""
from __future__ import annotations

from typing import Any


_PROBE_TEXT = "Hello, world! 123 + 456 = 579.\n  Ünïcödé — tabs\tand  spaces <|im_start|>user\nhi<|im_end|>"


def check_tokenizers_compatible(student_tok, teacher_tok) -> None:
    """Raises ValueError unless the two tokenizers map tokens to ids identically and share special tokens.

    Checks, in order: vocabulary size (len), the token -> id mapping (the message names the first id whose token
    differs), the special tokens (bos/eos/pad/unk and any additional ones, with ids), and that a probe text
    (with chat-template markers) encodes to the same ids (catches normalizer / pre-tokenizer differences).
    Distillation on logits needs all of this; use a cross-tokenizer method otherwise."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    s_inv = {i: t for t, i in s_vocab.items()}
    t_inv = {i: t for t, i in t_vocab.items()}
    for i in range(max(len(s_inv), len(t_inv), max(s_inv, default=-1) + 1, max(t_inv, default=-1) + 1)):
        a, b = s_inv.get(i), t_inv.get(i)
        if a != b:
            raise ValueError(
                f"tokenizers are incompatible: token id {i} is {a!r} in the student tokenizer but {b!r} in the "
                f"teacher tokenizer (student vocab {len(s_vocab)} tokens, teacher {len(t_vocab)}); student and "
                f"teacher must share one vocabulary for logit distillation")
    if len(student_tok) != len(teacher_tok):
        raise ValueError(f"tokenizers are incompatible: len(student)={len(student_tok)} != "
                         f"len(teacher)={len(teacher_tok)}")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(student_tok, attr, None), getattr(teacher_tok, attr, None)
        ai, bi = getattr(student_tok, attr + "_id", None), getattr(teacher_tok, attr + "_id", None)
        if (a, ai) != (b, bi):
            raise ValueError(f"tokenizers are incompatible: {attr} is {a!r} (id {ai}) in the student tokenizer "
                             f"but {b!r} (id {bi}) in the teacher tokenizer")
    s_special = sorted(map(str, student_tok.all_special_tokens))
    t_special = sorted(map(str, teacher_tok.all_special_tokens))
    if s_special != t_special:
        diff = sorted(set(s_special) ^ set(t_special))
        raise ValueError(f"tokenizers are incompatible: special tokens differ ({diff[:5]}); student "
                         f"{s_special[:10]}, teacher {t_special[:10]}")
    a = student_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    b = teacher_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if a != b:
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise ValueError(f"tokenizers are incompatible: same vocabulary but they encode text differently "
                         f"(normalizer/pre-tokenizer); probe ids diverge at position {k}: student {a[k:k + 5]}, "
                         f"teacher {b[k:k + 5]}")


def _config_of(m: Any) -> Any:
    cfg = getattr(m, "config", m)
    get_text = getattr(cfg, "get_text_config", None)
    return get_text() if callable(get_text) else cfg


def aligned_vocab_size(tokenizer, *models: Any) -> int:
    """The vocabulary size distillation works over: the tokenizer's real size, `len(tokenizer)`.

    Each model (a PreTrainedModel or its config) must have `config.vocab_size >= len(tokenizer)`; a padded model
    vocabulary (e.g. Qwen's 151936 or 152064 rows for ~151665 tokens) is aligned down to the tokenizer: slice
    logits to `[..., :V]` before any softmax, so probability mass on never-produced padding rows is dropped
    consistently for student and teacher. Raises ValueError if a model has fewer rows than the tokenizer."""
    n = len(tokenizer)
    if not models:
        raise ValueError("aligned_vocab_size needs at least one model (or config) to check against")
    for k, m in enumerate(models):
        cfg = _config_of(m)
        v = getattr(cfg, "vocab_size", None)
        if not isinstance(v, int):
            raise ValueError(f"model #{k} ({type(m).__name__}) has no integer config.vocab_size")
        if v < n:
            name = getattr(cfg, "_name_or_path", "") or type(m).__name__
            raise ValueError(f"model #{k} ({name}) has config.vocab_size={v} < len(tokenizer)={n}: the tokenizer "
                             f"can produce ids the model has no logits for; use the tokenizer saved with this "
                             f"model, or resize its embeddings (model.resize_token_embeddings({n}))")
    return n
