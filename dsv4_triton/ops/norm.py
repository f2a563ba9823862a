"""Public ops: rms_norm, and rms_norm_act_quant (the norm with its FP8 activation codes)."""


from typing import Optional, Tuple

import torch

from .. import validate as V
from ..kernels import norm as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import norm as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op

__all__ = ["rms_norm", "rms_norm_act_quant"]

ACT_BLOCK = 128  # the FP8 linears' activation block (SPEC 3)


def _stub(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    raise NotImplementedError


define_op("rms_norm", _stub, fake=lambda x, weight, eps: torch.empty_like(x, memory_format=torch.contiguous_format))


def _check_weight_eps(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> None:
    if weight is not None:
        V.tensor("weight", weight, V.FLOAT_DTYPES, ndim=1)
        V.shape("weight", weight, (x.shape[-1],))
        V.same_device("weight", weight, "x", x)
    V.number("eps", eps, positive=True)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2, -1) + eps)`` in FP32, returned in ``x.dtype`` (SPEC 4).

    x: ``[..., n]`` bf16/fp16/fp32, any strides.  weight: ``[n]`` or None (unweighted).
    """
    V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    _check_weight_eps(x, weight, eps)
    return call("rms_norm", x.device, x, weight, float(eps))


def _rms_norm_act_quant_stub(x: torch.Tensor, weight: Optional[torch.Tensor],
                             eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError


define_op("rms_norm_act_quant", _rms_norm_act_quant_stub, fake=lambda x, weight, eps: (
    torch.empty_like(x, memory_format=torch.contiguous_format),
    torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
    torch.empty((*x.shape[:-1], x.shape[-1] // ACT_BLOCK), dtype=torch.float32, device=x.device)))


def rms_norm_act_quant(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                       eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = rms_norm(x, weight, eps)`` and ``act_quant(y, 128, pow2=True)`` of the rounded y, one pass.

    Returns (y in ``x.dtype``, codes float8_e4m3fn ``[..., n]``, scales fp32 ``[..., n / 128]``):
    the codes and scales are those ``act_quant`` gives for this y, bit for bit, ready for
    ``fp8_linear(codes, w, w_scale, x_scale=scales)``.  x: ``[..., n]`` bf16/fp16/fp32, any
    strides, n a multiple of 128.  weight: ``[n]`` or None.
    """
    V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    V.divisible("x", x.shape[-1], ACT_BLOCK, what="the last dim (one FP8 scale per 128 values)")
    _check_weight_eps(x, weight, eps)
    return call("rms_norm_act_quant", x.device, x, weight, float(eps))
