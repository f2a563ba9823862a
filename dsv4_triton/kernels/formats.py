"""Triton device functions for the number formats (twins of ``dsv4_triton/formats.py``).

Every quantising kernel builds on these so that scales and codes agree bit for bit
with the torch oracle:

* ``ceil_log2`` / ``exp2i`` work on float bits, as the oracle does.
* ``amax_nan`` is a max |x| that keeps NaN (hardware max drops a NaN operand).
* ``to_fp8`` is the hardware RNE conversion on a GPU.  The interpreter's numpy
  conversion flushes FP8 subnormals and maps NaN to the wrong byte, so under
  ``TRITON_INTERPRET=1`` an exact integer encoder runs instead; the GPU tests check
  the hardware path against the same oracle.
* FP4 (E2M1) encode/decode is integer and FP32-add arithmetic on the bits, identical
  everywhere (an FP32 add with a magic number does the round-to-nearest-even).
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
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def amax_nan(x, axis: tl.constexpr):
    """max(|x|) along ``axis``, NaN if any element is NaN (one NaN-propagating max per
    element: the default hardware max drops a NaN operand).  The interpreter would run that
    combine once per element in Python (~1 s for a 64 x 128 tile), so there the same value
    comes from whole-tile reductions: a NaN count, then the plain max."""
    a = tl.abs(x)
    if INTERPRET:
        has_nan = tl.sum((a != a).to(tl.int32), axis) > 0
        return tl.where(has_nan, float("nan"), tl.max(a, axis))
    else:
        return tl.reduce(a, axis, _max_keep_nan)


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
def _fp4_magic(bits):
    """For the FP32 ``bits`` (uint32) of a value v with |v| < 8: the FP32 number
    M = 2^(E+22) + 2E ulps, E = max(floor(log2 |v|), 0).

    The E2M1 grid step at |v| is 2^(E-1), the ulp of M, so the FP32 sum ``|v| + M`` is M plus
    |v| rounded to the grid, ties to even (2E is even), and its low three bits are the
    magnitude code 2E + round(|v| / 2^(E-1)).  Integer and FP32-add work only, no compares.
    """
    top = tl.maximum(bits & 0x7F800000, 0x3F800000)  # 2^E
    return (top + (top >> 22) + ((22 << 23) - 254)).to(tl.float32, bitcast=True)


@triton.jit
def fp4_code_in_range(v):
    """E2M1 code (int32 0..15) of float32 ``v`` with |v| < 7 (above 6 rounds to 6, as after a
    clamp); ties go to the even code; negative values and -0.0 set the sign bit.  NaN, Inf and
    |v| >= 7 give an arbitrary code (for blocks whose codes are overwritten)."""
    bits = v.to(tl.uint32, bitcast=True)
    total = (tl.abs(v) + _fp4_magic(bits)).to(tl.uint32, bitcast=True)
    sign = bits >> 28  # bit 3 is v's sign; bits 0..2 are replaced below
    return (((total ^ sign) & 7) ^ sign).to(tl.int32)  # low three bits from total, bit 3 from sign


@triton.jit
def fp4_code(v):
    """float32 (or NaN) -> E2M1 code (int32 0..15): |v| saturates at 6, NaN gives 0; ties go to
    the even code; negative values and -0.0 set the sign bit."""
    return tl.where(v != v, 0, fp4_code_in_range(clamp_nan(v, -6.0, 6.0)))


@triton.jit
def fp4_round_in_range(v):
    """float32 ``v`` with |v| < 7 -> its E2M1 value ``fp4_value(fp4_code(v))`` as FP32, sign kept
    (also for -0.0): the quantise-dequantise of QAT in one step.  NaN, Inf and |v| >= 7 give an
    arbitrary value."""
    bits = v.to(tl.uint32, bitcast=True)
    magic = _fp4_magic(bits)
    r = (tl.abs(v) + magic) - magic  # exact: both are multiples of the grid step in M's binade
    # The sign goes in by bits: Triton lowers unary minus to 0 - x, which turns -0 into +0.
    return (r.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def fp4_value(code):
    """E2M1 code (int, 0..15) -> float32, built from bits (no int-to-float conversion)."""
    m = (code & 7).to(tl.int32)
    # Codes 2..7 are normal: FP32 bits (m + 252) << 22; code 1 is 0.5 (252 << 22), code 0 is 0.
    mag = tl.where(m >= 2, (m + 252) << 22, tl.where(m == 1, 252 << 22, 0))
    # The sign goes in by bits: Triton lowers unary minus to 0 - x, which turns -0 into +0.
    return (mag | ((code & 8).to(tl.int32) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def fp8_value(code):
    """FP8-E4M3 byte (uint8 tensor) -> float32.  The hardware conversion on a GPU; an exact
    integer decoder under the interpreter (whose numpy path flushes subnormals)."""
    if INTERPRET:
        c = code.to(tl.int32)
        e = (c >> 3) & 15
        m = (c & 7).to(tl.float32)
        mag = tl.where(e == 0, m * 0.001953125, (m + 8.0) * exp2i(e - 10))
        mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
        return tl.where((c & 0x80) != 0, -mag, mag)
    else:
        return code.to(tl.float8e4nv, bitcast=True).to(tl.float32)


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


@triton.jit
def dot_bf16(a, b, acc):
    """``acc + a @ b`` for BF16 ``a``, ``b`` with FP32 accumulation.  The interpreter's BF16
    ``tl.dot`` multiplies the raw bits (numpy has no bf16), so there the operands go up to
    FP32 first: exact, as BF16 x BF16 products are exact in FP32 on the tensor cores too."""
    if INTERPRET:
        return tl.dot(to_f32(a), to_f32(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
