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
                          (torch.randn(4), h, w, b, t, lse, 1.0, -100, 8, True))
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


def test_frozen_lm_head_gets_no_weight_gradient():
    h, w, b = make_linear(6, 16, 300, bias=True)
    t = torch.randint(0, 300, (6,))
    x_h = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(opdx.ops.linear_token_logprobs(x_h, w, t, bias=b, vocab_tile=64).sum(), x_h)
    e_h = h.clone().requires_grad_(True)
    (e,) = torch.autograd.grad(opdx.ops.linear_token_logprobs(e_h, w.requires_grad_(True), t, bias=b).sum(), e_h)
    assert torch.allclose(g, e, rtol=1e-5, atol=1e-6)
    sh, sw, sb, th, tw, tb = make_pair(6, 16, 8, 300, bias=True)
    x_h = sh.clone().requires_grad_(True)
    loss = opdx.ops.linear_generalized_jsd(x_h, sw, th, tw, student_bias=sb, teacher_bias=tb, vocab_tile=64)
    (g,) = torch.autograd.grad(loss.sum(), x_h)
    r_h = sh.double().requires_grad_(True)
    rl = ref.linear_generalized_jsd(r_h, sw.double(), th.double(), tw.double(), 0.5, 1.0, None, None, sb.double(),
                                    tb.double())
    (rg,) = torch.autograd.grad(rl.sum(), r_h)
    assert rel_err(g, rg) < 1e-4


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
    print(f"peak growth {growth / 2**20:.0f} MiB = {100 * growth / nv:.1f}% of one [N, V] fp32 tensor")
    assert growth < 0.25 * nv, f"peak growth {growth / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------------------
# linear_generalized_jsd
# ---------------------------------------------------------------------------------------------------------------------

BETAS = [0.0, 0.5, 1.0, 0.1]


def make_pair(n, ds, dt, vs, vt=None, dtype=torch.float32, device="cpu", bias=False, close=False):
    """Student and teacher lm_heads; with close=True the teacher is a small perturbation of the student."""
    sh, sw, sb = make_linear(n, ds, vs, dtype, device, bias)
    if close:
        th = (sh.double() + 0.01 * torch.randn(n, ds, dtype=torch.float64, device=device)).to(dtype)
        tw, tb = sw, sb
    else:
        th, tw, tb = make_linear(n, dt, vt or vs, dtype, device, bias)
    return sh, sw, sb, th, tw, tb


def check_lgjsd(sh, sw, sb, th, tw, tb, beta, temperature=1.0, mask=None, vocab_size=None, vocab_tile=None,
                grad_tol=None, fwd_tol=None):
    x_h, x_w, x_b = leaves(sh, sw, sb)
    t_h, t_w, t_b = leaves(th, tw, tb)
    loss = opdx.ops.linear_generalized_jsd(x_h, x_w, t_h, t_w, beta=beta, temperature=temperature, mask=mask,
                                           vocab_size=vocab_size, student_bias=x_b, teacher_bias=t_b,
                                           vocab_tile=vocab_tile)
    assert loss.dtype == (torch.float64 if sh.dtype == torch.float64 else torch.float32)
    assert loss.shape == sh.shape[:-1]
    assert (loss >= 0).all()
    r_h, r_w, r_b = leaves(*(None if t is None else t.double() for t in (sh, sw, sb)))
    up = [None if t is None else t.double() for t in (th, tw, tb)]
    rloss = ref.linear_generalized_jsd(r_h, r_w, up[0], up[1], beta, temperature, mask, vocab_size, r_b, up[2])
    tol = 1e-12 if sh.dtype == torch.float64 else (fwd_tol or 1e-5)
    assert rel_err(loss, rloss) < tol
    g = torch.rand_like(rloss) + 0.5
    got = grads_of(loss, g, [x_h, x_w, x_b])
    want = grads_of(rloss, g, [r_h, r_w, r_b])
    for name, a, e in zip(("hidden", "weight", "bias"), got, want):
        if e is None:
            continue
        assert a.dtype == sh.dtype and a.shape == e.shape, name
        assert rel_err(a, e) < (grad_tol or GRAD_TOL[sh.dtype] * 5), name
    assert all(t.grad is None for t in (t_h, t_w, t_b) if t is not None)  # the teacher gets no gradient
    return loss


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, ds, dt, v, tile", [(1, 8, 8, 1, None), (9, 32, 48, 1000, None), (17, 64, 40, 4099, 512),
                                                (6, 16, 24, 300, 7)])
def test_lgjsd_matches_float64_reference(device, beta, dtype, n, ds, dt, v, tile):
    pair = make_pair(n, ds, dt, v, dtype=dtype, device=device, bias=(v % 2 == 0))
    check_lgjsd(*pair, beta, temperature=0.8, vocab_tile=tile)


@pytest.mark.parametrize("beta", BETAS)
def test_lgjsd_teacher_close_to_student(beta):
    """Teacher ≈ student: losses are O(δ²) and must stay accurate (relative) and non-negative."""
    pair = make_pair(12, 32, 32, 2000, close=True, bias=True)
    # The gradients are O(δ) while each fp32 GEMM logit carries ~1e-7·|logit| rounding, so their relative error sits
    # near 1e-4 (measured 0.6–1.0e-4); 3e-4 still catches any O(1) mistake in the δ-accurate formulation.
    check_lgjsd(*pair, beta, vocab_tile=300, fwd_tol=1e-4, grad_tol=3e-4)


@pytest.mark.parametrize("beta", BETAS)
def test_lgjsd_mask_and_vocab_alignment(beta):
    n, v_tok = 10, 1500
    sh, sw, sb = make_linear(n, 32, v_tok + 64, bias=True)   # padded differently: 1564 vs 1628 rows
    th, tw, tb = make_linear(n, 24, v_tok + 128, bias=True)
    mask = torch.rand(2, 5) < 0.7
    mask[0, 0] = False
    mask[1, 1] = True
    with pytest.raises(ValueError, match="vocab_size"):
        opdx.ops.linear_generalized_jsd(sh, sw, th, tw)
    loss = check_lgjsd(sh.view(2, 5, 32), sw, sb, th.view(2, 5, 24), tw, tb, beta, mask=mask, vocab_size=v_tok,
                       vocab_tile=256)
    assert loss.shape == (2, 5) and (loss[~mask] == 0).all() and (loss[mask] > 0).all()
    x_h, x_w, x_b = leaves(sh, sw, sb)
    out = opdx.ops.linear_generalized_jsd(x_h, x_w, th, tw, beta=beta, mask=mask.view(-1), vocab_size=v_tok,
                                          student_bias=x_b, teacher_bias=tb)
    out.sum().backward()
    assert (x_w.grad[v_tok:] == 0).all() and (x_b.grad[v_tok:] == 0).all()  # rows beyond vocab_size: no gradient
    assert (x_h.grad[~mask.view(-1)] == 0).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_lgjsd_agrees_with_generalized_jsd_on_formed_logits(beta, temperature):
    n, v = 20, 3000
    sh, sw, sb, th, tw, tb = make_pair(n, 48, 32, v, bias=True)
    mask = torch.rand(n) < 0.8
    x_h, x_w, x_b = leaves(sh, sw, sb)
    loss = opdx.ops.linear_generalized_jsd(x_h, x_w, th, tw, beta=beta, temperature=temperature, mask=mask,
                                           student_bias=x_b, teacher_bias=tb, vocab_tile=640)
    e_h, e_w, e_b = leaves(sh, sw, sb)
    eloss = opdx.ops.generalized_jsd(e_h @ e_w.t() + e_b, th @ tw.t() + tb, beta=beta, temperature=temperature,
                                     mask=mask)
    assert rel_err(loss, eloss) < 1e-5
    g = torch.rand(n) + 0.5
    for a, e in zip(grads_of(loss, g, [x_h, x_w, x_b]), grads_of(eloss, g, [e_h, e_w, e_b])):
        assert rel_err(a, e) < 2e-5


@pytest.mark.parametrize("beta", BETAS)
def test_lgjsd_gradcheck_float64(beta):
    sh, sw, sb, th, tw, tb = make_pair(5, 4, 3, 9, dtype=torch.float64, bias=True)
    mask = torch.tensor([True, True, False, True, True])
    x = leaves(sh, sw, sb)
    assert torch.autograd.gradcheck(
        lambda h, w, b: opdx.ops.linear_generalized_jsd(h, w, th, tw, beta=beta, temperature=0.9, mask=mask,
                                                        student_bias=b, teacher_bias=tb, vocab_tile=4),
        tuple(x),
    )


def test_lgjsd_opcheck_and_compile():
    sh, sw, sb, th, tw, tb = make_pair(4, 8, 6, 33, bias=True)
    args = (sh, sw, sb, th, tw, tb, None, 33, 0.5, 1.0, 8)
    torch.library.opcheck(torch.ops.opdx.linear_generalized_jsd_fwd.default, args)
    _, stats = torch.ops.opdx.linear_generalized_jsd_fwd(*args)
    torch.library.opcheck(torch.ops.opdx.linear_generalized_jsd_bwd.default,
                          (torch.randn(4), sh, sw, sb, th, tw, tb, None, stats, 33, 0.5, 1.0, 8, True))
    torch._dynamo.reset()

    def f(h, w, b):
        return opdx.ops.linear_generalized_jsd(h, w, th, tw, beta=0.3, student_bias=b, teacher_bias=tb).mean()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    x, y = leaves(sh, sw, sb), leaves(sh, sw, sb)
    out, ref_out = compiled(*x), f(*y)
    assert torch.allclose(out, ref_out)
    for a, e in zip(torch.autograd.grad(out, x), torch.autograd.grad(ref_out, y)):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-7)


def _pair_bad(**over):
    sh, sw, _, th, tw, _ = make_pair(3, 8, 6, 10)
    kw = dict(student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over, opts, match",
    [
        (dict(teacher_hidden=torch.randn(4, 6)), {}, "leading"),
        (dict(teacher_weight=torch.randn(10, 5)), {}, "hidden size"),
        (dict(teacher_weight=torch.randn(12, 6)), {}, "vocab_size"),
        ({}, dict(vocab_size=11), "vocab_size"),
        ({}, dict(vocab_size=0), "vocab_size"),
        ({}, dict(beta=1.5), "beta"),
        ({}, dict(beta=float("nan")), "beta"),
        ({}, dict(temperature=-1.0), "temperature"),
        ({}, dict(mask=torch.ones(3)), "bool"),
        ({}, dict(mask=torch.ones(4, dtype=torch.bool)), "mask"),
        ({}, dict(student_bias=torch.randn(9)), "student_bias"),
        (dict(student_weight=torch.randn(10, 8).double()), {}, "dtype"),
        (dict(student_hidden=torch.randn(0, 8)), {}, "empty"),
    ],
)
def test_lgjsd_bad_inputs(over, opts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        opdx.ops.linear_generalized_jsd(**_pair_bad(**over), **opts)


def test_lgjsd_memory_independent_of_vocab():
    """fp32 forward + backward at N = 2048, V = 262144: peak growth < 25% of one [N, V] fp32 tensor. Hidden sizes
    64 (student) / 32 (teacher) instead of 256 keep the 8 tile-GEMM sweeps within the test-time budget on 2 cores;
    the tile buffers, which are what could scale with V, do not depend on d (test_ltl_memory_... covers d = 256)."""
    sh, sw, _ = make_linear(MEM_N, 64, MEM_V)
    th, tw, _ = make_linear(MEM_N, 32, MEM_V)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    nv = MEM_N * MEM_V * 4

    def fwd_bwd():
        loss = opdx.ops.linear_generalized_jsd(sh, sw, th, tw, beta=0.5)
        return torch.autograd.grad(loss.sum(), (sh, sw))

    (gh, gw), growth = peak_memory_growth(fwd_bwd)
    assert gw.shape == sw.shape and torch.isfinite(gh).all()
    print(f"peak growth {growth / 2**20:.0f} MiB = {100 * growth / nv:.1f}% of one [N, V] fp32 tensor")
    assert growth < 0.25 * nv, f"peak growth {growth / 2**20:.0f} MiB"
