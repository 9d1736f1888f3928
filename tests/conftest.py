import os

# The Triton interpreter must be chosen before triton is imported anywhere:
# it lets the fused kernels run on CPU tensors in the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("APO_FAST_BACKEND", "auto")

# Tiny models run several times faster on one thread than on two contending ones,
# and subprocess tests (torchrun ranks, CLI runs) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
