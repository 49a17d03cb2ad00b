import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    import pytest

    import opdx.ops  # noqa: F401  (registers the torch.ops.opdx operators)

    has_cuda = torch.cuda.is_available() and torch.ops.opdx.token_logprobs_fwd.default.has_kernel_for_dispatch_key(
        "CUDA"
    )
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device and opdx built with CUDA")
        for item in items:
            if "cuda" in item.keywords or "[cuda" in item.name:
                item.add_marker(skip)
