"""The teacher server pool (teacher.server_urls, opdx.teacher.pool) against 2 local stub servers: load spread,
one server killed mid-run (every request still answered correctly, the dead one taken out and later put back),
all down -> a clear error; the least-outstanding choice; the config keys."""

import threading
import time

import pytest
import torch

from opdx.config import ConfigError, load_config
from opdx.data import build_batch
from opdx.teacher.pool import Member, ServerPool, counters_metrics, least_loaded
from opdx.teacher.server import ServerTeacher, TeacherServerError
from tests.test_teacher_server import V, expected, start_stub


class KillableStub:
    """A stub teacher server that can die: after ``die_after`` POSTs (or on `kill`) it drops the connection of
    every request in flight and stops listening, as a crashed server does."""

    def __init__(self):
        self.stub, self.httpd = start_stub()
        self.url = self.stub.url
        self.dead = False
        self.die_after = None
        self.posts = 0  # POSTs received (answered or not)
        handler = self.httpd.RequestHandlerClass
        outer = self

        class Dying(handler):
            def do_POST(self):
                with outer.stub.lock:
                    outer.posts += 1
                    n = outer.posts
                if outer.die_after is not None and n > outer.die_after:
                    outer.kill()
                if outer.dead:
                    self.close_connection = True
                    return  # no answer: the client sees the connection dropped
                super().do_POST()

        self.httpd.RequestHandlerClass = Dying

    def kill(self):
        if not self.dead:
            self.dead = True
            threading.Thread(target=self.stop, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def two():
    servers = [KillableStub(), KillableStub()]
    yield servers
    for s in servers:
        if not s.dead:
            s.stop()


def big_batch(rows=24):
    g = torch.Generator().manual_seed(int(time.time_ns() % 10_000))
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (rows,), generator=g)]
    comps = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 7, (rows,), generator=g)]
    return prompts, comps, build_batch(prompts, comps, pad_id=0)


def pool_teacher(servers, **kw):
    kw = {"timeout": 2.0, "max_retries": 1, "backoff": 0.01, "max_concurrency": 2, **kw}
    return ServerTeacher([s.url for s in servers], topk=3, **kw)


def assert_correct(t, rows=24):
    prompts, comps, batch = big_batch(rows)
    sig = t.score(batch, "topk", vocab_size=V, topk=3)
    tok, ids, lps = expected(prompts, comps, batch, 3)
    torch.testing.assert_close(sig.token_logprobs.double(), tok.masked_fill(~batch.loss_mask, 0), atol=1e-6, rtol=0)
    assert bool((sig.token_logprobs[batch.loss_mask] < 0).all())  # no silent zeros
    assert torch.equal(sig.topk_ids, ids)
    torch.testing.assert_close(sig.topk_logprobs.double(), lps, atol=1e-6, rtol=0)
    return int(batch.loss_mask.any(1).sum())


# ------------------------------------------------------------------------------------------ the choice
def member(outstanding=0, answered=0, up=True, i=0):
    m = Member(client=None, up=up, outstanding=outstanding, answered=answered)
    m.i = i
    return m


def test_least_loaded_choice():
    ms = [member(2, 0, i=0), member(0, 9, i=1), member(1, 0, i=2)]
    assert least_loaded(ms).i == 1
    assert least_loaded(ms, exclude=[ms[1]]).i == 2
    ms[1].up = False
    assert least_loaded(ms).i == 2
    ties = [member(1, 5, i=0), member(1, 3, i=1), member(1, 3, i=2)]
    assert least_loaded(ties).i == 1  # fewer answered, then listed first
    assert least_loaded([member(up=False)]) is None
    assert least_loaded(ties, exclude=ties) is None


def test_counters_metrics():
    rec = counters_metrics([4.0, 2.0, 1.0, 0.0, 0.0, 0.0, 3.0, 2.0])
    assert rec == {"teacher_server_0_requests": 4, "teacher_server_0_latency_s": 0.5, "teacher_server_0_failures": 1,
                   "teacher_server_1_requests": 0, "teacher_server_1_latency_s": 0.0, "teacher_server_1_failures": 3,
                   "teacher_servers_up": 1}


# ------------------------------------------------------------------------------------------ 2 stub servers
def test_load_spread_when_both_up(two):
    t = pool_teacher(two)
    for s in two:
        s.stub.calls = 0
    n = assert_correct(t)
    rec = counters_metrics(t.pool.take_counters())
    assert rec["teacher_server_0_requests"] + rec["teacher_server_1_requests"] == n
    assert min(s.stub.calls for s in two) >= n // 3, [s.stub.calls for s in two]
    assert rec["teacher_servers_up"] == 2 and rec["teacher_server_0_failures"] == 0
    assert rec["teacher_server_0_latency_s"] > 0 and rec["teacher_server_1_latency_s"] > 0
    assert counters_metrics(t.pool.take_counters())["teacher_server_0_requests"] == 0  # counters since last take


def test_server_killed_mid_run(two, capfd):
    t = pool_teacher(two, recheck_s=60.0)
    two[1].die_after = two[1].posts + 4  # dies with requests in flight on it
    answered = sum(assert_correct(t) for _ in range(3))  # 3 "steps": every row answered correctly
    rec = counters_metrics(t.pool.take_counters())
    assert two[1].dead and not t.pool.members[1].up
    assert rec["teacher_servers_up"] == 1 and rec["teacher_server_1_failures"] >= 1
    assert rec["teacher_server_0_requests"] + rec["teacher_server_1_requests"] == answered
    assert rec["teacher_server_1_requests"] <= 4
    assert f"teacher server {two[1].url} taken out" in capfd.readouterr().err


def test_taken_out_server_is_put_back(two):
    t = pool_teacher(two, recheck_s=0.2)
    two[1].stub.mode = "500"
    assert_correct(t, rows=8)
    assert not t.pool.members[1].up
    two[1].stub.mode = "ok"
    time.sleep(0.3)
    deadline = time.time() + 10
    while not t.pool.members[1].up and time.time() < deadline:
        assert_correct(t, rows=2)  # a request starts the due health check in the background
        time.sleep(0.05)
    assert t.pool.members[1].up
    t.pool.take_counters()
    assert_correct(t)
    assert counters_metrics(t.pool.take_counters())["teacher_server_1_requests"] > 0


def test_all_down_clear_error(two):
    t = pool_teacher(two)
    for s in two:
        s.kill()
    time.sleep(0.2)
    _, _, batch = big_batch(4)
    t0 = time.time()
    with pytest.raises(TeacherServerError, match=r"batch row \d.*none of the 2 teacher servers answered") as info:
        t.score(batch, "opd", vocab_size=V)
    assert all(s.url in str(info.value) for s in two) and "connection failed" in str(info.value)
    assert time.time() - t0 < 20


def test_start_with_one_down(two):
    two[1].kill()
    time.sleep(0.2)
    t = pool_teacher(two)
    assert [m.up for m in t.pool.members] == [True, False]
    assert_correct(t, rows=6)
    with pytest.raises(ValueError, match="listed twice"):
        ServerPool([two[0].url, two[0].url])


def test_max_logprobs_checked_on_every_server(two):
    two[1].stub.max_logprobs = 2
    with pytest.raises(TeacherServerError, match=rf"{two[1].url} cannot return 3 .*--max-logprobs 3"):
        pool_teacher(two)


# ------------------------------------------------------------------------------------------ config keys
def _server_config(*overrides):
    """A server teacher needs a kind it can serve (the default, gjsd, needs full logits)."""
    return load_config(None, ["loss.kind=opd", *overrides])


def test_config_server_urls():
    cfg = _server_config("teacher.server_urls=[http://127.0.0.1:8001,http://127.0.0.1:8002]")
    assert cfg.teacher.servers() == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    cfg = _server_config("teacher.server_urls=http://a:1,http://b:2")
    assert cfg.teacher.servers() == ["http://a:1", "http://b:2"]
    assert _server_config("teacher.server_url=http://a:1").teacher.servers() == ["http://a:1"]
    assert _server_config("teacher.server_url=http://a:1", "teacher.server_urls=[http://a:1]").teacher.servers() \
        == ["http://a:1"]
    assert load_config(None, []).teacher.servers() == []


@pytest.mark.parametrize("overrides, message", [
    (["teacher.server_url=http://a:1", "teacher.server_urls=[http://b:1]"], "are both set"),
    (["teacher.server_urls=[http://a:1,http://a:1]"], "distinct"),
    (["teacher.server_urls=[a:1]"], "http"),
    (["teacher.server_urls=[http://a:1]", "loss.kind=gjsd"], "needs full teacher logits"),
    (["teacher.server_urls=[http://a:1]", "teacher.recheck_s=0"], "teacher.recheck_s > 0"),
])
def test_config_server_urls_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _server_config(*overrides)


# ------------------------------------------------------------------------------------------ in the trainer
@pytest.mark.slow  # one 2-rank torchrun (~40 s on the shared CPU box)
def test_trainer_with_two_servers_one_killed(tmp_path_factory, tmp_path):
    """teacher.server_urls in a 2-rank run: the step records carry the per-server metrics; the server killed after
    its first requests is down in the later steps and the run still trains on correct teacher answers."""
    from opdx.models import load_tokenizer
    from tests.test_train import metrics, torchrun
    from tests.tiny_models import make_tiny_pair, write_prompts

    d = tmp_path_factory.mktemp("tiny_pool")
    teacher_dir, student = make_tiny_pair(str(d / "models"))
    tiny = {"student": student, "teacher": teacher_dir, "train": write_prompts(str(d / "train.jsonl"), 24),
            "eval": write_prompts(str(d / "eval.jsonl"), 8)}
    servers = [KillableStub(), KillableStub()]
    vocab = len(load_tokenizer(student))
    for s in servers:
        s.stub.vocab = vocab
    servers[1].die_after = 12  # start-up checks + a few scoring requests of step 1
    try:
        out = tmp_path / "pool"
        torchrun(tiny, out, "train.max_steps=3", "loss.kind=opd", f"teacher.server_urls=[{servers[0].url},"
                 f"{servers[1].url}]", "teacher.path=", "teacher.max_retries=1", "eval.every=0", "save.final=false",
                 "log.plot=false")
    finally:
        for s in servers:
            if not s.dead:
                s.stop()
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert servers[1].dead and rows[-1]["teacher_servers_up"] == 1
    assert sum(r["teacher_server_1_failures"] for r in rows) >= 1
    assert rows[-1]["teacher_server_1_requests"] == 0 and rows[-1]["teacher_server_0_requests"] > 0
    assert all(r["teacher_server_0_latency_s"] > 0 for r in rows)
    assert all(r["reverse_kl"] == r["reverse_kl"] and r["loss"] == r["loss"] for r in rows)
