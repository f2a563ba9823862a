"""FP32 oracle: SwiGLU with clamp (SPEC section 4), optional per-row weight (SPEC 8)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..registry import register


@register("swiglu", "reference")
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, weight: Optional[torch.Tensor]) -> torch.Tensor:
    g = gate.float().clamp(max=limit)  # clamp keeps NaN, as SPEC's min would in exact math
    u = up.float().clamp(-limit, limit)
    h = F.silu(g) * u
    if weight is not None:
        h = h * weight.float().reshape(*gate.shape[:-1], 1)
    return h.to(gate.dtype)
