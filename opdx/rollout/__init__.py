"""Rollout engines: turn a batch of prompt ids into completions.

The interface is deliberately small so a vLLM engine (colocated or server) drops in next to `HFRollout`:

    engine.generate(prompts: list[list[int]], *, seed: int, max_new_tokens=None, temperature=None)
        -> RolloutBatch
    engine.sync_weights(train_engine)   # after each optimizer step; no-op when generating from the live module

`RolloutBatch.sequences` is ``[B, P + T]``: prompts LEFT-padded to a common width P, completions right-padded to
T. ``completion_mask`` ``[B, T]`` marks the generated tokens (through the first EOS, even when pad == eos);
`RolloutBatch.completions()` returns them as lists for `opdx.data.build_batch`.
"""

from __future__ import annotations

from typing import Protocol

from opdx.rollout.batch import RolloutBatch


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], *, seed: int, max_new_tokens: int | None = None,
                 temperature: float | None = None) -> RolloutBatch: ...

    def sync_weights(self, engine) -> None: ...


def make_rollout(cfg, model, tokenizer, *, eos_ids, pad_id, synced_gpus: bool = False, vocab_size=None,
                 student_dir: str | None = None, frozen_copy: bool = False):
    """The rollout engine `cfg.rollout` asks for: `HFRollout` on the live student module (``frozen_copy``: on a
    copy of it, `FrozenCopyRollout`), or a vLLM engine (`VLLMColocateRollout` loading ``student_dir``,
    `VLLMServerRollout` talking to ``rollout.server_url``)."""
    r = cfg.rollout
    if r.engine == "hf":
        from opdx.rollout.hf import FrozenCopyRollout, HFRollout

        engine = FrozenCopyRollout if frozen_copy else HFRollout
        return engine(model, eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=r.max_new_tokens,
                      temperature=r.temperature, top_p=r.top_p, synced_gpus=synced_gpus, vocab_size=vocab_size,
                      min_new_tokens=r.min_new_tokens)
    if r.engine == "vllm":
        from opdx.rollout.vllm import VLLMColocateRollout, VLLMServerRollout

        if r.mode == "colocate":
            if not student_dir:
                raise ValueError("rollout.engine=vllm rollout.mode=colocate needs the student directory to load")
            return VLLMColocateRollout(
                student_dir, eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=r.max_new_tokens,
                temperature=r.temperature, top_p=r.top_p, dtype=cfg.model.dtype,
                gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
                sleep=r.sleep, max_model_len=r.max_model_len or None, seed=cfg.train.seed, vocab_size=vocab_size,
                sync_dir=r.sync_dir, min_new_tokens=r.min_new_tokens)
        if r.mode == "server":
            return VLLMServerRollout(r.server_url, eos_ids=eos_ids, pad_id=pad_id, sync_dir=r.sync_dir,
                                     max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                     timeout=r.timeout, max_retries=r.max_retries, max_concurrency=r.max_concurrency,
                                     min_new_tokens=r.min_new_tokens)
        raise ValueError(f"unknown rollout.mode {r.mode!r}")
    raise ValueError(f"unknown rollout.engine {r.engine!r}")


__all__ = ["RolloutBatch", "RolloutEngine", "make_rollout"]
