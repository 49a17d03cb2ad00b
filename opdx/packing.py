"""Padding-free packed forwards for the scoring passes (``model.packed``).

A right-padded ``[B, L]`` batch is run as one ``[1, sum(len)]`` sequence: the valid tokens of all rows
concatenated, ``position_ids`` restarting at 0 for every row and no attention mask. transformers keeps the rows
apart from the restarting positions alone:

- ``flash_attention_2/3``: varlen kernels on ``cu_seq_lens`` (passed here explicitly, so nothing is inferred);
- ``sdpa`` / ``eager`` / ``flex_attention``: ``masking_utils.find_packed_sequence_indices`` turns the position ids
  into a block-diagonal causal mask — only when ``attention_mask is None`` and there is no KV cache, which is why
  the packed call passes neither (``use_cache=False``).

An architecture or attention backend that ignores this (custom modeling code, a mask path that drops
``position_ids``) would silently attend across sequence boundaries; `check_packed_attention` probes a model once
at start and raises a `ConfigError` if so.

The outputs are unpacked to the padded layout (`unpack`): ``[B, L, ...]`` with the valid positions filled and
zeros elsewhere, so every loss downstream (indexing by ``loss_mask``, ``tail()``) is unchanged. The student's
lm_head runs only at the positions whose next token is trained (``logits_to_keep`` as an index tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdx.config import ConfigError


@dataclass
class Packed:
    """One packed sequence for a right-padded ``[B, L]`` batch."""

    input_ids: torch.Tensor  # [1, N] the valid tokens of all rows, row-major
    position_ids: torch.Tensor  # [1, N] 0..len_b-1 for every row b
    index: torch.Tensor  # [N] flat index b * L + t of each packed token in the padded layout
    cu_seqlens: torch.Tensor  # [B + 1] int32 cumulative lengths (flash-attention varlen)
    max_len: int
    shape: tuple  # (B, L)

    @property
    def num_tokens(self) -> int:
        return int(self.index.shape[0])


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Pack a right-padded batch (valid tokens of each row first, as `opdx.data.build_batch` makes them)."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"pack needs input_ids and attention_mask of one [B, L] shape, got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    b, width = input_ids.shape
    valid = attention_mask.bool()
    lengths = valid.sum(1)
    pos = torch.arange(width, device=input_ids.device)
    if not bool((valid == (pos[None, :] < lengths[:, None])).all()):
        raise ValueError("pack needs right-padded rows (attention_mask = 1 on a prefix of each row)")
    if bool((lengths == 0).any()):
        raise ValueError("pack needs at least one token in every row")
    index = valid.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    return Packed(input_ids=input_ids.reshape(-1)[index][None],
                  position_ids=pos.expand(b, width).reshape(-1)[index][None],
                  index=index, cu_seqlens=cu, max_len=int(lengths.max()), shape=(b, width))


def unpack(x: torch.Tensor, packed: Packed, fill: float = 0.0) -> torch.Tensor:
    """``[1, N, ...]`` (or ``[N, ...]``) packed values -> ``[B, L, ...]`` padded layout, ``fill`` at padding.
    Differentiable w.r.t. ``x``."""
    x = x[0] if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == packed.num_tokens else x
    if x.shape[0] != packed.num_tokens:
        raise ValueError(f"unpack: {x.shape[0]} packed rows for {packed.num_tokens} tokens")
    b, width = packed.shape
    out = x.new_full((b * width, *x.shape[1:]), fill)
    return out.index_copy(0, packed.index, x).view(b, width, *x.shape[1:])


def _attn_impl(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or getattr(cfg, "attn_implementation", None) or "")


def forward_kwargs(model, packed: Packed) -> dict:
    """Keyword arguments of the packed forward: restarting position ids, no attention mask, no cache; for
    flash-attention backends also the varlen ``cu_seq_lens`` / ``max_length`` (nothing inferred on device)."""
    kw = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None, use_cache=False)
    if _attn_impl(model).startswith(("flash_attention", "kernels-community/flash")):
        kw.update(cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens, max_length_q=packed.max_len,
                  max_length_k=packed.max_len)
    return kw


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def decoder_hidden(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, packed: bool) -> torch.Tensor:
    """Final hidden states ``[B, L, d]`` of a decoder (``model.get_decoder()``), padded layout (zeros at padding
    when ``packed``)."""
    if not packed:
        return _last_hidden(decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    p = pack(input_ids, attention_mask)
    return unpack(_last_hidden(decoder(**forward_kwargs(decoder, p))), p)


def causal_lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int, *, packed: bool,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, keep, V]`` for the last ``keep`` positions (``logits_to_keep=keep``) of a causal LM (or a
    DeepSpeed engine / peft model around one).

    ``packed``: one padding-free forward, with the lm_head applied only where ``rows`` (bool ``[B, keep]``) is True
    (default: every valid position); the other positions of the result are 0 (padding, prompt positions whose
    next token is not trained: no loss reads them)."""
    if not packed:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    b, width = input_ids.shape
    keep = width if keep <= 0 or keep > width else int(keep)  # as transformers: 0 = all positions
    p = pack(input_ids, attention_mask)
    want = attention_mask.bool().clone()
    want[:, : width - keep] = False
    if rows is not None:
        want[:, width - keep:] &= rows.to(want.device)
    # packed position of each wanted (b, t), row-major, and its flat index in the [B, keep] result
    slot = torch.full((b * width,), -1, dtype=torch.long, device=input_ids.device)
    slot[p.index] = torch.arange(p.num_tokens, device=input_ids.device)
    flat = want.reshape(-1).nonzero().squeeze(1)
    dest = want[:, width - keep:].reshape(-1).nonzero().squeeze(1)
    logits = model(**forward_kwargs(_config_holder(model), p), logits_to_keep=slot[flat]).logits[0]  # [n, V]
    out = logits.new_zeros((b * keep, logits.shape[-1])).index_copy(0, dest, logits)
    return out.view(b, keep, -1)


def _config_holder(model):
    """The object whose ``.config`` names the attention backend (through DeepSpeed / peft wrappers)."""
    m = model
    for _ in range(4):
        if getattr(getattr(m, "config", None), "_attn_implementation", None) is not None:
            return m
        m = getattr(m, "module", None) or getattr(m, "base_model", None) or m
    return model


# ------------------------------------------------------------------------------------------------------- probe
@torch.no_grad()
def check_packed_attention(model, what: str = "model", *, seed: int = 0) -> float:
    """Probe that a packed forward keeps sequences apart; raises `ConfigError` if ``model`` attends across the
    boundary (a backend/architecture that ignores the restarting ``position_ids``).

    Two short random sequences a, b are run (1) packed as [a | b] with restarting positions and (2) b alone; b's
    hidden states must agree. For scale, (3) a and b concatenated as one sequence shows what attending across the
    boundary changes. Returns the relative error of (1) vs (2). A forward under ZeRO-3 is a collective: every rank
    must call this at the same point."""
    decoder = model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
    vocab = int(getattr(getattr(base, "config", None), "vocab_size", 0) or 2)
    try:
        device = next(decoder.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    la, lb = 7, 5
    a = torch.randint(0, vocab, (la,), generator=g)
    bb = torch.randint(0, vocab, (lb,), generator=g)
    ids = torch.zeros(2, la, dtype=torch.long)
    mask = torch.zeros(2, la, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :lb], mask[1, :lb] = bb, 1
    ids, mask = ids.to(device), mask.to(device)
    was_training = decoder.training
    decoder.eval()
    try:
        packed = decoder_hidden(decoder, ids, mask, packed=True)[1, :lb].float()
        alone = _last_hidden(decoder(input_ids=ids[1:, :lb], use_cache=False))[0].float()
        joined = _last_hidden(decoder(input_ids=torch.cat([a, bb]).to(device)[None], use_cache=False))[0, la:].float()
    finally:
        decoder.train(was_training)
    scale = alone.norm().clamp_min(1e-30)
    err = float((packed - alone).norm() / scale)
    cross = float((joined - alone).norm() / scale)
    param = next(decoder.parameters(), None)
    eps = torch.finfo(param.dtype).eps if param is not None and param.dtype.is_floating_point else 1e-7
    if err > max(0.1 * cross, 8 * eps, 1e-4):  # floors: rounding of the packed vs separate forward
        impl = _attn_impl(decoder) or "?"
        raise ConfigError(
            f"model.packed=true: the {what} ({type(base).__name__}, attn_implementation={impl}) attends across "
            f"packed sequence boundaries (a packed forward differs from the separate one by {err:.2e} relative; "
            f"attending across the boundary changes it by {cross:.2e}): this architecture/attention backend ignores "
            f"restarting position_ids. Set model.packed=false, or use attn_implementation sdpa, eager or "
            f"flash_attention_2 with a transformers model that builds its mask with masking_utils")
    return err
