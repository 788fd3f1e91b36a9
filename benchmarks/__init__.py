"""Benchmarks and the ablation driver, run as modules from the repository root: ``python -m benchmarks.x``."""
