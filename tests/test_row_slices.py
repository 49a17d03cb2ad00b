"""Rows long enough to be cut into several slices (csrc/include/opdx/row_slices.h): the generalized JSD reduces each
slice on its own and merges the slices' softmax statistics, argmax and (loss, total) sums in slice order, on the CPU
(slices = its 2048-entry chunks) as in the CUDA cluster kernel (slices = the blocks of a cluster). Each case puts the
hard part where the merge sees it: across slice boundaries, in the last (short) slice, in slices that are all −inf.
Checked against the float64 reference, with DESIGN.md's edge policy (NaN in → NaN out, all −inf → NaN).
"""

import pytest
import torch

import opdx
from opdx.ops import reference as ref
from tests.conftest import devices
from tests.helpers import rel_err

SLICE = 2048  # the CPU kernel's chunk (csrc/cpu/row_kernels.h, kChunk)
V = 3 * SLICE + 5  # four slices, the last one 5 entries: not a multiple of any slice or vector width
NAN, NINF = float("nan"), float("-inf")
NAN_CASES = {"nan_in_last_slice", "nan_in_first_slice", "all_neg_inf"}
HUGE_CASES = {"huge"}


def student_row(case, g):
    x = torch.randn(V, generator=g, dtype=torch.float64) * 3
    if case == "neg_inf_entries":
        x[torch.rand(V, generator=g) < 0.3] = NINF
    elif case == "leading_slices_neg_inf":  # the running statistics start out empty for two slices
        x[: 2 * SLICE] = NINF
    elif case == "one_finite":
        x = torch.full((V,), NINF, dtype=torch.float64)
        x[SLICE + 17] = 1.5
    elif case == "nan_in_last_slice":
        x[V - 2] = NAN
    elif case == "nan_in_first_slice":
        x[3] = NAN
    elif case == "all_neg_inf":
        x[:] = NINF
    elif case == "huge":
        x = x * (1e4 / x.abs().max())
    elif case == "argmax_in_last_slice":  # peaked: the anchor (the student's argmax) carries the gradient's accuracy
        x[V - 1] = 25.0
    elif case == "max_tied_across_slices":  # the same maximum in slices 1 and 3: the lower index is the argmax
        x[SLICE + 100] = 20.0
        x[3 * SLICE + 1] = 20.0
    return x


CASES = ["plain", "neg_inf_entries", "leading_slices_neg_inf", "one_finite", "nan_in_last_slice",
         "nan_in_first_slice", "all_neg_inf", "huge", "argmax_in_last_slice", "max_tied_across_slices"]


def case_rows(cases, seed):
    """Student and teacher rows per case; the teacher is −inf wherever the student is (well defined for every β)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.stack([student_row(c, g) for c in cases])
    t = torch.randn(s.shape, generator=g, dtype=torch.float64) * 3
    t = torch.where(torch.isneginf(s), NINF, t)
    huge = torch.tensor([c in HUGE_CASES for c in cases])
    if huge.any():
        t[huge] = t[huge] * (1e4 / t[huge].abs().max())
    return s, t


def check_rows(cases, dtype, beta, temperature, device, seed):
    s, t = case_rows(cases, seed)
    s, t = s.to(dtype), t.to(dtype)
    nan = torch.tensor([c in NAN_CASES for c in cases])
    x = s.to(device).requires_grad_(True)
    loss = opdx.ops.generalized_jsd(x, t.to(device), beta=beta, temperature=temperature)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    loss, gx = loss.detach().cpu(), gx.cpu()
    assert torch.isnan(loss[nan]).all() and torch.isnan(gx[nan]).all()
    assert not torch.isnan(loss[~nan]).any() and torch.isfinite(gx[~nan]).all()
    keep = ~nan
    if not keep.any():
        return
    x64 = s.double()[keep].requires_grad_(True)
    rloss = ref.generalized_jsd(x64, t.double()[keep], beta, temperature, None)
    (rgx,) = torch.autograd.grad(rloss.sum(), x64)
    rgx = torch.where(torch.isfinite(rgx), rgx, 0.0)  # the reference's autograd through the −inf entries
    huge = any(c in HUGE_CASES for c in cases)  # fp32 log-probs of |x| ~ 1e4 carry ~1e-3 absolute rounding
    assert rel_err(loss[keep], rloss) < (2e-3 if huge else 2e-5), (cases, rel_err(loss[keep], rloss))
    floor = rel_err(rgx.to(dtype), rgx)  # the gradient is written in the input dtype: its rounding, twice
    assert rel_err(gx[keep], rgx) < (5e-3 if huge else 1e-4) + 2 * floor, (cases, rel_err(gx[keep], rgx), floor)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case", CASES)
def test_single_row_split_into_slices(device, dtype, beta, case, fresh_seed):
    """N = 1: one case per row."""
    check_rows([case], dtype, beta, 1.0, device, fresh_seed)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_every_case_in_one_batch(device, beta, fresh_seed):
    """All cases as the rows of one batch (a NaN row leaves its neighbours alone), at T = 0.7."""
    check_rows(CASES, torch.float32, beta, 0.7, device, fresh_seed)
