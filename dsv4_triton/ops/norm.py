"""Public op: rms_norm."""


from typing import Optional

import torch

from .. import validate as V
from ..kernels import norm as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import norm as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op

__all__ = ["rms_norm"]


def _stub(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    raise NotImplementedError


define_op("rms_norm", _stub, fake=lambda x, weight, eps: torch.empty_like(x, memory_format=torch.contiguous_format))


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2, -1) + eps)`` in FP32, returned in ``x.dtype`` (SPEC 4).

    x: ``[..., n]`` bf16/fp16/fp32, any strides.  weight: ``[n]`` or None (unweighted).
    """
    V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    if weight is not None:
        V.tensor("weight", weight, V.FLOAT_DTYPES, ndim=1)
        V.shape("weight", weight, (x.shape[-1],))
        V.same_device("weight", weight, "x", x)
    V.number("eps", eps, positive=True)
    return call("rms_norm", x.device, x, weight, float(eps))
