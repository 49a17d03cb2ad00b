"""Training from an `opdx.generate` file on tiny random models (CPU): the dataset / seq_kd path trains on exactly the
file's response_ids; teacher.source=file gives the live teacher's top-k signal on those sequences (up to the file's
rounding) and trains without a teacher model; its bad inputs are clear errors before any process group."""

import json
import subprocess
import types
from pathlib import Path

import pytest
import torch

from opdx.data import build_batch, encode_examples, load_examples
from opdx.generate import main as generate_main
from tests.test_train import ROOT, TINY, _cmd, _env, _main_err, metrics
from tests.tiny_models import make_tiny_pair, write_prompts

K = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fromfile")
    teacher, student = make_tiny_pair(str(d / "models"))
    prompts = write_prompts(str(d / "prompts.jsonl"), 16)
    ev = write_prompts(str(d / "eval.jsonl"), 4)
    out = d / "teacher.jsonl"
    assert generate_main(["--model", teacher, "--data", prompts, "--out", str(out), "--engine", "hf", "--n", "1",
                          "--batch-size", "8", "--max-new-tokens", "12", "--logprobs", str(K), "--no-progress"]) == 0
    return {"teacher": teacher, "student": student, "train": str(out), "eval": ev, "dir": d}


def _rows(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def _encoded(tiny, path=None, max_len=128):
    from opdx.models import load_tokenizer

    tok = load_tokenizer(tiny["student"])
    examples = load_examples(path or tiny["train"])
    prompts, responses = encode_examples(tok, examples, chat_template=True, system_prompt="", max_prompt_len=256,
                                         max_response_len=max_len, eos_id=tok.eos_token_id)
    return tok, examples, prompts, responses


def test_dataset_responses_are_the_files_ids(tiny, tmp_path, capsys):
    rows = _rows(tiny["train"])
    tok, _, _, responses = _encoded(tiny)
    assert responses == [r["response_ids"] for r in rows]  # EOS included exactly where finish_reason == "stop"
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert any(r["finish_reason"] == "length" and r["response_ids"][-1] != tok.eos_token_id for r in rows)
    _, _, _, cut = _encoded(tiny, max_len=3)
    assert cut == [r["response_ids"][:3] for r in rows]
    # ids of another tokenizer (here: decoding to another text) fall back to the response text, with a note
    bad = tmp_path / "bad.jsonl"
    rows[0]["response_ids"] = [5, 6, 7]
    rows[0]["finish_reason"] = "length"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    _, _, _, back = _encoded(tiny, str(bad))
    assert "response_ids of 1 records are not this tokenizer's" in capsys.readouterr().err
    assert back[0] == list(tok(rows[0]["response"], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    assert back[1:] == [r["response_ids"] for r in rows[1:]]


def test_seq_kd_reads_the_file_instead_of_generating(tiny):
    from opdx.train.sources import make_sequences

    _, examples, prompts, responses = _encoded(tiny)

    def no_generation(*a, **k):
        raise AssertionError("the teacher must not generate: the file holds its samples")

    data = types.SimpleNamespace(train_prompts=prompts, train_responses=responses, pad_id=0, pre_sampled=True)
    t = types.SimpleNamespace(data=data, teacher=types.SimpleNamespace(generate=no_generation), device="cpu")
    seqs = make_sequences(t, [3, 1, 7], "teacher", seed=0)
    for row, i in enumerate([3, 1, 7]):
        n = len(prompts[i])
        got = seqs.batch.input_ids[row, n:n + seqs.batch.completion_lens[row]].tolist()
        assert got == responses[i] == examples[i].meta["response_ids"]


def test_file_signal_equals_live_teacher(tiny):
    from opdx.models import load_causal_lm
    from opdx.teacher.file import FileTeacher
    from opdx.teacher.local import LocalTeacher

    tok, examples, prompts, responses = _encoded(tiny)
    vocab = len(tok)
    file_teacher = FileTeacher(examples, prompts, responses, vocab=vocab, topk=K)
    live = LocalTeacher(load_causal_lm(tiny["teacher"], dtype="float32", device="cpu"))
    idx = [0, 5, 2, 9, 11]
    batch = build_batch([prompts[i] for i in idx], [responses[i] for i in idx], tok.pad_token_id)
    for k in (K, 3):
        got = file_teacher.score(batch, "topk", vocab_size=vocab, temperature=1.0, topk=k)
        ref = live.score(batch, "topk", vocab_size=vocab, temperature=1.0, topk=k)
        assert got.topk_ids.shape == (batch.num_tokens, k)
        assert torch.equal(got.topk_ids, ref.topk_ids)
        assert (got.topk_logprobs - ref.topk_logprobs).abs().max() < 1e-4
    # the trained token's logprob: exact where it is in the top-K, else the tail mass (an upper bound of it)
    full = live.score(batch, "topk", vocab_size=vocab, temperature=1.0, topk=vocab).topk_ids
    got = file_teacher.score(batch, "topk", vocab_size=vocab, temperature=1.0, topk=K)
    ref = live.score(batch, "topk", vocab_size=vocab, temperature=1.0, topk=K).token_logprobs
    in_topk = (got.topk_ids == batch.targets[batch.loss_mask][:, None]).any(-1)
    diff = (got.token_logprobs - ref)[batch.loss_mask]
    assert in_topk.any() and diff[in_topk].abs().max() < 1e-4
    assert (diff[~in_topk] >= -1e-4).all() and full.shape[1] == vocab
    with pytest.raises(RuntimeError, match="not one of data.train's recorded sequences"):
        other = build_batch([prompts[0]], [responses[1]], tok.pad_token_id)
        file_teacher.score(other, "topk", vocab_size=vocab, temperature=1.0, topk=K)


def _overrides(tiny, out, *extra):
    return ["model.source=path", f"model.path={tiny['student']}", f"data.train={tiny['train']}",
            f"data.eval={tiny['eval']}", f"train.output_dir={out}", "teacher.source=file", "loss.kind=topk",
            f"loss.topk={K}", "loss.lmbda=0", *extra]


def test_train_topk_from_file_without_teacher(tiny, tmp_path):
    out = tmp_path / "run"
    # no teacher.path: no teacher model anywhere; seq_kd=true: the "teacher" source is the file's samples
    args = _overrides(tiny, out, "train.max_steps=3", "loss.seq_kd=true", "eval.every=3", "log.plot=false")
    p = subprocess.run(_cmd(2, args), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3], p.stderr[-2000:]
    assert all(r["source"] == "teacher" and torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0
               and r["tokens"] > 0 for r in train)
    assert all("teacher_logratio" in r for r in train)
    ev = [r for r in rows if "eval_response_len" in r]
    assert ev and not any("eval_reverse_kl" in r for r in rows)  # a file scores no held-out sample


def test_file_teacher_errors(tiny, tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    base = _overrides(tiny, tmp_path / "bad")
    assert "needs a file written by `python -m opdx.generate ... --logprobs K`" in _main_err(
        capsys, "--config", TINY, *base, f"data.train={write_prompts(str(tmp_path / 'p.jsonl'), 4)}")
    assert "records the top-8 teacher logprobs, fewer than loss.topk=16" in _main_err(
        capsys, "--config", TINY, *base, "loss.topk=16")
    assert "cannot score the student's own rollouts" in _main_err(capsys, "--config", TINY, *base, "loss.lmbda=0.5")
    assert "set loss.temperature=1" in _main_err(capsys, "--config", TINY, *base, "loss.temperature=2")
    assert "set loss.kind=topk" in _main_err(capsys, "--config", TINY, *base, "loss.kind=opd")
    assert "generated with another chat template or system prompt" in _main_err(
        capsys, "--config", TINY, *base, "data.chat_template=false")  # the logprobs were of the templated prompt
    rows = _rows(tiny["train"])
    rows[2]["response_ids"] = [600, 601]  # outside the student's 512-token vocabulary
    bad = tmp_path / "other_tok.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from opdx.train.loop import main

    capsys.readouterr()
    assert main(["--config", TINY, *base, f"data.train={bad}"]) == 2
    note, err = capsys.readouterr().err.strip().splitlines()  # the data note, then the error
    assert "the response_ids of 1 records are not this tokenizer's" in note
    assert "row 3's response_ids are missing or not the student tokenizer's" in err
    import torch.distributed as dist

    assert not dist.is_initialized()  # every error came before any process group or model weights


def test_mixed_lambda_with_a_live_teacher(tiny, tmp_path):
    """λ = 0.5 with the file as the teacher's samples: student rollouts and file sequences, both scored live."""
    from opdx.train.sources import draw_source

    out = tmp_path / "mixed"
    args = ["model.source=path", f"model.path={tiny['student']}", f"teacher.path={tiny['teacher']}",
            f"data.train={tiny['train']}", f"data.eval={tiny['eval']}", f"train.output_dir={out}", "loss.kind=topk",
            f"loss.topk={K}", "loss.lmbda=0.5", "loss.seq_kd=true", "train.max_steps=4", "eval.at_start=false",
            "log.plot=false", "save.every=0"]
    p = subprocess.run(_cmd(2, args), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    train = [r for r in metrics(out) if "loss" in r]
    assert [r["source"] for r in train] == [draw_source(0.5, True, 0, s, 0) for s in range(1, 5)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert any("eval_reverse_kl" in r for r in metrics(out))  # a live teacher scores the held-out samples
