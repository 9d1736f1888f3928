"""Host-side helpers shared by the fused ops' launchers."""
from __future__ import annotations

import functools

__all__ = ["cdiv", "next_pow2", "sm_count"]


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints (grid sizes)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton block sizes."""
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached: a driver call)."""
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count
