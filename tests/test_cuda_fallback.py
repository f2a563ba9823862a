"""cuda_fallback: every CUDA source compiles for each architecture it targets (nvcc only,
no GPU needed), and the loader maps devices to the right target."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from cuda_fallback import loader


def test_every_source_declares_known_targets():
    assert loader.sources(), "cuda_fallback/csrc has no sources"
    for src in loader.sources():
        targets = loader.targets_of(src)
        assert targets and set(targets) <= set(loader.ARCH_FLAGS), (src, targets)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CI"),
                    reason="nvcc not installed (CI always runs this)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real build below supersedes it")
def test_sources_compile_with_nvcc():
    proc = subprocess.run([sys.executable, "-m", "cuda_fallback.check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CI"),
                    reason="nvcc not installed (CI always runs this)")
def test_e8m0_decoder_matches_the_oracle(tmp_path):
    # csrc/e8m0.cuh is the one E8M0 decoder of the CUDA kernels; its host form, built by nvcc
    # and run here, against the oracle's value of every byte (2^-127 for 0, NaN for 0xFF).
    from dsv4_triton.reference.gemm import scale_to_float

    src = tmp_path / "e8m0.cu"
    src.write_text('#include <cstdio>\n#include "e8m0.cuh"\n'
                   "int main() { for (unsigned b = 0; b < 256; ++b) { const float v = dsv4::e8m0_value(b); "
                   'unsigned bits; memcpy(&bits, &v, 4); std::printf("%u\\n", bits); } }\n')
    csrc = os.path.join(os.path.dirname(loader.__file__), "csrc")
    subprocess.run(["nvcc", str(src), "-o", str(tmp_path / "e8m0"), f"-I{csrc}"], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "e8m0")], check=True, capture_output=True, text=True).stdout.split()
    got = torch.tensor([int(v) for v in out], dtype=torch.int64).to(torch.int32).view(torch.float32)
    want = scale_to_float(torch.arange(256, dtype=torch.uint8).view(torch.float8_e8m0fnu))
    assert got.shape == (256,)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[255])
    assert torch.equal(got[:255], want[:255]) and got[0].item() == 2.0 ** -127


@pytest.mark.gpu
def test_extension_builds_and_matches_device():
    arch = loader.arch_of(torch.device("cuda"))
    if arch not in loader.ARCH_FLAGS:
        pytest.skip(f"no CUDA kernels target {arch}")
    ok, why = loader.extension_status(0)
    assert ok, why
    major, minor = torch.cuda.get_device_capability()
    assert loader.extension(torch.device("cuda")).built_arch() == 10 * major + minor


@pytest.mark.gpu
def test_host_checks_raise_with_their_message():
    """A failed check in a kernel's host entry raises RuntimeError with the message, values
    included (it must not take the process down: run in a child so a crash fails the test)."""
    arch = loader.arch_of(torch.device("cuda"))
    if arch not in loader.ARCH_FLAGS:
        pytest.skip(f"no CUDA kernels target {arch}")
    code = (
        "import torch\n"
        "from cuda_fallback.loader import extension_at\n"
        "e = extension_at(0)\n"
        "x = torch.zeros(0, 128, dtype=torch.half, device='cuda')\n"
        "w = torch.zeros(4, 64, dtype=torch.uint8, device='cuda')\n"
        "try:\n"
        "    e.fp4_decode_gemm(x, torch.zeros(0, 1, device='cuda'), w, w[:, :4].contiguous(), None, 0)\n"
        "except RuntimeError as err:\n"
        "    print(str(err).splitlines()[0])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x_codes: expected 1 to 16 rows, got 0" in proc.stdout


@pytest.mark.parametrize("n, m, rows", [
    (24576, 256, 128),  # 3 rounds of 128-row tiles against 2 of 256-row ones (~3.7 in 128-row time)
    (24576, 512, 256),  # 6 against 3 (~5.6)
    (24576, 4096, 256),
    (1536, 2048, 256),  # 2 against 1 (~1.9)
    (1536, 4096, 128),  # 3 against 2 (~3.7): 192 tiles of 256 rows leave the second round 45% full
    (1536, 8192, 256)])
def test_tile_rows_choose_the_fewer_rounds(monkeypatch, n, m, rows):
    # The choices measured fastest on the H100 (132 SMs) for the Pro shapes at K = 7168
    # (benchmarks/NOTES.md, eighteenth round).
    from cuda_fallback import gemm as cuda_gemm

    monkeypatch.setattr(cuda_gemm, "sm_count", lambda device: 132)
    assert cuda_gemm.tile_rows_for(m, n // 128, torch.device("cuda", 0)) == rows


def test_fp8_prefill_covers_says_why_not(monkeypatch):
    # The registry rule on meta tensors (no GPU needed), for a machine of 132 SMs.
    from cuda_fallback import gemm as cuda_gemm

    monkeypatch.setattr(cuda_gemm, "sm_count", lambda device: 132)
    meta = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731

    def covers(m, n, k):
        return cuda_gemm.fp8_prefill_covers(meta(m, k, dtype=torch.bfloat16), meta(n, k, dtype=torch.float8_e4m3fn),
                                            meta(-(-n // 128), -(-k // 128), dtype=torch.float8_e8m0fnu))

    assert covers(4096, 1536, 7168) == "" and covers(1024, 24576, 1536) == ""
    assert covers(1024, 1536, 7168).startswith("96 output tiles")  # 8 x 12 < 132
    assert covers(64, 24576, 7168).startswith("64 rows")  # 192 half-empty tiles: measured slower
    assert covers(4096, 1536, 1024).startswith("K = 1024")
    assert "multiples of 128" in covers(4096, 1000, 7168) and "multiples of 128" in covers(4096, 1536, 7000)


@pytest.mark.parametrize("arch", ["sm90a", "sm100a"])
def test_fp4_covers_says_why_not(monkeypatch, arch):
    # The fp4_linear rule on meta tensors: MXFP4 and NVFP4 decode rows on either architecture,
    # MXFP4 and NVFP4 prefill rows on sm90a only (the FP8 and BF16 kernels there), whatever the
    # output tile count.
    from cuda_fallback import gemm as cuda_gemm

    monkeypatch.setattr(cuda_gemm, "sm_count", lambda device: 132)
    monkeypatch.setattr(cuda_gemm, "arch_of", lambda device: arch)
    meta = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731

    def covers(m, n, k, fmt="mxfp4"):
        scale = (meta(n, k // 32, dtype=torch.float8_e8m0fnu) if fmt == "mxfp4"
                 else meta(n, k // 16, dtype=torch.float8_e4m3fn))
        return cuda_gemm.fp4_covers(meta(m, k, dtype=torch.bfloat16), meta(n, k // 2, dtype=torch.uint8),
                                    scale, fmt, None)

    first = cuda_gemm.FP4_PREFILL_MIN_ROWS
    assert covers(1, 24576, 7168) == "" and covers(8, 512, 7168) == ""
    assert covers(16, 1536, 7168) == "" and covers(17, 1536, 7168).startswith("17 activation rows")
    assert covers(9, 7168, 1536).startswith("9 activation rows") and covers(first - 1, 1536, 7168) != ""
    assert covers(4, 1536, 7168, "nvfp4") == "" and covers(8, 24576, 7168, "nvfp4") == ""
    assert covers(16, 1536, 7168, "nvfp4") == "" and covers(9, 7168, 1536, "nvfp4").startswith("9 activation rows")
    assert covers(17, 1536, 7168, "nvfp4").startswith("17 activation rows (NVFP4")
    # NVFP4 at 17-64 rows: the warp-group MMA kernel (sm90a) from 99 CTAs of 64 rows (3/4 of 132).
    wgmma = "" if arch == "sm90a" else "17 activation rows (NVFP4"
    assert covers(17, 24576, 7168, "nvfp4").startswith(wgmma) and covers(17, 6336, 1536, "nvfp4").startswith(wgmma)
    assert covers(64, 6272, 7168, "nvfp4").startswith("64 activation rows (NVFP4")
    assert covers(65, 24576, 7168, "nvfp4").startswith("65 activation rows (NVFP4")
    assert covers(17, 24576, 7168).startswith("17 activation rows")  # MXFP4: the Triton GEMM's
    assert covers(4, 1536, 7000, "nvfp4").startswith("K = 7000")
    assert covers(4096, 1540, 7168, "nvfp4").startswith("N = 1540")
    assert covers(4, 1536, 7000).startswith("K = 7000")
    if arch == "sm90a":
        assert covers(first, 1536, 7168) == "" and covers(4096, 24576, 7168) == ""
        assert covers(4096, 1536, 1024).startswith("K = 1024")
        assert "multiples of 128" in covers(4096, 1000, 7168)
        assert covers(4096, 1536, 7168, "nvfp4") == "" and covers(256, 24, 160, "nvfp4") == ""
    else:
        assert "target sm90a" in covers(4096, 24576, 7168)
        assert "target sm90a" in covers(4096, 1536, 7168, "nvfp4")


@pytest.mark.parametrize("m", [1, 8, 9, 16])
@pytest.mark.parametrize("n, k", [(7168, 1536), (1536, 7168), (512, 7168), (3072, 2048), (16, 128), (48, 896)])
def test_fp8_decode_plan_fits_one_wave(m, n, k):
    # Every plan: whole row tiles and K slices, the CTA's shared memory within an sm_90 CTA's,
    # and all CTAs resident at once (the kernel streams each CTA's weight bytes in one go).
    from cuda_fallback import gemm as cuda_gemm

    sms = 132
    rows, split = cuda_gemm.fp8_decode_plan(m, n, k, sms)
    assert rows in cuda_gemm.FP8_DECODE_ROWS and split in cuda_gemm.FP8_DECODE_SPLITS
    assert n % rows == 0 and (k // 128) % split == 0
    smem = cuda_gemm.decode_shared_bytes(rows, m, k // 128 // split)
    assert smem <= cuda_gemm.SM90_CTA_SHARED_BYTES
    per_sm = min(cuda_gemm.SM90_CTA_SHARED_BYTES // smem, 2048 // cuda_gemm.FP8_DECODE_THREADS)
    assert n // rows * split <= per_sm * sms


def test_fp8_decode_covers_says_why_not(monkeypatch):
    from cuda_fallback import gemm as cuda_gemm

    monkeypatch.setattr(cuda_gemm, "sm_count", lambda device: 132)
    meta = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731

    def covers(m, n, k, dtype=torch.bfloat16):
        x_scale = meta(m, k // 128, dtype=torch.float32) if dtype == torch.float8_e4m3fn else None
        return cuda_gemm.fp8_covers(meta(m, k, dtype=dtype), meta(n, k, dtype=torch.float8_e4m3fn),
                                    meta(-(-n // 128), -(-k // 128), dtype=torch.float8_e8m0fnu), x_scale)

    assert covers(1, 7168, 1536) == "" and covers(4, 1536, 7168) == "" and covers(3, 512, 7168) == ""
    assert covers(5, 1536, 7168).startswith("5 rows")  # 5-64 rows: the Triton GEMM
    assert "a 168 MB weight" in covers(1, 24576, 7168) and "a 21 MB weight" in covers(1, 3072, 7168)
    assert "no plan holds the weight" in covers(1, 1000, 7168)  # N not a multiple of 16
    assert "torch.float16" in covers(1, 7168, 1536, torch.float16)
    assert "torch.float8_e4m3fn" in covers(4, 1536, 7168, torch.float8_e4m3fn)  # codes: the decode kernel quantises
    assert "multiple of 128" in covers(1, 7168, 1000)
    assert covers(17, 7168, 1536).startswith("17 rows")
