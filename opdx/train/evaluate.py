"""Held-out metrics over all ranks' prompts (`evaluate`), logged at eval.every, at the start and at the end."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from opdx.config import Config
from opdx.config_checks import CROSS_TOKENIZER_KINDS
from opdx.data import build_batch
from opdx.eval_metrics import parse_metric_specs, score_sums
from opdx.ops import token_logprobs
from opdx.train.distributed import all_reduce_max, all_reduce_sum, rank, world
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


def _trace(out: list | None, k: int, batch, s_logp, t_logp) -> None:
    """Appends the completion tokens of the batch's first rows and their student and teacher logprobs (t_logp None:
    a teacher with another tokenizer) to ``out`` until it holds ``k`` (log.completions, `completions_event`)."""
    if out is None:
        return
    for i in range(min(batch.targets.shape[0], k - len(out))):
        keep = batch.loss_mask[i]
        out.append({"ids": batch.targets[i][keep].tolist(), "student_logprobs": s_logp[i][keep].tolist(),
                    "teacher_logprobs": None if t_logp is None else t_logp[i][keep].tolist()})


def _kl_sums(cfg: Config, rollout, teacher, student, prompts, trace=None, **kw) -> list[float]:
    """[k1 sum, k3 sum, token count, response tokens, sequences, top-1 agreements] on the student's samples; the
    first samples' per-token logprobs go to ``trace`` (`_trace`) when given."""
    sums = [0.0] * 6
    for full, logits, batch in _samples(cfg, rollout, student, prompts, **kw):
        signal = teacher_signal(teacher, full, TOP1, kw["vocab"])
        t_logp = signal.token_logprobs[:, -batch.targets.shape[1]:]
        s_logp = token_logprobs(logits, batch.targets)
        _trace(trace, cfg.log.completions.num, batch, s_logp, t_logp)
        st = token_stats(s_logp, t_logp, batch.loss_mask, batch, student_top1=logits[batch.loss_mask].argmax(-1),
                         teacher_top1=signal.topk_ids[:, 0])
        for i, v in enumerate((st.k1_sum, st.k3_sum, st.n, sum(batch.completion_lens), len(full.completion_lens),
                               st.top1_agree)):
            sums[i] += float(v)
    return sums


def _group_kl_sums(cfg: Config, rollout, teacher, student, prompts, trace=None, **kw) -> list[float]:
    """loss.kind=uld / gold (a teacher with another tokenizer): [k1 sum, k3 sum, aligned groups, response tokens,
    sequences, 0] of the per-group reverse KL (opdx.train.xtok_scoring.group_kl_sums) on the student's samples."""
    from opdx.train.xtok_scoring import group_kl_sums

    sums = [0.0] * 6
    for full, logits, batch in _samples(cfg, rollout, student, prompts, **kw):
        s_logp = token_logprobs(logits, batch.targets)
        _trace(trace, cfg.log.completions.num, batch, s_logp, None)
        k1, k3, groups = group_kl_sums(s_logp[batch.loss_mask], teacher.group_logprobs(full))
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


def _task_share(task) -> list[tuple[tuple, bool]]:
    """This rank's share of the scored eval records (``task``: (prompt ids, prompt text, record) triples) as (item,
    real) pairs; every rank gets the same count, padded with unscored copies of the first record."""
    task = list(task)
    if not task:
        return []
    per_rank = -(-len(task) // world())
    return [(task[i], True) if i < len(task) else (task[0], False)
            for i in (rank() + world() * j for j in range(per_rank))]


def _greedy_once(generate, prompt_lists: list[list]) -> list[list]:
    """The greedy completions of every list in ``prompt_lists``, each distinct prompt generated once (the task records
    and the held-out quality prompts overlap); every rank makes the same number of generate calls (ZeRO-3 gathers and
    synced generation stay matched), padding with repeats of its first prompt."""
    unique: dict[tuple, int] = {}
    for prompt in (p for prompts in prompt_lists for p in prompts):
        unique.setdefault(tuple(prompt), len(unique))
    keys = [list(k) for k in unique]
    count = all_reduce_max(len(keys))  # every rank's lists have equal lengths: none is empty while another is not
    keys += keys[:1] * (count - len(keys))
    done = generate(keys) if count else []
    return [[done[unique[tuple(p)]] for p in prompts] for prompts in prompt_lists]


def _task_sums(metrics, share, completions, *, tokenizer) -> list[float]:
    """[score sum, scored count] per metric (opdx.eval_metrics.score_sums) of the greedy ``completions`` of this
    rank's ``share`` of the scored records (`_task_share`); padding rows are not scored."""
    if not share:
        return [0.0] * (2 * len(metrics))
    scored = [(item, ids) for (item, real), ids in zip(share, completions) if real]
    return score_sums(metrics, [text for (_, text, _), _ in scored],
                      [tokenizer.decode(ids, skip_special_tokens=True) for _, ids in scored],
                      [record for (_, _, record), _ in scored])


def _quality_sums(completions, eos_ids) -> list[float]:
    """[length sum, stops, repeat_frac sum, completions] of greedy completions (opdx.data_eval.completion_stats)."""
    from opdx.data_eval import completion_stats

    n = len(completions)
    st = completion_stats(completions, eos_ids) if n else {"response_len": 0, "stop_rate": 0, "repeat_frac": 0}
    return [st["response_len"] * n, st["stop_rate"] * n, st["repeat_frac"] * n, float(n)]


def _greedy_metrics(prefix: str, metrics, sums: list[float]) -> dict:
    """The greedy completions' metrics from the rank-summed [`_task_sums` of ``metrics``, `_quality_sums`]: every
    metric with a scored record as ``<prefix><metric.key>``."""
    length, stops, repeats, n = sums[2 * len(metrics):]
    out = {f"{prefix}response_len": length / max(n, 1), f"{prefix}stop_rate": stops / max(n, 1),
           f"{prefix}repeat_frac": repeats / max(n, 1)}
    for m, total, scored in zip(metrics, sums[0::2], sums[1::2]):
        if scored:
            out[f"{prefix}{m.key}"] = total / scored
    return out


_QUALITY = ("response_len", "stop_rate", "repeat_frac")


def _my_prompts(cfg: Config, eval_prompts) -> list:
    n = min(cfg.eval.num_prompts, len(eval_prompts))
    return [eval_prompts[(rank() + world() * i) % len(eval_prompts)] for i in range(max(1, n // world()))]


def _max_new(cfg: Config) -> int:
    return cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens


@torch.no_grad()
def evaluate(cfg: Config, rollout, teacher, student, eval_prompts, *, vocab, pad_id, device, task=(),
             tokenizer=None, eos_ids=None, samples_out: list | None = None) -> dict:
    """Held-out metrics over all ranks' prompts.

    - ``eval_reverse_kl`` / ``eval_k3``: the student samples (``eval.temperature``) on held-out prompts; student and
      teacher both score the samples; the mean per-token k1 / k3 estimate of KL(student || teacher);
      ``eval_sample_response_len``: those samples' mean length.
    - ``eval_top1_agreement``: on those samples, the fraction of positions where the student's and the teacher's
      most likely next token agree.
    - teacher.source=file (no teacher model) has none of these: the held-out samples are never scored.
    - loss.kind=uld / gold (a teacher with another tokenizer) replaces those three by ``eval_group_reverse_kl`` /
      ``eval_group_k3``: the mean over the byte-aligned groups of the samples of the k1 / k3 estimates of
      log P_S(group text) − log P_T(group text) (opdx.train.xtok_scoring.group_kl_sums).
      The first ``log.completions.num`` samples of this rank, with their per-token logprobs, are appended to
      ``samples_out`` when given (`_trace`).
    - ``eval_<key>`` per ``eval.metrics`` spec (opdx.eval_metrics; ``eval_task_accuracy`` for exact_match), when
      ``task`` holds the scored eval records as (prompt ids, prompt text, record) triples: their greedy completions
      scored by the metric, averaged over the records it can score.
    - with ``eos_ids``: the student's greedy completions of the same held-out prompts: ``eval_response_len``,
      ``eval_stop_rate`` (ended with EOS), ``eval_repeat_frac`` (share of repeated 4-grams)."""
    mine, max_new, bs = _my_prompts(cfg, eval_prompts), _max_new(cfg), cfg.eval.batch_size
    was_training = student.training
    student.eval()
    xtok, scored = cfg.loss.kind in CROSS_TOKENIZER_KINDS, cfg.teacher.source != "file"  # a file scores no sample
    kl = (_group_kl_sums if xtok else _kl_sums)(cfg, rollout, teacher, student, mine, vocab=vocab, pad_id=pad_id,
                                                device=device, max_new=max_new, trace=samples_out) if scored else [0.0] * 6

    def generate(prompts):
        return _greedy(rollout, prompts, bs=bs, seed=cfg.eval.seed, max_new=max_new)

    metrics, share = parse_metric_specs(cfg.eval.metrics), _task_share(task)
    task_done, greedy = _greedy_once(generate, [[item[0] for item, _ in share], mine if eos_ids is not None else []])
    tk = _task_sums(metrics, share, task_done, tokenizer=tokenizer)
    if was_training:
        student.train()
    k1_sum, k3_sum, count, resp, seqs, agree, *rest = all_reduce_sum(kl + tk + _quality_sums(greedy, eos_ids))
    if not scored:
        out = {}
    elif xtok:  # per aligned group; the token-level metrics need one vocabulary
        out = {"eval_group_reverse_kl": k1_sum / max(count, 1), "eval_group_k3": k3_sum / max(count, 1)}
    else:
        out = {"eval_reverse_kl": k1_sum / max(count, 1), "eval_k3": k3_sum / max(count, 1),
               "eval_top1_agreement": agree / max(count, 1)}
    if scored:
        out["eval_sample_response_len"] = resp / max(seqs, 1)
    quality = _greedy_metrics("eval_", metrics, rest)
    if eos_ids is None:
        quality = {k: v for k, v in quality.items() if k[len("eval_"):] not in _QUALITY}
        out["eval_response_len"] = out["eval_sample_response_len"]
    return {**out, **quality}


@torch.no_grad()
def teacher_reference(cfg: Config, teacher, eval_prompts, *, task, tokenizer, eos_ids, pad_id, vocab,
                      completions_out: list | None = None) -> dict:
    """The teacher's greedy completions of the same held-out prompts, once per run: ``eval_teacher_response_len``,
    ``eval_teacher_stop_rate``, ``eval_teacher_repeat_frac`` and ``eval_teacher_<key>`` per eval.metrics spec
    (``eval_teacher_task_accuracy``: the references the student's greedy numbers are read against); this rank's
    completions are appended to ``completions_out`` when given. {} for a teacher that cannot generate."""
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

    metrics, share = parse_metric_specs(cfg.eval.metrics), _task_share(task)
    task_done, greedy = _greedy_once(generate, [[item[0] for item, _ in share], _my_prompts(cfg, eval_prompts)])
    tk = _task_sums(metrics, share, task_done, tokenizer=tokenizer)
    if completions_out is not None:
        completions_out.extend(greedy)
    return _greedy_metrics("eval_teacher_", metrics, all_reduce_sum(tk + _quality_sums(greedy, eos_ids)))


def logs_completions(cfg: Config, step: int) -> bool:
    """Whether the eval at ``step`` writes completions.jsonl (rank 0; log.completions.every / .num)."""
    every = cfg.log.completions.every
    return rank() == 0 and cfg.log.completions.num > 0 and (every == 0 or step % every == 0)


def _rounded(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def completions_event(tokenizer, step: int, prompts, samples, teacher_greedy) -> dict:
    """One completions.jsonl line: per logged prompt its text, the student's sample (text, per-token text and ids,
    student and teacher token logprobs at temperature 1 and their difference student − teacher; the teacher ones
    null for a teacher with another tokenizer) and the teacher's greedy answer (null when it cannot generate)."""
    rows = []
    for prompt, sample, greedy in zip(prompts, samples, itertools.chain(teacher_greedy, itertools.repeat(None))):
        s_logp, t_logp = sample["student_logprobs"], sample["teacher_logprobs"]
        rows.append({
            "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
            "student": tokenizer.decode(sample["ids"], skip_special_tokens=True),
            "teacher": None if greedy is None else tokenizer.decode(greedy, skip_special_tokens=True),
            "tokens": [tokenizer.decode([i]) for i in sample["ids"]], "token_ids": sample["ids"],
            "student_logprobs": _rounded(s_logp),
            "teacher_logprobs": None if t_logp is None else _rounded(t_logp),
            "logprob_diff": None if t_logp is None else _rounded(a - b for a, b in zip(s_logp, t_logp))})
    return {"step": step, "completions": rows}


def eval_record(t: Trainer, step: int) -> tuple[dict, dict | None]:
    """The metrics.jsonl record of one evaluation (at ``step``) and, when it logs them (`logs_completions`), its
    completions.jsonl record (`completions_event`: rank 0's first held-out prompts, from the eval's own samples)."""
    d, cfg, tok = t.data, t.cfg, t.data.tokenizer
    common = dict(task=d.task, tokenizer=tok, eos_ids=d.eos_ids, pad_id=d.pad_id, vocab=t.vocab)
    if t.teacher_eval is None:
        t.teacher_completions = []
        t.teacher_eval = teacher_reference(cfg, t.teacher, d.eval_prompts, completions_out=t.teacher_completions,
                                           **common)
    samples = [] if logs_completions(cfg, step) else None
    metrics = evaluate(cfg, t.rollout, t.teacher, t.engine.module, d.eval_prompts, device=t.device,
                       samples_out=samples, **common)
    record = {"step": step, "teacher_tokens": t.teacher_tokens, **metrics, **t.teacher_eval}
    if samples is None:
        return record, None
    return record, completions_event(tok, step, _my_prompts(cfg, d.eval_prompts), samples, t.teacher_completions)
