"""The step loop of `torchrun -m opdx.train`: set-up in `build` (opdx.train.build), then per step

    prompts -> source draw (rank 0, broadcast) -> sequences -> teacher signal -> objective -> backward/step
            -> sync rollout weights -> log / eval / checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from opdx.config import Config, ConfigError, load_config
from opdx.report.metrics import kl_rise_warning
from opdx.teacher.pool import counters_metrics
from opdx.train.build import Trainer, build
from opdx.train.checkpoint import save_checkpoint, save_final
from opdx.train.distributed import all_reduce_sum, barrier, destroy, rank, single_process_env, world
from opdx.train.evaluate import eval_record
from opdx.train.harness import lm_eval_due, run_lm_eval
from opdx.train.inputs import make_inputs
from opdx.train.logging import Logger, Progress, SourcesLog, clock, timed, write_summary
from opdx.train.objectives import rollout_mismatch_sums, teacher_signal

DESCRIPTION = "The on-policy distillation trainer."


@dataclass
class StepSums:
    """What one optimizer step adds up over its micro-batches (then over the ranks)."""

    loss: float = 0.0
    k1: float = 0.0  # k1 / k3 reverse-KL sums over the student's own samples (kl_tokens of them)
    k3: float = 0.0
    kl_tokens: float = 0.0
    teacher_logratio: float = 0.0  # sum of log π_T − log π_S over tokens the student did not sample
    offpolicy_tokens: float = 0.0
    tokens: float = 0.0  # every teacher-scored token
    response_tokens: float = 0.0
    sequences: float = 0.0
    mismatch: float = 0.0  # sum of |Δlogp| between the rollout engine's and the trainer's logprobs
    mismatch_tokens: float = 0.0
    is_ratio: float = 0.0  # opd: token sums of the importance ratio and of the clipped indicator
    is_clip: float = 0.0

    def add(self, loss, stats, batch, source: str) -> None:
        """k1 / k3 estimate KL(student || teacher) only on the student's own samples: on teacher or dataset
        sequences the same sum is minus a log-ratio, kept apart as ``teacher_logratio``."""
        self.loss += float(loss.detach())
        self.tokens += stats.n
        if source == "student":
            self.k1, self.k3, self.kl_tokens = self.k1 + stats.k1_sum, self.k3 + stats.k3_sum, self.kl_tokens + stats.n
        else:
            self.teacher_logratio, self.offpolicy_tokens = self.teacher_logratio - stats.k1_sum, \
                self.offpolicy_tokens + stats.n
        self.is_ratio, self.is_clip = self.is_ratio + stats.is_ratio_sum, self.is_clip + stats.is_clip_sum
        self.response_tokens += sum(batch.completion_lens)
        self.sequences += len(batch.completion_lens)

    def all_reduce(self) -> StepSums:
        return StepSums(*all_reduce_sum(list(vars(self).values())))


@contextlib.contextmanager
def timed_update(optimizer, times: dict, device):
    """Adds the seconds ``optimizer.step`` (the AdamW update itself, without DeepSpeed's clipping and wrappers)
    takes within the block to ``times["optimizer"]``, through torch's step pre/post hooks (ZeRO-3 may step the
    optimizer once per parameter sub-group)."""
    started = []
    hooks = (optimizer.register_step_pre_hook(lambda *_: started.append(clock(device))),
             optimizer.register_step_post_hook(lambda *_: times.__setitem__(
                 "optimizer", times.get("optimizer", 0.0) + clock(device) - started.pop())))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def train_step(t: Trainer, step: int, sources_log: SourcesLog) -> dict:
    """One optimizer step over train.grad_accum micro-batches; returns its metrics record."""
    cfg, times, sums, sources = t.cfg, {}, StepSums(), []
    with timed("step", times, t.device):
        with timed("rollout", times, t.device):  # prompts + source draws (rollout.overlap: step+1's rollouts start)
            micro_batches = t.inputs.take(step)
        for mb in micro_batches:
            sources.append(mb.source)
            sources_log.write(step, mb.micro, mb.source)
            with timed("rollout", times, t.device):
                seqs = t.inputs.sequences(mb)
            with timed("teacher", times, t.device):
                signal = mb.signal if mb.signal is not None else \
                    teacher_signal(t.teacher, seqs.batch, t.objective.signal_spec(), t.vocab)
            with timed("loss", times, t.device):
                mismatch = cfg.rollout.engine == "vllm" and seqs.rollout is not None \
                    and seqs.rollout.sampling_logprobs is not None
                loss, stats = t.objective.compute(t.engine, seqs.batch, signal, mb.source, rollout=seqs.rollout,
                                                  raw_logp=mismatch)
                if mismatch:
                    s, c = rollout_mismatch_sums(seqs.rollout, stats)
                    sums.mismatch, sums.mismatch_tokens = sums.mismatch + s, sums.mismatch_tokens + c
            with timed("backward", times, t.device):  # autograd + ZeRO's gradient reduction hooks
                t.engine.backward(loss)
            with timed("engine_step", times, t.device), timed_update(t.engine.basic_optimizer, times, t.device):
                t.engine.step()  # clipping, the AdamW update (times["optimizer"]), the lr scheduler
            sums.add(loss, stats, seqs.batch, mb.source)
        with timed("sync", times, t.device):  # rollout.overlap: the wait for step+1's rollouts, then the sync
            times["rollout_wait"] = t.inputs.after_update(step)
        sums = sums.all_reduce()
    t.teacher_tokens += int(sums.tokens)
    return step_record(t, step, sums, times, sources)


def step_record(t: Trainer, step: int, sums: StepSums, times: dict, sources: list[str]) -> dict:
    """The metrics.jsonl record of a training step (the keys opdx.report and the tests read)."""
    ntok, dt = sums.tokens, times["step"]
    record = {
        "step": step,
        "loss": sums.loss / (world() * t.cfg.train.grad_accum),
        "lr": t.engine.get_lr()[0],
        "tokens": int(ntok),
        "teacher_tokens": t.teacher_tokens,
        "tokens_per_s": ntok / max(dt, 1e-9),
        "time_step_s": dt,
        **{f"time_{k}_s": times.get(k, 0.0) for k in ("teacher", "loss", "backward", "optimizer")},
        # the main thread's rollout seconds (rollout.overlap: its wait for the background thread's)
        "time_rollout_s": times.get("rollout", 0.0) + times["rollout_wait"],
        # engine.step outside the AdamW update: gradient norm + clipping, ZeRO/bf16 master-weight copies, scheduler
        "time_clip_s": times.get("engine_step", 0.0) - times.get("optimizer", 0.0),
        "time_train_s": times.get("loss", 0.0) + times.get("backward", 0.0) + times.get("engine_step", 0.0),
        "time_sync_s": times["sync"] - times["rollout_wait"],
        "response_len": sums.response_tokens / max(sums.sequences, 1),
        "source": sources[0] if len(set(sources)) == 1 else ",".join(sources),
    }
    if sums.kl_tokens:  # steps with student samples
        record.update(reverse_kl=sums.k1 / sums.kl_tokens, reverse_kl_k3=sums.k3 / sums.kl_tokens)
    if sums.offpolicy_tokens:  # teacher / dataset sequences: mean log π_T − log π_S (KL(T || S) on teacher samples)
        record["teacher_logratio"] = sums.teacher_logratio / sums.offpolicy_tokens
    if t.cfg.loss.kind == "opd" and not t.cfg.loss.normalize_reward:  # importance sampling (opd_is_loss)
        record["is_ratio"] = sums.is_ratio / max(ntok, 1)
        record["is_clip_frac"] = sums.is_clip / max(ntok, 1)
    if sums.mismatch_tokens:  # mean |Δlogp| between vLLM's sampling logprobs and the trainer's (temperature-1) own
        record["rollout_logprob_mismatch"] = sums.mismatch / sums.mismatch_tokens
    pool = getattr(t.teacher, "pool", None)
    if pool is not None:  # server teacher: per-server requests, latency, failures (summed over ranks), servers up
        record.update(counters_metrics(all_reduce_sum(pool.take_counters())))
    return record


def evaluate_and_log(t: Trainer, logger: Logger, step: int) -> None:
    """One held-out evaluation: its metrics record (with eval.lm_eval's results when due), its completions log
    (log.completions), and the warning when the held-out reverse KL has risen at two evals in a row."""
    record, completions = eval_record(t, step)
    if lm_eval_due(t.cfg, step):  # eval.lm_eval: the harness on the live student (rank 0)
        record.update(run_lm_eval(t.cfg, t.engine, t.data.tokenizer))
    logger.log(record)
    if completions is not None:
        logger.log_completions(completions)
    if rank() == 0:
        history = [r["eval_reverse_kl"] for r in logger.rows() if "eval_reverse_kl" in r]
        rise = kl_rise_warning(history, at_end=True)
        if rise:
            print(f"opdx.train: warning at step {step}: {rise}", file=sys.stderr, flush=True)


def after_step(t: Trainer, logger: Logger, step: int) -> bool:
    """The eval and the checkpoint due after ``step``; True when train.max_tokens is spent (the same number of
    teacher-scored tokens for every run of a study)."""
    cfg = t.cfg
    budget_spent = bool(cfg.train.max_tokens) and t.teacher_tokens >= cfg.train.max_tokens
    if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.max_steps or budget_spent:
        evaluate_and_log(t, logger, step)
    if cfg.save.every and step % cfg.save.every == 0:
        save_checkpoint(cfg, t.engine, step, t.inputs.sampler_state(), t.teacher_tokens)
    if budget_spent and rank() == 0:
        print(f"opdx.train: train.max_tokens={cfg.train.max_tokens} reached at step {step} "
              f"({t.teacher_tokens} teacher-scored tokens)", flush=True)
    return budget_spent


def run(cfg: Config) -> dict:
    t_start = time.time()
    t = build(cfg)
    t.inputs = make_inputs(t)  # each step's micro-batches (rollout.overlap: sampled a step ahead)
    out_dir = Path(cfg.train.output_dir)
    logger = Logger(cfg, t.start_step)
    if rank() == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    sources_log, bar = SourcesLog(cfg, t.start_step), Progress(cfg, t.start_step)
    if t.start_step == 0 and cfg.eval.at_start:
        evaluate_and_log(t, logger, 0)
    setup_s = time.time() - t_start
    last = {}
    try:
        for step in range(t.start_step + 1, cfg.train.max_steps + 1):
            last = train_step(t, step, sources_log)
            logger.log(last)
            bar.update(last)
            if after_step(t, logger, step):  # train.max_tokens spent
                break
    finally:
        t.inputs.close()  # rollout.overlap: the background thread's work in flight
    bar.close()
    sources_log.close()
    if cfg.save.final:
        save_final(cfg, t.engine, t.data.tokenizer, out_dir / "final")
    logger.close()
    summary = write_summary(cfg, logger, last, start_step=t.start_step, teacher_tokens=t.teacher_tokens,
                            wall_s=time.time() - t_start, setup_s=setup_s)
    barrier()
    return summary


def parse_args(argv):
    p = argparse.ArgumentParser(prog="opdx.train", description=DESCRIPTION)
    p.add_argument("--config", default=None, help="YAML config (defaults: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.kind=gjsd loss.beta=0.5")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    single_process_env()
    try:
        run(load_config(args.config, args.overrides))
    except ConfigError as exc:
        if rank() == 0:
            print(f"opdx.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    destroy()
    return 0
