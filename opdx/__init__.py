"""opdx: performance-first on-policy distillation for LLMs.

`opdx.ops` holds the fused kernels (C++/CUDA behind torch custom ops), `opdx.losses` the losses built on them, and
`python -m opdx.train` / `torchrun -m opdx.train` the trainer.
"""

__version__ = "0.1.0"



def __getattr__(name):
    # `opdx.ops` (the compiled extension + its autograd/fake registrations) loads on first use, so light entry points
    # such as `python -m opdx.report` do not pay for torch and the extension
    if name == "ops":
        import importlib

        return importlib.import_module("opdx.ops")
    raise AttributeError(f"module 'opdx' has no attribute {name!r}")
