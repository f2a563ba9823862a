"""Number formats of DeepSeek-V4 (SPEC section 2), in plain torch.

Shared by the reference oracles, the tests and the model's checkpoint code, so that
every encoder and decoder in the project is written once.

Conventions chosen here (SPEC is silent on them):

* ``ceil(log2(v))`` of a positive normal FP32 ``v`` is computed exactly from its bits
  (exponent, plus one when the mantissa is non-zero).  A float ``log2`` can round an
  argument just above a power of two down onto it; the bit form cannot, and the Triton
  kernels use the same bit form, so scales agree bit for bit.
* E8M0 has no infinity: a block whose amax is Inf or NaN gets the NaN scale byte 0xFF,
  so the whole block decodes to NaN (the NaN/Inf is not silently dropped).
* FP4 has no NaN: NaN elements encode as code 0; their block's scale is NaN anyway.
  Negative values (and -0.0) set the sign bit.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
E8M0_NAN = 0xFF
E8M0_DTYPE = torch.float8_e8m0fnu

# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def fp4_lut(device=None) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)


def ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(v)) for positive normal float32 ``v`` (int32). NaN/Inf give 128."""
    bits = v.to(torch.float32).contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    return exp - 127 + (mant != 0).to(torch.int32)


def div_rn(a: torch.Tensor, b: float) -> torch.Tensor:
    """Correctly rounded FP32 ``a / b`` on every device.  (On CUDA, torch computes a tensor
    divided by a Python scalar as a multiplication by the scalar's reciprocal, which can
    differ in the last bit; dividing by a tensor is an IEEE division everywhere.)"""
    a = a.float()
    return a / torch.full((), b, dtype=torch.float32, device=a.device)


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32 for int32 e in [-126, 127], built from bits (exact)."""
    return ((e + 127).to(torch.int32) << 23).view(torch.float32)


def e8m0_encode(e: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Exponents (int32, 2**e) -> E8M0 tensor; ``invalid`` marks blocks that become NaN (0xFF)."""
    byte = (e + 127).clamp(0, 254).to(torch.uint8)
    if invalid is not None:
        byte = torch.where(invalid, torch.full_like(byte, E8M0_NAN), byte)
    return byte.view(E8M0_DTYPE)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 (float8_e8m0fnu or its uint8 bytes) -> float32: 2**(b-127), NaN for 0xFF."""
    b = scale.view(torch.uint8) if scale.dtype == E8M0_DTYPE else scale
    if b.dtype != torch.uint8:
        raise TypeError(f"scale: expected float8_e8m0fnu or uint8, got {scale.dtype}")
    b = b.to(torch.int32)
    # Byte 0 is 2^-127, a subnormal in float32: build it by halving 2^-126.
    val = torch.where(b == 0, torch.full_like(b, 1 << 22), b << 23).view(torch.float32)
    return torch.where(b == E8M0_NAN, torch.full_like(val, float("nan")), val)


def fp8_encode(v: torch.Tensor) -> torch.Tensor:
    """float32 already inside [-448, 448] (or NaN) -> float8_e4m3fn, round to nearest even."""
    return v.to(torch.float8_e4m3fn)


def fp4_encode(v: torch.Tensor) -> torch.Tensor:
    """float32 inside [-6, 6] -> E2M1 codes (uint8 0..15), round to nearest, ties to even code."""
    a = v.abs()
    # Thresholds between neighbouring magnitudes; '>' vs '>=' sends a tie to the even code.
    code = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
            + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    code = torch.where(torch.isnan(v), torch.zeros_like(code), code)
    sign = torch.signbit(v) & ~torch.isnan(v)
    return code | (sign.to(torch.uint8) << 3)


def fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) -> float32."""
    return fp4_lut(codes.device)[codes.long()]


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., n]`` -> bytes ``[..., n/2]``: element 2k low nibble, 2k+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: last dim must be even, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., n/2]`` (uint8/int8/float4_e2m1fn_x2) -> codes ``[..., n]`` (uint8)."""
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
