import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined: set it before any test imports our kernels, so the Triton path
    # runs under the interpreter on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Imported after the environment above is set: it imports vtokprune (and so its kernels).
from tests.conformance import BUILDERS, FAMILIES  # noqa: E402


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(family, tiny model) for the conformance tests (tests/test_adapters_conformance*.py), built once per module.
    Modules with a `family` fixture or parameter of their own override it."""
    return request.param, BUILDERS[request.param]()
