"""report.md: run settings, wall time, the held-out eval table, training statistics, phase shares, the completions
log, figures."""

from __future__ import annotations

import math
from pathlib import Path

from opdx.report.completions import TOP_DISAGREE, event_markdown
from opdx.report.metrics import CORE_TRAIN, finite, is_num, numeric_keys, phase_table
from opdx.report.plots import TEACHER_TOKENS

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
    if isinstance(v, bool) or not is_num(v):
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



def _header(d: dict, metrics_path: Path, warnings: list[str]) -> list[str]:
    train, ev = d["train"], d["eval"]
    src = f"From `{metrics_path}`: {len(train)} training steps"
    if train:
        src += f" ({train[0]['step']}–{train[-1]['step']})"
    src += f", {len(ev)} eval points"
    if d["duplicates"]:
        src += f"; {d['duplicates']} re-logged step(s) (a resumed run) read as their last occurrence"
    md = [f"# opdx run report: `{metrics_path.parent}`", "", src + ".", ""]
    for w in warnings:
        md += [f"> note: {w}", ""]
    return md


def _run_section(cfg: dict | None, summary: dict | None, stats: dict) -> list[str]:
    md = ["## Run", ""]
    md += (_config_lines(cfg) if cfg else ["No `config.json` next to the metrics."]) + [""]
    if not summary:
        return md + ["Wall time: no `summary.json` (run unfinished?).", ""]
    wall = summary.get("wall_s")
    line = f"Wall time: **{_f(wall)} s**" if is_num(wall) else "Wall time: not in summary.json"
    if is_num(summary.get("setup_s")):
        line += f" (setup {_f(summary['setup_s'])} s)"
    stats["wall_s"] = wall
    return md + [line + ".", ""]


def _eval_section(ev: list[dict], stats: dict) -> list[str]:
    """first / last / best (lowest KL, highest accuracy or agreement) of each eval metric."""
    rows = []
    for k in numeric_keys(ev, exclude={"step", TEACHER_TOKENS}):
        pts = [(r["step"], r[k]) for r in ev if finite(r.get(k))]
        if not pts:
            continue
        (s0, v0), (s1, v1) = pts[0], pts[-1]
        sign, best, best_value = _direction(k), "–", None
        if sign:
            sb, best_value = (max if sign > 0 else min)(pts, key=lambda p: p[1])
            best = f"{_f(best_value)} (step {sb})"
        change = f"{100 * (v1 - v0) / abs(v0):+.1f}%" if v0 else "–"
        rows.append([f"`{k}`", f"{_f(v0)} (step {s0})", f"{_f(v1)} (step {s1})", best, change])
        stats[k] = {"first": v0, "last": v1, "best": best_value}
    return ["## Held-out eval", ""] + _table(["metric", "first", "last", "best", "last vs first"], rows) + [""]


def _training_facts(train: list[dict], stats: dict) -> list[str]:
    """Mean throughput, token counts and the data sources over the logged steps."""
    facts = []
    tps = [r["tokens_per_s"] for r in train if finite(r.get("tokens_per_s"))]
    if tps:
        stats["mean_tokens_per_s"] = sum(tps) / len(tps)
        facts.append(f"mean throughput **{_f(stats['mean_tokens_per_s'])} tokens/s**")
    tok = [r["tokens"] for r in train if finite(r.get("tokens"))]
    if tok:
        facts.append(f"{_f(sum(tok))} trained tokens")
    tt = [r[TEACHER_TOKENS] for r in train if finite(r.get(TEACHER_TOKENS))]
    if tt:
        stats[TEACHER_TOKENS] = tt[-1]
        facts.append(f"{_f(tt[-1])} teacher-scored tokens")
    srcs: dict[str, int] = {}
    for r in train:
        if isinstance(r.get("source"), str):
            srcs[r["source"]] = srcs.get(r["source"], 0) + 1
    if srcs:
        facts.append("sources " + ", ".join(f"{s} {n}" for s, n in sorted(srcs.items())))
    return ["Over the logged steps: " + "; ".join(facts) + ".", ""] if facts else []


def _training_section(train: list[dict], stats: dict) -> list[str]:
    md = ["## Training", ""]
    rows = []
    for k in ["loss", "reverse_kl", "reverse_kl_k3"] + [
            k for k in numeric_keys(train) if k not in CORE_TRAIN and not k.startswith("time_")]:
        vals = [r[k] for r in train if finite(r.get(k))]
        if vals:
            rows.append([f"`{k}`", _f(vals[0]), _f(vals[-1]), _f(min(vals)), _f(sum(vals) / len(vals))])
    if rows:
        md += _table(["metric", "first", "last", "min", "mean"], rows) + [""]
    return md + _training_facts(train, stats)


def _time_section(train: list[dict], stats: dict) -> list[str]:
    """Each phase's mean seconds per step and share of the step time."""
    phases = phase_table(train)
    total = sum(sum(v) for v in phases.values())
    if not phases or total <= 0:
        return []
    rows = []
    stats["phase_share_pct"] = {}
    for label, vals in phases.items():
        share = 100 * sum(vals) / total
        stats["phase_share_pct"][label] = share
        rows.append([label, _f(sum(vals) / len(vals)), f"{share:.1f}%"])
    rows.append(["**total**", _f(total / len(train)), "100%"])
    return (["## Time per step", "", "Share = the phase's seconds summed over all logged steps / all phases' seconds.",
             ""] + _table(["phase", "mean s/step", "share"], rows) + [""])


def _figures_section(figures: dict[str, Path], out: Path) -> list[str]:
    md = ["## Figures", ""]
    rel = {name: p.relative_to(out).as_posix() for name, p in figures.items()}
    for name in ("overview", "vs_teacher_tokens"):
        if name in rel:
            md += [f"![{name}]({rel[name]})", ""]
    rest = [f"[{name}]({path})" for name, path in rel.items() if name not in ("overview", "vs_teacher_tokens")]
    if rest:
        md += ["Single panels: " + ", ".join(rest) + ".", ""]
    return md


def _completions_section(events: list[dict]) -> list[str]:
    """The completions log (opdx.report.completions) at the first and the last logged eval."""
    if not events:
        return []
    md = ["## Completions", "", f"The student's samples of the first held-out prompts; in **bold** the "
          f"{TOP_DISAGREE} tokens per completion where the student's and the teacher's log probabilities differ most "
          "(`completions.jsonl` holds every token's).", ""]
    for event in [events[0]] if len(events) == 1 else [events[0], events[-1]]:
        md += [f"### Step {event.get('step')}", "", event_markdown(event), ""]
    return md


def markdown(d: dict, cfg: dict | None, summary: dict | None, figures: dict[str, Path], out: Path,
             metrics_path: Path, warnings: list[str], completions: list[dict] | None = None) -> tuple[str, dict]:
    """(report.md's text, its headline numbers)."""
    train, ev = d["train"], d["eval"]
    stats: dict = {"train_steps": len(train), "eval_points": len(ev), "duplicate_steps": d["duplicates"]}
    md = _header(d, metrics_path, warnings) + _run_section(cfg, summary, stats)
    if ev:
        md += _eval_section(ev, stats)
    if train:
        md += _training_section(train, stats) + _time_section(train, stats)
    return "\n".join(md + _completions_section(completions or []) + _figures_section(figures, out)), stats
