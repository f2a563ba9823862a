"""Facts about the GPU that the launch heuristics of several kernel families use."""

from __future__ import annotations

import functools

import torch


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the current GPU for ``cuda`` without an index).

    Off the GPU (the interpreter) a small nominal machine of 4, so that the tests exercise
    the paths that split work across SMs."""
    if device.type != "cuda":
        return 4
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
