"""Argument checks shared by every public op.

Each check raises ``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong shape,
device, size, value) naming the argument, what was expected and what came.  Checks on
shapes, dtypes and devices are always on and cost well under a microsecond each;
checks that would need to read tensor *values* (index ranges, token ids) force a host
sync, so they run only in checked mode: ``DSV4_CHECKS=1`` in the environment (read at
import) or ``set_checks(True)``.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

_checks = os.environ.get("DSV4_CHECKS", "0") == "1"


def checks_enabled() -> bool:
    """True in checked mode (value checks that need a host sync are run)."""
    return _checks


def set_checks(on: bool) -> None:
    global _checks
    _checks = bool(on)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, t, dtypes: Optional[Sequence[torch.dtype]] = None,
           ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got {t.dim()} (shape {tuple(t.shape)})")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def divisible(name: str, value: int, by: int, what: str = "last dim") -> None:
    if value % by:
        raise ValueError(f"{name}: {what} must be a multiple of {by}, got {value}")


def positive_int(name: str, value, allowed: Optional[Iterable[int]] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if allowed is not None:
        allowed = tuple(allowed)
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {value}")
    elif value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def number(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return float(value)


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
