"""Teacher pre-sampling throughput: generated tokens/s of `opdx.generate` with the HF engine (transformers
`generate`, top-K recorded from each step's logits) vs the vLLM engine (in-process `vllm.LLM`, top-K from its logprobs).

    pytest benchmarks/test_generate.py --benchmark-only          # HF only where vLLM is not installed
    .venv-vllm/bin/python -m pytest benchmarks/test_generate.py --benchmark-only

Model: the demo student (SmolLM2-135M-Instruct pruned to 10 layers, fp32, `opdx.models.ensure_demo_models`) as the
"teacher"; prompts: the first 32 of examples/data/prompts_train.jsonl with the chat template; temperature 1, one
chunk of --batch-size 32, with and without --logprobs 5. A timed call is `opdx.generate.generate_shard` over that
chunk into a fresh output: generation, the top-K, record assembly and the atomic chunk write (engine start-up and
the final merge excluded). tokens/s = generated tokens (through the EOS) / wall time. One warm-up call, then
ROUNDS timed calls with different seeds; the row holds medians.

Writes benchmarks/results/<device>-generate.json. Knobs: OPDX_BENCH_THREADS, OPDX_BENCH_ROUNDS (3),
OPDX_BENCH_NOTE, as in benchmarks/test_rollout.py (use OPDX_BENCH_THREADS=1 on a shared CPU).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

THREADS = int(os.environ.get("OPDX_BENCH_THREADS", "0")) or torch.get_num_threads()
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # before vLLM is imported (see test_rollout.py)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402

from common import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "data" / "prompts_train.jsonl"
BATCH = 32
MAX_NEW = 32
LOGPROBS = [0, 5]
ROUNDS = int(os.environ.get("OPDX_BENCH_ROUNDS", "3"))
NOTE = os.environ.get("OPDX_BENCH_NOTE", "")

try:
    import vllm  # noqa: F401

    HAVE_VLLM, VLLM_ERR = True, ""
except Exception as exc:  # noqa: BLE001
    HAVE_VLLM, VLLM_ERR = False, str(exc)
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason=f"vllm not importable: {VLLM_ERR}")


@pytest.fixture(scope="module")
def job():
    """(args, tokenizer, examples, prompt ids, hashes, eos_ids, pad_id) for the demo student and the first BATCH
    prompts."""
    from opdx.generate import _load_prompts, parse_args
    from opdx.generate_store import prompt_hashes
    from opdx.models import ensure_demo_models, load_tokenizer

    _, student_dir = ensure_demo_models(progress=False)
    data = Path(tempfile.mkdtemp(prefix="opdx-bench-generate-")) / "prompts.jsonl"
    data.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:BATCH]))
    args = parse_args(["--model", str(student_dir), "--data", str(data), "--out", str(data.with_name("o.jsonl")),
                       "--batch-size", str(BATCH), "--max-new-tokens", str(MAX_NEW), "--temperature", "1.0",
                       "--logprobs", str(max(LOGPROBS)), "--no-progress"])
    tok = load_tokenizer(student_dir)
    eos_ids = [int(tok.eos_token_id)]
    pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else eos_ids[0]
    examples, prompts = _load_prompts(args, tok, eos_ids)
    return args, tok, examples, prompts, prompt_hashes(prompts), eos_ids, pad_id


def _rollout(job, engine):
    from opdx.generate import build_rollout

    args, tok, _, _, _, eos_ids, pad_id = job
    return build_rollout(args, engine, tok, eos_ids=eos_ids, pad_id=pad_id, device=torch.device("cpu"))


def _run_rounds(benchmark, job, rollout, logprobs):
    from opdx.generate import generate_shard, plan_chunks
    from opdx.generate_store import SampleStore

    args, tok, examples, prompts, hashes, eos_ids, _ = job
    rollout.top_logprobs = logprobs  # one engine for both cases (a second vLLM engine would not fit the cache)
    chunks = list(enumerate(plan_chunks(len(prompts), 1, BATCH)))
    calls = []

    def run():
        args.seed = len(calls)
        store = SampleStore(os.path.join(tempfile.mkdtemp(prefix="opdx-bench-out-"), "o.jsonl"))
        t0 = time.perf_counter()
        _, tokens = generate_shard(args, rollout, store, examples, prompts, hashes, chunks, set(), tok, eos_ids)
        calls.append((time.perf_counter() - t0, tokens))

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    timed = calls[1:]
    rates = [n / dt for dt, n in timed]
    row = {"time_ms": statistics.median(dt for dt, _ in timed) * 1e3, "tokens_per_s": statistics.median(rates),
           "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
           "new_tokens": statistics.median(n for _, n in timed), "rounds": len(timed)}
    if NOTE:
        row["note"] = NOTE
    return row


def _case(job, logprobs):
    return {"model": "student_L10", "dtype": "float32", "batch": BATCH, "max_new_tokens": MAX_NEW,
            "logprobs": logprobs, "prompt_tokens": sum(len(p) for p in job[3])}


@pytest.fixture(scope="module")
def hf_rollout(job):
    return _rollout(job, "hf")


@pytest.fixture(scope="module")
def vllm_rollout(job):
    return _rollout(job, "vllm")


# HF first, before the vLLM engine exists in this process.
@pytest.mark.parametrize("logprobs", LOGPROBS)
def test_generate_hf(benchmark, job, hf_rollout, logprobs):
    record("generate", "cpu", _case(job, logprobs), "hf", _run_rounds(benchmark, job, hf_rollout, logprobs))


@needs_vllm
@pytest.mark.parametrize("logprobs", LOGPROBS)
def test_generate_vllm(benchmark, job, vllm_rollout, logprobs):
    record("generate", "cpu", _case(job, logprobs), "vllm", _run_rounds(benchmark, job, vllm_rollout, logprobs))
