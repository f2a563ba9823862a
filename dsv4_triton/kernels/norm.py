"""Triton RMSNorm: one read of each row from memory, FP32 math, one write.

A program owns ``ROWS`` rows. A row is either held in registers whole (one chunk of the
row's power-of-two width) or streamed in ``CHUNK``-wide pieces twice: sum of squares,
then scale, the second pass hitting L2 (the row was just read). The chunked form also
avoids the idle lanes of padding a row like 7168 up to 8192; the tuner picks per
row-width bucket.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from .formats import cast_rne, to_f32
from ..registry import register

MAX_BLOCK = 16384


@autotune(
    configs=[triton.Config({"ROWS": r, "SPLIT": s}, num_warps=w) for r, s, w in
             ((1, 1, 4), (1, 1, 8), (1, 1, 16), (2, 1, 8), (4, 1, 4), (4, 1, 8), (8, 1, 4),
              (1, 2, 8), (1, 4, 4), (1, 4, 8), (1, 8, 4), (2, 4, 8))],
    key=["BLOCK"],  # tuned per row-width bucket, not per exact length
    name="rms_norm",
    prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
        c for c in configs if c.kwargs["ROWS"] * kw["BLOCK"] // c.kwargs["SPLIT"] <= MAX_BLOCK
        and kw["BLOCK"] // c.kwargs["SPLIT"] >= min(256, kw["BLOCK"])] or configs[:1]},
)
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_x, eps,
                     HAS_W: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    CHUNK: tl.constexpr = BLOCK // SPLIT
    if CHUNK >= n_cols:
        cols = tl.arange(0, CHUNK)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = to_f32(tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0))
        r = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        y = x * r[:, None]
        if HAS_W:
            w = to_f32(tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0))
            y = w[None, :] * y
        tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], cast_rne(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
        for start in range(0, n_cols, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = to_f32(tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0))
            acc += x * x
        r = tl.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)
        for start in range(0, n_cols, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = to_f32(tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0))
            y = x * r[:, None]
            if HAS_W:
                w = to_f32(tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0))
                y = w[None, :] * y
            tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], cast_rne(y, y_ptr.dtype.element_ty), mask=mask)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D ``[rows, n]`` with unit column stride (a view when possible)."""
    if x.dim() and x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]:
        x2 = x2.contiguous()
    return x2


@register("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    n = x.shape[-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.numel() == 0:
        return y
    x2 = as_rows(x)
    rows = x2.shape[0]
    block = min(triton.next_power_of_2(n), MAX_BLOCK)
    grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]),)
    _rms_norm_kernel[grid](x2, weight if weight is not None else x2, y, rows, n, x2.stride(0), eps,
                           HAS_W=weight is not None, BLOCK=block)
    return y
