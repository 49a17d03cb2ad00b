"""The training objectives: one class per ``loss.kind`` behind one interface.

    objective = make_objective(cfg, vocab, fused=...)
    spec = objective.signal_spec()                       # what the teacher must return for it
    signal = teacher_signal(teacher, batch, spec, vocab)
    view = objective.student_view(engine, batch)         # how the student is scored (opdx.train.scoring)
    loss, stats = objective.loss(view, signal, batch, source, rollout=None)
    # or both steps at once: objective.compute(engine, batch, signal, source, rollout=None, raw_logp=False)

``rollout`` is the student's `RolloutBatch` when it generated the sequences (its ``sampling_logprobs`` are the
rollout engine's per-token logprobs, for objectives that correct for the sampler). Every objective adds the
``loss.sft_alpha`` cross-entropy term on non-student sequences the same way, and the k1/k3 reverse-KL statistics
are measured once, by `token_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdx.config import Config
from opdx.data import Batch
from opdx.losses import opd_is_loss, opd_loss, reverse_kl_estimates, sft_loss, topk_loss
from opdx.train.scoring import student_view


@dataclass(frozen=True)
class SignalSpec:
    """What the teacher must return: ``"token_logprobs"`` (of the targets), ``"logits"`` (full rows at the trained
    positions), or ``"topk"`` (top-k ids/logprobs + token logprobs). ``hidden``: the teacher scores from its final
    hidden states and lm_head rows (opdx.ops.linear_*) and returns those instead of [N, V] logits."""

    returns: str
    temperature: float = 1.0
    topk: int = 0
    hidden: bool = False

    @property
    def teacher_kind(self) -> str:  # the teacher API (opdx.teacher) names the signal after the loss that needs it
        return {"token_logprobs": "opd", "logits": "gjsd", "topk": "topk"}[self.returns]


def teacher_signal(teacher, batch, spec: SignalSpec, vocab: int):
    return teacher.score(batch, spec.teacher_kind, vocab_size=vocab, temperature=spec.temperature, topk=spec.topk)


@dataclass
class TokenStats:
    """Per-batch statistics of an objective: sums of the k1 / k3 estimates of KL(student || teacher) over ``n``
    trained tokens, the ``batch`` cut to the scored target positions and, when asked for, ``student_logp`` [B, T]
    (detached temperature-1 student logprobs over all lm_head rows, for the rollout logprob mismatch)."""

    k1_sum: float
    k3_sum: float
    n: float
    batch: Batch
    student_logp: torch.Tensor | None = None
    top1_agree: float | None = None
    is_ratio_sum: float = 0.0  # opd: sums over the n tokens of the importance ratio and of its clipped indicator
    is_clip_sum: float = 0.0

    def as_dict(self) -> dict:
        out = {"k1_sum": self.k1_sum, "k3_sum": self.k3_sum, "n": self.n, "batch": self.batch}
        if self.student_logp is not None:
            out["student_logp"] = self.student_logp
        return out


def token_stats(s_logp, t_logp, mask, batch, *, student_logp=None, student_top1=None, teacher_top1=None):
    """THE one place the k1 / k3 reverse-KL estimates (and the top-1 agreement, given both argmaxes at the masked
    positions) are measured."""
    _, k3, k1_sum, n = reverse_kl_estimates(s_logp.detach(), t_logp, mask)
    agree = float((student_top1 == teacher_top1).sum()) if student_top1 is not None else None
    return TokenStats(k1_sum=float(k1_sum), k3_sum=float(k3) * float(n), n=float(n), batch=batch,
                      student_logp=student_logp, top1_agree=agree)


def sampler_logprobs(rollout, view) -> torch.Tensor | None:
    """The rollout engine's logprobs of the sampled tokens (``rollout.sampling_logprobs`` [B, T_completion]) placed
    at the view's trained target positions [B, T]; None when the sequences were not sampled by the student."""
    if rollout is None or rollout.sampling_logprobs is None:
        return None
    mask = view.mask
    generated = rollout.completion_mask.to(mask.device)
    if not torch.equal(mask.sum(1), generated.sum(1)):
        raise RuntimeError(f"sampler logprobs: {generated.sum(1).tolist()} generated tokens per row but "
                           f"{mask.sum(1).tolist()} trained targets")
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[mask] = rollout.sampling_logprobs.to(mask.device).float()[generated]
    return out


class Objective:
    """Base: the configured loss section, the vocabulary, and how the student is scored (``view``)."""

    kind = ""
    returns = "token_logprobs"  # what signal_spec asks the teacher for
    fused_view = True  # loss.fused_linear may score the student from hidden states + lm_head (else: full logits)

    def __init__(self, cfg: Config, vocab: int, view: str = "logits"):
        self.loss_cfg, self.vocab, self.view, self.packed = cfg.loss, vocab, view, cfg.model.packed
        self.temperature = cfg.loss.temperature

    def signal_spec(self) -> SignalSpec:
        return SignalSpec(self.returns, temperature=self.temperature, topk=self.loss_cfg.topk,
                          hidden=self.view == "fused_linear")

    def student_view(self, engine, batch, *, raw_logp: bool = False):
        return student_view(self.view, engine, batch, vocab=self.vocab, packed=self.packed, raw_logp=raw_logp)

    def wants_sft(self, source: str) -> bool:
        """The loss.sft_alpha cross-entropy term: only on sequences the student did not generate."""
        return self.loss_cfg.sft_alpha > 0 and source != "student"

    def loss(self, view, signal, batch, source: str, rollout=None):
        raise NotImplementedError

    def _finish(self, view, signal, loss, s_logp, sft: bool, t_logp=None):
        """+ the sft term (``s_logp`` with grad), and the statistics."""
        if sft:
            loss = loss + self.loss_cfg.sft_alpha * sft_loss(s_logp, view.mask)
        if t_logp is None:
            t_logp = view.teacher_token_logprobs(signal, self.temperature)
        raw = view.raw_logprobs() if view.want_raw else None
        return loss, token_stats(s_logp, t_logp, view.mask, view.batch, student_logp=raw)

    def compute(self, engine, batch, signal, source: str, *, rollout=None, raw_logp: bool = False):
        """Score the student and compute the loss on one batch: (loss tensor, TokenStats)."""
        view = self.student_view(engine, batch, raw_logp=raw_logp)
        return self.loss(view, signal, batch, source, rollout=rollout)


class OPD(Objective):
    """On-policy distillation with the per-token reverse-KL advantage of the sampled token (Tinker's recipe,
    opdx.losses.opd_is_loss): A_t = -kl_coef·(log q(x_t) - log π_T(x_t)) from the rollout engine's own logprobs q,
    importance ratio exp(log π_θ - log q), optionally PPO-clipped (loss.is_clip) and discounted (loss.discount).
    Sequences the student did not sample have no q: ratio 1 (q = the trainer's own detached logprobs).
    ``loss.normalize_reward=true``: the normalized REINFORCE of opdx.losses.opd_loss instead."""

    kind = "opd"

    def loss(self, view, signal, batch, source, rollout=None):
        c = self.loss_cfg
        s_logp = view.token_logprobs(self.temperature)
        t_logp = view.teacher_token_logprobs(signal, self.temperature)
        if c.normalize_reward:
            loss, is_stats = opd_loss(s_logp, t_logp, view.mask, normalize=True)[0], None
        else:
            policy = self._policy_logprobs(view, s_logp)
            q = sampler_logprobs(rollout, view)
            q = policy.detach() if q is None else q
            loss, is_stats = opd_is_loss(policy, q, t_logp, view.mask, kl_coef=c.kl_coef, discount=c.discount,
                                         is_clip=c.is_clip, baseline=c.baseline)
        loss, stats = self._finish(view, signal, loss, s_logp, self.wants_sft(source), t_logp)
        if is_stats is not None:
            stats.is_ratio_sum = is_stats["is_ratio_mean"] * stats.n
            stats.is_clip_sum = is_stats["is_clip_frac"] * stats.n
        return loss, stats


    def _policy_logprobs(self, view, s_logp):
        """The trained policy's logprobs in the sampler's convention (temperature 1, every lm_head row, with grad):
        ``s_logp`` itself when that is what it already is."""
        rows = view.all_rows.shape[-1] if hasattr(view, "all_rows") else view.head.weight.shape[0]  # no ZeRO-3 here
        if self.temperature == 1.0 and rows == self.vocab:
            return s_logp
        return view.policy_logprobs()


class SFT(Objective):
    """Cross-entropy of the targets (teacher or dataset sequences); the sft_alpha term is not added twice."""

    kind = "sft"

    def loss(self, view, signal, batch, source, rollout=None):
        s_logp = view.token_logprobs(self.temperature)
        return self._finish(view, signal, sft_loss(s_logp, view.mask), s_logp, False)


class GJSD(Objective):
    """Generalized JSD(β) against the teacher's full next-token distribution."""

    kind = "gjsd"
    returns = "logits"

    def loss(self, view, signal, batch, source, rollout=None):
        sft = self.wants_sft(source)
        s_logp = view.token_logprobs(self.temperature) if sft else None
        loss = view.generalized_jsd(signal, self.loss_cfg.beta, self.temperature)
        if s_logp is None:
            s_logp = view.token_logprobs(self.temperature, grad=False)
        return self._finish(view, signal, loss, s_logp, sft)


class TopK(Objective):
    """Top-k renormalized KL at the teacher's top-k ids, from the student's hidden states and lm_head weight
    (opdx.ops.topk_kl), computed inside the lm_head's module call (ZeRO-3: the weight is gathered for it)."""

    kind = "topk"
    returns = "topk"

    def loss(self, view, signal, batch, source, rollout=None):
        c, sft = self.loss_cfg, self.wants_sft(source)

        def head_loss(module, h):
            w, b = module.weight, getattr(module, "bias", None)
            if c.tail:  # the tail bucket's logsumexp runs over the tokenizer's vocabulary only
                w, b = w[:self.vocab], (b[:self.vocab] if b is not None else None)
            # else the whole weight (the teacher's ids are < vocab; autograd saves the parameter itself, not a view)
            out = topk_loss(h, w, signal.topk_ids, signal.topk_logprobs, bias=b, beta=c.beta,
                            temperature=self.temperature, tail=c.tail)
            if not sft:
                return out, None
            s = view.logprobs(module, h, self.vocab, self.temperature)
            return out + c.sft_alpha * (-s.float().mean() if s.numel() else 0.0), s

        loss = view.head_call(head_loss, self.temperature)
        return self._finish(view, signal, loss, view.token_logprobs(self.temperature), False)


class MiniLLM(Objective):
    """MiniLLM (opdx.xtok.minillm.minillm_loss) on the student's samples, same tokenizer: the long-term policy
    gradient term with the detached per-token reward log π_T − log π_S of the sampled tokens (loss.gamma-discounted
    sum of the later rewards, loss.length_normalize) plus the single-step term, the full-vocabulary reverse KL at
    every position from the teacher's full logits. With loss.teacher_mix_alpha > 0 the student's rollouts were drawn
    from the teacher-mixed distribution and both terms are weighed by π_S / mixture of the sampled token."""

    kind = "minillm"
    returns = "logits"
    fused_view = False

    def mix_weights(self, view, source, rollout) -> torch.Tensor | None:
        """Importance weights π_S(y_t) / mixture(y_t) of teacher-mixed rollouts (both at temperature 1 over the
        shared vocabulary), None for plain student samples."""
        if self.loss_cfg.teacher_mix_alpha == 0 or source != "student":
            return None
        mixture = sampler_logprobs(rollout, view)
        if mixture is None:
            raise RuntimeError("loss.teacher_mix_alpha > 0 needs the teacher-mixed rollout's sampling logprobs "
                               "(opdx.rollout.mixed.TeacherMixedRollout), got a rollout without them")
        return torch.exp(view.token_logprobs(1.0, grad=False) - mixture).masked_fill(~view.mask, 0.0)

    def loss(self, view, signal, batch, source, rollout=None):
        from opdx.xtok import minillm_loss

        c = self.loss_cfg
        teacher = view.logits.new_zeros(view.logits.shape)  # [B, T, V]; only the trained positions are read
        teacher[view.mask] = signal.logits.to(teacher.dtype)
        loss, _ = minillm_loss(view.logits, teacher, view.batch.targets, view.mask, gamma=c.gamma,
                               length_normalize=c.length_normalize, temperature=self.temperature,
                               weights=self.mix_weights(view, source, rollout))
        return self._finish(view, signal, loss, view.token_logprobs(self.temperature, grad=False), False)


class CrossTokenizer(Objective):
    """Base of the cross-tokenizer kinds (a teacher with another tokenizer, opdx.train.xtok_scoring): the
    student's next-token rows are merged per aligned group like the teacher's (loss.merge_rule) and `group_loss`
    compares the two. The statistics are per-group k1 / k3 estimates (`group_kl_sums`) over the student tokens."""

    returns = "logits"
    fused_view = False

    def group_loss(self, student, signal) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, view, signal, batch, source, rollout=None):
        from opdx.train.xtok_scoring import group_kl_sums
        from opdx.xtok import merge_groups

        c, sft = self.loss_cfg, self.wants_sft(source)
        rows, targets = view.logits[view.mask], view.batch.targets[view.mask]
        if rows.shape[0] != signal.student_groups.numel():
            raise RuntimeError(f"cross-tokenizer signal: {signal.student_groups.numel()} aligned student tokens but "
                               f"{rows.shape[0]} trained targets")
        student = merge_groups(rows, targets, signal.student_groups, signal.num_groups, rule=c.merge_rule,
                               temperature=self.temperature, name="student")
        loss = self.group_loss(student, signal)
        s_logp = view.token_logprobs(self.temperature, grad=sft)
        if sft:
            loss = loss + c.sft_alpha * sft_loss(s_logp, view.mask)
        k1, k3, _ = group_kl_sums(s_logp[view.mask], signal)
        raw = view.raw_logprobs() if view.want_raw else None
        return loss, TokenStats(k1_sum=k1, k3_sum=k3, n=float(view.mask.sum()), batch=view.batch, student_logp=raw)


class ULD(CrossTokenizer):
    """Universal Logit Distillation per aligned group (opdx.xtok.uld_loss): the sorted top-loss.uld_topm merged
    probabilities of each side plus a tail bucket, Σ|Δ|^loss.uld_p."""

    kind = "uld"

    def group_loss(self, student, signal):
        from opdx.xtok import uld_loss

        return uld_loss(student, signal.teacher, top_m=self.loss_cfg.uld_topm, p=self.loss_cfg.uld_p)


class GOLD(CrossTokenizer):
    """GOLD-style hybrid (opdx.xtok.gold_loss): GJSD(loss.beta) over the string-matched sub-vocabulary, ULD over the
    rest, weighted by loss.gold_weight."""

    kind = "gold"

    def group_loss(self, student, signal):
        from opdx.config_checks import gold_matched_weight
        from opdx.xtok import TopSide, gold_loss, gold_loss_topk

        c = self.loss_cfg
        loss_fn = gold_loss_topk if isinstance(signal.teacher, TopSide) else gold_loss  # a server teacher: its top-k
        return loss_fn(student, signal.teacher, signal.vocab_map, beta=c.beta, top_m=c.uld_topm, p=c.uld_p,
                       matched_weight=gold_matched_weight(c.gold_weight))[0]


OBJECTIVES = {cls.kind: cls for cls in (OPD, SFT, GJSD, TopK, MiniLLM, ULD, GOLD)}


def make_objective(cfg: Config, vocab: int, *, fused: bool = False) -> Objective:
    """The objective for ``cfg.loss.kind``; ``fused`` (loss.fused_linear resolved) scores opd / gjsd / sft from
    hidden states and the lm_head weight; topk always works on hidden states."""
    kind = cfg.loss.kind
    if kind not in OBJECTIVES:
        raise ValueError(f"loss.kind must be one of {sorted(OBJECTIVES)}, got {kind!r}")
    view = "hidden" if kind == "topk" else ("fused_linear" if fused and OBJECTIVES[kind].fused_view else "logits")
    return OBJECTIVES[kind](cfg, vocab, view)


def distill_step(cfg: Config, engine, batch, signal, vocab: int, source: str, *, fused: bool = False,
                 raw_logp: bool = False):
    """Student forward + the configured loss on one batch: (loss tensor, stats dict with k1_sum / k3_sum / n,
    ``batch`` cut to the scored target positions and, with ``raw_logp``, ``student_logp`` [B, T])."""
    loss, stats = make_objective(cfg, vocab, fused=fused).compute(engine, batch, signal, source, raw_logp=raw_logp)
    return loss, stats.as_dict()


def rollout_mismatch_sums(rb, stats: TokenStats) -> tuple[float, float]:
    """(sum of |Δlogp|, token count) between the rollout engine's sampling logprobs and the trainer's temperature-1
    student logprobs (``stats.student_logp`` [B, T] on ``stats.batch``'s targets), over the generated tokens
    (opdx.rollout.vllm.logprob_mismatch)."""
    from opdx.rollout.vllm import logprob_mismatch

    mask, student_logp = stats.batch.loss_mask, stats.student_logp
    comp = torch.zeros(rb.completion_mask.shape, dtype=torch.float32, device=student_logp.device)
    for b in range(mask.shape[0]):
        vals = student_logp[b][mask[b]]
        n = int(rb.completion_mask[b].sum())
        if vals.shape[0] != n:
            raise RuntimeError(f"rollout row {b}: {n} generated tokens but {vals.shape[0]} trained targets")
        comp[b, :n] = vals
    count = float(rb.completion_mask.sum())
    return logprob_mismatch(rb, comp) * count, count
