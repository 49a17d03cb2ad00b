"""Tiny random models for tests and smoke runs: `make_tiny_tokenizer`, `make_tiny_models` (pad == eos like SmolLM2)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# ChatML, as SmolLM2 uses it (without SmolLM2's default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 like SmolLM2


_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns from a larger teacher model.
What is the capital of France? The capital of France is Paris. Explain photosynthesis in one sentence.
Plants use sunlight, water and carbon dioxide to make sugar and oxygen. Write the word apple in uppercase.
Reply with only the number. 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 42 50 99 100 1000
List three fruits: apples, bananas, oranges. Rewrite this sentence more formally. Give one tip for sleeping better.
user assistant system You are a helpful assistant. Hello! How can I help you today? Thank you.
"""


def _shipped_prompt_text() -> list[str]:
    data = Path(__file__).resolve().parents[2] / "examples" / "data"
    texts: list[str] = []
    for name in ("prompts_train.jsonl", "prompts_eval.jsonl"):
        p = data / name
        if p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    texts.append(rec.get("prompt") or "")
                    texts.append(rec.get("response") or "")
    return texts


def make_tiny_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer (any text encodes) with SmolLM2's special tokens at ids 0..2
    (`<|endoftext|>` = unk, `<|im_start|>` = bos, `<|im_end|>` = eos = pad), a ChatML chat template, trained on a
    built-in corpus plus the shipped prompt files. Deterministic; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise ValueError(f"vocab_size must be >= {n_min} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                         f"got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_TINY_CORPUS, *_shipped_prompt_text()], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 512
    return tok


def make_tiny_models(out_dir: str | os.PathLike, *, seed: int = 0, vocab_size: int = 512,
                     model_vocab_size: int | None = None) -> tuple[str, str]:
    """Writes a tiny random Llama teacher (2 layers) and student (1 layer) with a shared tokenizer.

    hidden 64, 2 heads of dim 32 (vLLM's CPU attention needs head_dim >= 32), 1 KV head, intermediate 128, tied
    embeddings, pad == eos like the demo model. `model_vocab_size` (default: the tokenizer's size) pads the model
    vocabulary beyond the tokenizer's, as Qwen-style checkpoints do. The teacher is initialized with a larger
    std than the student so its next-token distributions are peaked (a meaningful distillation target).
    Deterministic for a seed; loads offline with `from_pretrained(dir)`. Returns (teacher_dir, student_dir).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = make_tiny_tokenizer(vocab_size)
    n_tok = len(tok)
    model_vocab = n_tok if model_vocab_size is None else int(model_vocab_size)
    if model_vocab < n_tok:
        raise ValueError(f"model_vocab_size={model_vocab} is smaller than the tokenizer ({n_tok} tokens)")
    dirs = []
    for name, layers, init_std, sub_seed in (("teacher", 2, 0.2, 0), ("student", 1, 0.02, 1)):
        cfg = LlamaConfig(vocab_size=model_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                          rms_norm_eps=1e-5, initializer_range=init_std, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, rope_theta=10000.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + sub_seed)
            model = LlamaForCausalLM(cfg).to(torch.float32)
        cfg._name_or_path = f"opdx-tiny-{name}"
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
        d = out / name
        model.save_pretrained(str(d))
        tok.save_pretrained(str(d))
        dirs.append(str(d))
    return dirs[0], dirs[1]
