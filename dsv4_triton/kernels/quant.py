"""Triton quantisers (FP8, FP4/MXFP4, QAT simulation) and the Hadamard rotation.

Quantisers: the input, viewed as ``[rows, n]``, is a list of ``rows * n / block`` blocks;
each program takes ``TILE / BLOCK`` consecutive blocks, reduces each block's amax in
registers and writes codes and scales (or the dequantised values) in the same pass, so
each op is one launch that reads x once and writes its outputs once.  Scales and codes
come from the device functions of ``kernels/formats.py``, bit-exact twins of the oracle.

Hadamard: ``H_n`` has entries +-1, exact in BF16/FP16, so ``x @ H_n`` on tensor cores with
16-bit x has exact products and FP32 sums.  FP32 operands are split exactly into three
BF16 parts (8 + 8 + 8 significant bits) and multiplied three times.  For n <= 128 one
``[ROWS, n] @ [n, n]`` product; for n = 16A (256, 512) the Sylvester matrix factors as
``H_A (x) H_16`` (high index bits, low index bits), so two small products (over A, then
over 16) replace one of size n: A + 3 * 16 MACs per element instead of n (16-bit x; the
second product's operand is FP32, hence three parts).  The matrices
are built in registers from ``H[i, j] = (-1)^popcount(i & j)``; programs loop over row
tiles so each builds them once.  That is the standalone ``hadamard`` op.  Kernels that
rotate a few rows a program (``rope_hadamard_qat4`` here, the compressor's indexer entries)
use ``hadamard_butterfly`` instead: log2(n) FP32 add/subtract stages at any row count.

Fused finishing steps (one launch each, x read once): ``rope_qat8`` (RoPE on the last R
dims, qat8 on the rest) and ``rope_hadamard_qat4`` (RoPE, Hadamard, qat4, each step rounded
to x's dtype like the chain of public ops).  The rotation is ``kernels/rope.py``'s
``rotate_interleaved``, launched without FMA contraction as ``apply_rope`` is, so the RoPE
values are bit-identical to it.
"""

import math

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..registry import register
from .device import sm_count
from .formats import (INTERPRET, amax_nan, cast_rne, clamp_nan, e8m0_value, exp2i, fp4_code_in_range,
                      fp4_round_in_range, fp4_value, to_f32, to_fp8)
from .rows import as_rows
from .rope import clamp_position, rotate_interleaved

FP4_AMAX_FLOOR: tl.constexpr = tl.constexpr(6.0 * 2.0 ** -126)
FP8_AMAX_FLOOR: tl.constexpr = tl.constexpr(1e-4)

# TILE = elements per program; the first config is valid for every block (MAX_BLOCK = 1024).
_TILE_CONFIGS = [triton.Config({"TILE": t}, num_warps=w) for t, w in
                 ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16))]


def _prune_tiles(configs, nargs, **kw):
    return [c for c in configs if c.kwargs["TILE"] >= kw["BLOCK"]] or configs[:1]


@triton.jit
def _load_blocks(x_ptr, n_blocks, blocks_per_row, stride_row, BLOCK: tl.constexpr, BPP: tl.constexpr,
                 DENSE: tl.constexpr):
    """This program's ``[BPP, BLOCK]`` tile of blocks as FP32, their flat ids and validity.
    DENSE: rows are back to back (stride_row = row length), so no per-block row division."""
    bid = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)
    ok = bid < n_blocks
    if DENSE:
        start = bid * BLOCK
    else:
        row = bid // blocks_per_row
        start = row * stride_row + (bid - row * blocks_per_row) * BLOCK
    x = to_f32(tl.load(x_ptr + start[:, None] + tl.arange(0, BLOCK)[None, :], mask=ok[:, None], other=0.0))
    return x, bid, ok


@triton.jit
def fp8_quantise(x, POW2: tl.constexpr):
    """Blocks ``[R, B]`` (FP32, one block per row) -> (FP8 codes, FP32 scales ``[R]``), SPEC 2.

    A block with a NaN/Inf amax gets scale NaN and NaN codes (0x7F).
    """
    amax = amax_nan(x, 1)
    invalid = ~(amax < float("inf"))
    floored = tl.where(invalid, 1.0, tl.maximum(amax, FP8_AMAX_FLOOR))
    if POW2:
        e = fp8_scale_exponent(floored)
        v = x * exp2i(-e)[:, None]  # exact: x / 2^e
        s = exp2i(e)
    else:
        s = tl.math.div_rn(floored, 448.0)
        v = tl.math.div_rn(x, s[:, None])
    v = tl.where(invalid[:, None], float("nan"), clamp_nan(v, -448.0, 448.0))
    return to_fp8(v), tl.where(invalid, float("nan"), s)


@triton.jit
def fp8_scale_exponent(amax):
    """``ceil(log2(RN(amax / 448)))`` (int32) for FP32 ``amax`` >= 2^-100 (callers floor it at
    ``FP8_AMAX_FLOOR``), exact and without a division (an IEEE division is ~20 instructions and
    a slow-path call).  With amax = 2^k * m, m in [1, 2) and 448 = 1.75 * 2^8: the quotient
    2^(k-8) * m / 1.75 lies above 2^(k-8) by more than half an ulp when m > 1.75 (e = k - 7),
    is 2^(k-8) when m = 1.75, and below it by more than half an ulp when m < 1.75 (e = k - 8).
    Adding 0x1FFFFF to the bits carries into the exponent exactly when the mantissa exceeds
    1.75."""
    return ((amax.to(tl.int32, bitcast=True) + 0x1FFFFF) >> 23) - 135


@triton.jit
def fp8_block_codes(x, amax):
    """FP8-E4M3 codes of blocks of FP32 ``x`` (a block is its last axis; ``amax`` the blocks'
    ``amax_nan``, x's shape without that axis) with ``pack_kv_fp8``'s scale 2^e, e =
    ``fp8_scale_exponent`` of the floored amax.  -> (codes uint8, e, invalid, 2^-e).  No
    clamp: |x| 2^-e <= 448 in a finite block.  A NaN or Inf block (``invalid``) is multiplied
    by NaN, which the E4M3 conversion writes as the NaN code 0x7F, the code ``pack_kv_fp8``
    gives every element of such a block (checked on the GPU by the window write's NaN test);
    its e is meaningless (the scale byte is 0xFF there)."""
    invalid = ~(amax < float("inf"))
    ex = fp8_scale_exponent(tl.maximum(amax, FP8_AMAX_FLOOR))
    inv_scale = tl.where(invalid, float("nan"), exp2i(-ex))
    codes = to_fp8(x * tl.expand_dims(inv_scale, len(x.shape) - 1)).to(tl.uint8, bitcast=True)
    return codes, ex, invalid, inv_scale


@triton.jit
def fp4_scale_exponent(amax):
    """``ceil(log2(RN(amax / 6)))`` (int32) for positive normal FP32 ``amax``, exact and without
    a division.  With amax = 2^k * m, m in [1, 2): the quotient is 2^(k-2) * m / 1.5, which
    lies above 2^(k-2) by more than half an ulp when m > 1.5 (then e = k - 1), is 2^(k-2)
    when m = 1.5, and below 2^(k-2) by more than half an ulp when m < 1.5 (e = k - 2).  Adding
    0x3FFFFF to the bits carries into the exponent exactly when the mantissa exceeds 1.5."""
    return ((amax.to(tl.int32, bitcast=True) + 0x3FFFFF) >> 23) - 129


@triton.jit
def _fp4_block_exponents(x):
    """Per block (row) of ``x`` ``[R, B]``: the scale exponent e (2^e) and the invalid mask
    (NaN/Inf amax; e = 0 there)."""
    amax = amax_nan(x, 1)
    invalid = ~(amax < float("inf"))
    return fp4_scale_exponent(tl.where(invalid, 6.0, tl.maximum(amax, FP4_AMAX_FLOOR))), invalid


@triton.jit
def fp4_quantise(x):
    """Blocks ``[R, B]`` (FP32) -> (E2M1 codes int32, scale exponents e int32 ``[R]``, invalid ``[R]``).

    Scale ``2^e``; a block with a NaN/Inf amax is invalid: codes 0 (E8M0 byte 0xFF on store).
    """
    e, invalid = _fp4_block_exponents(x)
    # x * 2^-e rounds like the oracle's x / 2^e (exact above 2^-126); in a valid block it stays
    # below 6 (1 + 2^-23) in magnitude (2^e >= RN(amax / 6)), where the encoder rounds as
    # after the oracle's clamp to 6.
    codes = fp4_code_in_range(x * exp2i(-e)[:, None])
    return tl.where(invalid[:, None], 0, codes), e, invalid


@triton.jit
def fp4_qat(x):
    """Blocks ``[R, B]`` (FP32) -> ``fp4_qat_values(*fp4_quantise(x))`` in one step: each value
    rounded onto the E2M1 grid of its block's scale (NaN for invalid blocks)."""
    e, invalid = _fp4_block_exponents(x)
    scale = tl.where(invalid, float("nan"), exp2i(e))  # a NaN scale makes the whole block NaN
    # x * 2^-e rounds like the oracle's x / 2^e; the grid value times 2^e is exact (>= 2^-127).
    return fp4_round_in_range(x * exp2i(-e)[:, None]) * scale[:, None]


@triton.jit
def fp4_qat_values(codes, e, invalid):
    """Dequantised FP32 values of ``fp4_quantise``'s output (NaN for invalid blocks)."""
    y = fp4_value(codes) * exp2i(e)[:, None]
    return tl.where(invalid[:, None], float("nan"), y)


@triton.jit
def pack_fp4_words(codes, R: tl.constexpr, B: tl.constexpr):
    """E2M1 codes ``[R, B]`` (B a multiple of 8) -> int32 words ``[R, B / 8]``: element 8i + j
    in bits 4j..4j+3 of word i, the little-endian bytes of the packed layout."""
    nibbles = tl.reshape(codes, [R, B // 8, 8]) << (4 * tl.arange(0, 8))[None, None, :]
    return tl.sum(nibbles, axis=2)  # the nibbles do not overlap: the sum is their OR


@autotune(configs=_TILE_CONFIGS, key=["BLOCK", "POW2", "QAT"], name="fp8_blocks",
          prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit
def _fp8_blocks_kernel(x_ptr, q_ptr, s_ptr, y_ptr, n_blocks, blocks_per_row, stride_row,
                       BLOCK: tl.constexpr, POW2: tl.constexpr, QAT: tl.constexpr, DENSE: tl.constexpr,
                       TILE: tl.constexpr):
    BPP: tl.constexpr = TILE // BLOCK
    x, bid, ok = _load_blocks(x_ptr, n_blocks, blocks_per_row, stride_row, BLOCK, BPP, DENSE)
    q, s = fp8_quantise(x, POW2)
    out = bid[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    if QAT:
        y = q.to(tl.float32) * s[:, None]
        tl.store(y_ptr + out, cast_rne(y, y_ptr.dtype.element_ty), mask=ok[:, None])
    else:
        tl.store(q_ptr + out, q.to(tl.uint8, bitcast=True), mask=ok[:, None])
        tl.store(s_ptr + bid, s, mask=ok)


@autotune(configs=_TILE_CONFIGS, key=["BLOCK", "QAT"], name="fp4_blocks",
          prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit
def _fp4_blocks_kernel(x_ptr, p_ptr, s_ptr, y_ptr, n_blocks, blocks_per_row, stride_row,
                       BLOCK: tl.constexpr, QAT: tl.constexpr, DENSE: tl.constexpr, TILE: tl.constexpr):
    """QAT: values to ``y_ptr``.  Else codes to ``p_ptr``: int32 words of eight codes when
    BLOCK % 8 == 0 (the launcher passes the packed bytes viewed as int32), else bytes."""
    BPP: tl.constexpr = TILE // BLOCK
    x, bid, ok = _load_blocks(x_ptr, n_blocks, blocks_per_row, stride_row, BLOCK, BPP, DENSE)
    if QAT:
        y = fp4_qat(x)
        out = bid[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        tl.store(y_ptr + out, cast_rne(y, y_ptr.dtype.element_ty), mask=ok[:, None])
    else:
        codes, e, invalid = fp4_quantise(x)
        if BLOCK % 8 == 0:
            out = bid[:, None] * (BLOCK // 8) + tl.arange(0, BLOCK // 8)[None, :]
            tl.store(p_ptr + out, pack_fp4_words(codes, BPP, BLOCK), mask=ok[:, None])
        else:
            lo, hi = tl.split(tl.reshape(codes, [BPP, BLOCK // 2, 2]))  # element 2k low nibble
            out = bid[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
            tl.store(p_ptr + out, (lo | (hi << 4)).to(tl.uint8), mask=ok[:, None])
        tl.store(s_ptr + bid, tl.where(invalid, 255, e + 127).to(tl.uint8), mask=ok)


@autotune(configs=_TILE_CONFIGS, key=["BLOCK"], name="fp4_dequant",
          prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit
def _fp4_dequant_kernel(p_ptr, s_ptr, y_ptr, n_blocks, blocks_per_row, stride_p, stride_s,
                        BLOCK: tl.constexpr, TILE: tl.constexpr):
    BPP: tl.constexpr = TILE // BLOCK
    HALF: tl.constexpr = BLOCK // 2
    bid = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)
    ok = bid < n_blocks
    row = bid // blocks_per_row
    blk = bid - row * blocks_per_row
    byte = tl.load(p_ptr + row[:, None] * stride_p + blk[:, None] * HALF + tl.arange(0, HALF)[None, :],
                   mask=ok[:, None], other=0).to(tl.int32)
    scale = e8m0_value(tl.load(s_ptr + row * stride_s + blk, mask=ok, other=127))
    v = tl.reshape(tl.join(fp4_value(byte & 15), fp4_value(byte >> 4)), [BPP, BLOCK])
    y = v * scale[:, None]
    out = bid[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(y_ptr + out, cast_rne(y, y_ptr.dtype.element_ty), mask=ok[:, None])


def _flat_blocks(x: torch.Tensor, block: int):
    """(x as rows, block count, blocks per row, whether the rows are back to back)."""
    x2 = as_rows(x)
    per_row = x2.shape[1] // block
    return x2, x2.shape[0] * per_row, per_row, x2.stride(0) == x2.shape[1] or x2.shape[0] == 1


def _grid(n_blocks: int, block: int):
    return lambda meta: (triton.cdiv(n_blocks, meta["TILE"] // block),)


@register("act_quant", "triton")
def act_quant(x: torch.Tensor, block: int, pow2: bool):
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((*x.shape[:-1], x.shape[-1] // block), dtype=torch.float32, device=x.device)
    if q.numel():
        x2, n_blocks, per_row, dense = _flat_blocks(x, block)
        _fp8_blocks_kernel[_grid(n_blocks, block)](x2, q.view(torch.uint8), s, x2, n_blocks, per_row, x2.stride(0),
                                                   BLOCK=block, POW2=pow2, QAT=False, DENSE=dense)
    return q, s


@register("qat8", "triton")
def qat8(x: torch.Tensor, block: int, pow2: bool) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        x2, n_blocks, per_row, dense = _flat_blocks(x, block)
        _fp8_blocks_kernel[_grid(n_blocks, block)](x2, x2, x2, y, n_blocks, per_row, x2.stride(0),
                                                   BLOCK=block, POW2=pow2, QAT=True, DENSE=dense)
    return y


@register("fp4_quant", "triton")
def fp4_quant(x: torch.Tensor, block: int):
    p = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    s = torch.empty((*x.shape[:-1], x.shape[-1] // block), dtype=torch.float8_e8m0fnu, device=x.device)
    if p.numel():
        x2, n_blocks, per_row, dense = _flat_blocks(x, block)
        words = p.view(torch.int32) if block % 8 == 0 else p
        _fp4_blocks_kernel[_grid(n_blocks, block)](x2, words, s.view(torch.uint8), x2, n_blocks, per_row,
                                                   x2.stride(0), BLOCK=block, QAT=False, DENSE=dense)
    return p, s


@register("qat4", "triton")
def qat4(x: torch.Tensor, block: int) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        x2, n_blocks, per_row, dense = _flat_blocks(x, block)
        _fp4_blocks_kernel[_grid(n_blocks, block)](x2, x2, x2, y, n_blocks, per_row, x2.stride(0),
                                                   BLOCK=block, QAT=True, DENSE=dense)
    return y


@register("fp4_dequant", "triton")
def fp4_dequant(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = 2 * packed.shape[-1]
    y = torch.empty((*packed.shape[:-1], n), dtype=dtype, device=packed.device)
    if y.numel():
        block = n // scale.shape[-1]
        p2 = as_rows(packed.view(torch.uint8))
        s2 = as_rows(scale.view(torch.uint8))
        per_row = n // block
        n_blocks = p2.shape[0] * per_row
        _fp4_dequant_kernel[_grid(n_blocks, block)](p2, s2, y, n_blocks, per_row, p2.stride(0), s2.stride(0),
                                                    BLOCK=block)
    return y


# --- Hadamard ----------------------------------------------------------------------------

@triton.jit
def sylvester(N: tl.constexpr, dtype: tl.constexpr):
    """The Sylvester Hadamard matrix ``H_N`` (N <= 2^16) in ``dtype``: (-1)^popcount(i & j)."""
    i = tl.arange(0, N)
    v = i[:, None] & i[None, :]
    v = v ^ (v >> 8)
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return (1 - 2 * (v & 1)).to(tl.float32).to(dtype)


@triton.jit
def _mma(a, b, acc):
    if INTERPRET:
        # The interpreter multiplies BF16 operands as raw integers: use the exact FP32 values.
        return tl.dot(to_f32(a), to_f32(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot_pm1(a, h, acc):
    """``acc + a @ h`` for a +-1 matrix ``h`` (BF16, or FP16 when ``a`` is FP16) with exact products.

    16-bit ``a``: one tensor-core product.  FP32 ``a``: split exactly into three BF16 parts
    (the residuals of round-to-BF16 are exact in FP32), smallest part first.  A non-finite
    part leaves no residual (the value's BF16 rounding carries the Inf/NaN).
    """
    if a.dtype == tl.float32:
        hi = a.to(tl.bfloat16)
        hi32 = to_f32(hi)
        r = tl.where(tl.abs(hi32) < float("inf"), a - hi32, 0.0)
        mid = r.to(tl.bfloat16)
        lo = (r - to_f32(mid)).to(tl.bfloat16)
        acc = _mma(lo, h, acc)
        acc = _mma(mid, h, acc)
        return _mma(hi, h, acc)
    else:
        return _mma(a, h, acc)


@triton.jit
def hadamard_rows(x, scale, ROWS: tl.constexpr, N: tl.constexpr, KRON_A: tl.constexpr,
                  h_a, h_16, h_n):
    """``(x @ H_N) * scale`` for a ``[ROWS, N]`` tile (FP32 result).

    KRON_A = 0: one product with ``h_n``.  Otherwise N = 16 * KRON_A and the index splits as
    i = 16 a + b: the product over a (``h_a``, KRON_A x KRON_A) then over b (``h_16``).
    """
    if KRON_A == 0:
        y = dot_pm1(x, h_n, tl.zeros([ROWS, N], dtype=tl.float32))
    else:
        xt = tl.permute(tl.reshape(x, [ROWS, KRON_A, 16]), (0, 2, 1))  # [ROWS, b, a]
        z = dot_pm1(tl.reshape(xt, [ROWS * 16, KRON_A]), h_a, tl.zeros([ROWS * 16, KRON_A], dtype=tl.float32))
        zt = tl.permute(tl.reshape(z, [ROWS, 16, KRON_A]), (0, 2, 1))  # [ROWS, a, b]
        y = dot_pm1(tl.reshape(zt, [ROWS * KRON_A, 16]), h_16, tl.zeros([ROWS * KRON_A, 16], dtype=tl.float32))
        y = tl.reshape(y, [ROWS, N])
    return y * scale


@triton.jit
def hadamard_butterfly(x, LOG_N: tl.constexpr):
    """``x @ H_N`` (unscaled) for FP32 rows ``[R, N = 2^LOG_N]``, by LOG_N radix-2 stages on
    CUDA cores: stage j replaces each pair of elements whose indices differ in bit j by
    their sum and difference.  Any R works (the tensor-core form needs 16 rows); the
    compiler moves data between threads (through shared memory) where a stage's pairs sit
    in different threads.  Each output is
    its 2^LOG_N signed inputs added as a balanced tree, one FP32 rounding a level, so it
    lies within FP32 rounding of the exact sum, as the tensor-core form does; exact when
    every partial sum is representable (integers, say)."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    for j in tl.static_range(LOG_N):
        # [R, N / 2^(j+1), 2^j, 2]: the pair (bit j = 0, 1) as the last, size-2 axis.
        a, b = tl.split(tl.permute(tl.reshape(x, [R, N // (2 << j), 2, 1 << j]), (0, 1, 3, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [R, N])
    return x


_HADAMARD_CONFIGS = [triton.Config({"ROWS": r}, num_warps=w) for r, w in
                     ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8))]


@autotune(configs=_HADAMARD_CONFIGS, key=["N"], name="hadamard")
@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, n_rows, stride_x, scale, N: tl.constexpr, KRON_A: tl.constexpr,
                     MMA_DTYPE: tl.constexpr, ROWS: tl.constexpr):
    if KRON_A == 0:
        h_n = sylvester(N, MMA_DTYPE)
        h_a = h_n
        h_16 = h_n
    else:
        h_a = sylvester(KRON_A, MMA_DTYPE)
        h_16 = sylvester(16, tl.bfloat16)  # the second product's operand is FP32: BF16 parts
        h_n = h_a
    cols = tl.arange(0, N)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = (tile * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # n_rows < 2^31; offsets are not
        mask = (rows < n_rows)[:, None]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        y = hadamard_rows(x, scale, ROWS, N, KRON_A, h_a, h_16, h_n)
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], cast_rne(y, y_ptr.dtype.element_ty), mask=mask)


def kron_split(n: int) -> int:
    """KRON_A for ``hadamard_rows``: 0 (one product) for n <= 128, else n / 16."""
    return 0 if n <= 128 else n // 16


def mma_dtype(dtype: torch.dtype):
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def max_programs(device: torch.device) -> int:
    """Programs for row-looping kernels: a few per SM (the interpreter runs them one by one)."""
    return 4 * sm_count(device) if device.type == "cuda" else 4


def hadamard_scale(n: int) -> float:
    """``n ** -0.5`` rounded to FP32, as a Python float (passed to kernels exactly)."""
    return float(torch.tensor(n ** -0.5, dtype=torch.float32))


@register("hadamard", "triton")
def hadamard(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2 = as_rows(x)
    rows = x2.shape[0]
    progs = max_programs(x.device)
    grid = lambda meta: (min(triton.cdiv(rows, meta["ROWS"]), progs),)
    _hadamard_kernel[grid](x2, y, rows, x2.stride(0), hadamard_scale(n), N=n, KRON_A=kron_split(n),
                           MMA_DTYPE=mma_dtype(x.dtype))
    return y


# --- fused finishing steps: RoPE + quantiser ---------------------------------------------

_ROWS_CONFIGS = [triton.Config({"ROWS": r}, num_warps=w) for r, w in
                 ((16, 4), (4, 4), (8, 4), (16, 8), (32, 8), (64, 8))]


@autotune(configs=_ROWS_CONFIGS, key=["HEAD_DIM", "ROPE_DIM", "BLOCK"], name="rope_qat8")
@triton.jit
def _rope_qat8_kernel(x_ptr, y_ptr, table_ptr, pos_ptr, n_rows, rows_per_slot, max_pos,
                      stride_xs, stride_xm, stride_xd, stride_pos,
                      HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK: tl.constexpr,
                      NB_P2: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr):
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < n_rows
    slot = row // rows_per_slot
    inner = row - slot * rows_per_slot
    x_row = x_ptr + slot * stride_xs + inner * stride_xm
    y_row = y_ptr + row * HEAD_DIM
    out_dtype: tl.constexpr = y_ptr.dtype.element_ty
    if NOPE > 0:
        # The nope dims as [ROWS, NB_P2, BLOCK] blocks (NB_P2 = NOPE / BLOCK rounded up to a
        # power of two; the extra blocks are masked out).
        b = tl.arange(0, NB_P2)
        col = b[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = row_ok[:, None, None] & (b < NOPE // BLOCK)[None, :, None]
        x = to_f32(tl.load(x_row[:, None, None] + col[None, :, :] * stride_xd, mask=mask, other=0.0))
        q, s = fp8_quantise(tl.reshape(x, [ROWS * NB_P2, BLOCK]), True)
        v = tl.reshape(q.to(tl.float32) * s[:, None], [ROWS, NB_P2, BLOCK])
        tl.store(y_row[:, None, None] + col[None, :, :], cast_rne(v, out_dtype), mask=mask)
    pos = clamp_position(tl.load(pos_ptr + slot * stride_pos, mask=row_ok, other=0), max_pos)
    c = tl.arange(0, BLOCK_R)
    mask = row_ok[:, None] & (c < ROPE_DIM)[None, :]
    xr = to_f32(tl.load(x_row[:, None] + (NOPE + c)[None, :] * stride_xd, mask=mask, other=0.0))
    yr = rotate_interleaved(xr, table_ptr, pos, ROPE_DIM, False)
    tl.store(y_row[:, None] + NOPE + c[None, :], cast_rne(yr, out_dtype), mask=mask)


# Butterflies work at any row count, so tiles stay small enough that many programs share an
# SM and one's loads run under another's arithmetic (H100, [4096, 64, 128] bf16: 16 rows on
# 4 warps 63.7 us; the tensor-core product, which needs 16+ rows, 88 us in its best form).
_ROPE_HADAMARD_CONFIGS = [triton.Config({"ROWS": r}, num_warps=w) for r, w in
                          ((16, 4), (8, 4), (32, 4), (8, 2), (4, 1), (64, 8))]


@autotune(configs=_ROPE_HADAMARD_CONFIGS, key=["HEAD_DIM", "ROPE_DIM"], name="rope_hadamard_qat4")
@triton.jit
def _rope_hadamard_qat4_kernel(x_ptr, y_ptr, table_ptr, pos_ptr, n_rows, rows_per_slot, max_pos,
                               stride_xs, stride_xm, stride_xd, stride_pos, scale,
                               HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, LOG_N: tl.constexpr,
                               ROWS: tl.constexpr):
    CHUNKS: tl.constexpr = HEAD_DIM // ROPE_DIM
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    cols = tl.arange(0, HEAD_DIM)
    c = tl.arange(0, ROPE_DIM)
    last_chunk = (tl.arange(0, CHUNKS) == CHUNKS - 1)[None, :, None]
    # Row, slot and index in the slot in 32 bits (n_rows < 2^31: a cheap division); the
    # offsets from them in 64 bits.
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = row < n_rows
    slot = row // rows_per_slot
    inner = row - slot * rows_per_slot
    x_row = x_ptr + slot.to(tl.int64) * stride_xs + inner.to(tl.int64) * stride_xm
    x = to_f32(tl.load(x_row[:, None] + cols[None, :] * stride_xd, mask=row_ok[:, None], other=0.0))
    # RoPE on the last chunk of R dims (reloaded from L1), merged back into the row.
    pos = clamp_position(tl.load(pos_ptr + slot.to(tl.int64) * stride_pos, mask=row_ok, other=0), max_pos)
    xr = to_f32(tl.load(x_row[:, None] + (HEAD_DIM - ROPE_DIM + c)[None, :] * stride_xd,
                        mask=row_ok[:, None], other=0.0))
    yr = rotate_interleaved(xr, table_ptr, pos, ROPE_DIM, False)
    r = tl.where(last_chunk, yr[:, None, :], tl.reshape(x, [ROWS, CHUNKS, ROPE_DIM]))
    # Each step rounds to x's dtype, as the chain apply_rope -> hadamard -> qat4 does.
    r = to_f32(cast_rne(tl.reshape(r, [ROWS, HEAD_DIM]), dtype))
    h = to_f32(cast_rne(hadamard_butterfly(r, LOG_N) * scale, dtype))
    y = tl.reshape(fp4_qat(tl.reshape(h, [ROWS * HEAD_DIM // 32, 32])), [ROWS, HEAD_DIM])
    tl.store(y_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :], cast_rne(y, dtype), mask=row_ok[:, None])


def _slots(x: torch.Tensor, positions: torch.Tensor):
    """``x`` as ``[P, M, D]`` (P = positions' elements; a view when the strides allow) and
    the positions as ``[P]``."""
    n_slots = positions.numel()
    x3 = x.reshape(n_slots, math.prod(x.shape[positions.dim():-1]), x.shape[-1])
    return x3, positions.reshape(n_slots)


@register("rope_qat8", "triton")
def rope_qat8(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, block: int) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x3, pos = _slots(x, positions)
    n_rows = x3.shape[0] * x3.shape[1]
    head_dim, rope_dim = x.shape[-1], 2 * freqs.shape[1]
    table = freqs.contiguous()
    grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)
    _rope_qat8_kernel[grid](x3, y, table, pos, n_rows, x3.shape[1], table.shape[0], *x3.stride(), pos.stride(0),
                            HEAD_DIM=head_dim, ROPE_DIM=rope_dim, BLOCK=block,
                            NB_P2=triton.next_power_of_2(max(1, (head_dim - rope_dim) // block)),
                            BLOCK_R=triton.next_power_of_2(rope_dim), enable_fp_fusion=False)
    return y


@register("rope_hadamard_qat4", "triton")
def rope_hadamard_qat4(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x3, pos = _slots(x, positions)
    n_rows = x3.shape[0] * x3.shape[1]
    head_dim = x.shape[-1]
    table = freqs.contiguous()
    grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)
    _rope_hadamard_qat4_kernel[grid](x3, y, table, pos, n_rows, x3.shape[1], table.shape[0], *x3.stride(),
                                     pos.stride(0), hadamard_scale(head_dim), HEAD_DIM=head_dim,
                                     ROPE_DIM=2 * freqs.shape[1], LOG_N=head_dim.bit_length() - 1,
                                     enable_fp_fusion=False)
    return y
