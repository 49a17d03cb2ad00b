"""Alignment of two tokenizations of the same completion text by UTF-8 byte offsets.

Each token is described by the byte offset where it ends in the UTF-8 encoding of the completion. A *group* closes at
every byte boundary that both tokenizations reach; every token belongs to the first group whose closing boundary is at
or after its end. So group g of a row holds the student tokens and the teacher tokens that together spell the same
bytes, e.g. student ``[" wor", "ld"]`` and teacher ``[" w", "orld"]`` form one group.

- `token_byte_ends(tokenizer, texts)`: token ids and byte end offsets of each text, from a fast tokenizer's offset
  mapping (character offsets, converted to UTF-8 byte offsets).
- `ids_byte_ends(tokenizer, ids)`: byte end offsets of given ids (the student's sampled tokens) from the byte length
  of each vocabulary entry: exact for byte-level BPE, also inside a character.
- `align_byte_ends(student_ends, teacher_ends, ...)`: per-token group ids of both sides, vectorized over the whole
  batch (searchsorted over the merged boundary keys; no Python loop per token).

Tokens that split a multi-byte character (byte-level BPE spelling ``"é"`` = ``c3 a9`` as two tokens): the offset
mapping gives every such token the character's offsets, so `token_byte_ends` ends them all at the character's last
byte (they share an end and fall into one group). `ids_byte_ends` knows each token's exact bytes and ends them inside
the character; a group can then close inside a character only if the other side also ends a token at that byte
(never for a side from `token_byte_ends`). Either way no group splits bytes differently on the two sides.

Typical use: student ends from its sampled ids (`ids_byte_ends`), the teacher's from re-tokenizing the student's
decoded text (`token_byte_ends`); a completion cut inside a character (decoded as U+FFFD) cannot be aligned, and the
error names the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opdx.xtok.tokens import token_byte_lengths


@dataclass(frozen=True)
class Alignment:
    """Groups of aligned tokens for a batch of completions.

    student_groups ``[B, Ls]`` / teacher_groups ``[B, Lt]``: int64 group id of each token within its row (0, 1, ...,
    non-decreasing along the row), -1 at padding. num_groups ``[B]``: groups per row (equal on both sides by
    construction)."""

    student_groups: torch.Tensor
    teacher_groups: torch.Tensor
    num_groups: torch.Tensor

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Batch-global group ids of the valid tokens in row-major order (the order of ``x[groups >= 0]``), for both
        sides, and the total number of groups: row b's groups are numbered after those of rows < b."""
        offsets = torch.cumsum(self.num_groups, 0) - self.num_groups
        out = []
        for groups in (self.student_groups, self.teacher_groups):
            valid = groups >= 0
            out.append((groups + offsets[:, None])[valid])
        return out[0], out[1], int(self.num_groups.sum())


_ESCAPED = (0xDC80, 0xDD00)  # the lone surrogates `bytes.decode(errors="surrogateescape")` makes of invalid bytes
_REPLACEMENT = {c: "\ufffd" for c in range(*_ESCAPED)}


def char_to_byte_offsets(text: str) -> torch.Tensor:
    """``[len(text) + 1]`` int64: the UTF-8 byte offset of each character index (the last entry: the byte length).
    A lone surrogate U+DC80..U+DCFF (an invalid byte escaped by ``errors="surrogateescape"``) counts one byte."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    nbytes = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
    nbytes[(code_points >= _ESCAPED[0]) & (code_points < _ESCAPED[1])] = 1
    offsets = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(nbytes, out=offsets[1:])
    return torch.from_numpy(offsets)


def decode_bytes(raw: bytes) -> tuple[str, torch.Tensor]:
    """(text, byte offsets ``[len(text) + 1]``) of a completion's bytes for re-tokenization: bytes that are not valid
    UTF-8 (a sampled token sequence that splits a character) become one U+FFFD each, standing for that one byte in
    the offsets, so the text's tokens can still be aligned in ``raw``'s byte positions (`token_byte_ends`)."""
    escaped = raw.decode("utf-8", errors="surrogateescape")
    return escaped.translate(_REPLACEMENT), char_to_byte_offsets(escaped)


def _check_fast(tokenizer, name: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{name} ({type(tokenizer).__name__}) is not a fast tokenizer, so it has no offset mapping, which the "
            "byte alignment needs; load it with AutoTokenizer.from_pretrained(..., use_fast=True) (a tokenizer.json "
            "backed PreTrainedTokenizerFast)"
        )


def _byte_ends_of(c2b: np.ndarray, offsets: np.ndarray, name: str, row: int) -> np.ndarray:
    """Byte end offsets of one text's tokens from their character offsets ``[L, 2]`` and the text's character ->
    byte table ``c2b``; checks that the tokens cover every byte of the text (a gap means the tokenizer dropped or
    trimmed characters: nothing can be aligned there)."""
    total = int(c2b[-1])
    if offsets.shape[0] == 0:
        if total:
            raise ValueError(f"{name} produced no tokens for completion {row} ({total} bytes); cannot align it")
        return np.zeros(0, dtype=np.int64)
    starts, ends = c2b[offsets[:, 0]], c2b[offsets[:, 1]]
    covered = np.maximum.accumulate(ends)
    reached = np.concatenate([[0], covered[:-1]])
    gaps = np.flatnonzero(starts > reached)
    if gaps.size or int(covered[-1]) != total:
        at = int(reached[gaps[0]]) if gaps.size else int(covered[-1])
        raise ValueError(
            f"completion {row} cannot be aligned at byte {at}: {name}'s tokens do not cover bytes {at}.. of the text "
            "(a normalizer that drops characters, or offsets trimmed around whitespace, e.g. a ByteLevel "
            "post-processor with trim_offsets=True: set trim_offsets=False in its tokenizer.json)"
        )
    return covered


def _pad(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    out = np.zeros((len(rows), int(lengths.max()) if len(rows) else 0), dtype=np.int64)
    out[np.arange(out.shape[1])[None, :] < lengths[:, None]] = np.concatenate(rows) if rows else []
    return torch.from_numpy(out), torch.from_numpy(lengths)


def token_byte_ends(tokenizer, texts: list[str], *, name: str = "tokenizer",
                    byte_offsets: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenizes each completion text (no special tokens) and returns ``(ids [B, L], byte_ends [B, L],
    lengths [B])``, zero-padded beyond each row's length. byte_ends are the UTF-8 byte offsets where each token ends
    (non-decreasing; a token ending inside a character counts up to the character's end). For the side whose
    tokens were re-tokenized from the text (the teacher). ``name`` names the tokenizer in errors. ``byte_offsets``:
    each text's character -> byte table (`decode_bytes`; default `char_to_byte_offsets` of the text)."""
    _check_fast(tokenizer, name)
    if byte_offsets is None:
        byte_offsets = [char_to_byte_offsets(text) for text in texts]
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    ids = [np.asarray(row, dtype=np.int64) for row in enc["input_ids"]]
    ends = [_byte_ends_of(np.asarray(c2b), np.asarray(off, dtype=np.int64).reshape(-1, 2), name, b)
            for b, (c2b, off) in enumerate(zip(byte_offsets, enc["offset_mapping"]))]
    (ids_t, lengths), (ends_t, _) = _pad(ids), _pad(ends)
    return ids_t, ends_t, lengths


def ids_byte_ends(tokenizer, ids: torch.Tensor, lengths=None, *, name: str = "tokenizer") -> torch.Tensor:
    """``[B, L]`` byte end offsets of given token ids (e.g. the student's sampled tokens, which need not be the
    canonical tokenization of their text): the running sum of each id's byte length from the vocabulary
    (`opdx.xtok.tokens.token_byte_lengths`; special tokens such as EOS count 0 bytes and so join the last group).
    Exact for byte-level BPE, also inside a multi-byte character. Padding beyond ``lengths`` gets 0."""
    byte_lengths = token_byte_lengths(tokenizer)
    arr = ids.detach().cpu().numpy().astype(np.int64, copy=False)
    valid = (np.ones(arr.shape, dtype=bool) if lengths is None
             else np.arange(arr.shape[1])[None, :] < np.asarray(lengths, dtype=np.int64)[:, None])
    if valid.any() and (arr[valid].min() < 0 or arr[valid].max() >= byte_lengths.size):
        raise ValueError(f"ids hold token ids outside {name}'s vocabulary [0, {byte_lengths.size})")
    per_token = np.where(valid, byte_lengths[np.where(valid, arr, 0)], 0)
    unknown = np.argwhere(per_token < 0)
    if unknown.size:
        b, i = (int(x) for x in unknown[0])
        raise ValueError(f"{name} cannot tell the bytes of token id {int(arr[b, i])} (row {b}, position {i}); "
                         "byte alignment of sampled ids needs a byte-level BPE or byte-fallback vocabulary")
    return torch.from_numpy(np.where(valid, np.cumsum(per_token, 1), 0))


def _as_numpy_ends(ends, lengths, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ends int64 [B, L], valid bool [B, L]) as numpy arrays, validated."""
    if not isinstance(ends, torch.Tensor) or ends.dim() != 2 or ends.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}_ends must be an int32/int64 tensor [B, L] of byte end offsets, got "
                        f"{getattr(ends, 'dtype', type(ends).__name__)} {tuple(getattr(ends, 'shape', ()))}")
    arr = ends.detach().cpu().numpy().astype(np.int64, copy=False)
    if lengths is None:
        return arr, np.ones(arr.shape, dtype=bool)
    lengths = np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths, dtype=np.int64)
    if lengths.shape != (arr.shape[0],) or bool(((lengths < 0) | (lengths > arr.shape[1])).any()):
        raise ValueError(f"{name}_lengths must be [B] = [{arr.shape[0]}] with values in [0, {arr.shape[1]}], "
                         f"got {lengths.tolist()}")
    return arr, np.arange(arr.shape[1])[None, :] < lengths[:, None]


def _row_keys(ends: np.ndarray, valid: np.ndarray, stride: int, name: str) -> np.ndarray:
    """Sorted batch-global keys row·stride + end of the valid tokens; checks ends are non-decreasing per row."""
    prev = np.concatenate([np.zeros((ends.shape[0], 1), dtype=np.int64), ends[:, :-1]], 1)
    bad = valid & ((ends < prev) | (ends < 0))
    if bad.any():
        b, i = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"{name}_ends must be non-negative and non-decreasing along each row; row {b} token {i} "
                         f"ends at byte {int(ends[b, i])} after byte {int(prev[b, i])}")
    return (np.arange(ends.shape[0])[:, None] * stride + ends)[valid]


def _last_ends(ends: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Byte end of each row's last valid token (0 for an empty row)."""
    if ends.shape[1] == 0:
        return np.zeros(ends.shape[0], dtype=np.int64)
    return np.where(valid, ends, 0).max(1)


def _check_same_text(s_last: np.ndarray, t_last: np.ndarray, common: np.ndarray, stride: int) -> None:
    bad = np.flatnonzero(s_last != t_last)
    if bad.size == 0:
        return
    b = int(bad[0])
    in_row = common[(common >= b * stride) & (common < (b + 1) * stride)] - b * stride
    at = int(in_row.max()) if in_row.size else 0
    raise ValueError(
        f"completion {b} cannot be aligned after byte {at}: the student tokens end at byte {int(s_last[b])} but the "
        f"teacher tokens at byte {int(t_last[b])}; both must tokenize the same completion text (re-tokenize the "
        "student's decoded text with the teacher tokenizer, without truncation)"
    )


def _common_keys(s_keys: np.ndarray, t_keys: np.ndarray) -> np.ndarray:
    """Sorted distinct keys present in both sorted key arrays."""
    if t_keys.size == 0 or s_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.minimum(np.searchsorted(t_keys, s_keys), t_keys.size - 1)
    both = s_keys[t_keys[pos] == s_keys]
    return both[np.concatenate([[True], both[1:] != both[:-1]])] if both.size else both


def align_byte_ends(student_ends: torch.Tensor, teacher_ends: torch.Tensor, student_lengths=None,
                    teacher_lengths=None) -> Alignment:
    """Groups of tokens of two tokenizations of the same texts, from each token's UTF-8 byte end offset.

    Args:
        student_ends ``[B, Ls]``, teacher_ends ``[B, Lt]``: int byte end offsets, non-decreasing along each row.
        student_lengths, teacher_lengths: optional ``[B]`` valid tokens per row (the rest is padding).

    A row's groups close at the byte offsets present on both sides; a token's group is the index of the first such
    boundary >= its end. Both sides of a row must end at the same byte (else ValueError with the last byte where the
    two still agreed). Vectorized over the batch: the rows are laid end to end as keys row·stride + end; the common
    keys and every token's group come from `searchsorted` over the sorted keys. Runs in numpy on CPU (the offsets
    come from the tokenizers there; torch's CPU searchsorted wakes its thread pool per call, ~100x slower at this
    size on a loaded machine); the results are torch tensors on student_ends' device."""
    s_ends, s_valid = _as_numpy_ends(student_ends, student_lengths, "student")
    t_ends, t_valid = _as_numpy_ends(teacher_ends, teacher_lengths, "teacher")
    if s_ends.shape[0] != t_ends.shape[0]:
        raise ValueError(f"student_ends has {s_ends.shape[0]} rows but teacher_ends {t_ends.shape[0]}; pass the same "
                         "completions on both sides")
    s_last, t_last = _last_ends(s_ends, s_valid), _last_ends(t_ends, t_valid)
    stride = int(np.maximum(s_last, t_last).max()) + 1 if s_last.size else 1
    s_keys = _row_keys(s_ends, s_valid, stride, "student")
    t_keys = _row_keys(t_ends, t_valid, stride, "teacher")
    common = _common_keys(s_keys, t_keys)
    _check_same_text(s_last, t_last, common, stride)
    row_first = np.searchsorted(common, np.arange(s_ends.shape[0] + 1) * stride)
    groups = []
    for ends, valid, keys in ((s_ends, s_valid, s_keys), (t_ends, t_valid, t_keys)):
        out = np.full(ends.shape, -1, dtype=np.int64)
        out[valid] = np.searchsorted(common, keys) - row_first[np.nonzero(valid)[0]]
        groups.append(torch.from_numpy(out).to(student_ends.device))
    num_groups = torch.from_numpy(np.diff(row_first).astype(np.int64)).to(student_ends.device)
    return Alignment(groups[0], groups[1], num_groups)
