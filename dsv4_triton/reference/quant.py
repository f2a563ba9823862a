"""FP32 oracles: FP8/FP4 quantisers, QAT simulation and the Hadamard rotation (SPEC 2, 4).

Blocks run along the last dim.  The non-finite policy (``dsv4_triton/formats.py``): a block
whose amax is Inf or NaN has no valid scale, so it decodes to NaN as a whole:

* ``act_quant``: scale NaN, every code of the block the FP8 NaN byte 0x7F.
* ``fp4_quant``: scale byte 0xFF (E8M0 NaN), every code of the block 0.
* ``qat8`` / ``qat4``: every element of the block NaN.

Divisions by non-power-of-two numbers (``amax / 448``, ``amax / 6``) are FP32 divisions,
correctly rounded, and the power-of-two exponent is taken from the rounded quotient, as
the release's code does; kernels must divide the same way.
"""

from __future__ import annotations

import functools

import torch

from ..formats import (E8M0_NAN, FP4_MAX, FP8_MAX, ceil_log2, div_rn, e8m0_encode, e8m0_to_float, exp2_int,
                       fp4_decode, fp4_encode, fp4_pack, fp4_unpack, fp8_encode)
from ..registry import register
from . import rope as _rope

FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = FP4_MAX * 2.0 ** -126  # the smallest amax whose scale 2^-126 is a normal float
FP8_NAN_BYTE = 0x7F


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` in FP32 as ``[..., n/block, block]``."""
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _block_amax(xb: torch.Tensor, floor: float):
    """(amax clamped below at ``floor``, mask of blocks with a non-finite amax)."""
    amax = xb.abs().amax(-1)
    invalid = ~torch.isfinite(amax)
    return amax.clamp_min(floor), invalid


def fp8_scale(amax: torch.Tensor, invalid: torch.Tensor, pow2: bool) -> torch.Tensor:
    """FP32 scale of each block for FP8: ``amax / 448`` (rounded up to a power of two if pow2)."""
    s = torch.where(invalid, torch.ones_like(amax), div_rn(amax, FP8_MAX))
    if pow2:
        s = exp2_int(ceil_log2(s))
    return torch.where(invalid, torch.full_like(s, float("nan")), s)


@register("act_quant", "reference")
def act_quant(x: torch.Tensor, block: int, pow2: bool):
    xb = _blocks(x, block)
    amax, invalid = _block_amax(xb, FP8_AMAX_FLOOR)
    s = fp8_scale(amax, invalid, pow2)
    # Invalid blocks have s = NaN: their codes are set to the canonical NaN byte below.
    q = fp8_encode((xb / s[..., None]).clamp(-FP8_MAX, FP8_MAX)).view(torch.uint8)
    q = torch.where(invalid[..., None], torch.full_like(q, FP8_NAN_BYTE), q)
    return q.view(torch.float8_e4m3fn).reshape(x.shape), s


@register("qat8", "reference")
def qat8(x: torch.Tensor, block: int, pow2: bool) -> torch.Tensor:
    q, s = act_quant(x, block, pow2)
    y = _blocks(q, block) * s[..., None]
    return y.reshape(x.shape).to(x.dtype)


def fp4_exponent(amax: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
    """int32 exponent e of each block's FP4 scale 2^e = 2^ceil(log2(amax / 6))."""
    e = ceil_log2(torch.where(invalid, torch.ones_like(amax), div_rn(amax, FP4_MAX)))
    return torch.where(invalid, torch.zeros_like(e), e)


def _fp4_codes(x: torch.Tensor, block: int):
    """(codes uint8 [..., n/block, block], exponents int32 [..., n/block], invalid mask)."""
    xb = _blocks(x, block)
    amax, invalid = _block_amax(xb, FP4_AMAX_FLOOR)
    e = fp4_exponent(amax, invalid)
    codes = fp4_encode((xb / exp2_int(e)[..., None]).clamp(-FP4_MAX, FP4_MAX))
    codes = torch.where(invalid[..., None], torch.zeros_like(codes), codes)
    return codes, e, invalid


@register("fp4_quant", "reference")
def fp4_quant(x: torch.Tensor, block: int):
    codes, e, invalid = _fp4_codes(x, block)
    return fp4_pack(codes.reshape(x.shape)), e8m0_encode(e, invalid)


@register("fp4_dequant", "reference")
def fp4_dequant(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    codes = fp4_unpack(packed)
    n = codes.shape[-1]
    block = n // scale.shape[-1]
    y = fp4_decode(codes).reshape(*codes.shape[:-1], n // block, block) * e8m0_to_float(scale)[..., None]
    return y.reshape(codes.shape).to(dtype)


@register("qat4", "reference")
def qat4(x: torch.Tensor, block: int) -> torch.Tensor:
    codes, e, invalid = _fp4_codes(x, block)
    y = fp4_decode(codes) * exp2_int(e)[..., None]
    y = torch.where(invalid[..., None], torch.full_like(y, float("nan")), y)
    return y.reshape(x.shape).to(x.dtype)


@functools.lru_cache(maxsize=None)
def sylvester(n: int, device: torch.device) -> torch.Tensor:
    """The Sylvester Hadamard matrix H_n (FP32, entries +-1, symmetric)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h.to(device)


def hadamard_scale(n: int) -> torch.Tensor:
    """``n ** -0.5`` rounded to FP32 (the one multiplier every implementation applies)."""
    return torch.tensor(n ** -0.5, dtype=torch.float32)


@register("hadamard", "reference")
def hadamard(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    y = (x.float() @ sylvester(n, x.device)) * hadamard_scale(n).to(x.device)
    return y.to(x.dtype)


@register("rope_qat8", "reference")
def rope_qat8(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, block: int) -> torch.Tensor:
    """The KV finishing step (SPEC 5.2): RoPE on the last R dims, ``qat8`` (pow2) on the rest."""
    y = _rope.apply_rope(x, freqs, positions, False)
    nope = x.shape[-1] - 2 * freqs.shape[1]
    if nope:
        y[..., :nope] = qat8(x[..., :nope], block, True)
    return y


@register("rope_hadamard_qat4", "reference")
def rope_hadamard_qat4(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The indexer query's finishing step (SPEC 7): RoPE, Hadamard, ``qat4`` (block 32).

    Each step returns ``x.dtype``, as the release's code does (and as the chain of the public
    ops does), so the fused kernel equals ``qat4(hadamard(apply_rope(x)))``.
    """
    return qat4(hadamard(_rope.apply_rope(x, freqs, positions, False)), 32)


__all__ = ["act_quant", "qat8", "fp4_quant", "fp4_dequant", "qat4", "hadamard", "rope_qat8", "rope_hadamard_qat4",
           "sylvester", "fp8_scale", "fp4_exponent", "FP8_AMAX_FLOOR", "FP4_AMAX_FLOOR", "E8M0_NAN"]
