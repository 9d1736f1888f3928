"""Ahead-of-time kernels: compiling a Triton kernel for a GPU target on any machine
(:mod:`.compile`), the C library's variants and sources (:mod:`.library`, run by CMake as
``python -m apo_fast.aot.library``) and the compile report (:mod:`.report`,
``python -m apo_fast.aot.report``)."""
