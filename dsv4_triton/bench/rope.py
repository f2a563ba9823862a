"""Benchmark cases of the rope family (none yet)."""


def cases(quick: bool):
    return []
