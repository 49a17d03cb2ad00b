"""The memory tables of docs/scaling.md, computed from parameter counts (run: ``python docs/scaling_table.py``).

Parameter counts come from each model's published architecture (hidden size, layers, MLP width, heads, KV heads,
vocab, tied embeddings, q/k/v biases), counted layer by layer here; the bytes per parameter are those of mixed
precision AdamW training under DeepSpeed ZeRO (the ZeRO paper's accounting, K = 12):

    bf16 weights 2 B + bf16 gradients 2 B + fp32 optimizer states 12 B (master weights 4, Adam m 4, Adam v 4)
    ZeRO-0: everything replicated      ZeRO-1: optimizer states / N
    ZeRO-2: + gradients / N            ZeRO-3: + weights / N          (N = data-parallel GPUs)

Activations, the rollout engine's KV cache, the teacher and framework buffers come on top (not in the table).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    layers: int
    mlp: int  # intermediate size of the gated MLP (gate, up, down)
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        attn = self.hidden * (self.hidden + 2 * kv) + self.hidden * self.hidden  # q, k, v, o projections
        attn += (self.hidden + 2 * kv) if self.qkv_bias else 0
        layer = attn + 3 * self.hidden * self.mlp + 2 * self.hidden  # + 2 RMSNorm weights
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embed + self.hidden  # + the final norm


MODELS = [
    Arch("Qwen2.5-0.5B", 896, 24, 4864, 14, 2, 151936, tied=True, qkv_bias=True),
    Arch("Qwen2.5-1.5B", 1536, 28, 8960, 12, 2, 151936, tied=True, qkv_bias=True),
    Arch("Qwen2.5-7B", 3584, 28, 18944, 28, 4, 152064, tied=False, qkv_bias=True),
    Arch("Llama-3.1-70B", 8192, 80, 28672, 64, 8, 128256, tied=False, qkv_bias=False),
]
GPUS = (1, 8, 16, 64)
WEIGHTS, GRADS, OPTIM = 2, 2, 12  # bytes per parameter (bf16, bf16, fp32 master + Adam m + v)


def bytes_per_param(stage: int, n: int) -> float:
    """Training-state bytes per parameter on each of ``n`` data-parallel GPUs under ZeRO ``stage``."""
    w = WEIGHTS / n if stage >= 3 else WEIGHTS
    g = GRADS / n if stage >= 2 else GRADS
    o = OPTIM / n if stage >= 1 else OPTIM
    return w + g + o


def training_table() -> str:
    head = "| student | params | ZeRO | " + " | ".join(f"N={n}" for n in GPUS) + " |"
    lines = [head, "|" + "---|" * (3 + len(GPUS))]
    for m in MODELS:
        p = m.params()
        for stage in range(4):
            cells = [f"{p * bytes_per_param(stage, n) / GIB:,.1f}" for n in GPUS]
            lines.append(f"| {m.name} | {p / 1e9:.2f} B | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def inference_table() -> str:
    """bf16 weights per GPU of a teacher (or a vLLM engine) split over tensor-parallel GPUs."""
    tps = (1, 2, 4, 8)
    lines = ["| model | bf16 weights | " + " | ".join(f"TP={t}" for t in tps) + " |", "|" + "---|" * (2 + len(tps))]
    for m in MODELS:
        total = m.params() * WEIGHTS / GIB
        lines.append(f"| {m.name} | {total:,.1f} | " + " | ".join(f"{total / t:,.1f}" for t in tps) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("Training state per GPU, GiB (bf16 weights and gradients, fp32 AdamW states; no activations):\n")
    print(training_table())
    print("\nWeights per GPU for inference (teacher server or vLLM engine), GiB (no KV cache):\n")
    print(inference_table())
