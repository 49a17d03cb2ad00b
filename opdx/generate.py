"""Teacher pre-sampling: generate responses for a prompt file once, offline, into a JSONL training data file.

    python -m opdx.generate --model DIR --data prompts.jsonl --out teacher.jsonl [--engine auto|vllm|hf]
        [--n 1] [--max-new-tokens 256] [--temperature 1.0] [--top-p 1.0] [--seed 0] [--logprobs K]
        [--batch-size 32] [--chat-template/--no-chat-template] [--system-prompt S]
    torchrun --nproc-per-node 8 -m opdx.generate -- ...  # data parallel: each rank its share of the chunks
                                                         # (`--`: torchrun would take --n for one of its options)

Prompts are read and encoded exactly as training reads them (`opdx.data.load_examples` / `encode_examples`: same
chat template, same system prompt). Each output line is one sample and is directly a `data.train` file for opdx:

    {..the input record's other fields (answer, category, ...)..,
     "prompt": <the prompt text, untemplated>, "response": <the generated text, without the final EOS>,
     "response_ids": [...generated ids, through the EOS...], "finish_reason": "stop" | "length",
     "sample": <0..n-1>, "prompt_hash": <sha256 prefix of the templated prompt ids and its occurrence>,
     "generation": {"model": <dir name>, "max_new_tokens", "temperature", "top_p", "seed", "logprobs"},
     "topk_ids": [[K ids] per response token], "topk_logprobs": [[K values] per token]}   # with --logprobs K

``topk_*`` are the teacher's log-softmax top-K at each response position (temperature 1, before top-p; padded
vocabulary rows beyond the tokenizer excluded on the HF engine), sorted descending, ties to the smaller id, rounded
to 1e-6: HF records them from the logits of each generation step (`opdx.rollout.hf.HFRollout(top_logprobs=K)`, no
second forward), vLLM returns them with the samples (its raw logprobs).

Work is the list of (prompt, sample) pairs in file order, cut into chunks of ``--batch-size``; chunk c is generated
with seed ``seed * 1000003 + c`` on rank ``c % world``, so the result does not depend on the number of ranks (for
the HF engine on a deterministic device) nor on where an earlier run was interrupted: a rerun skips every chunk
whose samples are all in the output and regenerates the others whole, keeping only the missing samples. A resume
with another model or other sampling settings (``generation``) is an error.
Storage and merging: `opdx.generate_store`.

Engine ``auto`` = vLLM when it imports, else HF with a note. Bad input (a missing ``prompt`` field, non-UTF-8,
an empty file, a missing model directory) exits with code 2 and a message naming the file and line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

import torch

from opdx.config import ConfigError
from opdx.generate_store import SampleStore, note, prompt_hashes

SEED_STRIDE = 1000003
# fields this module writes (dropped from the input's extra fields when a generated file is the --data)
GENERATED_FIELDS = ("response_ids", "finish_reason", "sample", "prompt_hash", "topk_ids", "topk_logprobs",
                    "generation")
# what a resume must share with the run that wrote the file (the prompt hash covers template and system prompt)
SETTINGS = ("max_new_tokens", "temperature", "top_p", "seed", "logprobs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m opdx.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory of the teacher (model + tokenizer)")
    p.add_argument("--data", required=True, help="prompt file: JSONL with a 'prompt' field, or a HF dataset dir")
    p.add_argument("--out", required=True, help="output JSONL (resumed when it exists)")
    p.add_argument("--engine", choices=("auto", "vllm", "hf"), default="auto")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logprobs", type=int, default=0, metavar="K", help="store the teacher's top-K per token")
    p.add_argument("--batch-size", type=int, default=32, help="samples per chunk (one generate call, one file)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--system-prompt", default="")
    p.add_argument("--max-prompt-len", type=int, default=4096, help="longer prompts are an error")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--max-model-len", type=int, default=0, help="vLLM context length (0: the model's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vLLM: shard one teacher over this many GPUs (run without torchrun: one process drives them)")
    p.add_argument("--split", default="train", help="split of a HF dataset directory")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    for name in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.logprobs < 0:
        p.error(f"--logprobs must be >= 0 (0 = off), got {args.logprobs}")
    if args.tensor_parallel_size < 1:
        p.error(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    if args.tensor_parallel_size > 1 and (args.engine == "hf" or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        p.error("--tensor-parallel-size > 1 shards one vLLM engine: use --engine vllm (or auto) in a single process, "
                "not under torchrun (torchrun is the data-parallel mode)")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    return args


# ------------------------------------------------------------------------------------------------ work and ranks
def plan_chunks(n_prompts: int, n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The (prompt index, sample index) pairs in file order, cut into chunks of ``batch_size``."""
    items = [(i, s) for i in range(n_prompts) for s in range(n)]
    return [items[k:k + batch_size] for k in range(0, len(items), batch_size)]


def rank_chunks(chunks: list, rank: int, world: int) -> list[tuple[int, list]]:
    """(chunk index, items) of this rank: chunk c belongs to rank c % world."""
    return [(c, items) for c, items in enumerate(chunks) if c % world == rank]


def _init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device) under torchrun (process group initialized), else (0, 1, cuda:0 or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        # ranks finish their shares at different times; the closing barrier must not time out
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=24))
    return rank, world, device


# ------------------------------------------------------------------------------------------------------ engines
def resolve_engine(engine: str) -> str:
    """auto -> vllm when it imports, else hf with a note."""
    if engine != "auto":
        return engine
    from opdx.rollout.vllm import _import_vllm

    try:
        _import_vllm()
    except ImportError as exc:
        note(f"vLLM is not importable ({str(exc).split('importing it failed: ')[-1]}); generating with "
             "transformers (--engine hf)")
        return "hf"
    return "vllm"


def build_rollout(args, engine: str, tok, *, eos_ids, pad_id, device):
    """The rollout engine (`RolloutBatch.topk` filled with --logprobs K): VLLMColocateRollout or HFRollout."""
    from opdx.models import aligned_vocab_size

    if engine == "vllm":
        from transformers import AutoConfig

        from opdx.rollout.vllm import VLLMColocateRollout

        config = AutoConfig.from_pretrained(args.model)
        vocab = aligned_vocab_size(tok, config)
        if args.logprobs and config.vocab_size > vocab:
            note(f"the model has {config.vocab_size} vocabulary rows for {vocab} tokenizer tokens: vLLM's top-K "
                 "logprobs are normalized over all rows, the HF engine's (and the trainer's) over the tokenizer's")
        rollout = VLLMColocateRollout(args.model, eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p, dtype=args.dtype,
                                      gpu_memory_utilization=0.9, seed=args.seed, vocab_size=vocab,
                                      top_logprobs=args.logprobs, max_model_len=args.max_model_len or None,
                                      tensor_parallel_size=args.tensor_parallel_size)
        return rollout
    if args.tensor_parallel_size > 1:
        raise ConfigError(f"--tensor-parallel-size {args.tensor_parallel_size} needs the vLLM engine, and vLLM is not "
                          "importable here: install it (the [vllm] extra) or use torchrun for data parallelism")
    from opdx.models import load_causal_lm
    from opdx.rollout.hf import HFRollout

    model = load_causal_lm(args.model, dtype=args.dtype, device=device)
    vocab = aligned_vocab_size(tok, model)
    rollout = HFRollout(model, eos_ids=eos_ids, pad_id=pad_id, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, vocab_size=vocab, top_logprobs=args.logprobs)
    return rollout


# ------------------------------------------------------------------------------------------------------ records
def _rounded(t: torch.Tensor) -> list:
    return (torch.round(t.double() * 1e6) / 1e6).tolist()


def generation_settings(args) -> dict:
    return {"model": os.path.basename(os.path.normpath(args.model)), **{k: getattr(args, k) for k in SETTINGS}}


def check_resume_settings(store: SampleStore, settings: dict) -> None:
    """A resumed output must come from the same model and sampling settings (else its samples would mix)."""
    for path, rec in store.first_records():
        old = rec.get("generation") or {}
        diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise ConfigError(f"{path} was generated with {', '.join(diff)}: rerun with the same settings to "
                              "resume it, or pass a new --out path")


def make_records(examples, hashes, items, comps, finish, topk, tok, eos_ids, settings) -> list[dict]:
    records = []
    for row, (i, s) in enumerate(items):
        ids = comps[row]
        text_ids = ids[:-1] if ids and ids[-1] in eos_ids else ids
        rec = {k: v for k, v in (examples[i].meta or {}).items() if k not in GENERATED_FIELDS}
        rec.update(prompt=examples[i].prompt, response=tok.decode(text_ids, skip_special_tokens=False),
                   response_ids=ids, finish_reason=finish[row], sample=s, prompt_hash=hashes[i])
        if topk is not None:
            rec.update(topk_ids=topk[row][0].tolist(), topk_logprobs=_rounded(topk[row][1]))
        rec["generation"] = settings
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------------------- run
def _load_prompts(args, tok, eos_ids):
    from opdx.data import encode_examples, load_examples

    examples = load_examples(args.data, split=args.split, what="--data")
    prompts, _ = encode_examples(tok, examples, chat_template=args.chat_template, system_prompt=args.system_prompt,
                                 max_prompt_len=args.max_prompt_len, max_response_len=1, eos_id=eos_ids[0],
                                 what=f"--data {args.data}")
    return examples, prompts


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="generate", disable=not enabled, dynamic_ncols=True)


def generate_shard(args, rollout, store, examples, prompts, hashes, mine, done, tok, eos_ids) -> tuple[int, int]:
    """Generate this rank's unfinished chunks; returns (samples written, tokens generated)."""
    todo = [(c, items) for c, items in mine if any((hashes[i], s) not in done for i, s in items)]
    total = sum(sum((hashes[i], s) not in done for i, s in items) for _, items in todo)
    written = tokens = 0
    t0 = time.perf_counter()
    with _progress(total, args.progress and store.rank == 0) as bar:
        for c, items in todo:
            rb = rollout.generate([prompts[i] for i, _ in items], seed=args.seed * SEED_STRIDE + c)
            records = make_records(examples, hashes, items, rb.completions(), rb.finish_reasons, rb.topk, tok,
                                   eos_ids, generation_settings(args))
            keep = [r for r in records if (r["prompt_hash"], r["sample"]) not in done]
            store.write_chunk(c, keep)
            written += len(keep)
            tokens += sum(len(r["response_ids"]) for r in keep)
            bar.update(len(keep))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    return written, tokens


def run(args) -> int:
    from opdx.models import load_tokenizer

    rank, world, device = _init_distributed()
    store = SampleStore(args.out, rank=rank)
    tok = load_tokenizer(args.model)
    eos_ids = [int(tok.eos_token_id)]
    pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else eos_ids[0]
    examples, prompts = _load_prompts(args, tok, eos_ids)
    hashes = prompt_hashes(prompts)
    chunks = plan_chunks(len(prompts), args.n, args.batch_size)
    done = store.done_keys()
    check_resume_settings(store, generation_settings(args))
    mine = rank_chunks(chunks, rank, world)
    if any((hashes[i], s) not in done for _, items in mine for i, s in items):
        engine = resolve_engine(args.engine)
        rollout = build_rollout(args, engine, tok, eos_ids=eos_ids, pad_id=pad_id, device=device)
        t0 = time.perf_counter()
        written, tokens = generate_shard(args, rollout, store, examples, prompts, hashes, mine, done, tok, eos_ids)
        dt = time.perf_counter() - t0
        note(f"rank {rank}: {written} samples, {tokens} tokens in {dt:.1f}s ({tokens / max(dt, 1e-9):.1f} tok/s, "
             f"engine {engine})")
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        lines = store.merge({h: i for i, h in enumerate(hashes)})
        note(f"{args.out}: {lines} samples ({len(prompts)} prompts x {args.n})")
    if world > 1:
        torch.distributed.barrier()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, FileNotFoundError, UnicodeDecodeError, ImportError) as exc:
        print(f"opdx.generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        note(f"interrupted: finished chunks are kept in {args.out}.parts; rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
