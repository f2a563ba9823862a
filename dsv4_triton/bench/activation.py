"""Benchmark cases of the activation family (none yet)."""


def cases(quick: bool):
    return []
