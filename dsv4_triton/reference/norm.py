"""FP32 oracle: RMSNorm (SPEC section 4)."""

from __future__ import annotations

from typing import Optional

import torch

from ..registry import register


@register("rms_norm", "reference")
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)
