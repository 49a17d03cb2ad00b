import pytest
import torch

import opdx
from opdx.ops import reference as ref
from opdx.profiling import peak_memory_growth
from tests.conftest import devices
from tests.helpers import random_logits, rel_err

# float32 arithmetic on exact (upcast) inputs: forward lands far under 1e-5; gradients written in bf16/fp16 are
# limited by that rounding (2^-8 / 2^-11 relative).
FWD_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


def check_against_reference(logits, targets, temperature=1.0, ignore_index=-100, entropy=True, grad_tol=None,
                            entropy_atol=1e-6):
    x = logits.detach().clone().requires_grad_(True)
    lp, h = opdx.ops.token_logprobs(x, targets, temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=True)
    assert lp.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert lp.shape == targets.shape and h.shape == targets.shape
    x64 = logits.detach().to(torch.float64).requires_grad_(True)
    rlp, rh = ref.token_logprobs(x64, targets, temperature, ignore_index, return_entropy=True)
    tol = 1e-12 if logits.dtype == torch.float64 else FWD_TOL
    # log p = x_y/T − lse is a difference of O(lse) numbers: a dominant target's log p ≈ −1e-4 carries fp32's
    # absolute rounding of the lse, ~1e-7·|lse| (1 in ~5000 draws of (1, 7) at T = 0.5; the exact fix, the non-max
    # sum through log1p in SoftmaxStats, is a follow-up), so an absolute floor of a few ulp of the lse applies
    lse_ulp = 8 * torch.finfo(torch.float32).eps * torch.logsumexp(x64.detach() / temperature, -1).abs().max().item()
    floor = 0.0 if logits.dtype == torch.float64 else lse_ulp
    assert rel_err(lp, rlp) < tol or (lp.double() - rlp).abs().max().item() < floor
    # the entropy of a near-one-hot row is ~1e-3 and fp32 resolves it to ~1e-7 absolute
    assert rel_err(h, rh) < tol or (h.double() - rh).abs().max().item() < entropy_atol
    g_lp = torch.randn_like(rlp)
    g_h = torch.randn_like(rh) if entropy else torch.zeros_like(rh)
    (gx,) = torch.autograd.grad((lp * g_lp.to(lp.dtype)).sum() + (h * g_h.to(h.dtype)).sum(), x)
    (rgx,) = torch.autograd.grad((rlp * g_lp).sum() + (rh * g_h).sum(), x64)
    assert gx.dtype == logits.dtype and gx.shape == logits.shape
    assert rel_err(gx, rgx) < (grad_tol or GRAD_TOL[logits.dtype])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 1000), (5, 4099), (2, 49152), (2, 151936), (4, 3, 333)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_float64_reference(device, dtype, shape, temperature):
    logits = random_logits(shape, dtype, device)
    targets = torch.randint(0, shape[-1], shape[:-1], device=device)
    check_against_reference(logits, targets, temperature)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_entries_and_huge_logits(device, dtype):
    logits = random_logits((6, 3001), dtype, device, neg_inf_frac=0.3)
    targets = torch.randint(0, 3001, (6,), device=device)
    finite = torch.isfinite(logits.gather(-1, targets[:, None]).squeeze(-1))
    targets = torch.where(finite, targets, torch.zeros_like(targets))  # column 0 is never −inf
    check_against_reference(logits, targets)
    huge = random_logits((4, 5000), dtype, device, huge=True)
    # at |x| ~ 1e4 the fp32 spacing is ~1e-3, so x/T and the saved lse carry ~1e-3 absolute error into log p
    # (and so ~1e-4 absolute into the entropy of these near-one-hot rows)
    check_against_reference(huge, torch.randint(0, 5000, (4,), device=device), temperature=0.7,
                            grad_tol=2e-3 if dtype == torch.float32 else None, entropy_atol=2e-4)


@pytest.mark.parametrize("device", devices())
def test_target_at_neg_inf_gives_neg_inf(device):
    logits = random_logits((2, 10), torch.float32, device)
    logits[0, 3] = float("-inf")
    lp = opdx.ops.token_logprobs(logits, torch.tensor([3, 1], device=device))
    assert lp[0].item() == float("-inf") and torch.isfinite(lp[1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_rows_are_not_copied(device, dtype):
    base = random_logits((3, 9, 1037), dtype, device)
    sliced = base[:, :-1, :]  # the usual shifted-logits view: rows with two strides
    targets = torch.randint(0, 1037, (3, 8), device=device)
    check_against_reference(sliced, targets)
    strided = random_logits((10, 517), dtype, device)[::3]
    check_against_reference(strided, torch.randint(0, 517, (4,), device=device))
    four_d = random_logits((2, 3, 4, 5, 66), dtype, device)[:, ::2, :, 1:]
    check_against_reference(four_d, torch.randint(0, 66, four_d.shape[:-1], device=device))


@pytest.mark.parametrize("device", devices())
def test_ignore_index_gives_zero_and_zero_grad(device):
    logits = random_logits((4, 6, 300), torch.float32, device).requires_grad_(True)
    targets = torch.randint(0, 300, (4, 6), device=device)
    targets[1, 2] = -100
    targets[3, :] = -100
    lp, h = opdx.ops.token_logprobs(logits, targets, return_entropy=True)
    assert lp[1, 2] == 0 and (lp[3] == 0).all() and h[1, 2] == 0
    (lp.sum() + h.sum()).backward()
    assert (logits.grad[1, 2] == 0).all() and (logits.grad[3] == 0).all()
    assert logits.grad[0].abs().sum() > 0
    check_against_reference(logits.detach(), targets)
    custom = torch.randint(0, 300, (4, 6), device=device)
    custom[0, 0] = 7
    lp2 = opdx.ops.token_logprobs(logits.detach(), custom, ignore_index=7)
    assert lp2[0, 0] == 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_matches(device, dtype):
    logits = random_logits((5, 2049), dtype, device)
    targets = torch.randint(0, 2049, (5,), device=device)
    g = torch.randn(5, device=device)
    a = logits.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad((opdx.ops.token_logprobs(a, targets, temperature=1.5) * g).sum(), a)
    leaf = logits.clone().requires_grad_(True)
    b = leaf * 1  # a non-leaf buffer the gradient may overwrite
    lp = opdx.ops.token_logprobs(b, targets, temperature=1.5, inplace_backward=True)
    (lp * g).sum().backward()
    assert torch.equal(leaf.grad, ga)
    assert torch.equal(b.detach(), ga)  # the buffer now holds the gradient


def test_gradcheck_float64():
    x = random_logits((3, 4, 17), torch.float64).requires_grad_(True)
    t = torch.randint(0, 17, (3, 4))
    t[0, 1] = -100
    assert torch.autograd.gradcheck(
        lambda x: opdx.ops.token_logprobs(x, t, temperature=0.8, return_entropy=True), (x,)
    )
    assert torch.autograd.gradgradcheck is not None  # second order is not supported (documented)
    xs = random_logits((5, 9, 13), torch.float64)[:, 1:7].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: opdx.ops.token_logprobs(x, t.new_zeros(5, 6) + 3), (xs,))


def test_opcheck():
    x = random_logits((4, 33), torch.float32)
    t = torch.randint(0, 33, (4,))
    torch.library.opcheck(torch.ops.opdx.token_logprobs_fwd.default, (x, t, 1.0, -100, True, False))
    lp, lse, h = torch.ops.opdx.token_logprobs_fwd(x, t, 1.0, -100, True, False)
    torch.library.opcheck(torch.ops.opdx.token_logprobs_bwd.default, (torch.randn(4), torch.randn(4), x, t, lse, h, 1.0, -100))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(logits, targets):
        lp, h = opdx.ops.token_logprobs(logits, targets, temperature=0.9, return_entropy=True)
        return (lp * 2 + h).sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    x = random_logits((2, 5, 129), torch.float32).requires_grad_(True)
    t = torch.randint(0, 129, (2, 5))
    out = compiled(x, t)
    (g,) = torch.autograd.grad(out, x)
    x2 = x.detach().clone().requires_grad_(True)
    ref_out = f(x2, t)
    (rg,) = torch.autograd.grad(ref_out, x2)
    assert torch.allclose(out, ref_out) and torch.allclose(g, rg)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(3, 5), torch.randint(0, 5, (4,))), "targets has shape"),
        (lambda: (torch.randn(3, 5), torch.randint(0, 5, (3,)).float()), "integer tensor"),
        (lambda: (torch.randn(3, 5), torch.tensor([0, 5, 1])), "outside"),
        (lambda: (torch.randn(3, 5), torch.tensor([0, -1, 1])), "outside"),
        (lambda: (torch.randn(3, 5).int(), torch.tensor([0, 1, 1])), "dtype"),
        (lambda: (torch.randn(0, 5), torch.zeros(0, dtype=torch.long)), "empty"),
        (lambda: (torch.randn(3, 0), torch.zeros(3, dtype=torch.long)), "empty"),
        (lambda: ([1.0, 2.0], torch.tensor([0])), "torch.Tensor"),
    ],
)
def test_bad_inputs(make, match):
    logits, targets = make()
    with pytest.raises((ValueError, TypeError), match=match):
        opdx.ops.token_logprobs(logits, targets)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        opdx.ops.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), temperature=temperature)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        opdx.ops.token_logprobs(torch.randn(2, 3, device="cuda"), torch.tensor([0, 1]))


def test_device_mismatch_meta():
    with pytest.raises(ValueError, match="same device"):
        opdx.ops.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1], device="meta"))


def test_memory_is_o_n():
    """Forward saves O(N); forward+backward allocates only the gradient (eager holds ~3 [N, V] buffers)."""
    n, v = 256, 65536
    logits = random_logits((n, v), torch.float32).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    size = logits.numel() * 4

    def fwd_bwd():
        lp = opdx.ops.token_logprobs(logits, targets)
        (g,) = torch.autograd.grad(lp.sum(), logits)
        return g

    _, fwd_growth = peak_memory_growth(lambda: opdx.ops.token_logprobs(logits.detach(), targets))
    assert fwd_growth < 0.05 * size
    _, growth = peak_memory_growth(fwd_bwd)
    assert growth < 1.25 * size
