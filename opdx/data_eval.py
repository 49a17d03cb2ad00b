"""Scoring of checkable prompts (records with a non-null `answer` in examples/data/prompts_*.jsonl), and quality
statistics of generated token ids (`repeat_frac`, `completion_stats`: length, stop rate, repetition).

`score_answer(completion, answer)` is deliberately a little lenient about form and strict about content:

- the completion is cut at the first chat end marker (`<|im_end|>`, `<|endoftext|>`, `</s>`, `<|eot_id|>`);
- both sides are normalized: Unicode NFKC, markdown emphasis/backticks and surrounding quotes/brackets removed,
  whitespace collapsed, spaces around commas normalized (`2,5, 9` == `2, 5, 9`; `1,000` == `1000`), trailing punctuation dropped;
- numbers compare by value (`42.0` == `42`, `1,000` == `1000`);
- case: an all-uppercase answer (`APPLE`) must match case exactly; an all-lowercase answer (`apple`) accepts a
  capitalized first letter (`Apple`) but nothing else (`APPLE` fails a lowercase task); any other answer
  (`Paris`, `Buenos Aires`) compares case-insensitively. `case_sensitive=True/False` overrides this.
- accepted forms: the whole completion, its first non-empty line, or a first line that ends in the answer after
  `is`, `=`, `:` or `answer`/`result` (e.g. "The capital of France is Paris.", "17 + 25 = 42").
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

__all__ = ["score_answer", "normalize_answer", "load_prompt_records", "accuracy", "repeat_frac", "completion_stats"]

_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end|>")
_WRAPPERS = "\"'`*_“”‘’«»()[]{}<>"
_TRAILING = ".,;:!?。"
_NUM_RE = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")
_TAIL_RE = re.compile(r".*(?:\bis|=|:|\banswer|\bresult|\bequals)\s+(.+)$", re.IGNORECASE)  # last marker wins


def normalize_answer(text: str) -> str:
    """Normalizes a short answer for comparison (case is kept; see score_answer for the case rules)."""
    s = unicodedata.normalize("NFKC", text)
    s = s.replace("**", "").replace("__", "")
    s = re.sub(r"\s+", " ", s).strip()
    prev = None
    while prev != s:  # peel quotes / trailing punctuation repeatedly: '"APPLE".' -> APPLE
        prev = s
        s = s.rstrip(_TRAILING).strip()
        if len(s) >= 2 and s[0] in _WRAPPERS and s[-1] in _WRAPPERS:
            s = s[1:-1].strip()
        s = s.strip("`*_ ")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators: 1,000 -> 1000
    s = re.sub(r"\s*,\s*", ", ", s)
    return s


def _number(s: str) -> float | None:
    if _NUM_RE.match(s):
        try:
            return float(s.replace(",", ""))
        except ValueError:
            return None
    return None


def _cut(completion: str) -> str:
    for m in _END_MARKERS:
        k = completion.find(m)
        if k >= 0:
            completion = completion[:k]
    return completion


def _equal(cand: str, answer: str, case_sensitive: bool | None) -> bool:
    if not cand:
        return False
    na, nc = _number(answer), _number(cand)
    if na is not None:
        return nc is not None and na == nc
    if case_sensitive is True:
        return cand == answer
    if case_sensitive is False:
        return cand.casefold() == answer.casefold()
    letters = [ch for ch in answer if ch.isalpha()]
    if len(letters) >= 2 and all(ch.isupper() for ch in letters):
        return cand == answer
    if len(letters) >= 2 and all(ch.islower() for ch in letters):
        return cand == answer or (cand[:1].lower() + cand[1:]) == answer
    return cand.casefold() == answer.casefold()


def score_answer(completion: str, answer: str, *, case_sensitive: bool | None = None) -> bool:
    """True iff `completion` gives `answer` (see the module docstring for the exact rules)."""
    if answer is None:
        raise ValueError("score_answer needs an answer; records with answer=null are not checkable")
    ans = normalize_answer(str(answer))
    text = _cut(str(completion))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    candidates = [normalize_answer(text)]
    if lines:
        first = normalize_answer(lines[0])
        candidates.append(first)
        m = _TAIL_RE.match(first)
        if m:
            candidates.append(normalize_answer(m.group(1)))
    return any(_equal(c, ans, case_sensitive) for c in candidates)


def load_prompt_records(path: str | Path) -> list[dict]:
    """Reads a prompts JSONL file (one `{"prompt", "response", "answer", "category"}` object per line)."""
    recs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: invalid JSON: {exc}") from exc
    return recs


def accuracy(completions: Iterable[str], answers: Iterable[str | None]) -> tuple[float, int]:
    """(fraction correct, number scored) over the pairs whose answer is not None."""
    scored = [score_answer(c, a) for c, a in zip(completions, answers, strict=True) if a is not None]
    return (sum(scored) / len(scored) if scored else float("nan")), len(scored)


def repeat_frac(token_ids, n: int = 4) -> float:
    """Share of repeated n-grams in one completion: (#n-grams − #distinct n-grams) / #n-grams; 0 for fewer than
    ``n`` tokens. A repetition loop drives it towards 1; text without a repeated n-gram gives 0."""
    if n < 1:
        raise ValueError(f"repeat_frac: n must be >= 1, got {n}")
    ids = list(token_ids)
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def completion_stats(completions, eos_ids, *, n: int = 4) -> dict:
    """Over lists of generated token ids (each cut after its first EOS, as `RolloutBatch.completions()` gives them):
    ``response_len`` (mean tokens, EOS included), ``stop_rate`` (fraction ending with an id in ``eos_ids``) and
    ``repeat_frac`` (mean `repeat_frac` with n-grams of ``n``). NaN for each when there are no completions."""
    eos = {int(eos_ids)} if isinstance(eos_ids, int) else {int(e) for e in eos_ids}
    seqs = [list(c) for c in completions]
    if not seqs:
        nan = float("nan")
        return {"response_len": nan, "stop_rate": nan, "repeat_frac": nan}
    return {
        "response_len": sum(len(c) for c in seqs) / len(seqs),
        "stop_rate": sum(bool(c) and int(c[-1]) in eos for c in seqs) / len(seqs),
        "repeat_frac": sum(repeat_frac(c, n) for c in seqs) / len(seqs),
    }
