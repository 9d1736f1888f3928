"""Fused operators, one sub-package per op.

Each op package holds ``naive.py`` (the plain PyTorch reference), ``fused.py`` (host
launchers and the ``torch.autograd.Function`` around the Triton kernels of
``apo_fast.kernels.<op>``), ``checks.py`` (its input checks) and, in ``__init__.py``,
the public functional API that checks its inputs and dispatches (:mod:`.backend`).

| op | public function | kernels |
|---|---|---|
| :mod:`.apo_loss` | ``apo_loss`` | ``apo_fast.kernels.apo_loss`` |
| :mod:`.gated_lora` | ``gated_lora_linear`` | ``apo_fast.kernels.gated_lora`` |
"""
