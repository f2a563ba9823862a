"""Benchmark cases of the quant family (none yet)."""


def cases(quick: bool):
    return []
