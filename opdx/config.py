"""Trainer configuration: dataclasses, a YAML file, and dotted CLI overrides (``loss.beta=1.0``).

The defaults are the embedded demo (``torchrun --nproc_per_node 2 -m opdx.train`` with no arguments). Every
override is typed by the dataclass field it targets; an unknown key is an error that names the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from opdx.config_checks import OPTIM_IMPLS, SECTION_RULES
from opdx.config_eval import EvalConfig
from opdx.config_log import LogConfig
from opdx.errors import ConfigError


@dataclass
class ModelConfig:
    """The student."""

    source: str = "demo"  # demo (SmolLM2-135M pair, built once) | tiny (random tiny pair) | path
    path: str = ""  # student directory when source=path
    dtype: str = "float32"  # the student's weights and compute dtype
    attn_implementation: str = "sdpa"  # transformers attention backend (flash_attention_2: GPU, the [gpu] extra)
    # padding-free scoring forwards (student and local teacher): the valid tokens of a batch as one [1, sum(len)]
    # sequence with restarting position_ids (opdx.packing); generation stays padded
    packed: bool = False
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (less memory)
    student_layers: int = 24  # demo: layers kept in the pruned student (of 30)
    cache_dir: str = ""  # demo/tiny model cache ("" = ~/.cache/opdx or output_dir/models for tiny)
    lora: bool = False  # peft LoRA; save.final writes the adapter (final/adapter) and the merged model (final/)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    # module names (matched as peft does: a dotted path ending with the name) that get LoRA adapters
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TeacherConfig:
    # model (a teacher model scores the sequences) | file (loss.kind=topk from data.train's recorded top-K logprobs)
    source: str = "model"
    path: str = ""  # teacher directory when model.source=path
    dtype: str = ""  # "" = same as model.dtype
    attn_implementation: str = ""  # "" = same as model.attn_implementation
    deepspeed: bool = False  # wrap the frozen teacher in a DeepSpeed ZeRO-3 inference engine
    logits_chunk: int = 2048  # rows of full-vocab teacher logits computed at once (gjsd)
    server_url: str = ""  # OpenAI-style `vllm serve` of the teacher (opdx.teacher.server); "" = local teacher
    # several teacher servers (opdx.teacher.pool): requests go to the least loaded, a failing server is taken out
    # and its requests re-sent to the others; teacher.server_url=X is the shorthand for [X]
    server_urls: list = field(default_factory=list)
    timeout: float = 60.0  # server teacher: seconds per request
    max_retries: int = 3  # server teacher: retries per request (timeouts, connection errors, 5xx/429)
    max_concurrency: int = 16  # server teacher: requests in flight per rank and server
    recheck_s: float = 30.0  # server teacher: seconds between health checks of a server taken out of the pool

    def servers(self) -> list[str]:
        """The teacher servers: teacher.server_urls, or [teacher.server_url], or [] (a local teacher)."""
        return list(self.server_urls) or ([self.server_url] if self.server_url else [])


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf (transformers generate on the live student) | vllm (opdx.rollout.vllm, docs/rollouts.md)
    mode: str = "colocate"  # vllm: colocate (a vllm.LLM in each training process) | server (external vllm serve)
    max_new_tokens: int = 48  # tokens generated per rollout at most (student and teacher generation)
    # student rollouts never stop before this many tokens (EOS suppressed until then); = max_new_tokens gives every
    # rollout the same length (throughput benchmarks: benchmarks/test_train_step.py)
    min_new_tokens: int = 0
    temperature: float = 1.0  # sampling temperature of rollouts (0 = greedy)
    top_p: float = 1.0  # nucleus sampling of rollouts (1 = off)
    server_url: str = ""  # vllm server mode: the student's `vllm serve` (started with VLLM_SERVER_DEV_MODE=1)
    sync_dir: str = ""  # vllm: directory the student weights are written to for reload_weights (server: required)
    gpu_memory_utilization: float = 0.3  # vllm colocate on GPU: fraction of GPU memory vLLM may take
    # vllm colocate: 1 = one engine per rank; tp > 1 = one engine sharded over each group of tp consecutive ranks
    tensor_parallel_size: int = 1
    # sample step k+1's student rollouts in a background thread while step k trains (one step of policy lag,
    # corrected by opd's importance ratio; opdx.train.inputs). hf: a frozen copy of the student, ZeRO 0-2
    overlap: bool = False
    sleep: bool = False  # vllm colocate: sleep during training, wake for rollouts (CUDA only)
    max_model_len: int = 0  # vllm colocate: 0 = the model's max_position_embeddings
    timeout: float = 300.0  # vllm server mode: seconds per request
    max_retries: int = 3  # vllm server mode: retries per request
    max_concurrency: int = 16  # vllm server mode: requests in flight per rank


@dataclass
class LossConfig:
    # opd | gjsd | topk | sft (cross-entropy only, on teacher/dataset sequences: lmbda=0) | minillm (same tokenizer,
    # student samples: lmbda=1) | uld | gold (a teacher with another tokenizer, docs/cross-tokenizer.md). topk: any
    # ZeRO stage (the loss runs inside the lm_head's module call), LoRA unless lm_head is in model.lora_target_modules
    kind: str = "gjsd"
    beta: float = 0.5  # gjsd / topk: 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0  # distillation temperature: both sides' logits are divided by it
    topk: int = 32  # topk: teacher tokens per position (K)
    tail: bool = False  # topk: add the tail bucket log(1 - sum_K p)
    lmbda: float = 0.5  # probability that the student generates the batch (on-policy)
    seq_kd: bool = False  # when the student does not generate: teacher generates (True) or dataset response (False)
    sft_alpha: float = 0.0  # weight of cross-entropy on non-student sequences
    normalize_reward: bool = False  # opd: the normalized REINFORCE of opdx.losses.opd_loss instead of opd_is_loss
    # importance-sampled opd (opdx.losses.opd_is_loss): advantage = -kl_coef * (sampler logp - teacher logp) of the
    # sampled token, optionally summed over later tokens with weight discount^k; ratio exp(logp_train - logp_sampler)
    kl_coef: float = 1.0
    discount: float = 0.0  # 0 = per-token advantage, 1 = undiscounted sum over the rest of the completion
    baseline: bool = True  # opd: subtract the batch's mean advantage (a constant baseline: unbiased, lower variance)
    is_clip: float | None = None  # PPO clip ε of the importance ratio (e.g. 0.2); null = no clipping
    # fused lm_head + loss (opdx.ops.linear_*: never forms [N, V] logits) for opd and gjsd: auto = on when the
    # vocabulary is >= 65536 and the student's lm_head is whole (not ZeRO-3); topk always works on hidden states
    fused_linear: str = "auto"
    # minillm (opdx.xtok.minillm): reward log pi_T - log pi_S of each sampled token (detached); a token's long-term
    # term weighs -log pi_S by the gamma^k-discounted sum of the later tokens' rewards (gamma in [0, 1]) ...
    gamma: float = 1.0
    length_normalize: bool = True  # minillm: ... divided by the sum of those discounts (the paper's normalization)
    teacher_mix_alpha: float = 0.0  # minillm, rollout.engine=hf: sample from a*pi_T + (1-a)*pi_S (0 = off)
    # uld / gold (docs/cross-tokenizer.md): per aligned group, each side's M largest merged probabilities plus one
    # tail bucket, sorted descending and compared as sum |s_i - t_i|^uld_p (memory O(groups * M))
    uld_topm: int = 64
    uld_p: float = 1.0  # uld / gold: the exponent of the sorted distance (1 = L1)
    # gold: weight of the GJSD(beta) term over the string-matched sub-vocabulary, the rest of each group going to the
    # ULD term: "matched" = the teacher's probability mass on the matched tokens (per group), or a constant in [0, 1]
    gold_weight: str = "matched"
    # uld / gold: one distribution per side and group from the group's first position, times the probabilities of
    # the tokens observed after it inside the group ("observed"), or the first position's alone ("first")
    merge_rule: str = "observed"


@dataclass
class DataConfig:
    train: str = "examples/data/teacher_train.jsonl"  # JSONL file or HF dataset directory (load_from_disk)
    eval: str = "examples/data/prompts_eval.jsonl"  # held-out prompts (records with an "answer" are task items)
    prompt_field: str = "prompt"  # record field holding the prompt
    # record field holding the dataset response (seq source, sft); a record of `opdx.generate` trains its own
    # response_ids instead (the generated tokens, EOS included when it stopped) when they are the student tokenizer's
    response_field: str = "response"
    split: str = "train"  # split to use when a path is a DatasetDict
    chat_template: bool = True  # wrap the prompt as a user turn with the tokenizer's chat template
    system_prompt: str = "Answer briefly, in one or two sentences."  # system turn for the chat template ("" = none)
    max_prompt_len: int = 256  # tokens; a longer prompt is an error
    max_response_len: int = 128  # tokens of dataset responses kept (seq source)


@dataclass
class TrainConfig:
    output_dir: str = "outputs/demo"  # metrics.jsonl, TensorBoard events, report/, checkpoints/, final/
    seed: int = 0  # prompt order, source draws and sampling
    max_steps: int = 30  # optimizer steps
    micro_batch_size: int = 4  # prompts per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    resume: bool = False  # continue from the newest complete checkpoint in output_dir/checkpoints
    max_tokens: int = 0  # stop once this many teacher-scored tokens were trained on (0 = run max_steps)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 3  # linear warmup steps, then cosine decay to the last step
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    clip_grad: float = 1.0  # gradient-norm clipping (0 = off)
    # AdamW implementation (opdx.train.optimizer): fused (torch AdamW(fused=True), one kernel over all tensors) |
    # foreach (torch's multi-tensor AdamW) | deepspeed (DeepSpeed builds it: torch's for-loop AdamW) | auto = fused
    # where torch has the kernel for the device (CPU, CUDA), else deepspeed; every ZeRO stage and dtype takes it
    impl: str = "auto"


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage 0-3 of the student's DeepSpeed engine
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    # ZeRO-3: parameters with at most this many elements are not partitioned (DeepSpeed's
    # stage3_param_persistence_threshold); -1 = DeepSpeed's default (1e5), 0 = partition every parameter
    param_persistence_threshold: int = -1


@dataclass
class SaveConfig:
    every: int = 0  # 0 = no intermediate checkpoints
    keep: int = 2  # newest complete checkpoints kept
    final: bool = True  # save_pretrained to output_dir/final


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the only values these string keys accept (checked when a key is set; the type column of docs/training.md)
CHOICES = {
    "model.source": ("demo", "tiny", "path"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "teacher.source": ("model", "file"),
    "teacher.dtype": ("", "float32", "bfloat16", "float16"),
    "teacher.attn_implementation": ("", "sdpa", "eager", "flash_attention_2"),
    "rollout.engine": ("hf", "vllm"),
    "rollout.mode": ("colocate", "server"),
    "loss.fused_linear": ("auto", "true", "false"),
    "loss.kind": ("opd", "gjsd", "topk", "sft", "minillm", "uld", "gold"),
    "loss.merge_rule": ("observed", "first"),
    "optim.impl": OPTIM_IMPLS,
    "deepspeed.backend": ("auto", "gloo", "nccl"),
}

_LOWERCASE = ("loss.fused_linear",)


def all_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    cfg = Config() if cfg is None else cfg
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # try the last component alone (e.g. "beta" -> "loss.beta")
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in all_keys()}
        hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[hit[0]]] if hit else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _field_type(owner, name: str):
    hints = typing.get_type_hints(type(owner))
    return hints[name]


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be a boolean (true/false), got {value!r}")


_NULLS = ("", "null", "none", "~")


def _optional_inner(typ):
    """X for an ``X | None`` (``Optional[X]``) annotation, else None."""
    if typing.get_origin(typ) not in (typing.Union, types.UnionType):
        return None
    inner = [a for a in typing.get_args(typ) if a is not type(None)]
    return inner[0] if len(inner) == 1 and len(typing.get_args(typ)) == 2 else None


def _coerce(key: str, typ, value: Any) -> Any:
    inner = _optional_inner(typ)
    if inner is not None:  # `key=null` / `none` / YAML `~` -> None, anything else typed as X
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS):
            return None
        try:
            return _coerce(key, inner, value)
        except ConfigError:
            raise ConfigError(f"{key} must be of type {inner.__name__} or null, got {value!r}") from None
    origin = typing.get_origin(typ) or typ
    try:
        if typ is bool:
            return _parse_bool(key, value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
        if origin is list:
            if isinstance(value, str):
                import yaml

                try:
                    value = yaml.safe_load(value) if value.strip().startswith("[") else [
                        v.strip() for v in value.split(",") if v.strip()]
                except yaml.YAMLError as exc:
                    raise ConfigError(f"{key}: {value!r} is not a YAML list ({str(exc).splitlines()[0]}); quote "
                                      "items with backslashes in single quotes: ['a\\d']") from None
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be of type {getattr(typ, '__name__', typ)}, got {value!r}") from None
    return value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Sets ``section.key`` (or ``section.sub.key`` in a nested section) to ``value`` coerced to the field's type."""
    *path, name = key.split(".")
    sub = cfg
    for part in path:
        sub = getattr(sub, part, None) if dataclasses.is_dataclass(sub) else None
    if not path or not dataclasses.is_dataclass(sub) or name not in {f.name for f in dataclasses.fields(sub)}:
        raise _unknown(key)
    if dataclasses.is_dataclass(getattr(sub, name)):
        raise ConfigError(f"{key} is a section: set its keys, e.g. {all_keys(getattr(sub, name), key + '.')[0]}=...")
    coerced = _coerce(key, _field_type(sub, name), value)
    if key in _LOWERCASE:  # YAML reads `true` as a bool: accept True/true/TRUE for the string choices
        coerced = coerced.lower()
    if key in CHOICES and coerced not in CHOICES[key]:
        raise ConfigError(f"{key} must be one of {', '.join(repr(c) for c in CHOICES[key])}, got {coerced!r}")
    setattr(sub, name, coerced)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (nested sections), then ``key.sub=value`` overrides (values parsed as YAML
    scalars and then coerced to the field's type)."""
    import os

    import yaml

    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
        for key, value in _flatten(data):
            set_key(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. loss.beta=1.0)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_key(cfg, key, raw if isinstance(value, (dict,)) else value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raises ConfigError with the message of the first broken rule (`opdx.config_checks`, section by section)."""
    for section_rules in SECTION_RULES:
        for ok, message in section_rules(cfg):
            if not ok:
                raise ConfigError(message)
