"""Public ops: rope_freqs, apply_rope, apply_rope_ (SPEC section 4)."""


import math
from typing import Optional

import torch

from .. import validate as V
from ..kernels import rope as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import rope as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, declare_torch_op, define_op, dispatch

__all__ = ["rope_freqs", "apply_rope", "apply_rope_"]

POSITION_DTYPES = (torch.int32, torch.int64)
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
# Keys a release config's rope_scaling may carry besides YARN_KEYS.  mscale is an
# attention-scale correction, which SPEC 4 says V4 does not apply: it is ignored.
YARN_IGNORED_KEYS = ("type", "rope_type", "mscale", "mscale_all_dim")


# rope_freqs takes no tensor, so the registry's generic op (which finds the device from
# a tensor argument) does not fit: its custom op dispatches on the device argument, and
# the yarn dict is flattened into scalars (a custom op cannot take a dict).
@torch.library.custom_op("dsv4::rope_freqs", mutates_args=())
def _rope_freqs_op(rope_dim: int, max_pos: int, theta: float, yarn_factor: Optional[float],
                   yarn_original_max_pos: Optional[int], yarn_beta_fast: Optional[float],
                   yarn_beta_slow: Optional[float], device: torch.device) -> torch.Tensor:
    return dispatch("rope_freqs", device)(rope_dim, max_pos, theta, yarn_factor, yarn_original_max_pos,
                                          yarn_beta_fast, yarn_beta_slow, device)


@_rope_freqs_op.register_fake
def _rope_freqs_fake(rope_dim, max_pos, theta, yarn_factor, yarn_original_max_pos, yarn_beta_fast,
                     yarn_beta_slow, device):
    return torch.empty(max_pos, rope_dim // 2, 2, dtype=torch.float32, device=device)


declare_torch_op("rope_freqs", _rope_freqs_op)


def _apply_rope_stub(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool) -> torch.Tensor:
    raise NotImplementedError


def _apply_rope_inplace_stub(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool) -> None:
    raise NotImplementedError


define_op("apply_rope", _apply_rope_stub,
          fake=lambda x, freqs, positions, inverse: torch.empty_like(x, memory_format=torch.contiguous_format))
define_op("apply_rope_", _apply_rope_inplace_stub, fake=lambda x, freqs, positions, inverse: None,
          mutates_args=("x",))


def _yarn_scalars(yarn):
    if yarn is None:
        return None, None, None, None
    if not isinstance(yarn, dict):
        raise TypeError(f"yarn: expected a dict with keys {YARN_KEYS} or None, got {type(yarn).__name__}")
    missing = [k for k in YARN_KEYS if k not in yarn]
    unknown = [k for k in yarn if k not in YARN_KEYS + YARN_IGNORED_KEYS]
    if missing or unknown:
        raise ValueError(f"yarn: expected keys {YARN_KEYS}, got {tuple(yarn)} "
                         f"(missing {tuple(missing)}, unknown {tuple(unknown)})")
    kind = yarn.get("type", yarn.get("rope_type", "yarn"))
    if kind != "yarn":
        raise ValueError(f"yarn: expected type 'yarn', got {kind!r}")
    factor = V.number("yarn['factor']", yarn["factor"], positive=True)
    original = V.positive_int("yarn['original_max_position_embeddings']", yarn["original_max_position_embeddings"])
    beta_fast = V.number("yarn['beta_fast']", yarn["beta_fast"], positive=True)
    beta_slow = V.number("yarn['beta_slow']", yarn["beta_slow"], positive=True)
    if not beta_fast > beta_slow:
        raise ValueError(f"yarn: expected beta_fast > beta_slow, got {beta_fast} and {beta_slow}")
    for name, v in (("yarn['factor']", factor), ("yarn['beta_fast']", beta_fast), ("yarn['beta_slow']", beta_slow)):
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v}")
    return factor, original, beta_fast, beta_slow


def rope_freqs(rope_dim: int, max_pos: int, theta: float, yarn: Optional[dict] = None,
               device=None) -> torch.Tensor:
    """The RoPE table: FP32 ``[max_pos, rope_dim // 2, 2]`` holding ``(cos, sin)`` of
    ``pos * f_i`` with ``f_i = theta^(-2i/rope_dim)``, YaRN-blended when ``yarn`` is given
    (SPEC 4; see ``reference/rope.py`` for the exact rounding).

    yarn: None or the release's ``rope_scaling`` dict: ``factor``,
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow`` (``type`` must be
    ``"yarn"`` if present; ``mscale`` keys are ignored: V4 has no attention-scale correction).
    device: where the table is built (default: torch's default device).
    """
    V.positive_int("rope_dim", rope_dim)
    V.divisible("rope_dim", rope_dim, 2, what="value")
    V.positive_int("max_pos", max_pos)
    if max_pos > 2 ** 24:
        raise ValueError(f"max_pos: positions are exact in FP32 only up to 2^24, got {max_pos}")
    theta = V.number("theta", theta)
    if not (theta > 1.0 and math.isfinite(theta)):
        raise ValueError(f"theta: expected a finite number > 1, got {theta}")
    factor, original, beta_fast, beta_slow = _yarn_scalars(yarn)
    if device is None:
        device = torch.get_default_device()
    elif not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a torch.device, a str or None, got {type(device).__name__}")
    device = torch.device(device)
    return call("rope_freqs", device, rope_dim, max_pos, theta, factor, original, beta_fast, beta_slow, device)


def slot_view(x: torch.Tensor, n_position_dims: int) -> Optional[torch.Tensor]:
    """``x`` viewed as ``[P, M, D]`` (P = the positions' elements, M rows per position)
    without a copy, or None when its strides do not allow it."""
    n_slots = math.prod(x.shape[:n_position_dims])
    try:
        return x.view(n_slots, math.prod(x.shape[n_position_dims:-1]), x.shape[-1])
    except RuntimeError:
        return None


def _check_rope_args(x, freqs, positions, inverse) -> None:
    V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
    V.tensor("freqs", freqs, (torch.float32,), ndim=3)
    if freqs.shape[0] < 1 or freqs.shape[1] < 1 or freqs.shape[2] != 2:
        raise ValueError(f"freqs: expected shape [max_pos >= 1, rope_dim/2 >= 1, 2], got {tuple(freqs.shape)}")
    V.same_device("freqs", freqs, "x", x)
    rope_dim = 2 * freqs.shape[1]
    if rope_dim > x.shape[-1]:
        raise ValueError(f"x: last dim must be >= rope_dim = 2 * freqs.shape[1] = {rope_dim}, got {x.shape[-1]}")
    V.tensor("positions", positions, POSITION_DTYPES)
    if positions.dim() >= x.dim() or tuple(x.shape[:positions.dim()]) != tuple(positions.shape):
        raise ValueError(f"positions: expected a shape that is a prefix of x.shape[:-1] = "
                         f"{tuple(x.shape[:-1])}, got {tuple(positions.shape)}")
    V.same_device("positions", positions, "x", x)
    if not isinstance(inverse, bool):
        raise TypeError(f"inverse: expected a bool, got {type(inverse).__name__}")
    if V.checks_enabled() and positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= freqs.shape[0]:
            raise ValueError(f"positions: expected values in [0, {freqs.shape[0]}) (freqs.shape[0]), "
                             f"got values in [{lo}, {hi}]")


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE on the last ``R = 2 * freqs.shape[1]`` dims of ``x``, interleaved pairs
    ``(x[2i], x[2i+1])`` rotated by ``pos * f_i`` (by ``-pos * f_i`` if ``inverse``), FP32
    math, returned as a new tensor of ``x.dtype`` (the first ``D - R`` dims copied).

    x: ``[..., D]`` bf16/fp16/fp32, any strides.  freqs: the ``rope_freqs`` table.
    positions: int32/int64 whose shape is a prefix of ``x.shape[:-1]`` (``[T]`` for
    ``x [T, H, D]``, ``[B, S]`` for ``x [B, S, H, D]``), broadcast over the other dims.
    Positions outside ``[0, freqs.shape[0])`` raise ``ValueError`` in checked mode
    (``DSV4_CHECKS=1``) and are clamped into range otherwise.
    """
    _check_rope_args(x, freqs, positions, inverse)
    return call("apply_rope", x.device, x, freqs, positions, inverse)


def apply_rope_(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """In-place ``apply_rope``: rotates the last R dims of ``x`` where it lies and leaves the
    first ``D - R`` untouched, so it moves only the R rotated dims.  Returns ``x``."""
    _check_rope_args(x, freqs, positions, inverse)
    if slot_view(x, positions.dim()) is None:
        raise ValueError(f"x: in-place RoPE needs the dims of positions and the remaining leading dims "
                         f"each to flatten without a copy, got shape {tuple(x.shape)} strides {x.stride()}")
    if any(stride == 0 and size > 1 for size, stride in zip(x.shape, x.stride())):
        raise ValueError(f"x: in-place RoPE needs x without overlapping elements, got a broadcast (stride 0) dim: "
                         f"shape {tuple(x.shape)} strides {x.stride()}")
    call("apply_rope_", x.device, x, freqs, positions, inverse)
    return x
