"""Benchmarks: ``python -m dsv4_triton.bench [family ...]`` (see harness.py)."""
