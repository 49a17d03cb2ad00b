"""`RolloutBatch`, what every rollout engine returns, and its assembly from per-row token lists."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    sequences: torch.Tensor  # [B, P + T] left-padded prompts + right-padded completions
    prompt_lens: list  # true prompt lengths
    completion_mask: torch.Tensor  # [B, T] bool, generated tokens
    # [B, T] the sampler's raw logprobs of the sampled tokens (temperature 1, all lm_head rows: what the trainer's
    # forward computes, whatever the sampling temperature / top-p), 0 past the completion, or None
    sampling_logprobs: torch.Tensor | None
    finish_reasons: list  # "stop" (EOS generated) | "length" (max_new_tokens reached)
    prompt_width: int = 0  # P
    topk: list | None = None  # per row (ids [T, K], logprobs [T, K]) of the sampler's raw top-k, when asked for

    def completions(self) -> list[list[int]]:
        comp = self.sequences[:, self.prompt_width:]
        lens = self.completion_mask.sum(1).tolist()
        return [comp[i, :n].tolist() for i, n in enumerate(lens)]


def batch_from_completions(prompts, completions, logprobs, finish, *, pad_id: int, eos_ids) -> RolloutBatch:
    """RolloutBatch from per-row completion token lists (already cut at the first EOS by the engine) and the
    sampler's logprobs of those tokens (None: no sampling logprobs)."""
    width = max(len(p) for p in prompts)
    lens = []
    for i, c in enumerate(completions):
        cut = next((j + 1 for j, t in enumerate(c) if t in eos_ids), len(c))  # through the first EOS
        if cut != len(c):
            raise RuntimeError(f"completion {i} continues after EOS at position {cut - 1}: {c}")
        lens.append(len(c))
    t = max(1, max(lens))
    seqs = torch.full((len(prompts), width + t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.bool)
    logps = torch.zeros((len(prompts), t), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seqs[i, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        if c:
            seqs[i, width:width + len(c)] = torch.tensor(c, dtype=torch.long)
            if logprobs is not None:
                logps[i, :len(c)] = torch.tensor(logprobs[i], dtype=torch.float32)
        mask[i, :len(c)] = True
    return RolloutBatch(seqs, [len(p) for p in prompts], mask, None if logprobs is None else logps, list(finish),
                        width)


def check_finish_reason(reason, i) -> str:
    if reason not in ("stop", "length"):
        raise RuntimeError(f"request {i} finished with {reason!r} (expected 'stop' or 'length')")
    return reason


__all__ = ["RolloutBatch", "batch_from_completions", "check_finish_reason"]
