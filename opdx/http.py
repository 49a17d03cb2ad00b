"""The one OpenAI-style HTTP client (``/v1/completions`` of a stock ``vllm serve``), shared by the teacher server
(`opdx.teacher.server.ServerTeacher`) and the rollout server (`opdx.rollout.vllm.VLLMServerRollout`).

Every request has a timeout and bounded retries with exponential backoff on connection errors, timeouts, 5xx/429
and malformed bodies; 4xx answers are not retried. After the last attempt `ServerError` names the request and the
cause. Standard library only (urllib), so neither side needs vLLM or an HTTP package.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from opdx.rollout.batch import RolloutBatch, batch_from_completions, check_finish_reason


class ServerError(RuntimeError):
    """A request to the server failed after its retries, or its answer was malformed."""


class ServerRejected(ServerError):
    """The server at ``url`` answered 4xx: the request itself is wrong (not retried, no other server would take it)."""

    def __init__(self, message: str, url: str = ""):
        super().__init__(message)
        self.url = url


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


def post_json(url: str, payload: dict, timeout: float) -> dict:
    """One POST; raises _Retryable (transient) or _Fatal (4xx) with a one-line cause."""
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    return _send(req, timeout)


def get_json(url: str, timeout: float) -> dict:
    return _send(urllib.request.Request(url, method="GET"), timeout)


def _send(req, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode(errors="replace") if exc.fp is not None else ""
        msg = f"HTTP {exc.code}: {detail.strip()}"
        if exc.code >= 500 or exc.code == 429:
            raise _Retryable(msg) from None
        raise _Fatal(msg) from None
    except (socket.timeout, TimeoutError) as exc:
        raise _Retryable(f"timed out after {timeout:g} s ({exc})") from None
    except (urllib.error.URLError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Retryable(f"timed out after {timeout:g} s") from None
        raise _Retryable(f"connection failed: {reason}") from None
    try:
        out = json.loads(body)
    except ValueError as exc:
        raise _Retryable(f"malformed JSON in the response ({exc}; body starts {body[:80]!r})") from None
    if not isinstance(out, dict):
        raise _Retryable(f"malformed response: expected a JSON object, got {type(out).__name__}")
    return out


class CompletionsClient:
    """Token-in/token-out calls to ``{base_url}/v1/completions`` with timeouts, retries and backoff."""

    def __init__(self, base_url: str, *, model: str | None = None, timeout: float = 60.0, max_retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 8.0, max_concurrency: int = 16):
        if not base_url:
            raise ValueError("server url is empty: pass e.g. http://127.0.0.1:8000 (the `vllm serve` address)")
        base = base_url.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.base_url = base
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        if self.max_retries < 0 or self.timeout <= 0:
            raise ValueError(f"need timeout > 0 and max_retries >= 0, got {timeout}, {max_retries}")
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_concurrency = max(1, int(max_concurrency))
        self._model = model

    @property
    def model(self) -> str:
        """The served model name (``--served-model-name``), read once from ``/v1/models`` when not given."""
        if self._model is None:
            self._model = self._model_name(self.call("GET /v1/models", self._get_models))
        return self._model

    def probe(self) -> None:
        """Health check: one GET /v1/models, no retries (reads the model name when not known yet); raises
        ServerError with the cause when the server does not answer."""
        try:
            out = self._get_models()
        except (_Retryable, _Fatal) as exc:
            raise ServerError(f"GET {self.base_url}/v1/models: {exc}") from None
        name = self._model_name(out)
        if self._model is None:
            self._model = name

    def _get_models(self) -> dict:
        return get_json(self.base_url + "/v1/models", self.timeout)

    def _model_name(self, out: dict) -> str:
        try:
            return str(out["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{self.base_url}/v1/models: malformed answer {str(out)[:200]}") from None

    def call(self, what: str, fn):
        """Run ``fn`` with bounded retries and exponential backoff; raise ServerError naming ``what``."""
        last = None
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except _Fatal as exc:
                raise ServerRejected(f"{what}: rejected by {self.base_url}: {exc}", self.base_url) from None
            except _Retryable as exc:
                last = exc
            if attempt < self.max_retries:
                time.sleep(min(self.max_backoff, self.backoff * (2 ** attempt)))
        raise ServerError(f"{what}: failed after {self.max_retries + 1} attempts to {self.base_url}: {last}")

    def complete(self, what: str, payload: dict, check=None) -> dict:
        """POST /v1/completions; ``check(answer)`` raises ValueError on a malformed answer (retried)."""
        payload = dict(payload, model=self.model)
        url = self.base_url + "/v1/completions"

        def once():
            out = post_json(url, payload, self.timeout)
            if check is not None:
                try:
                    return check(out)
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise _Retryable(f"malformed completions answer: {exc!r}") from None
            return out

        return self.call(what, once)

    def map(self, fn, items: list):
        return map_concurrently(fn, items, self.max_concurrency)


def map_concurrently(fn, items: list, workers: int) -> list:
    """``[fn(x) for x in items]`` with up to ``workers`` calls in flight (threads), in order."""
    workers = min(int(workers), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def generate_via_completions(client, prompts, *, seed: int, max_new_tokens: int, temperature: float, top_p: float,
                             eos_ids, pad_id: int, what: str = "rollout", min_new_tokens: int = 0) -> RolloutBatch:
    """Token-in/token-out generation through ``/v1/completions`` (one request per prompt, run concurrently)."""
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    sample = temperature > 0

    def check(answer, n_prompt):
        choice = answer["choices"][0]
        ids = choice["token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError("no token_ids in the answer (server older than return_token_ids?)")
        lp = choice["logprobs"]["token_logprobs"]
        if len(lp) != len(ids) or any(v is None for v in lp):
            raise ValueError(f"{len(lp)} token_logprobs for {len(ids)} tokens")
        return ids, [float(v) for v in lp], check_finish_reason(choice["finish_reason"], 0)

    def one(item):
        i, p = item
        payload = {"prompt": list(p), "max_tokens": int(max_new_tokens), "temperature": float(temperature),
                   "top_p": float(top_p) if sample else 1.0, "seed": int(seed) * 100003 + i, "logprobs": 0,
                   "stop_token_ids": eos_ids, "return_token_ids": True, "skip_special_tokens": False}
        if min_new_tokens:
            payload["min_tokens"] = min(int(min_new_tokens), int(max_new_tokens))
        return client.complete(f"{what} request for prompt {i} ({len(p)} tokens)", payload,
                               check=lambda a: check(a, len(p)))

    results = client.map(one, list(enumerate(prompts)))
    comps = [r[0] for r in results]
    lps = [r[1] for r in results]
    finish = [r[2] for r in results]
    return batch_from_completions(prompts, comps, lps, finish, pad_id=pad_id, eos_ids=eos_ids)


__all__ = ["CompletionsClient", "ServerError", "ServerRejected", "generate_via_completions", "get_json",
           "map_concurrently", "post_json"]
