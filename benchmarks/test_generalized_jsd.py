"""generalized_jsd: opdx vs a TRL-style eager implementation vs torch.compile of the reference (and LigerJSD on
CUDA where installed), fwd and fwd+bwd.

    pytest benchmarks/test_generalized_jsd.py --benchmark-only
Bytes counted: one read of each input (+ one write of the student gradient for fwd+bwd).
"""

import pytest
import torch
import torch.nn.functional as F

import opdx
from common import measure, record
from opdx.ops import reference

CASES = {
    "cpu": [dict(n=2048, v=32768, dtype=torch.float32)],
    "cuda": [dict(n=8192, v=131072, dtype=torch.bfloat16), dict(n=8192, v=151936, dtype=torch.bfloat16)],
}


def trl_style(student, teacher, beta):
    """The usual eager formulation (log_softmax + kl_div + logsumexp over a stacked mixture): several [N, V]
    temporaries, as in TRL's GKDTrainer."""
    ls = F.log_softmax(student.float(), dim=-1)
    lt = F.log_softmax(teacher.float(), dim=-1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=ls.dtype, device=ls.device)
        mix = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, lt, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mix, ls, reduction="none", log_target=True)
    return jsd.sum(-1)


_compiled = {}


def compiled_reference(student, teacher, beta):
    if beta not in _compiled:
        _compiled[beta] = torch.compile(lambda s, t: reference.generalized_jsd(s.float(), t.float(), beta))
    return _compiled[beta](student, teacher)


def liger(student, teacher, beta):  # pragma: no cover - CUDA + liger-kernel only
    from liger_kernel.transformers import LigerJSD

    return LigerJSD(beta=beta)(torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1))


IMPLS = {
    "opdx": lambda s, t, beta: opdx.ops.generalized_jsd(s, t, beta=beta),
    "trl_eager": trl_style,
    "torch_compile": compiled_reference,
    "liger": liger,
}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device,case", [(d, c) for d, cs in CASES.items() for c in cs],
                         ids=lambda x: x if isinstance(x, str) else f"{x['n']}x{x['v']}")
def test_generalized_jsd(benchmark, device, case, impl, beta, mode):
    if impl == "liger":
        pytest.importorskip("liger_kernel")
        if device == "cpu":
            pytest.skip("Liger's kernels are Triton (CUDA)")
    n, v, dtype = case["n"], case["v"], case["dtype"]
    student = (torch.randn(n, v, device=device) * 3).to(dtype)
    teacher = (torch.randn(n, v, device=device) * 3).to(dtype)
    fn = IMPLS[impl]
    elem = student.element_size()
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(student, teacher, beta)
        bytes_moved = 2 * n * v * elem
    else:
        leaf = student.clone().requires_grad_(True)

        def run():
            loss = fn(leaf, teacher, beta)
            return torch.autograd.grad(loss.sum(), leaf)[0]
        bytes_moved = 3 * n * v * elem
    run()
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    row = measure(run, device, bytes_moved=bytes_moved, reps=3)
    row["logits_mb"] = n * v * elem / 2**20
    record("generalized_jsd", device,
           {"n": n, "v": v, "dtype": str(dtype).replace("torch.", ""), "beta": beta, "mode": mode}, impl, row)
