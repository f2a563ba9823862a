"""Benchmark cases of the mhc family (none yet)."""


def cases(quick: bool):
    return []
