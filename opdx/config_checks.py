"""The configuration's rules, one function per section: each yields ``(ok, message)`` pairs in order, and
`opdx.config.validate` raises ``ConfigError(message)`` for the first one that is not ok. Adding a key's check is
adding a ``yield`` to its section (the messages name the key and the fix).

Types and the choices of string keys are checked earlier, when a value is set (`opdx.config.set_key`).
"""

from __future__ import annotations

from collections.abc import Iterator

from opdx.errors import ConfigError
from opdx.eval_metrics import parse_metric_specs

Rules = Iterator[tuple[bool, str]]
OPTIM_IMPLS = ("auto", "fused", "foreach", "deepspeed")  # optim.impl (opdx.train.optimizer.resolve_optimizer_impl)


def lora_targets_lm_head(targets) -> bool:
    """Whether peft's module-name matching of ``target_modules`` (a name matches a module whose dotted path ends
    with it) picks the output layer ``lm_head``."""
    return any(str(t).rsplit(".", 1)[-1] == "lm_head" for t in (targets or ()))


CROSS_TOKENIZER_KINDS = ("uld", "gold")  # loss kinds whose teacher may have another tokenizer
FULL_LOGITS_KINDS = ("gjsd", "minillm", "uld", "gold")  # loss kinds that need the teacher's full next-token rows


def gold_matched_weight(value: str) -> float | None:
    """loss.gold_weight as the weight `opdx.xtok.gold_loss` takes: None for "matched", else a float in [0, 1]
    (ValueError otherwise)."""
    if str(value).strip().lower() == "matched":
        return None
    weight = float(value)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(value)
    return weight


def _gold_weight_ok(value: str) -> bool:
    try:
        gold_matched_weight(value)
    except ValueError:
        return False
    return True


def teacher_mix_rules(cfg) -> Rules:
    """loss.teacher_mix_alpha: MiniLLM's teacher-mixed sampling, one tokenizer, HF rollouts, a local teacher."""
    alpha, kind = cfg.loss.teacher_mix_alpha, cfg.loss.kind
    yield (0.0 <= alpha <= 1.0,
           f"loss.teacher_mix_alpha must be in [0, 1] (the teacher's share of the sampling mixture), got {alpha}")
    if alpha == 0.0:
        return
    yield (kind not in CROSS_TOKENIZER_KINDS,
           f"loss.teacher_mix_alpha mixes the two models' next-token distributions, which needs one tokenizer: "
           f"loss.kind={kind} has a teacher with another tokenizer; set loss.teacher_mix_alpha=0")
    yield (kind == "minillm",
           f"loss.teacher_mix_alpha is MiniLLM's teacher-mixed sampling: set loss.kind=minillm or "
           f"loss.teacher_mix_alpha=0 (got loss.kind={kind})")
    yield (cfg.rollout.engine == "hf",
           f"loss.teacher_mix_alpha needs rollout.engine=hf (the HF rollout runs student and teacher side by side; "
           f"vLLM cannot mix in the teacher's distribution), got rollout.engine={cfg.rollout.engine}")


def cross_tokenizer_rules(cfg) -> Rules:
    """minillm, uld and gold."""
    loss = cfg.loss
    yield (0.0 <= loss.gamma <= 1.0,
           f"loss.gamma must be in [0, 1] (minillm's discount of later rewards), got {loss.gamma}")
    yield loss.uld_topm >= 1, f"loss.uld_topm must be >= 1 (sorted probabilities kept per side), got {loss.uld_topm}"
    yield (1.0 <= loss.uld_p < float("inf"),
           f"loss.uld_p must be a finite number >= 1 (1 = L1 distance), got {loss.uld_p}")
    yield (_gold_weight_ok(loss.gold_weight),
           f"loss.gold_weight must be 'matched' (the teacher's matched share per group) or a number in [0, 1], got "
           f"{loss.gold_weight!r}")
    yield (not (loss.kind == "minillm" and loss.lmbda < 1.0),
           f"loss.kind=minillm is a policy gradient on the student's own samples: set loss.lmbda=1 (got {loss.lmbda})")
    yield (not (loss.kind in ("minillm", *CROSS_TOKENIZER_KINDS) and loss.fused_linear == "true"),
           f"loss.kind={loss.kind} needs the student's full logits: set loss.fused_linear=auto or false")
    if loss.kind not in CROSS_TOKENIZER_KINDS:
        return
    yield (not cfg.teacher.servers() or bool(cfg.teacher.path),
           f"loss.kind={loss.kind} with a server teacher needs teacher.path=<dir with the teacher's tokenizer> too (the "
           "completions are re-tokenized with it and the two tokenizations aligned)")


def loss_rules(cfg) -> Rules:
    loss = cfg.loss
    yield 0.0 <= loss.beta <= 1.0, f"loss.beta must be in [0, 1], got {loss.beta}"
    yield 0.0 <= loss.lmbda <= 1.0, f"loss.lmbda must be in [0, 1], got {loss.lmbda}"
    yield loss.temperature > 0, f"loss.temperature must be > 0, got {loss.temperature}"
    yield loss.sft_alpha >= 0, f"loss.sft_alpha must be >= 0, got {loss.sft_alpha}"
    yield loss.topk >= 1, f"loss.topk must be >= 1, got {loss.topk}"
    yield loss.kl_coef >= 0, f"loss.kl_coef must be >= 0 (the advantage's coefficient), got {loss.kl_coef}"
    yield 0.0 <= loss.discount <= 1.0, f"loss.discount must be in [0, 1] (0 = per-token advantage), got {loss.discount}"
    yield (loss.is_clip is None or loss.is_clip > 0,
           f"loss.is_clip must be > 0 (the PPO clip ε of the importance ratio, e.g. 0.2) or null for no clipping, "
           f"got {loss.is_clip}")
    yield (not (loss.kind == "sft" and loss.lmbda > 0),
           f"loss.kind=sft trains on teacher (loss.seq_kd=true) or dataset sequences, never on student samples: set "
           f"loss.lmbda=0 (got {loss.lmbda})")
    yield (not (loss.kind == "topk" and cfg.model.lora and lora_targets_lm_head(cfg.model.lora_target_modules)),
           "loss.kind=topk computes the student's logits from the lm_head weight itself, which a LoRA adapter on "
           "lm_head would bypass: drop lm_head from model.lora_target_modules (the adapters elsewhere are trained "
           "through the hidden states), or use loss.kind=opd or gjsd")
    yield (not (loss.fused_linear == "true" and cfg.deepspeed.zero_stage == 3),
           "loss.fused_linear=true needs the student's lm_head weight unsharded: use deepspeed.zero_stage <= 2 or "
           "loss.fused_linear=auto (falls back to full logits under ZeRO-3)")


def model_rules(cfg) -> Rules:
    yield cfg.model.source != "path" or bool(cfg.model.path), "model.source=path needs model.path=<student dir>"
    yield (cfg.model.source != "path" or bool(cfg.teacher.path) or bool(cfg.teacher.servers())
           or cfg.teacher.source == "file",
           "model.source=path needs teacher.path=<teacher dir> (or teacher.server_url=<vllm serve url>, or "
           "teacher.source=file)")


def rollout_rules(cfg) -> Rules:
    r = cfg.rollout
    yield r.temperature >= 0, f"rollout.temperature must be >= 0, got {r.temperature}"
    yield 0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}"
    yield r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}"
    yield (0 <= r.min_new_tokens <= r.max_new_tokens,
           f"rollout.min_new_tokens must be in [0, rollout.max_new_tokens={r.max_new_tokens}], got {r.min_new_tokens}")
    if r.overlap:
        yield cfg.loss.teacher_mix_alpha == 0, ("rollout.overlap=true cannot sample loss.teacher_mix_alpha's "
                                                "teacher-mixed rollouts (they need the teacher); set one of them off")
        yield r.engine != "hf" or cfg.deepspeed.zero_stage < 3, (
            "rollout.overlap=true with rollout.engine=hf samples a frozen copy of the whole student, which ZeRO-3 "
            "does not keep; use deepspeed.zero_stage<=2 or rollout.engine=vllm")
    if r.engine != "vllm":
        yield (not r.server_url, "rollout.server_url is set but rollout.engine=hf; set rollout.engine=vllm "
                                 "rollout.mode=server to use it")
        yield not r.sleep, "rollout.sleep=true needs rollout.engine=vllm"
        yield (r.tensor_parallel_size == 1, f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs "
                                            "rollout.engine=vllm rollout.mode=colocate (HF rollouts are not sharded)")
        return
    if r.mode == "server":
        yield bool(r.server_url), ("rollout.mode=server needs rollout.server_url=http://HOST:PORT (the student's "
                                   "`vllm serve`, see docs/rollouts.md)")
        yield bool(r.sync_dir), ("rollout.mode=server needs rollout.sync_dir=<dir> readable by the vllm serve "
                                 "process (the student weights are written there after each step)")
    yield (0.0 < r.gpu_memory_utilization <= 1.0,
           f"rollout.gpu_memory_utilization must be in (0, 1], got {r.gpu_memory_utilization}")
    yield (r.tensor_parallel_size >= 1 and (r.mode == "colocate" or r.tensor_parallel_size == 1),
           f"rollout.tensor_parallel_size={r.tensor_parallel_size}: must be >= 1, and > 1 only for rollout.mode="
           "colocate (a rollout server's own tensor parallelism is set where it is started: vllm serve "
           "--tensor-parallel-size N)")
    yield r.max_model_len >= 0, f"rollout.max_model_len must be >= 0, got {r.max_model_len}"
    yield (r.timeout > 0 and r.max_retries >= 0 and r.max_concurrency >= 1,
           "rollout.timeout must be > 0, rollout.max_retries >= 0 and rollout.max_concurrency >= 1")


def teacher_rules(cfg) -> Rules:
    """A server teacher (teacher.server_url or server_urls) gives token logprobs and top-k at temperature 1, nothing
    more."""
    t = cfg.teacher
    yield (not (t.server_url and t.server_urls) or list(t.server_urls) == [t.server_url],
           f"teacher.server_url={t.server_url} and teacher.server_urls={list(t.server_urls)} are both set: "
           "teacher.server_url is the one-server shorthand, so set only teacher.server_urls=[url, ...]")
    yield (all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in t.server_urls)
           and len(set(t.server_urls)) == len(t.server_urls),
           f"teacher.server_urls must list distinct http(s)://HOST:PORT addresses, got {list(t.server_urls)}")
    if not t.servers():
        return
    yield cfg.loss.kind not in ("gjsd", "minillm"), (
        f"loss.kind={cfg.loss.kind} needs full teacher logits, which teacher.server_url cannot give; use loss.kind=opd "
        "or topk with a server teacher, or unset teacher.server_url")
    yield (abs(cfg.loss.temperature - 1.0) < 1e-12,
           f"teacher.server_url needs loss.temperature=1 (vLLM's prompt logprobs are at temperature 1), got "
           f"{cfg.loss.temperature}")
    yield not cfg.loss.tail, ("loss.tail=true needs the teacher's full-vocab logsumexp, which teacher.server_url "
                              "cannot give; set loss.tail=false")
    yield not t.deepspeed, "teacher.deepspeed=true wraps a local teacher; it cannot be combined with teacher.server_url"
    yield (t.timeout > 0 and t.max_retries >= 0 and t.max_concurrency >= 1 and t.recheck_s > 0,
           "teacher.timeout must be > 0, teacher.max_retries >= 0, teacher.max_concurrency >= 1 and "
           "teacher.recheck_s > 0")


def training_rules(cfg) -> Rules:
    """train, optim, deepspeed, data, eval and save."""
    ds, train = cfg.deepspeed, cfg.train
    yield ds.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0-3, got {ds.zero_stage}"
    yield (ds.param_persistence_threshold >= -1,
           f"deepspeed.param_persistence_threshold must be >= 0 (or -1: DeepSpeed's default), got "
           f"{ds.param_persistence_threshold}")
    yield train.max_steps >= 0, f"train.max_steps must be >= 0, got {train.max_steps}"
    yield train.max_tokens >= 0, f"train.max_tokens must be >= 0, got {train.max_tokens}"
    yield train.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {train.micro_batch_size}"
    yield train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {train.grad_accum}"
    yield cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"
    yield len(cfg.optim.betas) == 2, f"optim.betas must have two values, got {cfg.optim.betas}"
    yield (cfg.optim.impl in OPTIM_IMPLS,
           f"optim.impl must be one of {', '.join(repr(i) for i in OPTIM_IMPLS)} (the AdamW implementation), got "
           f"{cfg.optim.impl!r}")
    yield cfg.data.max_prompt_len >= 1, f"data.max_prompt_len must be >= 1, got {cfg.data.max_prompt_len}"
    yield cfg.eval.every >= 0 and cfg.save.every >= 0, "eval.every and save.every must be >= 0"
    yield (cfg.eval.max_new_tokens >= 0,
           f"eval.max_new_tokens must be >= 1, or 0 for rollout.max_new_tokens, got {cfg.eval.max_new_tokens}")


def _metrics_error(specs) -> str | None:
    try:
        parse_metric_specs(specs)
    except ConfigError as exc:
        return str(exc)
    return None


def eval_log_rules(cfg) -> Rules:
    """eval.metrics (each spec parses, python callables import), eval.lm_eval and log.completions."""
    error = _metrics_error(cfg.eval.metrics)
    yield error is None, error
    lm = cfg.eval.lm_eval
    yield (lm.every >= 0 and lm.limit >= 0 and lm.batch_size >= 1,
           f"eval.lm_eval.every and .limit must be >= 0 (0 = at every eval / every example) and .batch_size >= 1, got "
           f"{lm.every}, {lm.limit} and {lm.batch_size}")
    yield (all(isinstance(x, str) and x.strip() for x in lm.tasks),
           f"eval.lm_eval.tasks must list lm-eval task names, e.g. [hellaswag, arc_easy], got {list(lm.tasks)}")
    yield (not (lm.tasks and cfg.model.lora and cfg.deepspeed.zero_stage == 3),
           "eval.lm_eval with model.lora=true under deepspeed.zero_stage=3 is not supported (the sharded adapter "
           "model is not gathered for it): use deepspeed.zero_stage<=2, or unset eval.lm_eval.tasks")
    comp = cfg.log.completions
    yield (comp.every >= 0,
           f"log.completions.every must be >= 0 (log at the evals whose step is a multiple of it; 0 = at every eval), "
           f"got {comp.every}")
    yield (comp.num >= 0,
           f"log.completions.num must be >= 0 (held-out prompts whose completions are logged; 0 = off), got {comp.num}")


def file_teacher_rules(cfg) -> Rules:
    """teacher.source=file: the top-K logprobs data.train records (opdx.generate --logprobs K) are the teacher
    signal of its own responses; nothing can score other sequences."""
    if cfg.teacher.source != "file":
        return
    loss, t = cfg.loss, cfg.teacher
    yield (loss.kind == "topk",
           f"teacher.source=file trains from data.train's recorded top-K logprobs, which only loss.kind=topk uses: "
           f"set loss.kind=topk (got {loss.kind}) or teacher.source=model")
    yield (loss.lmbda == 0.0,
           f"teacher.source=file cannot score the student's own rollouts (loss.lmbda={loss.lmbda}): set loss.lmbda=0, "
           "or teacher.source=model with a live teacher for mixed (on-policy) training")
    yield (abs(loss.temperature - 1.0) < 1e-12,
           f"teacher.source=file: the recorded top-K logprobs are the teacher's at temperature 1 (opdx.generate "
           f"records them before its sampling temperature); set loss.temperature=1 (got {loss.temperature})")
    yield (not t.servers() and not t.deepspeed,
           "teacher.source=file loads no teacher: unset teacher.server_url / server_urls and teacher.deepspeed")


# in the order the checks run: the values of one section first, then the combinations that involve others
SECTION_RULES = (loss_rules, cross_tokenizer_rules, teacher_mix_rules, rollout_rules, training_rules, eval_log_rules,
                 model_rules, teacher_rules, file_teacher_rules)

__all__ = ["CROSS_TOKENIZER_KINDS", "FULL_LOGITS_KINDS", "OPTIM_IMPLS", "SECTION_RULES", "cross_tokenizer_rules",
           "eval_log_rules", "file_teacher_rules", "gold_matched_weight", "lora_targets_lm_head", "loss_rules",
           "model_rules", "rollout_rules", "teacher_mix_rules", "teacher_rules", "training_rules"]
