"""A teacher behind the OpenAI-compatible completions endpoint of a stock ``vllm serve`` (``teacher.server_url``), or
of several (``teacher.server_urls``: a `opdx.teacher.pool.ServerPool` spreads the requests and takes failing servers
out).

Scoring sends each sequence as token ids with ``prompt_logprobs=k`` and ``max_tokens=1``: vLLM returns, for every
prompt position j >= 1, a dict ``{token_id: {"logprob", "rank", "decoded_token"}}`` holding the top-k tokens of
log p(. | x_<j) plus the actual token x_j (so k or k + 1 entries; position 0 is ``null``). From it:

- ``opd``: log p_T(x_j | x_<j) at every trained target (``k = 0`` asks for the actual token only);
- ``topk``: the teacher's top-k ids and log-probs (ranks 1..k, full-vocab normalized) at every trained target,
  plus the target's logprob (the metrics' reverse-KL estimate).

Start the server (see docs/rollouts.md) with ``--max-logprobs >= loss.topk`` (checked at start with a clear error) and
``--no-enable-prefix-caching``: with prefix caching a cached prefix would have no logits and so no prompt logprobs
(vLLM 0.32 skips cache reads for requests that ask for prompt logprobs, older versions did not; this client also
checks that every position came back).

Temperature: vLLM computes prompt logprobs from the raw logits (no sampling processors, whatever the request's
``temperature`` or the server's ``--logprobs-mode``), i.e. at temperature 1. The full-vocab normalizer at another
temperature cannot be recovered from top-k values, so this teacher requires ``loss.temperature == 1`` and says so
otherwise. The request itself uses ``temperature=0`` so the one generated token is greedy and cheap.

Requests run concurrently (a thread pool, ``max_concurrency`` sequences in flight per server), each with a timeout
and bounded retries with exponential backoff on connection errors, timeouts, 5xx/429 and malformed bodies; 4xx
answers are not retried. After the last attempt (on every server of a pool) the error names the request (batch
row, sequence length, URL) and the cause: never silent zeros.
"""

from __future__ import annotations

import math

import torch

from opdx.http import ServerError, ServerRejected, generate_via_completions
from opdx.teacher import TeacherSignal
from opdx.teacher.pool import ServerPool


TeacherServerError = ServerError  # the teacher's name for the shared client's error


def _parse_prompt_logprobs(answer: dict, tokens: list[int], k: int):
    """-> (token_logprobs [n-1], topk_ids [n-1, k], topk_logprobs [n-1, k]) for positions 1..n-1."""
    choices = answer["choices"]
    if not isinstance(choices, list) or len(choices) != 1:
        raise ValueError(f"expected 1 choice, got {len(choices) if isinstance(choices, list) else choices!r}")
    pl = choices[0].get("prompt_logprobs")
    if not isinstance(pl, list):
        raise ValueError("no prompt_logprobs in the answer (does the server support prompt_logprobs?)")
    if len(pl) != len(tokens):
        raise ValueError(f"prompt_logprobs has {len(pl)} positions for a {len(tokens)}-token sequence "
                         "(prefix caching on? start vllm serve with --no-enable-prefix-caching)")
    n = len(tokens)
    tok_lp = torch.empty(n - 1, dtype=torch.float32)
    ids = torch.empty(n - 1, k, dtype=torch.long)
    lps = torch.empty(n - 1, k, dtype=torch.float32)
    for j in range(1, n):
        entry = pl[j]
        if not isinstance(entry, dict):
            raise ValueError(f"position {j}: expected a dict of logprobs, got {str(entry)[:80]}")
        by_id = {int(t): v for t, v in entry.items()}
        actual = by_id.get(int(tokens[j]))
        if actual is None:
            raise ValueError(f"position {j}: the actual token {tokens[j]} is missing from the logprobs")
        tok_lp[j - 1] = _finite(actual["logprob"], j)
        if k:
            ranked = sorted(((int(v["rank"]), t, v["logprob"]) for t, v in by_id.items()
                             if v.get("rank") is not None and int(v["rank"]) <= k))
            if len(ranked) != k or [r for r, _, _ in ranked] != list(range(1, k + 1)):
                raise ValueError(f"position {j}: expected ranks 1..{k}, got {[r for r, _, _ in ranked]}")
            ids[j - 1] = torch.tensor([t for _, t, _ in ranked])
            lps[j - 1] = torch.tensor([_finite(lp, j) for _, _, lp in ranked])
    return tok_lp, ids, lps


def _finite(value, j) -> float:
    v = float(value)
    if math.isnan(v) or v > 1e-3:
        raise ValueError(f"position {j}: invalid logprob {value!r}")
    return v


class ServerTeacher:
    """``score(batch, kind, *, vocab_size, temperature, topk)`` like `LocalTeacher`, through ``vllm serve``."""

    kinds = ("opd", "sft", "topk")

    def __init__(self, urls: str | list[str], *, topk: int = 0, model: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, max_concurrency: int = 16, recheck_s: float = 30.0,
                 check: bool = True):
        self.pool = ServerPool(urls, model=model, timeout=timeout, max_retries=max_retries, backoff=backoff,
                               max_concurrency=max_concurrency, recheck_s=recheck_s)
        self.topk = int(topk)
        self.zero3 = False
        if check:
            self.check_server(self.topk)

    def check_server(self, k: int) -> None:
        """Fail at start, with the fix, when a server cannot return ``k`` prompt logprobs per position (every
        server that is up is asked)."""
        payload = {"prompt": [0, 0], "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": int(k)}
        try:
            answers = self.pool.complete_on_each("start-up check (prompt_logprobs=%d)" % k, payload)
        except ServerRejected as exc:
            if "logprobs" not in str(exc).lower():
                raise
            raise TeacherServerError(
                f"teacher server {exc.url} cannot return {k} prompt logprobs per position (loss.topk, or "
                f"loss.uld_topm for uld / gold, = {k}); restart it with `vllm serve ... --max-logprobs {max(k, 1)}` or "
                f"lower that setting. Server said: {exc}") from None
        for answer in answers:
            _parse_prompt_logprobs(answer, [0, 0], k)

    def _score_rows(self, batch, k: int):
        ids = batch.input_ids.cpu()
        lens = batch.attention_mask.cpu().sum(1).tolist()
        rows = [(b, ids[b, :int(n)].tolist()) for b, n in enumerate(lens)]

        def one(item):
            b, tokens = item
            if len(tokens) < 2:
                return None
            what = f"teacher scoring request for batch row {b} ({len(tokens)} tokens, prompt_logprobs={k})"
            payload = {"prompt": tokens, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
            return self.pool.complete(what, payload, check=lambda a: _parse_prompt_logprobs(a, tokens, k))

        return self.pool.map(one, rows)

    @torch.no_grad()
    def score(self, batch, kind: str, *, vocab_size: int, temperature: float = 1.0, topk: int = 0) -> TeacherSignal:
        if kind not in self.kinds:
            raise ValueError(f"teacher.server_url cannot give loss.kind={kind!r} (it needs full teacher logits); "
                             f"use loss.kind=opd or topk with a server teacher")
        if abs(float(temperature) - 1.0) > 1e-12:
            raise ValueError(f"teacher.server_url needs loss.temperature=1 (vLLM returns prompt logprobs of the raw "
                             f"logits, and the temperature-{temperature} normalizer is not recoverable from top-k "
                             "values); got loss.temperature=%g" % temperature)
        k = int(topk) if kind == "topk" else 0
        if kind == "topk" and k > self.topk:
            self.check_server(k)
            self.topk = k
        results = self._score_rows(batch, k)
        device = batch.targets.device
        width = batch.targets.shape[1]
        tok = torch.zeros(batch.targets.shape, dtype=torch.float32)
        full_ids = torch.zeros(batch.targets.shape + (max(k, 1),), dtype=torch.long)
        full_lps = torch.zeros(batch.targets.shape + (max(k, 1),), dtype=torch.float32)
        for b, res in enumerate(results):
            if res is None:
                continue
            t_lp, ids, lps = res
            n = min(t_lp.shape[0], width)
            tok[b, :n] = t_lp[:n]
            if k:
                full_ids[b, :n] = ids[:n]
                full_lps[b, :n] = lps[:n]
        mask = batch.loss_mask.cpu()
        valid_lens = batch.attention_mask.cpu().sum(1)
        pos = torch.arange(width)[None, :]
        if bool((mask & (pos >= (valid_lens[:, None] - 1))).any()):
            raise TeacherServerError("loss_mask marks positions beyond a row's attention_mask; cannot score them")
        tok = tok.masked_fill(~mask, 0.0)
        if kind != "topk":
            return TeacherSignal(token_logprobs=tok.to(device))
        ids = full_ids[mask]
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise TeacherServerError(f"teacher server returned token id {int(ids.max())} >= vocab_size {vocab_size}")
        return TeacherSignal(token_logprobs=tok.to(device), topk_ids=ids.to(device),
                             topk_logprobs=full_lps[mask].to(device))

    def generate(self, prompts, *, seed: int, max_new_tokens: int, temperature: float, top_p: float, eos_ids,
                 pad_id: int, synced_gpus: bool = False, vocab_size: int | None = None):
        """Teacher completions for sequence-level KD (`loss.seq_kd`) through the same endpoint."""
        return generate_via_completions(self.pool, prompts, seed=seed, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id,
                                        what="teacher generation")


__all__ = ["ServerTeacher", "TeacherServerError"]
