"""Build and load the CUDA extension for the current device (once per process)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Tuple

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
# Architecture-specific targets (the 'a' variants unlock wgmma / tcgen05).
ARCH_FLAGS = {"sm90a": "-gencode=arch=compute_90a,code=sm_90a",
              "sm100a": "-gencode=arch=compute_100a,code=sm_100a"}
# The architectures of the backends whose sources target every one of them.
CUDA_ARCHS = tuple(ARCH_FLAGS)


def arch_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    name = f"sm{major}{minor}"
    return name + "a" if name + "a" in ARCH_FLAGS else name


def sources() -> list:
    return sorted(str(p) for p in CSRC.glob("*.cu"))


def targets_of(source: str) -> Tuple[str, ...]:
    for line in Path(source).read_text().splitlines():
        if line.strip().startswith("// targets:"):
            return tuple(line.split(":", 1)[1].split())
    raise ValueError(f"{source}: missing a '// targets: ...' line naming its architectures")


def sources_for(arch: str) -> list:
    """The sources that target ``arch`` (``extension.cu`` targets every one)."""
    return [s for s in sources() if arch in targets_of(s)]


def source_macro(source: str) -> str:
    """``DSV4_WITH_<STEM>``: defined in a build that includes ``source``, so ``extension.cu``
    binds only the entry points of the sources built for that architecture."""
    return "DSV4_WITH_" + Path(source).stem.upper()


@functools.lru_cache(maxsize=None)
def _build(arch: str):
    from torch.utils.cpp_extension import load

    srcs = sources_for(arch)
    return load(name=f"dsv4_cuda_{arch}", sources=srcs,
                extra_cuda_cflags=["-O3", ARCH_FLAGS[arch], *(f"-D{source_macro(s)}" for s in srcs)],
                verbose=os.environ.get("DSV4_CUDA_VERBOSE") == "1")


def extension(device: torch.device):
    """The built module for ``device`` (builds it on first call: takes a minute)."""
    arch = arch_of(device)
    if arch not in ARCH_FLAGS:
        raise RuntimeError(f"no CUDA kernels target {arch}; built for {sorted(ARCH_FLAGS)}")
    return _build(arch)


@functools.lru_cache(maxsize=None)
def extension_at(device_index: int):
    """``extension`` for ``cuda:<device_index>``, cached: the per-call lookup of the backends."""
    return extension(torch.device("cuda", device_index))


@functools.lru_cache(maxsize=None)
def extension_status(device_index: int = 0) -> Tuple[bool, str]:
    """(usable, reason) for the extension on this device; never raises."""
    try:
        device = torch.device("cuda", device_index)
        ext = extension(device)
        ext.built_arch()
        return True, ""
    except Exception as e:  # a failed build makes the backend unavailable, with the reason
        return False, f"CUDA extension unavailable: {e}"
