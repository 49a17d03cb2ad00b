"""opdx.losses.opd_is_loss (importance-sampled OPD) against float64 references written here, token by token."""

import math

import pytest
import torch

from opdx.losses import discounted_future_sum, opd_is_loss, reverse_kl_estimates


def _inputs(b, t, *, dtype=torch.float32, spread=0.3, p_valid=0.8):
    student = -3.0 * torch.rand(b, t, dtype=torch.float64)
    sampler = student + spread * torch.randn(b, t, dtype=torch.float64)  # ratios on both sides of 1
    teacher = -4.0 * torch.rand(b, t, dtype=torch.float64)
    mask = torch.rand(b, t) < p_valid
    if b > 1:
        mask[1] = False  # a row with no valid token
    return student.to(dtype), sampler.to(dtype), teacher.to(dtype), mask


def _reference(student, sampler, teacher, mask, kl_coef, discount, is_clip):
    """(loss, d loss / d student_logp, clipped count) in float64 with explicit loops over tokens."""
    s, q, te, m = student.double().tolist(), sampler.double().tolist(), teacher.double().tolist(), mask.tolist()
    n_valid = sum(sum(row) for row in m)
    total, clipped = 0.0, 0
    grad = [[0.0] * len(row) for row in s]
    for i, row in enumerate(m):
        valid = [j for j, ok in enumerate(row) if ok]
        for a, j in enumerate(valid):
            adv = sum(discount ** (c - a) * -kl_coef * (q[i][u] - te[i][u]) for c, u in enumerate(valid) if c >= a)
            rho = math.exp(s[i][j] - q[i][j])
            term, d_term = rho * adv, rho * adv  # d(rho·A)/d log π = rho·A
            if is_clip is not None:
                c_rho = min(max(rho, 1.0 - is_clip), 1.0 + is_clip)
                if c_rho * adv < term:
                    term, d_term, clipped = c_rho * adv, 0.0, clipped + 1
            total += term
            grad[i][j] = -d_term / max(n_valid, 1)
    return -total / max(n_valid, 1), torch.tensor(grad, dtype=torch.float64), clipped


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (3, 5), (4, 24)])
@pytest.mark.parametrize("discount", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("is_clip", [None, 0.2])
def test_loss_and_grad_match_float64_reference(shape, discount, is_clip):
    student, sampler, teacher, mask = _inputs(*shape)
    if not mask.any():
        mask[0, 0] = True
    kl_coef = 0.5 + torch.rand(()).item()
    ref_loss, ref_grad, ref_clipped = _reference(student, sampler, teacher, mask, kl_coef, discount, is_clip)
    x = student.clone().requires_grad_(True)
    loss, stats = opd_is_loss(x, sampler, teacher, mask, kl_coef=kl_coef, discount=discount, is_clip=is_clip)
    loss.backward()
    assert abs(float(loss.detach()) - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert _rel(x.grad, ref_grad) < 1e-5
    assert stats["is_clip_frac"] == pytest.approx(ref_clipped / int(mask.sum()), abs=1e-12)
    assert (x.grad[~mask] == 0).all()


def test_float64_inputs_are_exact():
    student, sampler, teacher, mask = _inputs(3, 11, dtype=torch.float64)
    x = student.clone().requires_grad_(True)
    loss, _ = opd_is_loss(x, sampler, teacher, mask, kl_coef=1.3, discount=0.7, is_clip=0.1)
    loss.backward()
    ref_loss, ref_grad, _ = _reference(student, sampler, teacher, mask, 1.3, 0.7, 0.1)
    assert loss.dtype == torch.float64
    assert abs(float(loss.detach()) - ref_loss) < 1e-12 * max(1.0, abs(ref_loss))
    assert _rel(x.grad, ref_grad) < 1e-12


@pytest.mark.parametrize("is_clip", [None, 0.2])
def test_all_masked_gives_zero_loss_and_zero_grad(is_clip):
    student, sampler, teacher, _ = _inputs(2, 6)
    student[0, 0] = float("nan")  # masked positions may hold anything
    sampler[1, 2] = -float("inf")
    x = student.clone().requires_grad_(True)
    loss, stats = opd_is_loss(x, sampler, teacher, torch.zeros(2, 6, dtype=torch.bool), discount=0.5,
                              is_clip=is_clip)
    loss.backward()
    assert float(loss.detach()) == 0.0 and (x.grad == 0).all()
    assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("discount", [0.0, 0.8])
def test_ratio_one_is_reinforce(discount):
    student, _, teacher, mask = _inputs(3, 10)
    x = student.clone().requires_grad_(True)
    loss, stats = opd_is_loss(x, student, teacher, mask, kl_coef=2.0, discount=discount, is_clip=0.2)
    loss.backward()
    advantage = discounted_future_sum(-2.0 * (student - teacher), mask, discount)
    y = student.clone().requires_grad_(True)
    (-(advantage * y)[mask].sum() / mask.sum()).backward()  # plain REINFORCE
    assert _rel(x.grad, y.grad) < 1e-6
    assert stats["is_ratio_mean"] == pytest.approx(1.0) and stats["is_clip_frac"] == 0.0
    assert stats["advantage_mean"] == pytest.approx(float(advantage[mask].mean()), rel=1e-6)


def _naive_discount(values, mask, gamma):
    out = torch.zeros_like(values, dtype=torch.float64)
    for i in range(values.shape[0]):
        valid = [j for j in range(values.shape[1]) if mask[i, j]]
        for a, j in enumerate(valid):
            out[i, j] = sum(gamma ** (c - a) * float(values[i, valid[c]]) for c in range(a, len(valid)))
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 1.0])
def test_discounted_future_sum_matches_loop(gamma):
    values = torch.randn(4, 13, dtype=torch.float64)
    mask = torch.rand(4, 13) < 0.7  # gaps inside rows: the decay counts valid tokens only
    mask[2] = False
    got = discounted_future_sum(values, mask, gamma)
    assert torch.allclose(got, _naive_discount(values, mask, gamma), rtol=1e-12, atol=1e-12)


def test_discounted_future_sum_long_rows_stay_finite():
    values = torch.randn(2, 1500)
    mask = torch.ones(2, 1500, dtype=torch.bool)
    got = discounted_future_sum(values, mask, 0.5)  # γ^1500 underflows; γ^-1500 would overflow
    assert torch.isfinite(got).all()
    assert torch.allclose(got[:, -1], values[:, -1])
    assert torch.allclose(got[:, :-1], values[:, :-1] + 0.5 * got[:, 1:], atol=1e-5)


def test_clip_zeroes_gradient_outside_the_trust_region_on_the_clipped_side():
    eps = 0.2
    # token: A > 0 & ρ high (clipped), A < 0 & ρ low (clipped), A > 0 & ρ low (kept), A < 0 & ρ high (kept),
    # A > 0 & ρ inside (kept)
    log_rho = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5), math.log(1.1)]])
    adv_sign = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    sampler = -1.0 - torch.rand(1, 5)
    teacher = sampler + adv_sign * (0.5 + torch.rand(1, 5))  # a = -(q - log π_T) has the sign of adv_sign
    x = (sampler + log_rho).requires_grad_(True)
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss, stats = opd_is_loss(x, sampler, teacher, mask, is_clip=eps)
    loss.backward()
    assert (x.grad[0, :2] == 0).all()
    assert (x.grad[0, 2:] != 0).all()
    assert stats["is_clip_frac"] == pytest.approx(2 / 5)
    _, ref_grad, clipped = _reference(x.detach(), sampler, teacher, mask, 1.0, 0.0, eps)
    assert clipped == 2 and _rel(x.grad, ref_grad) < 1e-5
    loss_off, stats_off = opd_is_loss(x.detach(), sampler, teacher, mask)
    assert stats_off["is_clip_frac"] == 0.0 and float(loss_off) != pytest.approx(float(loss.detach()))


def test_stats():
    student, sampler, teacher, mask = _inputs(3, 8)
    _, stats = opd_is_loss(student, sampler, teacher, mask, kl_coef=0.5)
    k1, k3, _, _ = reverse_kl_estimates(student, teacher, mask)
    assert stats["k1"] == pytest.approx(float(k1)) and stats["k3"] == pytest.approx(float(k3))
    assert stats["is_ratio_mean"] == pytest.approx(float((student - sampler).exp()[mask].mean()), rel=1e-6)
    assert stats["advantage_mean"] == pytest.approx(float((-0.5 * (sampler - teacher))[mask].mean()), rel=1e-5)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
    ({"kl_coef": float("nan")}, "kl_coef must be >= 0"),
    ({"discount": -0.5}, "discount must be in [0, 1]"),
    ({"discount": 1.5}, "discount must be in [0, 1]"),
    ({"is_clip": 0.0}, "is_clip must be > 0"),
    ({"is_clip": -0.2}, "is_clip must be > 0"),
])
def test_bad_args_raise(kwargs, fragment):
    student, sampler, teacher, mask = _inputs(2, 4)
    with pytest.raises(ValueError) as exc:
        opd_is_loss(student, sampler, teacher, mask, **kwargs)
    assert fragment in str(exc.value)


def test_shape_mismatch_raises():
    student, sampler, teacher, mask = _inputs(2, 4)
    with pytest.raises(ValueError, match="teacher_logp has shape"):
        opd_is_loss(student, sampler, teacher[:, :3], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        opd_is_loss(student, sampler, teacher, mask[:1])
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        opd_is_loss(student[0], sampler[0], teacher[0], mask[0])


def test_baseline_subtracts_the_mean_advantage():
    """baseline=True: A_t - mean(A) over the valid tokens; masked tokens keep A = 0, the gradient stays finite."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    s = torch.randn(3, 7, dtype=torch.float64, generator=g).requires_grad_()
    q, t = s.detach() + 0.1 * torch.randn(3, 7, dtype=torch.float64, generator=g), torch.randn(3, 7, dtype=torch.float64, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    mask[0, 0] = True
    loss, stats = opd_is_loss(s, q, t, mask, kl_coef=0.5, baseline=True)
    a = -0.5 * (q - t)
    a = torch.where(mask, a - a[mask].mean(), torch.zeros_like(a))
    ref = -(torch.exp(s - q) * a)[mask].sum() / mask.sum()
    assert torch.allclose(loss, ref)
    assert abs(stats["advantage_mean"]) < 1e-12
    (g_loss,) = torch.autograd.grad(loss, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g_loss, g_ref) and not g_loss[~mask].any()
