"""The ``cuda`` backend of the gemm family: ``fp4_linear`` for MXFP4 weights at decode sizes.

``csrc/mxfp4_decode_gemm.cu`` covers MXFP4 weights with K a multiple of 128 (every
DeepSeek-V4 projection), 1 to 8 activation rows, 16-byte aligned weight rows and 4-byte
aligned scale rows.  Other arguments (NVFP4, more rows) go to the next backend in the
registry's order, the Triton GEMM; forcing ``cuda`` on them raises ``BackendUnavailableError``.
Why 8 rows: every 16-row tile of the kernel reads all its activation rows from L2, so at 64
rows (H100, N = 24576, K = 7168) it read ~700 MB from L2 and took 218 us against the
Triton GEMM's 84; at one row it took 51 us against 82 (benchmarks/NOTES.md).

The activation is quantised by the same pre-pass as the Triton GEMM's (``act_quant_rows``:
FP8 codes and power-of-two scales, bit-identical to the oracle's; the codes' values written
as fp16 in the kernel's operand order), then the kernel streams the weights once.
"""

from __future__ import annotations

import torch

from dsv4_triton.kernels.gemm import ACT_BLOCK, act_quant_rows
from dsv4_triton.kernels.norm import as_rows
from dsv4_triton.registry import register

from .loader import extension_at

CUDA_ARCHS = ("sm90a", "sm100a")
DECODE_MAX_ROWS = 8


def rows_aligned(t: torch.Tensor, nbytes: int) -> bool:
    """Rows contiguous, the data pointer and every row stride (in bytes) a multiple of ``nbytes``."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % nbytes == 0 and all((s * size) % nbytes == 0 for s in t.stride()[:-1])


def mxfp4_decode_covers(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str,
                        global_scale) -> str:
    """``""`` when the decode kernel handles these ``fp4_linear`` arguments, else why not."""
    if fmt != "mxfp4":
        return f"fmt {fmt!r} (the kernel reads MXFP4 only)"
    k = x.shape[-1]
    if k % ACT_BLOCK:
        return f"K = {k} is not a multiple of {ACT_BLOCK}"
    m = x.numel() // k if k else 0
    if not 1 <= m <= DECODE_MAX_ROWS:
        return f"{m} activation rows (it takes 1 to {DECODE_MAX_ROWS})"
    if not rows_aligned(w, 16):
        return "weight rows are not contiguous and 16-byte aligned"
    if not rows_aligned(w_scale, 4):
        return "scale rows are not contiguous and 4-byte aligned"
    return ""


@register("fp4_linear", "cuda", archs=CUDA_ARCHS, covers=mxfp4_decode_covers)
def fp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str, global_scale) -> torch.Tensor:
    codes, scales = act_quant_rows(as_rows(x), fp16_pairs=True)
    index = x.device.index
    y = extension_at(index).mxfp4_decode_gemm(codes, scales, w, w_scale.view(torch.uint8),
                                         torch._C._cuda_getCurrentRawStream(index))
    return y.view(*x.shape[:-1], w.shape[0])
