"""One student forward + backward through `opdx.train.objectives.distill_step` (loss.kind=opd), padded vs model.packed=true, on a
batch with very uneven lengths.

    python benchmarks/packed_student.py [--model ~/.cache/opdx/student_L10] [--rows 8] [--min-len 20] [--max-len 300]
                                        [--prompt 16] [--threads 1] [--reps 5] [--attn sdpa]

Prints per-rep times and the minimum of each: process CPU time (robust on a shared machine; with --threads 1 it is
the compute) and wall time. The teacher signal is a fixed random one (only the student's work is timed).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


class _Engine:
    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/opdx/student_L10"))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=300)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from opdx.config import load_config
    from opdx.data import build_batch
    from opdx.teacher import TeacherSignal
    from opdx.train.objectives import distill_step

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    model.config.use_cache = False
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    lens = torch.linspace(args.min_len, args.max_len, args.rows).round().long().tolist()
    prompts = [torch.randint(0, vocab, (args.prompt,), generator=g).tolist() for _ in lens]
    comps = [torch.randint(0, vocab, (n - args.prompt,), generator=g).tolist() for n in lens]
    batch = build_batch(prompts, comps, pad_id=0)
    t_logp = torch.where(batch.loss_mask, -torch.rand(batch.targets.shape, generator=g) * 5, 0.0)
    signal = TeacherSignal(token_logprobs=t_logp)
    print(f"rows {len(lens)}, lengths {lens}, valid tokens {sum(lens)}, padded {len(lens) * max(lens)}, "
          f"threads {args.threads}, attn {args.attn}", flush=True)
    cfgs = {name: load_config(None, ["loss.kind=opd", f"model.packed={name == 'packed'}"])
            for name in ("padded", "packed")}
    times = {name: [] for name in cfgs}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, cfg in cfgs.items():
            model.zero_grad(set_to_none=True)
            c0, w0 = time.process_time(), time.perf_counter()
            loss, _ = distill_step(cfg, _Engine(model), batch, signal, vocab, "student")
            loss.backward()
            c1, w1 = time.process_time(), time.perf_counter()
            if rep:
                times[name].append((c1 - c0, w1 - w0))
                print(f"rep {rep} {name}: cpu {c1 - c0:.2f} s, wall {w1 - w0:.2f} s, loss {float(loss):.6f}",
                      flush=True)
    best = {name: (min(t[0] for t in v), min(t[1] for t in v)) for name, v in times.items()}
    for name, (c, w) in best.items():
        print(f"min {name}: cpu {c:.2f} s, wall {w:.2f} s")
    print(f"speedup packed vs padded: cpu {best['padded'][0] / best['packed'][0]:.2f}x, "
          f"wall {best['padded'][1] / best['packed'][1]:.2f}x")


if __name__ == "__main__":
    main()
