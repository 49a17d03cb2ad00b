"""Teacher-mixed sampling (MiniLLM's variant, ``loss.teacher_mix_alpha``): every next token of a student rollout is
drawn from α·π_T + (1 − α)·π_S, the two models run side by side on the same prefix, each with its own KV cache.

Sampling follows transformers' `generate` step for step (EOS masked before ``min_new_tokens``, ids beyond the
shared vocabulary never drawn, temperature, top-p, one ``torch.multinomial`` per step over the student's lm_head
rows, pad after EOS), so at α = 0 it draws what `HFRollout` draws under the same seed and at α = 1 what the
teacher's `generate` draws. Temperature and top-p act on each side's distribution before the mix.

The sampling logprobs returned are those of the mixture at temperature 1, log(α·p_T + (1 − α)·p_S) over the
shared vocabulary (both models' first ``vocab_size`` rows): the denominator of the importance weight
π_S / mixture the MiniLLM objective applies (exact at rollout.temperature = 1 and top_p = 1).
"""

from __future__ import annotations

import math

import torch

from opdx.rollout.batch import RolloutBatch
from opdx.rollout.hf import HFRollout, assemble, left_pad, seeded_eval


def mixture_logprobs(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Row-wise log(α·p_T + (1 − α)·p_S) from the two sides' log-probabilities; α = 0 / 1 return the student's /
    the teacher's rows exactly."""
    if alpha <= 0.0:
        return student_logp
    if alpha >= 1.0:
        return teacher_logp
    return torch.logaddexp(teacher_logp + math.log(alpha), student_logp + math.log1p(-alpha))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter of log-space ``scores`` [B, V]: keeps the highest tokens whose probability mass reaches
    ``top_p`` (at least one), the others -inf."""
    if top_p >= 1.0:
        return scores
    ranked, order = scores.sort(-1, descending=True)
    probs = ranked.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p  # the mass ranked above a token already reaches top_p
    drop[..., 0] = False
    return scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


class _Stepper:
    """One model decoding a left-padded batch with its own KV cache: ``logits(ids, attn)`` -> the last position's
    float32 logits, feeding only the newest token once the prompt is in the cache."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def logits(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        new = ids if self.cache is None else ids[:, -1:]
        positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)[:, -new.shape[1]:]
        out = self.model(input_ids=new, attention_mask=attn, position_ids=positions, past_key_values=self.cache,
                         use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()


class TeacherMixedRollout:
    """Student rollouts sampled from α·π_T + (1 − α)·π_S (same tokenizer): the student's `HFRollout` settings
    (EOS, pad, lengths, temperature, top-p, vocabulary) with the frozen teacher module next to it."""

    def __init__(self, student: HFRollout, teacher_model, alpha: float):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the teacher's share of the sampling mixture), got {alpha!r}")
        self.student, self.teacher, self.alpha = student, getattr(teacher_model, "module", teacher_model), float(alpha)

    def sync_weights(self, engine) -> None:
        """Both models are read live, so there is nothing to copy."""
        return None

    def _vocab(self) -> int:
        rows = [int(getattr(m.get_output_embeddings().weight, "ds_shape", m.get_output_embeddings().weight.shape)[0])
                for m in (self.student.model, self.teacher)]
        return min(rows + ([self.student.vocab_size] if self.student.vocab_size else []))

    def _scores(self, s_logits, t_logits, vocab: int, step: int, temperature: float):
        """(scores to draw from [B, student rows], the mixture's temperature-1 logprobs [B, vocab])."""
        r = self.student
        raw = mixture_logprobs(s_logits[:, :vocab].log_softmax(-1), t_logits[:, :vocab].log_softmax(-1), self.alpha)
        scores = raw
        if temperature > 0 and temperature != 1.0:
            scores = mixture_logprobs((s_logits[:, :vocab] / temperature).log_softmax(-1),
                                      (t_logits[:, :vocab] / temperature).log_softmax(-1), self.alpha)
        if step < r.min_new_tokens:
            scores = scores.clone()
            scores[:, [e for e in r.eos_ids if e < vocab]] = float("-inf")
        if temperature > 0:
            scores = top_p_filter(scores, r.top_p)
        return torch.nn.functional.pad(scores, (0, s_logits.shape[-1] - vocab), value=float("-inf")), raw

    @torch.no_grad()
    def generate(self, prompts, *, seed: int, max_new_tokens=None, temperature=None) -> RolloutBatch:
        r = self.student
        max_new = r.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = r.temperature if temperature is None else temperature
        ids, attn, width = left_pad(prompts, r.pad_id)
        vocab, eos = self._vocab(), torch.tensor(r.eos_ids)
        logps = []
        with seeded_eval(r.model, seed) as device:
            ids, attn, eos = ids.to(device), attn.to(device), eos.to(device)
            student, teacher = _Stepper(r.model), _Stepper(self.teacher)
            done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
            for step in range(max_new):
                scores, raw = self._scores(student.logits(ids, attn), teacher.logits(ids, attn), vocab, step,
                                           temperature)
                if temperature > 0:
                    nxt = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
                else:
                    nxt = scores.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, r.pad_id), nxt)
                logps.append(raw.gather(-1, nxt.clamp(max=vocab - 1)[:, None]).squeeze(-1))
                ids, attn = torch.cat([ids, nxt[:, None]], 1), torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                done |= torch.isin(nxt, eos)
                if bool(done.all()) and not r.synced_gpus:  # ZeRO-3 ranks keep stepping together to max_new
                    break
        logps = torch.stack(logps, 1) if logps else None
        return assemble(ids, prompts, width, r.eos_ids, logps)
