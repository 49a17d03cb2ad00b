"""Id map between two vocabularies: the tokens whose strings match exactly (for the `gold` hybrid loss).

A token's string is the byte sequence it stands for (`opdx.xtok.tokens.vocab_token_bytes`: exact for byte-level BPE,
so partial UTF-8 tokens match byte for byte; tokens whose bytes are unknown are left out). Special tokens match by
their content. Two ids of one vocabulary with the same bytes: the lowest id is kept. Built once per tokenizer pair
and cached in memory, and on disk when a ``cache_dir`` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from opdx.xtok.tokens import vocab_token_bytes


@dataclass(frozen=True)
class VocabMap:
    """student_ids[k] and teacher_ids[k] (int64 ``[K]``) are the same string; sorted by student id."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.student_ids.numel())


def _token_strings(tokenizer) -> dict[bytes, int]:
    """{byte string: lowest id} over the vocabulary, tokens with unknown bytes left out."""
    out: dict[bytes, int] = {}
    for idx, raw in sorted(vocab_token_bytes(tokenizer).items()):
        if raw:
            out.setdefault(raw, idx)
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
