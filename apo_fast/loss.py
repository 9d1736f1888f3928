"""Moved: the loss family is :mod:`apo_fast.losses` (the fused op: :mod:`apo_fast.ops.apo_loss`).

Kept so that ``apo_fast.loss.apo_loss`` and the other names of the 0.1 layout, which the
docs showed, keep working.
"""
from apo_fast.losses import *  # noqa: F401,F403
from apo_fast.losses import __all__  # noqa: F401
from apo_fast.ops.apo_loss import apo_loss_reference  # noqa: F401
