"""What a run writes as it goes: metrics.jsonl (+ TensorBoard), the per-rank source draws, the tqdm bar, the
phase timer, and summary.json at the end."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from opdx.config import Config
from opdx.report.completions import event_markdown
from opdx.train.distributed import rank


def clock(device) -> float:
    """time.time() once the device's queued work is done: without the sync, on CUDA a phase's kernels would be
    timed in whichever later phase first waits on them (the per-phase times in metrics.jsonl)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


@contextlib.contextmanager
def timed(name: str, times: dict, device=None):
    """``with timed("rollout", times, device):`` adds the block's seconds to ``times[name]``."""
    start = clock(device)
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + clock(device) - start


def _restart_jsonl(path: Path, start_step: int) -> None:
    """A fresh run empties ``path``; a resumed one drops what the killed run logged after the checkpoint."""
    if start_step > 0 and path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        path.write_text("".join(ln + "\n" for ln in keep))
    elif start_step == 0:
        path.write_text("")


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Logger:
    """Rank 0 appends one JSON record per line to output_dir/metrics.jsonl (and the numbers to TensorBoard), and
    the logged completions of an eval to output_dir/completions.jsonl (and as markdown to TensorBoard's text tab)."""

    def __init__(self, cfg: Config, start_step: int):
        self.rank0 = rank() == 0
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.completions_path = self.path.with_name("completions.jsonl")
        self.tb = None
        if not self.rank0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _restart_jsonl(self.path, start_step)
        _restart_jsonl(self.completions_path, start_step)
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.train.output_dir) / "tb"), purge_step=start_step + 1)
            except ImportError:  # pragma: no cover
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.rank0:
            return
        _append_jsonl(self.path, record)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def log_completions(self, event: dict) -> None:
        """One completions.jsonl event (opdx.train.evaluate.completions_event), rendered for TensorBoard by
        opdx.report.completions."""
        if not self.rank0:
            return
        _append_jsonl(self.completions_path, event)
        if self.tb is not None:
            self.tb.add_text("completions", event_markdown(event), event["step"])
            self.tb.flush()

    def rows(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def close(self):
        if self.tb is not None:
            self.tb.close()


class SourcesLog:
    """log.per_rank_sources: every rank writes its copy of each micro-batch's source draw
    (output_dir/sources_rank{r}.jsonl), so a test can check that all ranks agree."""

    def __init__(self, cfg: Config, start_step: int):
        self.file = None
        if cfg.log.per_rank_sources:
            path = Path(cfg.train.output_dir) / f"sources_rank{rank()}.jsonl"
            self.file = open(path, "a" if start_step else "w")

    def write(self, step: int, micro: int, source: str) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, "micro": micro, "source": source}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class Progress:
    """The tqdm bar on rank 0 (log.progress); nothing elsewhere."""

    def __init__(self, cfg: Config, start_step: int):
        self.bar = None
        if rank() == 0 and cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="opdx", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            kl = {"rkl": f"{record['reverse_kl']:.4f}"} if "reverse_kl" in record else {}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", **kl, tok_s=f"{record['tokens_per_s']:.0f}",
                                 refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_summary(cfg: Config, logger: Logger, last: dict, *, start_step: int, teacher_tokens: int,
                  wall_s: float, setup_s: float) -> dict:
    """Rank 0: output_dir/summary.json (eval reverse KL start/end, final loss), the learning-curve report
    (opdx.report, log.plot) and the one-line summary on stdout. Other ranks return {}."""
    if rank() != 0:
        return {}
    out_dir = Path(cfg.train.output_dir)
    rows = logger.rows()
    ev = [r for r in rows if "eval_reverse_kl" in r]
    summary = {"steps": last.get("step", start_step), "teacher_tokens": teacher_tokens, "wall_s": round(wall_s, 1),
               "setup_s": round(setup_s, 1)}
    if ev:
        first, lastev = ev[0]["eval_reverse_kl"], ev[-1]["eval_reverse_kl"]
        summary.update(eval_reverse_kl_start=first, eval_reverse_kl_end=lastev,
                       eval_reverse_kl_ratio=lastev / first if first else float("nan"))
    if last:
        summary.update(final_loss=last["loss"])
        kl = [r["reverse_kl"] for r in rows if "reverse_kl" in r]
        if kl:
            summary["final_reverse_kl"] = kl[-1]
    if cfg.log.plot:
        try:
            from opdx.report import write_report

            summary["plot"] = str(write_report(out_dir, summary=summary)["plot"])
        except Exception as exc:  # plotting must never fail a finished run
            summary["plot_error"] = str(exc)
    if cfg.save.final:
        summary["final_model"] = str(out_dir / "final")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("opdx.train summary: " + json.dumps(summary), flush=True)
    return summary
