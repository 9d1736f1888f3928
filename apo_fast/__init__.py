"""apo-fast: a kernel-level training engine for Anomaly Preference Optimization."""
__version__ = "0.1.0"
