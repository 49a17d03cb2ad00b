"""The student's side of a loss: the views an objective scores the student through.

- `LogitsView`: the student's logits for the tail of the batch that holds completion targets (``logits_to_keep``);
  prompt positions never reach the lm_head.
- `FusedLinearView`: the final hidden states at the trained positions and the lm_head rows; token logprobs and the
  JSD come from opdx.ops.linear_* without forming [N, V] logits (loss.fused_linear; the JSD's mean from
  linear_generalized_jsd_mean, gradients formed in its forward).
- `HiddenView`: hidden states at the trained positions whose loss runs *as the lm_head module's forward*
  (`lm_head_call`), so a ZeRO-3 partitioned lm_head is gathered for it (loss.kind=topk).

Each view answers the same questions: ``batch`` (cut to the scored target positions), ``mask``,
``token_logprobs(temperature)`` [B, T] (student logprobs of the targets over the tokenizer's vocabulary),
``teacher_token_logprobs(signal, temperature)`` aligned to the same [B, T] and ``raw_logprobs()`` (detached,
temperature 1, over all lm_head rows: what vLLM reports as sampling logprobs; `policy_logprobs()` is the same with
grad, for the logits and fused-linear views).
"""

from __future__ import annotations

import torch

from opdx.ops import linear_generalized_jsd_mean, linear_token_logprobs, token_logprobs


def base_model(model):
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def student_hidden(engine, batch, packed: bool = False):
    """Final hidden states of the student's decoder (after its last norm) [B, L, d] and its lm_head.
    ``packed``: one padding-free forward (opdx.packing), unpacked to [B, L, d] (zeros at padding)."""
    from opdx.packing import decoder_hidden

    base = base_model(engine.module)
    hidden = decoder_hidden(base.get_decoder(), batch.input_ids, batch.attention_mask, packed=packed)
    return hidden, base.get_output_embeddings()


def student_logits(engine, batch, keep: int, packed: bool = False) -> torch.Tensor:
    """The student's logits [B, keep, V] for the last ``keep`` positions (``logits_to_keep``).
    ``packed``: one padding-free forward (opdx.packing) with the lm_head only where a target is trained (the logits
    of the other positions are 0; no loss reads them)."""
    if not packed:
        return engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                      logits_to_keep=keep).logits
    from opdx.packing import causal_lm_logits

    width = batch.input_ids.shape[1]
    rows = torch.zeros(batch.input_ids.shape[0], keep, dtype=torch.bool, device=batch.input_ids.device)
    rows[:, :-1] = batch.loss_mask[:, width - keep:]  # logits[:, j] predicts targets[:, width - keep + j]
    return causal_lm_logits(engine, batch.input_ids, batch.attention_mask, keep, packed=True, rows=rows)


def completion_keep(batch) -> int:
    """How many positions need logits: from the first one that predicts a completion token on."""
    return batch.input_ids.shape[1] - min(batch.prompt_lens) + 1


def lm_head_call(head, fn, hidden: torch.Tensor):
    """``fn(head, hidden)`` run as the forward of the lm_head module ``head``: ``head(hidden)`` with its ``forward``
    routed to ``fn`` for this one call.

    Module hooks fire as for a normal call, which is what DeepSpeed ZeRO-3 needs for a loss computed from the
    lm_head weight itself (opdx.ops.topk_kl) instead of the module's output: its pre-forward hook gathers the
    partitioned weight, the post-forward hook releases it, the hooks it puts on the call's tensor outputs and
    inputs re-gather it when the backward reaches the output and release it once the gradient reaches ``hidden``,
    and the weight's gradient is reduce-scattered by its accumulate-grad hook like any other parameter's. A
    collective under ZeRO-3: every rank makes the same calls. ``fn`` must return one tensor (pass other results
    through an object) and take ``hidden`` positionally (the hooks see positional inputs only)."""
    saved = head.__dict__.get("forward")
    head.forward = lambda h: fn(head, h)
    try:
        return head(hidden)
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def head_rows(head, vocab: int | None):
    """(weight, bias or None) of the lm_head, cut to the first ``vocab`` rows (all rows for None)."""
    bias = getattr(head, "bias", None)
    if vocab is None:
        return head.weight, bias
    return head.weight[:vocab], (bias[:vocab] if bias is not None else None)


def scatter_rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, T] float32 zeros with ``rows`` (one value per True of ``mask``, row-major) at the masked positions;
    differentiable w.r.t. ``rows``."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=rows.device)
    return out.masked_scatter(mask, rows.float()) if rows.numel() else out


def _detached(*tensors):
    return [t.detach() if t is not None else None for t in tensors]


class LogitsView:
    """Student logits [B, T, V] over the batch tail that holds every completion target."""

    def __init__(self, engine, batch, vocab: int, packed: bool = False, raw_logp: bool = False):
        keep = completion_keep(batch)
        self.all_rows = student_logits(engine, batch, keep, packed=packed)[:, :-1]  # every lm_head row
        self.logits = self.all_rows[..., :vocab]
        self.batch = batch.tail(keep - 1)
        self.mask = self.batch.loss_mask
        self.want_raw = raw_logp

    def token_logprobs(self, temperature: float, grad: bool = True) -> torch.Tensor:
        logits = self.logits if grad else self.logits.detach()
        return token_logprobs(logits, self.batch.targets, temperature=temperature)

    def policy_logprobs(self) -> torch.Tensor:
        """With grad: temperature-1 logprobs of the targets over every lm_head row, the distribution a rollout
        engine reports its sampling logprobs in (the importance ratio of loss.kind=opd)."""
        return token_logprobs(self.all_rows, self.batch.targets)

    def generalized_jsd(self, signal, beta: float, temperature: float) -> torch.Tensor:
        from opdx.losses import gjsd_loss

        return gjsd_loss(self.logits[self.mask], signal.logits, beta=beta, temperature=temperature)

    @torch.no_grad()
    def teacher_token_logprobs(self, signal, temperature: float) -> torch.Tensor:
        if signal.token_logprobs is not None:
            return signal.token_logprobs[:, -self.batch.targets.shape[1]:]
        out = torch.zeros(self.batch.targets.shape, dtype=torch.float32, device=self.logits.device)
        out[self.mask] = token_logprobs(signal.logits, self.batch.targets[self.mask], temperature=temperature)
        return out

    @torch.no_grad()
    def raw_logprobs(self) -> torch.Tensor:
        rows = token_logprobs(self.all_rows.detach()[self.mask], self.batch.targets[self.mask])
        return scatter_rows(self.mask, rows)


class FusedLinearView:
    """Final hidden states at the trained positions [N, d] and the lm_head rows [:vocab] (opdx.ops.linear_*)."""

    def __init__(self, engine, batch, vocab: int, packed: bool = False, raw_logp: bool = False):
        self.hidden, self.head = student_hidden(engine, batch, packed=packed)
        self.batch, self.mask, self.want_raw = batch, batch.loss_mask, raw_logp
        self.rows = self.hidden[:, :-1][self.mask]
        self.targets = batch.targets[self.mask]
        self.weight, self.bias = head_rows(self.head, vocab)

    def _logp(self, h, w, b, temperature: float) -> torch.Tensor:
        rows = linear_token_logprobs(h, w, self.targets, bias=b, temperature=temperature) if h.shape[0] \
            else h.new_zeros(0)
        return scatter_rows(self.mask, rows)

    def token_logprobs(self, temperature: float, grad: bool = True) -> torch.Tensor:
        if grad:
            return self._logp(self.rows, self.weight, self.bias, temperature)
        with torch.no_grad():
            return self._logp(*_detached(self.rows, self.weight, self.bias), temperature)

    def policy_logprobs(self) -> torch.Tensor:
        """With grad: temperature-1 logprobs over every lm_head row (see LogitsView.policy_logprobs)."""
        return self._logp(self.rows, *head_rows(self.head, None), 1.0)

    def _teacher_rows(self, signal):
        if signal.hidden is None:
            raise ValueError("loss.fused_linear gjsd needs the teacher's hidden states (LocalTeacher with "
                             "fused_linear=True)")
        dt = self.rows.dtype
        bias = signal.head_bias.to(dt) if signal.head_bias is not None else None
        return signal.hidden.to(dt), signal.head_weight.to(dt), bias

    def generalized_jsd(self, signal, beta: float, temperature: float) -> torch.Tensor:
        t_rows, t_w, t_b = self._teacher_rows(signal)
        if not self.rows.shape[0]:
            return self.hidden.sum() * 0.0 + self.weight.sum() * 0.0
        # The whole lm_head with vocab_size (not the self.weight view): the op's grad_W, zero beyond vocab, then goes
        # straight to the parameter instead of through a slice backward (a second [V, d] buffer).
        weight, bias = head_rows(self.head, None)
        return linear_generalized_jsd_mean(self.rows, weight, t_rows, t_w, beta=beta, temperature=temperature,
                                           vocab_size=self.weight.shape[0], student_bias=bias, teacher_bias=t_b)

    @torch.no_grad()
    def teacher_token_logprobs(self, signal, temperature: float) -> torch.Tensor:
        if signal.token_logprobs is not None:
            return signal.token_logprobs
        return self._logp(*self._teacher_rows(signal), temperature)

    @torch.no_grad()
    def raw_logprobs(self) -> torch.Tensor:
        return self._logp(*_detached(self.rows, *head_rows(self.head, None)), 1.0)


class HiddenView:
    """Final hidden states at the trained positions [N, d]; the objective's loss runs inside `head_call`, as the
    lm_head's forward, where ``logprobs(module, h, ...)`` gives the lm_head's own logits' logprobs. The detached
    student logprobs (and the raw ones) are taken inside the same call."""

    def __init__(self, engine, batch, vocab: int, packed: bool = False, raw_logp: bool = False, chunk: int = 1024):
        hidden, self.head = student_hidden(engine, batch, packed=packed)
        self.batch, self.mask, self.vocab = batch, batch.loss_mask, vocab
        self.rows = hidden[:, :-1][self.mask]
        self.targets = batch.targets[self.mask]
        self.want_raw, self.chunk = raw_logp, chunk
        self._student = self._raw = None

    def logprobs(self, module, h, vocab: int | None, temperature: float, targets=None) -> torch.Tensor:
        """Token logprobs of the targets from the lm_head's own computation on ``h`` (inside `head_call`)."""
        logits = type(module).forward(module, h)[..., :vocab]
        return token_logprobs(logits, self.targets if targets is None else targets, temperature=temperature)

    def _chunked(self, module, h, vocab: int | None, temperature: float) -> torch.Tensor:
        if not h.shape[0]:
            return h.new_zeros(0)
        c = self.chunk
        return torch.cat([self.logprobs(module, h[i:i + c], vocab, temperature, self.targets[i:i + c])
                          for i in range(0, h.shape[0], c)])

    def head_call(self, loss_fn, temperature: float) -> torch.Tensor:
        """``loss_fn(module, h) -> (loss, student logprobs with grad or None)`` as the lm_head's forward."""
        def forward(module, h):
            loss, s_logp = loss_fn(module, h)
            with torch.no_grad():
                hd = h.detach()
                self._student = s_logp.detach() if s_logp is not None else \
                    self._chunked(module, hd, self.vocab, temperature)
                if self.want_raw:
                    self._raw = self._chunked(module, hd, None, 1.0)
            return loss

        return lm_head_call(self.head, forward, self.rows)

    def token_logprobs(self, temperature: float, grad: bool = False) -> torch.Tensor:
        """The detached student logprobs taken inside `head_call` (call that first)."""
        return scatter_rows(self.mask, self._student)

    def teacher_token_logprobs(self, signal, temperature: float) -> torch.Tensor:
        return signal.token_logprobs

    def raw_logprobs(self) -> torch.Tensor:
        return scatter_rows(self.mask, self._raw)


VIEWS = {"logits": LogitsView, "fused_linear": FusedLinearView, "hidden": HiddenView}


def student_view(kind: str, engine, batch, *, vocab: int, packed: bool = False, raw_logp: bool = False):
    """The student scored the way ``kind`` ("logits" | "fused_linear" | "hidden") asks; ``raw_logp``: the view
    also gives `raw_logprobs()`."""
    return VIEWS[kind](engine, batch, vocab, packed=packed, raw_logp=raw_logp)
