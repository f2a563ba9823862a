"""Public ops of the gemm family: linear layers (SPEC section 3).

``linear`` is a plain GEMM with FP32 accumulation (cuBLAS does it best; it has only the
reference backend, which on a GPU is one cuBLAS call).  ``fp8_linear`` and ``fp4_linear``
quantise the activation with ``act_quant(x, 128, pow2=True)`` and multiply by a
block-scaled FP8 / FP4 weight with FP32 accumulation.  ``grouped_linear`` is the batched
BF16 GEMM of the grouped output projection ``wo_a`` (SPEC 5.6).
"""


from typing import Optional

import torch

from cuda_fallback import gemm as _cuda  # noqa: F401  (registers the cuda backend of fp4_linear)

from .. import validate as V
from ..kernels import gemm as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import gemm as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op

__all__ = ["linear", "fp8_linear", "fp4_linear", "grouped_linear"]

FP4_PACKED_DTYPES = (torch.uint8, torch.int8, torch.float4_e2m1fn_x2)
FP4_FORMATS = ("mxfp4", "nvfp4")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _out_shape(x: torch.Tensor, n: int):
    return (*x.shape[:-1], n)


# --- linear ------------------------------------------------------------------------------

def _linear_stub(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    raise NotImplementedError


define_op("linear", _linear_stub, fake=lambda x, w, out_dtype: torch.empty(
    _out_shape(x, w.shape[0]), dtype=x.dtype if out_dtype is None else out_dtype, device=x.device))


def linear(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x @ w.T`` with FP32 accumulation, one rounding to ``out_dtype`` (default ``x.dtype``).

    x: ``[..., K]`` bf16/fp16/fp32; w: ``[N, K]`` bf16/fp16/fp32 (mixed dtypes compute in FP32).
    """
    V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    V.tensor("w", w, V.FLOAT_DTYPES, ndim=2)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"w: expected [N, {x.shape[-1]}] (K = x.shape[-1]), got {tuple(w.shape)}")
    V.same_device("w", w, "x", x)
    if out_dtype is not None and out_dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected None or one of bfloat16/float16/float32, got {out_dtype}")
    return call("linear", x.device, x, w, out_dtype)


# --- fp8_linear --------------------------------------------------------------------------

def _fp8_linear_stub(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     x_scale: Optional[torch.Tensor]) -> torch.Tensor:
    raise NotImplementedError


define_op("fp8_linear", _fp8_linear_stub, fake=lambda x, w, w_scale, x_scale: torch.empty(
    _out_shape(x, w.shape[0]), dtype=torch.bfloat16, device=x.device))


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act_quant(x, 128, pow2) @ dequant(w).T`` with FP32 accumulation, bf16 out (SPEC 3).

    x: ``[..., K]`` bf16/fp16/fp32; w: float8_e4m3fn ``[N, K]``; w_scale: float8_e8m0fnu or
    fp32 ``[ceil(N/128), ceil(K/128)]``, one per 128 x 128 weight block.  Any N, K >= 1.

    An activation already quantised (``act_quant(x, 128, pow2=True)`` or
    ``rms_norm_act_quant``): x its float8_e4m3fn codes ``[..., K]`` and ``x_scale`` its fp32
    scales ``[..., K/128]`` (K a multiple of 128); the result is the same as from the rows
    those codes encode.  Projections that share one input then quantise it once.
    """
    if x_scale is None:
        V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    else:
        V.tensor("x", x, (torch.float8_e4m3fn,), min_ndim=1)
        V.divisible("x", x.shape[-1], 128, what="K (the last dim of quantised codes)")
        V.tensor("x_scale", x_scale, (torch.float32,), ndim=x.dim())
        V.shape("x_scale", x_scale, (*x.shape[:-1], x.shape[-1] // 128))
        V.same_device("x_scale", x_scale, "x", x)
    V.tensor("w", w, (torch.float8_e4m3fn,), ndim=2)
    n, k = w.shape
    if k != x.shape[-1]:
        raise ValueError(f"w: expected [N, {x.shape[-1]}] (K = x.shape[-1]), got {tuple(w.shape)}")
    V.tensor("w_scale", w_scale, (torch.float8_e8m0fnu, torch.float32), ndim=2)
    V.shape("w_scale", w_scale, (_cdiv(n, 128), _cdiv(k, 128)))
    V.same_device("w", w, "x", x)
    V.same_device("w_scale", w_scale, "x", x)
    return call("fp8_linear", x.device, x, w, w_scale, x_scale)


# --- fp4_linear --------------------------------------------------------------------------

def _fp4_linear_stub(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str,
                     global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    raise NotImplementedError


define_op("fp4_linear", _fp4_linear_stub, fake=lambda x, w, w_scale, fmt, global_scale: torch.empty(
    _out_shape(x, w.shape[0]), dtype=torch.bfloat16, device=x.device))


def check_fp4_weight(name: str, w: torch.Tensor, scale_name: str, w_scale: torch.Tensor, fmt: str,
                     k: Optional[int] = None, lead: tuple = ()) -> int:
    """Validate a packed FP4 weight ``[*lead, N, K/2]`` and its scales; returns K."""
    if fmt not in FP4_FORMATS:
        raise ValueError(f"fmt: expected one of {FP4_FORMATS}, got {fmt!r}")
    V.tensor(name, w, FP4_PACKED_DTYPES, ndim=len(lead) + 2)
    if tuple(w.shape[:len(lead)]) != tuple(lead):
        raise ValueError(f"{name}: expected leading dims {tuple(lead)}, got shape {tuple(w.shape)}")
    n, kk = w.shape[-2], 2 * w.shape[-1]
    if k is not None and kk != k:
        raise ValueError(f"{name}: expected [..., N, {k // 2}] (K/2 packed bytes, K = {k}), got {tuple(w.shape)}")
    block = 32 if fmt == "mxfp4" else 16
    V.divisible(name, kk, block, what=f"K (twice the last dim) for {fmt}")
    scale_dtype = torch.float8_e8m0fnu if fmt == "mxfp4" else torch.float8_e4m3fn
    V.tensor(scale_name, w_scale, (scale_dtype,), ndim=len(lead) + 2)
    V.shape(scale_name, w_scale, (*lead, n, kk // block))
    return kk


def fp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, fmt: str = "mxfp4",
               global_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act_quant(x, 128, pow2) @ dequant(w).T`` with FP32 accumulation, bf16 out (SPEC 3).

    x: ``[..., K]`` bf16/fp16/fp32; w: packed FP4 ``[N, K/2]`` (uint8/int8/float4_e2m1fn_x2,
    element 2k in the low nibble).  fmt "mxfp4": w_scale float8_e8m0fnu ``[N, K/32]``, no
    global scale.  fmt "nvfp4": w_scale float8_e4m3fn ``[N, K/16]`` and ``global_scale`` an
    fp32 tensor of one element: value = lut[code] * w_scale * global_scale.
    """
    V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    check_fp4_weight("w", w, "w_scale", w_scale, fmt, k=x.shape[-1])
    V.same_device("w", w, "x", x)
    V.same_device("w_scale", w_scale, "x", x)
    if fmt == "nvfp4":
        if global_scale is None:
            raise ValueError("global_scale: nvfp4 needs an fp32 tensor of one element, got None")
        V.tensor("global_scale", global_scale, (torch.float32,))
        if global_scale.numel() != 1:
            raise ValueError(f"global_scale: expected one element, got shape {tuple(global_scale.shape)}")
        V.same_device("global_scale", global_scale, "x", x)
    elif global_scale is not None:
        raise ValueError("global_scale: mxfp4 has no global scale, expected None")
    return call("fp4_linear", x.device, x, w.view(torch.uint8), w_scale, fmt, global_scale)


# --- grouped_linear ----------------------------------------------------------------------

def _grouped_linear_stub(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


define_op("grouped_linear", _grouped_linear_stub, fake=lambda x, w: torch.empty(
    (x.shape[0], x.shape[1], w.shape[1]), dtype=torch.bfloat16, device=x.device))


def grouped_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per group g: ``y[:, g] = x[:, g] @ w[g].T``, FP32 accumulation, bf16 out (SPEC 5.6).

    x: bf16 ``[T, G, K]`` (any strides); w: bf16 ``[G, N, K]``.
    """
    V.tensor("x", x, (torch.bfloat16,), ndim=3)
    V.tensor("w", w, (torch.bfloat16,), ndim=3)
    if w.shape[0] != x.shape[1] or w.shape[2] != x.shape[2]:
        raise ValueError(f"w: expected [G={x.shape[1]}, N, K={x.shape[2]}], got {tuple(w.shape)}")
    V.same_device("w", w, "x", x)
    return call("grouped_linear", x.device, x, w)
