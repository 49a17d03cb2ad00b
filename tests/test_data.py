import json

import pytest
import torch

from opdx.config import ConfigError
from opdx.data import IGNORE, Sampler, build_batch, completion_lengths, completion_mask, load_examples, trim_completions

EOS, PAD = 2, 2  # pad == eos, as in the demo model


@pytest.mark.parametrize("rows,eos,expected", [
    ([[5, 6, 7, 2, 2, 2]], 2, [4]),  # generated EOS trained, the pads (== eos) after it are not
    ([[5, 6, 7, 8, 9, 9]], 2, [6]),  # no EOS: all tokens (truncated at max_new_tokens)
    ([[2, 2, 2, 2]], 2, [1]),  # immediately EOS: exactly one trained token
    ([[5, 2, 6, 2]], 2, [2]),  # only the first EOS counts
    ([[5, 6, 0, 0]], 2, [4]),  # pad != eos and no eos: padding never appears without an EOS before it
    ([[5, 3, 0, 0]], [2, 3], [2]),  # several eos ids
    ([[5, 6, 7, 2], [2, 2, 2, 2], [4, 4, 4, 4]], 2, [4, 1, 4]),
])
def test_completion_lengths(rows, eos, expected):
    t = torch.tensor(rows)
    assert completion_lengths(t, eos).tolist() == expected
    m = completion_mask(t, eos)
    assert m.sum(1).tolist() == expected
    for i, n in enumerate(expected):
        assert m[i, :n].all() and not m[i, n:].any()


def test_completion_lengths_empty_and_shape():
    assert completion_lengths(torch.zeros(3, 0, dtype=torch.long), 2).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        completion_lengths(torch.zeros(3, dtype=torch.long), 2)


def test_trim_completions():
    assert trim_completions(torch.tensor([[5, 2, 2], [7, 8, 9]]), 2) == [[5, 2], [7, 8, 9]]


def test_build_batch_shift_once_pad_eq_eos():
    prompts = [[10, 11, 12], [20], [50, 51]]
    completions = [[30, 2], [40, 41, 42, 2], [2]]  # all end with the generated EOS == PAD
    b = build_batch(prompts, completions, PAD)
    assert b.input_ids.tolist() == [[10, 11, 12, 30, 2], [20, 40, 41, 42, 2], [50, 51, 2, 2, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # targets[t] = input_ids[t + 1] for completion positions only; shape [B, L - 1]
    assert b.targets.tolist() == [[IGNORE, IGNORE, 30, 2], [40, 41, 42, 2], [IGNORE, 2, IGNORE, IGNORE]]
    assert b.loss_mask.sum(1).tolist() == [2, 4, 1]  # the EOS is trained, the trailing pads (== eos) are not
    assert b.num_tokens == 7 and b.prompt_lens == [3, 1, 2] and b.completion_lens == [2, 4, 1]


def test_build_batch_targets_match_inputs_everywhere():
    torch.manual_seed(0)
    for _ in range(50):
        bsz = int(torch.randint(1, 5, ()))
        prompts = [torch.randint(3, 50, (int(torch.randint(1, 6, ())),)).tolist() for _ in range(bsz)]
        comps = []
        for _ in range(bsz):
            c = torch.randint(3, 50, (int(torch.randint(0, 6, ())),)).tolist()
            comps.append(c + ([EOS] if torch.rand(()) < 0.5 else []))
        b = build_batch(prompts, comps, PAD)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            valid = b.loss_mask[i].nonzero().flatten().tolist()
            assert valid == list(range(len(p) - 1, len(p) - 1 + len(c)))
            assert b.targets[i, valid].tolist() == c
            assert b.input_ids[i, [v + 1 for v in valid]].tolist() == c
            assert not b.loss_mask[i, : len(p) - 1].any()  # prompt tokens never contribute


def test_build_batch_empty_completion_and_errors():
    b = build_batch([[1, 2]], [[]], PAD)
    assert b.num_tokens == 0
    with pytest.raises(ValueError, match="empty"):
        build_batch([[]], [[3]], PAD)
    with pytest.raises(ValueError):
        build_batch([[1]], [], PAD)


def test_rollout_to_batch_roundtrip_pad_eq_eos():
    from opdx.rollout import RolloutBatch

    seqs = torch.tensor([[PAD, 10, 11, 30, 2, 2], [20, 21, 22, 40, 41, 42]])  # left-padded prompts, width 3
    comp = seqs[:, 3:]
    rb = RolloutBatch(seqs, [2, 3], completion_mask(comp, EOS), None, ["stop", "length"], prompt_width=3)
    assert rb.completions() == [[30, 2], [40, 41, 42]]


def test_sampler_deterministic_disjoint_and_resumable():
    n, bs, world = 23, 3, 2
    ranks = [Sampler(n, bs, world_size=world, rank=r, seed=5) for r in range(world)]
    seen = []
    for _ in range(3):
        batches = [s.next_batch() for s in ranks]
        assert all(len(b) == bs for b in batches)
        assert not set(batches[0]) & set(batches[1])  # ranks get disjoint slices
        seen += batches[0] + batches[1]
    assert len(set(seen)) == 18  # one epoch of 23 -> 3 full global batches, no repeats
    state = ranks[0].state_dict()
    ref = [ranks[0].next_batch() for _ in range(10)]  # crosses an epoch boundary
    again = Sampler(n, bs, world_size=world, rank=0, seed=5)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(10)] == ref
    other_seed = Sampler(n, bs, world_size=world, rank=0, seed=6)
    assert [other_seed.next_batch() for _ in range(3)] != [Sampler(n, bs, world_size=world, rank=0,
                                                                   seed=5).next_batch() for _ in range(3)]


def test_sampler_small_dataset_and_state_mismatch():
    s = Sampler(3, 4, world_size=2, rank=1, seed=0)
    assert all(0 <= i < 3 for i in s.next_batch())
    with pytest.raises(ConfigError, match="resume with the same"):
        Sampler(5, 4).load_state_dict(s.state_dict())


def test_load_examples(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "response": "yo", "answer": "1"}) + "\n\n")
    ex = load_examples(str(p))
    assert ex[0].prompt == "hi" and ex[0].response == "yo" and ex[0].meta == {"answer": "1"}
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_examples(str(tmp_path / "e.jsonl"))
    with pytest.raises(ConfigError, match="not found"):
        load_examples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_examples(str(tmp_path / "b.jsonl"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ConfigError, match="'prompt'"):
        load_examples(str(tmp_path / "c.jsonl"))


def test_load_hf_dataset_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "a", "response": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_examples(str(tmp_path / "ds"))[0].prompt == "a"


def test_batch_tail_keeps_all_trained_targets():
    b = build_batch([[10, 11, 12, 13], [20, 21]], [[30, 2], [40, 41, 42, 2]], PAD)
    keep = b.input_ids.shape[1] - min(b.prompt_lens) + 1  # logits_to_keep used by the trainer
    t = b.tail(keep - 1)
    assert t.targets.shape[1] == keep - 1 and t.num_tokens == b.num_tokens
    assert t.targets[t.loss_mask].tolist() == b.targets[b.loss_mask].tolist()
    with pytest.raises(ValueError, match="drop trained"):
        b.tail(2)
