"""Host-side helpers shared by the fused ops' launchers."""
from __future__ import annotations

__all__ = ["cdiv"]


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints (grid sizes)."""
    return -(-a // b)
