"""DESIGN.md's edge-case policy, one result on every device: NaN in a row → NaN out (values and gradient) for that
row; an all −inf row gives what torch's log_softmax gives (NaN); ties by value descending (±0 equal, NaN first as in
torch.topk), then index ascending. The row logic the CUDA kernels run (SoftmaxStats, values_stats, ArgMax,
topk_order_key in csrc/include/opdx) is the CPU kernels' too, so these CPU runs exercise it; with a CUDA build the
same tests compare the CUDA kernels against the same expectations.
"""

import math

import pytest
import torch

import opdx
from opdx.ops import reference as ref
from tests.conftest import devices
from tests.helpers import rel_err

NAN, NINF = float("nan"), float("-inf")
# V = 37 and 4099 are not multiples of any vector width (4 / 8 / 2 elements per 16-byte load): head, body and tail.
VOCABS = [37, 4099]


def edge_rows(V, dtype):
    """Rows, one per edge case, and which of them must come out NaN."""
    g = torch.Generator().manual_seed(0)
    rows = {
        "all_nan": torch.full((V,), NAN),
        "all_neg_inf": torch.full((V,), NINF),
        "one_finite": torch.full((V,), NINF).index_fill(0, torch.tensor([V // 3]), 2.5),
        "nan_at_one": torch.randn(V, generator=g).index_fill(0, torch.tensor([V - 2]), NAN),
        "nan_first": torch.randn(V, generator=g).index_fill(0, torch.tensor([0]), NAN),
        "huge": torch.randn(V, generator=g) * 1e4,
        "plain": torch.randn(V, generator=g) * 3,
    }
    nan_rows = torch.tensor([name in ("all_nan", "all_neg_inf", "nan_at_one", "nan_first") for name in rows])
    return list(rows), torch.stack(list(rows.values())).to(dtype), nan_rows


def assert_rowwise(out, expected_nan, ref_out, tol):
    """NaN exactly on the NaN rows (every entry of them); elsewhere close to the float64 reference."""
    out = out.detach().cpu()
    nan_rows = expected_nan.view(-1, *([1] * (out.dim() - 1))).expand_as(out)
    assert torch.isnan(out[nan_rows]).all(), out
    assert not torch.isnan(out[~nan_rows]).any(), out
    if (~expected_nan).any():
        assert rel_err(out[~expected_nan], ref_out[~expected_nan]) < tol


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", VOCABS)
def test_token_logprobs_edge_rows(device, dtype, V):
    names, logits, nan_rows = edge_rows(V, dtype)
    targets = torch.full((len(names),), V // 3, dtype=torch.long)
    x = logits.to(device).requires_grad_(True)
    lp, h = opdx.ops.token_logprobs(x, targets.to(device), return_entropy=True)
    (gx,) = torch.autograd.grad(lp.sum() + h.sum(), x)
    x64 = logits.double().requires_grad_(True)
    rlp, rh = ref.token_logprobs(x64, targets, return_entropy=True)
    assert torch.isnan(torch.log_softmax(logits.double(), -1)[nan_rows]).all()  # torch's own semantics
    (rgx,) = torch.autograd.grad(rlp.sum() + rh.sum(), x64)
    assert_rowwise(lp, nan_rows, rlp, 1e-5)
    assert_rowwise(h, nan_rows, rh, 1e-4)
    finite_ref = torch.where(torch.isnan(rgx), 0.0, rgx)  # the reference's −inf entries of one_finite
    assert_rowwise(gx, nan_rows, finite_ref, 8e-3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("V", VOCABS)
def test_generalized_jsd_edge_rows(device, beta, V):
    """Defect 1: an all-NaN / all −inf student row with β > 0 once left the argmax anchor at INT64_MAX."""
    names, student, nan_rows = edge_rows(V, torch.float32)
    teacher = torch.randn(len(names), V, generator=torch.Generator().manual_seed(1)) * 3
    x = student.to(device).requires_grad_(True)
    loss = opdx.ops.generalized_jsd(x, teacher.to(device), beta=beta)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    one_finite = names.index("one_finite")
    rloss = ref.generalized_jsd(student.double(), teacher.double(), beta, 1.0, None)
    if beta == 0.0:  # KL(P_T‖P_S) with p_S = 0 where p_T > 0: +inf (the reference's too)
        assert loss[one_finite].item() == math.inf == rloss[one_finite].item()
        nan_or_inf = nan_rows.clone()
        nan_or_inf[one_finite] = True
        assert torch.isnan(loss.cpu()[nan_rows]).all() and torch.isfinite(loss.cpu()[~nan_or_inf]).all()
        assert torch.isnan(gx.cpu()[nan_rows]).all()
        return
    # the |logit| ~ 1e4 row: fp32 log-probs there carry ~1e-3 absolute rounding (the logits' own ulp)
    assert_rowwise(loss, nan_rows, rloss, 1e-3)
    x64 = student.double().requires_grad_(True)
    keep = ~nan_rows
    (rgx,) = torch.autograd.grad(ref.generalized_jsd(x64[keep], teacher.double()[keep], beta, 1.0, None).sum(), x64)
    assert torch.isnan(gx.cpu()[nan_rows]).all()
    got = gx.cpu()[keep]
    assert torch.isfinite(got).all()
    want = torch.where(torch.isfinite(rgx[keep]), rgx[keep], 0.0)
    assert rel_err(got, want) < 1e-3


def topk_policy_reference(x, k):
    """(value desc with NaN above everything and −0 == +0, then index asc), written out per row in Python."""
    ids = []
    for row in x.double().tolist():
        order = sorted(range(len(row)), key=lambda i: (not math.isnan(row[i]), -row[i] if not math.isnan(row[i]) else 0, i))
        ids.append(order[:k])
    return torch.tensor(ids)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_teacher_topk_ties_signed_zero_and_nan(device, dtype):
    V = 4099
    x = torch.randint(-2, 2, (5, V)).to(dtype)  # massive ties
    x[0, :] = 0.0
    x[0, 1::3] = -0.0  # ±0 interleaved: equal, so ids ascending
    x[1, 10] = NAN
    x[1, 3000] = NAN  # NaN first (torch.topk's order), lower id first
    x[2, :] = -0.0
    x[2, 4098] = 0.0
    x[3, :] = NINF
    x[3, 7] = 1.0
    for k in (1, 5, 300):
        ids, lp, lse = opdx.ops.teacher_topk(x.to(device), k)
        assert torch.equal(ids.cpu(), topk_policy_reference(x, k)), k
        assert torch.isnan(lse[1]) and torch.isnan(lp[1]).all()  # NaN in a row → NaN out
        clean = torch.tensor([0, 2, 3, 4])
        rlse = torch.logsumexp(x.double()[clean], -1)
        assert rel_err(lse.cpu()[clean], rlse) < 1e-6
    # torch.topk puts the NaNs first too (its ids among equal values are unspecified, so only the NaN ids here)
    assert set(x[1].double().topk(2).indices.tolist()) == {10, 3000}


@pytest.mark.parametrize("device", devices())
def test_single_row_and_huge_logits(device):
    """N = 1 and |logit| >= 1e4 through every row op: finite, and as the float64 reference."""
    x = torch.randn(1, 1001, dtype=torch.float64) * 1e4
    t = torch.randn(1, 1001, dtype=torch.float64) * 1e4
    lp = opdx.ops.token_logprobs(x.float().to(device), torch.tensor([3], device=device))
    assert rel_err(lp, ref.token_logprobs(x.float().double(), torch.tensor([3]))) < 1e-6
    for beta in (0.0, 0.5, 1.0):
        loss = opdx.ops.generalized_jsd(x.float().to(device), t.float().to(device), beta=beta)
        rloss = ref.generalized_jsd(x.float().double(), t.float().double(), beta, 1.0, None)
        assert torch.isfinite(loss).all() and rel_err(loss, rloss) < 1e-4
    ids, lp, lse = opdx.ops.teacher_topk(x.float().to(device), 4)
    assert torch.equal(ids.cpu(), topk_policy_reference(x.float(), 4))
