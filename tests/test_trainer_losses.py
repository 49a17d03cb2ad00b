import torch

from opdx.losses import opd_loss, reverse_kl_estimates, sft_loss
from opdx.train.optimizer import lr_lambda
from opdx.train.sources import draw_source


def test_opd_loss_matches_manual_and_grad():
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64)
    mask = torch.rand(3, 7) < 0.7
    mask[0, 0] = True
    loss, stats = opd_loss(s, t, mask)
    r = (t - s.detach())[mask].float()
    rn = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    manual = -(rn.double() * s[mask]).mean()
    torch.testing.assert_close(loss.double(), manual, rtol=1e-5, atol=1e-6)
    loss.backward()
    g = torch.zeros_like(s)
    g[mask] = -rn.double() / mask.sum()
    torch.testing.assert_close(s.grad, g, rtol=1e-4, atol=1e-6)
    assert abs(stats["k1"] - float((s - t).detach()[mask].mean())) < 1e-5


def test_opd_loss_unnormalized_and_empty():
    s = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4)
    m = torch.ones(2, 4, dtype=torch.bool)
    loss, _ = opd_loss(s, t, m, normalize=False)
    torch.testing.assert_close(loss, -((t - s.detach()) * s).mean())
    loss0, st0 = opd_loss(s, t, torch.zeros(2, 4, dtype=torch.bool))
    assert float(loss0) == 0.0 and st0["k1"] == 0.0


def test_reverse_kl_estimates():
    s = torch.log(torch.tensor([[0.5, 0.2]]))
    t = torch.log(torch.tensor([[0.25, 0.4]]))
    k1, k3, k1s, n = reverse_kl_estimates(s, t, torch.ones(1, 2, dtype=torch.bool))
    assert int(n) == 2
    torch.testing.assert_close(k1, ((s - t).sum() / 2))
    ratio = (t - s).exp()
    torch.testing.assert_close(k3, ((ratio - 1) - (t - s)).mean())
    assert float(k3) >= 0


def test_sft_loss():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    assert float(sft_loss(lp, torch.tensor([[True, True, False]]))) == 1.5


def test_draw_source_deterministic_and_lambda():
    draws = [draw_source(0.5, True, 0, step, 0) for step in range(400)]
    assert draws == [draw_source(0.5, True, 0, step, 0) for step in range(400)]
    assert set(draws) == {"student", "teacher"}
    assert 150 < draws.count("student") < 250
    assert {draw_source(0.0, False, 1, s, 0) for s in range(50)} == {"dataset"}
    assert {draw_source(1.0, False, 1, s, 0) for s in range(50)} == {"student"}


def test_lr_schedule_warmup_cosine():
    from opdx.config import load_config

    cfg = load_config(None, ["train.max_steps=10", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == 0.5 and f(1) == 1.0
    assert abs(f(10) - 0.1) < 1e-9
    assert all(f(i) >= f(i + 1) for i in range(2, 10))
