"""Fills the reference `response` of the open prompts (answer == null) in examples/data/prompts_*.jsonl with the
demo teacher (SmolLM2-135M-Instruct via opdx.models.ensure_demo_models): greedy decoding, chat template,
at most 48 new tokens, batched. Checkable prompts keep response == answer. Run once after make_prompts.py:

    PYTHONPATH=. python examples/make_responses.py            # only records whose response is missing
    PYTHONPATH=. python examples/make_responses.py --force    # regenerate every open prompt

Takes about 2-4 minutes on 2 CPU cores (plus the one-time demo model download/conversion).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch  # before opdx: loads libtorch for the compiled extension

from opdx.models import ensure_demo_models, load_causal_lm, load_tokenizer

DATA = Path(__file__).resolve().parent / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


@torch.inference_mode()
def generate(model, tok, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy chat completions, batched with left padding, longest prompts first."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(tok(texts[i], add_special_tokens=False)["input_ids"]))
    out: list[str | None] = [None] * len(texts)
    tok.padding_side = "left"
    t0 = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for i, row in zip(idx, new):
            out[i] = tok.decode(row, skip_special_tokens=True).strip()
        done = min(b + batch_size, len(order))
        print(f"  {done}/{len(order)} prompts, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return [o or "" for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--cache-dir", default=None, help="opdx model cache (default $OPDX_CACHE or ~/.cache/opdx)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 = the cores not already busy (oversubscribed OpenMP threads spin and "
                         "run ~10x slower on a loaded machine)")
    ap.add_argument("--force", action="store_true", help="regenerate responses that are already present")
    args = ap.parse_args()
    threads = args.threads or max(1, min(os.cpu_count() or 1, round((os.cpu_count() or 1) - os.getloadavg()[0])))
    torch.set_num_threads(threads)
    print(f"using {threads} torch thread(s)", file=sys.stderr)

    teacher_dir, _ = ensure_demo_models(args.cache_dir)
    tok = load_tokenizer(teacher_dir)
    model = load_causal_lm(teacher_dir, dtype=torch.float32)

    paths = [args.data_dir / "prompts_train.jsonl", args.data_dir / "prompts_eval.jsonl"]
    files = {p: read_jsonl(p) for p in paths}
    todo = [(p, k) for p, recs in files.items() for k, r in enumerate(recs)
            if r["answer"] is None and (args.force or not r.get("response"))]
    for recs in files.values():  # checkable prompts: the reference response is the exact answer
        for r in recs:
            if r["answer"] is not None:
                r["response"] = r["answer"]
    raw = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for recs in files.values() for r in recs]
    print(f"prompt length (tokens, without chat template): max {max(raw)}, mean {sum(raw) / len(raw):.1f}",
          file=sys.stderr)
    print(f"generating {len(todo)} teacher responses (greedy, <= {args.max_new_tokens} new tokens)", file=sys.stderr)
    t0 = time.perf_counter()
    if todo:
        resp = generate(model, tok, [files[p][k]["prompt"] for p, k in todo],
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        for (p, k), text in zip(todo, resp):
            files[p][k]["response"] = text
    for p, recs in files.items():
        write_jsonl(p, recs)
    print(f"done in {time.perf_counter() - t0:.0f}s; wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


if __name__ == "__main__":
    main()
