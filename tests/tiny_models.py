"""Test helpers: tiny random model pairs (opdx.models.make_tiny_models) and small prompt files."""

from __future__ import annotations

import json


def make_tiny_pair(out_dir: str, *, seed: int = 0, different_tokenizer: bool = False):
    """(teacher_dir, student_dir): tiny random Llama pair, pad == eos, model vocab padded beyond the tokenizer
    (so the trainer's vocab alignment is exercised). ``different_tokenizer`` gives a pair whose tokenizer differs
    from the default one (for the incompatible-tokenizer error)."""
    from opdx.models import make_tiny_models

    if different_tokenizer:
        return make_tiny_models(out_dir, seed=seed, vocab_size=400)
    return make_tiny_models(out_dir, seed=seed, vocab_size=512, model_vocab_size=576)


def load_tiny_pair(out_dir: str) -> dict:
    """`make_tiny_pair` loaded: {"tok", "student", "teacher" (fp32 transformers models), "s_dir", "t_dir"}."""
    import torch
    from transformers import AutoModelForCausalLM

    from opdx.models import load_tokenizer

    t_dir, s_dir = make_tiny_pair(out_dir)
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32)
    return {"tok": load_tokenizer(s_dir), "student": student, "teacher": teacher, "s_dir": s_dir, "t_dir": t_dir}


def write_prompts(path: str, n: int = 24, *, long_prompt: bool = False):
    words = ["apple", "river", "seven", "blue", "quick", "paris", "number", "sleep", "write", "color"]
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(words[(i * 3 + j) % len(words)] for j in range(3 + i % 4)) + "?"
            if long_prompt and i == n - 1:
                prompt = " ".join(words * 40)
            f.write(json.dumps({"prompt": prompt, "response": f"the answer is {i % 7}", "answer": str(i % 7),
                                "category": "test"}) + "\n")
    return path
