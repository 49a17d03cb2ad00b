"""AdamW step time (issue 17): torch's for-loop, foreach and fused implementations and DeepSpeed's CPU Adam over the
parameter tensors of a Qwen2 student, and the demo pair's training step with each optim.impl.

    python benchmarks/optimizer_step.py step [--layout 50m 494m] [--threads 2] [--reps 5]
    python benchmarks/optimizer_step.py demo [--impls deepspeed fused] [--steps 5]

``step``: one fp32 parameter set with the shapes of a Qwen2 student (built on the meta device: only the shapes),
random gradients, ``optimizer.step()`` timed after 2 warm-up steps (the states exist); one implementation at a time
(params + grads + 2 states = 16 bytes per parameter). Bytes moved per step: params, grads and both states read,
params and both states written = 28 bytes per parameter. Rows go to benchmarks/results/<device>-optimizer_step.json.

``demo``: `opdx.train` on the embedded demo pair (examples/configs/demo.yaml, loss gjsd β=0.5, batch 4, 32 new
tokens, fp32), one process, for each optim.impl; median step and phase times over the steps after the first
(benchmarks/train_step.py's `summarize`) into <device>-optimizer_train_step.json. The 1-minute load average before
and after is stored with each row: on a shared machine the medians are what to compare.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

from common import measure, record
from train_step import QUIET, ROOT, SHAPES, run_opdx, summarize

DEMO = ROOT / "examples" / "configs" / "demo.yaml"
# the issue-17 demo row: the 10-layer student, on-policy GJSD β=0.5, batch 4, exactly 32 new tokens per rollout
DEMO_OVERRIDES = ["model.student_layers=10", "loss.kind=gjsd", "loss.beta=0.5", "loss.lmbda=1.0",
                  "train.micro_batch_size=4", "rollout.max_new_tokens=32", "rollout.min_new_tokens=32"]

LAYOUTS = {  # name -> (SHAPES entry, layers, vocab)
    "50m": ("qwen2.5-0.5b", 2, 24576),  # 52M parameters, the 0.5B's layer shapes
    "494m": ("qwen2.5-0.5b", 24, 151936),  # Qwen2.5-0.5B (tied embeddings)
}
BYTES_PER_PARAM = 28  # fp32: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq


def layout_shapes(name: str) -> list[torch.Size]:
    """The parameter shapes of the layout's Qwen2 model (no memory: built on the meta device)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape, layers, vocab = LAYOUTS[name]
    cfg = Qwen2Config(vocab_size=vocab, **{**SHAPES[shape], "num_hidden_layers": layers}, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [p.shape for p in model.parameters()]


def make_optimizer(impl: str, params: list[torch.Tensor]):
    if impl == "deepspeed_cpu_adam":  # DeepSpeed's own CPU AdamW (a JIT-built C++ op)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=1e-4, adamw_mode=True)
    kw = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
    return torch.optim.AdamW(params, lr=1e-4, **kw)


def bench_step(layout: str, impl: str, reps: int) -> dict:
    shapes = layout_shapes(layout)
    params = [torch.randn(s) * 0.02 for s in shapes]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_optimizer(impl, params)
    n = sum(p.numel() for p in params)
    row = measure(opt.step, "cpu", bytes_moved=BYTES_PER_PARAM * n, reps=reps)
    row.update(params=n, tensors=len(params), reps=reps)
    del opt, params
    gc.collect()
    return row


def run_steps(layouts: list[str], impls: list[str], reps: int) -> None:
    for layout in layouts:
        for impl in impls:
            load = os.getloadavg()[0]
            try:
                row = bench_step(layout, impl, reps)
            except Exception as exc:  # DeepSpeed's op may not build here: the row says why
                row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
            row.update(loadavg_1m_before=load, loadavg_1m_after=os.getloadavg()[0])
            record("optimizer_step", "cpu", {"layout": layout, "dtype": "float32"}, impl, row)
            print(layout, impl, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


def record_demo(impl: str, rows: list[dict], load_before: float) -> None:
    """One demo row (median step/phase times over the steps after the first) into the results file."""
    row = {**summarize(rows), "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}
    case = {"setup": "demo-smollm2-135m-L10", "loss": "gjsd(beta 0.5)", "nproc": 1, "batch": 4,
            "max_new_tokens": 32, "dtype": "float32", "optim.impl": impl}
    record("optimizer_train_step", "cpu", case, "opdx", row)
    print(impl, {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


def run_demo(impls: list[str], steps: int) -> None:
    for impl in impls:
        load = os.getloadavg()[0]
        rows = run_opdx(DEMO_OVERRIDES + [f"optim.impl={impl}", f"train.max_steps={steps}", *QUIET],
                        ROOT / "outputs" / "bench_optimizer" / impl, nproc=1, config=str(DEMO))
        record_demo(impl, rows, load)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="optimizer_step.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("step", help="AdamW step time per implementation")
    ps.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ps.add_argument("--impls", nargs="+", default=["for-loop", "foreach", "fused", "deepspeed_cpu_adam"])
    ps.add_argument("--threads", type=int, default=2)
    ps.add_argument("--reps", type=int, default=5)
    pd = sub.add_parser("demo", help="the demo pair's training step per optim.impl")
    pd.add_argument("--impls", nargs="+", default=["deepspeed", "fused"])
    pd.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    if a.cmd == "step":
        torch.set_num_threads(a.threads)
        run_steps(a.layout, a.impls, a.reps)
    else:
        run_demo(a.impls, a.steps)


if __name__ == "__main__":
    main()
