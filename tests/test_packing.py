"""model.packed: padding-free packed scoring forwards (opdx.packing) give the padded forward's numbers.

In process on tiny models (Llama from opdx.models, Qwen2 from a config): packed vs padded logits/hidden states, the
teacher's per-token signal for every score kind, the student's loss and gradients for every loss kind through
`distill_step`, the probe that rejects a backend attending across sequence boundaries, and one 2-process run."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import rel_err  # noqa: E402
from test_train import _finite_run, tiny, torchrun  # noqa: E402,F401  (tiny: the module-scoped model fixture)
from tiny_models import make_tiny_pair  # noqa: E402

from opdx.config import ConfigError, load_config  # noqa: E402
from opdx.data import build_batch  # noqa: E402
from opdx.packing import causal_lm_logits, check_packed_attention, decoder_hidden, pack, unpack  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs", "tiny.yaml")
VOCAB = 512  # the tokenizer's size; the tiny models' vocabulary is padded to 576


def _uneven_batch(seed, vocab=VOCAB):
    """Very uneven rows: long and short prompts and completions, one row without completion, one of length 2."""
    g = torch.Generator().manual_seed(seed)
    lens = [(3, 40), (9, 2), (1, 1), (25, 17), (6, 0), (2, 31)]
    prompts = [torch.randint(5, vocab, (p,), generator=g).tolist() for p, _ in lens]
    comps = [torch.randint(5, vocab, (c,), generator=g).tolist() for _, c in lens]
    return build_batch(prompts, comps, pad_id=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    t_dir, s_dir = make_tiny_pair(str(tmp_path_factory.mktemp("packing") / "models"))
    load = lambda d, attn="sdpa": AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,  # noqa: E731
                                                                       attn_implementation=attn)
    from opdx.models import load_tokenizer

    return {"student": load(s_dir), "teacher": load(t_dir), "student_eager": load(s_dir, "eager"),
            "tok": load_tokenizer(s_dir)}


def _qwen2(attn, **extra):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=576, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=512, **extra)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------- pack / unpack
def test_pack_layout(fresh_seed):
    b = _uneven_batch(fresh_seed)
    p = pack(b.input_ids, b.attention_mask)
    lens = b.attention_mask.sum(1).tolist()
    assert p.input_ids.shape == (1, sum(lens)) and p.max_len == max(lens)
    assert p.position_ids[0].tolist() == [t for n in lens for t in range(n)]
    assert p.cu_seqlens.tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]
    assert torch.equal(p.input_ids[0], b.input_ids[b.attention_mask.bool()])
    x = torch.randn(1, p.num_tokens, 3, requires_grad=True)
    u = unpack(x, p)
    assert u.shape == (*b.input_ids.shape, 3) and torch.equal(u[b.attention_mask.bool()], x[0])
    assert not u[~b.attention_mask.bool()].any()
    u.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="right-padded"):
        pack(b.input_ids, b.attention_mask.flip(1))


# ------------------------------------------------------------------------------------------------- forwards
def _check_forward(model, batch):
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        h0 = decoder_hidden(model.get_decoder(), batch.input_ids, batch.attention_mask, packed=False)
        h1 = decoder_hidden(model.get_decoder(), batch.input_ids, batch.attention_mask, packed=True)
    assert rel_err(h1[mask], h0[mask]) < 1e-5
    width = batch.input_ids.shape[1]
    for keep in (width - 2, 0):  # 0 = every position, as in transformers
        with torch.no_grad():
            l0 = causal_lm_logits(model, batch.input_ids, batch.attention_mask, keep, packed=False)
            l1 = causal_lm_logits(model, batch.input_ids, batch.attention_mask, keep, packed=True)
        assert l0.shape == l1.shape == (batch.input_ids.shape[0], keep or width, model.config.vocab_size)
        m = mask[:, -(keep or width):]
        assert (l1[m] - l0[m]).abs().max() < 1e-5 * max(1.0, float(l0[m].abs().max()))
        assert not l1[~m].any()  # padding positions: zeros, never read


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_packed_forward_matches_padded(llama, attn, fresh_seed):
    model = llama["student"] if attn == "sdpa" else llama["student_eager"]
    _check_forward(model, _uneven_batch(fresh_seed))
    assert check_packed_attention(model, "student") < 1e-5


@pytest.mark.parametrize("attn, extra", [
    ("sdpa", {}),
    ("eager", {}),
    ("sdpa", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),  # sliding-window masks
])
def test_qwen2_packed_forward_matches_padded(attn, extra, fresh_seed):
    model = _qwen2(attn, **extra)
    _check_forward(model, _uneven_batch(fresh_seed))
    assert check_packed_attention(model, "student") < 1e-5


def test_probe_rejects_a_backend_that_attends_across_sequences(llama):
    """A registered attention that ignores the mask (plain causal over the whole row) is right for right-padded
    batches but wrong for packed ones: the probe raises before any training."""
    import torch.nn.functional as F
    from transformers import AttentionInterface

    from opdx.teacher.local import LocalTeacher

    def causal_only(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("opdx_test_causal_only", causal_only)
    model = _qwen2("sdpa")
    model.set_attn_implementation("opdx_test_causal_only")
    b = _uneven_batch(0)
    with torch.no_grad():  # padded forwards are still right
        h0 = decoder_hidden(model.get_decoder(), b.input_ids, b.attention_mask, packed=False)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = decoder_hidden(model.get_decoder(), b.input_ids, b.attention_mask, packed=False)
    assert rel_err(h0[b.attention_mask.bool()], ref[b.attention_mask.bool()]) < 1e-5
    model.set_attn_implementation("opdx_test_causal_only")
    with pytest.raises(ConfigError, match="attends across packed sequence boundaries.*model.packed=false"):
        check_packed_attention(model, "student")
    with pytest.raises(ConfigError, match="the teacher .*attends across"):
        LocalTeacher(model, packed=True)


# ------------------------------------------------------------------------------------------------- teacher signal
@pytest.mark.parametrize("kind, fused", [("opd", False), ("opd", True), ("gjsd", False), ("gjsd", True),
                                         ("topk", False)])
def test_teacher_signal_packed_matches_padded(llama, kind, fused, fresh_seed):
    from opdx.teacher.local import LocalTeacher

    batch = _uneven_batch(fresh_seed)
    kw = dict(vocab_size=VOCAB, temperature=1.3, topk=8)
    a = LocalTeacher(llama["teacher"], fused_linear=fused).score(batch, kind, **kw)
    b = LocalTeacher(llama["teacher"], fused_linear=fused, packed=True).score(batch, kind, **kw)
    for name in ("token_logprobs", "logits", "hidden", "topk_logprobs", "lse"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape and rel_err(y, x) < 1e-5, name
    if a.topk_ids is not None:
        assert torch.equal(a.topk_ids, b.topk_ids)
    if a.token_logprobs is not None:
        assert a.token_logprobs[batch.loss_mask].abs().min() > 0


# ------------------------------------------------------------------------------------------------- student loss
class _Engine:
    """What distill_step uses of a DeepSpeed engine: call = module forward, .module."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def _step(cfg, student, teacher_model, batch, source, fused):
    from opdx.teacher.local import LocalTeacher
    from opdx.train.objectives import distill_step

    teacher = LocalTeacher(teacher_model, fused_linear=fused, packed=cfg.model.packed)
    signal = teacher.score(batch, cfg.loss.kind, vocab_size=VOCAB, temperature=cfg.loss.temperature,
                           topk=cfg.loss.topk)
    student.zero_grad(set_to_none=True)
    loss, st = distill_step(cfg, _Engine(student), batch, signal, VOCAB, source, fused=fused, raw_logp=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, st


@pytest.mark.parametrize("overrides, source, fused", [
    (["loss.kind=opd", "loss.baseline=false"], "student", False),  # the mean baseline makes the value 0 at ρ = 1
    (["loss.kind=opd", "loss.temperature=1.7", "loss.sft_alpha=0.3"], "dataset", False),
    (["loss.kind=opd", "loss.sft_alpha=0.3"], "teacher", True),
    (["loss.kind=gjsd", "loss.beta=0.5"], "student", False),
    (["loss.kind=gjsd", "loss.beta=1.0", "loss.temperature=0.8", "loss.sft_alpha=0.5"], "teacher", False),
    (["loss.kind=gjsd", "loss.beta=0.0"], "student", True),
    (["loss.kind=topk", "loss.topk=8", "loss.beta=0.5"], "student", False),
    (["loss.kind=topk", "loss.topk=8", "loss.tail=true", "loss.sft_alpha=0.2"], "dataset", False),
    (["loss.kind=sft", "loss.lmbda=0"], "dataset", False),
    (["loss.kind=sft", "loss.lmbda=0", "loss.temperature=1.5"], "teacher", True),
])
def test_student_loss_and_grads_packed_match_padded(llama, overrides, source, fused, fresh_seed):
    student, teacher = llama["student"], llama["teacher"]
    batch = _uneven_batch(fresh_seed)
    l0, g0, st0 = _step(load_config(TINY, overrides), student, teacher, batch, source, fused)
    l1, g1, st1 = _step(load_config(TINY, overrides + ["model.packed=true"]), student, teacher, batch, source, fused)
    assert abs(l0) > 1e-4  # a real loss, not a degenerate zero
    assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-6)
    assert set(g0) == set(g1) and len(g0) == len(list(student.parameters()))
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 1e-4, name
    for k in ("k1_sum", "k3_sum", "n"):
        assert st1[k] == pytest.approx(st0[k], rel=1e-5, abs=1e-5), k
    m0, m1 = st0["batch"].loss_mask, st1["batch"].loss_mask
    assert torch.equal(m0, m1)
    assert rel_err(st1["student_logp"][m1], st0["student_logp"][m0]) < 1e-5  # rollout-mismatch logprobs too


def test_lora_gradient_checkpointing_packed_matches_padded(tmp_path, fresh_seed):
    """A peft-wrapped student with gradient checkpointing (the recomputed forward must see the same packing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    t_dir, s_dir = make_tiny_pair(str(tmp_path / "models"))
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32)
    student.config.use_cache = False
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.enable_input_require_grads()
    student = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    student.train()
    batch = _uneven_batch(fresh_seed)
    for kind in ("opd", "gjsd", "topk"):
        over = [f"loss.kind={kind}", "loss.topk=8", "model.lora=true", "loss.baseline=false"]
        l0, g0, _ = _step(load_config(TINY, over), student, teacher, batch, "student", False)
        l1, g1, _ = _step(load_config(TINY, over + ["model.packed=true"]), student, teacher, batch, "student", False)
        assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-6) and abs(l0) > 1e-4
        assert set(g0) == set(g1) and g0 and all("lora_" in n for n in g0)
        for name in g0:
            assert rel_err(g1[name], g0[name]) < 1e-4, (kind, name)


def test_flash_attention_gets_varlen_kwargs(llama):
    """flash_attention_* backends get cu_seq_lens / max_length explicitly (CPU: only the arguments are checked)."""
    from opdx.packing import _config_holder, forward_kwargs

    b = _uneven_batch(0)
    p = pack(b.input_ids, b.attention_mask)
    model = llama["student"]
    assert "cu_seq_lens_q" not in forward_kwargs(model, p)  # sdpa: the mask comes from the position ids
    kw = forward_kwargs(_config_holder(_Engine(model)), p)
    assert kw["attention_mask"] is None and kw["use_cache"] is False and "cu_seq_lens_q" not in kw
    old = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        kw = forward_kwargs(_config_holder(_Engine(model)), p)
    finally:
        model.config._attn_implementation = old
    lens = b.attention_mask.sum(1)
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["cu_seq_lens_q"].tolist() == [0] + lens.cumsum(0).tolist()
    assert kw["max_length_q"] == kw["max_length_k"] == int(lens.max())


def test_eval_packed_matches_padded(llama):
    """The held-out eval (seeded student samples; teacher and student score them) gives the same metrics packed."""
    from opdx.rollout.hf import HFRollout
    from opdx.teacher.local import LocalTeacher
    from opdx.train.evaluate import evaluate

    tok, student = llama["tok"], llama["student"]
    prompts = [tok("hello world " * (1 + 3 * i))["input_ids"] for i in range(4)]
    res = {}
    for packed in (False, True):
        cfg = load_config(TINY, ["eval.num_prompts=4", "eval.batch_size=4", f"model.packed={packed}"])
        rollout = HFRollout(student, eos_ids=[tok.eos_token_id], pad_id=tok.eos_token_id, max_new_tokens=12,
                            vocab_size=VOCAB)
        res[packed] = evaluate(cfg, rollout, LocalTeacher(llama["teacher"], packed=packed), student, prompts,
                               vocab=VOCAB, pad_id=tok.eos_token_id, device=torch.device("cpu"))
    assert res[False]["eval_reverse_kl"] > 0.01
    for k, v in res[False].items():
        assert res[True][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_config_key():
    assert load_config(TINY, []).model.packed is False
    assert load_config(TINY, ["model.packed=true"]).model.packed is True


# ------------------------------------------------------------------------------------------------- trainer run
def test_packed_run_zero3_teacher_zero3(tiny, tmp_path):  # noqa: F811
    """2 processes, model.packed=true: student (ZeRO-3) and ZeRO-3 teacher score packed (the probe is a collective),
    student/teacher/dataset sources and the sft term; generation stays padded."""
    out = tmp_path / "packed"
    p = torchrun(tiny, out, "model.packed=true", "train.max_steps=3", "loss.lmbda=0.5", "loss.seq_kd=true",
                 "loss.sft_alpha=0.1", "deepspeed.zero_stage=3", "teacher.deepspeed=true", "eval.every=0",
                 "save.final=false", "log.plot=false", timeout=420)
    assert "model.packed=true: padding-free scoring forwards (student and teacher" in p.stdout
    _finite_run(out, 3)
