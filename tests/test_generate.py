"""opdx.generate (teacher pre-sampling to JSONL) on tiny random models, HF engine on CPU.

Output format and that it reads back as a training data file; --logprobs equal a teacher-forced forward; resume
after a torn line and after a SIGKILL mid-run (no duplicate, no lost sample, bytes equal to an uninterrupted run);
seeds; a 2-process torchrun (gloo) merges to the single-process file; bad inputs exit 2 naming file and line.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opdx.generate import main, plan_chunks, rank_chunks
from tests.tiny_models import make_tiny_pair, write_prompts

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    teacher, _ = make_tiny_pair(str(d / "models"))  # model vocab 576 > tokenizer 512: padded rows never sampled
    return {"model": teacher, "prompts": write_prompts(str(d / "prompts.jsonl"), n=10), "dir": d}


def _gen(tiny, out, *extra, n=2, batch=4, max_new=8):
    argv = ["--model", tiny["model"], "--data", tiny["prompts"], "--out", str(out), "--engine", "hf", "--n", str(n),
            "--batch-size", str(batch), "--max-new-tokens", str(max_new), "--no-progress", *extra]
    return argv


def _read(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def test_output_format_and_training_readback(tiny, tmp_path):
    from opdx.data import load_examples
    from opdx.models import load_tokenizer

    out = tmp_path / "t.jsonl"
    assert main(_gen(tiny, out, "--temperature", "1.0")) == 0
    rows = _read(out)
    src = [json.loads(ln) for ln in Path(tiny["prompts"]).read_text().splitlines()]
    assert len(rows) == 2 * len(src)
    tok = load_tokenizer(tiny["model"])
    eos = tok.eos_token_id
    for k, r in enumerate(rows):
        i, s = divmod(k, 2)  # prompt order, then sample index
        assert r["prompt"] == src[i]["prompt"] and r["sample"] == s
        assert r["answer"] == src[i]["answer"] and r["category"] == "test"  # the input's other fields are kept
        ids = r["response_ids"]
        assert 1 <= len(ids) <= 8 and all(0 <= t < 512 for t in ids)
        assert eos not in ids[:-1]
        assert r["finish_reason"] == ("stop" if ids[-1] == eos else "length")
        assert r["response"] == tok.decode(ids[:-1] if ids[-1] == eos else ids)
        assert "topk_ids" not in r
        assert r["generation"] == {"model": "teacher", "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0,
                                   "seed": 0, "logprobs": 0}
    assert all(rows[2 * i]["prompt_hash"] == rows[2 * i + 1]["prompt_hash"] for i in range(len(src)))
    assert len({r["prompt_hash"] for r in rows}) == len(src)
    assert len({tuple(r["response_ids"]) for r in rows}) > len(src)  # sampling: samples of a prompt differ
    assert not (tmp_path / "t.jsonl.parts").exists()
    back = load_examples(str(out))  # directly a data.train file
    assert [e.response for e in back] == [r["response"] for r in rows]


def test_logprobs_match_teacher_forced_forward(tiny, tmp_path):
    from opdx.data import encode_prompt
    from opdx.models import load_causal_lm, load_tokenizer

    k = 5
    out = tmp_path / "lp.jsonl"
    # sampled at temperature 0.7 / top-p 0.9: the stored logprobs are still the model's own (temperature 1, full)
    assert main(_gen(tiny, out, "--logprobs", str(k), "--temperature", "0.7", "--top-p", "0.9", n=1, batch=3)) == 0
    tok = load_tokenizer(tiny["model"])
    model = load_causal_lm(tiny["model"], dtype=torch.float32)
    vocab = len(tok)
    for r in _read(out):
        ids = torch.tensor(r["topk_ids"])
        vals = torch.tensor(r["topk_logprobs"], dtype=torch.float64)
        n = len(r["response_ids"])
        assert ids.shape == (n, k) and vals.shape == (n, k)
        prompt = encode_prompt(tok, r["prompt"], chat_template=True)
        seq = torch.tensor([prompt + r["response_ids"]])
        with torch.no_grad():
            logits = model(seq).logits[0, len(prompt) - 1:-1, :vocab].double()
        ref = torch.log_softmax(logits, -1)
        torch.testing.assert_close(vals, ref.gather(-1, ids), atol=1e-5, rtol=0)
        top = ref.topk(k, -1).values
        torch.testing.assert_close(vals, top, atol=1e-5, rtol=0)  # they are the K largest, sorted
        assert bool((vals[:, :-1] >= vals[:, 1:]).all())


def test_resume_after_torn_line(tiny, tmp_path, capsys):
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert main(_gen(tiny, ref)) == 0
    data = ref.read_bytes()
    lines = data.splitlines(keepends=True)
    cut = sum(len(ln) for ln in lines[:7]) + len(lines[7]) // 2  # 7 whole lines and half of the 8th
    out.write_bytes(data[:cut])
    capsys.readouterr()
    assert main(_gen(tiny, out)) == 0
    assert "torn last line" in capsys.readouterr().err
    assert out.read_bytes() == data  # nothing lost, nothing twice, same samples as the uninterrupted run
    before = out.stat().st_mtime_ns
    assert main(_gen(tiny, out)) == 0  # complete: nothing to generate, the file is left alone
    assert out.stat().st_mtime_ns == before and out.read_bytes() == data


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)])
def test_resume_after_kill_mid_run(tiny, tmp_path, sig, code):
    """SIGKILL, or Ctrl-C (exit 130 with a note), after the first chunk file: the rerun loses nothing."""
    prompts = write_prompts(str(tmp_path / "many.jsonl"), n=40)
    job = dict(tiny, prompts=prompts)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    args = _gen(job, out, n=1, batch=2, max_new=24)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "opdx.generate", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = Path(str(out) + ".parts")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not list(parts.glob("*.jsonl")):
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait()
    kept = sum(len(_read(p)) for p in parts.glob("*.jsonl"))
    err = proc.stderr.read().decode()
    assert proc.returncode == code, err[-2000:]
    if sig == signal.SIGINT:
        assert "interrupted: finished chunks are kept" in err
    assert 0 < kept < 40 and not out.exists()
    assert main(_gen(job, out, n=1, batch=2, max_new=24)) == 0
    assert main(_gen(job, ref, n=1, batch=2, max_new=24)) == 0
    rows = _read(out)
    assert len(rows) == 40 and len({(r["prompt_hash"], r["sample"]) for r in rows}) == 40
    assert out.read_bytes() == ref.read_bytes()


def test_seeds_reproducible(tiny, tmp_path):
    a, b, c = (tmp_path / f"{x}.jsonl" for x in "abc")
    assert main(_gen(tiny, a, "--seed", "3")) == 0
    assert main(_gen(tiny, b, "--seed", "3")) == 0
    assert main(_gen(tiny, c, "--seed", "4")) == 0
    assert a.read_bytes() == b.read_bytes()
    ra, rc = _read(a), _read(c)
    assert [r["prompt_hash"] for r in ra] == [r["prompt_hash"] for r in rc]
    assert [r["response_ids"] for r in ra] != [r["response_ids"] for r in rc]


def test_chunks_are_shared_out_disjointly():
    chunks = plan_chunks(7, 3, 4)
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4, 1]
    assert [x for c in chunks for x in c] == [(i, s) for i in range(7) for s in range(3)]
    shares = [rank_chunks(chunks, r, 4) for r in range(4)]
    assert sorted(c for share in shares for c, _ in share) == list(range(len(chunks)))
    assert [c for c, _ in shares[1]] == [1, 5]


def test_torchrun_two_ranks_equal_one_process(tiny, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(_gen(tiny, one, "--logprobs", "2", batch=3)) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), "-m", "opdx.generate", "--", *_gen(tiny, two, "--logprobs", "2", batch=3)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "rank 1:" in p.stderr and "rank 0:" in p.stderr
    assert_same_samples(two, one)
    assert not Path(str(two) + ".parts").exists()


def assert_same_samples(got: Path, want: Path) -> None:
    """Same samples in the same order; the recorded top-K logprobs to 1e-5 (a process with another thread count may
    round the 6th decimal differently)."""
    a = [json.loads(ln) for ln in got.read_text().splitlines()]
    b = [json.loads(ln) for ln in want.read_text().splitlines()]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        xl, yl = x.pop("topk_logprobs", None), y.pop("topk_logprobs", None)
        assert x == y
        assert (xl is None) == (yl is None)
        if xl is not None:
            assert torch.allclose(torch.tensor(xl), torch.tensor(yl), atol=1e-5, rtol=0)


def _bad(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize("case, content, match", [
    ("no_prompt", b'{"prompt": "hi"}\n{"question": "where?"}\n', "no_prompt.jsonl: row 2 has no non-empty 'prompt'"),
    ("latin1", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', "latin1.jsonl:2 is not UTF-8"),
    ("empty", b"\n\n", "empty.jsonl is empty"),
    ("broken", b'{"prompt": "ok"}\n{"prompt": \n', "broken.jsonl:2 is not valid JSON"),
])
def test_bad_data_exits_2(tiny, tmp_path, capsys, case, content, match):
    data = _bad(tmp_path, f"{case}.jsonl", content)
    argv = _gen(dict(tiny, prompts=data), tmp_path / "o.jsonl")
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_model_and_output_exit_2(tiny, tmp_path, capsys):
    assert main(_gen(dict(tiny, model=str(tmp_path / "missing")), tmp_path / "o.jsonl")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_gen(tiny, tmp_path / "no_dir" / "o.jsonl")) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "a", "response": "b"}\n')
    assert main(_gen(tiny, foreign)) == 2
    assert "not an opdx.generate output" in capsys.readouterr().err
    ok = tmp_path / "ok.jsonl"
    assert main(_gen(tiny, ok, n=1)) == 0
    capsys.readouterr()
    assert main(_gen(tiny, ok, "--temperature", "0.5", n=1)) == 2  # a resume must keep the sampling settings
    assert "temperature=1.0 (now 0.5)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(_gen(tiny, tmp_path / "o.jsonl", "--n", "0"))
    assert exc.value.code == 2


def test_auto_engine_falls_back_to_hf_with_a_note(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    out = tmp_path / "auto.jsonl"
    argv = _gen(tiny, out, n=1)
    argv[argv.index("--engine") + 1] = "auto"
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "vLLM is not importable" in err and "(--engine hf)" in err and "engine hf" in err
    assert len(_read(out)) == 10


def test_tensor_parallel_needs_vllm_in_one_process(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tp.jsonl"
    for extra, env, fragment in ((["--tensor-parallel-size", "0"], {}, "must be >= 1"),
                                 (["--tensor-parallel-size", "2"], {}, "use --engine vllm"),  # _gen uses --engine hf
                                 (["--tensor-parallel-size", "2"], {"WORLD_SIZE": "2"}, "not under torchrun")):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as exc:
            main(_gen(tiny, out, *extra))
        assert exc.value.code == 2 and fragment in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setitem(sys.modules, "vllm", None)  # auto falls back to HF, which cannot shard
    argv = _gen(tiny, out, "--tensor-parallel-size", "2", n=1)
    argv[argv.index("--engine") + 1] = "auto"
    assert main(argv) == 2
    assert "needs the vLLM engine" in capsys.readouterr().err and not out.exists()
