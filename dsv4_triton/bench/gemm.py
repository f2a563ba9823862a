"""Benchmark cases of the gemm family (none yet)."""


def cases(quick: bool):
    return []
