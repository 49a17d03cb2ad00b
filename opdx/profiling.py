"""Small measurement helpers shared by tests, benchmarks and the trainer: peak memory growth of a call."""

from __future__ import annotations

import gc
import os
from typing import Callable

import torch


def _read_rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak resident set size) to the current RSS
        return True
    except OSError:
        return False


def peak_memory_growth(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, int]:
    """Runs fn() and returns (its result, peak memory growth in bytes during the call).

    CPU: growth of the process's peak resident set size (Linux VmHWM, reset before the call).
    CUDA: torch.cuda.max_memory_allocated() growth over what was allocated before the call.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS counter (/proc/self/clear_refs); Linux is required")
    before = _read_rss_kib("VmRSS")
    out = fn()
    peak = _read_rss_kib("VmHWM")
    return out, max(0, peak - before) * 1024


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
