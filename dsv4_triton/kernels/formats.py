"""Triton device functions for the number formats (twins of ``dsv4_triton/formats.py``).

Every quantising kernel builds on these so that scales and codes agree bit for bit
with the torch oracle:

* ``ceil_log2`` / ``exp2i`` work on float bits, as the oracle does.
* ``amax_nan`` is a max |x| that keeps NaN (hardware max drops a NaN operand).
* ``to_fp8`` is the hardware RNE conversion on a GPU.  The interpreter's numpy
  conversion flushes FP8 subnormals and maps NaN to the wrong byte, so under
  ``TRITON_INTERPRET=1`` an exact integer encoder runs instead; the GPU tests check
  the hardware path against the same oracle.
* FP4 (E2M1) encode/decode is arithmetic on the magnitude, identical everywhere.
"""

import triton
import triton.language as tl

from ..registry import triton_interpreter_on

INTERPRET: tl.constexpr = tl.constexpr(triton_interpreter_on())


@triton.jit
def ceil_log2(v):
    """Exact ceil(log2(v)) for positive normal float32 v (int32)."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def exp2i(e):
    """2**e (float32) for int32 e in [-126, 127]."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def amax_nan(x, axis: tl.constexpr):
    """max(|x|) along ``axis``, NaN if any element is NaN."""
    a = tl.abs(x)
    m = tl.max(a, axis=axis)
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), m)


@triton.jit
def clamp_nan(x, lo, hi):
    """clamp that keeps NaN."""
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def _rne(x):
    # Round to nearest even for |x| < 2**22: adding and removing 1.5 * 2**23 leaves
    # the integer part, rounded by the FP32 adder itself.
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _fp8_code_exact(v):
    """float32 in [-448, 448] or NaN -> E4M3 byte (int32), RNE, exact integer path."""
    a = tl.abs(v)
    sub = _rne(a * 512.0)  # subnormal steps are 2**-9; rounding up to 8 is the min normal
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127  # floor(log2 a) for normal a
    e = tl.maximum(e, -6)
    r = _rne(a * exp2i(3 - e))  # mantissa in [8, 16]; 16 carries into the exponent
    normal = ((e + 7) << 3) + (r.to(tl.int32) - 8)
    code = tl.where(a < 0.015625, sub.to(tl.int32), normal)
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    code = code | (sign << 7)
    return tl.where(v != v, 0x7F, code)


@triton.jit
def to_fp8(v):
    """float32 in [-448, 448] (or NaN) -> float8e4nv, round to nearest even."""
    if INTERPRET:
        return _fp8_code_exact(v).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return v.to(tl.float8e4nv)


@triton.jit
def fp4_code(v):
    """float32 in [-6, 6] (or NaN) -> E2M1 code (int32 0..15); ties go to the even code."""
    a = tl.abs(v)
    c = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
         + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
         + (a > 5.0).to(tl.int32))
    c = tl.where(v != v, 0, c)
    sign = ((v.to(tl.int32, bitcast=True) >> 31) & 1) & (v == v).to(tl.int32)
    return c | (sign << 3)


@triton.jit
def fp4_value(code):
    """E2M1 code (int, 0..15) -> float32."""
    m = code & 7
    # magnitudes 0, .5, 1, 1.5 for m < 4; 2, 3, 4, 6 for m >= 4
    lo = m.to(tl.float32) * 0.5
    hi = tl.where(m == 7, 6.0, (m - 2).to(tl.float32))
    mag = tl.where(m < 4, lo, hi)
    # The sign goes in by bits: Triton lowers unary minus to 0 - x, which turns -0 into +0.
    sign = ((code & 8) != 0).to(tl.uint32) << 31
    return (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_value(byte):
    """E8M0 byte (int) -> float32 2**(b-127); 0xFF -> NaN."""
    b = byte.to(tl.int32)
    val = tl.where(b == 0, (1 << 22), b << 23).to(tl.float32, bitcast=True)
    return tl.where(b == 255, float("nan"), val)


@triton.jit
def _bf16_rne_exact(v):
    # Round the FP32 bits to their top 16 with ties to even; NaN stays a (quiet) NaN.
    bits = v.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """float32 -> ``dtype`` (bf16/fp16/fp32) rounded to nearest even, as torch's ``.to`` does.

    The interpreter's FP32 -> BF16 conversion truncates, so under ``TRITON_INTERPRET=1`` an
    exact integer rounding runs instead; on a GPU it is the hardware RNE conversion.
    """
    if INTERPRET and dtype == tl.bfloat16:
        return _bf16_rne_exact(v)
    else:
        return v.to(dtype)


@triton.jit
def to_f32(x):
    """Exact upcast to float32.  Under ``TRITON_INTERPRET=1`` BF16 goes through its bits (the
    interpreter's BF16 -> FP32 conversion mis-scales subnormals); on a GPU a plain conversion."""
    if INTERPRET and x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)
