"""eval.lm_eval (opdx.train.harness): the missing-package error before any process group, the wiring into lm-eval
(with a stand-in module: student in eval mode, tasks / limit / include_path passed through, results flattened), and
when lm-eval is installed a real run of a tiny local task (no downloads) checked against the same log-likelihoods
computed by hand."""

import json
import sys
import types

import pytest
import torch

from opdx.config import load_config
from opdx.errors import ConfigError
from opdx.train.harness import flatten_results, lm_eval_due, run_lm_eval
from tests.tiny_models import make_tiny_pair


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from opdx.models import load_causal_lm, load_tokenizer

    _, s_dir = make_tiny_pair(str(tmp_path_factory.mktemp("lmeval") / "models"))
    return load_causal_lm(s_dir, dtype="float32", device="cpu"), load_tokenizer(s_dir)


def _cfg(*extra):
    return load_config(None, ["model.source=tiny", *extra])


def test_missing_package_is_a_config_error(monkeypatch, capsys):
    from opdx.train.loop import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["model.source=tiny", "eval.lm_eval.tasks=[hellaswag]"]) == 2
    err = capsys.readouterr().err
    assert "eval.lm_eval.tasks=['hellaswag'] needs lm-evaluation-harness" in err and 'pip install -e ".[eval]"' in err
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_config_rules_and_schedule():
    assert not lm_eval_due(_cfg(), 10)
    assert lm_eval_due(_cfg("eval.lm_eval.tasks=[a]"), 7)
    every = _cfg("eval.lm_eval.tasks=[a, b]", "eval.lm_eval.every=5")
    assert [s for s in range(12) if lm_eval_due(every, s)] == [0, 5, 10]
    with pytest.raises(ConfigError, match="eval.lm_eval.every and .limit must be >= 0"):
        _cfg("eval.lm_eval.tasks=[a]", "eval.lm_eval.limit=-1")
    with pytest.raises(ConfigError, match="not supported"):
        _cfg("eval.lm_eval.tasks=[a]", "model.lora=true", "deepspeed.zero_stage=3")


def test_flatten_results():
    results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.1,
                                        "acc_norm,none": 0.5},
                           "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": "N/A"}}}
    assert flatten_results(results) == {"lm_eval/arc_easy/acc": 0.25, "lm_eval/arc_easy/acc_stderr": 0.1,
                                        "lm_eval/arc_easy/acc_norm": 0.5,
                                        "lm_eval/gsm8k/exact_match_strict-match": 0.125}


def test_wiring_with_a_stand_in_module(student, monkeypatch):
    model, tok = student
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["hflm"] = (pretrained, tokenizer, batch_size, pretrained.training)

    def simple_evaluate(**kw):
        calls["evaluate"] = kw
        return {"results": {t: {"acc,none": 0.5 + i / 4} for i, t in enumerate(kw["tasks"])}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = lambda include_path=None: ("task manager", include_path)
    for name, mod in (("lm_eval", fake), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf),
                      ("lm_eval.tasks", tasks)):
        monkeypatch.setitem(sys.modules, name, mod)
    cfg = _cfg("eval.lm_eval.tasks=[t1, t2]", "eval.lm_eval.limit=3", "eval.lm_eval.batch_size=2",
               "eval.lm_eval.include_path=/my/tasks")
    model.train()
    out = run_lm_eval(cfg, types.SimpleNamespace(module=model), tok)
    assert out == {"lm_eval/t1/acc": 0.5, "lm_eval/t2/acc": 0.75}
    assert calls["hflm"] == (model, tok, 2, False)  # the live student itself, in eval mode
    kw = calls["evaluate"]
    assert kw["tasks"] == ["t1", "t2"] and kw["limit"] == 3 and kw["task_manager"] == ("task manager", "/my/tasks")
    assert model.training  # train mode restored
    assert run_lm_eval(_cfg("eval.lm_eval.tasks=[t1]"), types.SimpleNamespace(module=model), tok) == {
        "lm_eval/t1/acc": 0.5} and calls["evaluate"]["limit"] is None  # limit 0 = every example


def _by_hand(model, tok, docs) -> float:
    """Multiple-choice accuracy from the summed log-likelihood of each choice after "question " (lm-eval's rule)."""
    right = 0
    for d in docs:
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in d["choices"]:
            whole = tok(d["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            cont = range(len(ctx), len(whole))
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in cont))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return right / len(docs)


def _write_task(tmp_path, n: int = 6) -> list[dict]:
    """A multiple-choice task from a local JSONL file (no downloads) in tmp_path/tasks; returns its documents."""
    words = ["blue", "seven quick", "paris", "sleep", "number write", "color", "apple", "river"]
    docs = [{"question": f"apple river {i}?", "choices": [words[(i + 3 * j) % 8] for j in range(3)], "label": i % 3}
            for i in range(n)]  # the tiny model's picks vary
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: opdx_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    return docs


def test_real_lm_eval_tiny_local_task(student, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (the [eval] extra)")
    model, tok = student
    docs = _write_task(tmp_path)
    cfg = _cfg("eval.lm_eval.tasks=[opdx_tiny_mc]", "eval.lm_eval.limit=5",
               f"eval.lm_eval.include_path={tmp_path / 'tasks'}")
    out = run_lm_eval(cfg, types.SimpleNamespace(module=model), tok)
    assert set(out) >= {"lm_eval/opdx_tiny_mc/acc"}
    assert out["lm_eval/opdx_tiny_mc/acc"] == pytest.approx(_by_hand(model, tok, docs[:5]))


def test_trainer_runs_lm_eval_zero3(tmp_path):
    """A 2-process ZeRO-3 run: the eval at the last step logs the harness's accuracy of the consolidated student,
    equal to the same accuracy of the saved final model computed by hand."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (the [eval] extra)")
    import os
    import subprocess
    from pathlib import Path

    from opdx.models import load_causal_lm, load_tokenizer
    from tests.test_train import ROOT, TINY, _cmd, _env, metrics
    from tests.tiny_models import write_prompts

    teacher, s_dir = make_tiny_pair(str(tmp_path / "models"))
    docs = _write_task(tmp_path)
    out = tmp_path / "run"
    args = ["model.source=path", f"model.path={s_dir}", f"teacher.path={teacher}",
            f"data.train={write_prompts(str(tmp_path / 'p.jsonl'), 8)}", f"train.output_dir={out}",
            "train.max_steps=1", "deepspeed.zero_stage=3", "eval.at_start=false", "log.plot=false",
            "eval.lm_eval.tasks=[opdx_tiny_mc]", f"eval.lm_eval.include_path={tmp_path / 'tasks'}"]
    env = _env()
    env["PYTHONPATH"] += os.pathsep + str(Path(lm_eval.__file__).resolve().parent.parent)
    p = subprocess.run(_cmd(2, args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    ev = [r for r in metrics(out) if "lm_eval/opdx_tiny_mc/acc" in r]
    assert [r["step"] for r in ev] == [1]
    final = load_causal_lm(str(out / "final"), dtype="float32", device="cpu")
    assert ev[0]["lm_eval/opdx_tiny_mc/acc"] == pytest.approx(_by_hand(final, load_tokenizer(s_dir), docs))
