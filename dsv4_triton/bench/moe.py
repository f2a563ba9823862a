"""Benchmark cases of the moe family (none yet)."""


def cases(quick: bool):
    return []
