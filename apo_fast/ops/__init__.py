"""Fused operators: host launchers, autograd Functions and their PyTorch references."""
