"""Command line: create the demo or the tiny models.

    python -m opdx.models demo [--cache-dir DIR] [--student-layers N]
    python -m opdx.models tiny OUT_DIR [--seed S] [--vocab-size V]
    python -m opdx.models truncate-vocab MODEL_DIR OUT_DIR --vocab-size V   # a student with another tokenizer
"""
from __future__ import annotations

from collections.abc import Sequence

from opdx.config import ModelConfig

from .demo import ensure_demo_models
from .tiny import make_tiny_models
from .vocab import truncate_vocabulary


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m opdx.models", description="Create the demo or tiny models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="download + convert SmolLM2-135M-Instruct and build the pruned student")
    d.add_argument("--cache-dir", default=None, help="default: $OPDX_CACHE or ~/.cache/opdx")
    d.add_argument("--student-layers", type=int, default=ModelConfig.student_layers)
    t = sub.add_parser("tiny", help="write tiny random teacher/student models")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vocab-size", type=int, default=512)
    v = sub.add_parser("truncate-vocab", help="cut a BPE model's vocabulary (tokenizer + embedding) to its first ids")
    v.add_argument("model_dir")
    v.add_argument("out_dir")
    v.add_argument("--vocab-size", type=int, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "truncate-vocab":
        print(truncate_vocabulary(args.model_dir, args.out_dir, args.vocab_size))
        return
    if args.cmd == "demo":
        teacher, student = ensure_demo_models(args.cache_dir, student_layers=args.student_layers)
    else:
        teacher, student = make_tiny_models(args.out_dir, seed=args.seed, vocab_size=args.vocab_size)
    print(f"teacher: {teacher}\nstudent: {student}")


if __name__ == "__main__":
    main()
