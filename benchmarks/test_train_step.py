"""train_step: end-to-end training-step throughput of `opdx.train` (issue 9), on CPU and against TRL's GKDTrainer on GPU.

    pytest benchmarks/test_train_step.py --benchmark-only                 # CPU: demo pair, 2 processes, opd/gjsd/topk
    OPDX_TRL_PYTHON=/path/to/venv/bin/python \\
        pytest benchmarks/test_train_step.py --benchmark-only -k cuda     # GPU: random Qwen2.5 0.5B <- 1.5B, vs TRL
    pytest benchmarks/test_train_step.py -k smoke                         # the harness on tiny models (CPU, no timing)

Each case runs whole training jobs (subprocesses, see benchmarks/train_step.py), drops the first step (warm-up) and
writes one row per implementation to benchmarks/results/<device>-train_step.json: time_ms = median step time,
tokens_per_s = teacher-scored tokens / time over the kept steps, steps_per_s, and per phase (rollout, teacher,
loss = student forward + loss, backward = backward + optimizer step, sync = rollout weight sync, other) the median
ms and the % of the total time. On GPU every phase boundary is a CUDA synchronize, on both sides.

Environment: OPDX_BENCH_STEPS (steps per run, default 6 on CPU and 8 on GPU), OPDX_BENCH_NOTE (a note stored in
each row and as the results file's note, e.g. that the machine was shared; a run without it clears the file's note), OPDX_BENCH_MODELS (where the GPU pair is built/reused; default a temp
dir), OPDX_TRL_PYTHON (a Python with trl installed; default this one if it imports trl).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

import pytest

from common import RESULTS_DIR, device_name, record
from train_step import (QUIET, ROOT, SHAPES, build_pair, opdx_overrides, run_opdx, run_trl, summarize,
                        trl_python)

DEMO = str(ROOT / "examples" / "configs" / "demo.yaml")
# on-policy every step (lmbda 1); opd_reinforce: the objective before issue 16 (batch-normalized REINFORCE, no
# importance ratio) beside today's opd (importance-sampled, the rollout's own logprobs: no extra forward)
CPU_KINDS = {"opd": ["loss.kind=opd", "loss.lmbda=1"],
             "opd_reinforce": ["loss.kind=opd", "loss.normalize_reward=true", "loss.lmbda=1"],
             "gjsd": ["loss.kind=gjsd", "loss.beta=0.5", "loss.lmbda=1"],
             "topk": ["loss.kind=topk", "loss.topk=64", "loss.lmbda=1"]}


def _steps(default: int) -> int:
    return int(os.environ.get("OPDX_BENCH_STEPS", default))


def _file_note(device: str) -> None:
    """The results file's "note" (rendered under the op's table) = OPDX_BENCH_NOTE of the latest run, or none."""
    path = Path(RESULTS_DIR) / f"{device_name(device)}-train_step.json"
    data = json.loads(path.read_text())
    note = os.environ.get("OPDX_BENCH_NOTE", "")
    if note:
        data["note"] = f"Latest run ({time.strftime('%Y-%m-%d')}): {note}"
    else:
        data.pop("note", None)
    path.write_text(json.dumps(data, indent=1))


def _annotate(row: dict, load_before: float) -> dict:
    row["loadavg_1m_before"] = load_before
    row["loadavg_1m_after"] = os.getloadavg()[0]
    note = os.environ.get("OPDX_BENCH_NOTE", "")
    if note:
        row["note"] = note
    return row


# ------------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("loss", list(CPU_KINDS))
def test_train_step_cpu(benchmark, tmp_path, loss):
    """The embedded demo (SmolLM2-135M teacher, its pruned student, fp32) on 2 processes: torchrun
    --nproc_per_node 2 -m opdx.train --config examples/configs/demo.yaml, on-policy, a few steps, no
    eval/saves/plots."""
    from opdx.config import load_config

    demo = load_config(DEMO, [])
    steps = _steps(6)
    overrides = CPU_KINDS[loss] + [f"train.max_steps={steps}", *QUIET]
    out = {}
    load = os.getloadavg()[0]

    def run():
        out["rows"] = run_opdx(overrides, tmp_path / "run", nproc=2, config=DEMO)

    benchmark.pedantic(run, rounds=1, iterations=1)
    row = _annotate(summarize(out["rows"]), load)
    case = {"setup": f"demo-smollm2-135m-L{demo.model.student_layers}",
            "loss": loss + ("(beta 0.5)" if loss == "gjsd" else "(K 64)" if loss == "topk" else ""),
            "nproc": 2, "batch": demo.train.micro_batch_size, "max_new_tokens": demo.rollout.max_new_tokens,
            "dtype": demo.model.dtype}
    record("train_step", "cpu", case, "opdx", row)
    _file_note("cpu")


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("nproc", [2, 1])
def test_rollout_overlap_cpu(benchmark, tmp_path, nproc, overlap):
    """rollout.overlap (issue 21): the demo pair on-policy (opd, lmbda 1) with step k+1's rollouts sampled in a
    background thread while step k trains, beside the same run without; nproc 1 gives the process both cores
    (torch's threads = 2), nproc 2 one core per rank (the demo's launch). Rollouts of exactly max_new_tokens."""
    from opdx.config import load_config

    demo = load_config(DEMO, [])
    # every rollout exactly max_new_tokens long: both runs train on the same tokens per step (the lag changes the
    # samples, and with them where a free-running rollout would stop)
    overrides = CPU_KINDS["opd"] + [f"train.max_steps={_steps(6)}", f"rollout.overlap={str(overlap).lower()}",
                                    f"rollout.min_new_tokens={demo.rollout.max_new_tokens}", *QUIET]
    out = {}
    load = os.getloadavg()[0]

    def run():
        out["rows"] = run_opdx(overrides, tmp_path / "run", nproc=nproc, config=DEMO,
                               env={"OMP_NUM_THREADS": "2"} if nproc == 1 else None)

    benchmark.pedantic(run, rounds=1, iterations=1)
    row = _annotate(summarize(out["rows"]), load)
    case = {"setup": f"demo-smollm2-135m-L{demo.model.student_layers}", "loss": "opd", "nproc": nproc,
            "batch": demo.train.micro_batch_size, "new_tokens": f"exactly {demo.rollout.max_new_tokens}",
            "dtype": demo.model.dtype}
    record("rollout_overlap", "cpu", case, "overlap" if overlap else "sequential", row)


# ------------------------------------------------------------------------------------------------ GPU vs TRL
GPU_OPDX_KINDS = {"opdx_gjsd": dict(loss="gjsd", beta=0.5), "opdx_opd": dict(loss="opd"),
                  "opdx_topk64": dict(loss="topk", topk=64)}


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    where = os.environ.get("OPDX_BENCH_MODELS") or str(tmp_path_factory.mktemp("qwen_pair"))
    return build_pair(where, student="qwen2.5-0.5b", teacher="qwen2.5-1.5b", dtype="bfloat16")


def compare_with_trl(student_dir: str, teacher_dir: str, work: Path, *, steps: int, batch: int, max_new_tokens: int,
                     dtype: str, attn: str) -> dict:
    """{impl: (loss label, summary row)} for TRL's GKDTrainer (when a Python with trl is there) and opdx's
    gjsd/opd/topk on the same pair, batch and rollout length; rows get speedup_vs_trl."""
    common = dict(student_dir=student_dir, teacher_dir=teacher_dir, steps=steps, batch=batch,
                  max_new_tokens=max_new_tokens, dtype=dtype, attn=attn)
    rows = {}
    py = trl_python()
    if py is None:
        warnings.warn("TRL side skipped: no Python with trl (set OPDX_TRL_PYTHON)")
    else:
        res = run_trl(out_json=work / "trl.json", beta=0.5, python=py, **common)
        row = summarize(res["steps"])
        row.update(trl_version=res["versions"]["trl"], attn=attn, optim=res["config"]["optim"])
        rows["trl_gkd"] = ("gkd(beta 0.5)", row, res["steps"])
    for impl, kw in GPU_OPDX_KINDS.items():
        train_rows = run_opdx(opdx_overrides(**common, **kw), work / impl, nproc=1)
        loss = kw["loss"] + {"gjsd": "(beta 0.5)", "topk": "(K 64)"}.get(kw["loss"], "")
        rows[impl] = (loss, {**summarize(train_rows), "attn": attn}, train_rows)
    if "trl_gkd" in rows:
        for _, row, _ in rows.values():
            row["speedup_vs_trl"] = rows["trl_gkd"][1]["time_ms"] / row["time_ms"]
    return rows


@pytest.mark.cuda
@pytest.mark.parametrize("max_new_tokens", [128, 512])
def test_train_step_cuda_vs_trl(benchmark, tmp_path, qwen_pair, max_new_tokens):
    """Random-init Qwen2.5-0.5B-shaped student <- 1.5B-shaped teacher (vocab 151936, bf16), 1 process, batch 8,
    on-policy (lmbda 1), rollouts of exactly max_new_tokens (EOS suppressed on both sides). opdx with gjsd(0.5)
    (the GKD loss, fused lm_head + JSD at this vocabulary), opd and topk(64); TRL's GKDTrainer with beta 0.5."""
    teacher_dir, student_dir = qwen_pair
    batch = 8
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    case = {"setup": "random qwen2.5-0.5b<-1.5b", "nproc": 1, "batch": batch, "max_new_tokens": max_new_tokens,
            "dtype": "bfloat16"}
    out = {}
    load = os.getloadavg()[0]

    def run():
        out["rows"] = compare_with_trl(student_dir, teacher_dir, tmp_path, steps=_steps(8), batch=batch,
                                       max_new_tokens=max_new_tokens, dtype="bfloat16", attn=attn)

    benchmark.pedantic(run, rounds=1, iterations=1)
    for impl, (loss, row, _) in out["rows"].items():
        record("train_step", "cuda", {**case, "loss": loss}, impl, _annotate(row, load))
    _file_note("cuda")


# ------------------------------------------------------------------------------------------------ harness smoke
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("tiny_pair"), student="tiny-student", teacher="tiny-teacher",
                      vocab_size=2048, dtype="float32", device="cpu")


def test_smoke_tokenizer_and_pair(tiny_pair):
    from transformers import AutoConfig

    from opdx.models import check_tokenizers_compatible, load_tokenizer

    teacher_dir, student_dir = tiny_pair
    tok = load_tokenizer(student_dir)
    check_tokenizers_compatible(tok, load_tokenizer(teacher_dir))
    assert len(tok) == 2048 and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "Give two tips."}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert 0 < len(ids) < 40 and max(ids) < 1024  # real text uses the trained BPE, never the fillers
    assert tok.decode([2047]).strip().startswith("<v")
    cfg = AutoConfig.from_pretrained(teacher_dir)
    assert (cfg.model_type, cfg.vocab_size, cfg.tie_word_embeddings) == ("qwen2", 2048, True)
    assert cfg.num_hidden_layers == SHAPES["tiny-teacher"]["num_hidden_layers"]


def test_smoke_compare_tiny(tiny_pair, tmp_path):
    """The GPU comparison's code path on tiny models (fp32, CPU): every run trains on exactly batch * max_new_tokens
    tokens per step (no early EOS), on both sides; the TRL side is skipped without a Python with trl."""
    teacher_dir, student_dir = tiny_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = compare_with_trl(student_dir, teacher_dir, tmp_path, steps=3, batch=2, max_new_tokens=8,
                                dtype="float32", attn="sdpa")
    assert set(GPU_OPDX_KINDS) <= set(rows)
    for impl, (_, row, steps) in rows.items():
        assert [r["tokens"] for r in steps] == [16, 16, 16], impl
        assert row["steps_measured"] == 2 and row["tokens_per_s"] > 0
        assert row["rollout_pct"] > 0 and row["teacher_pct"] > 0
        assert abs(sum(v for k, v in row.items() if k.endswith("_pct")) - 100.0) < 1e-6
        assert ("speedup_vs_trl" in row) == ("trl_gkd" in rows)
    if trl_python() is None:
        pytest.skip("opdx side ran; TRL side skipped (no Python with trl: set OPDX_TRL_PYTHON)")
