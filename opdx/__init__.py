"""opdx: performance-first on-policy distillation for LLMs.

`opdx.ops` holds the fused kernels (C++/CUDA behind torch custom ops), `opdx.losses` the losses built on them, and
`python -m opdx.train` / `torchrun -m opdx.train` the trainer.
"""

__version__ = "0.1.0"

from opdx import ops  # noqa: F401  (loads the compiled extension and registers autograd/fake kernels)
