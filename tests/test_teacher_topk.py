"""teacher_topk's filtered-buffer row logic (opdx/topk_select.h): inputs that force many compactions, ties (incl. ±0)
across compaction boundaries, rows that defeat the buffer (constant rows: the CUDA radix fallback), NaN and −inf,
the k / V extremes and non-contiguous rows, against a float64 reference of the documented order."""

import pytest
import torch

import opdx
from tests.conftest import devices
from tests.helpers import random_logits, rel_err

K_MAX_CUDA = 1024


def policy_order(x, k):
    """Ids of the top k by (value desc with NaN above everything and −0 == +0, then index asc), float64 sorts."""
    v = x.double() + 0.0  # −0 + 0 = +0
    v = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    by_value = torch.sort(v, dim=-1, descending=True, stable=True).indices
    nan_first = torch.sort(torch.isnan(x).gather(-1, by_value).to(torch.int8), dim=-1, descending=True, stable=True)
    return by_value.gather(-1, nan_first.indices)[..., :k]


def check(x, k, device, temperature=1.0):
    """Ids exactly the reference order (of the values the op ranks: x / T rounded in fp32), log-probs and lse against
    float64; NaN rows NaN out."""
    ids, lp, lse = opdx.ops.teacher_topk(x.to(device), k, temperature=temperature)
    ranked = x if temperature == 1.0 else (x.to(lp.dtype) * (1.0 / temperature))
    rids = policy_order(ranked.cpu(), k)
    assert torch.equal(ids.cpu(), rids)
    xs = x.double().cpu() / temperature
    rlse = torch.logsumexp(xs, -1)
    rlp = xs.gather(-1, rids) - rlse[..., None]
    nan_rows = torch.isnan(x.cpu()).any(-1)
    assert torch.isnan(lse.cpu()[nan_rows]).all() and torch.isnan(lp.cpu()[nan_rows]).all()
    ok = ~nan_rows & torch.isfinite(rlse)
    tol = 1e-12 if x.dtype == torch.float64 else 2e-6
    assert rel_err(lse.cpu()[ok], rlse[ok]) < tol and rel_err(lp.cpu()[ok], rlp[ok]) < tol
    return ids, lp, lse


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 32, K_MAX_CUDA])
def test_many_compactions(device, dtype, k):
    """V far above the buffer; rows whose threshold rises at every element (increasing), never after the first
    chunk (decreasing), and random ones."""
    V = 50021  # not a multiple of any vector width
    x = random_logits((4, V), torch.float64).to(dtype)
    x[1] = torch.arange(V, dtype=torch.float64).to(dtype) * 1e-3 if dtype != torch.bfloat16 else x[1].sort().values
    x[2] = x[1].flip(-1)
    check(x, k, device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature_ranks_scaled_values(device, temperature):
    x = random_logits((3, 9001), torch.float32)
    if device == "cpu":
        check(x, 40, device, temperature)
    else:  # CUDA ranks the unscaled values: equal unless x / T rounds two values together
        ids, lp, lse = opdx.ops.teacher_topk(x.to(device), 40, temperature=temperature)
        assert rel_err(lse, torch.logsumexp(x.double() / temperature, -1)) < 2e-6


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", [1, 5, 12, 40, 300])
def test_signed_zero_ties_across_compaction_boundaries(device, k):
    """Clusters of ±0 straddling every 1024/2048-element boundary (CPU chunks, CUDA tiles) below 8 positives: the
    k-th key is 0 for k > 8, its ties taken by index across compactions."""
    V = 20000
    x = -1.0 - torch.rand(2, V, dtype=torch.float64)
    for b in range(1024, V, 1024):
        x[:, b - 6 : b + 6] = 0.0
        x[0, b - 6 : b + 6 : 2] = -0.0
        x[1, b - 5 : b + 6 : 3] = -0.0
    x[:, torch.randperm(V)[:8]] = torch.rand(2, 8, dtype=torch.float64) + 0.5
    for dtype in (torch.float32, torch.float64):
        check(x.to(dtype), k, device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_constant_and_few_valued_rows(device, dtype):
    """Rows the buffer cannot shrink (every key ties): constant, two values, ±0 only."""
    V = 12345
    x = torch.full((4, V), 1.5, dtype=torch.float64)
    x[1, ::2] = -2.0
    x[2] = 0.0
    x[2, 1::2] = -0.0
    x[3] = torch.randint(-2, 2, (V,)).double()
    for k in (1, 77, K_MAX_CUDA):
        check(x.to(dtype), k, device)


@pytest.mark.parametrize("device", devices())
def test_nan_and_neg_inf_rows(device):
    V = 7000
    x = random_logits((5, V), torch.float32)
    x[0, torch.randperm(V)[:3000]] = float("nan")  # more NaNs than k: the threshold closes
    x[1, V - 1] = float("nan")  # the last element is the first of the top-k
    x[2] = float("-inf")  # all −inf: lse −inf, log-probs NaN, ids 0..k-1
    x[3, : V - 3] = float("-inf")
    for k in (1, 7, 500):
        ids, lp, lse = check(x, k, device)
        assert lse[2].item() == float("-inf") and torch.isnan(lp[2]).all()
        assert torch.equal(ids[2].cpu(), torch.arange(k))


@pytest.mark.parametrize("device", devices())
def test_k_extremes_single_row_and_strided_rows(device):
    x = random_logits((1, 1000), torch.float32)
    check(x, 1000, device)  # k = V
    check(x, 1, device)
    for V in (1, 3, 2047, 2049, 4099):
        check(random_logits((2, V), torch.float32), min(V, 5), device)
    base = random_logits((3, 6, 5003), torch.float32)
    check(base[:, 1:-1, 1:], 64, device)  # strided leading dims, a misaligned row start
    check(base.to(torch.bfloat16)[:, ::2, 3:], 64, device)


def test_cpu_k_beyond_the_cuda_limit():
    x = random_logits((2, 9000), torch.float32)
    x[1, ::7] = 0.25  # ties inside the top-k
    check(x, 9000, "cpu")
    check(x, 5000, "cpu")
