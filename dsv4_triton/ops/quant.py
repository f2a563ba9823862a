"""Public ops of the quant family: FP8/FP4 quantisers, QAT simulation, Hadamard (SPEC 2, 4).

Blocks run along the last dim and must be powers of two that divide it.  A block whose
amax is Inf or NaN decodes to NaN as a whole (scale NaN / E8M0 0xFF); see
``dsv4_triton/reference/quant.py`` for the exact bytes.
"""


from typing import Tuple

import torch

from .. import validate as V
from ..kernels import quant as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import quant as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op
from .rope import _check_rope_args

__all__ = ["act_quant", "qat8", "fp4_quant", "fp4_dequant", "qat4", "hadamard", "rope_qat8", "rope_hadamard_qat4"]

MAX_BLOCK = 1024
HADAMARD_SIZES = (64, 128, 256, 512)
PACKED_DTYPES = (torch.uint8, torch.int8, torch.float4_e2m1fn_x2)
SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8)


def _block(name: str, block, n: int, min_block: int = 1) -> int:
    V.positive_int(name, block)
    if block & (block - 1) or not min_block <= block <= MAX_BLOCK:
        raise ValueError(f"{name}: expected a power of two in [{min_block}, {MAX_BLOCK}], got {block}")
    V.divisible("x", n, block)
    return block


def _blocked_input(x, block, min_block: int = 1) -> None:
    V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    _block("block", block, x.shape[-1], min_block)


def _scales_shape(x: torch.Tensor, block: int):
    return (*x.shape[:-1], x.shape[-1] // block)


# --- act_quant ---------------------------------------------------------------------------

def _act_quant_stub(x: torch.Tensor, block: int, pow2: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError


define_op("act_quant", _act_quant_stub, fake=lambda x, block, pow2: (
    torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
    torch.empty(_scales_shape(x, block), dtype=torch.float32, device=x.device)))


def act_quant(x: torch.Tensor, block: int = 128, pow2: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantisation per ``block`` elements of the last dim (SPEC 2).

    ``amax = max(max|x|, 1e-4)``, ``s = amax / 448`` (``2^ceil(log2 s)`` if ``pow2``),
    ``q = fp8_e4m3(clamp(x / s, -448, 448))`` rounded to nearest even.
    x: ``[..., n]`` bf16/fp16/fp32, any strides, ``n % block == 0``.
    Returns (q float8_e4m3fn ``[..., n]``, s fp32 ``[..., n / block]``).
    """
    _blocked_input(x, block)
    if not isinstance(pow2, bool):
        raise TypeError(f"pow2: expected a bool, got {type(pow2).__name__}")
    return call("act_quant", x.device, x, block, pow2)


# --- qat8 --------------------------------------------------------------------------------

def _qat8_stub(x: torch.Tensor, block: int, pow2: bool) -> torch.Tensor:
    raise NotImplementedError


define_op("qat8", _qat8_stub, fake=lambda x, block, pow2: torch.empty(x.shape, dtype=x.dtype, device=x.device))


def qat8(x: torch.Tensor, block: int = 64, pow2: bool = True) -> torch.Tensor:
    """``act_quant`` then dequantise (``q * s``), returned as a new tensor in ``x.dtype`` (SPEC 2)."""
    _blocked_input(x, block)
    if not isinstance(pow2, bool):
        raise TypeError(f"pow2: expected a bool, got {type(pow2).__name__}")
    return call("qat8", x.device, x, block, pow2)


# --- fp4_quant / fp4_dequant / qat4 ------------------------------------------------------

def _fp4_quant_stub(x: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError


define_op("fp4_quant", _fp4_quant_stub, fake=lambda x, block: (
    torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device),
    torch.empty(_scales_shape(x, block), dtype=torch.float8_e8m0fnu, device=x.device)))


def fp4_quant(x: torch.Tensor, block: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """FP4 (E2M1) quantisation with one E8M0 scale per ``block`` elements (SPEC 2, MXFP4).

    ``amax = max(max|x|, 6 * 2^-126)``, ``s = 2^ceil(log2(amax / 6))``,
    ``q = e2m1(clamp(x / s, -6, 6))`` rounded to nearest, ties to the even code.
    x: ``[..., n]`` bf16/fp16/fp32, any strides, ``n % block == 0``, block >= 2.
    Returns (packed uint8 ``[..., n/2]``: element 2k in the low nibble, 2k+1 in the high;
    scale float8_e8m0fnu ``[..., n / block]``).
    """
    _blocked_input(x, block, min_block=2)
    return call("fp4_quant", x.device, x, block)


def _fp4_dequant_stub(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    raise NotImplementedError


define_op("fp4_dequant", _fp4_dequant_stub, fake=lambda packed, scale, dtype: torch.empty(
    (*packed.shape[:-1], 2 * packed.shape[-1]), dtype=dtype, device=packed.device))


def fp4_dequant(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``e2m1(code) * 2^(scale - 127)`` (SPEC 2); E8M0 byte 0xFF decodes to NaN.

    packed: uint8/int8/float4_e2m1fn_x2 ``[..., n/2]``; scale: float8_e8m0fnu (or its uint8
    bytes) ``[..., n / block]`` with the same leading dims, block = n / scale.shape[-1] a power
    of two >= 2.  Returns ``dtype`` (bf16/fp16/fp32) ``[..., n]``.
    """
    V.tensor("packed", packed, PACKED_DTYPES, min_ndim=1)
    V.tensor("scale", scale, SCALE_DTYPES, ndim=packed.dim())
    V.same_device("scale", scale, "packed", packed)
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of bfloat16/float16/float32, got {dtype}")
    if tuple(scale.shape[:-1]) != tuple(packed.shape[:-1]):
        raise ValueError(f"scale: expected leading dims {tuple(packed.shape[:-1])} (those of packed), "
                         f"got shape {tuple(scale.shape)}")
    n = 2 * packed.shape[-1]
    nb = scale.shape[-1]
    if nb == 0 or n % nb:
        raise ValueError(f"scale: last dim must divide n = {n} (2 * packed.shape[-1]), got {nb}")
    block = n // nb
    if block & (block - 1) or not 2 <= block <= MAX_BLOCK:
        raise ValueError(f"scale: block n / scale.shape[-1] must be a power of two in [2, {MAX_BLOCK}], got {block}")
    return call("fp4_dequant", packed.device, packed, scale, dtype)


def _qat4_stub(x: torch.Tensor, block: int) -> torch.Tensor:
    raise NotImplementedError


define_op("qat4", _qat4_stub, fake=lambda x, block: torch.empty(x.shape, dtype=x.dtype, device=x.device))


def qat4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``fp4_quant`` then dequantise, returned as a new tensor in ``x.dtype`` (SPEC 2)."""
    _blocked_input(x, block, min_block=2)
    return call("qat4", x.device, x, block)


# --- hadamard ----------------------------------------------------------------------------

def _hadamard_stub(x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


define_op("hadamard", _hadamard_stub, fake=lambda x: torch.empty(x.shape, dtype=x.dtype, device=x.device))


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``y = H_n x * n^-0.5`` over the last dim with the Sylvester matrix (SPEC 4).

    x: ``[..., n]`` bf16/fp16/fp32, n in {64, 128, 256, 512}, any strides.  FP32 math
    (exact products, FP32 sums), one rounding to ``x.dtype``.
    """
    V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] not in HADAMARD_SIZES:
        raise ValueError(f"x: last dim must be one of {HADAMARD_SIZES}, got {x.shape[-1]}")
    return call("hadamard", x.device, x)


# --- fused finishing steps ---------------------------------------------------------------

def _rope_qat8_stub(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, block: int) -> torch.Tensor:
    raise NotImplementedError


def _rope_hadamard_qat4_stub(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


define_op("rope_qat8", _rope_qat8_stub,
          fake=lambda x, freqs, positions, block: torch.empty(x.shape, dtype=x.dtype, device=x.device))
define_op("rope_hadamard_qat4", _rope_hadamard_qat4_stub,
          fake=lambda x, freqs, positions: torch.empty(x.shape, dtype=x.dtype, device=x.device))


def rope_qat8(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The KV vector's finishing step (SPEC 5.2), one pass: RoPE on the last
    ``R = 2 * freqs.shape[1]`` dims (as ``apply_rope``) and ``qat8(., block, pow2=True)`` on
    the first ``D - R``; returns a new tensor of ``x.dtype``, bit-identical to that chain.

    x: ``[..., D]`` bf16/fp16/fp32, any strides, ``(D - R) % block == 0``.  freqs, positions:
    as ``apply_rope`` (positions out of range raise in checked mode, are clamped otherwise).
    """
    _check_rope_args(x, freqs, positions, False)
    V.positive_int("block", block)
    if block & (block - 1) or block > MAX_BLOCK:
        raise ValueError(f"block: expected a power of two in [1, {MAX_BLOCK}], got {block}")
    nope = x.shape[-1] - 2 * freqs.shape[1]
    V.divisible("x", nope, block, what=f"last dim minus rope_dim {2 * freqs.shape[1]}")
    return call("rope_qat8", x.device, x, freqs, positions, block)


def rope_hadamard_qat4(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The indexer query's finishing step (SPEC 7), one pass: RoPE on the last
    ``R = 2 * freqs.shape[1]`` dims, Hadamard over all D dims, ``qat4`` (block 32).

    Each step rounds to ``x.dtype`` as the chain ``qat4(hadamard(apply_rope(x)))`` does; the
    fused result equals that chain except where the Hadamard's FP32 sums, taken in another
    order, round to a different neighbour (see ``hadamard``).
    x: ``[..., D]`` bf16/fp16/fp32, D in {64, 128, 256, 512}, any strides; R a power of two.
    freqs, positions: as ``apply_rope``.
    """
    _check_rope_args(x, freqs, positions, False)
    if x.shape[-1] not in HADAMARD_SIZES:
        raise ValueError(f"x: last dim must be one of {HADAMARD_SIZES}, got {x.shape[-1]}")
    rope_dim = 2 * freqs.shape[1]
    if rope_dim & (rope_dim - 1):
        raise ValueError(f"freqs: rope_dim 2 * freqs.shape[1] must be a power of two, got {rope_dim}")
    return call("rope_hadamard_qat4", x.device, x, freqs, positions)
