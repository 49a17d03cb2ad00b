"""Cross-tokenizer test helpers: two tiny byte-level BPE tokenizers with different vocab sizes and merges (built
offline), and a plain Python reference of the byte alignment (also the benchmark's baseline)."""

from __future__ import annotations

import functools

# Two different training texts, so the merges differ (not only the vocabulary size). Both hold multi-byte UTF-8
# (accents, emoji) often enough that some multi-byte characters become single tokens on one side only.
_CORPUS_A = """\
The quick brown fox jumps over the lazy dog. héllo wörld, café au lait, naïve façade.
I ❤️ 🍕 and I ❤️ pasta. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. The answer is 42.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))
""" * 3

_CORPUS_B = """\
Hello world! Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 🍕🍕 pizza time 🎉.
Le cœur a ses raisons que la raison ne connaît point. ❤️ ❤️ love.  Spaces   and\ttabs\n\nnewlines.
SELECT name FROM users WHERE id = 7; -- query
""" * 3


@functools.lru_cache(maxsize=None)
def make_xtok_tokenizers():
    """(student_tokenizer, teacher_tokenizer): byte-level BPE + ChatML specials, vocab 300 trained on one text and
    420 on another (different merges). Deterministic; transformers fast tokenizers (offset mapping available)."""
    return _byte_bpe(300, _CORPUS_A), _byte_bpe(420, _CORPUS_B)


def _byte_bpe(vocab_size: int, corpus: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from opdx.models import CHATML_TEMPLATE, SPECIAL_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([corpus], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def align_reference(student_ends: list[int], teacher_ends: list[int]) -> tuple[list[int], list[int]]:
    """Plain Python two-pointer alignment of one row: walk both token lists in byte order; a group closes when both
    sides have covered exactly the same bytes. Returns the group id of every student and teacher token."""
    s_groups, t_groups = [0] * len(student_ends), [0] * len(teacher_ends)
    i = j = group = 0
    s_pos = t_pos = 0
    inf = float("inf")
    while i < len(student_ends) or j < len(teacher_ends):
        end = min(student_ends[i] if i < len(student_ends) else inf, teacher_ends[j] if j < len(teacher_ends) else inf)
        while i < len(student_ends) and student_ends[i] == end:
            s_groups[i], s_pos, i = group, end, i + 1
        while j < len(teacher_ends) and teacher_ends[j] == end:
            t_groups[j], t_pos, j = group, end, j + 1
        if s_pos == t_pos == end:
            group += 1
    return s_groups, t_groups
