"""The resumable sample file behind `opdx.generate`: one JSON line per (prompt, sample index).

Layout while a run is in progress (``OUT`` = the ``--out`` path):

    OUT                    the merged file of earlier runs (may be absent)
    OUT.parts/             one file per generated chunk, ``c<chunk>-r<rank>-p<pid>.jsonl``: written to a ``.tmp``
                           name, fsync'ed, then renamed, so a chunk file is either whole or absent (a kill loses at
                           most the chunk being generated)

At the end rank 0 merges OUT and every chunk file into a new OUT (temp file + fsync + atomic rename; sorted by the
prompt's position in the data file, then the sample index; one line per key, the first one seen wins) and removes
OUT.parts. The merge streams lines by byte offset, so memory holds only the index, not the records. A torn last
line in OUT (no trailing newline or not valid JSON, e.g. from a crash of an older writer) is dropped with a note
and its sample generated again; a broken line elsewhere is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

from opdx.config import ConfigError

KEY_FIELDS = ("prompt_hash", "sample")


def note(msg: str) -> None:
    print(f"opdx.generate: {msg}", file=sys.stderr, flush=True)


def prompt_hashes(prompt_ids: list[list[int]]) -> list[str]:
    """A stable key per prompt: sha256 of its token ids (chat template and system prompt included) and its
    occurrence number, so a prompt repeated in the data file gets its own samples."""
    seen: dict[tuple, int] = {}
    out = []
    for ids in prompt_ids:
        k = seen.get(tuple(ids), 0)
        seen[tuple(ids)] = k + 1
        out.append(hashlib.sha256(json.dumps([k, list(ids)]).encode()).hexdigest()[:20])
    return out


def _key(rec, where: str) -> tuple[str, int]:
    if not isinstance(rec, dict) or any(f not in rec for f in KEY_FIELDS):
        raise ConfigError(f"{where} has no {'/'.join(KEY_FIELDS)} fields: it is not an opdx.generate output; "
                          "pass a new --out path")
    return str(rec["prompt_hash"]), int(rec["sample"])


def index_lines(path: str, *, tolerate_torn_tail: bool) -> list[tuple[tuple[str, int], int, int]]:
    """[(key, byte offset, byte length)] of the complete lines of a sample file. With ``tolerate_torn_tail`` an
    unterminated or unparsable last line is dropped with a note."""
    entries, offset, torn = [], 0, None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if torn is not None:  # the broken line was not the last one
                break
            try:
                rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
                if not raw.endswith(b"\n"):
                    raise ValueError("no trailing newline")
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                torn = (lineno, exc)
                continue
            if rec is not None:
                entries.append((_key(rec, f"{path}:{lineno}"), offset, len(raw)))
            offset += len(raw)
        else:
            if torn is not None and tolerate_torn_tail:
                note(f"{path}:{torn[0]}: dropped a torn last line ({torn[1]}); its sample is generated again")
                return entries
    if torn is not None:
        raise ConfigError(f"{path}:{torn[0]} is not a complete JSON line ({torn[1]}); fix or remove the line, "
                          "or pass a new --out path")
    return entries


class SampleStore:
    def __init__(self, out_path: str, *, rank: int = 0):
        self.path = os.path.abspath(out_path)
        self.parts = self.path + ".parts"
        self.rank = rank
        self._out_index = None
        if os.path.isdir(self.path):
            raise ConfigError(f"--out {out_path} is a directory; pass a .jsonl file path")
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise ConfigError(f"--out {out_path}: directory {parent} does not exist; create it first")

    def chunk_files(self) -> list[str]:
        if not os.path.isdir(self.parts):
            return []
        return sorted(os.path.join(self.parts, n) for n in os.listdir(self.parts) if n.endswith(".jsonl"))

    def _sources(self) -> list[tuple[str, list]]:
        """(file, index) of the merged file and every finished chunk file."""
        out = []
        if os.path.exists(self.path):
            if self._out_index is None:  # read once: the merged file does not change during a run
                self._out_index = index_lines(self.path, tolerate_torn_tail=True)
            out.append((self.path, self._out_index))
        out += [(p, index_lines(p, tolerate_torn_tail=False)) for p in self.chunk_files()]
        return out

    def done_keys(self) -> set[tuple[str, int]]:
        return {key for _, entries in self._sources() for key, _, _ in entries}

    def first_records(self) -> list[tuple[str, dict]]:
        """(file, its first record) of the merged file and every chunk file (to check the settings of a resume)."""
        out = []
        for path, entries in self._sources():
            if entries:
                with open(path, "rb") as f:
                    f.seek(entries[0][1])
                    out.append((path, json.loads(f.read(entries[0][2]))))
        return out

    def write_chunk(self, chunk: int, records: list[dict]) -> str:
        """One chunk file, whole or not at all: temp file, fsync, atomic rename."""
        os.makedirs(self.parts, exist_ok=True)
        final = os.path.join(self.parts, f"c{chunk:08d}-r{self.rank}-p{os.getpid()}.jsonl")
        tmp = final + ".tmp"
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.parts)
        return final

    def merge(self, order: dict[str, int]) -> int:
        """Rank 0, after every rank finished: OUT + chunk files -> new OUT, sorted by (position of the prompt hash
        in ``order``, sample); hashes not in ``order`` (prompts no longer in the data file) go last, in file order.
        Returns the number of lines written."""
        sources = self._sources()
        if not self.chunk_files() and os.path.exists(self.path) and \
                sum(length for _, _, length in sources[0][1]) == os.path.getsize(self.path):
            return len(sources[0][1])  # nothing new, nothing torn: leave the file as it is
        seen, rows = set(), []
        for n, (path, entries) in enumerate(sources):
            for i, (key, off, length) in enumerate(entries):
                if key not in seen:
                    seen.add(key)
                    rows.append(((order.get(key[0], len(order)), key[1], n, i), path, off, length))
        rows.sort(key=lambda r: r[0])
        tmp = self.path + ".merge.tmp"
        with open(tmp, "wb") as out, _Readers() as readers:
            for _, path, off, length in rows:
                out.write(readers.read(path, off, length))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))
        shutil.rmtree(self.parts, ignore_errors=True)
        return len(rows)


class _Readers:
    """Open files by path, at most ``limit`` at a time (a run may leave thousands of chunk files)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.files: dict[str, object] = {}

    def read(self, path: str, offset: int, length: int) -> bytes:
        f = self.files.get(path)
        if f is None:
            if len(self.files) >= self.limit:
                self.close()
            f = self.files[path] = open(path, "rb")
        f.seek(offset)
        return f.read(length)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover  (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["SampleStore", "index_lines", "prompt_hashes", "note"]
