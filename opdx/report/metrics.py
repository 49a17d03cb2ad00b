"""Reading a run's metrics.jsonl into training and eval rows, and the per-step phase timings."""

from __future__ import annotations

import json
import math
from pathlib import Path

# per-step phase timings, in stacking order, disjoint: time_train_s is the whole train phase (loss + backward +
# optimizer step), replaced by its parts where a row has them; time_backward_s is engine.backward (with ZeRO's
# gradient reduction hooks), time_clip_s the rest of engine.step beside the AdamW update time_optimizer_s (gradient
# norm + clipping, master-weight copies, scheduler). Rows of older runs have no clip/optimizer times: their
# time_backward_s includes the whole optimizer step.
PHASES = [("time_rollout_s", "rollout"), ("time_teacher_s", "teacher"), ("time_train_s", "train"),
          ("time_loss_s", "loss"), ("time_backward_s", "backward"), ("time_clip_s", "grad clip"),
          ("time_optimizer_s", "optimizer"), ("time_sync_s", "weight sync")]
_SPLIT_TRAIN = ("time_loss_s", "time_backward_s", "time_clip_s", "time_optimizer_s")
# the whole step's wall time: not a phase; what the phases leave of it is the phase "other"
STEP_TIME = "time_step_s"
OTHER_PHASE = "other"
# training keys with a dedicated panel (or none: step, cumulative counters)
CORE_TRAIN = {"step", "loss", "reverse_kl", "reverse_kl_k3", "lr", "tokens_per_s", "teacher_tokens", "tokens"}
# keys that say where in the run a record was taken rather than measure it: an eval record carries them too
POSITION_KEYS = {"teacher_tokens"}


class ReportError(ValueError):
    """Bad report input (missing directory, missing/empty/malformed metrics.jsonl); the message is one line."""


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite(v) -> bool:
    return is_num(v) and math.isfinite(v)


def _split_record(rec: dict) -> tuple[dict, dict]:
    """(eval part, training part) of one record, without ``step``. The eval part is the ``eval_*`` keys plus the
    record's position keys (``teacher_tokens``); the training part is every other key, and empty (no training row)
    when the record measures nothing but eval metrics."""
    ev = {k: v for k, v in rec.items() if k.startswith("eval_")}
    rest = {k: v for k, v in rec.items() if not k.startswith("eval_") and k != "step"}
    if ev:
        ev.update({k: v for k, v in rest.items() if k in POSITION_KEYS})
        if all(k in POSITION_KEYS for k in rest):
            rest = {}
    return ev, rest


def load_metrics(path: str | Path) -> dict:
    """Parses metrics.jsonl into ``{"train": [...], "eval": [...], "duplicates": n, "lines": n}``.

    A record's ``eval_*`` keys form an eval row, its other measurements a training row (`_split_record`); rows are
    sorted by step, and a step logged more than once in the same table (a resumed run) keeps its last occurrence:
    an eval record at a training step is not a re-log. Raises ReportError naming
    ``file:line`` for a line that is not a JSON object with an integer ``step``, and for a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: no such file (is this an opdx.train output_dir?)")
    train: dict[int, dict] = {}
    ev: dict[int, dict] = {}
    dups = lines = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReportError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            step = rec.get("step")
            if not (isinstance(step, int) and not isinstance(step, bool)) and not (
                    isinstance(step, float) and step.is_integer()):
                raise ReportError(f"{path}:{lineno}: record has no integer 'step' (got {step!r})")
            step = int(step)
            lines += 1
            for part, table in zip(_split_record(rec), (ev, train)):
                if part:
                    dups += step in table
                    table.pop(step, None)  # re-insert: the last occurrence wins
                    table[step] = {"step": step, **part}
    if not lines:
        raise ReportError(f"{path}: empty (no metric records yet)")
    return {"train": [train[s] for s in sorted(train)], "eval": [ev[s] for s in sorted(ev)],
            "duplicates": dups, "lines": lines}


def read_json(path: Path, warnings: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.append(f"{path}: unreadable, ignored ({exc})")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path}: not a JSON object, ignored")
        return None
    return data


def numeric_keys(rows: list[dict], exclude=()) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in exclude and is_num(v):
                keys.setdefault(k)
    return list(keys)


def series(rows: list[dict], key: str, x: str = "step"):
    pts = [(r[x], r[key]) for r in rows if is_num(r.get(key)) and is_num(r.get(x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def phase_table(train: list[dict]) -> dict[str, list[float]]:
    """Per-step seconds for each phase present (missing = 0). A row that has loss/backward/clip/optimizer timings
    contributes them instead of its time_train_s; unknown time_*_s keys are extra phases; ``time_step_s`` (the
    whole step) is not a phase: the seconds it has beyond the phases' sum are the phase "other"."""
    known = {k for k, _ in PHASES} | {STEP_TIME}
    extra = [k for k in numeric_keys(train) if k.startswith("time_") and k.endswith("_s") and k not in known]
    out: dict[str, list[float]] = {}
    for key, label in PHASES + [(k, k[len("time_"):-len("_s")].replace("_", " ")) for k in extra]:
        vals = []
        for r in train:
            v = r.get(key)
            if key == "time_train_s" and any(is_num(r.get(s)) for s in _SPLIT_TRAIN):
                v = None
            vals.append(float(v) if finite(v) else 0.0)
        if any(vals):
            out[label] = vals
    other = [max(0.0, float(r[STEP_TIME]) - sum(v[i] for v in out.values())) if finite(r.get(STEP_TIME)) else 0.0
             for i, r in enumerate(train)]
    if any(other):
        out[OTHER_PHASE] = other
    return out


RISE_EVALS = 2  # held-out reverse KL rising at this many evals in a row is a warning (trainer log and report)


def kl_rise_warning(values: list[float], *, at_end: bool = False) -> str | None:
    """The warning when the held-out reverse KL rose at `RISE_EVALS` evals in a row (anywhere in ``values``, or
    only in the last evals with ``at_end``), naming the knobs that usually cause it; None otherwise."""
    starts = range(len(values) - RISE_EVALS - 1, len(values) - RISE_EVALS) if at_end else \
        range(len(values) - RISE_EVALS)
    for i in starts:
        run = values[i:i + RISE_EVALS + 1]
        if i >= 0 and all(finite(v) for v in run) and all(b > a for a, b in zip(run, run[1:])):
            shown = " -> ".join(f"{v:.4g}" for v in run)
            return (f"held-out reverse KL rose at {RISE_EVALS} evals in a row ({shown}): the student is moving away "
                    f"from the teacher. Likely knobs: a lower optim.lr or a longer optim.warmup_steps, a trust "
                    f"region (loss.is_clip=0.2), larger batches (train.micro_batch_size, train.grad_accum), "
                    f"loss.normalize_reward=false, enough rollout.max_new_tokens for the answers to end")
    return None
