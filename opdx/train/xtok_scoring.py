"""The teacher side of cross-tokenizer distillation (loss.kind=uld / gold, docs/cross-tokenizer.md).

`CrossTokenizerTeacher` wraps the local teacher, which has its own tokenizer. For a student batch it

1. re-tokenizes every completion for the teacher: the teacher's encoding of the same prompt text (its own chat
   template, `teacher_prompt_map`) + the completion's bytes (the student's tokens spelled out exactly,
   `opdx.xtok.tokens.completion_bytes`) tokenized by the teacher + the teacher's EOS where the student's
   completion ended with its EOS;
2. aligns the two tokenizations of each completion by UTF-8 byte offsets (`opdx.xtok.align`);
3. scores its own sequence (full logits at its completion positions) and merges them into one distribution per
   aligned group (`opdx.xtok.losses.merge_groups`), returned as a `CrossTokenizerSignal`.

For loss.seq_kd the direction reverses (`CrossTokenizerTeacher.generate`): the teacher generates from its own
prompt encoding and its completion's bytes are tokenized for the student (+ the student's EOS), through the same
`retokenize`; the student batch is then scored as above.

Sampled bytes that are not valid UTF-8 (a student that split a character) reach the teacher as U+FFFD, one per
byte (`opdx.xtok.align.decode_bytes`); they stay aligned in the student's byte positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opdx.config import Config, ConfigError
from opdx.config_checks import CROSS_TOKENIZER_KINDS
from opdx.data import Batch, build_batch, encode_examples
from opdx.rollout.batch import RolloutBatch, batch_from_completions
from opdx.xtok import Alignment, GroupedSide, VocabMap, align_byte_ends, ids_byte_ends, merge_groups, token_byte_ends
from opdx.xtok.align import decode_bytes
from opdx.xtok.tokens import completion_bytes


@dataclass
class CrossTokenizerSignal:
    """What the cross-tokenizer teacher returns for a student batch. student_groups ``[Ns]``: the batch-global
    group of each trained student token (row-major over the batch's loss_mask); teacher: the teacher's merged
    distribution per group (detached); teacher_group_logp ``[G]``: the teacher's log-probability of the group's
    text as it tokenized it (sum over its tokens in the group); vocab_map: the string-matched ids (gold)."""

    student_groups: torch.Tensor
    num_groups: int
    teacher: GroupedSide | None
    teacher_group_logp: torch.Tensor
    vocab_map: VocabMap | None = None


def group_sums(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[G]`` float32 sums of per-token ``values`` ``[N]`` over their groups ``[N]``."""
    return torch.zeros(num_groups, dtype=torch.float32, device=values.device).index_add(0, groups, values.float())


def group_kl_sums(student_token_logp: torch.Tensor, signal: CrossTokenizerSignal) -> tuple[float, float, int]:
    """(k1 sum, k3 sum, groups): estimates of the per-group reverse KL on student samples. Per group g with text x_g,
    k1 = log P_S(x_g) − log P_T(x_g) (each side's log-probability of the tokens it spells x_g with: the student's
    sampled ones, the teacher's re-tokenization), k3 = (r − 1) − log r with r = P_T(x_g) / P_S(x_g).
    ``student_token_logp`` ``[Ns]``: the student's log-probability of each trained token (detached)."""
    s = group_sums(student_token_logp.detach(), signal.student_groups, signal.num_groups)
    log_ratio = signal.teacher_group_logp.to(s.device) - s
    k3 = torch.expm1(log_ratio.clamp(max=30.0)) - log_ratio
    return float(-log_ratio.sum()), float(k3.sum()), signal.num_groups


def _rows(batch: Batch) -> list[list[int]]:
    """The trained (completion) target ids of each row, in order."""
    return [row[mask].tolist() for row, mask in zip(batch.targets.cpu(), batch.loss_mask.cpu())]


def _append_eos(ids, ends, lengths, has_eos: torch.Tensor, eos_id: int):
    """Re-tokenized tokens + the target side's EOS (0 bytes: it joins the row's last group) on the rows in
    ``has_eos``."""
    rows = torch.nonzero(has_eos)[:, 0]
    pos = lengths[rows]
    ids, ends = torch.nn.functional.pad(ids, (0, 1)), torch.nn.functional.pad(ends, (0, 1))
    ids[rows, pos] = eos_id
    ends[rows, pos] = torch.where(pos > 0, ends[rows, (pos - 1).clamp_min(0)], 0)
    return ids, ends, lengths + has_eos.long()


def retokenize(rows: list[list[int]], source_tok, target_tok, *, source_eos: set, target_eos: int, name: str):
    """THE cross-tokenizer text path: completions ``rows`` (token ids of ``source_tok``) spelled out as their exact
    bytes (special tokens spell nothing; bytes that are not valid UTF-8 become U+FFFD, one per byte), tokenized by
    ``target_tok``, + ``target_eos`` where the row ended with one of ``source_eos``. Returns ``(ids [B, L],
    byte_ends [B, L], lengths [B])`` of the target side (byte ends in the source's byte positions, for
    `align_byte_ends`); ``name`` names the target tokenizer in errors."""
    texts, offsets = zip(*(decode_bytes(completion_bytes(source_tok, r)) for r in rows))
    ids, ends, lengths = token_byte_ends(target_tok, list(texts), name=name, byte_offsets=list(offsets))
    has_eos = torch.tensor([bool(r) and r[-1] in source_eos for r in rows])
    return _append_eos(ids, ends, lengths, has_eos, target_eos)


def _through_first_eos(ids: list[int], eos: set) -> list[int]:
    """A completion cut after its first EOS (re-tokenized text may spell an EOS token's string inside it)."""
    return next((ids[:j + 1] for j, i in enumerate(ids) if i in eos), ids)


class CrossTokenizerTeacher:
    """A teacher with its own tokenizer scoring student batches: local (`opdx.teacher.local.LocalTeacher`, full
    logits) or a server (`opdx.teacher.server.ServerTeacher`, ``topk`` > 0: its top-k log-probs)."""

    def __init__(self, teacher, *, student_tokenizer, teacher_tokenizer, teacher_prompts: dict, vocab: int,
                 student_eos_ids, rule: str = "observed", vocab_map: VocabMap | None = None, topk: int = 0):
        self.teacher, self.student_tok, self.teacher_tok = teacher, student_tokenizer, teacher_tokenizer
        self.topk = int(topk)  # > 0: a server teacher, known by its top-k log-probs (opdx.xtok.topk_teacher)
        self.prompts, self.vocab, self.rule, self.vocab_map = teacher_prompts, vocab, rule, vocab_map
        self.student_eos_ids = [int(e) for e in student_eos_ids]
        self.student_eos = set(self.student_eos_ids)
        self.eos_id = int(teacher_tokenizer.eos_token_id)
        self.pad_id = int(teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None
                          else self.eos_id)

    def _teacher_prompt(self, prompt_ids, row: int) -> list[int]:
        key = tuple(prompt_ids)
        if key not in self.prompts:
            raise ValueError(f"row {row}: no teacher encoding of this prompt; the cross-tokenizer teacher scores and "
                             "generates for prompts of data.train / data.eval only (encoded once by "
                             "teacher_prompt_map)")
        return self.prompts[key]

    def teacher_batch(self, batch: Batch) -> tuple[Batch, Alignment]:
        """The teacher's tokenization of the batch (prompt + re-tokenized completion) and the byte alignment of the
        two sides' completion tokens."""
        rows = _rows(batch)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        s_ids = torch.zeros(len(rows), max(map(len, rows), default=0), dtype=torch.int64)
        for b, r in enumerate(rows):
            s_ids[b, :len(r)] = torch.tensor(r, dtype=torch.int64)
        s_ends = ids_byte_ends(self.student_tok, s_ids, lengths, name="the student tokenizer")
        t_ids, t_ends, t_len = retokenize(rows, self.student_tok, self.teacher_tok, source_eos=self.student_eos,
                                          target_eos=self.eos_id, name="the teacher tokenizer")
        alignment = align_byte_ends(s_ends, t_ends, lengths, t_len)
        prompts = [self._teacher_prompt(batch.input_ids[b, :batch.prompt_lens[b]].tolist(), b)
                   for b in range(len(rows))]
        completions = [t_ids[b, :t_len[b]].tolist() for b in range(len(rows))]
        device = getattr(self.teacher, "device", batch.input_ids.device)  # a server teacher has none
        return build_batch(prompts, completions, self.pad_id).to(device), alignment

    @torch.no_grad()
    def generate(self, prompts, *, seed: int, max_new_tokens: int, temperature: float, top_p: float, eos_ids,
                 pad_id: int, synced_gpus: bool = False, vocab_size: int | None = None) -> RolloutBatch:
        """`LocalTeacher.generate` in the student's tokens (loss.seq_kd, the eval's teacher references): the teacher
        generates from its own encoding of each prompt (its chat template, its EOS, its vocabulary), and its
        completions come back re-tokenized for the student (`retokenize`), ending with the student's EOS where the
        teacher stopped. ``prompts``, ``eos_ids`` and ``pad_id`` are the student's; ``vocab_size`` (the student's) is
        not used. The returned batch has no sampling logprobs (they were the teacher's, of its own tokens)."""
        t_prompts = [self._teacher_prompt(p, b) for b, p in enumerate(prompts)]
        rb = self.teacher.generate(t_prompts, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, eos_ids=[self.eos_id], pad_id=self.pad_id, synced_gpus=synced_gpus,
                                   vocab_size=self.vocab)
        s_ids, _, s_len = retokenize(rb.completions(), self.teacher_tok, self.student_tok, source_eos={self.eos_id},
                                     target_eos=int(list(eos_ids)[0]), name="the student tokenizer")
        eos = set(int(e) for e in eos_ids)
        completions = [_through_first_eos(s_ids[b, :s_len[b]].tolist(), eos) for b in range(len(prompts))]
        finish = ["stop" if c and c[-1] in eos else "length" for c in completions]
        return batch_from_completions(prompts, completions, None, finish, pad_id=pad_id, eos_ids=eos)

    @torch.no_grad()
    def score(self, batch: Batch, kind: str = "gjsd", *, vocab_size: int = 0, temperature: float = 1.0,
              topk: int = 0) -> CrossTokenizerSignal:
        """The teacher's merged distribution per aligned group: from its full logits at its completion positions
        (a local teacher, over its own vocabulary) or from its top-k log-probs there (a server teacher,
        `opdx.xtok.topk_teacher`). ``kind`` / ``vocab_size`` / ``topk`` of the same-tokenizer API are not used."""
        from opdx.ops import token_logprobs

        t_batch, alignment = self.teacher_batch(batch)
        s_groups, t_groups, n = alignment.flat()
        device = batch.input_ids.device
        if self.topk:
            side, observed = self._topk_side(t_batch, t_groups, n, temperature)
        else:
            logits = self.teacher.score(t_batch, "gjsd", vocab_size=self.vocab, temperature=temperature).logits
            targets = t_batch.targets[t_batch.loss_mask]
            observed = token_logprobs(logits, targets, temperature=temperature)
            side = merge_groups(logits, targets, t_groups.to(logits.device), n, rule=self.rule,
                                temperature=temperature, name="teacher", observed=observed)
        logp = group_sums(observed, t_groups.to(observed.device), n)
        return CrossTokenizerSignal(s_groups.to(device), n, side, logp.to(device), self.vocab_map)

    def _topk_side(self, t_batch: Batch, t_groups: torch.Tensor, n: int, temperature: float):
        """(`TopSide`, observed log-probs ``[Nt]``) of a server teacher's top-``self.topk`` at its positions."""
        from opdx.xtok.topk_teacher import merge_topk_groups

        sig = self.teacher.score(t_batch, "topk", vocab_size=self.vocab, temperature=temperature, topk=self.topk)
        observed = sig.token_logprobs[t_batch.loss_mask.to(sig.token_logprobs.device)]
        groups = t_groups.to(observed.device)
        return merge_topk_groups(observed, sig.topk_ids, sig.topk_logprobs, groups, n, rule=self.rule), observed

    @torch.no_grad()
    def group_logprobs(self, batch: Batch, temperature: float = 1.0) -> CrossTokenizerSignal:
        """Only the teacher's log-probability of each group's text (token logprobs, no full rows): the held-out
        metric (`group_kl_sums`)."""
        t_batch, alignment = self.teacher_batch(batch)
        s_groups, t_groups, n = alignment.flat()
        t_logp = self.teacher.score(t_batch, "opd", vocab_size=self.vocab, temperature=temperature).token_logprobs
        logp = group_sums(t_logp[t_batch.loss_mask], t_groups.to(t_logp.device), n)
        return CrossTokenizerSignal(s_groups.to(batch.input_ids.device), n, None, logp.to(batch.input_ids.device))


# ------------------------------------------------------------------------------------------------ set-up
def check_teacher_tokenizer(cfg: Config, teacher_tok, teacher_dir: str) -> None:
    """What the re-tokenization needs from the teacher's tokenizer: offsets (a fast tokenizer), an EOS, and a chat
    template when data.chat_template is on."""
    where = f"the teacher tokenizer in {teacher_dir}"
    if not getattr(teacher_tok, "is_fast", False):
        raise ConfigError(f"{where} is not a fast tokenizer (no offset mapping): loss.kind={cfg.loss.kind} aligns "
                          "the two tokenizations by byte offsets; give the teacher a tokenizer.json")
    if teacher_tok.eos_token_id is None:
        raise ConfigError(f"{where} has no eos_token; set one (the student's EOS is re-tokenized as it)")
    if cfg.data.chat_template and not getattr(teacher_tok, "chat_template", None):
        raise ConfigError(f"{where} has no chat template (the prompts are re-encoded with it); add one to its "
                          "tokenizer_config.json or set data.chat_template=false")


def teacher_prompt_map(cfg: Config, teacher_tok, *sets) -> dict:
    """{student prompt ids: teacher prompt ids} over ``sets`` of (examples, their student-encoded prompts): the
    same prompt text encoded with each side's own chat template."""
    d, out = cfg.data, {}
    for what, (examples, student_prompts) in zip(("data.train", "data.eval"), sets):
        teacher_prompts, _ = encode_examples(
            teacher_tok, examples, chat_template=d.chat_template, system_prompt=d.system_prompt,
            max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
            eos_id=int(teacher_tok.eos_token_id), what=f"{what} (teacher tokenizer)")
        out.update({tuple(s): t for s, t in zip(student_prompts, teacher_prompts)})
    return out


def cross_tokenizer_teacher(cfg: Config, teacher, data: Any, teacher_model) -> CrossTokenizerTeacher:
    """The teacher wrapped for loss.kind=uld / gold (``data``: opdx.train.build.Data with the teacher's tokenizer
    and prompt map): a local one (``teacher_model``) or a server teacher (``teacher_model`` None: it returns its
    top-``teacher.topk`` log-probs, loss.uld_topm as build_server_teacher set it); gold builds the string-match
    vocabulary map (cached per tokenizer pair)."""
    from opdx.models import aligned_vocab_size
    from opdx.xtok import build_vocab_map

    assert cfg.loss.kind in CROSS_TOKENIZER_KINDS, cfg.loss.kind
    try:  # a server teacher (teacher_model None): its vocabulary is its tokenizer's
        vocab = len(data.teacher_tokenizer) if teacher_model is None else \
            int(aligned_vocab_size(data.teacher_tokenizer, teacher_model))
    except ValueError as exc:
        raise ConfigError(f"teacher vocabulary mismatch: {str(exc).splitlines()[0]}") from None
    vocab_map = None
    if cfg.loss.kind == "gold":
        vocab_map = build_vocab_map(data.tokenizer, data.teacher_tokenizer, cache_dir=cfg.model.cache_dir or None)
        if len(vocab_map) == 0:
            raise ConfigError("loss.kind=gold: no token string matches between the student's and the teacher's "
                              "vocabularies; use loss.kind=uld")
    return CrossTokenizerTeacher(teacher, student_tokenizer=data.tokenizer, teacher_tokenizer=data.teacher_tokenizer,
                                 teacher_prompts=data.teacher_prompts, vocab=vocab, student_eos_ids=data.eos_ids,
                                 rule=cfg.loss.merge_rule, vocab_map=vocab_map,
                                 topk=teacher.topk if teacher_model is None else 0)
