"""``teacher.source=file``: the teacher signal of `loss.kind=topk` read from a data file `opdx.generate --logprobs K`
wrote, without a teacher model.

Each record holds the teacher's own response (``response_ids``) and, per response token, the teacher's top-K
log-softmax ids and values at temperature 1 (``topk_ids`` / ``topk_logprobs``). `FileTeacher.score` finds a batch
row by its token ids (prompt + response) and returns the recorded top-k of its trained positions: exactly what a
live teacher's `score(batch, "topk", ...)` returns on those sequences, up to the file's rounding (1e-6). Sequences
the file does not hold (the student's rollouts) cannot be scored: an error, never zeros.

The log-probability of each trained token (the metrics' ``teacher_logratio``) is its recorded value when it is in
the top-K, else the top-K's tail mass log(1 − Σ_K p), an upper bound of it.
"""

from __future__ import annotations

from collections import Counter

import torch

from opdx.data import Batch, Example, uses_recorded_ids
from opdx.errors import ConfigError
from opdx.generate_store import prompt_hashes
from opdx.teacher import TeacherSignal


def _recorded_topk(ex: Example, n: int, row: int, *, topk: int, vocab: int, what: str):
    """(ids [n, K] long, logprobs [n, K] float32) of the record's first ``n`` response tokens."""
    meta, where = ex.meta or {}, f"{what}: row {row + 1}"
    try:
        ids = torch.tensor(meta["topk_ids"][:n], dtype=torch.long)
        logprobs = torch.tensor(meta["topk_logprobs"][:n], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: topk_ids / topk_logprobs must be [tokens][K] lists of numbers ({exc})") from None
    if ids.dim() != 2 or ids.shape != logprobs.shape or ids.shape[0] != n:
        raise ConfigError(f"{where}: topk_ids / topk_logprobs must hold one row of K values per response token "
                          f"({n} trained), got shapes {tuple(ids.shape)} and {tuple(logprobs.shape)}")
    if ids.shape[1] < topk:
        raise ConfigError(f"{where} records the top-{ids.shape[1]} teacher logprobs, fewer than loss.topk={topk}: set "
                          f"loss.topk<={ids.shape[1]} or generate again with --logprobs {topk}")
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ConfigError(f"{where}: topk_ids outside the student's vocabulary of {vocab}: the file was generated "
                          "with another tokenizer; generate it with a teacher that shares the student's tokenizer")
    return ids, logprobs


def _check_prompt_hashes(examples: list[Example], prompts: list[list[int]], what: str) -> None:
    """Each record's ``prompt_hash`` (opdx.generate: of the templated prompt ids and the prompt's occurrence in its
    input file) must be one the trainer's encoding of the same prompt gives: the recorded logprobs were conditioned
    on exactly the prompt the student is trained on."""
    counts = Counter(tuple(p) for p in prompts)
    valid = {key: set(prompt_hashes([list(key)] * n)) for key, n in counts.items()}
    for row, (ex, prompt) in enumerate(zip(examples, prompts)):
        recorded = (ex.meta or {}).get("prompt_hash")
        if recorded is not None and recorded not in valid[tuple(prompt)]:
            raise ConfigError(f"{what}: row {row + 1}'s prompt_hash is not the hash of its prompt as the trainer "
                              "encodes it: the file was generated with another chat template or system prompt; set "
                              "data.system_prompt / data.chat_template to opdx.generate's --system-prompt / "
                              "--chat-template")


class FileTeacher:
    """``FileTeacher(examples, prompts, responses, vocab=, topk=)``: the recorded signals of ``examples`` (the
    data.train records) whose encoded ``prompts`` / ``responses`` are the trainer's training sequences."""

    def __init__(self, examples: list[Example], prompts: list[list[int]], responses: list[list[int]], *, vocab: int,
                 topk: int, what: str = "data.train"):
        self.topk = int(topk)
        self.signals: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        _check_prompt_hashes(examples, prompts, what)
        for row, (ex, prompt, response) in enumerate(zip(examples, prompts, responses)):
            if not {"topk_ids", "topk_logprobs"} <= set(ex.meta or {}):
                raise ConfigError(f"{what}: row {row + 1} has no topk_ids / topk_logprobs: teacher.source=file needs "
                                  f"a file written by `python -m opdx.generate ... --logprobs K` (K >= loss.topk="
                                  f"{topk}), or teacher.source=model")
            if not uses_recorded_ids(ex, response):
                raise ConfigError(
                    f"{what}: row {row + 1}'s response_ids are missing or not the student tokenizer's (ids outside "
                    "its vocabulary, another EOS, or decoding to another text than its response): teacher.source=file "
                    "trains on the file's own tokens; generate the file with a teacher sharing the student's "
                    "tokenizer, or use teacher.source=model")
            key = tuple(prompt) + tuple(response)
            if key not in self.signals:
                self.signals[key] = _recorded_topk(ex, len(response), row, topk=self.topk, vocab=vocab, what=what)

    def _row_signal(self, batch: Batch, b: int):
        n = batch.prompt_lens[b] + batch.completion_lens[b]
        found = self.signals.get(tuple(batch.input_ids[b, :n].tolist()))
        if found is None:
            raise RuntimeError("teacher.source=file: a batch row is not one of data.train's recorded sequences (a "
                               "student rollout?); a file teacher scores only the file's own responses (loss.lmbda=0)")
        return found

    @torch.no_grad()
    def score(self, batch: Batch, kind: str, *, vocab_size: int, temperature: float = 1.0,
              topk: int = 0) -> TeacherSignal:
        """The recorded top-``topk`` ids / logprobs at the batch's trained positions (row-major over (b, t)) and the
        trained tokens' logprobs (see the module doc)."""
        if kind != "topk" or abs(temperature - 1.0) > 1e-12 or not 0 < topk <= self.topk:
            raise ValueError(f"teacher.source=file gives the top-k (k <= {self.topk}) at temperature 1, not {kind!r} "
                             f"at temperature {temperature} with k={topk}")
        rows = [self._row_signal(batch, b) for b in range(batch.input_ids.shape[0])]
        device = batch.input_ids.device
        ids = torch.cat([r[0] for r in rows]).to(device)
        logprobs = torch.cat([r[1] for r in rows]).to(device)
        targets = batch.targets[batch.loss_mask]
        hit = ids == targets[:, None]
        tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1 - 1e-6))
        token = torch.where(hit.any(-1), (logprobs * hit).sum(-1), tail)
        out = torch.zeros(batch.targets.shape, dtype=torch.float32, device=device)
        out[batch.loss_mask] = token
        return TeacherSignal(token_logprobs=out, topk_ids=ids[:, :topk].contiguous(),
                             topk_logprobs=logprobs[:, :topk].contiguous())


__all__ = ["FileTeacher"]
