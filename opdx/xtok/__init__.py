"""Distillation across tokenizers (ULD / GOLD-style) and MiniLLM: byte alignment (`align`), the bytes of vocabulary
entries (`tokens`), the merged-group losses (`losses`), the string-match vocabulary map (`vocab`) and the MiniLLM
objective (`minillm`)."""

from opdx.xtok.align import Alignment, align_byte_ends, char_to_byte_offsets, ids_byte_ends, token_byte_ends
from opdx.xtok.losses import (
    RULES,
    GroupedSide,
    gold_loss,
    group_first_and_scale,
    merge_groups,
    sorted_buckets,
    top_log_probs,
    uld_distance,
    uld_loss,
    uld_per_group,
)
from opdx.xtok.minillm import future_returns, minillm_loss
from opdx.xtok.topk_teacher import TopSide, gold_loss_topk, merge_topk_groups
from opdx.xtok.tokens import token_byte_lengths, vocab_token_bytes
from opdx.xtok.vocab import VocabMap, build_vocab_map

__all__ = [
    "RULES",
    "Alignment",
    "GroupedSide",
    "TopSide",
    "VocabMap",
    "align_byte_ends",
    "build_vocab_map",
    "char_to_byte_offsets",
    "future_returns",
    "gold_loss",
    "gold_loss_topk",
    "ids_byte_ends",
    "group_first_and_scale",
    "merge_groups",
    "merge_topk_groups",
    "minillm_loss",
    "sorted_buckets",
    "token_byte_ends",
    "token_byte_lengths",
    "top_log_probs",
    "uld_distance",
    "uld_loss",
    "uld_per_group",
    "vocab_token_bytes",
]
