"""Fused lm_head + loss ops (opdx.ops.linear_token_logprobs, opdx.ops.linear_generalized_jsd) against the ops on
explicitly formed logits and the float64 references."""

import pytest
import torch

import opdx
from opdx.ops import reference as ref
from opdx.profiling import peak_memory_growth
from tests.conftest import devices
from tests.helpers import rel_err

FWD_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


def make_linear(n, d, v, dtype=torch.float32, device="cpu", bias=False, scale=3.0):
    """hidden [n, d] ~ N(0, 1), weight [v, d] with logits of standard deviation ~scale."""
    h = torch.randn(n, d, dtype=torch.float64, device=device)
    w = torch.randn(v, d, dtype=torch.float64, device=device) * (scale / d**0.5)
    b = torch.randn(v, dtype=torch.float64, device=device) if bias else None
    return h.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def grads_of(out, g, inputs):
    present = [t for t in inputs if t is not None]
    gs = torch.autograd.grad((out * g.to(out.dtype)).sum(), present)
    it = iter(gs)
    return [None if t is None else next(it) for t in inputs]


# ---------------------------------------------------------------------------------------------------------------------
# linear_token_logprobs
# ---------------------------------------------------------------------------------------------------------------------


def check_ltl(h, w, b, targets, temperature=1.0, ignore_index=-100, vocab_tile=None, grad_tol=None):
    x_h, x_w, x_b = leaves(h, w, b)
    lp = opdx.ops.linear_token_logprobs(x_h, x_w, targets, bias=x_b, temperature=temperature,
                                        ignore_index=ignore_index, vocab_tile=vocab_tile)
    assert lp.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    assert lp.shape == targets.shape
    r_h, r_w, r_b = leaves(*(None if t is None else t.double() for t in (h, w, b)))
    rlp = ref.linear_token_logprobs(r_h, r_w, targets, r_b, temperature, ignore_index)
    tol = 1e-12 if h.dtype == torch.float64 else FWD_TOL
    assert rel_err(lp, rlp) < tol
    g = torch.randn_like(rlp)
    got = grads_of(lp, g, [x_h, x_w, x_b])
    want = grads_of(rlp, g, [r_h, r_w, r_b])
    for name, a, e in zip(("hidden", "weight", "bias"), got, want):
        if e is None:
            continue
        assert a.dtype == h.dtype and a.shape == e.shape, name
        assert rel_err(a, e) < (grad_tol or GRAD_TOL[h.dtype]), name
    return lp


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d, v, tile", [(1, 8, 1, None), (7, 32, 1000, None), (33, 64, 4099, 512),
                                           (16, 48, 1037, 100), (5, 16, 300, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_ltl_matches_float64_reference(device, dtype, n, d, v, tile, bias):
    h, w, b = make_linear(n, d, v, dtype, device, bias)
    targets = torch.randint(0, v, (n,), device=device)
    check_ltl(h, w, b, targets, temperature=0.7, vocab_tile=tile)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_ltl_agrees_with_token_logprobs_on_formed_logits(temperature):
    """Same numbers as token_logprobs on h·Wᵀ + b formed in float32, to fp32 rounding (values and gradients)."""
    n, d, v = 24, 64, 5000
    h, w, b = make_linear(n, d, v, bias=True)
    targets = torch.randint(0, v, (3, 8))
    x_h, x_w, x_b = leaves(h, w, b)
    lp = opdx.ops.linear_token_logprobs(x_h.view(3, 8, d), x_w, targets, bias=x_b, temperature=temperature,
                                        vocab_tile=777)
    e_h, e_w, e_b = leaves(h, w, b)
    elp = opdx.ops.token_logprobs((e_h @ e_w.t() + e_b).view(3, 8, v), targets, temperature=temperature)
    assert lp.shape == (3, 8)
    assert rel_err(lp, elp) < 1e-6
    g = torch.randn(3, 8)
    for a, e in zip(grads_of(lp, g, [x_h, x_w, x_b]), grads_of(elp, g, [e_h, e_w, e_b])):
        assert rel_err(a, e) < 1e-5


def test_ltl_ignore_index_gives_zero_and_zero_grad():
    n, d, v = 10, 16, 257
    h, w, b = make_linear(n, d, v, bias=True)
    targets = torch.randint(0, v, (n,))
    targets[2] = -100
    targets[7] = -100
    x_h, x_w, x_b = leaves(h, w, b)
    lp = opdx.ops.linear_token_logprobs(x_h, x_w, targets, bias=x_b, vocab_tile=64)
    assert lp[2] == 0 and lp[7] == 0 and (lp[targets != -100] < 0).all()
    lp.sum().backward()
    assert (x_h.grad[2] == 0).all() and (x_h.grad[7] == 0).all() and x_h.grad[0].abs().sum() > 0
    check_ltl(h, w, b, targets, vocab_tile=64)
    custom = torch.randint(0, v, (n,))
    custom[0] = 5
    assert opdx.ops.linear_token_logprobs(h, w, custom, ignore_index=5)[0] == 0
    all_ignored = torch.full((n,), -100)
    x_h, x_w = leaves(h, w)
    lp = opdx.ops.linear_token_logprobs(x_h, x_w, all_ignored)
    assert (lp == 0).all()
    lp.sum().backward()
    assert (x_h.grad == 0).all() and (x_w.grad == 0).all()


def test_ltl_gradcheck_float64():
    h, w, b = leaves(*make_linear(6, 5, 11, torch.float64, bias=True))
    t = torch.randint(0, 11, (2, 3))
    t[1, 0] = -100
    assert torch.autograd.gradcheck(
        lambda h, w, b: opdx.ops.linear_token_logprobs(h.view(2, 3, 5), w, t, bias=b, temperature=0.8, vocab_tile=4),
        (h, w, b),
    )


def test_ltl_large_logits_and_half():
    h, w, _ = make_linear(9, 32, 3001, scale=30.0)
    check_ltl(h, w, None, torch.randint(0, 3001, (9,)), temperature=0.9, vocab_tile=1000, grad_tol=1e-4)
    h, w, b = make_linear(9, 32, 3001, torch.float16, bias=True)
    check_ltl(h, w, b, torch.randint(0, 3001, (9,)), vocab_tile=1000)


def test_ltl_opcheck_and_compile():
    h, w, b = make_linear(4, 8, 33, bias=True)
    t = torch.randint(0, 33, (4,))
    torch.library.opcheck(torch.ops.opdx.linear_token_logprobs_fwd.default, (h, w, b, t, 1.0, -100, 8))
    _, lse = torch.ops.opdx.linear_token_logprobs_fwd(h, w, b, t, 1.0, -100, 8)
    torch.library.opcheck(torch.ops.opdx.linear_token_logprobs_bwd.default,
                          (torch.randn(4), h, w, b, t, lse, 1.0, -100, 8))
    torch._dynamo.reset()

    def f(h, w, b, t):
        return (opdx.ops.linear_token_logprobs(h, w, t, bias=b, temperature=0.9) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    x = leaves(h, w, b)
    y = leaves(h, w, b)
    out = compiled(*x, t)
    ref_out = f(*y, t)
    assert torch.allclose(out, ref_out)
    for a, e in zip(torch.autograd.grad(out, x), torch.autograd.grad(ref_out, y)):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(3, 8), torch.randn(10, 7), torch.randint(0, 10, (3,)), None), "hidden size"),
        (lambda: (torch.randn(3, 8), torch.randn(10), torch.randint(0, 10, (3,)), None), r"\[V, d\]"),
        (lambda: (torch.randn(3, 8), torch.randn(10, 8).double(), torch.randint(0, 10, (3,)), None), "dtype"),
        (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.randint(0, 10, (4,)), None), "targets has shape"),
        (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.tensor([0, 10, 1]), None), "outside"),
        (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.randint(0, 10, (3,)).float(), None), "integer"),
        (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.randint(0, 10, (3,)), torch.randn(9)), "bias"),
        (lambda: (torch.randn(3, 8).int(), torch.randn(10, 8), torch.randint(0, 10, (3,)), None), "dtype"),
        (lambda: (torch.randn(0, 8), torch.randn(10, 8), torch.zeros(0, dtype=torch.long), None), "empty"),
        (lambda: (torch.randn(3, 8), torch.randn(0, 8), torch.zeros(3, dtype=torch.long), None), "empty"),
    ],
)
def test_ltl_bad_inputs(make, match):
    h, w, t, b = make()
    with pytest.raises((ValueError, TypeError), match=match):
        opdx.ops.linear_token_logprobs(h, w, t, bias=b)


def test_ltl_bad_options():
    h, w, _ = make_linear(2, 4, 6)
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="temperature"):
        opdx.ops.linear_token_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_tile"):
        opdx.ops.linear_token_logprobs(h, w, t, vocab_tile=0)
    with pytest.raises(ValueError, match="same device"):
        opdx.ops.linear_token_logprobs(h, w.to("meta"), t)


MEM_N, MEM_D, MEM_V = 2048, 256, 262144


def test_ltl_memory_independent_of_vocab():
    """fp32 forward + backward at V = 262144: peak growth < 25% of one [N, V] fp32 tensor (2 GiB); grad_W itself
    is V·d·4 = 256 MiB (12.5%)."""
    h, w, _ = make_linear(MEM_N, MEM_D, MEM_V)
    h.requires_grad_(True)
    w.requires_grad_(True)
    targets = torch.randint(0, MEM_V, (MEM_N,))
    nv = MEM_N * MEM_V * 4

    def fwd_bwd():
        lp = opdx.ops.linear_token_logprobs(h, w, targets)
        return torch.autograd.grad(lp.sum(), (h, w))

    (gh, gw), growth = peak_memory_growth(fwd_bwd)
    assert gw.shape == w.shape and torch.isfinite(gh).all()
    assert growth < 0.25 * nv, f"peak growth {growth / 2**20:.0f} MiB"
