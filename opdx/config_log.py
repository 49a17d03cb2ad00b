"""The ``log`` section of the trainer configuration (`opdx.config`), with its nested ``log.completions``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionsConfig:
    """Per-token completion logs (output_dir/completions.jsonl and TensorBoard text): at an eval, the student's
    samples of the first held-out prompts with their student and teacher token logprobs, next to the teacher's
    greedy answer."""

    every: int = 0  # log them at the evals whose step is a multiple of this (0 = at every eval)
    num: int = 3  # held-out prompts logged (rank 0's first ones; 0 = off)


@dataclass
class LogConfig:
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True  # TensorBoard events under output_dir/tb
    plot: bool = True  # end of run: opdx.report curves + report.md under output_dir/report/
    per_rank_sources: bool = False  # each rank writes its per-step source draw to sources_rank{r}.jsonl
    completions: CompletionsConfig = field(default_factory=CompletionsConfig)  # log.completions.every / .num
