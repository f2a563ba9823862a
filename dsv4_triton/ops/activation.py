"""Public op: swiglu (SPEC section 4)."""


import math
from typing import Optional

import torch

from .. import validate as V
from ..kernels import activation as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import activation as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op

__all__ = ["swiglu"]


def _stub(gate: torch.Tensor, up: torch.Tensor, limit: float, weight: Optional[torch.Tensor]) -> torch.Tensor:
    raise NotImplementedError


define_op("swiglu", _stub,
          fake=lambda gate, up, limit, weight: torch.empty_like(gate, memory_format=torch.contiguous_format))


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 10.0,
           weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(min(gate, limit)) * clamp(up, -limit, limit)`` in FP32, times ``weight`` per row
    if given, returned in ``gate.dtype`` (SPEC 4 and 8).

    gate, up: ``[..., n]`` bf16/fp16/fp32 of one shape and dtype, any strides (e.g. the two
    halves of one ``[T, 2n]`` projection).  limit: > 0 (``inf`` disables the clamp).
    weight: fp32 with one value per row: ``[T]`` or ``[T, 1]`` with ``T`` the number of rows
    (or ``gate.shape[:-1]``, optionally with a trailing 1).
    """
    V.tensor("gate", gate, V.FLOAT_DTYPES, min_ndim=1)
    V.tensor("up", up, (gate.dtype,))
    V.shape("up", up, gate.shape)
    V.same_device("up", up, "gate", gate)
    limit = V.number("limit", limit, positive=True)
    if weight is not None:
        V.tensor("weight", weight, (torch.float32,))
        lead = tuple(gate.shape[:-1])
        rows = math.prod(lead)
        allowed = {(rows,), (rows, 1), lead, lead + (1,)}
        if tuple(weight.shape) not in allowed:
            raise ValueError(f"weight: expected one value per row of gate, shape ({rows},) or ({rows}, 1) "
                             f"(or {lead} with an optional trailing 1), got {tuple(weight.shape)}")
        V.same_device("weight", weight, "gate", gate)
    return call("swiglu", gate.device, gate, up, limit, weight)
