"""End-to-end training-step throughput (issue 9): the harness behind benchmarks/test_train_step.py.

Runs `opdx.train` (torchrun, a subprocess) and TRL's `GKDTrainer` (a subprocess too, possibly under another Python
that has `trl`) on the same models, batch and generation length, and summarizes their per-step records: median
step time, teacher-scored tokens/s and the per-phase breakdown (rollout, teacher, loss, backward, grad clip,
optimizer step, weight sync). The first step(s) are dropped as warm-up.

Models for the GPU comparison are random-initialized Qwen2-architecture pairs built locally (`build_pair`, no
downloads) with a synthetic tokenizer of the same vocabulary size (`make_tokenizer`); `SHAPES` holds the Qwen2.5
0.5B / 1.5B shapes and tiny ones that run the same code path on CPU in seconds.

CLI (the TRL side runs through it, so it must import nothing from opdx at module level):

    python benchmarks/train_step.py pair OUT_DIR [--student qwen2.5-0.5b --teacher qwen2.5-1.5b --vocab 151936]
    python benchmarks/train_step.py trl --student S --teacher T --out R.json [--steps 8 --batch 8 --max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "prompts_train.jsonl"

QWEN_VOCAB = 151936  # Qwen2.5's lm_head rows
SHAPES = {
    # Qwen2.5-0.5B / Qwen2.5-1.5B (both tie their embeddings)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
    # the same code path on CPU in seconds (head_dim 32)
    "tiny-student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1),
    "tiny-teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1),
}

# metrics.jsonl keys of the phases (opdx.train's loop): "backward" is engine.backward, "clip" the rest of
# engine.step beside the AdamW update "optimizer"; the TRL side and older opdx runs log no clip/optimizer times and
# count the whole optimizer step in "backward"
PHASES = {"rollout": "time_rollout_s", "teacher": "time_teacher_s", "loss": "time_loss_s",
          "backward": "time_backward_s", "clip": "time_clip_s", "optimizer": "time_optimizer_s",
          "sync": "time_sync_s"}


# ------------------------------------------------------------------------------------------------ models
def make_tokenizer(vocab_size: int):
    """opdx's tiny byte-level BPE tokenizer (ChatML template, `<|im_end|>` = eos = pad, any text encodes) with its
    vocabulary filled up to exactly ``vocab_size`` tokens by filler entries (" <v123>") that no merge produces:
    prompts tokenize like real text, while a random-init model samples over the whole vocabulary."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from opdx.models import CHATML_TEMPLATE, make_tiny_tokenizer

    base = make_tiny_tokenizer(min(vocab_size, 1024))
    if len(base) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is below the base tokenizer's {len(base)} tokens")
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    next_id, i = len(vocab), 0
    while next_id < vocab_size:
        token = f"\u0120<v{i}>"  # byte-level form of " <v{i}>"
        i += 1
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  unk_token=base.unk_token, bos_token=base.bos_token, eos_token=base.eos_token,
                                  pad_token=base.pad_token)
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 32768
    if len(tok) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, wanted {vocab_size}")
    return tok


def build_pair(out_dir: str | os.PathLike, *, student: str = "qwen2.5-0.5b", teacher: str = "qwen2.5-1.5b",
               vocab_size: int = QWEN_VOCAB, dtype: str = "bfloat16", seed: int = 0,
               device: str | None = None) -> tuple[str, str]:
    """Random-initialized Qwen2 teacher and student (tied embeddings) + a shared tokenizer of ``vocab_size`` tokens,
    saved with save_pretrained under out_dir/{teacher,student}. Reused when already complete. Returns
    (teacher_dir, student_dir)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = Path(out_dir)
    dirs = (out / "teacher", out / "student")
    key = {"student": SHAPES[student], "teacher": SHAPES[teacher], "vocab": vocab_size, "dtype": dtype, "seed": seed}
    marker = out / "pair.json"
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return str(dirs[0]), str(dirs[1])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = make_tokenizer(vocab_size)
    for d, shape, sub in ((dirs[0], SHAPES[teacher], 0), (dirs[1], SHAPES[student], 1)):
        cfg = Qwen2Config(vocab_size=vocab_size, **shape, hidden_act="silu", max_position_embeddings=32768,
                          rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                          initializer_range=0.02, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed * 1000 + sub)
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        model.save_pretrained(str(d))
        tok.save_pretrained(str(d))
        del model
    marker.write_text(json.dumps(key))
    return str(dirs[0]), str(dirs[1])


# ------------------------------------------------------------------------------------------------ summaries
def summarize(steps: list[dict], *, skip: int = 1) -> dict:
    """One benchmark row from per-step records (metrics.jsonl train rows, or the TRL side's): drops the first
    ``skip`` steps; time_ms / per-phase ms are medians; tokens_per_s is total teacher-scored tokens / total time
    over the kept steps; per-phase % are shares of the total time (other = step time not in a phase: all-reduce
    of the metrics, logging, the data batch)."""
    kept = steps[skip:]
    if not kept:
        raise ValueError(f"{len(steps)} step records, none left after dropping {skip} warm-up step(s)")
    med = statistics.median
    total = sum(r["time_step_s"] for r in kept)
    row = {
        "time_ms": med(r["time_step_s"] for r in kept) * 1e3,
        "steps_per_s": 1.0 / med(r["time_step_s"] for r in kept),
        "tokens_per_s": sum(r["tokens"] for r in kept) / total,
        "tokens_per_step": med(r["tokens"] for r in kept),
        "steps_measured": len(kept),
    }
    if "response_len" in kept[0]:
        row["response_len"] = med(r["response_len"] for r in kept)
    in_phases = [0.0] * len(kept)
    for name, key in PHASES.items():
        if key not in kept[0]:
            continue
        vals = [r[key] for r in kept]
        in_phases = [a + b for a, b in zip(in_phases, vals)]
        row[f"{name}_ms"] = med(vals) * 1e3
        row[f"{name}_pct"] = 100.0 * sum(vals) / total
    other = [r["time_step_s"] - p for r, p in zip(kept, in_phases)]
    row["other_ms"] = med(other) * 1e3
    row["other_pct"] = 100.0 * sum(other) / total
    return row


def read_train_rows(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if "time_step_s" in r]


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------------------------------------ opdx side
def opdx_overrides(*, student_dir: str, teacher_dir: str, steps: int, batch: int, max_new_tokens: int,
                   loss: str = "gjsd", beta: float = 0.5, topk: int = 64, dtype: str = "bfloat16",
                   attn: str = "sdpa", lr: float = 1e-5) -> list[str]:
    """opdx.train overrides for the opdx-vs-TRL comparison: a local model pair, on-policy (lmbda 1) student
    rollouts with HF generate of exactly ``max_new_tokens`` (EOS suppressed), no eval/checkpoints/plots."""
    return [
        "model.source=path", f"model.path={student_dir}", f"teacher.path={teacher_dir}", f"model.dtype={dtype}",
        f"model.attn_implementation={attn}", "rollout.engine=hf", f"rollout.max_new_tokens={max_new_tokens}",
        f"rollout.min_new_tokens={max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        f"loss.kind={loss}", f"loss.beta={beta}", f"loss.topk={topk}", "loss.lmbda=1.0", "loss.temperature=1.0",
        f"train.max_steps={steps}", f"train.micro_batch_size={batch}", "train.grad_accum=1",
        f"optim.lr={lr}", "optim.warmup_steps=0", *QUIET,
    ]


# eval only at the end (opdx.train always evaluates after the last step; kept minimal), no checkpoints/plots/TB
QUIET = ["eval.every=0", "eval.at_start=false", "eval.num_prompts=2", "eval.batch_size=1", "eval.max_new_tokens=2",
         "eval.task=false", "save.every=0", "save.final=false", "log.plot=false", "log.tensorboard=false",
         "log.progress=false"]


def run_opdx(overrides: list[str], out_dir: str | os.PathLike, *, nproc: int = 1, config: str | None = None,
             timeout: float = 3600, env: dict | None = None) -> list[dict]:
    """`torchrun --nproc_per_node nproc -m opdx.train [--config C] overrides train.output_dir=out_dir`; returns the
    train rows of metrics.jsonl. The log goes to out_dir/train.log."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "opdx.train"] + (["--config", config] if config else []) + list(overrides) + \
        [f"train.output_dir={out}"]
    extra = {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**extra, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"opdx.train failed (rc {proc.returncode}): {' '.join(cmd)}\n{_tail(proc.stdout + proc.stderr)}")
    return read_train_rows(out)


# ------------------------------------------------------------------------------------------------ TRL side
def trl_python() -> str | None:
    """A Python that can import trl's GKDTrainer: $OPDX_TRL_PYTHON, else this one when it can."""
    exe = os.environ.get("OPDX_TRL_PYTHON")
    if exe:
        return exe
    try:
        import importlib.util

        return sys.executable if importlib.util.find_spec("trl") is not None else None
    except (ImportError, ValueError):
        return None


def run_trl(*, student_dir: str, teacher_dir: str, out_json: str | os.PathLike, steps: int, batch: int,
            max_new_tokens: int, beta: float = 0.5, dtype: str = "bfloat16", attn: str = "sdpa", lr: float = 1e-5,
            python: str | None = None, timeout: float = 3600) -> dict:
    """TRL's GKDTrainer (lmbda 1, seq_kd off, same beta/batch/max_new_tokens, EOS suppressed) in a subprocess
    under ``python`` (default `trl_python()`); returns the JSON it wrote ({"steps": [...], "config": ..., ...})."""
    python = python or trl_python()
    if python is None:
        raise RuntimeError("no Python with trl: pip install trl, or set OPDX_TRL_PYTHON to one that has it")
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "trl", "--student", student_dir, "--teacher", teacher_dir,
           "--out", str(out_json), "--steps", str(steps), "--batch", str(batch), "--max-new-tokens",
           str(max_new_tokens), "--beta", str(beta), "--dtype", dtype, "--attn", attn, "--lr", str(lr)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(TRL_EXPERIMENTAL_SILENCE=1), capture_output=True, text=True,
                          timeout=timeout)
    out_json.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL GKDTrainer run failed (rc {proc.returncode}): {' '.join(cmd)}\n"
                           f"{_tail(proc.stdout + proc.stderr)}")
    return json.loads(out_json.read_text())


def _trl_main(a) -> None:
    """Runs inside the TRL Python: GKDTrainer for a.steps steps with per-step timing callbacks."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import transformers
    import trl
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")

    def clock():
        if cuda:
            torch.cuda.synchronize()
        return time.time()

    tdtype = getattr(torch, a.dtype)
    tok = AutoTokenizer.from_pretrained(a.student)
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=tdtype, attn_implementation=a.attn)
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=tdtype, attn_implementation=a.attn).to(dev)
    records = [json.loads(ln) for ln in DATA.read_text().splitlines() if ln.strip()]
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["response"]}]} for r in records])
    cfg = GKDConfig(
        output_dir=a.output_dir or str(Path(a.out).with_suffix("")) + "_trl_out",
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, max_steps=a.steps,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        lmbda=1.0, beta=a.beta, temperature=1.0, max_new_tokens=a.max_new_tokens, seq_kd=False,
        gradient_checkpointing=False,  # SFTConfig's default is True; opdx does not checkpoint either
        bf16=a.dtype == "bfloat16" and cuda, fp16=False, use_cpu=not cuda,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, disable_dropout=True,
        seed=0, max_grad_norm=1.0,
    )

    phase = {"rollout": 0.0, "teacher": 0.0, "fwd_loss": 0.0, "tokens": 0}

    class Timed(GKDTrainer):
        def generate_on_policy_outputs(self, model, inputs, generation_config):  # a staticmethod upstream
            t = clock()
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            phase["rollout"] += clock() - t
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            t = clock()
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            phase["fwd_loss"] += clock() - t
            phase["tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            return out

    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            for k in phase:
                phase[k] = 0
            self.t0 = clock()

        def on_step_end(self, args, state, control, **kw):
            dt = clock() - self.t0
            loss_s = phase["fwd_loss"] - phase["teacher"]
            steps.append({"step": state.global_step, "time_step_s": dt, "tokens": phase["tokens"],
                          "tokens_per_s": phase["tokens"] / dt, "time_rollout_s": phase["rollout"],
                          "time_teacher_s": phase["teacher"], "time_loss_s": loss_s,
                          "time_backward_s": dt - phase["rollout"] - phase["fwd_loss"],
                          "response_len": phase["tokens"] / a.batch})

    trainer = Timed(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                    callbacks=[StepTimer()])
    # equal lengths on both sides: a random-init model would otherwise stop at a sampled EOS now and then
    trainer.generation_config.min_new_tokens = a.max_new_tokens
    trainer.generation_kwargs["min_new_tokens"] = a.max_new_tokens
    tmodel = trainer.teacher_model
    t_start = {}
    tmodel.register_forward_pre_hook(lambda m, args: t_start.__setitem__("t", clock()))
    tmodel.register_forward_hook(lambda m, args, out: phase.__setitem__("teacher", phase["teacher"] + clock()
                                                                          - t_start["t"]))
    trainer.train()
    result = {"steps": steps,
              "config": {"steps": a.steps, "batch": a.batch, "max_new_tokens": a.max_new_tokens, "beta": a.beta,
                         "lmbda": 1.0, "dtype": a.dtype, "attn": a.attn, "bf16_autocast": cfg.bf16,
                         "optim": str(getattr(cfg.optim, "value", cfg.optim)), "gradient_checkpointing": cfg.gradient_checkpointing},
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__},
              "device": torch.cuda.get_device_name() if cuda else "cpu"}
    Path(a.out).write_text(json.dumps(result, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="train_step.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pair", help="build a random Qwen2 pair + tokenizer")
    pp.add_argument("out_dir")
    pp.add_argument("--student", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    pp.add_argument("--teacher", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    pp.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    pp.add_argument("--dtype", default="bfloat16")
    pt = sub.add_parser("trl", help="TRL GKDTrainer timing run")
    pt.add_argument("--student", required=True)
    pt.add_argument("--teacher", required=True)
    pt.add_argument("--out", required=True)
    pt.add_argument("--output-dir", default="")
    pt.add_argument("--steps", type=int, default=8)
    pt.add_argument("--batch", type=int, default=8)
    pt.add_argument("--max-new-tokens", type=int, default=128)
    pt.add_argument("--beta", type=float, default=0.5)
    pt.add_argument("--dtype", default="bfloat16")
    pt.add_argument("--attn", default="sdpa")
    pt.add_argument("--lr", type=float, default=1e-5)
    a = p.parse_args(argv)
    if a.cmd == "pair":
        sys.path.insert(0, str(ROOT))
        print(build_pair(a.out_dir, student=a.student, teacher=a.teacher, vocab_size=a.vocab, dtype=a.dtype))
    else:
        _trl_main(a)


if __name__ == "__main__":
    main()
