"""Prompt/response datasets, chat templates, a resumable deterministic sampler, collation, and THE mask logic.

Masks live in one place (`completion_lengths` + `build_batch`):
- a completion token is trained iff it was generated: everything up to and including the first EOS the model
  produced, even when pad == eos; whatever follows the first EOS is padding and is not trained;
- prompt tokens never contribute;
- labels are shifted exactly once, in `build_batch`: ``targets[:, t] = input_ids[:, t + 1]`` where position t + 1
  is a completion token, else ``IGNORE``; the loss pairs ``logits[:, :-1]`` with ``targets``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass

import torch

from opdx.config import ConfigError

IGNORE = -100


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class Example:
    prompt: str
    response: str = ""
    meta: dict | None = None


def load_examples(path: str, *, prompt_field: str = "prompt", response_field: str = "response",
                  split: str = "train", what: str = "dataset") -> list[Example]:
    """A JSONL file (one object per line) or a HF dataset saved with ``save_to_disk`` (a directory)."""
    if not path:
        raise ConfigError(f"{what} path is empty; set data.train / data.eval")
    rows = []
    if os.path.isdir(path):
        try:
            import datasets
        except ImportError:  # pragma: no cover
            raise ConfigError(f"{what} {path} is a directory but the `datasets` package is not installed") from None
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"{what} {path} has splits {list(ds)}, not data.split={split!r}")
            ds = ds[split]
        rows = [dict(r) for r in ds]
    elif os.path.isfile(path):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise ConfigError(f"{what} {path}:{lineno} is not UTF-8 text (byte {exc.start}: "
                                      f"{raw[exc.start:exc.start + 1]!r}); re-save the file as UTF-8") from None
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{what} {path}:{lineno} is not valid JSON ({exc.msg})") from None
    else:
        raise ConfigError(f"{what} not found: {path} (a .jsonl file or a HF dataset directory)")
    out = []
    for i, row in enumerate(rows):
        if prompt_field not in row or not str(row[prompt_field]).strip():
            raise ConfigError(f"{what} {path}: row {i + 1} has no non-empty '{prompt_field}' field")
        meta = {k: v for k, v in row.items() if k not in (prompt_field, response_field)}
        out.append(Example(str(row[prompt_field]), str(row.get(response_field) or ""), meta))
    if not out:
        raise ConfigError(f"{what} {path} is empty: it needs at least one prompt")
    return out


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool = True, system_prompt: str = "") -> list[int]:
    """Token ids of the prompt, ready for generation (chat template with the assistant turn opened)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if chat_template:
        raise ConfigError("the tokenizer has no chat template; set data.chat_template=false to use raw prompts")
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer, response: str, eos_id: int, max_len: int) -> list[int]:
    """Dataset response ids, terminated by EOS (the EOS is a trained token); truncated responses get no EOS."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if len(ids) >= max_len:
        return ids[:max_len]
    return ids + [eos_id]


def recorded_response_ids(tokenizer, ex: Example, eos_id: int, max_len: int) -> list[int] | None:
    """The ``response_ids`` an `opdx.generate` record carries (through the EOS when its finish_reason is "stop"),
    cut to ``max_len``, when they are this tokenizer's: ids inside its vocabulary, the EOS its own, decoding to the
    record's response text. None for a record without them or from another tokenizer."""
    ids = (ex.meta or {}).get("response_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids):
        return None
    stop = (ex.meta or {}).get("finish_reason") == "stop"
    if stop and ids[-1] != eos_id:
        return None
    if tokenizer.decode(ids[:-1] if stop else ids, skip_special_tokens=False) != ex.response:
        return None
    return ids[:max_len]


def uses_recorded_ids(ex: Example, response: list[int]) -> bool:
    """Whether an encoded ``response`` is (a prefix of) the record's own ``response_ids``."""
    ids = (ex.meta or {}).get("response_ids")
    return isinstance(ids, list) and bool(response) and list(ids[:len(response)]) == list(response)


def encode_responses(tokenizer, examples: list[Example], *, eos_id: int, max_len: int, what: str) -> list[list[int]]:
    """Per example its recorded response ids (`recorded_response_ids`: the trained tokens are exactly the generated
    ones), else its response text encoded (`encode_response`), else just an EOS."""
    out, retokenized = [], 0
    for ex in examples:
        ids = recorded_response_ids(tokenizer, ex, eos_id, max_len)
        retokenized += ids is None and "response_ids" in (ex.meta or {})
        out.append(ids if ids is not None else
                   encode_response(tokenizer, ex.response, eos_id, max_len) if ex.response else [eos_id])
    if retokenized:
        print(f"opdx.data: {what}: the response_ids of {retokenized} records are not this tokenizer's (ids outside "
              "its vocabulary, another EOS, or another decoded text): their response text is tokenized again",
              file=sys.stderr, flush=True)
    return out


def encode_examples(tokenizer, examples: list[Example], *, chat_template: bool, system_prompt: str,
                    max_prompt_len: int, max_response_len: int, eos_id: int, what: str = "dataset"):
    prompts = []
    for i, ex in enumerate(examples):
        ids = encode_prompt(tokenizer, ex.prompt, chat_template=chat_template, system_prompt=system_prompt)
        if len(ids) > max_prompt_len:
            raise ConfigError(
                f"{what}: prompt {i + 1} is {len(ids)} tokens, longer than data.max_prompt_len={max_prompt_len} "
                f"(raise the limit or shorten it: {ex.prompt[:40]!r}...)"
            )
        prompts.append(ids)
    return prompts, encode_responses(tokenizer, examples, eos_id=eos_id, max_len=max_response_len, what=what)


# -------------------------------------------------------------------------------------------------------- sampler
class Sampler:
    """Deterministic, resumable batches of dataset indices: epoch e is a permutation seeded by (seed, e); each
    global batch of ``world * batch_size`` indices is split into contiguous per-rank slices; a partial tail batch
    is dropped (so every rank always has a full batch). State = (epoch, position), saved in checkpoints."""

    def __init__(self, n: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0):
        if n < 1:
            raise ConfigError("dataset is empty")
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        self.global_batch = batch_size * world_size
        self.epoch = 0
        self.position = 0
        self._order = None

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            rng = random.Random(f"opdx-sampler-{self.seed}-{self.epoch}")
            order = list(range(self.n))
            rng.shuffle(order)
            self._order = (self.epoch, order)
        return self._order[1]

    def next_batch(self) -> list[int]:
        if self.n >= self.global_batch:
            if self.position + self.global_batch > self.n:
                self.epoch += 1
                self.position = 0
            order = self._epoch_order()
            chunk = order[self.position:self.position + self.global_batch]
            self.position += self.global_batch
        else:  # fewer examples than one global batch: cycle through epochs to fill it
            chunk = []
            while len(chunk) < self.global_batch:
                order = self._epoch_order()
                take = min(self.global_batch - len(chunk), self.n - self.position)
                chunk += order[self.position:self.position + take]
                self.position += take
                if self.position >= self.n:
                    self.epoch += 1
                    self.position = 0
        return chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n or state.get("global_batch") != self.global_batch:
            raise ConfigError(
                f"checkpoint sampler was for {state.get('n')} examples / global batch {state.get('global_batch')}, "
                f"now {self.n} / {self.global_batch}: resume with the same dataset, batch size and world size"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = None


# -------------------------------------------------------------------------------------------------------- masks
def completion_lengths(completions: torch.Tensor, eos_ids) -> torch.Tensor:
    """Number of generated tokens in each row of a right-padded ``[B, T]`` completion tensor: up to and including
    the first EOS (any id in ``eos_ids``), or T if no EOS was produced. Works when pad == eos: the first EOS is the
    one the model generated, every later position is padding."""
    if completions.dim() != 2:
        raise ValueError(f"completions must be [B, T], got shape {tuple(completions.shape)}")
    b, t = completions.shape
    if t == 0:
        return torch.zeros(b, dtype=torch.long, device=completions.device)
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    is_eos = torch.zeros_like(completions, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completions == e
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((b,), t, device=completions.device))
    return torch.where(is_eos.any(1), first + 1, first).long()


def completion_mask(completions: torch.Tensor, eos_ids) -> torch.Tensor:
    """Bool ``[B, T]``: True for the generated tokens (see `completion_lengths`)."""
    lengths = completion_lengths(completions, eos_ids)
    return torch.arange(completions.shape[1], device=completions.device)[None, :] < lengths[:, None]


@dataclass
class Batch:
    """A right-padded training batch. ``targets`` is already shifted: it pairs with ``logits[:, :-1]``."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L-1]; completion token ids, IGNORE elsewhere
    loss_mask: torch.Tensor  # [B, L-1] bool; targets != IGNORE
    prompt_lens: list
    completion_lens: list

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def tail(self, n: int) -> "Batch":
        """The last ``n`` target positions (``targets[:, -n:]``), to pair with logits computed for the last
        ``n + 1`` positions (``logits_to_keep``); every completion target must lie inside them."""
        width = self.targets.shape[1]
        if n >= width:
            return self
        if bool(self.loss_mask[:, : width - n].any()):
            raise ValueError(f"tail({n}) would drop trained targets")
        return Batch(self.input_ids, self.attention_mask, self.targets[:, width - n:], self.loss_mask[:, width - n:],
                     self.prompt_lens, self.completion_lens)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device),
                     self.loss_mask.to(device), self.prompt_lens, self.completion_lens)


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """THE one place labels are shifted. Row i is ``prompt_i + completion_i`` right-padded with ``pad_id``;
    ``completion_i`` must already be cut to the generated tokens (see `completion_lengths`) — it may end with an
    EOS equal to ``pad_id``, which is still trained because the mask comes from lengths, never from token values."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many completions as prompts (>0), got {len(prompts)} and {len(completions)}")
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(max(lens), 2)
    b = len(prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    targets = torch.full((b, width - 1), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the first completion token needs a position to be predicted from")
        row = list(p) + list(c)
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
        if c:
            # token at position j (j >= len(p)) is predicted by logits at j - 1
            targets[i, len(p) - 1:len(row) - 1] = torch.tensor(list(c), dtype=torch.long)
    return Batch(input_ids, attention_mask, targets, targets != IGNORE, [len(p) for p in prompts],
                 [len(c) for c in completions])


def trim_completions(completions: torch.Tensor, eos_ids) -> list[list[int]]:
    """Right-padded generated ``[B, T]`` -> list of generated token lists (cut after the first EOS)."""
    lengths = completion_lengths(completions, eos_ids).tolist()
    return [completions[i, :n].tolist() for i, n in enumerate(lengths)]
