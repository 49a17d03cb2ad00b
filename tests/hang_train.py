"""Test-only entry point: `opdx.train` that parks after step N until it is killed (the SIGKILL + resume test).

    torchrun --nproc_per_node 2 tests/hang_train.py N --config X.yaml k=v ...

Every rank runs steps 1..N (with their logging, eval and checkpoints), then waits where step N+1 would start,
never outliving its launcher."""

from __future__ import annotations

import os
import sys
import time

from opdx.train import loop


def park_after(step: int) -> None:
    """Wrap `opdx.train.loop.train_step` so that the call for step ``step + 1`` parks the rank instead."""
    real = loop.train_step

    def train_step(t, n, *args, **kwargs):
        if n == step + 1:
            parent = os.getppid()
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        return real(t, n, *args, **kwargs)

    loop.train_step = train_step


if __name__ == "__main__":
    park_after(int(sys.argv[1]))
    sys.exit(loop.main(sys.argv[2:]))
