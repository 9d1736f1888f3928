"""Moved to :mod:`apo_fast.aot.library`; ``python -m apo_fast.kernels_aot`` (the 0.1 path) still runs it."""
if __name__ == "__main__":
    import runpy

    runpy.run_module("apo_fast.aot.library", run_name="__main__", alter_sys=True)
else:
    from apo_fast.aot.library import *  # noqa: F401,F403
