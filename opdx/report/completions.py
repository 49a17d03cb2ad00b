"""The completions log (output_dir/completions.jsonl, written at evals by `opdx.train`) as markdown: per logged
prompt the student's sample with the tokens where student and teacher disagree most in **bold**, the teacher's greedy
answer, and those tokens' log probabilities. The report (first and last logged eval) and TensorBoard's text tab
both show this rendering."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

TOP_DISAGREE = 3  # tokens per completion shown in bold: the largest |log p_student - log p_teacher|
# markdown's special characters escaped; control characters as their Unicode pictures (a newline as ⏎)
_ESCAPE = str.maketrans({chr(c): chr(0x2400 + c) for c in range(32)} | {c: "\\" + c for c in "\\`*_[]|#"}
                        | {"<": "&lt;", ">": "&gt;", "\n": "⏎", "\t": " "})


def load_completions(path: str | Path) -> list[dict]:
    """completions.jsonl's events ({"step", "completions": [...]}) in order; [] if there is no such file."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def disagreements(completion: dict, top: int = TOP_DISAGREE) -> list[int]:
    """Positions of the ``top`` tokens with the largest |student − teacher| logprob, largest first ([] without
    teacher logprobs)."""
    diff = completion.get("logprob_diff") or []
    ranked = sorted((i for i, d in enumerate(diff) if d is not None and math.isfinite(d)), key=lambda i: -abs(diff[i]))
    return ranked[:top]


def _token(text: str, bold: bool) -> str:
    """A token as markdown; a bold one keeps its surrounding spaces outside the ** (a space-only one shows as ␣)."""
    if not bold:
        return text.translate(_ESCAPE)
    core = text.strip(" ")
    if not core:
        return f"**{'␣' * max(len(text), 1)}**"
    lead, trail = text[:len(text) - len(text.lstrip(' '))], text[len(text.rstrip(' ')):]
    return f"{lead}**{core.translate(_ESCAPE)}**{trail}"


def _plain(text, limit: int = 300) -> str:
    flat = " ".join(str(text or "").split())
    return (flat[:limit] + ("…" if len(flat) > limit else "")).translate(_ESCAPE) if flat else "(empty)"


def completion_markdown(completion: dict) -> list[str]:
    """One logged completion: the prompt, a two-row table (student sample with bold disagreements, teacher greedy)
    and the bold tokens' numbers."""
    tokens, bold = completion.get("tokens") or [], disagreements(completion)
    runs = itertools.groupby(enumerate(tokens), key=lambda it: it[0] in bold)  # adjacent bold tokens: one ** run
    sample = "".join(_token("".join(t for _, t in run), is_bold) for is_bold, run in runs) or "(empty)"
    teacher = completion.get("teacher")
    md = [f"**prompt**: {_plain(completion.get('prompt'))}", "", "| | completion |", "|---|---|",
          f"| student (sample) | {sample} |",
          f"| teacher (greedy) | {_plain(teacher) if teacher is not None else '(not generated)'} |", ""]
    if bold:
        s, t, d = (completion[k] for k in ("student_logprobs", "teacher_logprobs", "logprob_diff"))
        md += ["Largest disagreements, log p student vs teacher (difference): " + "; ".join(
            f"“{tokens[i].translate(_ESCAPE)}” {s[i]:.2f} vs {t[i]:.2f} ({d[i]:+.2f})" for i in bold), ""]
    return md


def event_markdown(event: dict) -> str:
    """Every completion of one logged eval (the TensorBoard text of that step)."""
    md = []
    for c in event.get("completions", []):
        md += completion_markdown(c)
    return "\n".join(md)
