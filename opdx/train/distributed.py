"""Rank, world size and the few collectives the trainer uses, over raw torch.distributed (a no-op without a
process group, so the pieces also run in a single test process)."""

from __future__ import annotations

import os
import socket
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_process_env() -> None:
    """`python -m opdx.train` without torchrun: a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op)
    return t.cpu()


def all_reduce_sum(values: list[float]) -> list[float]:
    return _all_reduce(torch.tensor(values, dtype=torch.float64), dist.ReduceOp.SUM).tolist()


def all_reduce_max(value: int) -> int:
    return int(_all_reduce(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MAX)[0])


def destroy() -> None:
    """Tear the process group down before interpreter exit: a communicator thread still alive during static
    destruction aborts the process ("terminate called without an active exception") after a finished run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
