"""Alignment of two tokenizations of the same completion text by UTF-8 byte offsets.

Each token is described by the byte offset where it ends in the UTF-8 encoding of the completion. A *group* closes at
every byte boundary that both tokenizations reach; every token belongs to the first group whose closing boundary is at
or after its end. So group g of a row holds the student tokens and the teacher tokens that together spell the same
bytes, e.g. student ``[" wor", "ld"]`` and teacher ``[" w", "orld"]`` form one group.

- `token_byte_ends(tokenizer, texts)`: token ids and byte end offsets of each text, from a fast tokenizer's offset
  mapping (character offsets, converted to UTF-8 byte offsets).
- `align_byte_ends(student_ends, teacher_ends, ...)`: per-token group ids of both sides, vectorized over the whole
  batch (one searchsorted over the merged boundary keys; no Python loop per token).

Byte-level BPE tokens that split a multi-byte character (``"é"`` → bytes ``c3 a9`` as two tokens) all carry that
character's offsets; their end is therefore the character's last byte, so the tokens of one character share an end
and fall into one group. A group never closes inside a character, which loses nothing a character-level text can
express (both sides always agree again at the character's end).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def char_to_byte_offsets(text: str) -> torch.Tensor:
    """``[len(text) + 1]`` int64: the UTF-8 byte offset of each character index (the last entry: the byte length)."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    nbytes = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
    offsets = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(nbytes, out=offsets[1:])
    return torch.from_numpy(offsets)


def _check_fast(tokenizer, name: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{name} ({type(tokenizer).__name__}) is not a fast tokenizer, so it has no offset mapping, which the "
            "byte alignment needs; load it with AutoTokenizer.from_pretrained(..., use_fast=True) (a tokenizer.json "
            "backed PreTrainedTokenizerFast)"
        )


def _byte_ends_of(text: str, offsets: torch.Tensor, name: str, row: int) -> torch.Tensor:
    """Byte end offsets of one text's tokens from their character offsets ``[L, 2]``; checks that the tokens cover
    every byte of the text (a gap means the tokenizer dropped or trimmed characters: nothing can be aligned there)."""
    c2b = char_to_byte_offsets(text)
    total = int(c2b[-1])
    if offsets.shape[0] == 0:
        if total:
            raise ValueError(f"{name} produced no tokens for completion {row} ({total} bytes); cannot align it")
        return torch.zeros(0, dtype=torch.int64)
    starts, ends = c2b[offsets[:, 0]], c2b[offsets[:, 1]]
    covered = torch.cummax(ends, 0).values
    reached = torch.cat([covered.new_zeros(1), covered[:-1]])
    gaps = torch.nonzero(starts > reached)
    if gaps.numel() or int(covered[-1]) != total:
        at = int(reached[gaps[0, 0]]) if gaps.numel() else int(covered[-1])
        raise ValueError(
            f"completion {row} cannot be aligned at byte {at}: {name}'s tokens do not cover bytes {at}.. of the text "
            "(a normalizer that drops characters, or offsets trimmed around whitespace, e.g. a ByteLevel "
            "post-processor with trim_offsets=True: set trim_offsets=False in its tokenizer.json)"
        )
    return covered


def token_byte_ends(tokenizer, texts: list[str], *, name: str = "tokenizer") -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """Tokenizes each completion text (no special tokens) and returns ``(ids [B, L], byte_ends [B, L],
    lengths [B])``, padded with 0 / 0 beyond each row's length. byte_ends are the UTF-8 byte offsets where each token
    ends (non-decreasing). ``name`` names the tokenizer in errors ("student_tokenizer")."""
    _check_fast(tokenizer, name)
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    rows = [torch.tensor(ids, dtype=torch.int64) for ids in enc["input_ids"]]
    ends = [_byte_ends_of(text, torch.tensor(off, dtype=torch.int64).reshape(-1, 2), name, b)
            for b, (text, off) in enumerate(zip(texts, enc["offset_mapping"]))]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    pad = torch.nn.utils.rnn.pad_sequence
    width = int(lengths.max()) if len(rows) else 0
    if width == 0:
        empty = torch.zeros(len(rows), 0, dtype=torch.int64)
        return empty, empty.clone(), lengths
    return pad(rows, batch_first=True), pad(ends, batch_first=True), lengths


def _valid_mask(ends: torch.Tensor, lengths, name: str) -> torch.Tensor:
    if not isinstance(ends, torch.Tensor) or ends.dim() != 2 or ends.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}_ends must be an int32/int64 tensor [B, L] of byte end offsets, got "
                        f"{getattr(ends, 'dtype', type(ends).__name__)} {tuple(getattr(ends, 'shape', ()))}")
    if lengths is None:
        return torch.ones_like(ends, dtype=torch.bool)
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=ends.device)
    if lengths.shape != (ends.shape[0],) or bool(((lengths < 0) | (lengths > ends.shape[1])).any()):
        raise ValueError(f"{name}_lengths must be [B] = [{ends.shape[0]}] with values in [0, {ends.shape[1]}], "
                         f"got {lengths.tolist()}")
    return torch.arange(ends.shape[1], device=ends.device)[None, :] < lengths[:, None]


def _row_keys(ends: torch.Tensor, valid: torch.Tensor, stride: int, name: str) -> torch.Tensor:
    """Sorted batch-global keys row·stride + end of the valid tokens; checks ends are non-decreasing per row."""
    ends = ends.to(torch.int64)
    prev = torch.cat([ends.new_zeros(ends.shape[0], 1), ends[:, :-1]], 1)
    bad = valid & ((ends < prev) | (ends < 0))
    if bool(bad.any()):
        b, i = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"{name}_ends must be non-negative and non-decreasing along each row; row {b} token {i} "
                         f"ends at byte {int(ends[b, i])} after byte {int(prev[b, i])}")
    rows = torch.arange(ends.shape[0], device=ends.device)[:, None]
    return (rows * stride + ends)[valid]


def _last_ends(ends: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Byte end of each row's last valid token (0 for an empty row)."""
    return torch.where(valid, ends.to(torch.int64), 0).amax(1) if ends.shape[1] else ends.new_zeros(ends.shape[0])


def _check_same_text(s_last, t_last, common: torch.Tensor, stride: int) -> None:
    bad = torch.nonzero(s_last != t_last)
    if bad.numel() == 0:
        return
    b = int(bad[0, 0])
    in_row = common[(common >= b * stride) & (common < (b + 1) * stride)] - b * stride
    at = int(in_row.max()) if in_row.numel() else 0
    raise ValueError(
        f"completion {b} cannot be aligned after byte {at}: the student tokens end at byte {int(s_last[b])} but the "
        f"teacher tokens at byte {int(t_last[b])}; both must tokenize the same completion text (re-tokenize the "
        "student's decoded text with the teacher tokenizer, without truncation)"
    )


def align_byte_ends(student_ends: torch.Tensor, teacher_ends: torch.Tensor, student_lengths=None,
                    teacher_lengths=None) -> Alignment:
    """Groups of tokens of two tokenizations of the same texts, from each token's UTF-8 byte end offset.

    Args:
        student_ends ``[B, Ls]``, teacher_ends ``[B, Lt]``: int byte end offsets, non-decreasing along each row.
        student_lengths, teacher_lengths: optional ``[B]`` valid tokens per row (the rest is padding).

    A row's groups close at the byte offsets present on both sides; a token's group is the index of the first such
    boundary >= its end. Both sides of a row must end at the same byte (else ValueError with the last byte where the
    two still agreed). Vectorized: the rows are laid end to end as keys row·stride + end, the common keys come from
    one `torch.isin`, the group ids from one `torch.searchsorted`."""
    s_valid = _valid_mask(student_ends, student_lengths, "student")
    t_valid = _valid_mask(teacher_ends, teacher_lengths, "teacher")
    if student_ends.shape[0] != teacher_ends.shape[0] or student_ends.device != teacher_ends.device:
        raise ValueError(f"student_ends {tuple(student_ends.shape)} on {student_ends.device} and teacher_ends "
                         f"{tuple(teacher_ends.shape)} on {teacher_ends.device} must share batch size and device")
    s_last, t_last = _last_ends(student_ends, s_valid), _last_ends(teacher_ends, t_valid)
    stride = int(torch.maximum(s_last, t_last).max()) + 1 if s_last.numel() else 1
    s_keys = _row_keys(student_ends, s_valid, stride, "student")
    t_keys = _row_keys(teacher_ends, t_valid, stride, "teacher")
    common = torch.unique_consecutive(s_keys[torch.isin(s_keys, t_keys)])
    _check_same_text(s_last, t_last, common, stride)
    rows = torch.arange(student_ends.shape[0] + 1, device=common.device) * stride
    row_first = torch.searchsorted(common, rows)
    groups = []
    for ends, valid, keys in ((student_ends, s_valid, s_keys), (teacher_ends, t_valid, t_keys)):
        out = torch.full(ends.shape, -1, dtype=torch.int64, device=ends.device)
        row_of = torch.nonzero(valid)[:, 0]
        out[valid] = torch.searchsorted(common, keys) - row_first[row_of]
        groups.append(out)
    return Alignment(groups[0], groups[1], row_first[1:] - row_first[:-1])
