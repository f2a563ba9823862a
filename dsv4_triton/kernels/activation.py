"""Triton SwiGLU with clamp: one pass, gate and up read once, the output written once.

FP32 math as SPEC 4 writes it: ``g = min(gate, limit)`` (NaN kept), ``u = clamp(up)``,
``h = g / (1 + exp(-g)) * u``, then times the row's weight.  ``exp`` and ``/`` are the
GPU's fast FP32 forms (about 2 ulp each; ``exp(-g)`` carries a further relative error of
about ``|g| * 2^-24`` from the range reduction), which a memory-bound kernel gets for free;
the tests bound the difference to the oracle accordingly.  ``gate = -inf`` gives NaN, as
``torch.nn.functional.silu`` does.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..registry import register
from .formats import cast_rne, clamp_nan
from .rows import as_rows

MAX_TILE = 8192
MAX_GRID_Y = 65535  # column blocks go on grid axis 1


@autotune(
    configs=[triton.Config({"ROWS": r, "BLOCK": b}, num_warps=w) for r, b, w in
             ((4, 256, 4), (1, 1024, 4), (1, 2048, 8), (1, 4096, 8), (2, 1024, 4), (2, 2048, 8),
              (4, 1024, 8), (8, 512, 4), (16, 256, 4), (32, 128, 4))],
    key=["n_cols", "HAS_WEIGHT"],
    name="swiglu",
    prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
        c for c in configs if c.kwargs["BLOCK"] <= max(128, triton.next_power_of_2(nargs["n_cols"]))
        and c.kwargs["ROWS"] * c.kwargs["BLOCK"] <= MAX_TILE
        and triton.cdiv(nargs["n_cols"], c.kwargs["BLOCK"]) <= MAX_GRID_Y] or configs[:1]},
)
@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, weight_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up, stride_weight, limit,
                   HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_ok = row < n_rows
    mask = row_ok[:, None] & (col[None, :] < n_cols)
    g = tl.load(gate_ptr + row[:, None] * stride_gate + col[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row[:, None] * stride_up + col[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.where(g > limit, limit, g)  # a NaN compares false and stays
    u = clamp_nan(u, -limit, limit)
    h = g / (1.0 + tl.exp(-g)) * u
    if HAS_WEIGHT:
        h = h * tl.load(weight_ptr + row * stride_weight, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + row[:, None] * n_cols + col[None, :], cast_rne(h, out_ptr.dtype.element_ty), mask=mask)


@register("swiglu", "triton")
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, weight: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    gate2, up2 = as_rows(gate), as_rows(up)
    n_rows, n_cols = gate2.shape
    weight = weight.reshape(n_rows) if weight is not None else None
    grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS"]), triton.cdiv(n_cols, meta["BLOCK"]))
    _swiglu_kernel[grid](gate2, up2, weight if weight is not None else gate2, out, n_rows, n_cols,
                         gate2.stride(0), up2.stride(0), weight.stride(0) if weight is not None else 0, limit,
                         HAS_WEIGHT=weight is not None)
    return out
