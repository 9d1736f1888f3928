"""Triton kernel sources of apo-fast, installed as ``apo_fast.kernels``.

This folder is mapped into the ``apo_fast`` namespace by ``pyproject.toml``;
import it as ``apo_fast.kernels``, never as a top-level ``kernels``.
"""
