"""Held-out metrics over all ranks' prompts (`evaluate`), logged at eval.every, at the start and at the end."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from opdx.config import Config
from opdx.config_checks import CROSS_TOKENIZER_KINDS
from opdx.data import build_batch
from opdx.ops import token_logprobs
from opdx.train.distributed import all_reduce_sum, rank, world
from opdx.train.objectives import SignalSpec, teacher_signal, token_stats
from opdx.train.scoring import completion_keep, student_logits
from opdx.train.sources import step_seed

if TYPE_CHECKING:
    from opdx.train.build import Trainer

TOP1 = SignalSpec("topk", topk=1)  # token logprobs + the teacher's argmax


def _samples(cfg: Config, rollout, student, prompts, *, vocab, pad_id, device, max_new):
    """Per eval batch of this rank's held-out prompts: (student samples at eval.temperature as a Batch, the
    student's logits at its target positions [B, T, vocab], the batch cut to those positions)."""
    bs = cfg.eval.batch_size
    for b, s in enumerate(range(0, len(prompts), bs)):
        chunk = prompts[s:s + bs]
        rb = rollout.generate(chunk, seed=step_seed(cfg.eval.seed, 0, b, rank(), salt=1), max_new_tokens=max_new,
                              temperature=cfg.eval.temperature)
        batch = build_batch(chunk, rb.completions(), pad_id).to(device)
        keep = completion_keep(batch)
        logits = student_logits(student, batch, keep, packed=cfg.model.packed)[:, :-1, :vocab]
        yield batch, logits, batch.tail(keep - 1)


def _kl_sums(cfg: Config, rollout, teacher, student, prompts, **kw) -> list[float]:
    """[k1 sum, k3 sum, token count, response tokens, sequences, top-1 agreements] on the student's samples."""
    sums = [0.0] * 6
    for full, logits, batch in _samples(cfg, rollout, student, prompts, **kw):
        signal = teacher_signal(teacher, full, TOP1, kw["vocab"])
        t_logp = signal.token_logprobs[:, -batch.targets.shape[1]:]
        s_logp = token_logprobs(logits, batch.targets)
        st = token_stats(s_logp, t_logp, batch.loss_mask, batch, student_top1=logits[batch.loss_mask].argmax(-1),
                         teacher_top1=signal.topk_ids[:, 0])
        for i, v in enumerate((st.k1_sum, st.k3_sum, st.n, sum(batch.completion_lens), len(full.completion_lens),
                               st.top1_agree)):
            sums[i] += float(v)
    return sums


def _group_kl_sums(cfg: Config, rollout, teacher, student, prompts, **kw) -> list[float]:
    """loss.kind=uld / gold (a teacher with another tokenizer): [k1 sum, k3 sum, aligned groups, response tokens,
    sequences, 0] of the per-group reverse KL (opdx.train.xtok_scoring.group_kl_sums) on the student's samples."""
    from opdx.train.xtok_scoring import group_kl_sums

    sums = [0.0] * 6
    for full, logits, batch in _samples(cfg, rollout, student, prompts, **kw):
        s_logp = token_logprobs(logits, batch.targets)[batch.loss_mask]
        k1, k3, groups = group_kl_sums(s_logp, teacher.group_logprobs(full))
        for i, v in enumerate((k1, k3, groups, sum(batch.completion_lens), len(full.completion_lens))):
            sums[i] += float(v)
    return sums


def _greedy(rollout, prompts, *, bs: int, seed: int, max_new: int) -> list[list[int]]:
    """Greedy completions of ``prompts`` in batches of ``bs`` (one generate call per batch on every rank)."""
    out = []
    for b, s in enumerate(range(0, len(prompts), bs)):
        rb = rollout.generate(prompts[s:s + bs], seed=step_seed(seed, 0, b, rank(), salt=2), max_new_tokens=max_new,
                              temperature=0.0)
        out.extend(rb.completions())
    return out


def _task_sums(cfg: Config, generate, task, *, tokenizer) -> list[float]:
    """[correct, scored] greedy answers (``generate(prompts) -> completions``) to this rank's share of the checkable
    prompts. Every rank runs the same number of generate calls (ZeRO-3 gathers stay matched); padding rows are
    not scored."""
    from opdx.data_eval import score_answer

    task = list(task)
    if not task:
        return [0.0, 0.0]
    per_rank = -(-len(task) // world())
    mine = [(task[i], True) if i < len(task) else (task[0], False)
            for i in (rank() + world() * j for j in range(per_rank))]
    correct = n_task = 0.0
    for ((_, answer), real), ids in zip(mine, generate([p for (p, _), _ in mine])):
        if real:
            correct += float(score_answer(tokenizer.decode(ids, skip_special_tokens=True), answer))
            n_task += 1
    return [correct, n_task]


def _quality_sums(completions, eos_ids) -> list[float]:
    """[length sum, stops, repeat_frac sum, completions] of greedy completions (opdx.data_eval.completion_stats)."""
    from opdx.data_eval import completion_stats

    n = len(completions)
    st = completion_stats(completions, eos_ids) if n else {"response_len": 0, "stop_rate": 0, "repeat_frac": 0}
    return [st["response_len"] * n, st["stop_rate"] * n, st["repeat_frac"] * n, float(n)]


def _greedy_metrics(prefix: str, sums: list[float]) -> dict:
    correct, n_task, length, stops, repeats, n = sums
    out = {f"{prefix}response_len": length / max(n, 1), f"{prefix}stop_rate": stops / max(n, 1),
           f"{prefix}repeat_frac": repeats / max(n, 1)}
    if n_task:
        out[f"{prefix}task_accuracy"] = correct / n_task
    return out


def _my_prompts(cfg: Config, eval_prompts) -> list:
    n = min(cfg.eval.num_prompts, len(eval_prompts))
    return [eval_prompts[(rank() + world() * i) % len(eval_prompts)] for i in range(max(1, n // world()))]


def _max_new(cfg: Config) -> int:
    return cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens


@torch.no_grad()
def evaluate(cfg: Config, rollout, teacher, student, eval_prompts, *, vocab, pad_id, device, task=(),
             tokenizer=None, eos_ids=None, completions_out: list | None = None) -> dict:
    """Held-out metrics over all ranks' prompts.

    - ``eval_reverse_kl`` / ``eval_k3``: the student samples (``eval.temperature``) on held-out prompts; student and
      teacher both score the samples; the mean per-token k1 / k3 estimate of KL(student || teacher);
      ``eval_sample_response_len``: those samples' mean length.
    - ``eval_top1_agreement``: on those samples, the fraction of positions where the student's and the teacher's
      most likely next token agree.
    - loss.kind=uld / gold (a teacher with another tokenizer) replaces those three by ``eval_group_reverse_kl`` /
      ``eval_group_k3``: the mean over the byte-aligned groups of the samples of the k1 / k3 estimates of
      log P_S(group text) − log P_T(group text) (opdx.train.xtok_scoring.group_kl_sums).
    - ``eval_task_accuracy`` (when ``task`` holds (prompt ids, answer) pairs, the eval records with an ``answer``):
      greedy completions scored by opdx.data_eval.score_answer.
    - with ``eos_ids``: the student's greedy completions of the same held-out prompts: ``eval_response_len``,
      ``eval_stop_rate`` (ended with EOS), ``eval_repeat_frac`` (share of repeated 4-grams); this rank's
      completions are appended to ``completions_out`` when given."""
    mine, max_new, bs = _my_prompts(cfg, eval_prompts), _max_new(cfg), cfg.eval.batch_size
    was_training = student.training
    student.eval()
    xtok = cfg.loss.kind in CROSS_TOKENIZER_KINDS
    kl = (_group_kl_sums if xtok else _kl_sums)(cfg, rollout, teacher, student, mine, vocab=vocab, pad_id=pad_id,
                                                device=device, max_new=max_new)

    def generate(prompts):
        return _greedy(rollout, prompts, bs=bs, seed=cfg.eval.seed, max_new=max_new)

    tk = _task_sums(cfg, generate, task, tokenizer=tokenizer)
    greedy = generate(mine) if eos_ids is not None else []
    if completions_out is not None:
        completions_out.extend(greedy)
    if was_training:
        student.train()
    k1_sum, k3_sum, count, resp, seqs, agree, *rest = all_reduce_sum(kl + tk + _quality_sums(greedy, eos_ids))
    if xtok:  # per aligned group; the token-level metrics need one vocabulary
        out = {"eval_group_reverse_kl": k1_sum / max(count, 1), "eval_group_k3": k3_sum / max(count, 1)}
    else:
        out = {"eval_reverse_kl": k1_sum / max(count, 1), "eval_k3": k3_sum / max(count, 1),
               "eval_top1_agreement": agree / max(count, 1)}
    out["eval_sample_response_len"] = resp / max(seqs, 1)
    quality = _greedy_metrics("eval_", rest)
    if eos_ids is None:
        quality = {k: v for k, v in quality.items() if k == "eval_task_accuracy"}
        out["eval_response_len"] = out["eval_sample_response_len"]
    return {**out, **quality}


@torch.no_grad()
def teacher_reference(cfg: Config, teacher, eval_prompts, *, task, tokenizer, eos_ids, pad_id, vocab,
                      completions_out: list | None = None) -> dict:
    """The teacher's greedy completions of the same held-out prompts, once per run: ``eval_teacher_response_len``,
    ``eval_teacher_stop_rate``, ``eval_teacher_repeat_frac`` and ``eval_teacher_task_accuracy`` (the references
    the student's greedy numbers are read against). {} for a teacher that cannot generate."""
    if not hasattr(teacher, "generate"):
        return {}
    max_new, bs = _max_new(cfg), cfg.eval.batch_size

    def generate(prompts):
        out = []
        for b, s in enumerate(range(0, len(prompts), bs)):
            rb = teacher.generate(prompts[s:s + bs], seed=step_seed(cfg.eval.seed, 0, b, rank(), salt=3),
                                  max_new_tokens=max_new, temperature=0.0, top_p=1.0, eos_ids=eos_ids, pad_id=pad_id,
                                  vocab_size=vocab)
            out.extend(rb.completions())
        return out

    tk = _task_sums(cfg, generate, task, tokenizer=tokenizer)
    greedy = generate(_my_prompts(cfg, eval_prompts))
    if completions_out is not None:
        completions_out.extend(greedy)
    return _greedy_metrics("eval_teacher_", all_reduce_sum(tk + _quality_sums(greedy, eos_ids)))


SAMPLES = 3  # eval prompts whose student (and teacher) greedy completions go to eval_samples.jsonl


def eval_record(t: Trainer, step: int) -> tuple[dict, dict]:
    """The metrics.jsonl record of one evaluation (at ``step``) and its eval_samples.jsonl record: the first
    prompts of rank 0 with the student's and the teacher's greedy completions (text)."""
    d, cfg, tok = t.data, t.cfg, t.data.tokenizer
    common = dict(task=d.task, tokenizer=tok, eos_ids=d.eos_ids, pad_id=d.pad_id, vocab=t.vocab)
    if t.teacher_eval is None:
        t.teacher_completions = []
        t.teacher_eval = teacher_reference(cfg, t.teacher, d.eval_prompts, completions_out=t.teacher_completions,
                                           **common)
    student = []
    metrics = evaluate(cfg, t.rollout, t.teacher, t.engine.module, d.eval_prompts, device=t.device,
                       completions_out=student, **common)
    mine = _my_prompts(cfg, d.eval_prompts)[:SAMPLES]
    samples = [{"prompt": tok.decode(p, skip_special_tokens=True), "student": tok.decode(s, skip_special_tokens=True),
                "teacher": tok.decode(te, skip_special_tokens=True) if te is not None else None}
               for p, s, te in itertools.zip_longest(mine, student[:SAMPLES], t.teacher_completions[:SAMPLES])
               if p is not None]
    record = {"step": step, "teacher_tokens": t.teacher_tokens, **metrics, **t.teacher_eval}
    return record, {"step": step, "samples": samples}
