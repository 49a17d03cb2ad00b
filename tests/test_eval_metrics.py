"""opdx.eval_metrics: metric specs score known completions; bad specs give clear errors."""

import math
import sys
import textwrap

import pytest

from opdx.config import ConfigError
from opdx.eval_metrics import mean_scores, parse_metric_spec, parse_metric_specs


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "opdx_test_user_metrics.py").write_text(textwrap.dedent("""
        def length_ratio(prompt, completion, record):
            return len(completion) / len(prompt)

        NOT_CALLABLE = 3

        def needs_tests(prompt, completion, record):
            return record["tests"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "opdx_test_user_metrics"
    sys.modules.pop("opdx_test_user_metrics", None)


def test_exact_match_scores_answers():
    m = parse_metric_spec("exact_match")
    assert m.name == "exact_match"
    assert m("q", "The capital of France is Paris.", {"answer": "Paris"}) == 1.0
    assert m("q", "Lyon", {"answer": "Paris"}) == 0.0
    assert m("q", "42.0", {"answer": "42"}) == 1.0
    assert math.isnan(m("q", "anything", {"answer": None}))


def test_regex_extracts_first_group_then_compares():
    m = parse_metric_spec(r"regex:####\s*(-?\d+)", 3)
    assert m.name == "regex_3"
    assert m("q", "work: 6*7 ... #### 42", {"answer": "42"}) == 1.0
    assert m("q", "#### 41", {"answer": "42"}) == 0.0
    # the whole completion would match by exact_match, but the pattern does not occur: 0
    assert m("q", "42", {"answer": "42"}) == 0.0
    assert parse_metric_spec("exact_match")("q", "42", {"answer": "42"}) == 1.0
    # first match wins
    assert m("q", "#### 1 then #### 42", {"answer": "42"}) == 0.0
    named = parse_metric_spec(r"gsm=regex:answer: (\w+)")
    assert named.name == "gsm" and named("q", "answer: Paris", {"answer": "paris"}) == 1.0


def test_python_callable(user_module):
    m = parse_metric_spec(f"python:{user_module}:length_ratio")
    assert m.name == "length_ratio"
    assert m("abcd", "ab", {}) == pytest.approx(0.5)
    assert parse_metric_spec(f"ratio=python:{user_module}:length_ratio").name == "ratio"


def test_mean_scores_skips_uncheckable(user_module):
    metrics = parse_metric_specs(["exact_match", r"regex:= (\d+)", f"python:{user_module}:length_ratio"])
    prompts = ["1+1", "2+2", "say hi"]
    completions = ["2", "x = 5", "hi"]
    records = [{"answer": "2"}, {"answer": "4"}, {"answer": None}]
    scores = mean_scores(metrics, prompts, completions, records)
    assert scores["eval_task_accuracy"] == pytest.approx(0.5)  # 1 of the 2 checkable (exact_match's historic key)
    assert scores["eval_regex_1"] == pytest.approx(0.0)  # "2" has no "= n"; "= 5" != 4
    assert scores["eval_length_ratio"] == pytest.approx((1 / 3 + 5 / 3 + 2 / 6) / 3)
    with pytest.raises(ValueError, match="one completion and one record per prompt"):
        mean_scores(metrics, prompts, completions[:2], records)


@pytest.mark.parametrize("spec, match", [
    ("bleu", "unknown metric spec 'bleu'"),
    ("exact_match:x", "unknown metric spec"),
    ("regex:", "unknown metric spec"),
    (r"regex:\d+", "no capture group"),
    ("regex:(unclosed", "does not compile"),
    ("python:no_such_module_opdx_xyz:f", "cannot import module 'no_such_module_opdx_xyz'"),
    ("python:justone", "must be 'python:module:function'"),
    ("python:math:no_such_function", "has no attribute 'no_such_function'"),
    ("bad name=exact_match", "must be an identifier"),
    ("", "non-empty string"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_metric_spec(spec)


def test_bad_spec_lists(user_module):
    with pytest.raises(ConfigError, match="is not callable"):
        parse_metric_spec(f"python:{user_module}:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="duplicate metric name"):
        parse_metric_specs(["exact_match", "exact_match"])
    with pytest.raises(ConfigError, match="must be a list"):
        parse_metric_specs("exact_match")


def test_score_sums_keys_and_records_scored(user_module):
    """The sums the trainer all-reduces: [sum, count] per metric; exact_match keeps the eval_task_accuracy key; an
    empty answer is not checkable; a python metric scores every record (needs_answer False)."""
    from opdx.eval_metrics import score_sums

    metrics = parse_metric_specs(["exact_match", f"r=python:{user_module}:length_ratio"])
    assert [m.key for m in metrics] == ["task_accuracy", "r"] and [m.needs_answer for m in metrics] == [True, False]
    assert parse_metric_spec("em=exact_match").key == "em"
    sums = score_sums(metrics, ["ab", "abcd", "xy"], ["7", "no", "xy"], [{"answer": "7"}, {"answer": ""}, {}])
    assert sums == pytest.approx([1.0, 1.0, 0.5 + 0.5 + 1.0, 3.0])


def test_failing_callable_names_the_spec_and_record(user_module):
    m = parse_metric_spec(f"python:{user_module}:needs_tests")
    assert m("q", "c", {"tests": 0.25}) == 0.25
    with pytest.raises(ValueError, match=r"eval.metrics: 'python:.*:needs_tests' failed on the record \{'answer': '7'\}: "
                                         r"KeyError: 'tests'"):
        m("q", "c", {"answer": "7"})
    with pytest.raises(ValueError, match="failed on the record.*could not convert"):
        m("q", "c", {"tests": "not a number"})
