"""opdx custom ops: C++ (CPU) and CUDA kernels behind `torch.ops.opdx.*`, with autograd and fake kernels registered
here so they work under torch.compile. `opdx.ops.reference` holds the pure-torch specification of each op."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch/libc10, which opdx._C links against)

try:
    from opdx import _C  # noqa: F401  (registers torch.ops.opdx.*)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "opdx's compiled extension opdx._C is missing or does not match this torch. Rebuild it with "
        "`pip install --no-build-isolation -e .` (see README)."
    ) from exc

from opdx.ops.generalized_jsd import generalized_jsd  # noqa: E402
from opdx.ops.linear import linear_generalized_jsd, linear_token_logprobs  # noqa: E402
from opdx.ops.linear_chunked import linear_generalized_jsd_mean  # noqa: E402
from opdx.ops.token_logprobs import token_logprobs  # noqa: E402
from opdx.ops.topk import (  # noqa: E402
    teacher_topk,
    teacher_topk_from_hidden,
    topk_diagnostics,
    topk_kl,
    topk_kl_from_logits,
)

__all__ = [
    "generalized_jsd",
    "linear_generalized_jsd",
    "linear_generalized_jsd_mean",
    "linear_token_logprobs",
    "teacher_topk",
    "teacher_topk_from_hidden",
    "token_logprobs",
    "topk_diagnostics",
    "topk_kl",
    "topk_kl_from_logits",
]
