"""On-policy vs off-policy distillation on the embedded demo pair (SmolLM2-135M-Instruct teacher, its copy pruned to
24 of 30 layers as the student, --student-layers): the central claim of GKD / on-policy distillation, measured
with opdx.train.

Every run gets the same budget of teacher-scored tokens (`train.max_tokens`), the same prompts, optimizer and
constant learning rate; only the data source and the loss change:

    gjsd_b0.5     on-policy  (lmbda=1)  generalized JSD, beta=0.5, full vocabulary
    rkl           on-policy  (lmbda=1)  reverse KL (gjsd beta=1), full vocabulary
    opd           on-policy  (lmbda=1)  reverse-KL REINFORCE on the sampled tokens (opd)
    topk16/64     on-policy  (lmbda=1)  JSD beta=0.5 over the teacher's top-16 / top-64 tokens, renormalized
    topk64_tail   on-policy  (lmbda=1)  the same with the tail bucket log(1 - sum_K p) as a 65th entry
    kd_seq        off-policy (lmbda=0)  the same JSD beta=0.5 on teacher-generated responses (seq_kd)
    sft_seq       off-policy (lmbda=0)  cross-entropy on the same teacher-generated responses
    gkd_mix       mixed      (lmbda=0.5) the demo's recipe: JSD beta=0.5, half the batches on the teacher's
                                         pre-generated answers (examples/data/teacher_train.jsonl)
    uld_mix / gold_mix  mixed (lmbda=0.5) --task xtok only: the same mix for a student with another tokenizer
                                         (loss.kind=uld / gold, docs/cross-tokenizer.md)

Held-out metrics (opdx.train.evaluate.evaluate, on examples/data/prompts_eval.jsonl): teacher-scored reverse KL of student
samples, top-1 agreement with the teacher on those samples, and greedy task accuracy on the checkable prompts. The
initial student and the teacher itself are evaluated once as references.

    python examples/study.py                                # the whole grid (7 arms x 3 seeds)
    python examples/study.py --arms opd kd_seq --seeds 0    # a subset
    python examples/study.py --plot-only                    # re-render results/ from the finished runs
    python examples/study.py --task short --out results/short --arms gjsd_b0.5 opd --student-layers 28 --lr 1e-4
                                   # the short-answer, small-batch stability check (checkable prompts, batch 4)
    python examples/study.py --task xtok --out results/study_xtok --seeds 0
                                   # a student with another tokenizer (its vocabulary cut to the teacher's first
                                   # 32768 ids): uld_mix / gold_mix, the per-group held-out reverse KL

Runs land in results/study_runs/<arm>_s<seed>/ (a finished run is never repeated: rerun the command after a crash
to continue the grid); results/study.csv (every eval point), results/study_summary.md (final metrics, mean ± std
over seeds) and results/study.png (metrics vs teacher-scored tokens).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "configs" / "demo.yaml"

ARMS: dict[str, tuple[str, list[str]]] = {  # name -> (data source, overrides)
    "gjsd_b0.5": ("on-policy", ["loss.kind=gjsd", "loss.beta=0.5", "loss.lmbda=1"]),
    "rkl": ("on-policy", ["loss.kind=gjsd", "loss.beta=1.0", "loss.lmbda=1"]),
    "opd": ("on-policy", ["loss.kind=opd", "loss.lmbda=1"]),
    "topk16": ("on-policy", ["loss.kind=topk", "loss.topk=16", "loss.beta=0.5", "loss.lmbda=1"]),
    "topk64": ("on-policy", ["loss.kind=topk", "loss.topk=64", "loss.beta=0.5", "loss.lmbda=1"]),
    "topk64_tail": ("on-policy", ["loss.kind=topk", "loss.topk=64", "loss.beta=0.5", "loss.tail=true",
                                  "loss.lmbda=1"]),
    "kd_seq": ("teacher-generated", ["loss.kind=gjsd", "loss.beta=0.5", "loss.lmbda=0", "loss.seq_kd=true"]),
    "sft_seq": ("teacher-generated", ["loss.kind=sft", "loss.lmbda=0", "loss.seq_kd=true"]),
    "gkd_mix": ("mixed", ["loss.kind=gjsd", "loss.beta=0.5", "loss.lmbda=0.5",
                          "data.train=examples/data/teacher_train.jsonl"]),
    # --task xtok (a student with another tokenizer): the demo's mix with the cross-tokenizer losses
    "uld_mix": ("mixed", ["loss.kind=uld", "loss.lmbda=0.5", "data.train=examples/data/teacher_train.jsonl"]),
    "gold_mix": ("mixed", ["loss.kind=gold", "loss.beta=0.5", "loss.lmbda=0.5",
                           "data.train=examples/data/teacher_train.jsonl"]),
}
XTOK_ARMS = ("uld_mix", "gold_mix")
XTOK_VOCAB = 32768  # the student's vocabulary cut to the teacher's first ids (opdx.models.truncate_vocabulary)
METRICS = [("eval_reverse_kl", "held-out reverse KL (k1) ↓"), ("eval_top1_agreement", "top-1 agreement ↑"),
           ("eval_task_accuracy", "task accuracy (greedy) ↑")]
XTOK_METRICS = [("eval_group_reverse_kl", "held-out per-group reverse KL ↓"), ("eval_stop_rate", "stop rate ↑"),
                ("eval_task_accuracy", "task accuracy (greedy) ↑")]
QUIET = ["save.final=false", "log.tensorboard=false", "log.plot=false", "log.progress=false"]


# --task short: only the checkable prompts (answers of a few tokens: a number, a word), 4 sequences per step and
# 16-token rollouts: the small-batch, short-answer regime where full fine-tuning is most easily destabilized
SHORT = ["rollout.max_new_tokens=16", "train.micro_batch_size=2", "eval.num_prompts=30"]


def short_data(out: Path) -> list[str]:
    """Writes the checkable-only prompt files (records with an "answer") under ``out``; their overrides."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "eval"):
        src = ROOT / "examples" / "data" / f"prompts_{split}.jsonl"
        rows = [ln for ln in src.read_text().splitlines() if ln.strip() and json.loads(ln).get("answer") is not None]
        files[split] = out / f"short_{split}.jsonl"
        files[split].write_text("\n".join(rows) + "\n")
    return [f"data.train={files['train']}", f"data.eval={files['eval']}", *SHORT]


def task_overrides(args) -> list[str]:
    """The prompts and the student every run of the grid (and the two references) share. --task xtok: the demo
    student with its vocabulary cut to the teacher's first XTOK_VOCAB ids (its own tokenizer), built once."""
    if args.task == "xtok":
        from opdx.models import ensure_demo_models, truncate_vocabulary

        teacher_dir, student_dir = ensure_demo_models(student_layers=args.student_layers)
        student = truncate_vocabulary(student_dir, f"{student_dir}_v{XTOK_VOCAB}", XTOK_VOCAB)
        return ["model.source=path", f"model.path={student}", f"teacher.path={teacher_dir}"]
    task = short_data(Path(args.out) / "study_runs" / "_short_data") if args.task == "short" else []
    return [*task, f"model.student_layers={args.student_layers}"]


def common_overrides(args, task: list[str]) -> list[str]:
    return [*task, f"train.max_tokens={args.max_tokens}", "train.max_steps=100000",
            f"optim.lr={args.lr}", "optim.min_lr_ratio=1.0", "optim.warmup_steps=2", f"eval.every={args.eval_every}",
            "eval.at_start=false", *QUIET]


def run_train(run_dir: Path, overrides: list[str], nproc: int, port: int) -> None:
    """One opdx.train run; its output goes to run_dir/train.log. A finished run (summary.json) is skipped."""
    if (run_dir / "summary.json").is_file():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "opdx.train", "--config", str(DEMO), f"train.output_dir={run_dir}", *overrides]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0 or not (run_dir / "summary.json").is_file():
        tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"run {run_dir.name} failed (exit {rc}); last lines of {run_dir / 'train.log'}:\n"
                           + "\n".join(tail))


def eval_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if "eval_response_len" in r]


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def collect(out: Path, arms: list[str], seeds: list[int], metrics=METRICS) -> tuple[list[dict], dict]:
    """-> (csv rows: every eval point of every finished run, with the shared initial eval at 0 tokens; references)"""
    refs = {name: (eval_rows(out / "study_runs" / name) or [None])[0] for name in ("initial", "teacher")}
    rows = []
    for arm in arms:
        for seed in seeds:
            ev = eval_rows(out / "study_runs" / f"{arm}_s{seed}")
            if not ev:
                continue
            if refs["initial"] is not None:
                ev = [{**refs["initial"], "step": 0, "teacher_tokens": 0}] + ev
            for r in ev:
                rows.append({"arm": arm, "source": ARMS[arm][0], "seed": seed, "step": r["step"],
                             "teacher_tokens": r.get("teacher_tokens", 0),
                             **{k: r.get(k, float("nan")) for k, _ in metrics},
                             "eval_response_len": r.get("eval_response_len", float("nan"))})
    return rows, refs


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def final_table(rows: list[dict], refs: dict, arms: list[str], metrics=METRICS) -> str:
    cols = metrics + [("eval_response_len", "sample length (tokens)")]
    lines = ["| run | data | seeds | teacher-scored tokens | " + " | ".join(t for _, t in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for name, label in (("initial", "initial student"), ("teacher", "teacher (reference)")):
        r = refs.get(name)
        if r:
            lines.append(f"| {label} | – | – | 0 | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k, _ in cols)
                         + " |")
    for arm in arms:
        by_seed = {}
        for r in rows:
            if r["arm"] == arm and r["step"] > 0:
                by_seed[r["seed"]] = r  # rows are in step order: the last one per seed is the final eval
        if not by_seed:
            continue
        finals = list(by_seed.values())
        cells = []
        for k, _ in cols:
            m, s = mean_std([f[k] for f in finals])
            cells.append(f"{m:.3f} ± {s:.3f}")
        tok_m, _ = mean_std([f["teacher_tokens"] for f in finals])
        lines.append(f"| {arm} | {ARMS[arm][0]} | {len(finals)} | {tok_m:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], refs: dict, arms: list[str], path: Path, layers: int, metrics=METRICS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes, metrics):
        for i, arm in enumerate(arms):
            seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
            if not seeds:
                continue
            curves = [[(r["teacher_tokens"], r[key]) for r in rows if r["arm"] == arm and r["seed"] == s]
                      for s in seeds]
            # align by eval index (every run evaluates at the same step interval; tokens per step differ slightly)
            n = min(len(c) for c in curves)
            xs = [sum(c[j][0] for c in curves) / len(curves) for j in range(n)]
            stats = [mean_std([c[j][1] for c in curves]) for j in range(n)]
            ms, ss = [m for m, _ in stats], [s for _, s in stats]
            style = "-" if ARMS[arm][0] == "on-policy" else "--"
            ax.plot(xs, ms, style, marker="o", ms=3, color=colors[i % len(colors)], label=arm)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)],
                            color=colors[i % len(colors)], alpha=0.15)
        if refs.get("teacher") and key in refs["teacher"]:
            ax.axhline(refs["teacher"][key], color="k", lw=0.8, ls=":", label="teacher")
        ax.set_title(title)
        ax.set_xlabel("teacher-scored training tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"opdx study: SmolLM2-135M-Instruct -> {layers}-layer student (mean ± std over seeds; dashed = "
                 "off-policy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_grid(args, runs: Path) -> None:
    """The initial student's and the teacher's evals, then every arm x seed (finished runs are skipped)."""
    from tqdm import tqdm

    teacher_dir = Path(os.path.expanduser("~/.cache/opdx/teacher"))
    task = task_overrides(args)  # writes the --task short prompt files once
    xtok = ["loss.kind=uld"] if args.task == "xtok" else []  # the initial eval's per-group metrics
    jobs = [("initial", ["train.max_steps=0", "eval.at_start=true", *QUIET, *task, *xtok])]
    jobs += [(f"{arm}_s{seed}", [*ARMS[arm][1], f"train.seed={seed}", *common_overrides(args, task)])
             for seed in args.seeds for arm in args.arms]
    bar = tqdm(total=len(jobs) + 1, desc="study", dynamic_ncols=True)
    t0 = time.time()
    for name, overrides in jobs:
        bar.set_postfix_str(name)
        run_train(runs / name, overrides, args.nproc, args.port)
        bar.update(1)
        if name == "initial":  # the demo models now exist: the teacher evaluated as its own student
            bar.set_postfix_str("teacher")
            run_train(runs / "teacher", [*task, "model.source=path", f"model.path={teacher_dir}",
                                         f"teacher.path={teacher_dir}", "loss.kind=gjsd", "train.max_steps=0",
                                         "eval.at_start=true", *QUIET], args.nproc, args.port)
            bar.update(1)
    bar.close()
    print(f"study: {len(jobs) + 1} runs done in {time.time() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=None, choices=list(ARMS),
                   help="default: every arm of the task (XTOK_ARMS for --task xtok, the others otherwise)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-tokens", type=int, default=2048, help="teacher-scored tokens per run")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--student-layers", type=int, default=24, help="layers of the pruned demo student (of 30)")
    p.add_argument("--task", choices=["open", "short", "xtok"], default="open",
                   help="open: the shipped prompts; short: only the checkable ones (a few answer tokens); xtok: a "
                        "student with another tokenizer (the uld_mix / gold_mix arms)")
    p.add_argument("--eval-every", type=int, default=4, help="steps between held-out evals")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun --nproc_per_node)")
    p.add_argument("--port", type=int, default=29631)
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--plot-only", action="store_true", help="only collect finished runs and render the results")
    args = p.parse_args(argv)
    if args.arms is None:
        args.arms = [a for a in ARMS if (a in XTOK_ARMS) == (args.task == "xtok")]
    if (args.task == "xtok") != all(a in XTOK_ARMS for a in args.arms):
        p.error(f"the arms {list(XTOK_ARMS)} go with --task xtok, and only they")
    metrics = XTOK_METRICS if args.task == "xtok" else METRICS
    out = Path(args.out)
    runs = out / "study_runs"
    runs.mkdir(parents=True, exist_ok=True)

    if not args.plot_only:
        run_grid(args, runs)

    rows, refs = collect(out, args.arms, args.seeds, metrics)
    if not rows:
        print(f"study: no finished runs under {runs}", file=sys.stderr)
        return 1
    write_csv(rows, out / "study.csv")
    table = final_table(rows, refs, args.arms, metrics)
    (out / "study_summary.md").write_text(
        f"Final held-out metrics after {args.max_tokens} teacher-scored tokens per run (mean ± std over seeds "
        f"{args.seeds}); `python examples/study.py`.\n\n" + table)
    plot(rows, refs, args.arms, out / "study.png", args.student_layers, metrics)
    print(table)
    print(f"study: wrote {out / 'study.csv'}, {out / 'study_summary.md'}, {out / 'study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
