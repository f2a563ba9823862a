"""Benchmark cases of the compressor family (none yet)."""


def cases(quick: bool):
    return []
