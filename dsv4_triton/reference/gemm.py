"""FP32 oracles: linear layers (SPEC section 3).

Every block-scaled GEMM here is written as SPEC states it: the activation goes through
``act_quant(x, 128, pow2=True)`` and is dequantised (``q * s``, exact: an FP8 value times a
power of two), the weight is dequantised exactly (FP8 or FP4 code times its scale), and the
product is one FP32 matmul.  Dequantised values are exact in FP32 for every scale a
checkpoint or ``act_quant`` produces; only scales so extreme that a dequantised weight
leaves the FP32 range (E8M0 exponents beyond about +-120) would overflow here before the
product is formed, and the kernels are not compared against the oracle there.

K need not be a multiple of the activation block: the last block is shorter, exactly as
if ``x`` were padded with zeros (zeros change no block's amax above its 1e-4 floor).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..formats import e8m0_to_float, fp4_decode, fp4_unpack
from ..registry import register
from .quant import act_quant

ACT_BLOCK = 128  # activation quantisation block along K (SPEC 3)
FP8_WEIGHT_BLOCK = 128  # FP8 weight scales: one per 128 x 128 block
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16


def dequant_activation(x: torch.Tensor) -> torch.Tensor:
    """``act_quant(x, 128, pow2=True)`` dequantised to FP32, ``[..., K]`` (exact ``q * s``)."""
    k = x.shape[-1]
    pad = (-k) % ACT_BLOCK
    xp = F.pad(x.float(), (0, pad)) if pad else x.float()
    q, s = act_quant(xp, ACT_BLOCK, True)
    xd = q.float().reshape(*xp.shape[:-1], -1, ACT_BLOCK) * s[..., None]
    return xd.reshape(xp.shape)[..., :k]


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """A weight scale tensor (E8M0, FP8-E4M3 or FP32) as FP32 values."""
    if scale.dtype == torch.float8_e8m0fnu:
        return e8m0_to_float(scale)
    return scale.float()


def dequant_fp8_weight(w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """FP8 ``[N, K]`` with one scale per 128 x 128 block -> FP32 ``[N, K]``."""
    n, k = w.shape
    s = scale_to_float(w_scale)
    s = s.repeat_interleave(FP8_WEIGHT_BLOCK, 0)[:n].repeat_interleave(FP8_WEIGHT_BLOCK, 1)[:, :k]
    return w.float() * s


def dequant_fp4_weight(w: torch.Tensor, w_scale: torch.Tensor, fmt: str,
                       global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Packed FP4 ``[..., N, K/2]`` -> FP32 ``[..., N, K]``: ``lut[code] * scale`` (times the
    global scale for NVFP4).  Element 2k is the low nibble of byte k (SPEC 2)."""
    codes = fp4_unpack(w)
    block = MXFP4_BLOCK if fmt == "mxfp4" else NVFP4_BLOCK
    v = fp4_decode(codes).reshape(*codes.shape[:-1], -1, block) * scale_to_float(w_scale)[..., None]
    v = v.reshape(codes.shape)
    if fmt == "nvfp4":
        v = v * global_scale.float()
    return v


@register("linear", "reference")
def linear(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    out = x.dtype if out_dtype is None else out_dtype
    if x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16):
        # cuBLAS with an FP32 output: 16-bit products are exact in FP32 and the reduction
        # stays in FP32 (a 16-bit output would allow reduced-precision split-K reductions);
        # one rounding at the end.  This is the oracle's math at cuBLAS speed, so no Triton
        # twin is needed.
        y = torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32)
        return y.to(out).reshape(*x.shape[:-1], w.shape[0])
    return (x.float() @ w.float().t()).to(out)


def dequant_codes(x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """Quantised activation codes ``[..., K]`` and their scales ``[..., K/128]`` -> FP32 ``q * s``."""
    return (x.float().unflatten(-1, (-1, ACT_BLOCK)) * x_scale[..., None]).flatten(-2)


@register("fp8_linear", "reference")
def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    xd = dequant_activation(x) if x_scale is None else dequant_codes(x, x_scale)
    return (xd @ dequant_fp8_weight(w, w_scale).t()).to(torch.bfloat16)


@register("fp4_linear", "reference")
def fp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str,
               global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    wd = dequant_fp4_weight(w, w_scale, fmt, global_scale)
    return (dequant_activation(x) @ wd.t()).to(torch.bfloat16)


@register("grouped_linear", "reference")
def grouped_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # [T, G, K] x [G, N, K] -> [T, G, N]: group g of every token through its own weight.
    return torch.einsum("tgk,gnk->tgn", x.float(), w.float()).to(torch.bfloat16)


def mxfp4_as_fp8_blocks(w: torch.Tensor, w_scale: torch.Tensor):
    """An MXFP4 weight ``[N, K/2]`` (N, K multiples of 128) re-encoded as FP8 codes ``[N, K]``
    with one E8M0 scale per 128 x 128 block, the operands of ``fp8_linear``.

    Per block, with ``e_max`` the largest of its 512 finite exponent bytes, the block byte is
    ``b = max(e_max - 6, 0)`` and each element the FP8 rounding (to nearest even) of
    ``lut[code] * 2^(e - b)``: at most ``6 * 2^6 = 384 < 448``, and exact whenever ``e_max - e
    <= 14`` (two significant bits down to E4M3's smallest step 2^-9); ``b`` is never below 0
    so the block scale stays an E8M0 value.  A NaN scale byte (0xFF) makes its 32 elements
    FP8 NaN (0x7F) and takes no part in ``e_max``.  Returns (codes, scales)."""
    n, k = w.shape[0], w.shape[1] * 2
    e = w_scale.view(torch.uint8).long()
    nan = e == 0xFF
    e = torch.where(nan, torch.zeros_like(e), e)
    e_max = e.reshape(n // FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK, k // FP8_WEIGHT_BLOCK, -1).amax(dim=(1, 3))
    b = (e_max - 6).clamp(min=0)
    b_at = b.repeat_interleave(FP8_WEIGHT_BLOCK, 0).repeat_interleave(FP8_WEIGHT_BLOCK // MXFP4_BLOCK, 1)
    shift = torch.pow(2.0, (e - b_at).double()).repeat_interleave(MXFP4_BLOCK, 1)
    codes = (fp4_decode(fp4_unpack(w)).double() * shift).to(torch.float8_e4m3fn).view(torch.uint8)
    codes = torch.where(nan.repeat_interleave(MXFP4_BLOCK, 1), torch.full_like(codes, 0x7F), codes)
    return codes.view(torch.float8_e4m3fn), b.to(torch.uint8).view(torch.float8_e8m0fnu)
