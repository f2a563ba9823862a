"""Triton block-scaled GEMMs: ``fp8_linear``, ``fp4_linear`` (and the device functions the
MoE kernels share), plus the batched BF16 ``grouped_linear``.

Activation: ``act_quant(x, 128, pow2=True)`` (SPEC 3).  For up to 16 rows (decode) each
program quantises its ``[BLOCK_M, 128]`` slice of ``x`` in the prologue of every K step (one
launch, and the re-quantisation per N tile costs little next to the weight stream); for
more rows a small pre-pass writes the FP8 codes and scales once, and the GEMM reads them.
Either way the codes and scales are bit-identical to the oracle's: the amax, the correctly
rounded ``amax / 448`` and the power-of-two exponent are the oracle's operations.

Main loop, one step per 128-wide K block: ``d = dot(a_fp8, w^T)`` on tensor cores with FP32
results, then per-block promotion in FP32, as in the release's kernels (a dot never spans
two scales): FP8 weights, whose column tile lies in one 128 x 128 scale block, take one FMA
per element, ``acc += d * (a_scale[m] * w_scale)`` (``fp8_tile_step``); FP4 weights
``acc += (d * a_scale[m]) * w_scale[n]``.  FP8 operands reach the kernel typed FP8 (on a
GPU), so their tiles go from the asynchronous copies straight to the tensor cores.

Weights:

* FP8: codes as stored; the scale of column n is that of its 128 x 128 block.
* MXFP4: each byte holds two E2M1 codes.  In the K step, with ``e_j`` the four E8M0
  exponents of the row's 32-blocks and ``e_max`` their maximum, the operand is
  ``fp8(lut[code] * 2^(e_j - e_max + 6))``, the column scale ``2^e_max`` and the row
  scales carry the ``2^-6``.  The operand is built by table: for each 32-block the eight
  magnitudes' FP8 bytes (one table row per gap ``e_max - e_j``, ``fp4_fp8_table``; computed
  from the gap in 12 instructions, or gathered from the table, a config choice, see
  ``load_weight_block``) sit in two registers and ``prmt`` byte permutes turn a word of eight
  codes into eight FP8 bytes in nine integer instructions (``fp4_expand``), in place of a
  decode, a multiply and a conversion per element.
  Exactness: lut magnitudes are 0.5..6 with two significant bits; ``lut * 2^(6 - d)`` with
  ``d = e_max - e_j`` is at most 384 < 448 and is exactly representable in E4M3 (normal or
  subnormal, smallest step 2^-9) whenever ``d <= 14``, so for every row whose four
  exponents in a 128-block span at most 14 binades the product equals the oracle's exactly
  (only the FP32 summation order differs).  A wider span (never produced by quantising
  real weights: it needs one 32-block 16000 times smaller than its neighbour) rounds the
  small blocks' values to the nearest E4M3 step: each such element is off by at most
  ``2^(e_max - 16)``, i.e. ``2^-16`` of the block's largest scale; the tests check both
  regimes against the oracle (the table holds exactly those rounded values).  Codes are
  expanded in registers, never materialised.
* NVFP4: ``lut[code] * s16`` (E4M3 scale per 16) has at most 6 significant bits and is
  exact in BF16, so the weight is expanded to BF16 and the activation codes (exact in
  BF16) meet it in a BF16 dot; the FP32 global scale multiplies the result once.  From
  ``NVFP4_EXPAND_MIN_ROWS`` rows the expansion is a pass of its own and the product a plain
  BF16 GEMM (``nvfp4_expanded_gemm``): the same values, the same single rounding.

NaN/Inf: a non-finite activation block gives scale NaN, so its row of the output is NaN (as
the oracle's dequantised NaN block); an E8M0 NaN scale byte (0xFF) makes its columns NaN.

Split K (decode, a config choice): a weight with few column tiles (N = 1536 or 512 rows
against K = 7168: 12-48 programs) cannot keep enough bytes in flight to stream at the copy
rate, so up to ``SPLIT_MAX_ROWS`` rows the tuner may also split the K blocks over
``SPLIT_K`` programs per tile.  Each writes its FP32 partial tile to a workspace and counts
its arrival; the last to arrive adds the partials in split order (the same bits whatever
the arrival order), rounds once to BF16, stores, and resets the counter.  One launch, no
atomics on data.

Out-of-bounds: rows, columns and K are masked on every load and store; any M, N >= 1 and
any K (FP8) or K a multiple of 32 (MXFP4) / 16 (NVFP4) is accepted.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..registry import register
from .formats import INTERPRET, amax_nan, ceil_log2, clamp_nan, e8m0_value, exp2i, fp8_value, to_fp8
from .rows import as_rows
from .rope import cast_rne

ACT_BLOCK = 128
W_FP8: tl.constexpr = tl.constexpr(0)
W_MXFP4: tl.constexpr = tl.constexpr(1)
W_NVFP4: tl.constexpr = tl.constexpr(2)
FORMAT_CODES = {"fp8": 0, "mxfp4": 1, "nvfp4": 2}
# Up to this many rows the activation is quantised in the GEMM prologue.  Every N tile
# re-quantises its rows, about 12 * BLOCK_M / BLOCK_N operations per weight byte: negligible
# for 16 rows, as costly as the weight stream itself for 64; then the pre-pass wins.
FUSED_QUANT_MAX_ROWS = 16
# Split-K configs are tried up to this many rows and only where the column tiles alone leave
# SMs idle; the workspace holds SPLIT_MAX partial [M, N] tiles.
SPLIT_MAX_ROWS = 64
# NVFP4 weights from this many rows: expanded to BF16 once per call, then a BF16 GEMM
# (nvfp4_expanded_gemm).  Measured on the H100 against the in-loop expansion
# (benchmarks/NOTES.md, twentieth round): 1.25-1.33x at 256 rows, 1.8-1.9x at 512, 2.4-2.6x at
# 4096 (N x K = 7168 x 1536 and 24576 x 7168).
NVFP4_EXPAND_MIN_ROWS = 256
SPLIT_MAX = 8
_SPLIT_BELOW_TILES = 128


# --- device functions shared with the MoE kernels -------------------------------------------

@triton.jit
def quantise_act_tile(x):
    """``[R, 128]`` FP32 -> (FP8 codes, FP32 scales ``[R]``): ``act_quant(x, 128, pow2=True)``.

    A row with a NaN/Inf amax gets scale NaN (its codes are then irrelevant: they are those of
    0 * x, zeros and NaNs).  No clamp to +-448 is needed: ``x / 2^e`` is exact and at most 448
    in magnitude, as 2^e >= RN(amax / 448) and no float32 amax above ``448 * 2^k`` has a
    quotient that rounds down to 2^k (amax's spacing there, 2^(k-15), is more than 448 times
    the quotient's half spacing 2^(k-24)).
    """
    amax = clamp_nan(amax_nan(x, 1), 1e-4, float("inf"))
    finite = amax < float("inf")
    e = tl.where(finite, ceil_log2(tl.math.div_rn(amax, 448.0)), 0)
    q = to_fp8(x * tl.where(finite, exp2i(-e), 0.0)[:, None])
    return q, tl.where(finite, exp2i(e), float("nan"))


@triton.jit
def load_act_block(a_ptr, a_scale_ptr, rows, row_ok, kb, K, stride_am, stride_sm,
                   A_QUANT: tl.constexpr, BLOCK_K: tl.constexpr):
    """K block ``kb`` of the activation rows ``rows``: (FP8 codes ``[BM, BLOCK_K]``, scales ``[BM]``).

    A_QUANT: ``a_ptr`` is the 16/32-bit activation, quantised here; otherwise ``a_ptr`` holds
    the pre-pass's FP8 codes (typed FP8 on a GPU, see ``as_fp8_operand``; bytes under the
    interpreter) and ``a_scale_ptr`` its scales ``[rows, K blocks]``.
    """
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (k[None, :] < K)
    offs = rows[:, None] * stride_am + k[None, :]
    if A_QUANT:
        x = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q, s = quantise_act_tile(x)
    else:
        q = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float8e4nv, bitcast=True)
        s = tl.load(a_scale_ptr + rows * stride_sm + kb, mask=row_ok, other=0.0)
    return q, s


@triton.jit
def load_act_scales(a_scale_ptr, rows, row_ok, kb, n_kb, stride_sm):
    """The pre-pass scales of K block ``kb`` of the rows ``rows`` (zeros from ``n_kb`` on).

    They multiply a dot's result rather than feed it, so the loop pipeline does not issue
    them ahead, and a load in the K step that uses them costs that step a memory round trip.
    The K loops therefore load block kb + 1's scales in step kb (after the last use of block
    kb's) and carry them to the next step: the wait overlaps a whole step."""
    in_k = (kb + tl.zeros(rows.shape, tl.int32)) < n_kb
    return tl.load(a_scale_ptr + rows * stride_sm + kb, mask=row_ok & in_k, other=0.0)


@triton.jit
def fp4_value_2m14(codes):
    """E2M1 codes (int) -> ``lut[code] * 2^-14`` as FP32, exact.

    The code's magnitude bits shifted into an FP16 pattern read as FP16 are exactly
    ``lut * 2^-14`` (code 1, 0.5, lands on the FP16 subnormal 2^-15): shifts, no table.
    """
    c = codes.to(tl.int32)
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def load_fp8_codes(w_ptr, cols, col_ok, kb, K, stride_wn, BLOCK_K: tl.constexpr):
    """K block ``kb`` of FP8 weight rows ``cols``: codes ``[BN, BLOCK_K]``, zero outside ``K``.

    ``w_ptr`` is an FP8 pointer on a GPU (the tile then goes from the asynchronous copy
    straight into the tensor cores' shared-memory operand; a byte tile would be reloaded
    into registers and stored back to retype it) and a byte pointer under the interpreter.
    """
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = col_ok[:, None] & (k[None, :] < K)
    w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :], mask=mask, other=0.0)
    return w.to(tl.float8e4nv, bitcast=True)


@triton.jit
def fp8_tile_step(acc, a, a_scale, w_ptr, w_scale_at, cols, col_ok, kb, K, stride_wn,
                  SCALE_FP32: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """``acc + dot(a, w^T) * (a_scale * w_scale)[:, None]`` for FP8 weight rows ``cols`` that
    share the one block scale at ``w_scale_at``: one FMA per accumulator element.
    ``TRANSPOSED``: the same on ``acc^T`` (``[BN, BM]``), the weight as the MMA's A side (see
    ``scaled_dot_t``).

    ``a_scale`` is a power of two in ``[2^-22, 2^120]`` (``act_quant``'s amax floor 1e-4 and
    BF16's largest value), so ``a_scale * w_scale`` is exact, like the two multiplications
    one after the other, for every E8M0 weight scale (down to 2^-127: the product stays at
    or above 2^-149) as long as it stays below 2^128, i.e. ``a_scale * w_scale < 2^128``;
    beyond (a weight scale of 2^127 meeting a block amax above 448, never seen in a real
    checkpoint) the factor is Inf where the oracle's products may still be finite.
    NaN scales (0xFF bytes, non-finite activation blocks) still give NaN.
    """
    w = load_fp8_codes(w_ptr, cols, col_ok, kb, K, stride_wn, BLOCK_K)
    if SCALE_FP32:
        w_scale = tl.load(w_scale_at)
    else:
        w_scale = e8m0_value(tl.load(w_scale_at))
    if TRANSPOSED:
        acc = acc + tl.dot(w, tl.trans(a)) * (a_scale * w_scale)[None, :]
    else:
        acc = acc + tl.dot(a, tl.trans(w)) * (a_scale * w_scale)[:, None]
    return acc


# --- MXFP4 -> FP8 expansion -----------------------------------------------------------------
#
# Eight E2M1 codes (one 32-bit word of packed weights, element 2k in the low nibble) become
# eight FP8 bytes in 9 integer instructions: the three magnitude bits of a nibble index a
# byte of an 8-entry table held in two registers (``prmt`` picks 4 of those bytes per
# instruction), and the sign bits are moved to bit 7 of their bytes by two more ``prmt``.
# The table already holds ``fp8(lut[m] * 2^(e_j - e_max + 6))`` for the word's 32-block, so
# the per-32 scale costs nothing per element; the values are those of rounding every
# element separately (the table is that rounding, done once per magnitude).
#
#   m  = w & 0x77777777                  magnitude indices, nibbles 0..7 = elements 0..7
#   g0 = prmt(L0, L1, m)                 magnitudes of elements 0..3 (prmt reads 4 nibbles)
#   g1 = prmt(L0, L1, m >> 16)           elements 4..7
#   s4 = w << 4                          bit 3 of each nibble -> bit 7 of its byte pair
#   o0 = g0 | (prmt(w, s4, 0x1504) & 0x80808080)    signs of elements 0..3 (bits 3, 7, 11, 15)
#   o1 = g1 | (prmt(w, s4, 0x3726) & 0x80808080)    elements 4..7 (bits 19, 23, 27, 31)
FP4_EXPAND_ASM: tl.constexpr = tl.constexpr("""{
.reg .b32 m, t, g, s4;
and.b32 m, $2, 0x77777777;
shl.b32 s4, $2, 4;
prmt.b32 g, $3, $7, m;
prmt.b32 t, $2, s4, 0x1504;
lop3.b32 $0, g, t, 0x80808080, 0xF8;
shr.b32 m, m, 16;
prmt.b32 g, $3, $7, m;
prmt.b32 t, $2, s4, 0x3726;
lop3.b32 $1, g, t, 0x80808080, 0xF8;
}""")
# Table rows per scale gap d = e_max - e_j: from d = 19 on every entry rounds to FP8 zero
# (6 * 2^(6 - 19) < 2^-10, half the smallest subnormal), so larger gaps use row 31.
FP4_LUT_ROWS: tl.constexpr = tl.constexpr(32)
_FP4_TABLES = {}  # device -> table, built at the first call (before any graph capture)


def fp4_fp8_table(device) -> torch.Tensor:
    """int32 ``[FP4_LUT_ROWS, 2]``: for scale gap d, the FP8 bytes of ``lut[m] * 2^max(6 - d, -30)``
    for magnitudes m = 0..7, little-endian, m = 0..3 in word 0 and 4..7 in word 1 (the
    exponent floor -30 is where every value is far below the FP8 range)."""
    table = _FP4_TABLES.get(device)
    if table is None:
        magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
        gaps = torch.arange(FP4_LUT_ROWS.value, dtype=torch.float64)
        values = magnitudes[None, :] * torch.pow(2.0, torch.clamp(6 - gaps, min=-30))[:, None]
        codes = values.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64).view(FP4_LUT_ROWS.value, 2, 4)
        words = (codes << torch.tensor([0, 8, 16, 24])).sum(-1)
        words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32
        table = words.to(torch.int32).to(device)
        _FP4_TABLES[device] = table
    return table


# The same table rows computed from the gap (no memory access, so nothing in a K step waits
# on a load that the step itself issued).  For d <= 19 each magnitude times 2^(6 - d) is a
# normal FP16 number: the FP16 patterns of lut[m] * 2^6 with d taken off their exponent
# fields, two per word (m = 2i in the low half), then converted pairwise to E4M3 with
# round-to-nearest-even: the table's values, which it also rounds once from the exact
# product.  From d = 19 on every entry is 0 (see FP4_LUT_ROWS), so the gap is clamped there.
#   word (m0, m1) = 0x50000000 - (d << 26)      0 and 0.5 * 2^(6-d) (the 0 half stays 0)
#   word (m2, m3) = 0x56005400 - d * 0x04000400  1 and 1.5
#   word (m4, m5) = 0x5A005800 - d * 0x04000400  2 and 3
#   word (m6, m7) = 0x5E005C00 - d * 0x04000400  4 and 6
# Exponent fields stay >= 1 for d <= 19 (0x5000 - 19 * 0x400 = 0x400), so no half borrows
# from the other.
FP4_GAP_CLAMP: tl.constexpr = tl.constexpr(19)
FP4_FP16_PAIRS = (0x50000000, 0x56005400, 0x5A005800, 0x5E005C00)  # the words at gap 0
FP4_TABLE_ROW_ASM: tl.constexpr = tl.constexpr(f"""{{
.reg .b32 d, s, p;
.reg .b16 c0, c1, c2, c3;
min.u32 d, $2, {FP4_GAP_CLAMP.value};
shl.b32 s, d, 26;
sub.u32 p, {FP4_FP16_PAIRS[0]:#x}, s;
cvt.rn.satfinite.e4m3x2.f16x2 c0, p;
mul.lo.u32 s, d, 0x04000400;
sub.u32 p, {FP4_FP16_PAIRS[1]:#x}, s;
cvt.rn.satfinite.e4m3x2.f16x2 c1, p;
sub.u32 p, {FP4_FP16_PAIRS[2]:#x}, s;
cvt.rn.satfinite.e4m3x2.f16x2 c2, p;
sub.u32 p, {FP4_FP16_PAIRS[3]:#x}, s;
cvt.rn.satfinite.e4m3x2.f16x2 c3, p;
mov.b32 $0, {{c0, c1}};
mov.b32 $1, {{c2, c3}};
}}""")


@triton.jit
def fp4_table_row(gap, lut_ptr):
    """Scale gap (int32 >= 0) -> the two words of its ``fp4_fp8_table`` row: computed on a GPU
    (``FP4_TABLE_ROW_ASM``); read from the table under the interpreter, which runs no PTX (an
    arithmetic emulation there would cost more interpreter time than the rest of the K step;
    the GPU tests compare the computed rows with the table for every gap)."""
    if INTERPRET:
        row = tl.minimum(gap, FP4_LUT_ROWS - 1) * 2
        return tl.load(lut_ptr + row), tl.load(lut_ptr + row + 1)
    else:
        return tl.inline_asm_elementwise(FP4_TABLE_ROW_ASM, "=r,=r,r", [gap], dtype=(tl.int32, tl.int32),
                                         is_pure=True, pack=1)


@triton.jit
def _prmt_emulated(a, b, sel):
    """PTX ``prmt.b32`` (default mode, selector nibbles 0..7): byte i of the result is byte
    ``sel_i`` of the pair {b, a}, bytes 0..3 from ``a``, 4..7 from ``b``; uint32 operands."""
    out = tl.zeros_like(a)
    for i in tl.static_range(4):
        idx = (sel >> (4 * i)) & 7
        src = tl.where(idx < 4, a, b)
        out = out | (((src >> ((idx & 3) * 8)) & 0xFF) << (8 * i))
    return out


@triton.jit
def _split4(x):
    """``[R, 4W]`` -> four ``[R, W]``: the elements 4i, 4i+1, 4i+2, 4i+3."""
    even, odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 4, 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _bytes_of(word):
    """uint32 ``[R, W]`` -> its little-endian bytes as uint8 ``[R, 4W]``."""
    b = [((word >> (8 * i)) & 0xFF).to(tl.uint8) for i in tl.static_range(4)]
    return tl.reshape(tl.join(tl.join(b[0], b[2]), tl.join(b[1], b[3])), (word.shape[0], 4 * word.shape[1]))


@triton.jit
def _fp4_expand_emulated(b, lut0, lut1):
    """``FP4_EXPAND_ASM`` word for word in integer Triton (the interpreter runs no PTX)."""
    b0, b1, b2, b3 = _split4(b.to(tl.uint32))
    w = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)
    l0 = _split4(lut0)[0].to(tl.uint32, bitcast=True)
    l1 = _split4(lut1)[0].to(tl.uint32, bitcast=True)
    m = w & 0x77777777
    s4 = w << 4
    o0 = _prmt_emulated(l0, l1, m) | (_prmt_emulated(w, s4, 0x1504) & 0x80808080)
    o1 = _prmt_emulated(l0, l1, m >> 16) | (_prmt_emulated(w, s4, 0x3726) & 0x80808080)
    return _bytes_of(o0), _bytes_of(o1)


@triton.jit
def fp4_expand(b, lut0, lut1):
    """Packed E2M1 bytes ``[R, H]`` (H a multiple of 4) -> FP8 ``[R, 2H]`` in element order,
    each code's byte taken from its table (``lut0``/``lut1``: int32 ``[R, H]``, the two table
    words of each byte's 32-block; see ``FP4_EXPAND_ASM``)."""
    if INTERPRET:
        lo, hi = _fp4_expand_emulated(b, lut0, lut1)
    else:
        lo, hi = tl.inline_asm_elementwise(FP4_EXPAND_ASM, "=r,=r,r,r,r,r,r,r,r,r,r", [b, lut0, lut1],
                                           dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
    # lo holds elements 8i..8i+3 at 4i..4i+3, hi elements 8i+4..8i+7: put the halves side by side.
    R: tl.constexpr = b.shape[0]
    W: tl.constexpr = b.shape[1] // 4
    both = tl.join(tl.reshape(lo, (R, W, 4)), tl.reshape(hi, (R, W, 4)))  # [R, W, 4, 2]
    return tl.reshape(tl.permute(both, (0, 1, 3, 2)), (R, 8 * W)).to(tl.float8e4nv, bitcast=True)


@triton.jit
def load_weight_block(w_ptr, w_scale_ptr, lut_ptr, cols, col_ok, kb, K, stride_wn, stride_sn,
                      W_FMT: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTED_TABLE: tl.constexpr = False,
                      SCALE_WORDS: tl.constexpr = False, TILED: tl.constexpr = False):
    """K block ``kb`` of FP4 weight rows ``cols``: (operand ``[BN, BLOCK_K]``, column scale ``[BN]``).

    The operand is FP8 (MXFP4) or BF16 (NVFP4, column scale 1).  ``w_ptr`` points at the
    packed bytes; scales are E8M0 (MXFP4) or E4M3 (NVFP4) bytes.  Row-major rows (strides
    ``stride_wn`` / ``stride_sn``), or with TILED (MXFP4, 128-wide K blocks) the layout of
    ``moe_pack_experts``: 16-row tiles, each tile's K block its 16 rows of 64 code bytes, 1 KB,
    and the scales the same way, 4 bytes a row (the strides are then unused).

    MXFP4 table rows (the same values either way): gathered from ``lut_ptr`` by scale gap, or,
    with COMPUTED_TABLE, computed from the gap (``fp4_table_row``).  A gather's address needs
    the scale bytes, so the loop waits for them in the step that loads them: one memory round
    trip per K step.  Computed, the scale bytes feed the operand through arithmetic only, like
    the weight bytes, and with SCALE_WORDS (see ``mxfp4_scale_words``) a row's four bytes of
    the block are read as int32 words: 4-byte asynchronous copies that the loop pipeline
    issues stages ahead together with the weight tile.  (As bytes, a [BN, 4] tile spreads over
    the threads two bytes each, too narrow for an asynchronous copy.)
    """
    HALF: tl.constexpr = BLOCK_K // 2
    kh = kb * HALF + tl.arange(0, HALF)
    mask = col_ok[:, None] & (kh[None, :] < K // 2)
    if TILED:
        tl.static_assert(W_FMT == W_MXFP4 and BLOCK_K == 128)
        # (row, block) unit: its codes at 64 * unit, its scale word at unit (int32: a tiled
        # matrix is one expert's, under 2 GB).
        r = cols.to(tl.int32)
        unit = (r >> 4) * (K // 8) + kb * 16 + (r & 15)
        b = tl.load(w_ptr + unit[:, None] * HALF + tl.arange(0, HALF)[None, :], mask=mask, other=0)
    else:
        b = tl.load(w_ptr + cols[:, None] * stride_wn + kh[None, :], mask=mask, other=0)
    if W_FMT == W_MXFP4:
        NSUB: tl.constexpr = BLOCK_K // 32
        if COMPUTED_TABLE and SCALE_WORDS:
            tl.static_assert(NSUB == 4)
            # The word is loaded once per 32-block, [BN, 4] copies, and block j takes byte j of
            # copy j: the layout pass re-issues a load of fewer elements than the program has
            # threads in every layout its value is needed in (here also the accumulator's, for
            # the column scale), and that twin would be a synchronous load in every K step.
            words = w_scale_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            sub = tl.arange(0, NSUB)
            if TILED:
                word_at = unit
            else:
                word_at = cols * (stride_sn // 4) + kb
            word = tl.load(words + word_at[:, None] + 0 * sub[None, :], mask=col_ok[:, None], other=0)
            e = (word >> (8 * sub)[None, :]) & 0xFF
        else:
            j = kb * NSUB + tl.arange(0, NSUB)
            if TILED:
                byte_at = unit[:, None] * NSUB + tl.arange(0, NSUB)[None, :]
            else:
                byte_at = cols[:, None] * stride_sn + j[None, :]
            e = tl.load(w_scale_ptr + byte_at, mask=col_ok[:, None] & (j[None, :] < K // 32), other=0).to(tl.int32)
        e_max = tl.max(e, axis=1)
        # Table row of each 32-block: its values are lut * 2^(e - e_max + 6) rounded to FP8
        # (see fp4_fp8_table), so the column scale is 2^e_max and the 2^6 goes on the rows.
        if COMPUTED_TABLE:
            lut0, lut1 = fp4_table_row(e_max[:, None] - e, lut_ptr)
        else:
            row = tl.minimum(e_max[:, None] - e, FP4_LUT_ROWS - 1) * 2
            lut0 = tl.load(lut_ptr + row)
            lut1 = tl.load(lut_ptr + row + 1)
        lut0 = tl.reshape(tl.broadcast_to(lut0[:, :, None], (lut0.shape[0], NSUB, 16)), (lut0.shape[0], HALF))
        lut1 = tl.reshape(tl.broadcast_to(lut1[:, :, None], (lut1.shape[0], NSUB, 16)), (lut1.shape[0], HALF))
        w = fp4_expand(b, lut0, lut1)
        s = e8m0_value(e_max)  # NaN if any byte is 0xFF
    else:
        tl.static_assert(not TILED)
        codes = tl.interleave(b & 15, b >> 4)  # element 2k: low nibble, 2k+1: high nibble
        NSUB16: tl.constexpr = BLOCK_K // 16
        j = kb * NSUB16 + tl.arange(0, NSUB16)
        s16 = tl.load(w_scale_ptr + cols[:, None] * stride_sn + j[None, :],
                      mask=col_ok[:, None] & (j[None, :] < K // 16), other=0)
        s16 = fp8_value(s16)
        s16 = tl.reshape(tl.broadcast_to(s16[:, :, None], (s16.shape[0], NSUB16, 16)),
                         (s16.shape[0], BLOCK_K))
        # lut * s16 has at most 6 significant bits: exact in FP32 and in BF16
        w = (fp4_value_2m14(codes) * (s16 * 16384.0)).to(tl.bfloat16)
        s = tl.full((cols.shape[0],), 1.0, tl.float32)
    return w, s


@triton.jit
def dot_bf16(a, b, acc):
    """``acc + a @ b`` for BF16 operands, FP32 accumulation.  The interpreter's BF16 dot is
    wrong (numpy has no BF16), so there the operands go to FP32 first (exact)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def scaled_dot(acc, a, a_scale, w, w_scale, W_FMT: tl.constexpr):
    """``acc + dot(a, w^T) * a_scale[:, None] * w_scale[None, :]`` (FP32 accumulation), for
    FP4 weights (``load_weight_block``; FP8 weights take ``fp8_tile_step``).

    The scales multiply the dot one after the other, never each other: their product
    could leave the normal FP32 range where the result does not.  The MXFP4 operand
    carries a factor 2^6 (``load_weight_block``), taken off the row scales.
    """
    if W_FMT == W_NVFP4:
        d = dot_bf16(a.to(tl.bfloat16), tl.trans(w), tl.zeros(acc.shape, tl.float32))
    else:
        d = tl.dot(a, tl.trans(w))
    if W_FMT == W_MXFP4:
        a_scale = a_scale * 0.015625
    return acc + (d * a_scale[:, None]) * w_scale[None, :]


@triton.jit
def scaled_dot_t(acc_t, a, a_scale, w, w_scale):
    """``scaled_dot`` transposed, for MXFP4 weights: ``acc_t [BN, BM] + dot(w, a^T) * a_scale[None, :]
    * w_scale[:, None]``, the same operations on the same values per element.

    For few activation rows (decode): a warp-group MMA needs 64 rows on its A side, so a
    16-row block would run as ``mma.sync``, which has no FP8 form on sm_90 (both operands
    would be converted to FP16 byte by byte).  With the weight tile (64+ rows) as A and the
    activation rows as the MMA's N side (8..256), the FP8 operands go to a warp-group MMA.
    """
    d = tl.dot(w, tl.trans(a))
    return acc_t + (d * (a_scale * 0.015625)[None, :]) * w_scale[:, None]


# --- activation pre-pass ---------------------------------------------------------------------

@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, n_kb, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                      FP16_PAIRS: tl.constexpr = False, MMA_SLOTS: tl.constexpr = False,
                      DEQUANT: tl.constexpr = False):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1)
    row_ok = rows < M
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & (k[None, :] < K),
                other=0.0).to(tl.float32)
    q, s = quantise_act_tile(x)
    if DEQUANT:  # q * s: an FP8 value times a power of two, exact in BF16
        tl.store(q_ptr + rows[:, None] * (n_kb * BLOCK_K) + k[None, :], (q.to(tl.float32) * s[:, None]).to(tl.bfloat16),
                 mask=row_ok[:, None])
        return
    if FP16_PAIRS or MMA_SLOTS:
        # Reordered in registers, so the store is contiguous: addresses permuted per element
        # measured ~3x slower (scalar stores).
        if FP16_PAIRS:  # element 4j + 2a + b to position 4j + 2b + a
            v = tl.reshape(q.to(tl.float16), (ROWS, BLOCK_K // 4, 2, 2))
            v = tl.permute(v, (0, 1, 3, 2))
        else:  # element 32q + 4s + 2r1 + r0 to position 16s + 8r0 + 2q + r1
            v = tl.reshape(q.to(tl.float16), (ROWS, BLOCK_K // 32, 8, 2, 2))
            v = tl.permute(v, (0, 2, 4, 1, 3))
        tl.store(q_ptr + rows[:, None] * (n_kb * BLOCK_K) + k[None, :], tl.reshape(v, (ROWS, BLOCK_K)),
                 mask=row_ok[:, None])
    else:
        tl.store(q_ptr + rows[:, None] * (n_kb * BLOCK_K) + k[None, :], q.to(tl.uint8, bitcast=True),
                 mask=row_ok[:, None])
    tl.store(s_ptr + rows * n_kb + kb, s, mask=row_ok)


def as_fp8_operand(codes: torch.Tensor) -> torch.Tensor:
    """FP8 codes held as bytes, typed FP8 for a GEMM kernel on a GPU (see ``load_fp8_codes``);
    left as bytes under the interpreter, which has no FP8 loads."""
    return codes if INTERPRET else codes.view(torch.float8_e4m3fn)


def _act_pre_pass(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor, **forms) -> None:
    m, k = x2.shape
    n_kb = triton.cdiv(k, ACT_BLOCK)
    rows = 16
    _act_quant_kernel[(triton.cdiv(m, rows), n_kb)](x2, q, s, m, k, x2.stride(0), n_kb, ROWS=rows,
                                                    BLOCK_K=ACT_BLOCK, num_warps=4, **forms)


def act_quant_rows(x2: torch.Tensor, fp16_pairs: bool = False, mma_slots: bool = False):
    """``[M, K]`` -> (FP8 codes as bytes ``[M, 128 * ceil(K/128)]``, zero-padded; scales
    ``[M, ceil(K/128)]``): the GEMMs' activation pre-pass.

    The codes' values as fp16 instead (exact), in the order a CUDA decode GEMM reads them:
    ``fp16_pairs``, elements 1 and 2 of every four swapped (mma.sync B fragments read by each
    lane); ``mma_slots``, each 128-block as eight runs of 16, run s holding elements
    32q + 4s + (0, 2) at 2q and 32q + 4s + (1, 3) at 8 + 2q (the k slots of a warp-group MMA's
    B operand in shared memory, csrc/sm90_nvfp4_decode_gemm.cu)."""
    if fp16_pairs and mma_slots:
        raise ValueError("act_quant_rows: fp16_pairs and mma_slots are two orders; expected at most one, got both")
    m, n_kb = x2.shape[0], triton.cdiv(x2.shape[1], ACT_BLOCK)
    fp16 = fp16_pairs or mma_slots
    q = torch.empty((m, n_kb * ACT_BLOCK), dtype=torch.float16 if fp16 else torch.uint8, device=x2.device)
    s = torch.empty((m, n_kb), dtype=torch.float32, device=x2.device)
    _act_pre_pass(x2, q, s, FP16_PAIRS=fp16_pairs, MMA_SLOTS=mma_slots)
    return q, s


def act_dequant_rows(x2: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` -> BF16 ``[M, 128 * ceil(K/128)]`` (zero-padded): ``act_quant(x2, 128, pow2)``
    dequantised, ``q * s`` (exact in BF16: four significant bits times a power of two)."""
    out = torch.empty((x2.shape[0], triton.cdiv(x2.shape[1], ACT_BLOCK) * ACT_BLOCK), dtype=torch.bfloat16,
                      device=x2.device)
    _act_pre_pass(x2, out, out, DEQUANT=True)
    return out


# --- MXFP4 weight re-encoded as FP8 blocks ----------------------------------------------------
#
# The CUDA prefill path of fp4_linear multiplies an MXFP4 weight on the FP8 tensor cores by
# re-encoding it first (reference.gemm.mxfp4_as_fp8_blocks): FP8 codes with one E8M0 scale per
# 128 x 128 block, the FP8 GEMM's operands.  One program per block: the block byte
# b = max(e_max - 6, 0) from its 512 exponents, then each 32-block's table row for the gap
# b + 6 - e (the rounding of lut * 2^(e - b), see fp4_fp8_table) through fp4_expand.

@triton.jit
def _mxfp4_to_fp8_kernel(w_ptr, w_scale_ptr, lut_ptr, q_ptr, s_ptr, stride_wn, stride_sn, stride_qn, n_kb,
                         BLOCK: tl.constexpr):
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    HALF: tl.constexpr = BLOCK // 2
    NSUB: tl.constexpr = BLOCK // 32
    rows = nb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(w_ptr + rows[:, None] * stride_wn + kb * HALF + tl.arange(0, HALF)[None, :])
    e = tl.load(w_scale_ptr + rows[:, None] * stride_sn + kb * NSUB + tl.arange(0, NSUB)[None, :]).to(tl.int32)
    nan = e == 0xFF
    e = tl.where(nan, 0, e)
    block = tl.maximum(tl.max(tl.max(e, axis=1), axis=0) - 6, 0)
    lut0, lut1 = fp4_table_row(block + 6 - e, lut_ptr)
    lut0 = tl.reshape(tl.broadcast_to(lut0[:, :, None], (BLOCK, NSUB, 16)), (BLOCK, HALF))
    lut1 = tl.reshape(tl.broadcast_to(lut1[:, :, None], (BLOCK, NSUB, 16)), (BLOCK, HALF))
    q = fp4_expand(b, lut0, lut1).to(tl.uint8, bitcast=True)
    nan = tl.reshape(tl.broadcast_to(nan[:, :, None], (BLOCK, NSUB, 32)), (BLOCK, BLOCK))
    q = tl.where(nan, 0x7F, q)
    tl.store(q_ptr + rows[:, None] * stride_qn + kb * BLOCK + tl.arange(0, BLOCK)[None, :], q)
    tl.store(s_ptr + nb * n_kb + kb, block.to(tl.uint8))


def mxfp4_to_fp8_blocks(w: torch.Tensor, w_scale: torch.Tensor):
    """Packed MXFP4 ``[N, K/2]`` + E8M0 ``[N, K/32]`` (N, K multiples of 128, rows contiguous)
    -> (FP8 codes ``[N, K]`` typed for the GEMMs, E8M0 ``[N/128, K/128]``), bit-equal to
    ``reference.gemm.mxfp4_as_fp8_blocks``."""
    n, k = w.shape[0], 2 * w.shape[1]
    q = torch.empty((n, k), dtype=torch.uint8, device=w.device)
    s = torch.empty((n // ACT_BLOCK, k // ACT_BLOCK), dtype=torch.uint8, device=w.device)
    sb = w_scale.view(torch.uint8)
    _mxfp4_to_fp8_kernel[(n // ACT_BLOCK, k // ACT_BLOCK)](
        w.view(torch.uint8), sb, fp4_fp8_table(w.device), q, s, w.stride(0), sb.stride(0), q.stride(0),
        k // ACT_BLOCK, BLOCK=ACT_BLOCK, num_warps=4)
    return as_fp8_operand(q), s.view(torch.float8_e8m0fnu)


# --- NVFP4 weight expanded to BF16 -----------------------------------------------------------
#
# At prefill sizes fp4_linear with NVFP4 weights multiplies in BF16 on the tensor cores at the
# rate of a plain BF16 GEMM: the weight is expanded once per call, lut[code] * s16 (at most
# six significant bits: exact in BF16), the activation dequantised (exact too), and the
# grouped BF16 GEMM kernel applies the FP32 global scale to the FP32 sums before the one
# rounding to BF16.  The in-loop expansion of the block-scaled GEMM costs more than the
# dots themselves at these sizes (~16% of the FP8 rate against 33-43% for this route at 4096
# rows on the H100; the cuda backend runs the same route on its BF16 kernel).

@triton.jit
def _nvfp4_to_bf16_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = BLOCK_K // 2
    kh = tl.program_id(1) * HALF + tl.arange(0, HALF)
    ok = (cols[:, None] < N) & (kh[None, :] < K // 2)
    b = tl.load(w_ptr + cols[:, None] * stride_wn + kh[None, :], mask=ok, other=0)
    codes = tl.interleave(b & 15, b >> 4)  # element 2k: low nibble, 2k+1: high nibble
    NSUB: tl.constexpr = BLOCK_K // 16
    j = tl.program_id(1) * NSUB + tl.arange(0, NSUB)
    sb = tl.load(s_ptr + cols[:, None] * stride_sn + j[None, :], mask=(cols[:, None] < N) & (j[None, :] < K // 16),
                 other=0)
    s16 = fp8_value(sb)
    s16 = tl.reshape(tl.broadcast_to(s16[:, :, None], (BLOCK_N, NSUB, 16)), (BLOCK_N, BLOCK_K))
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + cols[:, None] * K + k[None, :], (fp4_value_2m14(codes) * (s16 * 16384.0)).to(tl.bfloat16),
             mask=(cols[:, None] < N) & (k[None, :] < K))


def nvfp4_to_bf16(w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Packed NVFP4 ``[N, K/2]`` + E4M3 ``[N, K/16]`` -> BF16 ``[N, K]``, ``lut[code] * s16``
    (without the global scale), exact."""
    n, k = w.shape[0], 2 * w.shape[1]
    out = torch.empty((n, k), dtype=torch.bfloat16, device=w.device)
    sb = w_scale.view(torch.uint8)
    if w.stride(-1) != 1 or sb.stride(-1) != 1:
        w, sb = w.contiguous(), sb.contiguous()
    block_n, block_k = 64, 128
    _nvfp4_to_bf16_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        w.view(torch.uint8), sb, out, n, k, w.stride(0), sb.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def nvfp4_expanded_gemm(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, global_scale: torch.Tensor,
                        y2: torch.Tensor) -> None:
    """``y2 = act_quant(x2) @ dequant(w).T`` for NVFP4 weights through BF16 operands."""
    k = x2.shape[1]
    a = act_dequant_rows(x2)
    wb = nvfp4_to_bf16(w, w_scale)
    grouped_gemm(a[:, None, :k], wb[None], y2[:, None, :], global_scale)


# --- dense block-scaled GEMM --------------------------------------------------------------------

def _gemm_configs():
    # Every config is valid for every shape; the first is the one the interpreter runs
    # (large tiles: fewer programs, which is what costs time there).  BLOCK_N divides 128
    # (one FP8 scale per tile); 256-wide tiles hold the dot result and the accumulator in
    # 256 registers per thread and spill.  Decode: deep pipelines of narrow tiles keep
    # enough weight bytes in flight per SM to cover the memory latency.
    small = [(64, 64, 4, 3), (16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4),
             (16, 32, 4, 6), (16, 64, 4, 6), (32, 128, 4, 4), (16, 32, 4, 8), (16, 64, 4, 8)]
    large = [(64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (64, 128, 4, 3),
             (128, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in small + large]


def _fp8_gemm_configs():
    # FP8 weights, besides the shared tiles: decode tiles with the weight as the MMA's A side
    # (FP8_T, see fp8_tile_step) and tiles whose K blocks are split over SPLIT_K programs.
    transposed = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "FP8_T": True}, num_warps=4,
                                num_stages=4) for bm, bn in ((16, 64), (16, 128), (64, 64), (64, 128))]
    split = [triton.Config(dict(c.kwargs, SPLIT_K=sk), num_warps=4, num_stages=4) for sk in (2, 4, 8)
             for c in [_gemm_configs()[1], _gemm_configs()[2]] + transposed[:3]]
    # Shallower transposed split tiles: a probe timed (7168, 1536) at one row 8.4 us with split 4
    # and 3 stages against 9.2 for the tuned 4-stage choice (benchmarks/NOTES.md, thirteenth round).
    split_shallow = [triton.Config(dict(c.kwargs, SPLIT_K=sk), num_warps=4, num_stages=3) for sk in (2, 4, 8)
                     for c in transposed[:2]]
    return _gemm_configs() + transposed + split + split_shallow


def _mxfp4_gemm_configs():
    # Each tile shape with the table rows computed (first: the interpreter's config) and
    # gathered (see load_weight_block): the same values, so the tuner keeps the faster.  Plus
    # wider decode tiles over two warp groups (the scale tile of an FP4 weight block is per row,
    # so BLOCK_N need not divide 128): fewer instructions per weight byte (sm_90, per K step and
    # KB of weights: 16 x 64 4 warps 419 x 4, 16 x 128 8 warps 343 x 8 / 2, 16 x 256 8 warps
    # 519 x 8 / 4 warp instructions).
    wide = [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "GROUP_M": 8, "COMPUTED_TABLE": True}, num_warps=8,
                          num_stages=st) for bn, st in ((128, 4), (256, 3))]
    return [triton.Config(dict(c.kwargs, COMPUTED_TABLE=computed), num_warps=c.num_warps, num_stages=c.num_stages)
            for computed in (True, False) for c in _gemm_configs()] + wide


def _split_useful(c, m: int, n: int) -> bool:
    """Split K only for few rows and where the column tiles alone leave SMs idle."""
    split = c.kwargs.get("SPLIT_K", 1)
    return split == 1 or (m <= SPLIT_MAX_ROWS and triton.cdiv(n, c.kwargs["BLOCK_N"]) < _SPLIT_BELOW_TILES)


def _prune_gemm(configs, nargs, **kw):
    m = nargs["M_BUCKET"]
    keep = [c for c in configs if (c.kwargs["BLOCK_M"] <= max(16, m) if m <= 64 else c.kwargs["BLOCK_M"] >= 64)
            and _split_useful(c, m, nargs["N"])]
    return keep or configs[:1]


@triton.jit
def _scaled_gemm(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, lut_ptr, global_scale_ptr, y_ptr, part_ptr, count_ptr,
                 M, N, K,
                 stride_am, stride_sm, stride_wn, stride_sn, stride_ym, M_BUCKET,
                 A_QUANT: tl.constexpr, W_FMT: tl.constexpr, SCALE_FP32: tl.constexpr,
                 HAS_GLOBAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SCALE_WORDS: tl.constexpr = False,
                 COMPUTED_TABLE: tl.constexpr = False, FP8_T: tl.constexpr = False, SPLIT_K: tl.constexpr = 1):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the columns together, so a weight tile is
    # reused from L2 by the row tiles of its group.
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    # MXFP4 weights with few rows: the accumulator is [BLOCK_N, BLOCK_M] (see scaled_dot_t).
    # (NVFP4's BF16 operands have an mma.sync form, and its transposed tiles would spill.)
    # FP8 weights: transposed where the config says (FP8_T), so that a few activation rows
    # meet the weight tile in an FP8 warp-group MMA instead of an FP16 mma.sync.
    SWAP: tl.constexpr = ((W_FMT == W_MXFP4) * (BLOCK_M < 64) * (BLOCK_N >= 64)) | ((W_FMT == W_FP8) * FP8_T)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # FP8 weights: BLOCK_N divides 128, so the whole column tile lies in one 128 x 128 scale
    # block and the promotion is one FMA per element (fp8_tile_step).
    if W_FMT == W_FP8:
        tl.static_assert(128 % BLOCK_N == 0)
    w_scale_row = w_scale_ptr + (pid_n * BLOCK_N // 128) * stride_sn
    n_kb = tl.cdiv(K, BLOCK_K)
    if SPLIT_K == 1:
        kb_lo = 0
        kb_hi = n_kb
    else:
        per_split = tl.cdiv(n_kb, SPLIT_K)
        kb_lo = tl.program_id(1) * per_split
        kb_hi = tl.minimum(kb_lo + per_split, n_kb)
    # FP4 weights from the pre-pass: activation scales one K step ahead (load_act_scales).
    SCALES_AHEAD: tl.constexpr = (not A_QUANT) and (W_FMT != W_FP8)
    if SCALES_AHEAD:
        a_scale_next = load_act_scales(a_scale_ptr, rows, row_ok, kb_lo, n_kb, stride_sm)
    for kb in range(kb_lo, kb_hi):
        if SCALES_AHEAD:
            a = load_fp8_codes(a_ptr, rows, row_ok, kb, K, stride_am, BLOCK_K)
            a_scale = a_scale_next
        else:
            a, a_scale = load_act_block(a_ptr, a_scale_ptr, rows, row_ok, kb, K, stride_am, stride_sm,
                                        A_QUANT, BLOCK_K)
        if W_FMT == W_FP8:
            acc = fp8_tile_step(acc, a, a_scale, w_ptr, w_scale_row + kb, cols, col_ok, kb, K, stride_wn,
                                SCALE_FP32, BLOCK_K, SWAP)
        else:
            w, w_scale = load_weight_block(w_ptr, w_scale_ptr, lut_ptr, cols, col_ok, kb, K, stride_wn, stride_sn,
                                           W_FMT, BLOCK_K, COMPUTED_TABLE, SCALE_WORDS)
            if SWAP:
                acc = scaled_dot_t(acc, a, a_scale, w, w_scale)
            else:
                acc = scaled_dot(acc, a, a_scale, w, w_scale, W_FMT)
        if SCALES_AHEAD:
            a_scale_next = load_act_scales(a_scale_ptr, rows, row_ok, kb + 1, n_kb, stride_sm)
    if SWAP:
        y_offs = rows[None, :] * stride_ym + cols[:, None]
        part_offs = rows[None, :] * N + cols[:, None]
        out_ok = col_ok[:, None] & row_ok[None, :]
    else:
        y_offs = rows[:, None] * stride_ym + cols[None, :]
        part_offs = rows[:, None] * N + cols[None, :]
        out_ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K > 1:
        part_size = M * N  # < 2^23: split only below SPLIT_MAX_ROWS rows and 128 column tiles
        tl.store(part_ptr + tl.program_id(1) * part_size + part_offs, acc, mask=out_ok)
        tl.debug_barrier()  # all threads' partials are written before the arrival is published
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last split to finish adds them all, in split order
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed")
            acc = tl.load(part_ptr + part_offs, mask=out_ok, other=0.0, cache_modifier=".cg")
            for sk in tl.static_range(1, SPLIT_K):
                acc += tl.load(part_ptr + sk * part_size + part_offs, mask=out_ok, other=0.0, cache_modifier=".cg")
            if HAS_GLOBAL:
                acc = acc * tl.load(global_scale_ptr)
            tl.store(y_ptr + y_offs, cast_rne(acc, tl.bfloat16), mask=out_ok)
    else:
        if HAS_GLOBAL:
            acc = acc * tl.load(global_scale_ptr)
        tl.store(y_ptr + y_offs, cast_rne(acc, tl.bfloat16), mask=out_ok)


_GEMM_KEY = ["M_BUCKET", "N", "K", "W_FMT", "A_QUANT"]
# FP8 and NVFP4 weights; MXFP4 weights have their own tuner, whose configs also choose how
# the table rows are made (a separate tuner keeps the other formats' stored choices valid).
_scaled_gemm_kernel = autotune(configs=_fp8_gemm_configs(), key=_GEMM_KEY, name="scaled_gemm",
                               prune_configs_by={"early_config_prune": _prune_gemm})(_scaled_gemm)
_mxfp4_gemm_kernel = autotune(configs=_mxfp4_gemm_configs(), key=_GEMM_KEY, name="scaled_gemm_mxfp4",
                              prune_configs_by={"early_config_prune": _prune_gemm})(_scaled_gemm)


def mxfp4_scale_words(scales: torch.Tensor, k: int) -> bool:
    """Whether the E8M0 bytes ``[..., K/32]`` can be read as one int32 word per row and
    128-wide K block: K a multiple of 128, the last dim contiguous, every row 4-byte aligned."""
    return (k % ACT_BLOCK == 0 and scales.stride(-1) == 1 and scales.data_ptr() % 4 == 0
            and all(st % 4 == 0 for st in scales.stride()[:-1]))


_split_workspaces: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
# Outgrown workspaces stay allocated: a CUDA graph captured with one keeps its addresses.
_outgrown: List[Tuple[torch.Tensor, torch.Tensor]] = []


def _split_workspace(device: torch.device, n_partial: int, n_counters: int):
    """(FP32 partial tiles, int32 arrival counters) of the split-K path for the current stream of
    ``device``, grown to the largest call seen: no allocation per call once warm (allocate
    before capturing a CUDA graph).  The counters are zeroed once; every launch leaves them zero."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _split_workspaces.get(key)
    if ws is None or ws[0].numel() < n_partial or ws[1].numel() < n_counters:
        if ws is not None:
            _outgrown.append(ws)
            n_partial, n_counters = max(n_partial, ws[0].numel()), max(n_counters, ws[1].numel())
        ws = _split_workspaces[key] = (torch.empty(n_partial, dtype=torch.float32, device=device),
                                       torch.zeros(n_counters, dtype=torch.int32, device=device))
    return ws


def m_bucket(m: int) -> int:
    """Autotuning key for a row count: powers of two up to 4096, so serving does not retune
    for every batch size."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def activation_operand(x2: torch.Tensor, fused_quant: bool, x_scale2: Optional[torch.Tensor] = None):
    """The GEMM's A operand and its arguments: the BF16 rows themselves when the kernel
    quantises them in its prologue, else FP8 rows + scales, from the act_quant pre-pass or as
    given (``x2`` codes with ``x_scale2`` scales).  Returns (a, a_scale, stride_am, stride_sm)."""
    if x_scale2 is not None:
        a = as_fp8_operand(x2.view(torch.uint8))
        return a, x_scale2, a.stride(0), x_scale2.stride(0)
    if fused_quant:
        return x2, x2, x2.stride(0), 0
    a, a_scale = act_quant_rows(x2)
    a = as_fp8_operand(a)
    return a, a_scale, a.stride(0), a_scale.stride(0)


def scaled_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str,
                global_scale: Optional[torch.Tensor], fused_quant: Optional[bool] = None,
                x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act_quant(x) @ dequant(w).T`` -> bf16 ``[..., N]``.  ``fused_quant`` forces the
    activation path of the block-scaled kernel (None: fused up to ``FUSED_QUANT_MAX_ROWS`` rows,
    else the pre-pass; NVFP4 weights from ``NVFP4_EXPAND_MIN_ROWS`` rows take the BF16 route,
    ``nvfp4_expanded_gemm``).  With ``x_scale`` (FP8 weights only), x holds the activation's
    codes and x_scale their scales: no quantisation."""
    n = w.shape[0]
    k = x.shape[-1]
    y = torch.empty((*x.shape[:-1], n), dtype=torch.bfloat16, device=x.device)
    if y.numel() == 0:
        return y
    if k == 0:
        return y.zero_()
    x2 = as_rows(x)
    m = x2.shape[0]
    y2 = y.view(m, n)
    if fmt == "nvfp4" and m >= NVFP4_EXPAND_MIN_ROWS and fused_quant is None:
        nvfp4_expanded_gemm(x2, w, w_scale, global_scale, y2)
        return y
    if x_scale is not None:
        fused_quant = False
    elif fused_quant is None:
        fused_quant = m <= FUSED_QUANT_MAX_ROWS
    a, a_scale, stride_am, stride_sm = activation_operand(
        x2, fused_quant, None if x_scale is None else as_rows(x_scale.reshape(m, -1)))
    w_bytes = as_fp8_operand(w.view(torch.uint8)) if fmt == "fp8" else w.view(torch.uint8)
    scale_fp32 = w_scale.dtype == torch.float32
    ws = w_scale if scale_fp32 else w_scale.view(torch.uint8)
    if ws.stride(-1) != 1 or w_bytes.stride(-1) != 1:
        ws, w_bytes = ws.contiguous(), w_bytes.contiguous()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta.get("SPLIT_K", 1))
    # Split-K workspace where a split config may be chosen (_split_useful), else unused.
    if fmt != "mxfp4" and m <= SPLIT_MAX_ROWS and n < _SPLIT_BELOW_TILES * 128:
        part, counts = _split_workspace(x.device, SPLIT_MAX * m * n, triton.cdiv(m, 16) * triton.cdiv(n, 16))
    else:
        part = counts = y2
    # None for the other formats: no table argument, so their tuning keys stay as stored.
    lut = fp4_fp8_table(x.device) if fmt == "mxfp4" else None
    kernel = _mxfp4_gemm_kernel if fmt == "mxfp4" else _scaled_gemm_kernel
    kernel[grid](a, a_scale, w_bytes, ws, lut, global_scale if global_scale is not None else ws, y2, part, counts,
                 m, n, k, stride_am, stride_sm, w_bytes.stride(0), ws.stride(0), y2.stride(0),
                 m_bucket(m), A_QUANT=fused_quant, W_FMT=FORMAT_CODES[fmt], SCALE_FP32=scale_fp32,
                 HAS_GLOBAL=global_scale is not None, BLOCK_K=ACT_BLOCK,
                 SCALE_WORDS=fmt == "mxfp4" and mxfp4_scale_words(ws, k))
    return y


@register("fp8_linear", "triton")
def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return scaled_gemm(x, w, w_scale, "fp8", None, x_scale=x_scale)


@register("fp4_linear", "triton")
def fp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str,
               global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return scaled_gemm(x, w, w_scale, fmt, global_scale)


# --- grouped BF16 GEMM ---------------------------------------------------------------------

GROUPED_LINEAR_BAND = 8  # row tiles a band of the tile order covers

@autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in ((64, 64, 64, 4, 3), (16, 64, 64, 4, 3), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
                                      (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                      (64, 64, 64, 4, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 4),
                                      (128, 128, 128, 8, 3), (256, 128, 64, 8, 3))],
    key=["M_BUCKET", "N", "K"], name="grouped_linear",
    prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
        c for c in configs if c.kwargs["BLOCK_M"] <= max(16, nargs["M_BUCKET"])] or configs[:1]},
)
@triton.jit
def _grouped_linear_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, M, N, K, stride_xm, stride_xg, stride_xk,
                           stride_wg, stride_wn, stride_ym, stride_yg, M_BUCKET,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, HAS_SCALE: tl.constexpr = False):
    # Tiles of one group in column bands of GROUP_M row tiles: the programs in flight share
    # a few weight tiles and a band of activation rows in L2.
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    band = pid // (GROUP_M * n_n)
    band_m = tl.minimum(n_m - band * GROUP_M, GROUP_M)
    pid_m = band * GROUP_M + (pid % (GROUP_M * n_n)) % band_m
    pid_n = (pid % (GROUP_M * n_n)) // band_m
    grp = tl.program_id(1).to(tl.int64)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_base = x_ptr + grp * stride_xg + rows[:, None] * stride_xm
    w_base = w_ptr + grp * stride_wg + cols[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_base + k[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot_bf16(a, tl.trans(b), acc)
    if HAS_SCALE:  # one FP32 scale for the whole product (NVFP4's global scale), before the rounding
        acc = acc * tl.load(scale_ptr)
    tl.store(y_ptr + rows[:, None] * stride_ym + grp * stride_yg + cols[None, :], cast_rne(acc, tl.bfloat16),
             mask=row_ok[:, None] & col_ok[None, :])


@register("grouped_linear", "triton")
def grouped_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    t, g, k = x.shape
    n = w.shape[1]
    y = torch.empty((t, g, n), dtype=torch.bfloat16, device=x.device)
    if y.numel() == 0:
        return y
    if k == 0:
        return y.zero_()
    grouped_gemm(x, w, y)
    return y


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, scale: Optional[torch.Tensor] = None) -> None:
    """``y[:, g] = x[:, g] @ w[g].T`` (times the FP32 one-element ``scale``) for BF16 ``x [T, G, K]``
    (any strides), ``w [G, N, K]``, ``y [T, G, N]`` (unit last stride); K >= 1."""
    t, g, k = x.shape
    n = w.shape[1]
    if w.stride(-1) != 1:
        w = w.contiguous()
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), g)  # noqa: E731
    # (No scale: None, so the stored tuning keys of plain grouped_linear calls stay as they are.)
    _grouped_linear_kernel[grid](x, w, y, scale, t, n, k, x.stride(0), x.stride(1),
                                 x.stride(2), w.stride(0), w.stride(1), y.stride(0), y.stride(1), m_bucket(t),
                                 GROUP_M=GROUPED_LINEAR_BAND, HAS_SCALE=scale is not None)
