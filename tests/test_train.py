"""End-to-end trainer runs: 2-process torchrun on tiny random models (CPU, gloo, DeepSpeed), bad-input errors,
and SIGKILL + resume reproducing the metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_tiny_pair, write_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "examples" / "configs" / "tiny.yaml")
# DeepSpeed JIT-builds a small comm op on first use (~40 s): one cache shared by every run
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
TIMING_KEYS = {"tokens_per_s"} | {"time_" + p + "_s" for p in ("step", "rollout", "teacher", "loss", "backward",
                                                             "clip", "optimizer", "train", "sync")}


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=EXT_DIR, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    teacher, student = make_tiny_pair(str(d / "models"))
    train = write_prompts(str(d / "train.jsonl"), 24)
    ev = write_prompts(str(d / "eval.jsonl"), 8)
    return {"teacher": teacher, "student": student, "train": train, "eval": ev, "dir": d}


def _overrides(tiny, out, *extra):
    return [f"model.source=path", f"model.path={tiny['student']}", f"teacher.path={tiny['teacher']}",
            f"data.train={tiny['train']}", f"data.eval={tiny['eval']}", f"train.output_dir={out}", *extra]


def _cmd(nproc, args, entry=("-m", "opdx.train")):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 1000), *entry, "--config", TINY, *args]


def torchrun(tiny, out, *extra, nproc=2, timeout=240, env_extra=None):
    env = _env()
    env.update(env_extra or {})
    p = subprocess.run(_cmd(nproc, _overrides(tiny, out, *extra)), env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def check_run(out, steps):
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    ev = [r for r in rows if "eval_reverse_kl" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        for k in ("step", "loss", "tokens_per_s", "time_rollout_s", "time_teacher_s", "time_train_s",
                  "response_len", "source"):
            assert k in r, k
        # reverse KL on the student's own samples; a log-ratio on teacher / dataset sequences (no KL estimate)
        assert ("reverse_kl" in r) == ("student" in r["source"].split(",")), r
        assert ("teacher_logratio" in r) == (set(r["source"].split(",")) != {"student"}), r
        assert all(isinstance(r[k], (int, float)) and r[k] == r[k] for k in r if k != "source")
    assert ev and ev[0]["step"] == 0 and ev[-1]["step"] == steps
    report = Path(out) / "report"  # the end-of-run opdx.report
    assert (report / "learning_curve.png").is_file() and (report / "report.md").is_file()
    assert json.loads((Path(out) / "summary.json").read_text())["plot"] == str(report / "learning_curve.png")
    assert list((Path(out) / "tb").glob("events.*"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(Path(out) / "final"))  # loadable by transformers
    return train, ev


def _has_op(name):
    import opdx.ops

    return hasattr(opdx.ops, name)


# --------------------------------------------------------------------------------------------- runs per kind
def test_opd_zero0_lambda_draw_identical_across_ranks(tiny, tmp_path):
    """lmbda=0.5 + seq_kd: every source kind appears over the run; each rank logs its own copy of the draw."""
    out = tmp_path / "opd0"
    torchrun(tiny, out, "train.max_steps=6", "loss.lmbda=0.5", "loss.seq_kd=true", "loss.sft_alpha=0.1",
             "log.per_rank_sources=true", "train.grad_accum=2")
    train, _ = check_run(out, 6)
    r0 = (out / "sources_rank0.jsonl").read_text().splitlines()
    r1 = (out / "sources_rank1.jsonl").read_text().splitlines()
    assert len(r0) == 12 and r0 == r1
    assert {json.loads(x)["source"] for x in r0} == {"student", "teacher"}


def test_completions_log_and_eval_metrics(tiny, tmp_path):
    """log.completions.every=2: completions.jsonl at the evals of steps 0 and 2 (not 1), per-token fields of equal
    lengths from the eval's samples, the report's bold tokens; eval.metrics logged per spec, averaged over ranks."""
    (tmp_path / "opdx_train_metric.py").write_text(
        "def answer_tenth(prompt, completion, record):\n"
        "    return float(record['answer']) / 10 if record['prompt'] == prompt else -100.0\n")
    out = tmp_path / "completions"
    torchrun(tiny, out, "train.max_steps=2", "eval.every=1", "log.completions.every=2", "log.completions.num=2",
             "eval.metrics=[exact_match, 'digit=regex:(\\d)', python:opdx_train_metric:answer_tenth]",
             "save.every=0", env_extra={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    _, ev = check_run(out, 2)
    answers = [int(json.loads(ln)["answer"]) for ln in Path(tiny["eval"]).read_text().splitlines()]
    for r in ev:  # the callable scores every eval record (8, 4 per rank), exact_match / regex those with an answer
        assert r["eval_answer_tenth"] == pytest.approx(sum(answers) / len(answers) / 10)
        assert 0.0 <= r["eval_digit"] <= 1.0 and 0.0 <= r["eval_task_accuracy"] <= 1.0
        assert "eval_teacher_answer_tenth" in r and "eval_exact_match" not in r
    events = [json.loads(ln) for ln in (out / "completions.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [0, 2]
    for e in events:
        assert len(e["completions"]) == 2
        for c in e["completions"]:
            n = len(c["tokens"])
            assert n > 0 and c["prompt"] and c["teacher"] is not None
            assert len(c["token_ids"]) == len(c["student_logprobs"]) == len(c["teacher_logprobs"]) == n
            assert c["logprob_diff"] == pytest.approx([s - t for s, t in zip(c["student_logprobs"],
                                                                             c["teacher_logprobs"])], abs=2e-4)
            assert all(lp <= 0 for lp in c["student_logprobs"] + c["teacher_logprobs"])
    # the same prompts and the same teacher answer at every event; the student's samples move with training
    assert [c["prompt"] for c in events[0]["completions"]] == [c["prompt"] for c in events[1]["completions"]]
    assert [c["teacher"] for c in events[0]["completions"]] == [c["teacher"] for c in events[1]["completions"]]
    text = (out / "report" / "report.md").read_text()
    assert "## Completions" in text and "### Step 0" in text and "### Step 2" in text
    assert text.count("| student (sample) |") == 4 and "**" in text.split("## Completions")[1]


def test_opd_zero3_teacher_zero3(tiny, tmp_path):
    """ZeRO-3 student (rollouts with synced_gpus) and the teacher as a ZeRO-3 inference engine, with seq_kd."""
    out = tmp_path / "opd3"
    torchrun(tiny, out, "train.max_steps=4", "deepspeed.zero_stage=3", "eval.every=2", "teacher.deepspeed=true",
             "loss.lmbda=0.5", "loss.seq_kd=true")
    check_run(out, 4)


def test_lora_gradient_checkpointing_zero2(tiny, tmp_path):
    out = tmp_path / "lora"
    torchrun(tiny, out, "train.max_steps=2", "deepspeed.zero_stage=2", "model.lora=true", "model.lora_r=4",
             "model.gradient_checkpointing=true", "eval.every=0")
    check_run(out, 2)
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.skipif(not _has_op("generalized_jsd"), reason="opdx.ops.generalized_jsd not merged yet")
def test_gjsd_zero2(tiny, tmp_path):
    out = tmp_path / "gjsd"
    torchrun(tiny, out, "train.max_steps=4", "loss.kind=gjsd", "loss.beta=0.5", "deepspeed.zero_stage=2",
             "loss.lmbda=0.5")
    check_run(out, 4)


@pytest.mark.skipif(not _has_op("topk_kl"), reason="opdx.ops.topk_kl not merged yet")
def test_topk_zero1(tiny, tmp_path):
    out = tmp_path / "topk"
    torchrun(tiny, out, "train.max_steps=4", "loss.kind=topk", "loss.topk=8", "deepspeed.zero_stage=1")
    check_run(out, 4)


def _final_weights(out, sub=""):
    from safetensors.torch import load_file

    d = Path(out) / "final" / sub
    return load_file(str(d / ("adapter_model.safetensors" if sub == "adapter" else "model.safetensors")))


def _same_run(a, b, *, rel):
    """Two runs of one config: the same per-step losses / reverse KL and the same final weights."""
    ta, tb = [r for r in metrics(a) if "loss" in r], [r for r in metrics(b) if "loss" in r]
    assert [r["step"] for r in ta] == [r["step"] for r in tb] and ta
    for x, y in zip(ta, tb):
        assert set(x) == set(y), (x["step"], sorted(set(x) ^ set(y)))
        for k in ("loss", "reverse_kl", "reverse_kl_k3", "teacher_logratio", "tokens"):
            if k not in x:
                continue
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-7), (x["step"], k, x[k], y[k])
    for sub in ("", "adapter") if (Path(a) / "final" / "adapter").is_dir() else ("",):
        wa, wb = _final_weights(a, sub), _final_weights(b, sub)
        assert set(wa) == set(wb) and wa
        for name in wa:
            assert wa[name].shape == wb[name].shape and torch.isfinite(wb[name]).all(), (sub, name)
            diff = float((wb[name].double() - wa[name].double()).norm() / wa[name].double().norm().clamp_min(1e-30))
            assert diff < rel, (sub, name, diff)


@pytest.mark.skipif(not _has_op("topk_kl"), reason="opdx.ops.topk_kl not merged yet")
def test_topk_zero3_matches_zero0(tiny, tmp_path):
    """loss.kind=topk on a ZeRO-3 student: the loss runs inside the lm_head's module call (opdx.train.scoring.lm_head_call),
    so the partitioned weight is gathered for the forward, re-gathered for the backward and its gradient
    reduce-scattered. Same losses and final weights as ZeRO-0 (fp32; dataset sequences, so the batches do not
    depend on sampling; an sft term through the lm_head's own forward; the ZeRO-3 run packed)."""
    common = ("train.max_steps=2", "loss.kind=topk", "loss.topk=8", "loss.beta=0.5", "loss.lmbda=0",
              "loss.sft_alpha=0.2", "save.every=0")
    z0, z3 = tmp_path / "topk_z0", tmp_path / "topk_z3"
    torchrun(tiny, z0, *common, "deepspeed.zero_stage=0", "eval.at_start=false", "log.plot=false")
    torchrun(tiny, z3, *common, "deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0",
             "model.packed=true")
    check_run(z3, 2)
    _same_run(z0, z3, rel=1e-5)


@pytest.mark.skipif(not _has_op("topk_kl"), reason="opdx.ops.topk_kl not merged yet")
def test_topk_lora_zero3_final_save_matches_zero0(tiny, tmp_path):
    """loss.kind=topk with LoRA (adapters on the attention projections, trained through the hidden states) under
    ZeRO-3: the final save gathers the partitioned weights and writes what the ZeRO-0 run writes, the adapter under
    final/adapter and the merged model under final/, equal to the ZeRO-0 run's files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = ("train.max_steps=2", "loss.kind=topk", "loss.topk=8", "loss.tail=true", "loss.lmbda=0",
              "model.lora=true", "model.lora_r=4", "model.packed=true", "save.every=0", "optim.lr=1e-2")
    z0, z3 = tmp_path / "lora_z0", tmp_path / "lora_z3"
    torchrun(tiny, z0, *common, "deepspeed.zero_stage=0", "eval.at_start=false", "log.plot=false")
    torchrun(tiny, z3, *common, "deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0")
    check_run(z3, 2)
    _same_run(z0, z3, rel=1e-5)
    initial = AutoModelForCausalLM.from_pretrained(tiny["student"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(str(z3 / "final")).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny["student"])
    reloaded = PeftModel.from_pretrained(base, str(z3 / "final" / "adapter")).merge_and_unload().state_dict()
    assert set(merged) == set(reloaded) == set(initial)
    for name, w in merged.items():  # base + the saved adapter == the saved merged model
        assert torch.allclose(reloaded[name], w, rtol=0, atol=1e-6), name
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):  # the LoRA targets
            assert float((w - initial[name]).abs().max()) > 1e-4, name
        else:
            assert torch.equal(w, initial[name]), name


# --------------------------------------------------------------------------------------------- kill + resume
def _kill_tree(root: int) -> None:
    """SIGKILL torchrun and every rank it started (the ranks run in their own sessions), no clean-up."""
    parent = {}
    for pid_s in os.listdir("/proc"):
        if pid_s.isdigit():
            try:
                with open(f"/proc/{pid_s}/stat") as f:
                    parent[int(pid_s)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, frontier = [root], [root]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier]
        tree += kids
        frontier = kids
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkill_and_resume_reproduce_metrics(tiny, tmp_path):
    steps = ("train.max_steps=6", "save.every=2", "eval.every=3")
    ref = tmp_path / "ref"
    torchrun(tiny, ref, *steps)
    want = metrics(ref)

    out = tmp_path / "killed"
    # tests/hang_train.py: the run parks after step 3 (checkpoint step_2 complete, step 3 logged)
    hang = (str(Path(__file__).with_name("hang_train.py")), "3")
    p = subprocess.Popen(_cmd(2, _overrides(tiny, out, *steps), entry=hang), env=_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 200
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and any(r.get("step") == 3 for r in metrics(out)):
                break
            assert p.poll() is None, "run exited before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("run never reached step 3")
        time.sleep(0.5)
    finally:
        _kill_tree(p.pid)
        p.wait()
    assert (out / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    assert not (out / "checkpoints" / "step_4").exists()

    torchrun(tiny, out, *steps, "train.resume=true")
    got = metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        for k in a:
            if k in TIMING_KEYS:
                continue
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
            else:
                assert b[k] == a[k], (a["step"], k)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_6"]  # save.keep=2


# --------------------------------------------------------------------------------------------- bad input
def _main_err(capsys, *args):
    from opdx.train.loop import main

    capsys.readouterr()
    rc = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("opdx.train: error: "), err
    return err[0]


def test_bad_inputs(tiny, tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    base = _overrides(tiny, tmp_path / "bad")
    assert "did you mean 'loss.beta'" in _main_err(capsys, "--config", TINY, *base, "loss.betaa=1")
    assert "model.path (student) not found" in _main_err(capsys, "--config", TINY, *base,
                                                          "model.path=/nonexistent/student")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in _main_err(capsys, "--config", TINY, *base, f"data.train={empty}")
    long = write_prompts(str(tmp_path / "long.jsonl"), 4, long_prompt=True)
    assert "longer than data.max_prompt_len=64" in _main_err(capsys, "--config", TINY, *base, f"data.train={long}",
                                                               "data.max_prompt_len=64")
    other = tmp_path / "other"
    t2, _ = make_tiny_pair(str(other), different_tokenizer=True)
    assert "incompatible tokenizers" in _main_err(capsys, "--config", TINY, *base, f"teacher.path={t2}")
    import torch.distributed as dist

    assert not dist.is_initialized()  # every error came before any process group or model weights


def test_bad_input_exit_code_cli(tiny, tmp_path):
    p = subprocess.run([sys.executable, "-m", "opdx.train", "--config", TINY, "loss.kindd=opd"], env=_env(),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == "opdx.train: error: unknown config key 'loss.kindd'; did you mean " \
                                                "'loss.kind'?"


# --------------------------------------------------------------------------------------------- wiring
def _finite_run(out, steps):
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        # the reverse-KL estimates exist on the student's own samples only; other sources log teacher_logratio
        keys = ("loss",) + (("reverse_kl", "reverse_kl_k3") if "student" in r["source"] else ()) + \
            (("teacher_logratio",) if r["source"] != "student" else ())
        for k in keys:
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["step"], k, r[k])
        assert ("reverse_kl" in r) == ("student" in r["source"]), r
    assert any(r["loss"] != 0.0 for r in train)
    ev = [r for r in rows if "eval_reverse_kl" in r]
    assert ev and all(math.isfinite(r["eval_reverse_kl"]) for r in ev)
    return train


def test_fused_linear_gjsd_zero1(tiny, tmp_path):
    """loss.fused_linear=true: student and teacher through opdx.ops.linear_* (with an sft term on teacher data)."""
    out = tmp_path / "fused"
    p = torchrun(tiny, out, "train.max_steps=3", "loss.kind=gjsd", "loss.fused_linear=true", "loss.lmbda=0.5",
                 "loss.seq_kd=true", "loss.sft_alpha=0.1", "deepspeed.zero_stage=1", "eval.every=0",
                 "save.final=false", "log.plot=false")
    assert "fused lm_head + gjsd loss" in p.stdout
    _finite_run(out, 3)


@pytest.mark.parametrize("kind", ["opd", "topk"])
def test_server_teacher_stub(tiny, tmp_path, kind):
    """teacher.server_url: every rank scores through an OpenAI-style /v1/completions stub (prompt_logprobs)."""
    from test_teacher_server import start_stub

    from opdx.models import load_tokenizer

    stub, httpd = start_stub(vocab=len(load_tokenizer(tiny["student"])))
    stub.max_logprobs = 8
    try:
        out = tmp_path / f"server_{kind}"
        torchrun(tiny, out, "train.max_steps=2", f"loss.kind={kind}", "loss.topk=8", f"teacher.server_url={stub.url}",
                 "teacher.path=", "eval.every=0", "save.final=false", "log.plot=false")
        _finite_run(out, 2)
        assert stub.calls > 2 * 4 * 2  # probes + one request per sequence, per rank and step (+ eval)
    finally:
        httpd.shutdown()
        httpd.server_close()
