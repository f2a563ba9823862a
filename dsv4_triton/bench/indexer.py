"""Benchmark cases of the indexer family (none yet)."""


def cases(quick: bool):
    return []
