"""Shared benchmark plumbing: timing, bandwidth, peak memory, and result files benchmarks/results/<device>-<op>.json.

Each benchmark case calls `measure(...)` for every implementation it compares (opdx, eager, torch.compile, Liger…)
and `record(...)` stores one row per implementation; `python benchmarks/report.py` renders all result files into
benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from typing import Callable

import torch

from opdx.profiling import peak_memory_growth

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{torch.get_num_threads()}t-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time in seconds (CUDA: events around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


_COPY_BW: dict[str, float] = {}


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    if device not in _COPY_BW:
        n = nbytes // 4 if device.startswith("cuda") else (1 << 28) // 4
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        t = time_call(lambda: dst.copy_(src), device, warmup=3, reps=10)
        _COPY_BW[device] = 2 * src.numel() * 4 / t
    return _COPY_BW[device]


def measure(fn: Callable[[], object], device: str, bytes_moved: int | None = None, reps: int = 5) -> dict:
    """Time and peak memory growth of fn(); GB/s and % of copy bandwidth when bytes_moved is given."""
    t = time_call(fn, device, reps=reps)
    _, peak = peak_memory_growth(fn, device if device.startswith("cuda") else "cpu")
    row = {"time_ms": t * 1e3, "peak_mem_mb": peak / 2**20}
    if bytes_moved:
        row["gb_per_s"] = bytes_moved / t / 1e9
        row["pct_copy_bw"] = 100.0 * (bytes_moved / t) / copy_bandwidth(device)
    return row


def record(op: str, device: str, case: dict, impl: str, row: dict) -> None:
    """Appends/replaces one result row in benchmarks/results/<device>-<op>.json."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    dev = device_name(device)
    path = os.path.join(RESULTS_DIR, f"{dev}-{op}.json")
    data = {"device": dev, "op": op, "torch": torch.__version__, "rows": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    key = {"case": case, "impl": impl}
    data["rows"] = [r for r in data["rows"] if {"case": r["case"], "impl": r["impl"]} != key]
    data["rows"].append({**key, **row, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")})
    data["torch"] = torch.__version__
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
