"""token_logprobs: opdx vs torch eager (log_softmax + gather) vs torch.compile of the same, fwd and fwd+bwd.

    pytest benchmarks/test_token_logprobs.py --benchmark-only
Writes benchmarks/results/<device>-token_logprobs.json; `python benchmarks/report.py` renders the table.
"""

import pytest
import torch

import opdx
from common import measure, record

CASES = {
    "cpu": dict(n=2048, v=32768, dtype=torch.float32),
    "cuda": dict(n=16384, v=151936, dtype=torch.bfloat16),
}


def eager(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


_compiled = None


def compiled(logits, targets):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager)
    return _compiled(logits, targets)


IMPLS = {
    "opdx": lambda x, t: opdx.ops.token_logprobs(x, t),
    "opdx_inplace_bwd": lambda x, t: opdx.ops.token_logprobs(x, t, inplace_backward=True),
    "torch_eager": eager,
    "torch_compile": compiled,
}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_token_logprobs(benchmark, device, impl, mode):
    case = CASES[device]
    n, v, dtype = case["n"], case["v"], case["dtype"]
    logits = (torch.randn(n, v, device=device) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    grad_out = torch.randn(n, device=device)
    fn = IMPLS[impl]
    elem = logits.element_size()
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(logits, targets)
        bytes_moved = n * v * elem
    else:
        leaf = logits.clone().requires_grad_(True)
        # In-place backward overwrites the logits it is given: hand it a non-leaf buffer made once, outside the
        # measured call, as a model's output logits would be (the overwritten values are still valid logits).
        x = leaf * 1 if impl == "opdx_inplace_bwd" else leaf

        def run():
            out = fn(x, targets)
            return torch.autograd.grad(out, x, grad_out)[0]
        bytes_moved = 3 * n * v * elem  # forward read, backward read + gradient write
    run()  # compile / warm up outside the timed region
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    row = measure(run, device, bytes_moved=bytes_moved, reps=3)
    row["logits_mb"] = n * v * elem / 2**20
    record("token_logprobs", device, {"n": n, "v": v, "dtype": str(dtype).replace("torch.", ""), "mode": mode},
           impl, row)
