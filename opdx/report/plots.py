"""The report's figures: what each panel shows (`Panel`, plain data) and the PNGs drawn from it.

Plotting uses matplotlib's object API (``Figure`` + Agg canvas), so it never touches pyplot's global backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from opdx.report.metrics import CORE_TRAIN, is_num, numeric_keys, phase_table, series

MAIN_PNG = "learning_curve.png"
TEACHER_TOKENS = "teacher_tokens"

_EVAL_TITLES = {"reverse_kl": "reverse KL (k1)", "k3": "reverse KL (k3)", "top1_agreement": "top-1 agreement",
                "response_len": "response length", "task_accuracy": "task accuracy"}


@dataclass
class Line:
    xs: list
    ys: list
    label: str | None = None
    marker: str | None = None  # default: points for fewer than 3 values, else a plain line


@dataclass
class Panel:
    name: str  # the single-panel PNG is <name>.png
    title: str
    lines: list[Line] = field(default_factory=list)
    bars: dict[str, list[float]] = field(default_factory=dict)  # stacked bars: label -> value per bar_xs
    bar_xs: list = field(default_factory=list)


def _has(rows: list[dict], *keys: str) -> bool:
    return any(is_num(r.get(k)) for r in rows for k in keys)


def eval_rows_at(d: dict, x: str) -> list[dict]:
    """The eval rows with an ``x`` value: their own, else the training row's at that step (``teacher_tokens`` is 0
    before the first step)."""
    if x == "step":
        return d["eval"]
    at_step = {r["step"]: r[x] for r in d["train"] if is_num(r.get(x))}
    at_step.setdefault(0, 0)
    return [r if is_num(r.get(x)) else {**r, x: at_step[r["step"]]} for r in d["eval"]
            if is_num(r.get(x)) or r["step"] in at_step]


def _eval_title(key: str) -> str:
    name = key[len("eval_"):]
    return f"held-out {_EVAL_TITLES.get(name, name.replace('_', ' '))}"


def learning_panels(d: dict, x: str = "step") -> list[Panel]:
    """loss, train reverse KL (k1, k3) with the held-out k1, and one panel per eval metric, against ``x``."""
    train, ev = d["train"], eval_rows_at(d, x)
    panels = []
    if _has(train, "loss"):
        panels.append(Panel("loss", "loss", [Line(*series(train, "loss", x))]))
    if _has(train, "reverse_kl", "reverse_kl_k3"):
        panels.append(Panel("reverse_kl", "reverse KL(student || teacher)", [
            Line(*series(train, "reverse_kl", x), label="train k1"),
            Line(*series(train, "reverse_kl_k3", x), label="train k3"),
            Line(*series(ev, "eval_reverse_kl", x), label="held-out k1", marker="o")]))
    for key in numeric_keys(d["eval"], exclude={"step", TEACHER_TOKENS}):
        panels.append(Panel(key, _eval_title(key), [Line(*series(ev, key, x), marker="o")]))
    return panels


def step_panels(d: dict) -> list[Panel]:
    """Throughput, time per step stacked by phase, and the learning rate."""
    train = d["train"]
    panels = []
    if _has(train, "tokens_per_s"):
        panels.append(Panel("tokens_per_s", "throughput (tokens/s)", [Line(*series(train, "tokens_per_s"))]))
    phases = phase_table(train)
    if phases:
        panels.append(Panel("time_breakdown", "time per step by phase (s)", bars=phases,
                            bar_xs=[r["step"] for r in train]))
    if _has(train, "lr"):
        panels.append(Panel("lr", "learning rate", [Line(*series(train, "lr"))]))
    return panels


def other_panels(d: dict) -> list[Panel]:
    """Numeric training keys without a dedicated panel (response_len, rollout_logprob_mismatch, new metrics, ...)."""
    keys = [k for k in numeric_keys(d["train"]) if k not in CORE_TRAIN and not k.startswith("time_")]
    return [Panel(k, k, [Line(*series(d["train"], k))]) for k in keys]


def _draw(ax, panel: Panel) -> None:
    for line in panel.lines:
        if line.xs:
            ax.plot(line.xs, line.ys, marker=line.marker or ("o" if len(line.xs) < 3 else None), markersize=3,
                    label=line.label)
    if panel.bars:
        xs = panel.bar_xs
        width = 0.8 * (min(b - a for a, b in zip(xs, xs[1:])) if len(xs) > 1 else 1)
        bottom = [0.0] * len(xs)
        for label, vals in panel.bars.items():
            ax.bar(xs, vals, width=width, bottom=bottom, label=label, linewidth=0)
            bottom = [b + v for b, v in zip(bottom, vals)]
        top = max(bottom, default=0.0)
        if top > 0:
            ax.set_ylim(0, top * 1.35)  # headroom for the legend
        ax.legend(fontsize=7, loc="upper center", ncol=3, framealpha=0.8)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(panel.title)


def _render(panels: list[Panel], path: Path, xlabel: str, *, single: bool = False) -> Path:
    from matplotlib.figure import Figure

    cols = 1 if single else max(1, min(3, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    w, h = (6.4, 4.0) if single else (4.6, 3.3)
    fig = Figure(figsize=(w * cols, h * rows))
    for i, panel in enumerate(panels or [Panel("empty", "")]):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw(ax, panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_figures(d: dict, out: Path) -> dict[str, Path]:
    """Writes the overview PNG, one PNG per overview panel, other_metrics.png and, where ``teacher_tokens`` is
    logged, vs_teacher_tokens.png (the learning curves against the teacher's cost); returns {name: path}."""
    overview = learning_panels(d) + step_panels(d)
    written = {"overview": _render(overview, out / MAIN_PNG, "step")}
    for panel in overview:
        written[panel.name] = _render([panel], out / f"{panel.name}.png", "step", single=True)
    other = other_panels(d)
    if other:
        written["other_metrics"] = _render(other, out / "other_metrics.png", "step")
    if _has(d["train"], TEACHER_TOKENS):
        written["vs_teacher_tokens"] = _render(learning_panels(d, TEACHER_TOKENS), out / "vs_teacher_tokens.png",
                                               "teacher-scored tokens (cumulative)")
    return written
