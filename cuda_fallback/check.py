"""``python -m cuda_fallback.check``: compile every CUDA source for each architecture it
targets with nvcc (object files only: no GPU needed). Exits non-zero on any error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cuda_fallback.loader import ARCH_FLAGS, sources, targets_of


def nvcc_command(source: str, arch: str, out: Path) -> list:
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    return ["nvcc", "-c", source, "-o", str(out), "-std=c++17", "-O3", ARCH_FLAGS[arch], *incs,
            "-DTORCH_EXTENSION_NAME=dsv4_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
            "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]


def _compile(job):
    src, arch, out = job
    if arch not in ARCH_FLAGS:
        return src, arch, False, f"unknown target {arch}"
    proc = subprocess.run(nvcc_command(src, arch, out), capture_output=True, text=True)
    return src, arch, proc.returncode == 0, proc.stdout + proc.stderr


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
        jobs = [(src, arch, Path(tmp) / f"{Path(src).stem}.{arch}.o") for src in srcs for arch in targets_of(src)]
        # One nvcc per core: each compile of a source with torch's headers takes about a minute.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for src, arch, ok, log in pool.map(_compile, jobs):
                print(f"{'ok  ' if ok else 'FAIL'} {Path(src).name} for {arch}")
                if not ok:
                    failed += 1
                    print(log)
    print(f"cuda_fallback.check: {len(srcs)} source(s), {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
