"""Test setup: the Triton interpreter on machines without a GPU, hypothesis profiles,
and the ``gpu`` marker."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
# Correctness tests run each kernel's first (always valid) config; tuning every hypothesis
# shape would compile every config. The benchmarks tune and check the tuned kernels.
os.environ.setdefault("DSV4_AUTOTUNE", "0")
if not HAS_CUDA:
    # Small CPU ops run faster on one thread than with intra-op threads spin-waiting on a
    # loaded 2-core machine.
    torch.set_num_threads(1)
    # Must be set before triton.jit decorates the kernels (at dsv4_triton import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci": few examples, because kernels run in the interpreter on 2 CPU cores, and the same
#   examples on every run (derandomized), so a red CI names a change, not a draw.
# "gpu": more examples on a real GPU, fresh ones each run.
# "explore": many fresh examples, to hunt for cases the fixed "ci" draw misses.
# "dev": quick local iteration.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=12, derandomize=True, **_common)
settings.register_profile("gpu", max_examples=25, **_common)
settings.register_profile("explore", max_examples=200, **_common)
settings.register_profile("dev", max_examples=5, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "ci"))

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    return DEVICE
