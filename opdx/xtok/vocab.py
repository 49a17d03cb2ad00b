"""Id map between two vocabularies: the tokens whose strings match exactly (for the `gold` hybrid loss).

A token's string is its byte sequence: for byte-level BPE vocabularies (GPT-2 / Llama-3 / Qwen style, ByteLevel
decoder) the vocabulary entry mapped back through the byte alphabet, so partial UTF-8 tokens match byte for byte;
for other tokenizers the decoded text of the single token (tokens that decode to U+FFFD, partial characters, are left
out). Special tokens match by their content. Built once per tokenizer pair and cached in memory, and on disk when a
``cache_dir`` is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VocabMap:
    """student_ids[k] and teacher_ids[k] (int64 ``[K]``) are the same string; sorted by student id."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.student_ids.numel())


@functools.lru_cache(maxsize=1)
def _byte_alphabet_inverse() -> dict[str, int]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other bytes are shifted to
    code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return '"ByteLevel"' in json.dumps(decoder)


def _token_strings(tokenizer) -> dict[bytes, int]:
    """{byte string: lowest id} over the whole vocabulary (added/special tokens included)."""
    vocab = tokenizer.get_vocab()
    special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    special |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    byte_level = _is_byte_level(tokenizer)
    inverse = _byte_alphabet_inverse()
    out: dict[bytes, int] = {}
    for piece, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        if piece in special:
            key = piece.encode("utf-8")
        elif byte_level and all(c in inverse for c in piece):
            key = bytes(inverse[c] for c in piece)
        else:
            text = tokenizer.decode([idx])
            if "\ufffd" in text or not text:
                continue
            key = text.encode("utf-8")
        out.setdefault(key, idx)
    return out


def _fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


_MEMORY_CACHE: dict[tuple[str, str], VocabMap] = {}


def build_vocab_map(student_tokenizer, teacher_tokenizer, *, cache_dir: str | os.PathLike | None = None) -> VocabMap:
    """The exact string matches between two vocabularies (see the module docstring), cached per tokenizer pair (by
    a hash of each tokenizer's serialized form) in memory and, with ``cache_dir``, in
    ``<cache_dir>/vocab_map-<student>-<teacher>.pt``. May be empty; `opdx.xtok.losses.gold_loss` refuses an empty
    map."""
    key = (_fingerprint(student_tokenizer), _fingerprint(teacher_tokenizer))
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"vocab_map-{key[0]}-{key[1]}.pt")
    if path is not None and os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        result = VocabMap(saved["student_ids"], saved["teacher_ids"])
    else:
        student, teacher = _token_strings(student_tokenizer), _token_strings(teacher_tokenizer)
        pairs = sorted((sid, teacher[s]) for s, sid in student.items() if s in teacher)
        ids = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        result = VocabMap(ids[:, 0].contiguous(), ids[:, 1].contiguous())
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save({"student_ids": result.student_ids, "teacher_ids": result.teacher_ids}, tmp)
            os.replace(tmp, path)
    _MEMORY_CACHE[key] = result
    return result
