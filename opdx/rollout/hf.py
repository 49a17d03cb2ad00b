"""Batched transformers `generate` rollouts (CPU tests, small GPU runs).

Works on the live student module (DeepSpeed ZeRO 0-2: parameters are whole on every rank) and on ZeRO-3
(parameters gathered layer by layer by DeepSpeed's hooks; ``synced_gpus=True`` keeps every rank stepping until all
ranks are done so the collective gathers stay matched). Sampling is made deterministic by seeding a fresh RNG state
per call (``seed``), which is what lets a killed-and-resumed run repeat its metrics. The returned sampling
logprobs come from generate's raw logits (``output_logits``), not from the processed sampling scores.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import torch

from opdx.data import completion_mask
from opdx.rollout.batch import RolloutBatch


def _unwrap(model):
    return getattr(model, "module", model)  # DeepSpeed engine -> module


def _sampled_raw_logprobs(step_logits, completions: torch.Tensor) -> torch.Tensor | None:
    """[B, T] temperature-1 logprobs of the sampled tokens over all lm_head rows, from generate's raw per-step
    logits (before temperature, top-p, suppress_tokens, min_new_tokens): the distribution the trainer's forward
    computes and vLLM reports (raw_logprobs), so exp(logp_train - logp_sampler) is an importance ratio. None when
    nothing was generated."""
    if not step_logits:
        return None
    if len(step_logits) != completions.shape[1]:
        raise RuntimeError(f"generate returned {len(step_logits)} logit steps for {completions.shape[1]} new tokens")
    tokens = completions.to(step_logits[0].device)
    logps = [torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, s, None]).squeeze(-1)
             for s, logits in enumerate(step_logits)]  # one [B, V] step at a time: never a [B, T, V] copy
    return torch.stack(logps, 1).cpu()


def left_pad(prompts, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids [B, P], attention_mask [B, P], P): prompts left-padded to a common width P."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p):] = 1
    return ids, attn, width


def assemble(sequences: torch.Tensor, prompts, width: int, eos_ids, logps: torch.Tensor | None) -> RolloutBatch:
    """RolloutBatch of generated ``sequences`` [B, P + T] (completions through their first EOS; ``logps`` [B, T]
    the sampler's logprobs of the sampled tokens, zeroed past each completion)."""
    seqs = sequences.cpu()
    comp = seqs[:, width:]
    mask = completion_mask(comp, eos_ids)
    finish = ["stop" if bool(mask[i].any()) and int(comp[i, int(mask[i].sum()) - 1]) in eos_ids
              else "length" for i in range(len(prompts))]
    logps = None if logps is None else logps.cpu().masked_fill(~mask, 0.0)
    return RolloutBatch(seqs, [len(p) for p in prompts], mask, logps, finish, width)


@contextlib.contextmanager
def seeded_eval(model, seed: int):
    """``model`` in eval mode under a fresh RNG state seeded with ``seed`` (restored afterwards, as is the mode):
    the same seed samples the same tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield device
    finally:
        if was_training:
            model.train()


class HFRollout:
    def __init__(self, model, *, eos_ids, pad_id: int, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, synced_gpus: bool = False, vocab_size: int | None = None,
                 min_new_tokens: int = 0, top_logprobs: int = 0):
        self.model = _unwrap(model)
        self.top_logprobs = int(top_logprobs)  # > 0: RolloutBatch.topk holds the model's top-k logprobs per token
        self.min_new_tokens = int(min_new_tokens)  # EOS suppressed before this many tokens
        self.vocab_size = vocab_size  # ids >= vocab_size (padded embedding rows) are never sampled
        self.eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        self.pad_id = int(pad_id)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.synced_gpus = synced_gpus

    def sync_weights(self, engine) -> None:
        """Generation reads the live training module, so there is nothing to copy."""
        return None

    @torch.no_grad()
    def generate(self, prompts, *, seed: int, max_new_tokens=None, temperature=None) -> RolloutBatch:
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = self.temperature if temperature is None else temperature
        ids, attn, width = left_pad(prompts, self.pad_id)
        do_sample = temperature > 0
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
                      pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=True,
                      synced_gpus=self.synced_gpus, use_cache=True)
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = min(self.min_new_tokens, max_new_tokens)
        rows = self.model.get_output_embeddings().weight
        rows = int(getattr(rows, "ds_shape", rows.shape)[0])
        if self.vocab_size is not None and rows > self.vocab_size:
            kwargs["suppress_tokens"] = list(range(self.vocab_size, rows))
        if do_sample:
            kwargs.update(temperature=float(temperature), top_p=float(self.top_p), top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        recorder = None
        if self.top_logprobs:
            from transformers import LogitsProcessorList

            recorder = _TopKRecorder(self.top_logprobs)
            kwargs["logits_processor"] = LogitsProcessorList([recorder])
        with seeded_eval(self.model, seed) as device:
            out = self.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
        batch = assemble(out.sequences, prompts, width, self.eos_ids,
                         _sampled_raw_logprobs(out.logits, out.sequences[:, width:]))
        if recorder is not None:
            batch.topk = recorder.rows(batch.completion_mask.sum(1).tolist())
        return batch


class FrozenCopyRollout(HFRollout):
    """`HFRollout` over a frozen copy of the student (rollout.overlap: a background thread samples the copy while
    the live module trains); `sync_weights` copies the live weights in. ZeRO 0-2 (whole parameters)."""

    def __init__(self, model, **kwargs):
        super().__init__(copy.deepcopy(_unwrap(model)).eval().requires_grad_(False), **kwargs)

    @torch.no_grad()
    def sync_weights(self, engine) -> None:
        live = _unwrap(engine)
        for dst, src in zip(itertools.chain(self.model.parameters(), self.model.buffers()),
                            itertools.chain(live.parameters(), live.buffers()), strict=True):
            dst.copy_(src)


class _TopKRecorder:
    """A logits processor that records the top-k log-softmax of the logits it sees and changes nothing. transformers
    runs user processors after its own masking ones (suppressed padded vocabulary rows, which this normalization
    therefore excludes, like the trainer's vocabulary alignment) and before temperature / top-p."""

    def __init__(self, k: int):
        self.k = k
        self.ids, self.values = [], []

    def __call__(self, input_ids, scores):
        from opdx.ops import teacher_topk

        ids, lp, _ = teacher_topk(scores.float(), self.k)
        self.ids.append(ids.cpu())
        self.values.append(lp.cpu())
        return scores

    def rows(self, lengths):
        ids, vals = torch.stack(self.ids, 1), torch.stack(self.values, 1)  # [B, T, k]
        return [(ids[i, :n], vals[i, :n]) for i, n in enumerate(lengths)]
