"""Benchmark cases of the router family (none yet)."""


def cases(quick: bool):
    return []
