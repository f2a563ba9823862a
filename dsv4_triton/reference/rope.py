"""FP32 oracles: the RoPE table and interleaved-pair RoPE (SPEC section 4).

Numerics of the table (SPEC fixes the math, not the rounding; these choices are shared by
the Triton kernel so the two agree to the last bit or one FP32 ulp):

* Frequencies ``f_i = theta^(-2i/R)`` and the YaRN blend are evaluated in FP64 and
  rounded once to FP32, so ``f_i`` is the correctly rounded FP32 value on every device
  (an FP32 ``pow`` can differ by an ulp between CPU and GPU libraries, and at position
  10^6 one ulp of ``f_i`` moves the angle by ~0.05 rad).
* The angle is ``pos * f_i`` as ONE FP32 multiply, as the release computes it (an FP32
  outer product).  Positions up to 2^24 are exact in FP32.
* cos/sin of that FP32 angle are evaluated in FP64 and rounded once: the table holds
  the correctly rounded cos/sin of the FP32 angle.

YaRN is applied whenever ``yarn`` is given (SPEC 4: the compressed layers always use
it), whatever ``max_pos`` is; the ramp is SPEC's, including its ``high <= R - 1`` bound.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..registry import register


def yarn_ramp_range(rope_dim: int, theta: float, original_max_pos: int,
                    beta_fast: float, beta_slow: float) -> Tuple[float, float]:
    """``(low, high)`` of SPEC 4's YaRN ramp, with ``high += 0.001`` when they are equal."""

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(original_max_pos / (2 * math.pi * rotations)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    return float(low), float(high) + (0.001 if high == low else 0.0)


@register("rope_freqs", "reference")
def rope_freqs(rope_dim: int, max_pos: int, theta: float, yarn_factor: Optional[float],
               yarn_original_max_pos: Optional[int], yarn_beta_fast: Optional[float],
               yarn_beta_slow: Optional[float], device: torch.device) -> torch.Tensor:
    half = rope_dim // 2
    i = torch.arange(half, dtype=torch.float64, device=device)
    freqs = torch.full_like(i, theta).pow(-2.0 * i / rope_dim)
    if yarn_factor is not None:
        low, high = yarn_ramp_range(rope_dim, theta, yarn_original_max_pos, yarn_beta_fast, yarn_beta_slow)
        ramp = ((i - low) / (high - low)).clamp(0.0, 1.0)
        freqs = freqs / yarn_factor * ramp + freqs * (1.0 - ramp)
    pos = torch.arange(max_pos, dtype=torch.float32, device=device)
    angle = (pos[:, None] * freqs.to(torch.float32)[None, :]).double()
    return torch.stack((angle.cos(), angle.sin()), dim=-1).to(torch.float32)


def _rotate_pairs(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x: FP32 ``[P, M, R]`` (P position slots, M rows per slot); positions ``[P]`` in range."""
    table = freqs[positions.long()]  # [P, R/2, 2]
    cos, sin = table[:, None, :, 0], table[:, None, :, 1]
    if inverse:
        sin = -sin
    x0, x1 = x[..., 0::2], x[..., 1::2]
    # Separate FP32 multiplies and one add each, every step rounded: the kernel does the
    # same operations in the same order without fused multiply-adds.
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return torch.stack((y0, y1), dim=-1).flatten(-2)


@register("apply_rope", "reference")
def apply_rope(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate the last ``R = 2 * freqs.shape[1]`` dims of ``x`` at ``positions`` (clamped
    into ``[0, max_pos)``, as the kernel does in unchecked mode)."""
    rope_dim, head_dim = 2 * freqs.shape[1], x.shape[-1]
    n_slots = positions.numel()
    rows_per_slot = math.prod(x.shape[positions.dim():-1])
    xf = x.float().reshape(n_slots, rows_per_slot, head_dim)
    pos = positions.reshape(n_slots).clamp(0, freqs.shape[0] - 1)
    y = xf.clone()
    y[..., head_dim - rope_dim:] = _rotate_pairs(xf[..., head_dim - rope_dim:], freqs, pos, inverse)
    return y.reshape(x.shape).to(x.dtype)


@register("apply_rope_", "reference")
def apply_rope_(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool) -> None:
    x.copy_(apply_rope(x, freqs, positions, inverse))
