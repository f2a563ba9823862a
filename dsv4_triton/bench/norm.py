"""Benchmark cases of the norm family (none yet)."""


def cases(quick: bool):
    return []
