"""opdx.ops.linear_generalized_jsd_mean (row-chunked fused lm_head + GJSD with the gradients formed in the forward)
against the float64 reference: the weighted sum of ref.linear_generalized_jsd."""

import pytest
import torch

import opdx
from opdx.ops import reference as ref
from tests.conftest import devices
from tests.helpers import rel_err
from tests.test_linear_losses import leaves, make_linear, make_pair

GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float64: 1e-12}
FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}


def op(sh, sw, th, tw, sb=None, tb=None, **kw):
    return opdx.ops.linear_generalized_jsd_mean(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, **kw)


def reference(sh, sw, th, tw, sb, tb, beta, temperature, weights, vocab_size):
    per_row = ref.linear_generalized_jsd(sh, sw, th, tw, beta, temperature, None, vocab_size, sb, tb)
    w = torch.full_like(per_row, 1.0 / per_row.numel()) if weights is None else weights.to(per_row)
    return (per_row * w).sum()


def check(pair, beta, temperature=1.0, weights=None, vocab_size=None, row_chunk=None, scale=3.7):
    """Loss and the student's gradients (hidden, weight, bias) of ``scale * loss`` vs the float64 reference."""
    sh, sw, sb, th, tw, tb = pair
    x_h, x_w, x_b = leaves(sh, sw, sb)
    t_h, t_w, t_b = leaves(th, tw, tb)
    loss = op(x_h, x_w, t_h, t_w, x_b, t_b, beta=beta, temperature=temperature, weights=weights,
              vocab_size=vocab_size, row_chunk=row_chunk)
    assert loss.shape == () and loss.dtype == (torch.float64 if sh.dtype == torch.float64 else torch.float32)
    r_h, r_w, r_b = leaves(*(None if t is None else t.double() for t in (sh, sw, sb)))
    up = [None if t is None else t.double() for t in (th, tw, tb)]
    rloss = reference(r_h, r_w, up[0], up[1], r_b, up[2], beta, temperature, weights, vocab_size)
    assert rel_err(loss, rloss) < FWD_TOL[sh.dtype]
    (loss * scale).backward()
    (rloss * scale).backward()
    for name, a, e in (("hidden", x_h, r_h), ("weight", x_w, r_w), ("bias", x_b, r_b)):
        if a is None:
            continue
        assert a.grad.dtype == sh.dtype and a.grad.shape == e.shape, name
        assert rel_err(a.grad, e.grad) < GRAD_TOL[sh.dtype], name
    assert all(t.grad is None for t in (t_h, t_w, t_b) if t is not None)  # the teacher gets no gradient
    return loss, (x_h, x_w, x_b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, ds, dt, v, chunk, bias", [(1, 8, 8, 1, None, False), (9, 32, 48, 1000, 4, True),
                                                       (17, 64, 40, 4099, 5, False), (6, 16, 24, 301, None, True),
                                                       (7, 16, 16, 77, 1, True)])
def test_matches_float64_reference(device, beta, dtype, n, ds, dt, v, chunk, bias):
    pair = make_pair(n, ds, dt, v, dtype=dtype, device=device, bias=bias)
    check(pair, beta, temperature=0.8, row_chunk=chunk)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_weights_with_zeros_and_vocab_size(beta):
    n, v_tok = 11, 1500
    sh, sw, sb = make_linear(n, 32, v_tok + 64, bias=True)  # lm_heads padded differently: 1564 vs 1628 rows
    th, tw, tb = make_linear(n, 24, v_tok + 128, bias=True)
    weights = torch.rand(n)
    weights[[0, 4, 5]] = 0.0
    with pytest.raises(ValueError, match="vocab_size"):
        op(sh, sw, th, tw)
    _, (x_h, x_w, x_b) = check((sh, sw, sb, th, tw, tb), beta, temperature=1.3, weights=weights, vocab_size=v_tok,
                               row_chunk=3)
    assert (x_w.grad[v_tok:] == 0).all() and (x_b.grad[v_tok:] == 0).all()  # rows beyond vocab_size
    assert (x_h.grad[[0, 4, 5]] == 0).all() and (x_h.grad[1] != 0).any()


def test_weighted_sum_with_leading_dims_and_chunking_invariance():
    sh, sw, sb, th, tw, tb = make_pair(12, 16, 8, 500, bias=True)
    weights = torch.rand(3, 4)
    whole = op(sh, sw, th, tw, sb, tb, beta=0.2, weights=weights.view(-1))
    shaped = op(sh.view(3, 4, 16), sw, th.view(3, 4, 8), tw, sb, tb, beta=0.2, weights=weights, row_chunk=5)
    per_row = opdx.ops.linear_generalized_jsd(sh, sw, th, tw, beta=0.2, student_bias=sb, teacher_bias=tb)
    assert rel_err(shaped, whole) < 1e-6 and rel_err(whole, (per_row * weights.view(-1)).sum()) < 1e-6
    mean = op(sh, sw, th, tw, sb, tb, beta=0.2, row_chunk=7)  # default weights: the mean
    assert rel_err(mean, per_row.mean()) < 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_gradcheck_float64(beta):
    sh, sw, sb, th, tw, tb = make_pair(5, 4, 3, 9, dtype=torch.float64, bias=True)
    weights = torch.tensor([0.3, 1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: op(h, w, th, tw, b, tb, beta=beta, temperature=0.9, weights=weights, row_chunk=2),
        tuple(leaves(sh, sw, sb)),
    )


def test_frozen_weight_gets_no_weight_gradient():
    sh, sw, sb, th, tw, tb = make_pair(6, 16, 8, 300, bias=True)
    x_h = sh.clone().requires_grad_(True)
    op(x_h, sw, th, tw, sb, tb, row_chunk=4).backward()
    assert sw.grad is None and sb.grad is None
    r_h = sh.double().requires_grad_(True)
    reference(r_h, sw.double(), th.double(), tw.double(), sb.double(), tb.double(), 0.5, 1.0, None, None).backward()
    assert rel_err(x_h.grad, r_h.grad) < 1e-4
    x_w = sw.clone().requires_grad_(True)  # and the other way round: a frozen hidden, a trained lm_head
    op(sh, x_w, th, tw, row_chunk=4).backward()
    assert x_w.grad is not None and sh.grad is None


def test_no_grad_gives_the_loss_only():
    sh, sw, _, th, tw, _ = make_pair(5, 8, 8, 40)
    x_h, x_w = leaves(sh, sw)
    with torch.no_grad():
        loss = op(x_h, x_w, th, tw)
    assert not loss.requires_grad
    assert rel_err(loss, opdx.ops.linear_generalized_jsd(sh, sw, th, tw).mean()) < 1e-6


def test_second_backward_raises():
    sh, sw, _, th, tw, _ = make_pair(5, 8, 8, 40)
    x_h, x_w = leaves(sh, sw)
    loss = op(x_h, x_w, th, tw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagating twice"):
        loss.backward()
    x64 = leaves(sh.double(), sw.double())  # float64 keeps its gradients intact: backward twice agrees
    loss = op(*x64, th.double(), tw.double())
    first = torch.autograd.grad(loss, x64, retain_graph=True)
    second = torch.autograd.grad(loss, x64)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _bad(**over):
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
        (dict(teacher_hidden=torch.randn(3, 6).double(), teacher_weight=torch.randn(10, 6).double()), {}, "cast"),
        ({}, dict(vocab_size=11), "vocab_size"),
        ({}, dict(beta=1.5), "beta"),
        ({}, dict(beta="x"), "beta"),
        ({}, dict(temperature=0.0), "temperature"),
        ({}, dict(weights=torch.ones(4)), "weights has shape"),
        ({}, dict(weights=torch.ones(3, dtype=torch.int64)), "weights must have dtype"),
        ({}, dict(weights=[1.0, 1.0, 1.0]), "weights must be a torch.Tensor"),
        ({}, dict(row_chunk=0), "row_chunk"),
        ({}, dict(row_chunk=2.5), "row_chunk"),
        ({}, dict(student_bias=torch.randn(9)), "student_bias"),
        (dict(student_weight=torch.randn(10, 8).double()), {}, "dtype"),
        (dict(student_weight=torch.randn(10)), {}, r"\[V, d\]"),
        (dict(student_hidden=torch.randn(0, 8), teacher_hidden=torch.randn(0, 6)), {}, "empty"),
        (dict(teacher_hidden=torch.randn(3, 6, device="meta"), teacher_weight=torch.randn(10, 6, device="meta")), {},
         "same device"),
        ({}, dict(weights=torch.ones(3, device="meta")), "weights is on meta"),
    ],
)
def test_bad_inputs(over, opts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        opdx.ops.linear_generalized_jsd_mean(**_bad(**over), **opts)


def test_default_chunk_agrees_with_row_by_row():
    sh, sw, _, th, tw, _ = make_pair(4, 8, 8, 50)
    assert rel_err(op(sh, sw, th, tw), op(sh, sw, th, tw, row_chunk=1)) < 1e-6  # one chunk vs four
