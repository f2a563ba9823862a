"""FP32 oracles: RMSNorm (SPEC section 4), and RMSNorm followed by the activation quantiser (SPEC 2, 3)."""

from __future__ import annotations

from typing import Optional

import torch

from ..registry import register
from .quant import act_quant


@register("rms_norm", "reference")
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


@register("rms_norm_act_quant", "reference")
def rms_norm_act_quant(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float):
    y = rms_norm(x, weight, eps)
    q, s = act_quant(y, 128, True)
    return y, q, s
