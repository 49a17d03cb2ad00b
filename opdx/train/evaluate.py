"""Held-out metrics over all ranks' prompts (`evaluate`), logged at eval.every, at the start and at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from opdx.config import Config
from opdx.data import build_batch
from opdx.ops import token_logprobs
from opdx.train.distributed import all_reduce_sum, rank, world
from opdx.train.objectives import SignalSpec, teacher_signal, token_stats
from opdx.train.scoring import completion_keep, student_logits
from opdx.train.sources import step_seed

if TYPE_CHECKING:
    from opdx.train.build import Trainer

TOP1 = SignalSpec("topk", topk=1)  # token logprobs + the teacher's argmax


def _kl_sums(cfg: Config, rollout, teacher, student, prompts, *, vocab, pad_id, device, max_new) -> list[float]:
    """[k1 sum, k3 sum, token count, response tokens, sequences, top-1 agreements] on the student's samples
    (eval.temperature) of this rank's held-out prompts."""
    sums = [0.0] * 6
    bs = cfg.eval.batch_size
    for b, s in enumerate(range(0, len(prompts), bs)):
        chunk = prompts[s:s + bs]
        rb = rollout.generate(chunk, seed=step_seed(cfg.eval.seed, 0, b, rank(), salt=1), max_new_tokens=max_new,
                              temperature=cfg.eval.temperature)
        batch = build_batch(chunk, rb.completions(), pad_id).to(device)
        signal = teacher_signal(teacher, batch, TOP1, vocab)
        keep = completion_keep(batch)
        logits = student_logits(student, batch, keep, packed=cfg.model.packed)[:, :-1, :vocab]
        batch = batch.tail(keep - 1)
        t_logp = signal.token_logprobs[:, -batch.targets.shape[1]:]
        s_logp = token_logprobs(logits, batch.targets)
        st = token_stats(s_logp, t_logp, batch.loss_mask, batch, student_top1=logits[batch.loss_mask].argmax(-1),
                         teacher_top1=signal.topk_ids[:, 0])
        for i, v in enumerate((st.k1_sum, st.k3_sum, st.n, sum(batch.completion_lens), len(chunk), st.top1_agree)):
            sums[i] += float(v)
    return sums


def _task_sums(cfg: Config, rollout, task, *, tokenizer, max_new) -> list[float]:
    """[correct, scored] greedy answers to this rank's share of the checkable prompts. Every rank runs the same
    number of generate calls (ZeRO-3 gathers stay matched); padding rows are not scored."""
    from opdx.data_eval import score_answer

    task = list(task)
    per_rank = -(-len(task) // world())
    mine = [(task[i], True) if i < len(task) else (task[0], False)
            for i in (rank() + world() * j for j in range(per_rank))]
    correct = n_task = 0.0
    bs = cfg.eval.batch_size
    for b, s in enumerate(range(0, len(mine), bs)):
        chunk = mine[s:s + bs]
        rb = rollout.generate([p for (p, _), _ in chunk], seed=step_seed(cfg.eval.seed, 0, b, rank(), salt=2),
                              max_new_tokens=max_new, temperature=0.0)
        for ((_, answer), real), ids in zip(chunk, rb.completions()):
            if real:
                correct += float(score_answer(tokenizer.decode(ids, skip_special_tokens=True), answer))
                n_task += 1
    return [correct, n_task]


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
    n = min(cfg.eval.num_prompts, len(eval_prompts))
    mine = [eval_prompts[(rank() + world() * i) % len(eval_prompts)] for i in range(max(1, n // world()))]
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    was_training = student.training
    student.eval()
    kl = _kl_sums(cfg, rollout, teacher, student, mine, vocab=vocab, pad_id=pad_id, device=device, max_new=max_new)
    tk = _task_sums(cfg, rollout, task, tokenizer=tokenizer, max_new=max_new)
    if was_training:
        student.train()
    k1_sum, k3_sum, count, resp, seqs, agree, correct, n_task = all_reduce_sum(kl + tk)
    out = {"eval_reverse_kl": k1_sum / max(count, 1), "eval_k3": k3_sum / max(count, 1),
           "eval_top1_agreement": agree / max(count, 1), "eval_response_len": resp / max(seqs, 1)}
    if n_task:
        out["eval_task_accuracy"] = correct / n_task
    return out


def eval_record(t: Trainer, step: int) -> dict:
    """The metrics.jsonl record of one evaluation (at ``step``)."""
    d = t.data
    return {"step": step, "teacher_tokens": t.teacher_tokens,
            **evaluate(t.cfg, t.rollout, t.teacher, t.engine.module, d.eval_prompts, vocab=t.vocab, pad_id=d.pad_id,
                       device=t.device, task=d.task, tokenizer=d.tokenizer)}
