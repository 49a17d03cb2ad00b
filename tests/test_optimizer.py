"""optim.impl: the choice of AdamW (opdx.train.optimizer), and the engine really stepping the fused client AdamW at
every ZeRO stage and dtype (DeepSpeed in this process, a world of one over gloo)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from opdx.config import Config, ConfigError, load_config, validate
from opdx.train.loop import timed_update
from opdx.train.optimizer import deepspeed_config, init_engine, lr_at, resolve_optimizer_impl

CPU, META = torch.device("cpu"), torch.device("meta")  # torch has a fused AdamW kernel for CPU, none for meta


@pytest.mark.parametrize("impl, device, want", [
    ("auto", CPU, "fused"), ("fused", CPU, "fused"), ("foreach", CPU, "foreach"), ("deepspeed", CPU, "deepspeed"),
    ("auto", META, "deepspeed"), ("foreach", META, "foreach"), ("deepspeed", META, "deepspeed"),
])
def test_resolve_optimizer_impl(impl, device, want):
    assert resolve_optimizer_impl(impl, device) == want


def test_fused_without_a_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.impl=fused: torch has no fused AdamW kernel for device 'meta'"):
        resolve_optimizer_impl("fused", META)
    with pytest.raises(ConfigError, match="optim.impl must be one of 'auto', 'fused', 'foreach', 'deepspeed'"):
        resolve_optimizer_impl("apex", CPU)


def test_bad_optim_impl_is_a_clear_config_error():
    with pytest.raises(ConfigError, match=r"optim.impl must be one of 'auto', 'fused', 'foreach', 'deepspeed', "
                                          r"got 'adam'"):
        load_config(None, ["optim.impl=adam"])
    cfg = Config()
    cfg.optim.impl = "Fused"  # set around set_key: the section rules catch it
    with pytest.raises(ConfigError, match="optim.impl must be one of .* \\(the AdamW implementation\\), got 'Fused'"):
        validate(cfg)
    assert load_config(None, ["optim.impl=foreach"]).optim.impl == "foreach"


@pytest.mark.parametrize("impl, has_section", [("deepspeed", True), ("fused", False), ("foreach", False)])
def test_deepspeed_config_builds_the_optimizer_only_for_deepspeed(impl, has_section):
    ds = deepspeed_config(Config(), impl)
    assert ("optimizer" in ds) == has_section
    if has_section:
        assert ds["optimizer"]["params"]["torch_adam"] is True


# ------------------------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def world_of_one():
    import deepspeed
    import torch.distributed as dist

    from opdx.train.distributed import single_process_env

    saved = dict(os.environ)
    single_process_env()
    owned = not dist.is_initialized()
    if owned:
        deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    yield
    if owned and dist.is_initialized():  # later tests run the trainer in process and expect no process group
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _engine(stage: int, dtype: str, impl: str = "auto", clip: float = 1.0):
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", f"model.dtype={dtype}", f"optim.impl={impl}",
                             "optim.lr=0.01", "optim.warmup_steps=2", "train.max_steps=4", "train.micro_batch_size=2",
                             f"optim.clip_grad={clip}"])
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return cfg, init_engine(cfg, model.to(getattr(torch, dtype)), CPU)


def _train(engine, steps: int, dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    times = {}
    for _ in range(steps):
        x = torch.randn(2, 8, generator=g).to(dtype)
        engine.backward(engine(x).float().pow(2).mean())
        with timed_update(engine.basic_optimizer, times, CPU):
            engine.step()
    return times


def _weights(engine) -> list[torch.Tensor]:
    """The module's full weights (ZeRO-3: gathered from the partitions)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().float().clone() for p in params]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_steps_the_fused_client_adamw(world_of_one, stage, dtype):
    cfg, engine = _engine(stage, dtype)
    opt = engine.basic_optimizer
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True and not opt.defaults["foreach"]
    stepped = []
    opt.register_step_post_hook(lambda *_: stepped.append(1))
    before = _weights(engine)
    times = _train(engine, 3, getattr(torch, dtype))
    assert len(stepped) == 3 and times["optimizer"] > 0
    # (DeepSpeed's bf16/fp16 stage-0 wrapper steps once at set-up, on zero gradients, to create the states)
    assert opt.state and {float(s["step"]) for s in opt.state.values()} <= {3.0, 4.0}
    assert all(not torch.equal(a, b) for a, b in zip(before, _weights(engine)))
    # LambdaLR on the client optimizer: warm-up then cosine (the 4th step's factor after 3 steps)
    assert engine.get_lr()[0] == pytest.approx(cfg.optim.lr * lr_at(3, warmup=2, total=4, floor=0.1))


@pytest.mark.parametrize("stage", [0, 2])
def test_fused_engine_matches_plain_torch_adamw(world_of_one, stage):
    """No clipping: the engine's weights after 3 steps are torch AdamW's (for-loop) with the same schedule."""
    torch.manual_seed(0)
    cfg, engine = _engine(stage, "float32", clip=0.0)
    ref_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for r, p in zip(ref_model.parameters(), engine.module.parameters()):
            r.copy_(p)
    o = cfg.optim
    opt = torch.optim.AdamW(ref_model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, warmup=2, total=4, floor=0.1))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 8, generator=g) for _ in range(3)]
    for x in xs:
        engine.backward(engine(x).pow(2).mean())
        engine.step()
        opt.zero_grad()
        ref_model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    for p, r in zip(engine.module.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage, impl", [(0, "fused"), (2, "fused"), (0, "foreach")])
def test_checkpoint_round_trip_keeps_the_client_optimizer_state(world_of_one, tmp_path, stage, impl):
    _, engine = _engine(stage, "float32", impl)
    _train(engine, 2, torch.float32)
    engine.save_checkpoint(str(tmp_path), tag="t")
    _, fresh = _engine(stage, "float32", impl)
    fresh.load_checkpoint(str(tmp_path), tag="t")
    assert fresh.lr_scheduler.last_epoch == engine.lr_scheduler.last_epoch == 2
    a, b = engine.basic_optimizer.state_dict()["state"], fresh.basic_optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"], rtol=0, atol=0)
    t1, t2 = _train(engine, 1, torch.float32, seed=5), _train(fresh, 1, torch.float32, seed=5)
    assert t1 and t2
    for p, q in zip(engine.module.parameters(), fresh.module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
