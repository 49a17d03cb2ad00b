"""Evaluation metric specs (``eval.metrics``): each spec becomes a named scorer of one greedy completion.

    exact_match              opdx.data_eval.score_answer(completion, record["answer"])
    regex:<pattern>          the first capture group of the first match of <pattern> in the completion, compared
                             with record["answer"] by score_answer (no match scores 0)
    python:module:function   a user callable ``function(prompt, completion, record) -> float``

A scorer is called as ``metric(prompt, completion, record)`` and returns a float; records whose ``answer`` is
missing, null or empty score NaN for exact_match / regex (not checkable) and are left out by `score_sums` and
`mean_scores`. The trainer logs a metric as ``eval_<metric.key>`` (and the teacher's as ``eval_teacher_<key>``): the
key is its name, ``regex_<k>`` (k = position of the spec in the list) unless the spec names itself
``name=regex:...``, ``<function>`` for python specs (``name=python:...`` overrides), except that the metric named
``exact_match`` keeps its historic key ``task_accuracy``. Names must be unique within a list.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opdx.errors import ConfigError
from opdx.data_eval import score_answer

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
KINDS = ("exact_match", "regex:<pattern>", "python:module:function")


@dataclass(frozen=True)
class Metric:
    name: str
    spec: str
    score_fn: Callable[[str, str, dict], float]
    needs_answer: bool = True  # scores only records with an "answer" (exact_match, regex); python: every record

    @property
    def key(self) -> str:
        """The metric's log key after ``eval_`` (``eval_teacher_``)."""
        return _HISTORIC_KEYS.get(self.name, self.name)

    def __call__(self, prompt: str, completion: str, record: dict) -> float:
        try:
            return float(self.score_fn(prompt, completion, record))
        except Exception as exc:  # a user callable's bug: name the spec and the record it failed on
            raise ValueError(f"eval.metrics: {self.spec!r} failed on the record {record!r:.200}: "
                             f"{type(exc).__name__}: {exc}") from exc


_HISTORIC_KEYS = {"exact_match": "task_accuracy"}  # eval_task_accuracy predates eval.metrics


def _answer(record: dict):
    answer = record.get("answer") if isinstance(record, dict) else None
    return None if answer == "" else answer


def _exact_match(prompt: str, completion: str, record: dict) -> float:
    answer = _answer(record)
    return math.nan if answer is None else float(score_answer(completion, str(answer)))


def _regex_metric(pattern: str, spec: str) -> Callable[[str, str, dict], float]:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"eval.metrics: {spec!r}: the pattern does not compile ({exc})") from None
    if rx.groups < 1:
        raise ConfigError(f"eval.metrics: {spec!r} has no capture group; wrap the answer part in parentheses, "
                          r"e.g. 'regex:answer is (\d+)'")

    def score(prompt: str, completion: str, record: dict) -> float:
        answer = _answer(record)
        if answer is None:
            return math.nan
        m = rx.search(str(completion))
        if m is None or m.group(1) is None:
            return 0.0
        return float(score_answer(m.group(1), str(answer)))

    return score


def _python_metric(target: str, spec: str) -> tuple[str, Callable]:
    module_name, sep, func_name = target.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"eval.metrics: {spec!r} must be 'python:module:function' (e.g. "
                          "'python:my_pkg.metrics:passes_tests')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"eval.metrics: {spec!r}: cannot import module {module_name!r} ({exc}); put it on "
                          "PYTHONPATH or install it") from None
    fn = getattr(module, func_name, None)
    if fn is None:
        raise ConfigError(f"eval.metrics: {spec!r}: module {module_name!r} has no attribute {func_name!r}")
    if not callable(fn):
        raise ConfigError(f"eval.metrics: {spec!r}: {module_name}.{func_name} is not callable")
    return func_name, fn


def parse_metric_spec(spec: str, position: int = 0) -> Metric:
    """One spec -> a `Metric` (see the module docstring); ``position`` names unnamed regex specs."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"eval.metrics[{position}]: a metric spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    name = None
    head = text.split(":", 1)[0]
    if "=" in head:  # name=kind:...
        name, text = (part.strip() for part in text.split("=", 1))
        if not _NAME_RE.match(name):
            raise ConfigError(f"eval.metrics: {spec!r}: the name {name!r} must be an identifier ([A-Za-z0-9_])")
    kind, _, rest = text.partition(":")
    if kind == "exact_match" and not rest:
        return Metric(name or "exact_match", spec, _exact_match)
    if kind == "regex" and rest:
        return Metric(name or f"regex_{position}", spec, _regex_metric(rest, spec))
    if kind == "python":
        func_name, fn = _python_metric(rest, spec)
        return Metric(name or func_name, spec, fn, needs_answer=False)
    raise ConfigError(f"eval.metrics: unknown metric spec {spec!r}; use one of {', '.join(KINDS)} "
                      "(optionally prefixed by name=)")


def parse_metric_specs(specs: Sequence[str]) -> list[Metric]:
    """``eval.metrics`` -> scorers, in order, with unique names."""
    if isinstance(specs, str):
        raise ConfigError(f"eval.metrics must be a list of specs, got the string {specs!r}; write [{specs!r}]")
    metrics = [parse_metric_spec(s, k) for k, s in enumerate(specs)]
    names = [m.name for m in metrics]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"eval.metrics: duplicate metric name(s) {dup}; name the specs apart with name=<spec>")
    return metrics


def score_sums(metrics: Sequence[Metric], prompts: Sequence[str], completions: Sequence[str],
               records: Sequence[dict]) -> list[float]:
    """[score sum, scored count] per metric, in order, over the records where it is defined (NaN scores left out):
    the sums the trainer adds up over ranks before dividing."""
    if not len(prompts) == len(completions) == len(records):
        raise ValueError(f"need one completion and one record per prompt, got {len(prompts)} prompts, "
                         f"{len(completions)} completions, {len(records)} records")
    out = []
    for m in metrics:
        vals = [v for v in (m(p, c, r) for p, c, r in zip(prompts, completions, records)) if not math.isnan(v)]
        out += [float(sum(vals)), float(len(vals))]
    return out


def mean_scores(metrics: Sequence[Metric], prompts: Sequence[str], completions: Sequence[str],
                records: Sequence[dict]) -> dict[str, float]:
    """{"eval_<key>": mean score over the records where the metric is defined}, NaN where none is."""
    sums = score_sums(metrics, prompts, completions, records)
    return {f"eval_{m.key}": sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else math.nan
            for i, m in enumerate(metrics)}


__all__ = ["Metric", "parse_metric_spec", "parse_metric_specs", "mean_scores", "score_sums"]
