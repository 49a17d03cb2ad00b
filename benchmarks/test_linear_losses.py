"""Fused lm_head + loss: opdx.ops.linear_token_logprobs / linear_generalized_jsd(_mean) vs materializing the logits and
running the loss in torch eager (and opdx.ops.generalized_jsd / Liger's LigerFusedLinearJSD where available), forward
and forward+backward.

    pytest benchmarks/test_linear_losses.py --benchmark-only
Writes benchmarks/results/<device>-linear_losses.json; `python benchmarks/report.py` renders the table.

The GPU case also measures the device's bf16 GEMM rate in the same run and reports each implementation's time as a
multiple of the GEMM floor: the matrix products a fused lm_head + loss cannot avoid (forward logits, grad_h and
grad_W: 2·N·V·H flops each; the teacher's logits too for the JSD).
"""

import math

import pytest
import torch

import opdx
from common import measure, record, sync, time_call

CASES = {
    "cpu": dict(n=1024, h=256, v=65536, dtype=torch.float32),
    "cuda": dict(n=8192, h=4096, v=128256, dtype=torch.bfloat16),
}


def eager_token_logprobs(h, w, t):
    logits = (h @ w.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1)


def eager_jsd(sh, sw, th, tw, beta=0.5):
    """Materialized logits + the GJSD(β) mixture formula in eager float32."""
    log_ps = torch.log_softmax((sh @ sw.t()).float(), dim=-1)
    log_pt = torch.log_softmax((th @ tw.t()).float(), dim=-1)
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    return beta * (log_pt.exp() * (log_pt - log_m)).sum(-1) + (1 - beta) * (log_ps.exp() * (log_ps - log_m)).sum(-1)


def logits_then_opdx_gjsd(sh, sw, th, tw, beta=0.5):
    return opdx.ops.generalized_jsd(sh @ sw.t(), th @ tw.t(), beta=beta)


def liger_fused_linear_jsd():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:  # not installed / no triton
        return None
    mod = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
    return lambda sh, sw, th, tw: mod(sh, sw, th, tw, None)  # shift_labels (no label mask)


def impls(op):
    if op == "token_logprobs":
        return {
            "opdx_linear": lambda h, w, t: opdx.ops.linear_token_logprobs(h, w, t),
            "materialize_eager": eager_token_logprobs,
        }
    out = {
        "opdx_linear": lambda sh, sw, th, tw: opdx.ops.linear_generalized_jsd(sh, sw, th, tw, beta=0.5),
        # the mean as one scalar, gradients formed in the forward (4 GEMMs): what a training loss needs
        "opdx_linear_mean": lambda sh, sw, th, tw: opdx.ops.linear_generalized_jsd_mean(sh, sw, th, tw, beta=0.5),
        "materialize_eager": eager_jsd,
    }
    out["materialize_opdx_gjsd"] = logits_then_opdx_gjsd
    return out


_GEMM_RATE = {}


def gemm_rate(device, n, h, v, dtype):
    """Measured flop/s of the forward logits GEMM [n, h] x [h, v] on this device (same run as the benchmarks)."""
    key = (device, n, h, v, dtype)
    if key not in _GEMM_RATE:
        a = torch.randn(n, h, device=device, dtype=dtype)
        b = torch.randn(v, h, device=device, dtype=dtype)
        t = time_call(lambda: a @ b.t(), device, warmup=2, reps=5)
        _GEMM_RATE[key] = 2 * n * h * v / t
    return _GEMM_RATE[key]


def run_case(benchmark, device, op, impl, mode):
    case = CASES[device]
    n, h, v, dtype = case["n"], case["h"], case["v"], case["dtype"]
    table = impls(op)
    if op == "generalized_jsd" and impl == "liger_fused_linear_jsd":
        fn = liger_fused_linear_jsd()
        if fn is None:
            pytest.skip("liger_kernel is not installed")
    elif impl not in table:
        pytest.skip(f"{impl} is not available on this branch")
    else:
        fn = table[impl]
    scale = 3.0 / math.sqrt(h)
    hid = torch.randn(n, h, device=device, dtype=dtype)
    w = (torch.randn(v, h, device=device) * scale).to(dtype)
    if op == "token_logprobs":
        t = torch.randint(0, v, (n,), device=device)
        inputs = (hid, w, t)
        grads_of = (0, 1)
    else:
        th = torch.randn(n, h, device=device, dtype=dtype)
        tw = (w.float() + 0.1 * scale * torch.randn(v, h, device=device)).to(dtype)
        inputs = (hid, w, th, tw)
        grads_of = (0, 1)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
    else:
        leaves = [x.clone().requires_grad_(True) if i in grads_of else x for i, x in enumerate(inputs)]

        def run():
            out = fn(*leaves)
            return torch.autograd.grad(out.sum(), [leaves[i] for i in grads_of])
    run()
    sync(device)
    reps = 3 if device.startswith("cuda") else 1
    benchmark.pedantic(run, rounds=reps, warmup_rounds=0, iterations=1)
    row = measure(run, device, reps=reps)
    gemms = {("token_logprobs", "fwd"): 1, ("token_logprobs", "fwd_bwd"): 3,
             ("generalized_jsd", "fwd"): 2, ("generalized_jsd", "fwd_bwd"): 4}[(op, mode)]
    rate = gemm_rate(device, n, h, v, dtype)
    row["gemm_floor_ms"] = gemms * 2 * n * h * v / rate * 1e3
    row["x_gemm_floor"] = row["time_ms"] / row["gemm_floor_ms"]
    row["gemm_tflops"] = rate / 1e12
    row["logits_mb"] = n * v * 4 / 2**20
    record("linear_losses", device, {"op": op, "n": n, "h": h, "v": v, "dtype": str(dtype).replace("torch.", ""),
                                     "mode": mode}, impl, row)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["opdx_linear", "materialize_eager"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_linear_token_logprobs(benchmark, device, impl, mode):
    run_case(benchmark, device, "token_logprobs", impl, mode)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize(
    "impl", ["opdx_linear", "opdx_linear_mean", "materialize_eager", "materialize_opdx_gjsd", "liger_fused_linear_jsd"]
)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_linear_generalized_jsd(benchmark, device, impl, mode):
    if device == "cpu" and impl == "liger_fused_linear_jsd":
        pytest.skip("Liger's Triton kernels need a GPU (TRITON_INTERPRET=1 is far too slow at this size)")
    run_case(benchmark, device, "generalized_jsd", impl, mode)
