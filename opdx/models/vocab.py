"""A student with another tokenizer, made from a real pretrained model: its byte-level BPE vocabulary cut to the first
``vocab_size`` ids (and the merges that stay inside them), its embedding and lm_head cut to the same rows. The cut
tokenizer splits text into more, shorter tokens than the teacher's, so student and teacher tokenize every completion
differently: a cross-tokenizer pair (loss.kind=uld / gold) with pretrained weights on both sides, built offline.

    python -m opdx.models truncate-vocab SRC_MODEL_DIR OUT_DIR --vocab-size 32768
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def truncated_tokenizer(model_dir: str | os.PathLike, vocab_size: int):
    """The tokenizer of ``model_dir`` (a byte-level BPE ``tokenizer.json``) restricted to its first ``vocab_size``
    ids and the merges whose pieces and result stay inside them, with the same specials and chat template. The
    special tokens must lie below ``vocab_size``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from opdx.models.loading import load_tokenizer

    source = load_tokenizer(model_dir)
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{model_dir}/tokenizer.json is not a BPE tokenizer: cannot cut its vocabulary")
    specials = [t for t in source.all_special_ids if t >= vocab_size]
    if specials:
        raise ValueError(f"vocab_size={vocab_size} would drop the special token ids {specials}; keep them")
    vocab = {piece: i for piece, i in spec["model"]["vocab"].items() if i < vocab_size}
    pairs = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in pairs if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < vocab_size]
    spec["post_processor"] = None  # ByteLevel offsets untrimmed (byte alignment needs every byte covered)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  eos_token=source.eos_token, pad_token=source.pad_token, bos_token=source.bos_token,
                                  unk_token=source.unk_token)
    tok.chat_template = source.chat_template
    return tok


def truncate_vocabulary(model_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int) -> str:
    """Writes ``model_dir``'s causal LM with its vocabulary cut to ``vocab_size`` (`truncated_tokenizer`; the
    embedding and an untied lm_head keep their first rows) to ``out_dir``; returns it. Idempotent: an existing
    ``out_dir`` with the same source and size is reused."""
    import torch

    from opdx.models.loading import load_causal_lm

    out = Path(out_dir)
    stamp = {"source": str(Path(model_dir).resolve()), "vocab_size": int(vocab_size)}
    marker = out / "opdx_truncated.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return str(out)
    tok = truncated_tokenizer(model_dir, vocab_size)
    model = load_causal_lm(model_dir, dtype=torch.float32)
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} exceeds the model's {model.get_input_embeddings().weight.shape[0]} "
                         "embedding rows")
    model.resize_token_embeddings(vocab_size)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "opdx_truncated.json").write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out)
