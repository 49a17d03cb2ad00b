"""Tensor-parallel colocated vLLM rollouts (``rollout.tensor_parallel_size`` = tp > 1).

Consecutive training ranks form a TP group (ranks g·tp .. g·tp + tp − 1; vLLM's external launcher makes the same
split: its data-parallel rank is RANK // tp). The engines of one group shard one model and must be given the same
requests, so each rank's prompts are gathered across its group in rank order, every prompt keeps its own rank's
sampling seed, the group generates them all, and each rank keeps its own rows. Weight sync needs nothing special:
every rank hands its engine the full (gathered) student weights and vLLM's weight loaders keep their shard.
"""

from __future__ import annotations

import torch.distributed as dist

from opdx.errors import ConfigError


def tp_groups(world: int, tp: int) -> list[list[int]]:
    """The TP groups of a ``world``-rank job: consecutive blocks of ``tp`` ranks."""
    if tp < 1 or world % tp:
        raise ConfigError(f"rollout.tensor_parallel_size={tp} must divide the number of training ranks ({world})")
    return [list(range(g * tp, (g + 1) * tp)) for g in range(world // tp)]


class TensorParallelGroup:
    """This rank's TP group (collective to build: every rank of the job constructs it, in the same order)."""

    def __init__(self, tp: int):
        me = dist.get_rank()
        for ranks in tp_groups(dist.get_world_size(), tp):  # new_group is collective over the whole job
            handle = dist.new_group(ranks)
            if me in ranks:
                self.ranks, self.group = ranks, handle
        self.index = self.ranks.index(me)  # this rank's position in its group

    def gather(self, prompts: list, seed: int) -> list[tuple[list, int]]:
        """[(prompts, seed)] of every rank of the group, in rank order."""
        out = [None] * len(self.ranks)
        dist.all_gather_object(out, (list(prompts), int(seed)), group=self.group)
        return out


def own_rows(rows: list, parts: list[tuple[list, int]], index: int) -> list:
    """The rows of ``rows`` (the group's outputs, in the order of ``parts``) that belong to rank ``index``."""
    start = sum(len(p) for p, _ in parts[:index])
    return rows[start:start + len(parts[index][0])]
