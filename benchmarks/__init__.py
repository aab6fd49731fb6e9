"""Benchmarks: each module is runnable as ``python -m benchmarks.<name>`` and writes to benchmarks/results/."""
