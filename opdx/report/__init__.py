"""Curves and a markdown summary of a training run: ``python -m opdx.report <output_dir> [--out DIR]``.

Reads ``<output_dir>/metrics.jsonl`` (written by ``opdx.train``: one training record per step, eval records whose
metric keys start with ``eval_``) and, when present, ``config.json``, ``summary.json`` and ``completions.jsonl``;
writes PNG curves and ``report.md`` to ``<output_dir>/report/`` (or ``--out``). Only ``step`` is required in a
record: every other key is optional and any numeric key the plots do not know gets a panel of its own. A resumed run
that logged a step twice is read as the last occurrence of that step.

``metrics.py`` reads the file, ``plots.py`` draws the figures, ``completions.py`` renders the completions log,
``markdown.py`` writes report.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opdx.report.completions import load_completions
from opdx.report.markdown import markdown
from opdx.report.metrics import ReportError, kl_rise_warning, load_metrics, read_json
from opdx.report.plots import write_figures

__all__ = ["ReportError", "load_metrics", "write_report", "main"]


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
    warnings: list[str] = []
    cfg = read_json(output_dir / "config.json", warnings)
    if summary is None:
        summary = read_json(output_dir / "summary.json", warnings)
    out = Path(out_dir) if out_dir is not None else output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rise = kl_rise_warning([r["eval_reverse_kl"] for r in d["eval"] if "eval_reverse_kl" in r])
    if rise:
        warnings.append(rise)
    figures = write_figures(d, out)
    completions = load_completions(output_dir / "completions.jsonl")
    text, stats = markdown(d, cfg, summary, figures, out, metrics_path, warnings, completions=completions)
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

