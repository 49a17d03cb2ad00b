"""``eval.lm_eval``: lm-evaluation-harness on the live student at an eval (the optional ``[eval]`` extra).

Rank 0 wraps the student (unwrapped from DeepSpeed; under ZeRO-3 a full copy built from the consolidated weights,
which every rank helps gather) in lm-eval's `HFLM` and calls `lm_eval.simple_evaluate(tasks, limit)`; every numeric
result is logged as ``lm_eval/<task>/<metric>`` (the metric's ``,none`` filter suffix dropped). The other ranks wait.
"""

from __future__ import annotations

from opdx.config import Config, ConfigError
from opdx.train.distributed import barrier, rank


def import_lm_eval(cfg: Config):
    """(lm_eval, HFLM, TaskManager), or a ConfigError that says how to install lm-eval."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(f"eval.lm_eval.tasks={list(cfg.eval.lm_eval.tasks)} needs lm-evaluation-harness, which "
                          f"cannot be imported ({exc}): pip install -e \".[eval]\" (or pip install lm-eval), or set "
                          "eval.lm_eval.tasks=[]") from None
    return lm_eval, HFLM, TaskManager


def lm_eval_due(cfg: Config, step: int) -> bool:
    every = cfg.eval.lm_eval.every
    return bool(cfg.eval.lm_eval.tasks) and (every == 0 or step % every == 0)


def flatten_results(results: dict) -> dict:
    """lm-eval's ``results`` ({task: {"acc,none": 0.5, "alias": ..., ...}}) as {"lm_eval/<task>/<metric>": value}."""
    out = {}
    for task, metrics in (results.get("results") or {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"lm_eval/{task}/{name.removesuffix(',none').replace(',', '_')}"] = float(value)
    return out


def _zero3_copy(engine):
    """Rank 0: a plain copy of the ZeRO-3 student from its consolidated weights (a collective: every rank calls)."""
    state = engine._zero3_consolidated_16bit_state_dict()
    if rank() != 0:
        return None
    from transformers import AutoModelForCausalLM

    module = engine.module
    model = AutoModelForCausalLM.from_config(module.config, dtype=next(iter(state.values())).dtype)
    model.load_state_dict(state, strict=False)  # tied lm_head / embedding weights are stored once
    return model.to(engine.device)


def run_lm_eval(cfg: Config, engine, tokenizer) -> dict:
    """lm_eval/<task>/<metric> on rank 0 ({} on the others); every rank calls it."""
    lm_cfg = cfg.eval.lm_eval
    model = _zero3_copy(engine) if cfg.deepspeed.zero_stage == 3 else engine.module
    out = {}
    if rank() == 0:
        lm_eval, HFLM, TaskManager = import_lm_eval(cfg)
        was_training = model.training
        model.eval()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=lm_cfg.batch_size)
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(lm_cfg.tasks), limit=lm_cfg.limit or None, log_samples=False,
                task_manager=TaskManager(include_path=lm_cfg.include_path or None))
        finally:
            model.train(was_training)
        out = flatten_results(results or {})
    barrier()
    return out


__all__ = ["flatten_results", "import_lm_eval", "lm_eval_due", "run_lm_eval"]
