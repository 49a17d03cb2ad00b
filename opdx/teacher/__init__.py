"""Teachers: score student/teacher/dataset sequences with exactly what the loss needs.

`LocalTeacher` (in process, frozen, optionally a DeepSpeed ZeRO-3 inference engine) implements:

    score(batch, kind, *, vocab_size, temperature, topk) -> TeacherSignal
    generate(prompts, *, seed) -> RolloutBatch        (sequence-level KD, `loss.seq_kd`)

A server teacher (OpenAI-style logprobs) can implement the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TeacherSignal:
    token_logprobs: torch.Tensor | None = None  # [B, L-1] fp32 at the batch targets (0 where masked)
    logits: torch.Tensor | None = None  # [N, V] at the valid (loss_mask) positions, row-major over (b, t)
    topk_ids: torch.Tensor | None = None  # [N, K]
    topk_logprobs: torch.Tensor | None = None  # [N, K]
    lse: torch.Tensor | None = None  # [N] full-vocab logsumexp of the teacher logits / T (topk tail)
    # gjsd with loss.fused_linear: the teacher's final hidden states at the valid positions and its lm_head rows
    # [:vocab] (the student applies opdx.ops.linear_generalized_jsd_mean; [N, V] teacher logits are never formed)
    hidden: torch.Tensor | None = None  # [N, d_t]
    head_weight: torch.Tensor | None = None  # [V, d_t]
    head_bias: torch.Tensor | None = None  # [V] or None


__all__ = ["TeacherSignal"]
