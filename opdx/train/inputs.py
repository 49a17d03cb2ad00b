"""Each step's micro-batches: the sampler's prompts, the source draw, and their sequences.

Without ``rollout.overlap`` a micro-batch's sequences are made when the loop reaches it. With it, the student's
rollouts of step k+1 are sampled in a background thread while step k trains:

    take(k)          the micro-batches of step k (sampled during step k-1; at the first step, here), then step
                     k+1's draws and its student rollouts handed to the background thread
    after_update(k)  wait for step k+1's rollouts, then give the rollout engine the weights of step k

so step k+1 trains on samples of the policy after step k-1 — one step of policy lag, which the importance ratio
of the opd objective corrects (each sample keeps the sampler's logprobs; ``is_ratio`` shows the lag). Only student
rollouts go to the background (and, with a teacher server, their teacher scoring); teacher-generated and dataset
micro-batches are made when their step runs. The rollout engine is never used by two threads at once: the eval
and the weight sync run while no background work is in flight. The main thread draws no random numbers while a
rollout is in flight (sampling seeds are explicit per step, micro-batch and rank).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opdx.train.distributed import rank
from opdx.train.objectives import teacher_signal
from opdx.train.sources import Sequences, draw_source_synced, make_sequences, step_seed

if TYPE_CHECKING:
    from opdx.train.build import Trainer


@dataclass
class MicroBatch:
    micro: int
    idx: list[int]  # the training prompts (sampler order)
    source: str  # student | teacher | dataset (one draw on rank 0, broadcast)
    seed: int  # the rollout's sampling seed
    seqs: Sequences | None = None  # made ahead (rollout.overlap)
    signal: Any = None  # the teacher's signal, when scored ahead (rollout.overlap with a teacher server)


@dataclass
class Planned:
    step: int
    micro_batches: list[MicroBatch]
    sampler_state: dict  # the sampler before this step's draws: what a checkpoint of the step before saves
    done: Future | None = None


class StepInputs:
    def __init__(self, t: Trainer, background_rollout=None):
        """``background_rollout``: the engine the background thread samples with (rollout.overlap; None = make
        everything when its step runs). HF: a frozen copy of the student; vLLM: the rollout engine itself."""
        self.t = t
        self.rollout = background_rollout
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="opdx-rollout") if background_rollout else None
        self.score_ahead = bool(t.cfg.teacher.servers())
        self.ahead: Planned | None = None

    def plan(self, step: int) -> Planned:
        cfg, state = self.t.cfg, self.t.sampler.state_dict()
        mbs = []
        for micro in range(cfg.train.grad_accum):
            idx = self.t.sampler.next_batch()  # same order on resume
            source = draw_source_synced(cfg, step, micro)  # one draw, broadcast from rank 0
            mbs.append(MicroBatch(micro, idx, source, step_seed(cfg.train.seed, step, micro, rank())))
        return Planned(step, mbs, state)

    def take(self, step: int) -> list[MicroBatch]:
        """Step ``step``'s micro-batches (with rollout.overlap: step+1's rollouts start in the background)."""
        if self.ahead is not None and self.ahead.step == step:
            planned, self.ahead = self.ahead, None
        else:  # no overlap, the first step, or the first after a resume
            planned = self.plan(step)
            if self.pool is not None:  # before the background thread starts: never two threads in one engine
                self._make_ahead(planned.micro_batches, self.t.train_rollout)
        if self.pool is not None and step < self.t.cfg.train.max_steps:
            self.ahead = self.plan(step + 1)
            self.ahead.done = self.pool.submit(self._make_ahead, self.ahead.micro_batches, self.rollout)
        return planned.micro_batches

    def _make_ahead(self, mbs: list[MicroBatch], engine) -> None:
        t = self.t
        for mb in mbs:
            if mb.source == "student":
                mb.seqs = make_sequences(t, mb.idx, mb.source, mb.seed, rollout=engine)
                if self.score_ahead:
                    mb.signal = teacher_signal(t.teacher, mb.seqs.batch, t.objective.signal_spec(), t.vocab)

    def sequences(self, mb: MicroBatch) -> Sequences:
        return mb.seqs if mb.seqs is not None else make_sequences(self.t, mb.idx, mb.source, mb.seed)

    def after_update(self, step: int) -> float:
        """Waits for the next step's background rollouts (returns the seconds waited), then syncs the rollout
        engine's weights (vLLM; with overlap the frozen HF copy too)."""
        started = time.perf_counter()
        if self.ahead is not None:  # only ever set with its background job (rollout.overlap)
            self.ahead.done.result()  # a failure in the background is raised here
        waited = time.perf_counter() - started
        self.t.rollout.sync_weights(self.t.engine)  # vLLM engines load the new student weights (HF: nothing)
        if self.rollout is not None and self.rollout is not self.t.rollout:
            self.rollout.sync_weights(self.t.engine)
        return waited

    def sampler_state(self) -> dict:
        """The sampler position a checkpoint saves: before the draws of any step not trained yet."""
        return self.ahead.sampler_state if self.ahead is not None else self.t.sampler.state_dict()

    def close(self) -> None:
        """Waits for background work (a step drawn past train.max_tokens is dropped) and stops the thread."""
        if self.pool is not None:
            if self.ahead is not None:
                self.ahead.done.exception()
            self.pool.shutdown(wait=True)


def make_inputs(t: Trainer) -> StepInputs:
    """rollout.overlap: HF samples a frozen copy of the student in the background, vLLM its own engine."""
    if not t.cfg.rollout.overlap:
        return StepInputs(t)
    if t.cfg.rollout.engine != "hf":
        return StepInputs(t, t.rollout)
    from opdx.rollout import make_rollout

    d = t.data
    return StepInputs(t, make_rollout(t.cfg, t.engine.module, d.tokenizer, eos_ids=d.eos_ids, pad_id=d.pad_id,
                                      vocab_size=t.vocab, frozen_copy=True))
