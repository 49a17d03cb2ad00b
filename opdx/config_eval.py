"""The ``eval`` section of the trainer configuration (`opdx.config`), with its nested ``eval.lm_eval``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness on the live student (`opdx.train.harness`; the `[eval]` extra): at an eval, rank 0 wraps
    the student in lm-eval's `HFLM` and runs `lm_eval.simple_evaluate`, logged as `lm_eval/<task>/<metric>`."""

    tasks: list = field(default_factory=list)  # lm-eval task names, e.g. [hellaswag, arc_easy] ([] = off)
    every: int = 0  # run at the evals whose step is a multiple of this (0 = at every eval)
    limit: int = 0  # examples per task (lm-eval's limit; 0 = all of them)
    batch_size: int = 8  # lm-eval's batch size
    include_path: str = ""  # a directory of extra task YAML files (lm-eval's TaskManager include_path)


@dataclass
class EvalConfig:
    every: int = 15  # 0 = only at step 0 and at the end
    num_prompts: int = 16  # held-out prompts evaluated (from data.eval)
    batch_size: int = 16  # per rank
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    temperature: float = 1.0  # sampling temperature of the student's eval samples
    seed: int = 1234  # sampling seed of the eval (the same samples at every eval)
    task: bool = True  # greedy task accuracy on the eval records that have an "answer" (opdx.data_eval)
    # scorers of those greedy completions, logged as eval_<name> (opdx.eval_metrics): exact_match (logged as
    # eval_task_accuracy) | regex:<pattern with a capture group> | python:module:function; [name=]spec names one
    metrics: list = field(default_factory=lambda: ["exact_match"])
    at_start: bool = True  # evaluate the initial student at step 0
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)  # eval.lm_eval.tasks / .every / .limit
