"""``python -m cuda_fallback.check``: compile every CUDA source for each architecture it
targets with nvcc (object files only: no GPU needed). Exits non-zero on any error.

One nvcc run a source, with all its targets: the host side (torch's headers, most of the
time) is compiled once, not once a target.  Only the binding file includes
``<torch/extension.h>``; the kernel sources include ATen's core tensor header alone
(``csrc/host.cuh``), which took the whole check on 2 cores from 5.8 to 2.4 min.  Every ``DSV4_WITH_<STEM>`` macro is defined, so
the binding file is checked with all the entry points it can bind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cuda_fallback.loader import ARCH_FLAGS, source_macro, sources, targets_of


def nvcc_command(source: str, archs, out: Path) -> list:
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # Host code at -O0: the check looks for errors, and optimising torch's headers is much of a
    # compile's time (a whole check on 2 cores: 6.5 -> 5.1 min).  Device code is optimised as in
    # the real build (nvcc's -O sets the host compiler's level only).
    return ["nvcc", "-c", source, "-o", str(out), "-std=c++17", "-O0", *(ARCH_FLAGS[a] for a in archs), *incs,
            *(f"-D{source_macro(s)}" for s in sources()),
            "-DTORCH_EXTENSION_NAME=dsv4_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
            "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]


def _compile(job):
    src, archs, out = job
    unknown = [a for a in archs if a not in ARCH_FLAGS]
    if unknown:
        return src, archs, False, f"unknown target(s) {unknown}"
    proc = subprocess.run(nvcc_command(src, archs, out), capture_output=True, text=True)
    return src, archs, proc.returncode == 0, proc.stdout + proc.stderr


def main() -> int:
    if shutil.which("nvcc") is None:
        print("cuda_fallback.check: nvcc not found on PATH", file=sys.stderr)
        return 2
    srcs = sources()
    if not srcs:
        print("cuda_fallback.check: no sources", file=sys.stderr)
        return 2
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(src, targets_of(src), Path(tmp) / f"{Path(src).stem}.o") for src in srcs]
        # One nvcc per core: each compile of a source with torch's headers takes minutes.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for src, archs, ok, log in pool.map(_compile, jobs):
                print(f"{'ok  ' if ok else 'FAIL'} {Path(src).name} for {' '.join(archs)}")
                if not ok:
                    failed += 1
                    print(log)
    print(f"cuda_fallback.check: {len(srcs)} source(s), {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
