"""A pool of OpenAI-style teacher servers (``teacher.server_urls``) behind the interface of one
`opdx.http.CompletionsClient` (``complete``, ``map``), so `ServerTeacher` scores through one or many servers alike.

- Spreading: each request goes to the server that is up with the least outstanding work (requests in flight from
  this process), ties to the one that has answered fewer requests, then to the first listed.
- Failure: a server whose request fails after the client's own retries (connection error, timeout, 5xx/429, a
  malformed answer) is taken out and the request is re-sent to another server, each server tried at most once per
  request. A 4xx answer (`ServerRejected`) is the request's fault: raised at once, the server stays in.
- Health checks: every server answers ``GET /v1/models`` at start (one that does not starts out taken out, unless
  none answers: then `ServerError`); a server taken out is probed again in the background every ``recheck_s`` and
  put back when it answers. When no server is up, the request probes the ones it has not tried yet itself, and
  when none answers it raises `ServerError` naming every server and its cause: never a lost batch or silent zeros.
- Metrics: per server, requests answered, their mean latency and the failures since the last `take_counters`.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from opdx.http import CompletionsClient, ServerError, ServerRejected, map_concurrently


@dataclass(eq=False)
class Member:
    """One server of the pool and what the pool knows about it."""

    client: CompletionsClient
    up: bool = True
    outstanding: int = 0  # requests in flight on it now
    answered: int = 0  # requests it answered since the start (the tie-break of the choice)
    # since the last take_counters: requests answered, their summed latency, failures
    requests: int = 0
    latency_s: float = 0.0
    failures: int = 0
    last_error: str = ""
    recheck_at: float = 0.0  # monotonic time of its next health check while taken out
    probing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return self.client.base_url


def least_loaded(members: list[Member], exclude=()) -> Member | None:
    """The up member (not in ``exclude``) with the least outstanding work; ties: fewer answered, then listed first."""
    best = None
    for m in members:
        if m.up and m not in exclude and (best is None or (m.outstanding, m.answered) < (best.outstanding,
                                                                                         best.answered)):
            best = m
    return best


def _warn(message: str) -> None:
    print(f"opdx.teacher: {message}", file=sys.stderr, flush=True)


class ServerPool:
    """``ServerPool(urls, timeout=, max_retries=, backoff=, max_concurrency=, recheck_s=)``: one
    `CompletionsClient` per url; ``max_concurrency`` requests in flight per server."""

    def __init__(self, urls: list[str], *, model: str | None = None, timeout: float = 60.0, max_retries: int = 3,
                 backoff: float = 0.5, max_concurrency: int = 16, recheck_s: float = 30.0):
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("no teacher server: pass teacher.server_urls=[http://HOST:PORT, ...] (`vllm serve`s)")
        if len(set(urls)) != len(urls):
            raise ValueError(f"teacher server urls listed twice in {list(urls)}: list each server once")
        self.members = [Member(CompletionsClient(u, model=model, timeout=timeout, max_retries=max_retries,
                                                 backoff=backoff, max_concurrency=max_concurrency)) for u in urls]
        self.max_concurrency = max(1, int(max_concurrency))
        self.recheck_s = float(recheck_s)
        self._lock = threading.Lock()
        self._start_up()

    @property
    def base_url(self) -> str:
        """The servers, for messages."""
        return ", ".join(m.url for m in self.members)

    def _start_up(self) -> None:
        for m in self.members:
            try:
                _ = m.client.model  # GET /v1/models with the client's retries
            except ServerError as exc:
                self._take_out(m, str(exc))
        if not any(m.up for m in self.members):
            raise self._all_failed("start-up check (GET /v1/models)", {m: m.last_error for m in self.members})
        names = {m.client.model for m in self.members if m.up}
        if len(names) > 1:
            _warn(f"the teacher servers serve differently named models {sorted(names)}: they must be the same "
                  "teacher (a different one would give a wrong signal)")

    def complete_on_each(self, what: str, payload: dict) -> list[dict]:
        """``payload`` to every server that is up (start-up checks): one that fails is taken out, a 4xx answer is
        raised (`ServerRejected`), and ServerError when no server is left."""
        answers, errors = [], {}
        for m in [m for m in self.members if m.up]:
            try:
                answers.append(m.client.complete(what, payload))
            except ServerRejected:
                raise
            except ServerError as exc:
                errors[m] = str(exc)
                self._take_out(m, errors[m])
        if not answers:
            raise self._all_failed(what, errors)
        return answers

    # ------------------------------------------------------------------------------------------ requests
    def complete(self, what: str, payload: dict, check=None):
        """`CompletionsClient.complete` on the least loaded server, re-sent to another one when it fails."""
        errors: dict[Member, str] = {}
        while True:
            m = self._acquire(list(errors))
            if m is None:
                raise self._all_failed(what, errors)
            t0 = time.monotonic()
            try:
                out = m.client.complete(what, payload, check=check)
            except ServerRejected:
                self._release(m)
                raise
            except ServerError as exc:
                errors[m] = str(exc)
                self._release(m, error=errors[m])
                continue
            self._release(m, latency=time.monotonic() - t0)
            return out

    def map(self, fn, items: list):
        """``fn`` over ``items`` with up to ``max_concurrency`` requests in flight per server (in order)."""
        return map_concurrently(fn, items, self.max_concurrency * len(self.members))

    def _acquire(self, tried: list[Member]) -> Member | None:
        """The server for the next attempt (its outstanding count taken); when none is up, the untried ones are
        probed here first."""
        self._recheck_due()
        for probe_first in (False, True):
            if probe_first:
                for m in [m for m in self.members if m not in tried and not m.up]:
                    self._probe(m)
            with self._lock:
                m = least_loaded(self.members, exclude=tried)
                if m is not None:
                    m.outstanding += 1
                    return m
        return None

    def _release(self, m: Member, *, latency: float | None = None, error: str | None = None) -> None:
        with self._lock:
            m.outstanding -= 1
            if latency is not None:
                m.answered += 1
                m.requests += 1
                m.latency_s += latency
        if error is not None:
            self._take_out(m, error)

    # ------------------------------------------------------------------------------------------ health
    def _take_out(self, m: Member, error: str) -> None:
        with self._lock:
            m.failures += 1
            m.last_error = error
            was_up, m.up = m.up, False
            m.recheck_at = time.monotonic() + self.recheck_s
        if was_up and len(self.members) > 1:
            _warn(f"teacher server {m.url} taken out ({error.splitlines()[0][:300]}); its requests go to the "
                  f"others, and it is checked again every {self.recheck_s:g} s")

    def _probe(self, m: Member) -> None:
        """One health check of a taken-out server: back in when it answers GET /v1/models."""
        with m.lock:
            if m.up:
                return
            try:
                m.client.probe()
            except ServerError as exc:
                with self._lock:
                    m.last_error = str(exc)
                    m.recheck_at = time.monotonic() + self.recheck_s
                return
            with self._lock:
                m.up = True
            if len(self.members) > 1:
                _warn(f"teacher server {m.url} answers again: back in the pool")

    def _recheck_due(self) -> None:
        """Start a background health check of each taken-out server whose recheck time has come."""
        now = time.monotonic()
        for m in self.members:
            with self._lock:
                due = not m.up and not m.probing and now >= m.recheck_at
                if due:
                    m.probing = True
            if due:
                threading.Thread(target=self._background_probe, args=(m,), daemon=True).start()

    def _background_probe(self, m: Member) -> None:
        try:
            self._probe(m)
        finally:
            with self._lock:
                m.probing = False

    def _all_failed(self, what: str, errors: dict[Member, str]) -> ServerError:
        """The error when no server could answer ``what``: each server's own failure of this request, else its
        last health-check cause."""
        def cause(m: Member) -> str:
            return errors.get(m) or f"{what}: {m.last_error or 'not answering'}"

        if len(self.members) == 1:
            return ServerError(cause(self.members[0]))
        causes = "; ".join(f"{m.url}: {cause(m).splitlines()[0]}" for m in self.members)
        return ServerError(f"{what}: none of the {len(self.members)} teacher servers answered (each tried, after "
                           f"the client's retries; start or fix them): {causes}")

    # ------------------------------------------------------------------------------------------ metrics
    def take_counters(self) -> list[float]:
        """Per server [requests, latency sum, failures, down (0/1)] since the last call, flattened (the
        trainer sums them over ranks before `counters_metrics`)."""
        out = []
        with self._lock:
            for m in self.members:
                out += [float(m.requests), m.latency_s, float(m.failures), 0.0 if m.up else 1.0]
                m.requests, m.latency_s, m.failures = 0, 0.0, 0
        return out


def counters_metrics(counters: list[float]) -> dict:
    """The step record's server metrics from (rank-summed) `ServerPool.take_counters`: per server i
    ``teacher_server_{i}_requests``, ``_latency_s`` (mean per answered request), ``_failures``, and
    ``teacher_servers_up`` (servers up on every rank)."""
    record, up = {}, 0
    for i in range(len(counters) // 4):
        requests, latency, failures, down = counters[4 * i: 4 * i + 4]
        record[f"teacher_server_{i}_requests"] = int(requests)
        record[f"teacher_server_{i}_latency_s"] = latency / requests if requests else 0.0
        record[f"teacher_server_{i}_failures"] = int(failures)
        up += down == 0
    record["teacher_servers_up"] = up
    return record


__all__ = ["Member", "ServerPool", "counters_metrics", "least_loaded"]
