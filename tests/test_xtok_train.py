"""loss.kind=uld / gold in the trainer: the objectives against float64 references (loss and gradients), the
cross-tokenizer teacher's re-tokenization and byte alignment (both directions: scoring student text, seq_kd
generations), training on a fixed batch, the config errors, and `python -m opdx.train` end to end (single process)
on tiny models with different tokenizers (minillm: tests/test_xtok_minillm.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from xtok_helpers import (  # noqa: E402
    TINY,
    Engine,
    align_reference,
    assert_same_grads,
    gold_reference,
    grads_of,
    make_xtok_tokenizers,
    merged_reference,
    ref_distance,
    sorted_ref,
    train_run,
)

from opdx.config import ConfigError, load_config  # noqa: E402

RESPONSES = ["héllo wörld, café", "I ❤️ 🍕 pizza", "Zwölf Boxkämpfer 🎉", "the answer is 42", "naïve  façade\n\nok"]


# ------------------------------------------------------------------------------------------------ fixtures
def make_xtok_pair(out_dir: Path) -> dict:
    """Tiny random Llamas (opdx.models.make_tiny_models, 420 rows) given the two different byte-level BPE
    tokenizers of tests/xtok_helpers.py (student 300 tokens, teacher 420), and a prompt file whose responses hold
    multi-byte UTF-8."""
    from opdx.models import make_tiny_models

    t_dir, s_dir = make_tiny_models(out_dir / "models", vocab_size=420)
    s_tok, t_tok = make_xtok_tokenizers()
    s_tok.save_pretrained(s_dir)
    t_tok.save_pretrained(t_dir)
    data = out_dir / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: say something about {w}", "response": r}) + "\n"
                            for i, (w, r) in enumerate(zip(["pizza", "love", "boxing", "numbers", "façades"] * 2,
                                                           RESPONSES * 2))))
    return {"teacher": t_dir, "student": s_dir, "data": str(data)}


@pytest.fixture(scope="module")
def xtok(tmp_path_factory):
    return make_xtok_pair(tmp_path_factory.mktemp("xtok"))


def _path_overrides(pair: dict, *extra) -> list[str]:
    return ["model.source=path", f"model.path={pair['student']}", f"teacher.path={pair['teacher']}",
            f"data.train={pair['data']}", f"data.eval={pair['data']}", *extra]


def _xtok_setup(pair: dict, kind: str, *extra):
    """The trainer's own set-up path (prepare_data + cross_tokenizer_teacher) without DeepSpeed."""
    from transformers import AutoModelForCausalLM

    from opdx.teacher.local import LocalTeacher
    from opdx.train.build import load_data, prepare_data
    from opdx.train.objectives import make_objective
    from opdx.train.xtok_scoring import cross_tokenizer_teacher

    cfg = load_config(TINY, _path_overrides(pair, f"loss.kind={kind}", *extra))
    data = prepare_data(cfg, *load_data(cfg))
    student = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32)
    t_model = AutoModelForCausalLM.from_pretrained(pair["teacher"], dtype=torch.float32)
    teacher = cross_tokenizer_teacher(cfg, LocalTeacher(t_model), data, t_model)
    return cfg, data, student, t_model, teacher, make_objective(cfg, len(data.tokenizer))


def _dataset_batch(data, n: int = 5):
    from opdx.data import build_batch

    return build_batch(data.train_prompts[:n], data.train_responses[:n], data.pad_id)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, needle", [
    (["loss.kind=uld", "teacher.server_url=http://127.0.0.1:1"], "loss.kind=uld with a server teacher needs "
                                                                "teacher.path"),
    (["loss.kind=gold", "loss.gold_weight=1.5"], "loss.gold_weight must be 'matched'"),
    (["loss.kind=gold", "loss.gold_weight=most"], "loss.gold_weight must be 'matched'"),
    (["loss.kind=uld", "loss.uld_topm=0"], "loss.uld_topm must be >= 1"),
    (["loss.kind=uld", "loss.uld_p=0.5"], "loss.uld_p must be a finite number >= 1"),
    (["loss.kind=uld", "loss.merge_rule=last"], "loss.merge_rule must be one of 'observed', 'first'"),
    (["loss.kind=uld", "loss.fused_linear=true"], "loss.kind=uld needs the student's full logits"),
    (["loss.kind=minillm", "loss.lmbda=0.5"], "loss.kind=minillm is a policy gradient"),
    (["loss.kind=minillm", "loss.gamma=1.5"], "loss.gamma must be in [0, 1]"),
    (["loss.kind=minillm", "teacher.server_url=http://127.0.0.1:1"], "loss.kind=minillm needs full teacher logits"),
])
def test_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert needle in str(e.value), str(e.value)


def test_config_accepts_cross_tokenizer_keys():
    cfg = load_config(TINY, ["loss.kind=gold", "loss.gold_weight=0.25", "loss.uld_topm=8", "loss.merge_rule=first",
                             "loss.lmbda=0.5"])
    assert (cfg.loss.gold_weight, cfg.loss.uld_topm, cfg.loss.merge_rule) == ("0.25", 8, "first")


def test_different_tokenizers_need_uld_or_gold(xtok):
    from opdx.train.build import load_data, prepare_data

    cfg = load_config(TINY, _path_overrides(xtok, "loss.kind=opd"))
    with pytest.raises(ConfigError, match="incompatible tokenizers.*loss.kind=uld or loss.kind=gold"):
        prepare_data(cfg, *load_data(cfg))


# ------------------------------------------------------------------------------------------------ alignment
def _side_bytes(tok, ids: list[int]) -> bytes:
    from opdx.xtok.tokens import completion_bytes

    return completion_bytes(tok, ids)


def _byte_ends(tok, ids: list[int], *, whole_chars: bool = False) -> list[int]:
    """Byte end of each token; ``whole_chars``: rounded up to the end of the character it ends in (what a
    re-tokenized side's offset mapping tells)."""
    out, total = [], 0
    raw = _side_bytes(tok, ids)
    for i in ids:
        total += len(_side_bytes(tok, [i]))
        end = total
        while whole_chars and end < len(raw) and raw[end] & 0xC0 == 0x80:  # a continuation byte
            end += 1
        out.append(end)
    return out


def test_teacher_retokenizes_and_aligns_by_bytes(xtok):
    """Dataset responses (multi-byte UTF-8) and a sampled row with a split character: the teacher sees the prompt
    through its own chat template and the completion's bytes through its own tokenizer; every aligned group spells
    the same bytes on both sides, and the groups are those of the plain Python two-pointer alignment."""
    from opdx.data import build_batch, encode_prompt

    cfg, data, _, _, teacher, _ = _xtok_setup(xtok, "uld")
    s_tok, t_tok = data.tokenizer, data.teacher_tokenizer
    pizza = s_tok("🍕", add_special_tokens=False)["input_ids"]  # four byte tokens in the student's vocabulary
    cut = s_tok("ok ", add_special_tokens=False)["input_ids"] + pizza[:1]
    with pytest.raises(UnicodeDecodeError):
        _side_bytes(s_tok, cut).decode()
    completions = data.train_responses[:4] + [cut]
    batch = build_batch(data.train_prompts[:5], completions, data.pad_id)
    t_batch, alignment = teacher.teacher_batch(batch)
    prompts = _prompt_texts(xtok)
    for b in range(5):
        t_prompt = t_batch.input_ids[b, :t_batch.prompt_lens[b]].tolist()
        assert t_prompt == encode_prompt(t_tok, prompts[b])
        s_ids = batch.targets[b][batch.loss_mask[b]].tolist()
        t_ids = t_batch.targets[b][t_batch.loss_mask[b]].tolist()
        assert (s_ids[-1] == data.eos_ids[0]) == (t_ids[-1] == t_tok.eos_token_id)
        s_groups = alignment.student_groups[b][: len(s_ids)].tolist()
        t_groups = alignment.teacher_groups[b][: len(t_ids)].tolist()
        if b < 4:  # valid UTF-8 (row 4 ends inside a character: its bytes reach the teacher as U+FFFD)
            assert (s_groups, t_groups) == align_reference(_byte_ends(s_tok, s_ids),
                                                           _byte_ends(t_tok, t_ids, whole_chars=True))
        for g in range(int(alignment.num_groups[b])):
            s_bytes = _side_bytes(s_tok, [i for i, k in zip(s_ids, s_groups) if k == g])
            t_bytes = _side_bytes(t_tok, [i for i, k in zip(t_ids, t_groups) if k == g])
            assert s_bytes == t_bytes or (b == 4 and t_bytes == "\ufffd".encode()), (b, g, s_bytes, t_bytes)
    assert int(alignment.num_groups.sum()) < int(batch.loss_mask.sum())  # some groups merge several tokens


# ------------------------------------------------------------------------------------------------ uld / gold
def _prompt_texts(pair: dict) -> list[str]:
    with open(pair["data"]) as f:
        return [json.loads(line)["prompt"] for line in f]


def _reference_inputs(data, student, t_model, batch, prompts):
    """Independently of opdx.train.xtok_scoring: float64 student rows (with grad) and teacher rows of every
    completion token, their targets and batch-global groups (plain Python alignment)."""
    from opdx.data import encode_prompt

    s_tok, t_tok, vocab = data.tokenizer, data.teacher_tokenizer, len(data.tokenizer)
    s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab]
    rows = {k: [] for k in ("sl", "sy", "sg", "tl", "ty", "tg")}
    offset = 0
    for b in range(batch.input_ids.shape[0]):
        s_ids = batch.targets[b][batch.loss_mask[b]].tolist()
        text = _side_bytes(s_tok, s_ids).decode()
        t_prompt = encode_prompt(t_tok, prompts[b])
        t_ids = t_tok(text, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
        with torch.no_grad():
            t_logits = t_model(input_ids=torch.tensor([t_prompt + t_ids])).logits[0, :, :len(t_tok)].double()
        sg, tg = align_reference(_byte_ends(s_tok, s_ids), _byte_ends(t_tok, t_ids, whole_chars=True))
        rows["sl"].append(s_logits[b][batch.loss_mask[b]].double())
        rows["tl"].append(t_logits[len(t_prompt) - 1:len(t_prompt) - 1 + len(t_ids)])
        rows["sy"] += s_ids
        rows["ty"] += t_ids
        rows["sg"] += [g + offset for g in sg]
        rows["tg"] += [g + offset for g in tg]
        offset += max(sg) + 1
    cat = {k: torch.cat(v) if k.endswith("l") else torch.tensor(v) for k, v in rows.items()}
    return cat["sl"], cat["sy"], cat["sg"], cat["tl"], cat["ty"], cat["tg"], offset


def _uld_reference(sl, sy, sg, tl, ty, tg, n, top_m, p):
    total = 0.0
    for g in range(n):
        ps, pt = merged_reference(sl, sy, sg, g, "observed"), merged_reference(tl, ty, tg, g, "observed")
        total = total + ref_distance(sorted_ref(ps, top_m), sorted_ref(pt, top_m), p)
    return total / n


@pytest.mark.parametrize("kind, extra", [("uld", ["loss.uld_topm=16", "loss.uld_p=1.5"]),
                                         ("gold", ["loss.uld_topm=16", "loss.beta=0.3"]),
                                         ("gold", ["loss.gold_weight=0.4"])])
def test_cross_tokenizer_objective_matches_float64_reference(xtok, kind, extra):
    cfg, data, student, t_model, teacher, objective = _xtok_setup(xtok, kind, *extra)
    batch = _dataset_batch(data)
    signal = teacher.score(batch, objective.signal_spec().teacher_kind, vocab_size=len(data.tokenizer))
    loss, stats = objective.compute(Engine(student), batch, signal, "dataset")
    loss.backward()
    got = grads_of(student)
    student.zero_grad(set_to_none=True)
    sl, sy, sg, tl, ty, tg, n = _reference_inputs(data, student, t_model, batch, _prompt_texts(xtok))
    assert n == signal.num_groups and torch.equal(sg, signal.student_groups)
    c = cfg.loss
    if kind == "uld":
        ref = _uld_reference(sl, sy, sg, tl, ty, tg, n, c.uld_topm, c.uld_p)
    else:
        weight = None if c.gold_weight == "matched" else float(c.gold_weight)
        ref = gold_reference(sl, sy, sg, tl, ty, tg, n, teacher.vocab_map, c.beta, c.uld_topm, weight)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    assert_same_grads(got, student)
    assert stats.n == float(batch.loss_mask.sum()) and stats.k1_sum == stats.k1_sum


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_cross_tokenizer_trains_on_a_fixed_batch(xtok, kind):
    """A few AdamW steps at a high learning rate on one batch of dataset responses: the loss falls by a fifth, the
    gradients are finite and non-zero, the per-group statistics finite (on dataset text the group log-ratio is not
    a KL estimate, so its sign is free)."""
    _, data, student, _, teacher, objective = _xtok_setup(xtok, kind)
    batch = _dataset_batch(data)
    signal = teacher.score(batch, "gjsd", vocab_size=len(data.tokenizer))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses, kls = [], []
    for _ in range(12):
        opt.zero_grad(set_to_none=True)
        loss, stats = objective.compute(Engine(student), batch, signal, "dataset")
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        assert torch.isfinite(grads).all() and grads.abs().max() > 0
        opt.step()
        losses.append(float(loss.detach()))
        kls.append(stats.k1_sum / signal.num_groups)
    assert torch.isfinite(torch.tensor(losses + kls)).all(), (losses, kls)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_seq_kd_trains_on_the_teachers_retokenized_text(xtok, kind):
    """λ = 0 with loss.seq_kd: the teacher generates from its own prompt encoding, in its own tokens; the student
    trains on that completion's text in the student's tokens (the student's EOS where the teacher stopped), and the
    uld / gold loss on it has finite, non-zero gradients."""
    from types import SimpleNamespace

    from opdx.data import encode_prompt
    from opdx.rollout.hf import HFRollout
    from opdx.train.sources import make_sequences
    from opdx.xtok.align import decode_bytes

    cfg, data, student, t_model, teacher, objective = _xtok_setup(
        xtok, kind, "loss.lmbda=0", "loss.seq_kd=true", "rollout.max_new_tokens=24", "rollout.temperature=1.0")
    s_tok, t_tok, idx = data.tokenizer, data.teacher_tokenizer, [0, 1, 2, 3, 4]
    seed = int(torch.randint(0, 10_000, ()))
    trainer = SimpleNamespace(cfg=cfg, data=data, teacher=teacher, device=torch.device("cpu"), vocab=len(s_tok))
    seqs = make_sequences(trainer, idx, "teacher", seed)
    texts = _prompt_texts(xtok)
    t_prompts = [encode_prompt(t_tok, texts[i]) for i in idx]
    r = cfg.rollout
    own = HFRollout(t_model, eos_ids=[t_tok.eos_token_id], pad_id=t_tok.pad_token_id, max_new_tokens=r.max_new_tokens,
                    temperature=r.temperature, top_p=r.top_p, vocab_size=teacher.vocab).generate(t_prompts, seed=seed)
    batch = seqs.batch
    for b, t_ids in enumerate(own.completions()):
        assert batch.input_ids[b, :batch.prompt_lens[b]].tolist() == data.train_prompts[b]
        s_ids = batch.targets[b][batch.loss_mask[b]].tolist()
        assert _side_bytes(s_tok, s_ids).decode() == decode_bytes(_side_bytes(t_tok, t_ids))[0], b
        assert (t_ids[-1] == t_tok.eos_token_id) == (s_ids[-1] == data.eos_ids[0]), b
    # a teacher completion that stopped (rare for a random tiny teacher): text + the student's EOS
    from opdx.train.xtok_scoring import retokenize

    stop = [t_tok(text, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id] for text in RESPONSES]
    ids, _, lengths = retokenize(stop, t_tok, s_tok, source_eos={t_tok.eos_token_id}, target_eos=data.eos_ids[0],
                                 name="student")
    for b, text in enumerate(RESPONSES):
        row = ids[b, :lengths[b]].tolist()
        assert row[-1] == data.eos_ids[0] and _side_bytes(s_tok, row[:-1]).decode() == text
    signal = teacher.score(batch, "gjsd", vocab_size=len(s_tok))
    loss, stats = objective.compute(Engine(student), batch, signal, "teacher")
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    assert torch.isfinite(loss) and torch.isfinite(grads).all() and grads.abs().max() > 0
    assert stats.n == float(batch.loss_mask.sum()) > 0


# ------------------------------------------------------------------------------------------------ server teacher
def _loss_and_grads(objective, student, batch, signal):
    loss, _ = objective.compute(Engine(student), batch, signal, "dataset")
    loss.backward()
    grads = grads_of(student)
    student.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_topk_teacher_at_full_k_equals_the_full_teacher(xtok, kind):
    """A teacher known only by its top-k log-probs (a server teacher, opdx.xtok.topk_teacher) with k = its whole
    vocabulary gives the local teacher's loss and gradients; with k = 3 (most groups' GOLD matched set is partial,
    some empty) the loss is finite, has gradients, and differs."""
    import copy

    _, data, student, _, teacher, objective = _xtok_setup(xtok, kind, "loss.uld_topm=16")
    batch = _dataset_batch(data)
    full, g_full = _loss_and_grads(objective, student, batch, teacher.score(batch, "gjsd", vocab_size=0))
    losses = {}
    for k in (teacher.vocab, 3):
        top = copy.copy(teacher)
        top.topk = k
        signal = top.score(batch, "gjsd", vocab_size=0)
        assert signal.teacher.top_logp.shape == (signal.num_groups, k)
        losses[k], grads = _loss_and_grads(objective, student, batch, signal)
        assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().max() > 0 for g in grads.values())
        if k == teacher.vocab:
            for name, g in g_full.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7)
    assert losses[teacher.vocab] == pytest.approx(full, rel=1e-5, abs=1e-7)
    assert abs(losses[3] - full) > 1e-4


def test_gold_topk_gradcheck_with_an_unmatched_group():
    """gold against a top-k teacher in float64: gradcheck through the student's one-pass gathered log-probs, a group
    whose teacher top-k holds no string-matched token (ULD term only) and one fully matched."""
    from opdx.xtok import TopSide, VocabMap, gold_loss, gold_loss_topk, merge_groups

    g = torch.Generator().manual_seed(5)
    vs, n = 9, 3
    sl = torch.randn(5, vs, generator=g, dtype=torch.float64, requires_grad=True)
    sy, sg = torch.tensor([1, 4, 2, 0, 7]), torch.tensor([0, 0, 1, 2, 2])
    vmap = VocabMap(torch.tensor([0, 2, 3, 5]), torch.tensor([10, 1, 4, 6]))  # student id -> teacher id
    top_ids = torch.tensor([[7, 8, 9], [10, 1, 2], [4, 6, 10]])  # group 0: none matched; group 2: all matched
    t_full = torch.log_softmax(torch.randn(n, 12, generator=g, dtype=torch.float64), -1)
    top_logp = torch.sort(t_full.gather(1, top_ids), -1, descending=True).values
    teacher = TopSide(top_ids, top_logp, torch.tensor([0.0, -0.3, -0.1], dtype=torch.float64))

    def fn(x):
        return gold_loss_topk(merge_groups(x, sy, sg, n), teacher, vmap, beta=0.4, top_m=4)[0]

    assert torch.isfinite(fn(sl))
    with pytest.raises(TypeError, match="use opdx.xtok.gold_loss_topk"):
        gold_loss(merge_groups(sl, sy, sg, n), teacher, vmap)
    assert torch.autograd.gradcheck(fn, (sl,), eps=1e-6, atol=1e-7)


@pytest.mark.slow  # a single-process run against a model-backed stub server (~30 s)
def test_cross_tokenizer_run_with_a_server_teacher(xtok, tmp_path):
    """loss.kind=uld with teacher.server_url (a stub vLLM server whose prompt logprobs come from the tiny teacher
    model) and teacher.path for its tokenizer: the run trains and evaluates the per-group reverse KL."""
    from transformers import AutoModelForCausalLM

    from tests.test_teacher_server import start_stub

    model = AutoModelForCausalLM.from_pretrained(xtok["teacher"], dtype=torch.float32).eval()

    def rows_fn(tokens):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)

    stub, httpd = start_stub(vocab=int(model.config.vocab_size))
    stub.rows_fn, stub.max_logprobs = rows_fn, 64
    try:
        rows = train_run(_path_overrides(xtok, "loss.kind=uld", "loss.uld_topm=16", "loss.lmbda=0.5",
                                         f"teacher.server_url={stub.url}", "train.max_steps=2", "eval.every=0",
                                         "rollout.max_new_tokens=8"), tmp_path / "run")
    finally:
        httpd.shutdown()
        httpd.server_close()
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["loss"] == r["loss"] for r in train)
    evals = [r for r in rows if "eval_group_reverse_kl" in r]
    assert [r["step"] for r in evals] == [0, 2]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("kind, sources", [("gold", ["loss.lmbda=0.5"]), ("uld", ["loss.lmbda=0", "loss.seq_kd=true"])])
def test_cross_tokenizer_run_end_to_end(xtok, tmp_path, kind, sources):
    """`python -m opdx.train` with a student and a teacher whose tokenizers differ (gold with λ = 0.5: student
    rollouts and dataset responses; uld with λ = 0 and seq_kd: the teacher's generations): finite losses, and the
    held-out metric is the per-group reverse KL."""
    rows = train_run(_path_overrides(xtok, f"loss.kind={kind}", *sources, "train.max_steps=3", "eval.every=0",
                                  "rollout.max_new_tokens=12"), tmp_path / "run")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_group_reverse_kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e6 and r["tokens"] > 0 for r in train)
    assert {r["source"] for r in train} <= ({"teacher"} if "loss.seq_kd=true" in sources else {"student", "dataset"})
    assert [r["step"] for r in evals] == [0, 3] and "eval_teacher_response_len" in evals[0]
    assert all(r["eval_group_reverse_kl"] == r["eval_group_reverse_kl"] for r in evals)
    assert not any("eval_top1_agreement" in r or "eval_reverse_kl" in r for r in rows)
    # the completions log: the student's tokens and logprobs, the teacher's greedy text (generated in its tokens,
    # re-tokenized for the student); no per-token teacher logprobs across tokenizers
    events = [json.loads(ln) for ln in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [0, 3]
    for c in (c for e in events for c in e["completions"]):
        assert len(c["tokens"]) == len(c["student_logprobs"]) > 0
        assert c["teacher_logprobs"] is None and c["logprob_diff"] is None and isinstance(c["teacher"], str)
