"""In-process frozen teacher: eval mode, no grad, optionally a DeepSpeed ZeRO-3 inference engine."""

from __future__ import annotations

import torch

from opdx.data import Batch
from opdx.teacher import TeacherSignal


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


class LocalTeacher:
    def __init__(self, model, *, use_deepspeed: bool = False, logits_chunk: int = 2048, ds_config: dict | None = None,
                 fused_linear: bool = False, packed: bool = False):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.engine = None
        self.zero3 = False
        if use_deepspeed:
            import deepspeed

            cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
            cfg.update(ds_config or {})
            self.engine = deepspeed.initialize(model=model, config=cfg)[0]
            self.engine.eval()
            model = self.engine.module
            self.zero3 = True
        self.model = model
        self.logits_chunk = max(1, int(logits_chunk))
        # opd/sft: token logprobs by opdx.ops.linear_token_logprobs; gjsd: hidden states + lm_head instead of logits
        self.fused_linear = bool(fused_linear)
        # padding-free scoring forward (opdx.packing); probed once: a model that attends across packed sequence
        # boundaries is a ConfigError (a collective under ZeRO-3, like every teacher forward)
        self.packed = bool(packed)
        if self.packed:
            from opdx.packing import check_packed_attention

            check_packed_attention(self.model, "teacher")

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _hidden(self, batch: Batch) -> torch.Tensor:
        from opdx.packing import decoder_hidden

        decoder, _ = _decoder_and_head(self.model)
        return decoder_hidden(decoder, batch.input_ids, batch.attention_mask, packed=self.packed)

    def _head_weight(self):
        _, head = _decoder_and_head(self.model)
        return head

    def _head_rows(self, vocab_size: int):
        """(weight[:vocab_size], bias[:vocab_size] or None) of the lm_head; gathered copies under ZeRO-3 (a collective:
        every rank calls it in the same order)."""
        head = self._head_weight()
        weight, bias = head.weight, getattr(head, "bias", None)
        if self.zero3:
            import deepspeed

            params = [weight] + ([bias] if bias is not None else [])
            with deepspeed.zero.GatheredParameters(params):
                w = weight[:vocab_size].detach().clone()
                b = bias[:vocab_size].detach().clone() if bias is not None else None
            return w, b
        return weight[:vocab_size], (bias[:vocab_size] if bias is not None else None)

    @torch.no_grad()
    def score(self, batch: Batch, kind: str, *, vocab_size: int, temperature: float = 1.0,
              topk: int = 0) -> TeacherSignal:
        """opd: token logprobs at the targets; gjsd: full logits at valid positions (lm_head applied in chunks);
        topk: the teacher's top-k ids / logprobs (and lse) at valid positions via teacher_topk_from_hidden."""
        from opdx.ops import token_logprobs

        hidden = self._hidden(batch)[:, :-1]  # position t predicts targets[:, t]
        head = self._head_weight()
        if kind in ("opd", "sft"):
            out = torch.zeros(batch.targets.shape, dtype=torch.float32, device=hidden.device)
            rows = hidden[batch.loss_mask]
            tgt = batch.targets[batch.loss_mask]
            if self.fused_linear:
                from opdx.ops import linear_token_logprobs

                w, b = self._head_rows(vocab_size)
                if rows.shape[0]:
                    out[batch.loss_mask] = linear_token_logprobs(rows, w, tgt, bias=b, temperature=temperature)
                return TeacherSignal(token_logprobs=out)
            vals = []
            for s in range(0, rows.shape[0], self.logits_chunk):
                logits = head(rows[s:s + self.logits_chunk])[..., :vocab_size]
                vals.append(token_logprobs(logits, tgt[s:s + self.logits_chunk], temperature=temperature))
            if vals:
                out[batch.loss_mask] = torch.cat(vals)
            return TeacherSignal(token_logprobs=out)
        if kind == "gjsd":
            rows = hidden[batch.loss_mask]
            if self.fused_linear:
                w, b = self._head_rows(vocab_size)
                return TeacherSignal(hidden=rows.contiguous(), head_weight=w, head_bias=b)
            chunks = [head(rows[s:s + self.logits_chunk])[..., :vocab_size].contiguous()
                      for s in range(0, rows.shape[0], self.logits_chunk)]
            logits = torch.cat(chunks) if chunks else rows.new_zeros(0, vocab_size)
            return TeacherSignal(logits=logits)
        if kind == "topk":
            from opdx.ops import teacher_topk_from_hidden

            rows = hidden[batch.loss_mask].contiguous()
            w, b = self._head_rows(vocab_size)
            ids, logprobs, lse = teacher_topk_from_hidden(rows, w, topk, bias=b, temperature=temperature)
            # log p_T(target) from one dot product per row (the metrics' reverse-KL estimate needs it)
            tgt = batch.targets[batch.loss_mask]
            z = (rows.float() * w[tgt].float()).sum(-1) + (b[tgt].float() if b is not None else 0.0)
            out = torch.zeros(batch.targets.shape, dtype=torch.float32, device=rows.device)
            out[batch.loss_mask] = z / temperature - lse.float()
            return TeacherSignal(token_logprobs=out, topk_ids=ids, topk_logprobs=logprobs, lse=lse)
        raise ValueError(f"unknown teacher signal kind {kind!r}")

    def generate(self, prompts, *, seed: int, max_new_tokens: int, temperature: float, top_p: float, eos_ids,
                 pad_id: int, synced_gpus: bool = False, vocab_size: int | None = None):
        """Teacher completions for sequence-level KD (`loss.seq_kd`)."""
        from opdx.rollout.hf import HFRollout

        return HFRollout(self.model, eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, synced_gpus=synced_gpus or self.zero3, vocab_size=vocab_size).generate(
            prompts, seed=seed)
