"""rollout.tensor_parallel_size > 1 (colocated vLLM, issue 21): the TP groups, the prompt gather and the row
split, in real gloo process groups with a stand-in for vllm.LLM (CPU vLLM cannot run tensor parallelism here;
the real engine runs in tests/test_vllm.py where it can)."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from opdx.config import ConfigError
from opdx.rollout.tensor_parallel import own_rows, tp_groups


def test_tp_groups_are_consecutive_blocks():
    assert tp_groups(4, 2) == [[0, 1], [2, 3]]
    assert tp_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tp_groups(2, 1) == [[0], [1]]
    for world, tp in ((3, 2), (4, 0), (2, 4)):
        with pytest.raises(ConfigError, match="must divide the number of training ranks"):
            tp_groups(world, tp)


def test_own_rows():
    parts = [([1, 2], 0), ([3], 1), ([4, 5, 6], 2)]
    rows = ["a", "b", "c", "d", "e", "f"]
    assert [own_rows(rows, parts, i) for i in range(3)] == [["a", "b"], ["c"], ["d", "e", "f"]]


class FakeLLM:
    """vllm.LLM's generate: one output per request, the completion = the prompt's first id and the request's seed
    (so a row shows which prompt and which seed produced it); every call is recorded."""

    def __init__(self):
        self.calls = []

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append(([r["prompt_token_ids"] for r in requests], [p.seed for p in params]))
        outs = []
        for r, p in zip(requests, params):
            ids = [r["prompt_token_ids"][0], p.seed % 1000]
            step = {t: types.SimpleNamespace(logprob=-0.5) for t in ids}
            comp = types.SimpleNamespace(token_ids=ids, logprobs=[step, step], finish_reason="length")
            outs.append(types.SimpleNamespace(outputs=[comp]))
        return outs


def fake_vllm_module():
    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    return types.SimpleNamespace(SamplingParams=SamplingParams)


def _worker(rank, world, tp, init_file, results):
    sys.modules["vllm"] = fake_vllm_module()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from opdx.rollout.tensor_parallel import TensorParallelGroup
    from opdx.rollout.vllm import VLLMColocateRollout

    r = object.__new__(VLLMColocateRollout)  # the engine without vllm.LLM: the gather/split around llm.generate
    r.__dict__.update(eos_ids=[0], pad_id=0, max_new_tokens=2, temperature=1.0, top_p=1.0, vocab_size=None,
                      top_logprobs=0, min_new_tokens=0, sleep=False, asleep=False, llm=FakeLLM(),
                      tp_group=TensorParallelGroup(tp))
    prompts = [[100 * rank + i + 1, 7] for i in range(rank + 1)]  # ranks hold different numbers of prompts
    batch = r.generate(prompts, seed=rank + 1)
    results[rank] = (r.tp_group.ranks, r.llm.calls, batch.completions())
    dist.destroy_process_group()


@pytest.mark.parametrize("world, tp", [(2, 2), (4, 2)])
def test_a_tp_group_generates_every_ranks_prompts_and_each_keeps_its_own(tmp_path, world, tp):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, tp, str(tmp_path / "init"), results), nprocs=world, join=True)
    seed_of = {}
    for rank in range(world):
        group, calls, completions = results[rank]
        assert group == tp_groups(world, tp)[rank // tp]
        (prompt_ids, seeds), = calls  # one generate call with the group's requests
        want = [[100 * g + i + 1, 7] for g in group for i in range(g + 1)]
        assert prompt_ids == want  # gathered in rank order: identical on every rank of the group
        seed_of[rank] = seeds
        # this rank's rows: its own prompts, sampled with its own seed (seed * 100003 + i, as at tp=1)
        assert completions == [[100 * rank + i + 1, ((rank + 1) * 100003 + i) % 1000] for i in range(rank + 1)]
    for g in tp_groups(world, tp):
        assert all(seed_of[r] == seed_of[g[0]] for r in g)  # the same requests and seeds on every engine


def test_world_not_divisible_is_a_config_error_at_build(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        from opdx.rollout.tensor_parallel import TensorParallelGroup

        with pytest.raises(ConfigError, match="rollout.tensor_parallel_size=2 must divide"):
            TensorParallelGroup(2)
    finally:
        dist.destroy_process_group()
