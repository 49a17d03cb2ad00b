import os
import random

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(min(torch.get_num_threads(), 2))


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed with OPDX_TEST_SEED."""
    seed = int(os.environ.get("OPDX_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"[seed] OPDX_TEST_SEED={seed}")
    yield seed


def has_cuda() -> bool:
    import opdx.ops  # noqa: F401  (registers the torch.ops.opdx operators)

    return torch.cuda.is_available() and hasattr(torch.ops.opdx, "token_logprobs_fwd") and torch.ops.opdx.token_logprobs_fwd.default.has_kernel_for_dispatch_key("CUDA")


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and opdx built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def devices():
    return ["cpu"] + (["cuda"] if has_cuda() else [])
