"""The ``cuda`` backend of the gemm family: ``fp4_linear`` for MXFP4 and NVFP4 weights at decode
and prefill sizes, ``fp8_linear`` at decode and prefill sizes and ``grouped_linear`` at prefill
sizes on Hopper.

Decode: ``csrc/fp4_decode_gemm.cu`` covers MXFP4 and NVFP4 weights with K a multiple of 128 (every
DeepSeek-V4 projection), 1 to 8 activation rows (up to 16 where K >= 4096), 16-byte aligned weight
rows and 4-byte (MXFP4) or 2-byte (NVFP4) aligned scale rows.  Why so few rows: every 16-row tile
of the kernel reads all its activation rows from L2, so at 64 rows (H100, N = 24576, K = 7168) it
read ~700 MB from L2 and took 218 us against the Triton GEMM's 84; at one row it took 51 us
against 82, at 16 rows (two groups of 8 sharing each decoded weight block) 72 against 84
(benchmarks/NOTES.md).  The activation is quantised by the same pre-pass as the Triton GEMM's
(``act_quant_rows``: FP8 codes and power-of-two scales, bit-identical to the oracle's; the codes'
values written as fp16 in the kernel's operand order), then the kernel streams the weights once.

Decode, NVFP4 at 17-64 rows (sm90a): ``csrc/sm90_nvfp4_decode_gemm.cu``, the warp-group MMA with
the weight decoded into its A registers and the activation rows (in its k-slot order) as its
shared-memory B operand, where the weight is wide enough for its 64-row CTAs to fill the SMs
(``wgmma_covers``; scale rows 4-byte aligned).

Prefill (sm90a): from ``FP4_PREFILL_MIN_ROWS`` rows an MXFP4 weight is re-encoded as FP8 with
one E8M0 scale per 128 x 128 block (``mxfp4_to_fp8_blocks``: one memory-bound pass, exact
while a block's exponents span at most 14 binades, see ``reference.gemm.mxfp4_as_fp8_blocks``)
and multiplied by the FP8 prefill kernel (``csrc/sm90_fp8_gemm.cu``) at the FP8 tensor-core
rate; the Triton GEMM's in-register expansion reaches about 30% of that rate.

FP8 at decode (sm90a): ``csrc/sm90_fp8_decode_gemm.cu`` runs ``fp8_linear`` for 1 to
``FP8_DECODE_MAX_ROWS`` BF16 activation rows of a weight up to ``FP8_DECODE_MAX_WEIGHT_BYTES`` in
one launch: each CTA requests all of its weight bytes by bulk copies first and quantises its
slice of the activation while they come (``fp8_decode_plan`` picks the CTA's rows and K split).

BF16 (sm90a): ``csrc/sm90_bf16_gemm.cu`` runs ``grouped_linear`` from ``GROUPED_MIN_ROWS``
tokens, and NVFP4 weights from ``NVFP4_EXPAND_MIN_ROWS`` rows through the Triton backend's
BF16 route (the weight expanded to BF16, the activation dequantised, both exact; the global
scale on the FP32 sums): ~0.95x of cuBLAS's batched GEMM where the Triton GEMM reaches ~0.77x.

Other arguments (row counts between the ranges, shapes the kernels do not take) go to the next
backend in the registry's order, the Triton GEMM; forcing ``cuda`` on them raises
``BackendUnavailableError``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton

from dsv4_triton.kernels.device import sm_count
from dsv4_triton.kernels.gemm import (ACT_BLOCK, NVFP4_EXPAND_MIN_ROWS, act_dequant_rows, act_quant_rows,
                                      mxfp4_to_fp8_blocks, nvfp4_to_bf16)
from dsv4_triton.kernels.rows import as_rows
from dsv4_triton.registry import register

from .layout import rows_aligned
from .loader import CUDA_ARCHS, arch_of, extension_at

# Decode (csrc/fp4_decode_gemm.cu): the kernel whose warps read their activation rows from L2
# runs 1 to DECODE_KERNEL_ROWS rows (one or two groups of 8 sharing each decoded weight block);
# the registry sends it 1 to DECODE_MAX_ROWS, and up to DECODE_KERNEL_ROWS where
# K >= DECODE_TWO_GROUP_MIN_K.  Measured on the H100 at 16 rows against the Triton GEMM
# (benchmarks/NOTES.md, twenty-first round): K = 7168 1.2-2.6x, K = 1536 0.89x (MXFP4) and
# 0.99x (NVFP4); the threshold sits between the two measured K.
DECODE_MAX_ROWS = 8
DECODE_KERNEL_ROWS = 16
DECODE_TWO_GROUP_MIN_K = 4096
# NVFP4 at 17 to WGMMA_MAX_ROWS rows on sm90a: csrc/sm90_nvfp4_decode_gemm.cu (the warp-group
# MMA, the weight decoded into its A registers, 64 weight rows a CTA) where its CTAs number at
# least WGMMA_MIN_CTAS_PER_SM an SM.  Measured on the H100 with its pre-pass against the Triton
# GEMM (benchmarks/NOTES.md, twenty-second round): N = 24576, K = 7168 1.7-2.3x; N = 7168,
# K = 1536 (112 CTAs) 1.2-1.5x; N = 3072 (48 CTAs) ~0.6x (an earlier five-stage form).  MXFP4
# stays on the Triton GEMM, whose FP8 warp-group MMAs take it faster (86 against 106 us at 64
# rows, N = 24576).
WGMMA_MAX_ROWS = 64
WGMMA_MIN_CTAS_PER_SM = 0.75
# fp8_linear: the TMA + wgmma kernel (``csrc/sm90_fp8_gemm.cu``) takes calls with K of at least
# PREFILL_MIN_K and at least one 128 x 128 output tile an SM.  Measured on the H100 against the
# Triton GEMM (benchmarks/NOTES.md, eighteenth round), both with the same pre-pass: 1.14-1.42x
# at the Pro shapes from 1024 rows, K = 1536 to 7168; with fewer tiles than SMs it was slower
# (N = 1536 or 3072 at 512 rows: 0.8x, measured before its TMA-store epilogue), and shorter K
# was not measured.
PREFILL_MIN_K = 1536
# ... and more than PREFILL_MIN_ROWS rows: at 64 rows of a wide weight (N = 24576, K = 7168), which
# fills the SMs with half-empty 128-row tiles, it took 86.3 us against the Triton GEMM's 71.1
# (benchmarks/NOTES.md, twenty-sixth round).
PREFILL_MIN_ROWS = 64
# fp4_linear: from this many rows the re-encoding pass (~2.3 TB/s: 118 us for N = 24576,
# K = 7168) is repaid by the FP8 kernel's rate.  Measured on the H100 against the Triton GEMM
# (benchmarks/NOTES.md, twentieth round), at N x K = 7168 x 1536, 24576 x 7168, 1536 x 7168
# and 3072 x 7168: 0.81-0.94x at 128 rows, 1.12-1.26x at 256, 1.3-1.7x at 384-512 and 2.1-2.4x
# at 4096, with fewer output tiles than SMs too (the Triton FP4 GEMM is the slower of the two
# at any size past 256 rows, unlike the Triton FP8 GEMM).
FP4_PREFILL_MIN_ROWS = 256
# grouped_linear: from this many tokens the BF16 kernel (256-row tiles) runs in place of the
# Triton GEMM; measured on the H100 (benchmarks/NOTES.md, twentieth round).
GROUPED_MIN_ROWS = 256


# fp8_linear at decode (csrc/sm90_fp8_decode_gemm.cu, which takes 1 to 16 BF16 rows): the registry
# sends it 1 to FP8_DECODE_MAX_ROWS rows of weights up to FP8_DECODE_MAX_WEIGHT_BYTES, where it
# measured faster than the Triton GEMM on the H100 (benchmarks/NOTES.md, twenty-sixth round; one
# to four rows: 1.06-1.14x at 7168 x 1536, 1.00-1.04x at 1536 x 7168, 1.02-1.26x at 512 x 7168,
# 1.03-1.07x at 7168 x 2048; at 8 rows 0.90-0.96x, where every CTA quantises more rows, and
# 0.7x at 3072 x 7168 (22 MB), whose CTAs each hold ~170 KB).  Weight rows a CTA and the CTA
# count along K by fp8_decode_plan, within the shared memory an sm_90 CTA may have.
FP8_DECODE_MAX_ROWS = 4
FP8_DECODE_MAX_WEIGHT_BYTES = 16 << 20
FP8_DECODE_ROWS = (32, 16, 64)
FP8_DECODE_SPLITS = (1, 2, 4, 8)
SM90_CTA_SHARED_BYTES = 227 * 1024
FP8_DECODE_THREADS = 256  # the kernel's kThreads


def decode_shared_bytes(rows: int, m: int, k_blocks: int) -> int:
    """Shared memory of a decode CTA (``shared_bytes`` in the kernel source): its weight rows and
    activation codes of ``k_blocks`` K blocks, rows padded by 64 bytes, the activation scales, the
    warps' partial sums, the CTA's sums, the BF16 activation as loaded and the mbarriers (one per
    16 weight rows, one for the activation)."""
    nt = 2 if m > 8 else 1
    row_bytes = k_blocks * ACT_BLOCK + 64
    return ((rows + m) * row_bytes + 4 * (m * k_blocks + FP8_DECODE_THREADS // 32 * nt * 4 * 32 + rows * 8 * nt)
            + m * k_blocks * ACT_BLOCK * 2 + 8 * (rows // 16 + 1))


@functools.lru_cache(maxsize=None)  # asked by the rule and the call, on every decode step
def fp8_decode_plan(m: int, n: int, k: int, sms: int) -> Optional[Tuple[int, int]]:
    """(weight rows a CTA, CTAs along K) for ``m`` rows of an ``[n, k]`` FP8 weight, or None when
    no plan holds the weight in one wave of CTAs (the kernel requests each CTA's bytes at its
    start, so every CTA must be resident).  The fewest CTAs along K that give every SM a CTA,
    32 rows a CTA first, then 16 (more CTAs), then 64; without a plan that reaches every SM, the
    one with the most CTAs.  Fitted to the H100 at one to four rows (benchmarks/NOTES.md,
    twenty-sixth round): splits past that cost 1-4 us (a cluster barrier and smaller copies),
    and the plans that fill the SMs ran within ~0.5 us of the fastest measured one."""
    n_kb = k // ACT_BLOCK
    fallback, fallback_ctas = None, 0
    for rows in FP8_DECODE_ROWS:
        if n % rows:
            continue
        for split in FP8_DECODE_SPLITS:
            if n_kb % split:
                continue
            smem = decode_shared_bytes(rows, m, n_kb // split)
            if smem > SM90_CTA_SHARED_BYTES:
                continue
            ctas = n // rows * split
            if ctas > min(SM90_CTA_SHARED_BYTES // smem, 2048 // FP8_DECODE_THREADS) * sms:
                continue
            if ctas >= sms:
                return rows, split
            if ctas > fallback_ctas:
                fallback, fallback_ctas = (rows, split), ctas
    return fallback


def fp8_decode_covers(m: int, n: int, k: int, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> str:
    """``""`` when the decode kernel takes these ``fp8_linear`` arguments (``m`` rows), else why not."""
    if k % ACT_BLOCK:
        return f"K = {k} is not a multiple of {ACT_BLOCK}"
    if x.dtype != torch.bfloat16:
        return f"x is {x.dtype} (the decode kernel reads bf16 rows)"
    if n * k > FP8_DECODE_MAX_WEIGHT_BYTES:
        return f"a {n * k / 2**20:.0f} MB weight (it takes up to {FP8_DECODE_MAX_WEIGHT_BYTES >> 20} MB)"
    if not rows_aligned(w, 16):
        return "weight rows are not contiguous and 16-byte aligned"
    if w_scale.stride(-1) != 1:
        return "scale rows are not contiguous"
    if fp8_decode_plan(m, n, k, sm_count(_gpu(x.device))) is None:
        return (f"[{n}, {k}]: no plan holds the weight in one wave of CTAs (N a multiple of "
                f"{min(FP8_DECODE_ROWS)}, at most ~{SM90_CTA_SHARED_BYTES // 1024} KB a CTA)")
    return ""


def fp8_decode(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, rows: Optional[int] = None,
               split: Optional[int] = None) -> torch.Tensor:
    """``act_quant(x2) @ dequant(w).T`` for 1-16 BF16 rows ``x2 [M, K]`` by the decode kernel (the
    registry sends it up to ``FP8_DECODE_MAX_ROWS``), with ``fp8_decode_plan``'s tiles unless
    ``rows`` and ``split`` are given."""
    m, k = x2.shape
    n = w.shape[0]
    if (rows is None) != (split is None):
        raise ValueError(f"rows, split: give both or neither, got rows={rows}, split={split}")
    if rows is None:
        plan = fp8_decode_plan(m, n, k, sm_count(x2.device))
        if plan is None:
            raise ValueError(f"w: no decode plan for N = {n}, K = {k} at {m} rows")
        rows, split = plan
    if not rows_aligned(x2, 16):  # the kernel's bulk copies take 16-byte aligned rows
        x2 = x2.clone(memory_format=torch.contiguous_format)
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2.device)
    scale = w_scale if w_scale.dtype == torch.float32 else w_scale.view(torch.uint8)
    index = x2.device.index
    extension_at(index).fp8_decode_gemm(x2, w.view(torch.uint8), scale, y, rows, split,
                                        torch._C._cuda_getCurrentRawStream(index))
    return y


def fp8_kernel_takes(n: int, k: int) -> str:
    """``""`` when the FP8 prefill kernel takes a weight of ``[n, k]``, else why not."""
    if k % ACT_BLOCK or n % ACT_BLOCK:
        return f"N = {n}, K = {k}: the kernel takes multiples of {ACT_BLOCK} (whole scale blocks)"
    if k < PREFILL_MIN_K:
        return f"K = {k} (it takes {PREFILL_MIN_K} or more: shorter K stays on Triton)"
    return ""


def _gpu(device: torch.device) -> torch.device:
    # (On meta tensors, which the benchmarks ask with, the current GPU.)
    return device if device.type == "cuda" else torch.device("cuda")


def _on_sm90(rows: str, device: torch.device) -> str:
    arch = arch_of(device)
    return "" if arch == "sm90a" else f"{rows}: the prefill kernels target sm90a, this GPU is {arch}"


def decode_takes(m: int, k: int) -> bool:
    """Whether the registry sends ``m`` activation rows of length ``k`` to the decode kernel."""
    return 1 <= m <= DECODE_MAX_ROWS or (m <= DECODE_KERNEL_ROWS and k >= DECODE_TWO_GROUP_MIN_K)


def wgmma_min_n(device: torch.device) -> int:
    """The fewest weight rows for which the NVFP4 warp-group MMA kernel runs (64 a CTA)."""
    return 64 * math.ceil(WGMMA_MIN_CTAS_PER_SM * sm_count(_gpu(device)))


def wgmma_covers(m: int, n: int, w_scale: torch.Tensor, device: torch.device) -> str:
    """``""`` when the NVFP4 warp-group MMA kernel takes ``m`` rows of an ``[n, K]`` weight, else
    why not."""
    if not DECODE_KERNEL_ROWS < m <= WGMMA_MAX_ROWS or n < wgmma_min_n(device):
        takes = f"{DECODE_KERNEL_ROWS + 1} to {WGMMA_MAX_ROWS} with N >= {wgmma_min_n(device)}"
        return f"{m} rows of a {n}-row weight (the warp-group MMA kernel takes {takes})"
    if not rows_aligned(w_scale, 4):
        return "scale rows are not contiguous and 4-byte aligned"
    arch = arch_of(_gpu(device))
    return "" if arch == "sm90a" else f"the warp-group MMA kernel targets sm90a, this GPU is {arch}"


def fp4_decode(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``act_quant(x2) @ dequant(w).T`` for 1-16 rows ``x2 [M, K]`` by the decode kernel."""
    codes, scales = act_quant_rows(x2, fp16_pairs=True)
    index = x2.device.index
    return extension_at(index).fp4_decode_gemm(codes, scales, w, w_scale.view(torch.uint8), global_scale,
                                               torch._C._cuda_getCurrentRawStream(index))


def nvfp4_wgmma(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``act_quant(x2) @ dequant(w).T`` for 1-64 rows ``x2 [M, K]`` and an NVFP4 weight by the
    warp-group MMA kernel (sm90a)."""
    codes, scales = act_quant_rows(x2, mma_slots=True)
    index = x2.device.index
    return extension_at(index).nvfp4_wgmma_gemm(codes, scales, w, w_scale.view(torch.uint8), global_scale,
                                                torch._C._cuda_getCurrentRawStream(index))


def fp4_covers(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str, global_scale) -> str:
    """``""`` when the decode kernel or a prefill path handles these ``fp4_linear`` arguments,
    else why not."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    n = w.shape[0]
    if fmt == "nvfp4" and m >= NVFP4_EXPAND_MIN_ROWS:
        if n % 8:
            return f"N = {n} (the BF16 kernel's output rows need a multiple of 8)"
        return _on_sm90(f"{m} activation rows", _gpu(x.device))
    if k % ACT_BLOCK:
        return f"K = {k} is not a multiple of {ACT_BLOCK}"
    if not rows_aligned(w, 16):
        return "weight rows are not contiguous and 16-byte aligned"
    scale_align = 2 if fmt == "nvfp4" else 4
    if not rows_aligned(w_scale, scale_align):
        return f"scale rows are not contiguous and {scale_align}-byte aligned"
    if decode_takes(m, k):
        return ""
    decode = f"1 to {DECODE_MAX_ROWS}, to {DECODE_KERNEL_ROWS} with K >= {DECODE_TWO_GROUP_MIN_K}"
    if fmt == "nvfp4":
        why = wgmma_covers(m, n, w_scale, x.device)
        prefill = f"{NVFP4_EXPAND_MIN_ROWS} or more on sm90a"
        return why and f"{m} activation rows (NVFP4: {decode}, or {prefill}; {why})"
    rows = f"{m} activation rows (it takes {decode}, or {FP4_PREFILL_MIN_ROWS} or more on sm90a)"
    if m < FP4_PREFILL_MIN_ROWS:
        return rows
    return _on_sm90(rows, _gpu(x.device)) or fp8_kernel_takes(n, k)


@register("fp4_linear", "cuda", archs=CUDA_ARCHS, covers=fp4_covers)
def fp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str, global_scale) -> torch.Tensor:
    x2 = as_rows(x)
    m, n, k = x2.shape[0], w.shape[0], x2.shape[1]
    if decode_takes(m, k):
        y = fp4_decode(x2, w, w_scale, global_scale)
    elif fmt == "nvfp4" and m <= WGMMA_MAX_ROWS:
        y = nvfp4_wgmma(x2, w, w_scale, global_scale)
    elif fmt == "nvfp4":
        # The BF16 route of the Triton backend (kernels/gemm.py, nvfp4_expanded_gemm) on the
        # hand-written BF16 GEMM.
        a = act_dequant_rows(x2)
        y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
        bf16_gemm(a[:, None, :k], nvfp4_to_bf16(w, w_scale)[None], y[:, None, :], global_scale)
    else:
        y = mxfp4_prefill(x2, w, w_scale)
    return y.view(*x.shape[:-1], n)


def mxfp4_prefill(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``act_quant(x2) @ dequant(w).T`` for an MXFP4 weight by the FP8 kernel, the weight re-encoded
    as FP8 blocks first (any M; N and K multiples of 128)."""
    w8, s8 = mxfp4_to_fp8_blocks(w, w_scale)
    return fp8_gemm(x2, w8, s8, tile_rows_for(x2.shape[0], w.shape[0] // ACT_BLOCK, x2.device))


# --- BF16: grouped_linear at prefill sizes ---------------------------------------------------

def bf16_gemm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, scale: Optional[torch.Tensor] = None,
              tile_rows: Optional[int] = None) -> None:
    """``y[:, g] = scale * x[:, g] @ w[g].T`` by ``csrc/sm90_bf16_gemm.cu`` (BF16 ``[T, G, K]``,
    ``[G, N, K]``, ``[T, G, N]``, unit last strides, 16-byte aligned rows); output tiles of
    ``tile_rows`` rows (None: ``tile_rows_for``)."""
    index = x.device.index
    if tile_rows is None:
        tile_rows = tile_rows_for(x.shape[0], x.shape[1] * triton.cdiv(w.shape[1], ACT_BLOCK), x.device)
    extension_at(index).bf16_gemm(x, w, y, scale, tile_rows, torch._C._cuda_getCurrentRawStream(index))


def _tma_rows(t: torch.Tensor) -> bool:
    """A BF16 operand the kernel's 3-D tensor maps take: unit last stride, 16-byte aligned rows."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])


def grouped_covers(x: torch.Tensor, w: torch.Tensor) -> str:
    """``""`` when the BF16 kernel handles these ``grouped_linear`` arguments, else why not."""
    t, n = x.shape[0], w.shape[1]
    if t < GROUPED_MIN_ROWS:
        return f"{t} tokens (it takes {GROUPED_MIN_ROWS} or more: decode sizes stay on Triton)"
    if n % 8:
        return f"N = {n} (the output rows need a multiple of 8)"
    if not (_tma_rows(x) and _tma_rows(w)):
        return "x or w: rows not 16-byte aligned with a unit last stride"
    return ""


@register("grouped_linear", "cuda", archs=("sm90a",), covers=grouped_covers)
def grouped_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = torch.empty((x.shape[0], x.shape[1], w.shape[1]), dtype=torch.bfloat16, device=x.device)
    bf16_gemm(x, w, y)
    return y


def fp8_prefill_covers(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> str:
    """``""`` when the prefill kernel handles these ``fp8_linear`` arguments (x BF16 rows or
    quantised codes: the kernel reads codes either way), else why not."""
    n, k = w.shape
    why = fp8_kernel_takes(n, k)
    if why:
        return why
    m = x.numel() // k
    if m <= PREFILL_MIN_ROWS:
        return f"{m} rows (it takes more than {PREFILL_MIN_ROWS}: decode sizes stay on Triton)"
    sms = sm_count(_gpu(x.device))
    tiles = triton.cdiv(x.numel() // k, ACT_BLOCK) * (n // ACT_BLOCK)
    if tiles < sms:
        return f"{tiles} output tiles of 128 x 128 for {sms} SMs (it takes one an SM or more: smaller calls stay on Triton)"
    if not rows_aligned(w, 16):
        return "weight rows are not contiguous and 16-byte aligned"
    if w_scale.stride(-1) != 1:
        return "scale rows are not contiguous"
    return ""


def tile_rows_for(m: int, col_tiles: int, device: torch.device) -> int:
    """128 or 256 rows an output tile of the FP8 and BF16 kernels, whichever finishes first:
    each CTA runs ceil(tiles / SMs) tiles, and a 256-row tile takes ~0.93x two 128-row ones (a
    quarter less L2 traffic per MMA; measured for the FP8 kernel at K = 7168)."""
    sms = sm_count(device)
    rounds = lambda rows: triton.cdiv(triton.cdiv(m, rows) * col_tiles, sms)  # noqa: E731
    return 256 if rounds(256) * 2 * 0.93 < rounds(128) else 128


def fp8_gemm(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, tile_rows: int,
             x_scale2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act_quant(x2) @ dequant(w).T`` for rows ``x2 [M, K]`` by the kernel with ``tile_rows``-row
    output tiles (any M; N and K multiples of 128); with ``x_scale2 [M, K/128]``, x2 holds the
    activation's FP8 codes and those are its scales."""
    if x_scale2 is None:
        codes, scales = act_quant_rows(x2)
    else:
        codes, scales = x2.view(torch.uint8), x_scale2
        if not rows_aligned(codes, 16):  # the kernel's tensor map takes 16-byte aligned rows
            codes = codes.clone(memory_format=torch.contiguous_format)
    index = x2.device.index
    y = torch.empty((x2.shape[0], w.shape[0]), dtype=torch.bfloat16, device=x2.device)
    scale = w_scale if w_scale.dtype == torch.float32 else w_scale.view(torch.uint8)
    extension_at(index).fp8_gemm(codes, scales, w, scale, y, tile_rows, torch._C._cuda_getCurrentRawStream(index))
    return y


def fp8_covers(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, x_scale: Optional[torch.Tensor] = None) -> str:
    """``""`` when the decode or the prefill kernel takes these ``fp8_linear`` arguments, else why not
    (the decode kernel quantises BF16 rows itself, so quantised codes at 1-16 rows go to Triton)."""
    n, k = w.shape
    m = x.numel() // k if k else 0
    if 1 <= m <= FP8_DECODE_MAX_ROWS:
        why = fp8_decode_covers(m, n, k, x, w, w_scale)
        return why and f"{m} activation rows (the decode kernel: {why})"
    return fp8_prefill_covers(x, w, w_scale)


@register("fp8_linear", "cuda", archs=("sm90a",), covers=fp8_covers)
def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    x2 = as_rows(x)
    m = x2.shape[0]
    if m <= FP8_DECODE_MAX_ROWS:
        y = fp8_decode(x2, w, w_scale)
    else:
        y = fp8_gemm(x2, w, w_scale, tile_rows_for(m, w.shape[0] // ACT_BLOCK, x.device),
                     None if x_scale is None else as_rows(x_scale.reshape(m, -1)))
    return y.view(*x.shape[:-1], w.shape[0])
