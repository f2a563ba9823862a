"""Triton RoPE: the (cos, sin) table builder and the one-pass interleaved-pair rotation.

``rotate_interleaved`` is the device function that other fused kernels (RoPE followed by
a quantiser) call on their rotated block; ``clamp_position`` is the position handling
every RoPE kernel shares.

Bit-exactness with the oracle: the rotation is two FP32 products and one add/sub per
output, each rounded, exactly as ``reference/rope.py`` writes it.  That holds only when
the kernel is compiled without fused multiply-adds, so every launch here passes
``enable_fp_fusion=False`` (a kernel that leaves fusion on gets the FMA-rounded result,
within one FP32 ulp of the pair's larger product before the output rounding).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..autotune import autotune
from ..reference.rope import yarn_ramp_range
from ..registry import register
from .formats import INTERPRET, cast_rne

# Largest column block one program holds per row for the copied (not rotated) dims;
# longer heads loop over it.
MAX_PASS_BLOCK = 1024
MAX_TILE = 16384


@triton.jit
def clamp_position(pos, max_pos):
    """Positions clamped into ``[0, max_pos)``: out-of-range positions never read outside
    the table (checked mode rejects them before launch)."""
    return tl.minimum(tl.maximum(pos, 0), max_pos - 1)


@triton.jit
def rotate_interleaved(x, table_ptr, pos, ROPE_DIM: tl.constexpr, INVERSE: tl.constexpr):
    """RoPE of a block of rows, interleaved pairs (SPEC 4).

    x: FP32 ``[ROWS, BLOCK_R]`` with ``BLOCK_R`` a power of two >= ``ROPE_DIM``: each row's
    rotated dims, element ``2i`` and ``2i+1`` a pair.  Columns from ``ROPE_DIM`` on are
    padding: they come back as 0 (mask them on store).
    table_ptr: the contiguous FP32 ``rope_freqs`` table ``[max_pos, ROPE_DIM/2, 2]``.
    pos: int ``[ROWS]``, each row's position, already inside ``[0, max_pos)`` (use
    ``clamp_position``); padding rows may carry any in-range position.
    Returns FP32 ``[ROWS, BLOCK_R]``: ``(x0 c - x1 s, x0 s + x1 c)`` per pair, with ``s``
    negated when ``INVERSE``.
    """
    ROWS: tl.constexpr = x.shape[0]
    BLOCK_R: tl.constexpr = x.shape[1]
    col = tl.arange(0, BLOCK_R)
    # Row p of the table is ROPE_DIM floats: (cos, sin) interleaved like x's pairs.
    cs = tl.load(table_ptr + pos.to(tl.int64)[:, None] * ROPE_DIM + col[None, :],
                 mask=col[None, :] < ROPE_DIM, other=0.0)
    x0, x1 = tl.split(tl.reshape(x, [ROWS, BLOCK_R // 2, 2]))
    cos, sin = tl.split(tl.reshape(cs, [ROWS, BLOCK_R // 2, 2]))
    if INVERSE:
        sin = -sin
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return tl.reshape(tl.join(y0, y1), [ROWS, BLOCK_R])


@autotune(
    configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in
             ((4, 4), (1, 4), (2, 4), (8, 4), (8, 8), (16, 4), (16, 8), (32, 8), (64, 8), (128, 8))],
    key=["HEAD_DIM", "ROPE_DIM", "COPY_PASS"],
    name="apply_rope",
    restore_value=["out_ptr"],  # tuning the in-place form must not rotate x once per trial
    prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
        c for c in configs if c.kwargs["ROWS"] * (kw["BLOCK_PASS"] + kw["BLOCK_ROPE"]) <= MAX_TILE] or configs[:1]},
)
@triton.jit
def _apply_rope_kernel(x_ptr, out_ptr, table_ptr, pos_ptr, n_rows, rows_per_slot, max_pos,
                       stride_xs, stride_xm, stride_xd, stride_os, stride_om, stride_od, stride_pos,
                       HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_PASS: tl.constexpr,
                       BLOCK_ROPE: tl.constexpr, COPY_PASS: tl.constexpr, INVERSE: tl.constexpr,
                       ROWS: tl.constexpr):
    PASS_DIM: tl.constexpr = HEAD_DIM - ROPE_DIM
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < n_rows
    slot = row // rows_per_slot
    inner = row - slot * rows_per_slot
    x_row = x_ptr + slot * stride_xs + inner * stride_xm
    out_row = out_ptr + slot * stride_os + inner * stride_om
    if COPY_PASS:
        for start in tl.static_range(0, PASS_DIM, BLOCK_PASS):
            col = start + tl.arange(0, BLOCK_PASS)
            mask = row_ok[:, None] & (col[None, :] < PASS_DIM)
            v = tl.load(x_row[:, None] + col[None, :] * stride_xd, mask=mask)
            tl.store(out_row[:, None] + col[None, :] * stride_od, v, mask=mask)
    pos = clamp_position(tl.load(pos_ptr + slot * stride_pos, mask=row_ok, other=0), max_pos)
    col = tl.arange(0, BLOCK_ROPE)
    mask = row_ok[:, None] & (col[None, :] < ROPE_DIM)
    x = tl.load(x_row[:, None] + (PASS_DIM + col[None, :]) * stride_xd, mask=mask, other=0.0)
    y = rotate_interleaved(x.to(tl.float32), table_ptr, pos, ROPE_DIM, INVERSE)
    tl.store(out_row[:, None] + (PASS_DIM + col[None, :]) * stride_od, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


def _launch_apply_rope(x3: torch.Tensor, out3: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor,
                       inverse: bool, copy_pass: bool) -> None:
    """x3/out3: ``[P, M, D]`` views (any strides); positions: P elements."""
    n_slots, rows_per_slot, head_dim = x3.shape
    rope_dim = 2 * freqs.shape[1]
    n_rows = n_slots * rows_per_slot
    if n_rows == 0:
        return
    table = freqs.contiguous()  # rotate_interleaved indexes a contiguous table (a no-op for rope_freqs' own)
    pos = positions.reshape(n_slots)
    pass_dim = head_dim - rope_dim
    copy_pass = copy_pass and pass_dim > 0
    block_pass = min(triton.next_power_of_2(pass_dim), MAX_PASS_BLOCK) if copy_pass else 1
    grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)
    _apply_rope_kernel[grid](
        x3, out3, table, pos, n_rows, rows_per_slot, table.shape[0],
        *x3.stride(), *out3.stride(), pos.stride(0),
        HEAD_DIM=head_dim, ROPE_DIM=rope_dim, BLOCK_PASS=block_pass,
        BLOCK_ROPE=triton.next_power_of_2(rope_dim), COPY_PASS=copy_pass,
        INVERSE=inverse, enable_fp_fusion=False)


@register("apply_rope", "triton")
def apply_rope(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_slots = positions.numel()
    shape3 = (n_slots, math.prod(x.shape[positions.dim():-1]), x.shape[-1])
    # reshape is a view for every layout whose position dims and remaining leading dims
    # each flatten; other layouts are copied first.
    _launch_apply_rope(x.reshape(shape3), out.view(shape3), freqs, positions, inverse, copy_pass=True)
    return out


@register("apply_rope_", "triton")
def apply_rope_(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool) -> None:
    n_slots = positions.numel()
    x3 = x.view(n_slots, math.prod(x.shape[positions.dim():-1]), x.shape[-1])  # the op checked it is a view
    _launch_apply_rope(x3, x3, freqs, positions, inverse, copy_pass=False)


@triton.jit
def _pow_f64(base, exponent):
    if INTERPRET:
        return tl.exp(exponent * tl.log(base))
    else:
        return libdevice.pow(base, exponent)


@triton.jit
def _cos_sin_f64(angle):
    if INTERPRET:
        return tl.cos(angle), tl.sin(angle)
    else:
        return libdevice.cos(angle), libdevice.sin(angle)


@triton.jit
def _rope_freqs_kernel(out_ptr, max_pos, ROPE_DIM: tl.constexpr, THETA: tl.constexpr, YARN: tl.constexpr,
                       YARN_FACTOR: tl.constexpr, RAMP_LOW: tl.constexpr, RAMP_HIGH: tl.constexpr,
                       BLOCK_POS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    HALF: tl.constexpr = ROPE_DIM // 2
    pos = tl.program_id(0) * BLOCK_POS + tl.arange(0, BLOCK_POS)
    i = tl.arange(0, BLOCK_HALF)
    # The frequencies in FP64, rounded once (as the oracle): constexpr scalars enter as
    # exact FP64 constants through tl.full.
    fi = i.to(tl.float64)
    freq = _pow_f64(tl.full([BLOCK_HALF], THETA, tl.float64), (fi * -2.0) / ROPE_DIM)
    if YARN:
        low = tl.full([BLOCK_HALF], RAMP_LOW, tl.float64)
        high = tl.full([BLOCK_HALF], RAMP_HIGH, tl.float64)
        ramp = tl.minimum(tl.maximum((fi - low) / (high - low), 0.0), 1.0)
        freq = freq / tl.full([BLOCK_HALF], YARN_FACTOR, tl.float64) * ramp + freq * (1.0 - ramp)
    angle = pos.to(tl.float32)[:, None] * freq.to(tl.float32)[None, :]  # one FP32 product
    cos, sin = _cos_sin_f64(angle.to(tl.float64))
    offs = pos.to(tl.int64)[:, None, None] * ROPE_DIM + 2 * i[None, :, None] + tl.arange(0, 2)[None, None, :]
    mask = tl.broadcast_to(((pos[:, None] < max_pos) & (i[None, :] < HALF))[:, :, None], [BLOCK_POS, BLOCK_HALF, 2])
    tl.store(out_ptr + offs, tl.join(cos.to(tl.float32), sin.to(tl.float32)), mask=mask)


@register("rope_freqs", "triton")
def rope_freqs(rope_dim, max_pos, theta, yarn_factor, yarn_original_max_pos, yarn_beta_fast, yarn_beta_slow,
               device) -> torch.Tensor:
    out = torch.empty(max_pos, rope_dim // 2, 2, dtype=torch.float32, device=device)
    if yarn_factor is None:
        ramp_low, ramp_high = 0.0, 1.0  # unused
    else:
        ramp_low, ramp_high = yarn_ramp_range(rope_dim, theta, yarn_original_max_pos, yarn_beta_fast, yarn_beta_slow)
    block_half = triton.next_power_of_2(rope_dim // 2)
    block_pos = max(1, min(64, 2048 // block_half))
    _rope_freqs_kernel[(triton.cdiv(max_pos, block_pos),)](
        out, max_pos, ROPE_DIM=rope_dim, THETA=float(theta), YARN=yarn_factor is not None,
        YARN_FACTOR=float(yarn_factor or 1.0), RAMP_LOW=ramp_low, RAMP_HIGH=ramp_high,
        BLOCK_POS=block_pos, BLOCK_HALF=block_half, num_warps=4, enable_fp_fusion=False)
    return out
