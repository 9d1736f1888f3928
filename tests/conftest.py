import os

# The Triton interpreter must be chosen before triton is imported anywhere:
# it lets the fused kernels run on CPU tensors in the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("APO_FAST_BACKEND", "auto")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
