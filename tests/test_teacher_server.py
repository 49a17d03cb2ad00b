"""Fault tests for the OpenAI-style logprobs teacher client against a local stub server (no vLLM needed)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from opdx.data import build_batch
from opdx.teacher.server import ServerTeacher, TeacherServerError

V = 16


def stub_logprobs(prev: int, j: int, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * prev + j + 7)
    return torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), -1)


def prompt_logprobs_answer(tokens, k, vocab: int = V, rows_fn=None):
    """``rows_fn(tokens) -> [n, vocab]`` (row j: log p(. | tokens[:j + 1])): a model-backed stub; else random."""
    out = [None]
    rows = rows_fn(tokens) if rows_fn is not None else None
    for j in range(1, len(tokens)):
        lp = rows[j - 1] if rows is not None else stub_logprobs(tokens[j - 1], j, vocab)
        order = torch.argsort(lp, descending=True).tolist()
        entry = {}
        for r, t in enumerate(order[:k], start=1):
            entry[str(t)] = {"logprob": float(lp[t]), "rank": r, "decoded_token": f"t{t}"}
        a = tokens[j]
        entry[str(a)] = {"logprob": float(lp[a]), "rank": order.index(a) + 1, "decoded_token": f"t{a}"}
        out.append(entry)
    return {"id": "cmpl-1", "object": "text_completion", "model": "stub",
            "choices": [{"index": 0, "text": "x", "finish_reason": "length", "prompt_logprobs": out}]}


def greedy_answer(prompt, max_tokens: int, vocab: int = V, rows_fn=None):
    """A generation answer (teacher completions for seq_kd and the eval references): the stub teacher's greedy
    tokens with their logprobs."""
    seq, lps = list(prompt), []
    for _ in range(max_tokens):
        lp = rows_fn(seq)[-1] if rows_fn is not None else stub_logprobs(seq[-1], len(seq), vocab)
        t = int(torch.argmax(lp))
        seq.append(t)
        lps.append(float(lp[t]))
    return {"id": "cmpl-2", "object": "text_completion", "model": "stub",
            "choices": [{"index": 0, "text": "x", "finish_reason": "length", "token_ids": seq[len(prompt):],
                         "logprobs": {"token_logprobs": lps}}]}


class Stub:
    def __init__(self):
        self.mode = "ok"
        self.calls = 0
        self.fail_first = 0
        self.max_logprobs = 20
        self.vocab = V  # tokens the stub's teacher distributions cover (ids 0..vocab-1)
        self.rows_fn = None  # tokens -> [n, vocab] next-token log-probs: a model-backed stub (else random ones)
        self.lock = threading.Lock()


def make_handler(stub: Stub):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, body: bytes):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "stub"}]}).encode())

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.calls += 1
                n = stub.calls
            assert req["model"] == "stub"
            if "prompt_logprobs" not in req:  # generation
                answer = greedy_answer(req["prompt"], req["max_tokens"], stub.vocab, stub.rows_fn)
                return self._send(200, json.dumps(answer).encode())
            k = req["prompt_logprobs"]
            assert req["max_tokens"] == 1
            if k > stub.max_logprobs:
                msg = f"Requested prompt logprobs of {k}, which is greater than max allowed: {stub.max_logprobs}"
                return self._send(400, json.dumps({"error": {"message": msg}}).encode())
            if stub.mode == "slow":
                time.sleep(1.0)
            if stub.mode == "500" or (stub.mode == "flaky" and n <= stub.fail_first):
                return self._send(500, b'{"error": "boom"}')
            if stub.mode == "malformed":
                return self._send(200, b'{"choices": [ {"prompt_logprobs": ')
            if stub.mode == "short":
                ans = prompt_logprobs_answer(req["prompt"], k, stub.vocab)
                ans["choices"][0]["prompt_logprobs"] = ans["choices"][0]["prompt_logprobs"][:-1]
                return self._send(200, json.dumps(ans).encode())
            self._send(200, json.dumps(prompt_logprobs_answer(req["prompt"], k, stub.vocab, stub.rows_fn)).encode())

    return H


def start_stub(vocab: int = V):
    """(stub, httpd): the stub teacher server on 127.0.0.1 (a free port) in a daemon thread; stop with
    ``httpd.shutdown(); httpd.server_close()``."""
    stub = Stub()
    stub.vocab = vocab
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(stub))
    httpd.daemon_threads = True
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    stub.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    return stub, httpd


@pytest.fixture()
def server():
    stub, httpd = start_stub()
    yield stub
    httpd.shutdown()
    httpd.server_close()


def make_batch():
    g = torch.Generator().manual_seed(int(time.time_ns() % 10_000))
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 5, 2)]
    comps = [torch.randint(0, V, (n,), generator=g).tolist() for n in (4, 2, 6)]
    return prompts, comps, build_batch(prompts, comps, pad_id=0)


def teacher(stub, **kw):
    kw.setdefault("timeout", 0.3)
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff", 0.01)
    return ServerTeacher(stub.url, **kw)


def expected(prompts, comps, batch, k):
    tok = torch.zeros(batch.targets.shape, dtype=torch.float64)
    ids, lps = [], []
    for b, (p, c) in enumerate(zip(prompts, comps)):
        seq = p + c
        for j in range(len(p), len(seq)):
            lp = stub_logprobs(seq[j - 1], j)
            tok[b, j - 1] = lp[seq[j]]
    for b, t in zip(*torch.nonzero(batch.loss_mask, as_tuple=True)):
        seq = prompts[b] + comps[b]
        lp = stub_logprobs(seq[int(t)], int(t) + 1)
        top = torch.topk(lp, k)
        ids.append(top.indices)
        lps.append(top.values)
    return tok, (torch.stack(ids) if ids else None), (torch.stack(lps) if lps else None)


def test_opd_and_topk_correct(server):
    prompts, comps, batch = make_batch()
    t = teacher(server, topk=4)
    sig = t.score(batch, "opd", vocab_size=V)
    tok, ids, lps = expected(prompts, comps, batch, 4)
    assert sig.token_logprobs.shape == batch.targets.shape
    torch.testing.assert_close(sig.token_logprobs.double(), tok.masked_fill(~batch.loss_mask, 0), atol=1e-6, rtol=0)
    assert bool((sig.token_logprobs[batch.loss_mask] < 0).all())
    sig = t.score(batch, "topk", vocab_size=V, topk=4)
    assert torch.equal(sig.topk_ids, ids)
    torch.testing.assert_close(sig.topk_logprobs.double(), lps, atol=1e-6, rtol=0)
    torch.testing.assert_close(sig.token_logprobs.double(), tok.masked_fill(~batch.loss_mask, 0), atol=1e-6, rtol=0)


def test_topk_above_server_max_is_clear_error(server):
    server.max_logprobs = 5
    with pytest.raises(TeacherServerError, match=r"--max-logprobs 8"):
        teacher(server, topk=8)
    assert server.calls == 1  # a 400 is not retried


def test_timeout_is_bounded_and_named(server):
    t = teacher(server)
    _, _, batch = make_batch()
    server.mode = "slow"
    t0 = time.time()
    with pytest.raises(TeacherServerError, match=r"batch row \d.*failed after 3 attempts.*timed out"):
        t.score(batch, "opd", vocab_size=V)
    assert time.time() - t0 < 10


def test_500_then_success_retries(server):
    prompts, comps, batch = make_batch()
    t = teacher(server, max_concurrency=1)
    server.calls = 0
    server.mode, server.fail_first = "flaky", 2
    sig = t.score(batch, "opd", vocab_size=V)
    tok, _, _ = expected(prompts, comps, batch, 1)
    torch.testing.assert_close(sig.token_logprobs.double(), tok.masked_fill(~batch.loss_mask, 0), atol=1e-6, rtol=0)
    assert server.calls == 3 + 2


def test_500_forever_clear_error(server):
    t = teacher(server)
    _, _, batch = make_batch()
    server.mode = "500"
    server.calls = 0
    with pytest.raises(TeacherServerError, match=r"batch row \d \(\d+ tokens.*failed after 3 attempts.*HTTP 500"):
        t.score(batch, "opd", vocab_size=V)
    assert server.calls >= 3


def test_malformed_json_clear_error(server):
    t = teacher(server, topk=2)
    _, _, batch = make_batch()
    server.mode = "malformed"
    with pytest.raises(TeacherServerError, match=r"batch row.*malformed JSON"):
        t.score(batch, "topk", vocab_size=V, topk=2)


def test_missing_positions_clear_error(server):
    t = teacher(server)
    _, _, batch = make_batch()
    server.mode = "short"
    with pytest.raises(TeacherServerError, match=r"prefix caching"):
        t.score(batch, "opd", vocab_size=V)


def test_unsupported_kind_and_temperature(server):
    t = teacher(server)
    _, _, batch = make_batch()
    with pytest.raises(ValueError, match="gjsd"):
        t.score(batch, "gjsd", vocab_size=V)
    with pytest.raises(ValueError, match="loss.temperature=1"):
        t.score(batch, "opd", vocab_size=V, temperature=2.0)


def test_unreachable_server_clear_error():
    with pytest.raises(TeacherServerError, match=r"failed after 2 attempts.*connection failed"):
        ServerTeacher("http://127.0.0.1:9", timeout=0.3, max_retries=1, backoff=0.01)
