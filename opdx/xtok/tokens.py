"""The UTF-8 bytes each vocabulary entry stands for (shared by the byte alignment of sampled ids and the vocab map).

- Byte-level BPE (GPT-2 / Llama-3 / Qwen / SmolLM style, ByteLevel decoder): every character of a vocabulary entry
  stands for one byte through the byte alphabet, so partial UTF-8 tokens have exact bytes.
- SentencePiece-style entries: ``<0xNN>`` byte-fallback tokens are that byte, ``▁`` is a space.
- Otherwise the decoded text of the single token; tokens that decode to U+FFFD (a partial character) get None.
- Special (added) tokens: their content, flagged as special (they are not part of a decoded completion text).
"""

from __future__ import annotations

import functools
import json
import re
import weakref

import numpy as np

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def byte_alphabet_inverse() -> dict[str, int]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other bytes are shifted to
    code points 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _decoder_json(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return "" if backend is None else json.dumps(json.loads(backend.to_str()).get("decoder") or {})


def special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []))
    ids |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", True)}
    return ids


def _piece_bytes(tokenizer, piece: str, idx: int, byte_level: bool, metaspace: bool) -> bytes | None:
    inverse = byte_alphabet_inverse()
    if byte_level and all(c in inverse for c in piece):
        return bytes(inverse[c] for c in piece)
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    if metaspace:
        return piece.replace("\u2581", " ").encode("utf-8")
    text = tokenizer.decode([idx])
    return None if (not text or "\ufffd" in text) else text.encode("utf-8")


def vocab_token_bytes(tokenizer) -> dict[int, bytes | None]:
    """{id: the bytes the token stands for (None: unknown)} over the whole vocabulary, added tokens included
    (special tokens: their content)."""
    decoder = _decoder_json(tokenizer)
    byte_level, metaspace = '"ByteLevel"' in decoder, '"Metaspace"' in decoder or "\u2581" in decoder
    specials = special_ids(tokenizer)
    out = {}
    for piece, idx in tokenizer.get_vocab().items():
        if idx in specials:
            out[idx] = piece.encode("utf-8")
        else:
            out[idx] = _piece_bytes(tokenizer, piece, idx, byte_level, metaspace)
    return out


_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_byte_lengths(tokenizer) -> np.ndarray:
    """int64 ``[max id + 1]``: UTF-8 byte length of each id; special tokens 0 (they are not in a decoded completion
    text), -1 for ids whose bytes are unknown. Cached per tokenizer object."""
    if tokenizer in _LENGTHS:
        return _LENGTHS[tokenizer]
    pieces = vocab_token_bytes(tokenizer)
    specials = special_ids(tokenizer)
    lengths = np.full(max(pieces) + 1 if pieces else 0, -1, dtype=np.int64)
    for idx, raw in pieces.items():
        lengths[idx] = 0 if idx in specials else (-1 if raw is None else len(raw))
    _LENGTHS[tokenizer] = lengths
    return lengths


_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def completion_bytes(tokenizer, ids) -> bytes:
    """The UTF-8 bytes a sequence of token ids spells, exactly (a sampled sequence may split characters, so it need
    not be valid UTF-8); special tokens spell nothing (they are not part of a completion's text). ValueError for an
    id whose bytes are unknown. The id -> bytes table is cached per tokenizer object."""
    if tokenizer not in _BYTES:
        pieces, specials = vocab_token_bytes(tokenizer), special_ids(tokenizer)
        _BYTES[tokenizer] = [b"" if i in specials else pieces.get(i) for i in range(max(pieces, default=-1) + 1)]
    table = _BYTES[tokenizer]
    try:
        return b"".join(table[i] for i in ids)
    except (TypeError, IndexError):
        bad = next(i for i in ids if not 0 <= i < len(table) or table[i] is None)
        raise ValueError(f"cannot tell the bytes of token id {bad}; byte alignment of sampled ids needs a byte-level "
                         "BPE or byte-fallback vocabulary") from None

