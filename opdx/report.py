"""Curves and a markdown summary of a training run: ``python -m opdx.report <output_dir> [--out DIR]``.

Reads ``<output_dir>/metrics.jsonl`` (written by ``opdx.train``: one training record per step, eval records whose
metric keys start with ``eval_``) and, when present, ``config.json`` and ``summary.json``; writes PNG curves and
``report.md`` to ``<output_dir>/report/`` (or ``--out``). Only ``step`` is required in a record: every other key is
optional and any numeric key the plots do not know gets a panel of its own. A resumed run that logged a step twice
is read as the last occurrence of that step. Plotting uses matplotlib's object API (``Figure`` + Agg canvas), so it
never touches pyplot's global backend.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["ReportError", "load_metrics", "write_report", "main"]

MAIN_PNG = "learning_curve.png"

# per-step phase timings, in stacking order; time_train_s is the whole train phase (loss + backward + optimizer
# step) logged by older runs, replaced by time_loss_s + time_backward_s where those exist
PHASES = [("time_rollout_s", "rollout"), ("time_teacher_s", "teacher"), ("time_train_s", "train"),
          ("time_loss_s", "loss"), ("time_backward_s", "backward + step"), ("time_sync_s", "weight sync")]
_SPLIT_TRAIN = ("time_loss_s", "time_backward_s")
# training keys with a dedicated panel (or none: step, cumulative counters)
_CORE_TRAIN = {"step", "loss", "reverse_kl", "reverse_kl_k3", "lr", "tokens_per_s", "teacher_tokens", "tokens"}


class ReportError(ValueError):
    """Bad report input (missing directory, missing/empty/malformed metrics.jsonl); the message is one line."""


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _is_num(v) and math.isfinite(v)


# ------------------------------------------------------------------------------------------------ reading
def load_metrics(path: str | Path) -> dict:
    """Parses metrics.jsonl into ``{"train": [...], "eval": [...], "duplicates": n, "lines": n}``.

    A record's ``eval_*`` keys (with its step) form an eval row, its other keys a training row; rows are sorted by
    step and a step logged more than once (a resumed run) keeps its last occurrence. Raises ReportError naming
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
            e = {k: v for k, v in rec.items() if k.startswith("eval_")}
            t = {k: v for k, v in rec.items() if not k.startswith("eval_") and k != "step"}
            for part, table in ((e, ev), (t, train)):
                if part:
                    dups += step in table
                    table.pop(step, None)  # re-insert: the last occurrence wins
                    table[step] = {"step": step, **part}
    if not lines:
        raise ReportError(f"{path}: empty (no metric records yet)")
    return {"train": [train[s] for s in sorted(train)], "eval": [ev[s] for s in sorted(ev)],
            "duplicates": dups, "lines": lines}


def _read_json(path: Path, warnings: list[str]) -> dict | None:
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


def _numeric_keys(rows: list[dict], exclude=()) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in exclude and _is_num(v):
                keys.setdefault(k)
    return list(keys)


def _series(rows: list[dict], key: str, x: str = "step"):
    pts = [(r[x], r[key]) for r in rows if _is_num(r.get(key)) and _is_num(r.get(x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _phase_table(train: list[dict]) -> dict[str, list[float]]:
    """Per-step seconds for each phase present (missing = 0). A row that has loss/backward timings contributes
    them instead of its time_train_s; unknown time_*_s keys are extra phases."""
    known = {k for k, _ in PHASES}
    extra = [k for k in _numeric_keys(train) if k.startswith("time_") and k.endswith("_s") and k not in known]
    out: dict[str, list[float]] = {}
    for key, label in PHASES + [(k, k[len("time_"):-len("_s")].replace("_", " ")) for k in extra]:
        vals = []
        for r in train:
            v = r.get(key)
            if key == "time_train_s" and any(_is_num(r.get(s)) for s in _SPLIT_TRAIN):
                v = None
            vals.append(float(v) if _finite(v) else 0.0)
        if any(vals):
            out[label] = vals
    return out


# ------------------------------------------------------------------------------------------------ plots
def _figure(n_panels: int, cols: int = 3, w: float = 4.6, h: float = 3.3):
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n_panels))
    rows = max(1, math.ceil(n_panels / cols))
    fig = Figure(figsize=(w * cols, h * rows))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _line(ax, xs, ys, label=None, marker=None):
    if xs:
        ax.plot(xs, ys, marker=marker or ("o" if len(xs) < 3 else None), markersize=3, label=label)


def _panel_loss(ax, d, x="step"):
    _line(ax, *_series(d["train"], "loss", x))
    ax.set_title("loss")


def _panel_rkl(ax, d, x="step"):
    _line(ax, *_series(d["train"], "reverse_kl", x), label="train k1")
    _line(ax, *_series(d["train"], "reverse_kl_k3", x), label="train k3")
    ev = d["eval_x"] if x != "step" else d["eval"]
    _line(ax, *_series(ev, "eval_reverse_kl", x), label="held-out k1", marker="o")
    ax.set_title("reverse KL(student || teacher)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


_EVAL_TITLES = {"reverse_kl": "reverse KL (k1)", "k3": "reverse KL (k3)", "top1_agreement": "top-1 agreement",
                "response_len": "response length", "task_accuracy": "task accuracy"}


def _panel_eval(ax, d, key, x="step"):
    _line(ax, *_series(d["eval_x"] if x != "step" else d["eval"], key, x), marker="o")
    name = key[len("eval_"):]
    ax.set_title(f"held-out {_EVAL_TITLES.get(name, name.replace('_', ' '))}")


def _panel_key(ax, d, key, title=None, x="step"):
    _line(ax, *_series(d["train"], key, x))
    ax.set_title(title or key)


def _panel_time(ax, d, phases):
    steps = [r["step"] for r in d["train"]]
    width = 0.8 * (min(b - a for a, b in zip(steps, steps[1:])) if len(steps) > 1 else 1)
    bottom = [0.0] * len(steps)
    for label, vals in phases.items():
        ax.bar(steps, vals, width=width, bottom=bottom, label=label, linewidth=0)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_title("time per step by phase (s)")
    top = max(bottom, default=0.0)
    if top > 0:
        ax.set_ylim(0, top * 1.35)  # headroom for the legend
    ax.legend(fontsize=7, loc="upper center", ncol=3, framealpha=0.8)


def _finish(axes, xlabel):
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def _plot_all(d: dict, out: Path) -> dict[str, Path]:
    """Writes the overview PNG and one PNG per panel; returns {name: path}."""
    train, ev = d["train"], d["eval"]
    eval_keys = _numeric_keys(ev, exclude={"step"})
    phases = _phase_table(train)
    panels = []  # (name, draw(ax))
    if train:
        if any(_is_num(r.get("loss")) for r in train):
            panels.append(("loss", lambda ax: _panel_loss(ax, d)))
        if any(_is_num(r.get(k)) for r in train for k in ("reverse_kl", "reverse_kl_k3")):
            panels.append(("reverse_kl", lambda ax: _panel_rkl(ax, d)))
    panels += [(k, (lambda key: lambda ax: _panel_eval(ax, d, key))(k)) for k in eval_keys]
    if any(_is_num(r.get("tokens_per_s")) for r in train):
        panels.append(("tokens_per_s", lambda ax: _panel_key(ax, d, "tokens_per_s", "throughput (tokens/s)")))
    if phases:
        panels.append(("time_breakdown", lambda ax: _panel_time(ax, d, phases)))
    if any(_is_num(r.get("lr")) for r in train):
        panels.append(("lr", lambda ax: _panel_key(ax, d, "lr", "learning rate")))

    written: dict[str, Path] = {}
    fig, axes = _figure(max(1, len(panels)))
    for (_, draw), ax in zip(panels, axes):
        draw(ax)
    _finish(axes, "step")
    written["overview"] = _save(fig, out / MAIN_PNG)
    for name, draw in panels:
        fig, (ax,) = _figure(1, w=6.4, h=4.0)
        draw(ax)
        _finish([ax], "step")
        written[name] = _save(fig, out / f"{name}.png")

    # numeric training keys without a dedicated panel (response_len, rollout_logprob_mismatch, new metrics, ...)
    other = [k for k in _numeric_keys(train) if k not in _CORE_TRAIN and not k.startswith("time_")]
    if other:
        fig, axes = _figure(len(other))
        for k, ax in zip(other, axes):
            _panel_key(ax, d, k)
        _finish(axes, "step")
        written["other_metrics"] = _save(fig, out / "other_metrics.png")

    # the same learning curves against cumulative teacher-scored tokens (the teacher's cost), where logged
    if any(_is_num(r.get("teacher_tokens")) for r in train):
        tt = {r["step"]: r["teacher_tokens"] for r in train if _is_num(r.get("teacher_tokens"))}
        tt.setdefault(0, 0)
        d["eval_x"] = [{**r, "teacher_tokens": tt[r["step"]]} for r in ev if r["step"] in tt]
        xp = []
        if any(_is_num(r.get("loss")) for r in train):
            xp.append(lambda ax: _panel_loss(ax, d, "teacher_tokens"))
        xp.append(lambda ax: _panel_rkl(ax, d, "teacher_tokens"))
        xp += [(lambda key: lambda ax: _panel_eval(ax, d, key, "teacher_tokens"))(k) for k in eval_keys]
        fig, axes = _figure(len(xp))
        for draw, ax in zip(xp, axes):
            draw(ax)
        _finish(axes, "teacher-scored tokens (cumulative)")
        written["vs_teacher_tokens"] = _save(fig, out / "vs_teacher_tokens.png")
    return written


# ------------------------------------------------------------------------------------------------ markdown
_LOWER = ("kl", "k3", "loss", "mismatch")
_HIGHER = ("accuracy", "agreement", "acc", "reward")


def _direction(key: str) -> int:
    """+1: higher is better, -1: lower is better, 0: neither (e.g. response length)."""
    k = key.lower()
    if any(w in k for w in _HIGHER):
        return 1
    if any(w in k for w in _LOWER):
        return -1
    return 0


def _f(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not _is_num(v):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _config_lines(cfg: dict) -> list[str]:
    g = lambda sec, key, default=None: (cfg.get(sec) or {}).get(key, default) if isinstance(cfg.get(sec), dict) \
        else default  # noqa: E731
    rows = []
    src = g("model", "source")
    if src is not None:
        model = f"source={src}"
        if g("model", "path"):
            model += f", student=`{g('model', 'path')}`"
        if g("teacher", "path"):
            model += f", teacher=`{g('teacher', 'path')}`"
        if g("teacher", "server_url"):
            model += f", teacher server={g('teacher', 'server_url')}"
        if src == "demo" and g("model", "student_layers") is not None:
            model += f", student_layers={g('model', 'student_layers')}"
        if g("model", "dtype"):
            model += f", dtype={g('model', 'dtype')}"
        if g("model", "lora"):
            model += f", LoRA r={g('model', 'lora_r')}"
        rows.append(["model", model])
    kind = g("loss", "kind")
    if kind is not None:
        loss = f"kind={kind}"
        if kind in ("gjsd", "topk"):
            loss += f", beta={g('loss', 'beta')}"
        if kind == "topk":
            loss += f", topk={g('loss', 'topk')}, tail={g('loss', 'tail')}"
        loss += f", lmbda={g('loss', 'lmbda')}, seq_kd={g('loss', 'seq_kd')}, temperature={g('loss', 'temperature')}"
        if g("loss", "sft_alpha"):
            loss += f", sft_alpha={g('loss', 'sft_alpha')}"
        rows.append(["loss", loss])
    if g("train", "max_steps") is not None:
        rows.append(["steps", f"max_steps={g('train', 'max_steps')}, micro_batch_size={g('train', 'micro_batch_size')}"
                              f", grad_accum={g('train', 'grad_accum')}"])
    if g("optim", "lr") is not None:
        rows.append(["optimizer", f"lr={g('optim', 'lr')}, warmup_steps={g('optim', 'warmup_steps')}, "
                                  f"clip_grad={g('optim', 'clip_grad')}"])
    if g("rollout", "engine") is not None:
        rows.append(["rollout", f"engine={g('rollout', 'engine')}"
                                + (f" ({g('rollout', 'mode')})" if g("rollout", "engine") == "vllm" else "")
                                + f", max_new_tokens={g('rollout', 'max_new_tokens')}, "
                                  f"temperature={g('rollout', 'temperature')}"])
    if g("deepspeed", "zero_stage") is not None:
        rows.append(["deepspeed", f"zero_stage={g('deepspeed', 'zero_stage')}"])
    return _table(["setting", "value"], rows) if rows else []


def _markdown(d: dict, cfg: dict | None, summary: dict | None, figures: dict[str, Path], out: Path,
              metrics_path: Path, warnings: list[str]) -> tuple[str, dict]:
    train, ev = d["train"], d["eval"]
    stats: dict = {"train_steps": len(train), "eval_points": len(ev), "duplicate_steps": d["duplicates"]}
    md = [f"# opdx run report: `{metrics_path.parent}`", ""]
    src = f"From `{metrics_path}`: {len(train)} training steps"
    if train:
        src += f" ({train[0]['step']}–{train[-1]['step']})"
    src += f", {len(ev)} eval points"
    if d["duplicates"]:
        src += f"; {d['duplicates']} re-logged step(s) (a resumed run) read as their last occurrence"
    md += [src + ".", ""]
    for w in warnings:
        md += [f"> note: {w}", ""]

    md += ["## Run", ""]
    if cfg:
        md += _config_lines(cfg) + [""]
    else:
        md += ["No `config.json` next to the metrics.", ""]
    if summary:
        wall = summary.get("wall_s")
        line = f"Wall time: **{_f(wall)} s**" if _is_num(wall) else "Wall time: not in summary.json"
        if _is_num(summary.get("setup_s")):
            line += f" (setup {_f(summary['setup_s'])} s)"
        md += [line + ".", ""]
        stats["wall_s"] = wall
    else:
        md += ["Wall time: no `summary.json` (run unfinished?).", ""]

    if ev:
        md += ["## Held-out eval", ""]
        rows, best_stats = [], {}
        for k in _numeric_keys(ev, exclude={"step"}):
            pts = [(r["step"], r[k]) for r in ev if _finite(r.get(k))]
            if not pts:
                continue
            (s0, v0), (s1, v1) = pts[0], pts[-1]
            sign = _direction(k)
            best = "–"
            if sign:
                sb, vb = (max if sign > 0 else min)(pts, key=lambda p: p[1])
                best = f"{_f(vb)} (step {sb})"
                best_stats[k] = vb
            change = f"{100 * (v1 - v0) / abs(v0):+.1f}%" if v0 else "–"
            rows.append([f"`{k}`", f"{_f(v0)} (step {s0})", f"{_f(v1)} (step {s1})", best, change])
            stats[k] = {"first": v0, "last": v1, "best": best_stats.get(k)}
        md += _table(["metric", "first", "last", "best", "last vs first"], rows) + [""]

    if train:
        md += ["## Training", ""]
        rows = []
        for k in ["loss", "reverse_kl", "reverse_kl_k3"] + [
                k for k in _numeric_keys(train) if k not in _CORE_TRAIN and not k.startswith("time_")]:
            vals = [r[k] for r in train if _finite(r.get(k))]
            if vals:
                rows.append([f"`{k}`", _f(vals[0]), _f(vals[-1]), _f(min(vals)), _f(sum(vals) / len(vals))])
        if rows:
            md += _table(["metric", "first", "last", "min", "mean"], rows) + [""]
        tps = [r["tokens_per_s"] for r in train if _finite(r.get("tokens_per_s"))]
        facts = []
        if tps:
            stats["mean_tokens_per_s"] = sum(tps) / len(tps)
            facts.append(f"mean throughput **{_f(stats['mean_tokens_per_s'])} tokens/s**")
        tok = [r["tokens"] for r in train if _finite(r.get("tokens"))]
        if tok:
            facts.append(f"{_f(sum(tok))} trained tokens")
        tt = [r["teacher_tokens"] for r in train if _finite(r.get("teacher_tokens"))]
        if tt:
            stats["teacher_tokens"] = tt[-1]
            facts.append(f"{_f(tt[-1])} teacher-scored tokens")
        srcs: dict[str, int] = {}
        for r in train:
            if isinstance(r.get("source"), str):
                srcs[r["source"]] = srcs.get(r["source"], 0) + 1
        if srcs:
            facts.append("sources " + ", ".join(f"{s} {n}" for s, n in sorted(srcs.items())))
        if facts:
            md += ["Over the logged steps: " + "; ".join(facts) + ".", ""]

        phases = _phase_table(train)
        total = sum(sum(v) for v in phases.values())
        if phases and total > 0:
            md += ["## Time per step", "",
                   "Share = the phase's seconds summed over all logged steps / all phases' seconds.", ""]
            rows = []
            stats["phase_share_pct"] = {}
            for label, vals in phases.items():
                share = 100 * sum(vals) / total
                stats["phase_share_pct"][label] = share
                rows.append([label, _f(sum(vals) / len(vals)), f"{share:.1f}%"])
            rows.append(["**total**", _f(total / len(train)), "100%"])
            md += _table(["phase", "mean s/step", "share"], rows) + [""]

    md += ["## Figures", ""]
    rel = {name: p.relative_to(out).as_posix() for name, p in figures.items()}
    for name in ("overview", "vs_teacher_tokens"):
        if name in rel:
            md += [f"![{name}]({rel[name]})", ""]
    rest = [f"[{name}]({path})" for name, path in rel.items() if name not in ("overview", "vs_teacher_tokens")]
    if rest:
        md += ["Single panels: " + ", ".join(rest) + ".", ""]
    return "\n".join(md), stats


# ------------------------------------------------------------------------------------------------ entry points
def write_report(output_dir: str | Path, out_dir: str | Path | None = None, *, summary: dict | None = None) -> dict:
    """Writes the curves and report.md for a run directory; returns the paths written and headline numbers.

    ``summary`` overrides ``<output_dir>/summary.json`` (the trainer passes its in-memory summary, which it writes
    afterwards). Returns ``{"report": report.md, "plot": the overview PNG, "figures": {name: png}, "stats": {...},
    "warnings": [...]}``. Raises ReportError for a missing directory or a missing/empty/malformed metrics.jsonl.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ReportError(f"{output_dir}: no such directory")
    metrics_path = output_dir / "metrics.jsonl"
    d = load_metrics(metrics_path)
    d["eval_x"] = d["eval"]
    warnings: list[str] = []
    cfg = _read_json(output_dir / "config.json", warnings)
    if summary is None:
        summary = _read_json(output_dir / "summary.json", warnings)
    out = Path(out_dir) if out_dir is not None else output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = _plot_all(d, out)
    text, stats = _markdown(d, cfg, summary, figures, out, metrics_path, warnings)
    report = out / "report.md"
    report.write_text(text, encoding="utf-8")
    return {"report": report, "plot": figures["overview"], "figures": figures, "stats": stats, "warnings": warnings}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opdx.report",
                                 description="Plot a run's metrics.jsonl and write a markdown summary.")
    ap.add_argument("output_dir", help="an opdx.train output_dir (holds metrics.jsonl)")
    ap.add_argument("--out", default=None, help="where the report goes (default: <output_dir>/report)")
    args = ap.parse_args(argv)
    try:
        res = write_report(args.output_dir, args.out)
    except ReportError as exc:
        print(f"opdx.report: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"opdx.report: error: needs {exc.name} (pip install matplotlib)", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"opdx.report: error: cannot write the report: {exc}", file=sys.stderr)
        return 2
    for w in res["warnings"]:
        print(f"opdx.report: warning: {w}", file=sys.stderr)
    print(res["report"])
    for p in res["figures"].values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
