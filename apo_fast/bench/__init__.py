"""Benchmarks and planning: the training-step benchmark against the Diffusion-DPO baseline
(:mod:`.step`, :mod:`.baseline_dpo`), the memory planner (:mod:`.memory_plan`,
:mod:`.plan_cli`). Kernel micro-benchmarks are pytest-benchmark files in ``benchmarks/``."""
