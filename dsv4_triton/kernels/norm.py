"""Triton RMSNorm: one read of each row from memory, FP32 math, one write.

A program owns ``ROWS`` rows. A row is either held in registers whole (one chunk of the
row's power-of-two width) or streamed in ``CHUNK``-wide pieces twice: sum of squares,
then scale, the second pass hitting L2 (the row was just read). The chunked form also
avoids the idle lanes of padding a row like 7168 up to 8192; the tuner picks per
row-width bucket.

``rms_norm_act_quant`` is the same kernel with ``QUANT`` on: each stored chunk (a multiple
of 128 wide) is also quantised, from its rounded values, into ``act_quant(y, 128, pow2)``'s
FP8 codes and scales.  The projections that follow a norm in the model take those codes, so
the rows are neither read again nor quantised once per projection.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..registry import register
from .formats import cast_rne, to_f32
from .quant import fp8_quantise
from .rows import as_rows

MAX_BLOCK = 16384


@triton.jit
def _store_normed(y, y_ptr, q_ptr, s_ptr, rows, row_ok, start, n_cols, QUANT: tl.constexpr, ROWS: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Round the FP32 chunk ``y [ROWS, CHUNK]`` to the output dtype and store it; with QUANT
    (n_cols a multiple of 128) also its 128-blocks' FP8 codes and scales, computed from the
    rounded values, so they equal ``act_quant`` of the stored rows bit for bit."""
    cols = start + tl.arange(0, CHUNK)
    yr = cast_rne(y, y_ptr.dtype.element_ty)
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], yr, mask=mask)
    if QUANT:
        q, s = fp8_quantise(tl.reshape(to_f32(yr), (ROWS * CHUNK // 128, 128)), True)
        tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :],
                 tl.reshape(q.to(tl.uint8, bitcast=True), (ROWS, CHUNK)), mask=mask)
        blocks = start // 128 + tl.arange(0, CHUNK // 128)
        tl.store(s_ptr + rows[:, None] * (n_cols // 128) + blocks[None, :], tl.reshape(s, (ROWS, CHUNK // 128)),
                 mask=row_ok[:, None] & (blocks[None, :] < n_cols // 128))


@triton.jit
def _rms_norm_rows(x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, n_rows, n_cols, stride_x, eps,
                   HAS_W: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                   SPLIT: tl.constexpr):
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
        _store_normed(y, y_ptr, q_ptr, s_ptr, rows, row_ok, 0, n_cols, QUANT, ROWS, CHUNK)
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
            _store_normed(y, y_ptr, q_ptr, s_ptr, rows, row_ok, start, n_cols, QUANT, ROWS, CHUNK)


def _tuned(name: str):
    """The row kernel under a tuner of its own: the plain norm and the quantising one store
    different bytes a row, so each keeps its own best config per row-width bucket."""
    return autotune(
        configs=[triton.Config({"ROWS": r, "SPLIT": s}, num_warps=w) for r, s, w in
                 ((1, 1, 4), (1, 1, 8), (1, 1, 16), (2, 1, 8), (4, 1, 4), (4, 1, 8), (8, 1, 4),
                  (1, 2, 8), (1, 4, 4), (1, 4, 8), (1, 8, 4), (2, 4, 8))],
        key=["BLOCK"],  # tuned per row-width bucket, not per exact length
        name=name,
        prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
            c for c in configs if c.kwargs["ROWS"] * kw["BLOCK"] // c.kwargs["SPLIT"] <= MAX_BLOCK
            and kw["BLOCK"] // c.kwargs["SPLIT"] >= min(256, kw["BLOCK"])] or configs[:1]},
    )(_rms_norm_rows)


_rms_norm_kernel = _tuned("rms_norm")
_rms_norm_act_quant_kernel = _tuned("rms_norm_act_quant")


def _launch(kernel, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, y: torch.Tensor,
            q: torch.Tensor, s: torch.Tensor) -> None:
    x2 = as_rows(x)
    rows, n = x2.shape
    block = min(triton.next_power_of_2(n), MAX_BLOCK)
    grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]),)  # noqa: E731
    kernel[grid](x2, weight if weight is not None else x2, y, q, s, rows, n, x2.stride(0), eps,
                 HAS_W=weight is not None, QUANT=kernel is _rms_norm_act_quant_kernel, BLOCK=block)


@register("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.numel():
        _launch(_rms_norm_kernel, x, weight, eps, y, y, y)
    return y


@register("rms_norm_act_quant", "triton")
def rms_norm_act_quant(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    q = torch.empty(y.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((*y.shape[:-1], y.shape[-1] // 128), dtype=torch.float32, device=x.device)
    if y.numel():
        _launch(_rms_norm_act_quant_kernel, x, weight, eps, y, q.view(torch.uint8), s)
    return y, q, s
