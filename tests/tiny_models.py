"""Private stand-in for tests: a tiny random Llama teacher/student pair with a local byte-level BPE tokenizer
(ChatML chat template, pad == eos, head_dim 32). Used until opdx.models.make_tiny_models is available."""

from __future__ import annotations

import json
import os

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Add 2 and 3. The answer is 5.", "Write a haiku about the sea.", "List three colors: red, green, blue.",
    "Translate hello to Spanish: hola.", "Explain why the sky is blue in one sentence.",
    "Name a prime number bigger than ten: 11.", "Summarize: cats sleep a lot and like warm places.",
] * 4


def make_tokenizer(out_dir: str, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|im_end|>", unk_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out_dir)
    return hf


def make_tiny_pair(out_dir: str, *, seed: int = 0, teacher_vocab_pad: int = 64, different_tokenizer: bool = False):
    """(teacher_dir, student_dir). The teacher's vocab is padded to a multiple of `teacher_vocab_pad` so the
    trainer's vocab alignment is exercised."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t_dir, s_dir = os.path.join(out_dir, "teacher"), os.path.join(out_dir, "student")
    if os.path.isfile(os.path.join(s_dir, "config.json")) and os.path.isfile(os.path.join(t_dir, "config.json")):
        return t_dir, s_dir
    tok = make_tokenizer(s_dir)
    v = len(tok)
    for d, layers, vocab, sd in ((t_dir, 2, -(-v // teacher_vocab_pad) * teacher_vocab_pad, seed),
                                 (s_dir, 1, v, seed + 1)):
        torch.manual_seed(sd)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4.0 if p.dim() > 1 else 1.0)  # sharper distributions: a visible, learnable KL
        model.save_pretrained(d)
    if different_tokenizer:
        make_tokenizer(t_dir, vocab_size=280)
    else:
        tok.save_pretrained(t_dir)
    return t_dir, s_dir


def write_prompts(path: str, n: int = 24, *, long_prompt: bool = False):
    words = ["apple", "river", "seven", "blue", "quick", "paris", "number", "sleep", "write", "color"]
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(words[(i * 3 + j) % len(words)] for j in range(3 + i % 4)) + "?"
            if long_prompt and i == n - 1:
                prompt = " ".join(words * 40)
            f.write(json.dumps({"prompt": prompt, "response": f"the answer is {i % 7}", "answer": str(i % 7),
                                "category": "test"}) + "\n")
    return path
