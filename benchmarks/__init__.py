"""Benchmarks: side-by-side comparisons (compare.py) and pytest-benchmark checks."""
