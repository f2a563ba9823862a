"""Benchmark cases of the attention family (none yet)."""


def cases(quick: bool):
    return []
