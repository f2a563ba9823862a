"""Triton RMSNorm: one read of each row, FP32 math, one write.

Rows of up to ``MAX_BLOCK`` elements are held in registers whole; longer rows are
streamed twice (sum of squares, then scale), the second pass mostly from L2.
Several short rows share a program so each program moves enough bytes to hide latency.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..registry import register

MAX_BLOCK = 16384


@autotune(
    configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in
             ((1, 4), (1, 8), (1, 16), (2, 8), (4, 4), (4, 8), (8, 4))],
    key=["BLOCK"],  # tuned per row-length bucket, not per exact length
    name="rms_norm",
    prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
        c for c in configs if c.kwargs["ROWS"] * kw["BLOCK"] <= MAX_BLOCK] or configs[:1]},
)
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_x, eps,
                     HAS_W: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    if BLOCK >= n_cols:
        cols = tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        y = x * r[:, None]
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            y = w[None, :] * y
        tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        r = tl.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = x * r[:, None]
            if HAS_W:
                w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                y = w[None, :] * y
            tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


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
