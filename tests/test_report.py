"""opdx.report on synthetic metrics.jsonl files: curves, report.md, resumed logs, generic keys, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opdx.report import ReportError, load_metrics, main, write_report
from opdx.report.metrics import phase_table
from opdx.report.plots import learning_panels, step_panels

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _write(d: Path, rows: list, config: dict | None = None, summary: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def _train_row(step, new_keys=True, **kw):
    r = {"step": step, "loss": 1.0 / step, "reverse_kl": 2.0 / step, "reverse_kl_k3": 1.5 / step, "lr": 1e-4,
         "tokens": 100, "tokens_per_s": 50.0 + step, "time_rollout_s": 1.0, "time_teacher_s": 0.5,
         "time_train_s": 0.5, "response_len": 12.0, "source": "student" if step % 2 else "teacher"}
    if new_keys:
        r.update(teacher_tokens=100 * step, time_loss_s=0.1, time_backward_s=0.3, time_sync_s=0.1)
    r.update(kw)
    return r


def _eval_row(step, new_keys=True):
    r = {"step": step, "eval_reverse_kl": 1.0 / (step + 1), "eval_k3": 0.8 / (step + 1), "eval_response_len": 10.0}
    if new_keys:
        r.update(eval_top1_agreement=0.5 + step / 100, eval_task_accuracy=0.1 + step / 100)
    return r


def _run_rows(steps, new_keys=True, every=5):
    rows = [_eval_row(0, new_keys)]
    for s in range(1, steps + 1):
        rows.append(_train_row(s, new_keys))
        if s % every == 0:
            rows.append(_eval_row(s, new_keys))
    return rows


CONFIG = {"model": {"source": "path", "path": "/m/student", "dtype": "bfloat16"},
          "teacher": {"path": "/m/teacher"},
          "loss": {"kind": "gjsd", "beta": 0.25, "lmbda": 0.5, "seq_kd": True, "temperature": 1.0, "sft_alpha": 0.0},
          "train": {"max_steps": 10, "micro_batch_size": 4, "grad_accum": 2},
          "optim": {"lr": 1e-4, "warmup_steps": 3, "clip_grad": 1.0},
          "rollout": {"engine": "vllm", "mode": "colocate", "max_new_tokens": 32, "temperature": 1.0},
          "deepspeed": {"zero_stage": 2}}


def _pngs_ok(res):
    for p in res["figures"].values():
        assert Path(p).read_bytes()[:8] == PNG, p


def test_full_run_with_new_keys(tmp_path):
    d = _write(tmp_path / "run", _run_rows(10), CONFIG, {"steps": 10, "wall_s": 123.4, "setup_s": 20.0})
    res = write_report(d)
    out = d / "report"
    assert res["report"] == out / "report.md" and res["plot"] == out / "learning_curve.png"
    _pngs_ok(res)
    for name in ("loss", "reverse_kl", "eval_reverse_kl", "eval_k3", "eval_response_len", "eval_top1_agreement",
                 "eval_task_accuracy", "tokens_per_s", "time_breakdown", "lr", "vs_teacher_tokens"):
        assert res["figures"][name] == out / f"{name}.png", name
    md = res["report"].read_text()
    for s in ("kind=gjsd", "beta=0.25", "lmbda=0.5", "student=`/m/student`", "teacher=`/m/teacher`", "max_steps=10",
              "engine=vllm (colocate)", "zero_stage=2", "123.4 s", "(setup 20 s)", "10 training steps (1–10)",
              "3 eval points", "learning_curve.png", "vs_teacher_tokens.png"):
        assert s in md, s
    st = res["stats"]
    # eval table: first / last / best, best = min for KL-like, max for accuracy/agreement, none for lengths
    assert st["eval_reverse_kl"] == {"first": 1.0, "last": 1.0 / 11, "best": 1.0 / 11}
    assert st["eval_task_accuracy"] == {"first": 0.1, "last": 0.2, "best": 0.2}
    assert st["eval_response_len"]["best"] is None
    assert "| `eval_top1_agreement` | 0.5 (step 0) | 0.6 (step 10) | 0.6 (step 10) | +20.0% |" in md
    assert st["mean_tokens_per_s"] == pytest.approx(55.5)
    assert st["teacher_tokens"] == 1000 and st["wall_s"] == 123.4
    # loss + backward replace time_train_s: 1.0 + 0.5 + 0.1 + 0.3 + 0.1 = 2.0 s per step
    assert st["phase_share_pct"] == pytest.approx({"rollout": 50.0, "teacher": 25.0, "loss": 5.0,
                                                   "backward": 15.0, "weight sync": 5.0})
    assert "| **total** | 2 | 100% |" in md
    assert "sources student 5, teacher 5" in md


def test_old_keys_only_no_config_no_summary(tmp_path):
    d = _write(tmp_path / "run", _run_rows(6, new_keys=False, every=3))
    res = write_report(d)
    _pngs_ok(res)
    assert "vs_teacher_tokens" not in res["figures"]
    # without loss/backward timings the train phase is time_train_s: 1.0 + 0.5 + 0.5
    assert res["stats"]["phase_share_pct"] == pytest.approx({"rollout": 50.0, "teacher": 25.0, "train": 25.0})
    md = res["report"].read_text()
    assert "No `config.json`" in md and "no `summary.json`" in md
    assert "eval_top1_agreement" not in md and "| `eval_k3` |" in md


def test_mixed_timing_rows_do_not_double_count(tmp_path):
    """A run resumed by a newer trainer: old rows have only time_train_s, new rows its split."""
    rows = [_train_row(1, new_keys=False), _train_row(2, new_keys=False), _train_row(3), _train_row(4)]
    res = write_report(_write(tmp_path / "run", rows))
    share = res["stats"]["phase_share_pct"]
    total = 4 * 1.5 + 2 * 0.5 + 2 * 0.5  # rollout + teacher, train (old rows), loss + backward + sync (new rows)
    assert share["train"] == pytest.approx(100 * 1.0 / total)
    assert share["backward"] == pytest.approx(100 * 0.6 / total)
    assert sum(share.values()) == pytest.approx(100.0)


def test_eval_only(tmp_path):
    d = _write(tmp_path / "run", [_eval_row(0), _eval_row(5)])
    res = write_report(d, tmp_path / "elsewhere")
    assert res["report"] == tmp_path / "elsewhere" / "report.md" and not (d / "report").exists()
    _pngs_ok(res)
    assert set(res["figures"]) == {"overview", "eval_reverse_kl", "eval_k3", "eval_response_len",
                                   "eval_top1_agreement", "eval_task_accuracy"}
    md = res["report"].read_text()
    assert "0 training steps" in md and "## Held-out eval" in md and "## Training" not in md


def test_train_only_with_nan_and_generic_keys(tmp_path):
    rows = [_train_row(s, grad_norm=0.5 * s, rollout_logprob_mismatch=0.01) for s in range(1, 5)]
    rows[1]["loss"] = float("nan")
    res = write_report(_write(tmp_path / "run", rows))
    _pngs_ok(res)
    assert "other_metrics" in res["figures"]  # response_len, grad_norm, rollout_logprob_mismatch
    md = res["report"].read_text()
    assert "| `grad_norm` | 0.5 | 2 | 0.5 | 1.25 |" in md
    assert "| `loss` | 1 | 0.25 | 0.25 |" in md  # NaN left out of the statistics
    assert "## Held-out eval" not in md


def test_resumed_log_keeps_last_occurrence(tmp_path):
    rows = [_eval_row(0)] + [_train_row(s) for s in range(1, 5)] + [_eval_row(4)]
    # resumed from the step-2 checkpoint: steps 3, 4 re-logged with other values, then 5, 6
    rows += [_train_row(s, loss=10.0 + s) for s in range(3, 7)] + [{**_eval_row(4), "eval_reverse_kl": 0.01}]
    d = _write(tmp_path / "run", rows)
    m = load_metrics(d / "metrics.jsonl")
    assert [r["step"] for r in m["train"]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in m["train"]] == [1.0, 0.5, 13.0, 14.0, 15.0, 16.0]
    assert [r["step"] for r in m["eval"]] == [0, 4] and m["eval"][1]["eval_reverse_kl"] == 0.01
    assert m["duplicates"] == 3
    res = write_report(d)
    assert res["stats"]["eval_reverse_kl"]["last"] == 0.01
    assert "3 re-logged step(s)" in res["report"].read_text()


def _trainer_rows(steps, every=5):
    """As opdx.train logs them: an eval record at step 0 and every ``every`` steps, each carrying the cumulative
    ``teacher_tokens`` next to its eval metrics; training records with ``time_step_s`` (the whole step: 2.5 s, of
    which the phases take 2.0 s)."""
    rows = [{**_eval_row(0), "teacher_tokens": 0}]
    for s in range(1, steps + 1):
        rows.append(_train_row(s, time_step_s=2.5))
        if s % every == 0:
            rows.append({**_eval_row(s), "teacher_tokens": 100 * s})
    return rows


def _panel(panels, name):
    (panel,) = [p for p in panels if p.name == name]
    return panel


def test_fresh_run_eval_rows_are_not_relogs(tmp_path):
    d = _write(tmp_path / "run", _trainer_rows(10))
    m = load_metrics(d / "metrics.jsonl")
    assert m["duplicates"] == 0
    assert [r["step"] for r in m["train"]] == list(range(1, 11))
    assert [r["loss"] for r in m["train"]] == [1.0 / s for s in range(1, 11)]  # steps 5 and 10 keep their loss
    assert [(r["step"], r["teacher_tokens"]) for r in m["eval"]] == [(0, 0), (5, 500), (10, 1000)]
    # the plotted data: every training step on the train curves, the eval points on their own
    loss = _panel(learning_panels(m), "loss").lines[0]
    assert loss.xs == list(range(1, 11)) and loss.ys == [1.0 / s for s in range(1, 11)]
    train_k1, _, held_out = _panel(learning_panels(m), "reverse_kl").lines
    assert train_k1.xs == list(range(1, 11)) and held_out.xs == [0, 5, 10]
    assert _panel(learning_panels(m), "eval_k3").lines[0].xs == [0, 5, 10]
    assert "teacher_tokens" not in [p.name for p in learning_panels(m)]  # a position, not an eval metric
    by_tokens = learning_panels(m, "teacher_tokens")
    assert _panel(by_tokens, "eval_reverse_kl").lines[0].xs == [0, 500, 1000]
    assert _panel(by_tokens, "loss").lines[0].xs == [100 * s for s in range(1, 11)]
    res = write_report(d)
    md = res["report"].read_text()
    assert "re-logged" not in md and res["stats"]["duplicate_steps"] == 0
    assert "10 training steps (1–10), 3 eval points" in md
    assert "| `teacher_tokens` |" not in md


def test_step_time_is_not_a_phase(tmp_path):
    """time_step_s is the whole step: the phases' shares are of it (what they leave is "other"), never doubled."""
    d = _write(tmp_path / "run", _trainer_rows(4, every=2))
    bars = _panel(step_panels(load_metrics(d / "metrics.jsonl")), "time_breakdown").bars
    assert list(bars) == ["rollout", "teacher", "loss", "backward", "weight sync", "other"]
    assert bars["other"] == pytest.approx([0.5] * 4)
    assert [sum(v[i] for v in bars.values()) for i in range(4)] == pytest.approx([2.5] * 4)
    res = write_report(d)
    share = res["stats"]["phase_share_pct"]
    assert share == pytest.approx({"rollout": 40.0, "teacher": 20.0, "loss": 4.0, "backward": 12.0,
                                   "weight sync": 4.0, "other": 20.0})
    md = res["report"].read_text()
    assert "| **total** | 2.5 | 100% |" in md and "| step |" not in md


def test_backward_clip_optimizer_phases_stack_to_the_step(tmp_path):
    """Rows of the split trainer (backward / grad clip / optimizer) after rows that logged backward + step as one
    time_backward_s: each row's phases plus "other" are its time_step_s, time_train_s is never added on top."""
    old = [_train_row(s, time_step_s=2.5) for s in (1, 2)]
    new = [_train_row(s, time_backward_s=0.2, time_clip_s=0.04, time_optimizer_s=0.06, time_step_s=2.5)
           for s in (3, 4)]
    d = _write(tmp_path / "run", old + new)
    table = phase_table(load_metrics(d / "metrics.jsonl")["train"])
    assert list(table) == ["rollout", "teacher", "loss", "backward", "grad clip", "optimizer", "weight sync", "other"]
    assert table["backward"] == pytest.approx([0.3, 0.3, 0.2, 0.2])
    assert table["grad clip"] == pytest.approx([0.0, 0.0, 0.04, 0.04])
    assert table["optimizer"] == pytest.approx([0.0, 0.0, 0.06, 0.06])
    assert [sum(v[i] for v in table.values()) for i in range(4)] == pytest.approx([2.5] * 4)
    assert table["other"] == pytest.approx([0.5] * 4)
    share = write_report(d)["stats"]["phase_share_pct"]
    assert share["optimizer"] == pytest.approx(100 * 0.12 / 10.0) and sum(share.values()) == pytest.approx(100.0)


def test_unreadable_config_is_a_warning(tmp_path):
    d = _write(tmp_path / "run", _run_rows(2))
    (d / "config.json").write_text("{not json")
    res = write_report(d)
    assert len(res["warnings"]) == 1 and "config.json" in res["warnings"][0]
    assert "note:" in res["report"].read_text()


@pytest.mark.parametrize("case,expect", [
    ("nodir", "no such directory"),
    ("nofile", "metrics.jsonl: no such file"),
    ("empty", "metrics.jsonl: empty"),
    ("badjson", "metrics.jsonl:3: malformed JSON"),
    ("notobject", "metrics.jsonl:2: expected a JSON object"),
    ("nostep", "metrics.jsonl:2: record has no integer 'step'"),
])
def test_bad_input_one_line_error_exit_2(tmp_path, capsys, case, expect):
    d = tmp_path / "run"
    if case == "nofile":
        d.mkdir()
    elif case == "empty":
        _write(d, ["", "  "])
    elif case == "badjson":
        _write(d, [_train_row(1), "", '{"step": 2, "loss": 0.5'])
    elif case == "notobject":
        _write(d, [_train_row(1), "[1, 2]"])
    elif case == "nostep":
        _write(d, [_train_row(1), {"loss": 0.5}])
    with pytest.raises(ReportError, match=expect.replace("(", r"\(")):
        write_report(d)
    assert main([str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opdx.report: error: ") and expect in err and err.count("\n") == 1
    assert not (d / "report").exists()


def test_unwritable_out_is_one_line(tmp_path, capsys):
    d = _write(tmp_path / "run", _run_rows(2))
    (tmp_path / "afile").write_text("x")
    assert main([str(d), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opdx.report: error: cannot write the report") and err.count("\n") == 1


def test_cli_prints_paths(tmp_path):
    d = _write(tmp_path / "run", _run_rows(3, every=3), CONFIG)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "opdx.report", str(d), "--out", str(tmp_path / "rep")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    printed = p.stdout.split()
    assert printed[0] == str(tmp_path / "rep" / "report.md")
    assert str(tmp_path / "rep" / "learning_curve.png") in printed
    assert all(Path(x).is_file() for x in printed)


# ------------------------------------------------------------------------------- benchmarks/report.py tables
def _bench_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_report_roofline_and_rows_without_bytes(tmp_path):
    kernel = {"device": "gpu-x", "op": "token_logprobs", "torch": "2.13", "rows": [
        {"case": {"n": 8, "v": 16}, "impl": "opdx", "time_ms": 1.0, "gb_per_s": 900.0, "pct_copy_bw": 75.0,
         "peak_mem_mb": 1.0, "logits_mb": 2.0, "timestamp": "t"},
        {"case": {"n": 8, "v": 16}, "impl": "torch_eager", "time_ms": 3.0, "gb_per_s": 300.0, "pct_copy_bw": 25.0,
         "peak_mem_mb": 5.0, "logits_mb": 2.0, "timestamp": "t"}]}
    step = {"device": "gpu-x", "op": "train_step", "note": "One optimizer step of the demo.", "rows": [
        {"case": {"loss": "opd"}, "impl": "opdx", "tokens_per_s": 1234.5, "time_rollout_s": 0.5,
         "phases": {"teacher_s": 0.25}, "timestamp": "t"}]}
    for name, data in (("a.json", kernel), ("b.json", step)):
        (tmp_path / name).write_text(json.dumps(data))
    md = _bench_report().render(str(tmp_path))
    assert "**% of roofline (copy BW)**" in md and "% copy BW |" not in md
    kern, train = md.split("## token_logprobs")[1].split("## train_step")
    assert "| device | n | v | impl | time (ms) | GB/s | % of roofline (copy BW) | peak mem (MB) | logits_mb | " \
           "speedup vs eager |" in kern
    assert "| gpu-x | 8 | 16 | opdx | 1.00 | 900.00 | 75.0 | 1.0 | 2.00 | 3.00x |" in kern
    # no bytes, no time: the row's own numbers instead of an empty table
    assert "One optimizer step of the demo." in train
    assert "| device | loss | impl | tokens_per_s | time_rollout_s | phases.teacher_s |" in train
    assert "| gpu-x | opd | opdx | 1234.50 | 0.50 | 0.25 |" in train


@pytest.mark.parametrize("values, anywhere, at_end", [
    ([3.0, 2.0, 1.5, 1.4], False, False),
    ([3.0, 2.0, 2.5, 2.4, 2.6], False, False),  # rises, but never twice in a row
    ([3.0, 2.0, 2.5, 2.7], True, True),
    ([3.0, 2.0, 2.5, 2.7, 1.0], True, False),  # it rose twice, then recovered
    ([2.0, 2.5], False, False),
    ([3.0, float("nan"), 3.5, 4.0], False, False),
])
def test_kl_rise_warning(values, anywhere, at_end):
    from opdx.report.metrics import kl_rise_warning

    assert (kl_rise_warning(values) is not None) == anywhere
    assert (kl_rise_warning(values, at_end=True) is not None) == at_end
    if anywhere:
        msg = kl_rise_warning(values)
        assert "rose at 2 evals in a row" in msg and "optim.lr" in msg and "loss.is_clip" in msg


def _completion(step: int) -> dict:
    """A logged completion whose student says "student says <step>."; the tokens " says" and "." disagree most."""
    tokens = ["student", " says", f" {step}", ".", "\n|*"]
    s_logp = [-0.1, -0.2, -0.3, -0.4, -0.5]
    t_logp = [-0.2, -6.0, -0.3, -3.4, -1.5]
    return {"prompt": f"p{step}", "student": "".join(tokens), "teacher": "t says", "tokens": tokens,
            "token_ids": list(range(5)), "student_logprobs": s_logp, "teacher_logprobs": t_logp,
            "logprob_diff": [round(a - b, 4) for a, b in zip(s_logp, t_logp)]}


def test_report_warns_on_rising_eval_kl_and_shows_completions(tmp_path):
    rows = [_train_row(s) for s in range(1, 7)]
    evals = [{"step": s, "eval_reverse_kl": v} for s, v in ((0, 3.0), (2, 1.0), (4, 1.5), (6, 2.0))]
    d = _write(tmp_path / "run", sorted(rows + evals, key=lambda r: r["step"]))
    events = [{"step": s, "completions": [_completion(s)]} for s in (0, 2, 4, 6)]
    (d / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in events))
    res = write_report(d)
    text = res["report"].read_text()
    assert any("rose at 2 evals in a row" in w for w in res["warnings"])
    assert "rose at 2 evals in a row (1 -> 1.5 -> 2)" in text
    assert "## Completions" in text
    assert "### Step 0" in text and "### Step 6" in text and "### Step 2" not in text
    # the 3 largest |student - teacher| tokens in bold (spaces outside the **, adjacent ones in one run), the rest
    # plain, markdown escaped
    assert "| student (sample) | student **says** 6**.⏎\\|\\*** |" in text
    assert "| teacher (greedy) | t says |" in text
    assert "“ says” -0.20 vs -6.00 (+5.80); “.” -0.40 vs -3.40 (+3.00)" in text
    assert " 4**" not in text and "student **says** 4" not in text


def test_completions_markdown_without_teacher_logprobs():
    from opdx.report.completions import completion_markdown, disagreements

    c = {**_completion(3), "teacher": None, "teacher_logprobs": None, "logprob_diff": None}
    assert disagreements(c) == []
    md = "\n".join(completion_markdown(c))
    assert "**" not in md.split("| student (sample) |")[1].split("\n")[0]
    assert "(not generated)" in md and "Largest disagreements" not in md
    assert disagreements(_completion(3), top=1) == [1]


def test_report_without_completions_or_rise(tmp_path):
    d = _write(tmp_path / "run", _run_rows(10))
    res = write_report(d)
    assert "## Completions" not in res["report"].read_text()
    assert not any("rose at" in w for w in res["warnings"])
