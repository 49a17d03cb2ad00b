"""HFRollout's sampling logprobs are the trainer's: temperature-1 logprobs over all lm_head rows of the sampled
tokens, whatever the sampling temperature / top-p / suppressed padded-vocabulary rows / min_new_tokens."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_tiny_pair  # noqa: E402

from opdx.data import build_batch  # noqa: E402
from opdx.rollout.hf import HFRollout  # noqa: E402

TOKENIZER_VOCAB = 512  # make_tiny_pair pads the model vocabulary to 576 rows


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from opdx.models import load_tokenizer

    t_dir, s_dir = make_tiny_pair(str(tmp_path_factory.mktemp("rollout_hf") / "models"))
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return {"tok": load_tokenizer(s_dir), "student": load(s_dir), "teacher": load(t_dir)}


def _teacher_forced_logprobs(model, prompts, completions, pad_id):
    """[B, T] temperature-1 logprobs over all lm_head rows of each completion token, from one full forward."""
    batch = build_batch(prompts, completions, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.targets.clamp_min(0)[..., None]).squeeze(-1)
    width = max(len(c) for c in completions)
    out = torch.zeros(len(prompts), width)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out[i, :len(c)] = logp[i, len(p) - 1:len(p) - 1 + len(c)]
    return out


@pytest.mark.parametrize("which", ["student", "teacher"])  # near-uniform and peaked next-token distributions
@pytest.mark.parametrize("temperature,top_p,min_new_tokens", [(1.0, 1.0, 0), (0.7, 1.0, 0), (0.7, 0.9, 4),
                                                              (0.0, 1.0, 0)])
def test_sampling_logprobs_equal_a_teacher_forced_forward(pair, which, temperature, top_p, min_new_tokens):
    tok, model = pair["tok"], pair[which]
    pad = tok.eos_token_id
    prompts = [tok("hello world " * (i + 1))["input_ids"] for i in range(4)]
    stops = [pad] + list(range(1, TOKENIZER_VOCAB, 3))  # many stop ids: rows end at different lengths
    rollout = HFRollout(model, eos_ids=stops, pad_id=pad, max_new_tokens=10, temperature=temperature, top_p=top_p,
                        vocab_size=TOKENIZER_VOCAB, min_new_tokens=min_new_tokens)
    rb = rollout.generate(prompts, seed=int(torch.randint(0, 2**31, ())))
    completions = rb.completions()
    assert rb.sampling_logprobs.shape == rb.completion_mask.shape
    assert (rb.sampling_logprobs[~rb.completion_mask] == 0).all()
    assert temperature == 0 or "stop" in rb.finish_reasons
    assert not any(t >= TOKENIZER_VOCAB for c in completions for t in c), "a padded vocabulary row was sampled"
    ref = _teacher_forced_logprobs(model, prompts, completions, pad)
    mask = rb.completion_mask[:, :ref.shape[1]]
    got = rb.sampling_logprobs[:, :ref.shape[1]]
    assert ((got - ref).abs() <= 1e-5 * (1 + ref.abs()))[mask].all()
