import math

import pytest
import torch
import torch.nn.functional as F

import opdx
import opdx.losses
from opdx.ops import reference as ref
from opdx.profiling import peak_memory_growth
from tests.conftest import devices
from tests.helpers import random_logits, rel_err

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
# gradients are written in the input dtype: limited by its rounding (2^-8 / 2^-11 relative)
GRAD_TOL = {torch.float32: 5e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-11}


def check(student, teacher, beta, temperature=1.0, mask=None, vocab_size=None, grad_tol=None, fwd_tol=None,
          grad_dtype=None, ref_grad=True):
    x = student.detach().clone().requires_grad_(True)
    loss = opdx.ops.generalized_jsd(x, teacher, beta=beta, temperature=temperature, mask=mask,
                                    vocab_size=vocab_size, grad_dtype=grad_dtype)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and loss.shape == student.shape[:-1]
    assert (loss >= -1e-6).all()
    x64 = student.detach().to(torch.float64).requires_grad_(True)
    s64, t64 = x64, teacher.detach().to(torch.float64)
    if vocab_size is not None:
        s64, t64 = s64[..., :vocab_size], t64[..., :vocab_size]
    rloss = ref.generalized_jsd(s64, t64, beta, temperature, mask)
    assert rel_err(loss, rloss) < (fwd_tol or FWD_TOL[student.dtype]), (rel_err(loss, rloss), loss, rloss)
    g = torch.rand_like(rloss) + 0.5
    (gx,) = torch.autograd.grad((loss * g.to(loss.dtype)).sum(), x)
    if not ref_grad:  # the reference's autograd is not finite through one-sided −inf entries
        assert torch.isfinite(gx).all()
        return loss, gx
    (rgx,) = torch.autograd.grad((rloss * g).sum(), x64)
    assert gx.dtype == student.dtype and gx.shape == student.shape
    # plus twice the error of the exact gradient rounded to the output dtype (fp16 flushes tiny gradients to 0)
    floor = rel_err(rgx.to(student.dtype), rgx)
    assert rel_err(gx, rgx) < (grad_tol or GRAD_TOL[student.dtype]) + 2 * floor, (rel_err(gx, rgx), floor)
    return loss, gx


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 1000), (5, 4099), (2, 3, 333), (2, 49157), (300, 1001)])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_float64_reference(device, dtype, shape, beta, temperature):
    s = random_logits(shape, dtype, device)
    t = random_logits(shape, dtype, device)
    # Mixture gradients of very peaked rows (T = 0.5 doubles the logit scale) carry the cancellation left in the
    # row total: measured fp32 error median 1e-5, max 4e-5 in 12 draws, one draw in ~300 up to 1.7e-4 (V = 49157).
    grad_tol = 3e-4 if (dtype == torch.float32 and temperature < 1.0 and 0.0 < beta < 1.0) else None
    check(s, t, beta, temperature, grad_tol=grad_tol)


@pytest.mark.parametrize("beta", BETAS)
def test_large_vocab_and_float64(beta):
    check(random_logits((2, 151936), torch.float32), random_logits((2, 151936), torch.float32), beta, 0.8)
    check(random_logits((3, 2051), torch.float64), random_logits((3, 2051), torch.float64), beta, 1.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", BETAS)
def test_neg_inf_entries(dtype, beta):
    # the same vocabulary entries masked on both sides: always well defined
    s = random_logits((6, 3001), dtype, neg_inf_frac=0.3)
    t = random_logits((6, 3001), dtype).masked_fill(torch.isinf(s), float("-inf"))
    check(s, t, beta)
    # one-sided −inf is finite where the side with zero probability is not the divergence's reference:
    # student −inf is fine for β > 0 (p_S = 0 entries), teacher −inf for β < 1
    one_sided = random_logits((4, 2000), dtype)
    masked = random_logits((4, 2000), dtype, neg_inf_frac=0.2)
    if beta > 0:
        check(masked, one_sided, beta, ref_grad=False)
    if beta < 1:
        check(one_sided, masked, beta, ref_grad=False)


@pytest.mark.parametrize("beta", BETAS)
def test_huge_logits(beta):
    # |x| ~ 1e4: fp32 spacing ~1e-3 in x/T and the lse, so log-probs carry ~1e-3 absolute error; the β = 1 gradient
    # multiplies a difference of two such log-probs (OPDX_TEST_SEED=1693513103 gave 2.5e-3 relative)
    s = random_logits((4, 5000), torch.float32, huge=True)
    t = random_logits((4, 5000), torch.float32, huge=True)
    check(s, t, beta, temperature=0.7, fwd_tol=2e-3, grad_tol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("beta", BETAS)
def test_identical_teacher_and_student(dtype, beta):
    s = random_logits((3, 5, 777), dtype, neg_inf_frac=0.1).requires_grad_(True)
    loss = opdx.ops.generalized_jsd(s, s.detach().clone(), beta=beta, temperature=0.9)
    assert torch.equal(loss, torch.zeros_like(loss))
    (g,) = torch.autograd.grad(loss.sum(), s)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("beta", BETAS)
def test_bf16_near_identical_is_never_negative(beta):
    """ms-swift issue 10156: JSD computed in bf16 comes out negative when teacher ≈ student."""
    base = torch.randn(64, 32000) * 4
    s = base.bfloat16()
    t = (base + torch.randn_like(base) * 1e-2).bfloat16()
    loss = opdx.ops.generalized_jsd(s, t, beta=beta)
    assert (loss >= -1e-6).all()
    assert (loss >= 0).all()  # sums of clamped non-negative terms
    rloss = ref.generalized_jsd(s.double(), t.double(), beta)
    assert rel_err(loss, rloss) < 1e-4  # relative accuracy even though the loss is ~1e-5


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_non_contiguous_rows_are_not_copied(beta):
    base_s = random_logits((3, 9, 1037), torch.float32)
    base_t = random_logits((3, 9, 1037), torch.float32)
    check(base_s[:, :-1, :], base_t[:, 1:, :], beta)
    check(random_logits((10, 517), torch.bfloat16)[::3], random_logits((4, 517), torch.bfloat16), beta)
    four_d = random_logits((2, 3, 4, 5, 66), torch.float32)[:, ::2, :, 1:]
    check(four_d, random_logits(four_d.shape, torch.float32), beta)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_vocab_size_alignment(beta):
    s = random_logits((2, 4, 152), torch.float32)  # think 152064 (padded lm_head) vs 151936
    t = random_logits((2, 4, 140), torch.float32)
    with pytest.raises(ValueError, match="vocab_size"):
        opdx.ops.generalized_jsd(s, t, beta=beta)
    _, g = check(s, t, beta, vocab_size=130)
    assert g.shape == s.shape and (g[..., 130:] == 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        opdx.ops.generalized_jsd(s, t, vocab_size=141)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_mask(beta):
    s = random_logits((4, 6, 300), torch.float32)
    t = random_logits((4, 6, 300), torch.float32)
    mask = torch.rand(4, 6) > 0.3
    mask[3] = False
    loss, g = check(s, t, beta, mask=mask)
    assert (loss[~mask] == 0).all() and (loss[mask] > 0).all()
    assert (g[~mask] == 0).all() and (g[mask].abs().sum(-1) > 0).all()


def test_grad_dtype_float32():
    s = random_logits((3, 1000), torch.bfloat16).requires_grad_(True)
    t = random_logits((3, 1000), torch.bfloat16)
    loss = opdx.ops.generalized_jsd(s, t, grad_dtype=torch.float32)
    _, grad = torch.ops.opdx.generalized_jsd_fwd(s.detach(), t, None, 0.5, 1.0, True, True)
    assert grad.dtype == torch.float32
    (g,) = torch.autograd.grad(loss.sum(), s)
    x64 = s.detach().double().requires_grad_(True)
    (rg,) = torch.autograd.grad(ref.generalized_jsd(x64, t.double(), 0.5).sum(), x64)
    assert rel_err(g, rg) < 8e-3
    assert rel_err(grad, rg) < 1e-5  # the stored fp32 gradient itself is fp32-accurate


def test_no_grad_stores_nothing():
    s = random_logits((3, 100), torch.float32)
    _, grad = torch.ops.opdx.generalized_jsd_fwd(s, s, None, 0.5, 1.0, False, False)
    assert grad.numel() == 0
    with torch.no_grad():
        opdx.ops.generalized_jsd(s.requires_grad_(True), s)


def test_teacher_gets_no_gradient_and_retain_graph_reuse_raises():
    s = random_logits((3, 50), torch.float32).requires_grad_(True)
    t = random_logits((3, 50), torch.float32).requires_grad_(True)
    loss = opdx.ops.generalized_jsd(s, t).sum()
    gs, gt = torch.autograd.grad(loss, (s, t), allow_unused=True, retain_graph=True)
    assert gs is not None and gt is None
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, s)


@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck_float64(beta):
    s = random_logits((3, 4, 17), torch.float64).requires_grad_(True)
    t = random_logits((3, 4, 17), torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 1] = False
    assert torch.autograd.gradcheck(
        lambda x: opdx.ops.generalized_jsd(x, t, beta=beta, temperature=0.8, mask=mask), (s,)
    )
    xs = random_logits((5, 9, 13), torch.float64)[:, 1:7].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: opdx.ops.generalized_jsd(x, t.new_zeros(5, 6, 13) + 1.0, beta=beta),
                                    (xs,))


def test_opcheck():
    s = random_logits((4, 33), torch.float32)
    t = random_logits((4, 33), torch.float32)
    mask = torch.tensor([True, False, True, True])
    for args in [(s, t, None, 0.5, 1.0, True, False), (s, t, mask, 0.0, 2.0, True, True),
                 (s, t, None, 1.0, 0.5, False, False)]:
        torch.library.opcheck(torch.ops.opdx.generalized_jsd_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(s, t, mask):
        return opdx.ops.generalized_jsd(s, t, beta=0.3, temperature=0.9, mask=mask).sum() * 2

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    s = random_logits((2, 5, 129), torch.float32)
    t = random_logits((2, 5, 129), torch.float32)
    mask = torch.rand(2, 5) > 0.2
    x = s.clone().requires_grad_(True)
    out = compiled(x, t, mask)
    (g,) = torch.autograd.grad(out, x)
    x2 = s.clone().requires_grad_(True)
    ref_out = f(x2, t, mask)
    (rg,) = torch.autograd.grad(ref_out, x2)
    assert torch.allclose(out, ref_out) and torch.allclose(g, rg)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(3, 5), torch.randn(4, 5)), "leading"),
        (lambda: (torch.randn(3, 5), torch.randn(3, 6)), "vocab_size"),
        (lambda: (torch.randn(3, 5), torch.randn(3, 5).double()), "cast"),
        (lambda: (torch.randn(3, 5).int(), torch.randn(3, 5).int()), "dtype"),
        (lambda: (torch.randn(0, 5), torch.randn(0, 5)), "empty"),
        (lambda: ([1.0], torch.randn(3, 5)), "torch.Tensor"),
    ],
)
def test_bad_inputs(make, match):
    s, t = make()
    with pytest.raises((ValueError, TypeError), match=match):
        opdx.ops.generalized_jsd(s, t)


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": -0.1}, "beta"), ({"beta": 1.5}, "beta"), ({"beta": float("nan")}, "beta"),
    ({"temperature": 0.0}, "temperature"), ({"mask": torch.ones(3)}, "bool"),
    ({"mask": torch.ones(2, dtype=torch.bool)}, "mask"), ({"grad_dtype": torch.float16}, "grad_dtype"),
    ({"mask": torch.ones(3, dtype=torch.bool, device="meta")}, "same device"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        opdx.ops.generalized_jsd(torch.randn(3, 5), torch.randn(3, 5), **kwargs)


def test_device_mismatch_meta():
    with pytest.raises(ValueError, match="same device"):
        opdx.ops.generalized_jsd(torch.randn(2, 3), torch.randn(2, 3, device="meta"))


# ---- TRL drop-in -------------------------------------------------------------------------------------------------
def trl_style_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                   reduction="batchmean"):
    """Local re-implementation of TRL GKDTrainer.generalized_jsd_loss semantics (float64 here)."""
    ls = F.log_softmax(student_logits / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=ls.dtype)
        lm = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            lm, ls, reduction="none", log_target=True)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / (jsd.size(0) * jsd.size(1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_drop_in_matches_trl_semantics(beta, reduction, with_labels):
    s = random_logits((3, 7, 211), torch.float32)
    t = random_logits((3, 7, 211), torch.float32)
    labels = torch.randint(0, 211, (3, 7)) if with_labels else None
    if with_labels:
        labels[0, :3] = -100
        labels[2, 5] = -100
    x = s.clone().requires_grad_(True)
    out = opdx.losses.generalized_jsd_loss(x, t, labels, beta=beta, temperature=1.3, reduction=reduction)
    x64 = s.double().requires_grad_(True)
    expected = trl_style_generalized_jsd_loss(x64, t.double(), labels, beta=beta, temperature=1.3,
                                              reduction=reduction)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 2e-5
    (g,) = torch.autograd.grad((out * 1.7).sum(), x)
    (rg,) = torch.autograd.grad((expected * 1.7).sum(), x64)
    assert rel_err(g, rg) < 5e-5
    module = opdx.losses.GeneralizedJSDLoss(beta=beta, temperature=1.3, reduction=reduction)
    assert rel_err(module(s, t, labels), expected) < 2e-5


def test_drop_in_2d_logits_and_bad_reduction():
    s, t = random_logits((5, 64), torch.float32), random_logits((5, 64), torch.float32)
    expected = trl_style_generalized_jsd_loss(s.double(), t.double())  # TRL divides by size(0)·size(1) literally
    assert rel_err(opdx.losses.generalized_jsd_loss(s, t), expected) < 2e-5
    with pytest.raises(ValueError, match="reduction"):
        opdx.losses.generalized_jsd_loss(s, t, reduction="avg")


def test_memory_is_one_gradient():
    """N=4096, V=131072 fp32 forward+backward: growth <= 1.5x one logits tensor (eager holds several [N, V])."""
    n, v = 4096, 131072
    size = n * v * 4
    row_s, row_t = torch.randn(v) * 3, torch.randn(v) * 3
    student = row_s.expand(n, v).clone().requires_grad_(True)  # cheap to make; every page is touched
    teacher = row_t.expand(n, v).clone()

    def fwd_bwd():
        loss = opdx.ops.generalized_jsd(student, teacher, beta=0.5)
        (g,) = torch.autograd.grad(loss.sum(), student)
        return loss.detach()[:2].clone(), g[0, :4].clone()

    (loss, g0), growth = peak_memory_growth(fwd_bwd)
    assert growth < 1.5 * size, growth / size
    r = ref.generalized_jsd(row_s.double()[None], row_t.double()[None], 0.5)
    assert rel_err(loss, r.expand(2)) < 1e-4 and torch.isfinite(g0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scale_grad_scales_each_row_in_place(device, dtype):
    """The backward's in-place row scaling: grad[r] *= scale[r] computed in the accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad = torch.randn(7, 1003, device=device).to(dtype)[:, 1:]  # rows not 16-byte aligned
    grad = grad.contiguous()
    scale = torch.randn(7, device=device, dtype=acc)
    expected = (grad.to(acc) * scale[:, None]).to(dtype)
    ptr = grad.data_ptr()
    torch.ops.opdx.generalized_jsd_scale_grad_(grad, scale)
    assert grad.data_ptr() == ptr
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_scale_grad_rejects_bad_inputs():
    grad = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="scale must be a contiguous \\[4\\]"):
        torch.ops.opdx.generalized_jsd_scale_grad_(grad, torch.ones(3))
    with pytest.raises(RuntimeError, match="scale must be Float"):
        torch.ops.opdx.generalized_jsd_scale_grad_(grad, torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad must be contiguous"):
        torch.ops.opdx.generalized_jsd_scale_grad_(torch.randn(10, 4).t(), torch.ones(4))
