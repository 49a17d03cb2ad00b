"""Where a micro-batch's sequences come from (GKD's mix): the student's own rollouts with probability loss.lmbda,
else the teacher's generations (loss.seq_kd; read from data.train when it was written by opdx.generate) or the
dataset's responses. Rank 0 draws, every rank follows."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opdx.config import Config
from opdx.data import Batch, build_batch
from opdx.train.distributed import broadcast_object, rank

if TYPE_CHECKING:
    from opdx.rollout import RolloutBatch
    from opdx.train.build import Trainer

SOURCES = ("student", "teacher", "dataset")


def draw_source(lmbda: float, seq_kd: bool, seed: int, step: int, micro: int) -> str:
    """GKD's per-batch source: the student generates with probability lmbda, else the teacher (seq_kd) or the
    dataset response. Deterministic in (seed, step, micro), so a resumed run repeats it."""
    u = random.Random(f"opdx-source-{seed}-{step}-{micro}").random()
    return "student" if u < lmbda else ("teacher" if seq_kd else "dataset")


def draw_source_synced(cfg: Config, step: int, micro: int) -> str:
    """The draw is made on rank 0 and broadcast so every rank agrees."""
    src = draw_source(cfg.loss.lmbda, cfg.loss.seq_kd, cfg.train.seed, step, micro) if rank() == 0 else None
    return broadcast_object(src)


def step_seed(seed: int, step: int, micro: int, rank: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank * 7 + salt * 7_919_000_011) % (2**63 - 1)


@dataclass
class Sequences:
    """One micro-batch of training sequences: the model inputs, where they came from and, for a student rollout,
    the rollout itself (its ``sampling_logprobs`` are the rollout engine's per-token logprobs, vLLM)."""

    source: str
    batch: Batch
    rollout: RolloutBatch | None = None


def make_sequences(t: Trainer, idx: list[int], source: str, seed: int, rollout=None) -> Sequences:
    """prompts ``idx`` of the training set + completions from ``source`` (a student rollout: sampled by
    ``rollout``, default the trainer's)."""
    prompts = [t.data.train_prompts[i] for i in idx]
    rb = None
    if source == "student":
        rb = (rollout or t.train_rollout).generate(prompts, seed=seed)
        completions = rb.completions()
    elif source == "teacher" and not t.data.pre_sampled:
        r = t.cfg.rollout
        completions = t.teacher.generate(prompts, seed=seed, max_new_tokens=r.max_new_tokens,
                                         temperature=r.temperature, top_p=r.top_p, eos_ids=t.data.eos_ids,
                                         pad_id=t.data.pad_id, synced_gpus=False, vocab_size=t.vocab).completions()
    else:  # the dataset's responses (pre-sampled by opdx.generate: the teacher's own samples)
        completions = [t.data.train_responses[i] for i in idx]
    return Sequences(source, build_batch(prompts, completions, t.data.pad_id).to(t.device), rb)
