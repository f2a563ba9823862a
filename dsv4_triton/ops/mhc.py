"""Public ops: manifold-constrained hyper-connections (hc_pre, hc_post, hc_head), SPEC 9."""


from typing import Tuple

import torch

from .. import validate as V
from ..kernels import mhc as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import mhc as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op

__all__ = ["hc_pre", "hc_post", "hc_head"]

HC_MULT = 4
N_MIX = (2 + HC_MULT) * HC_MULT  # 24: 4 pre, 4 post, 16 comb


def _pre_stub(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
              eps: float, norm_eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _pre_fake(X, fn, scale, base, iters, eps, norm_eps):
    T, _, dim = X.shape
    return (X.new_empty((T, dim)), X.new_empty((T, HC_MULT), dtype=torch.float32),
            X.new_empty((T, HC_MULT, HC_MULT), dtype=torch.float32))


def _post_stub(F: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


def _head_stub(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
               norm_eps: float) -> torch.Tensor:
    raise NotImplementedError


define_op("hc_pre", _pre_stub, fake=_pre_fake)
define_op("hc_post", _post_stub, fake=lambda F, X, post, comb: X.new_empty(X.shape))
define_op("hc_head", _head_stub, fake=lambda X, fn, scale, base, eps, norm_eps: X.new_empty((X.shape[0], X.shape[2])))


def _check_streams(X: torch.Tensor) -> None:
    V.tensor("X", X, (torch.bfloat16,), ndim=3)
    if X.shape[1] != HC_MULT:
        raise ValueError(f"X: expected {HC_MULT} streams in dim 1 ([T, {HC_MULT}, dim]), got shape {tuple(X.shape)}")
    if X.shape[2] == 0:
        raise ValueError(f"X: expected dim >= 1, got shape {tuple(X.shape)}")


def _check_params(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                  n_mix: int, n_scale: int) -> None:
    dim = X.shape[2]
    for name, t, shape in (("fn", fn, (n_mix, HC_MULT * dim)), ("scale", scale, (n_scale,)),
                           ("base", base, (n_mix,))):
        V.tensor(name, t, (torch.float32,))
        V.shape(name, t, shape)
        V.same_device(name, t, "X", X)


def hc_pre(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int = 20,
           eps: float = 1e-6, norm_eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre-mix of the residual streams (SPEC 9) -> ``(y, post, comb)``.

    X: bf16 ``[T, 4, dim]``.  fn: fp32 ``[24, 4*dim]``; scale: fp32 ``[3]``; base: fp32 ``[24]``.
    Per token, with v = flatten(X): ``mix = (fn v) * rsqrt(mean(v^2) + norm_eps)``;
    ``pre = sigmoid(mix[:4] * scale[0] + base[:4]) + eps``; ``post = 2 sigmoid(mix[4:8] * scale[1] + base[4:8])``;
    ``comb`` = Sinkhorn (``iters`` rounds, ``eps`` = hc_eps) of ``mix[8:] * scale[2] + base[8:]`` as 4x4.
    Returns y = ``sum_i pre_i X_i`` bf16 ``[T, dim]``, post fp32 ``[T, 4]``, comb fp32 ``[T, 4, 4]``
    (``comb[t, i, j]`` weighs input stream i into output stream j).
    """
    _check_streams(X)
    _check_params(X, fn, scale, base, N_MIX, 3)
    V.positive_int("iters", iters)
    V.number("eps", eps, positive=True)
    V.number("norm_eps", norm_eps, positive=True)
    return call("hc_pre", X.device, X, fn, scale, base, iters, float(eps), float(norm_eps))


def hc_post(F: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC post-mix (SPEC 9): ``X'_j = post_j * F + sum_i comb[i][j] X_i``, FP32 math, bf16 out.

    F: bf16 ``[T, dim]`` (the sub-block's output); X: bf16 ``[T, 4, dim]``; post: fp32 ``[T, 4]``;
    comb: fp32 ``[T, 4, 4]`` (as ``hc_pre`` returns them).  Returns bf16 ``[T, 4, dim]``.
    """
    _check_streams(X)
    T, _, dim = X.shape
    V.tensor("F", F, (torch.bfloat16,), ndim=2)
    V.shape("F", F, (T, dim))
    V.same_device("F", F, "X", X)
    for name, t, shape in (("post", post, (T, HC_MULT)), ("comb", comb, (T, HC_MULT, HC_MULT))):
        V.tensor(name, t, (torch.float32,))
        V.shape(name, t, shape)
        V.same_device(name, t, "X", X)
    return call("hc_post", X.device, F, X, post, comb)


def hc_head(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float = 1e-6,
            norm_eps: float = 1e-6) -> torch.Tensor:
    """mHC head merge (SPEC 9): ``y = sum_i pre_i X_i`` with
    ``pre = sigmoid((fn v) * rsqrt(mean(v^2) + norm_eps) * scale[0] + base) + eps``.

    X: bf16 ``[T, 4, dim]``; fn: fp32 ``[4, 4*dim]``; scale: fp32 ``[1]``; base: fp32 ``[4]``.
    Returns bf16 ``[T, dim]`` (the final rmsnorm is a separate op).
    """
    _check_streams(X)
    _check_params(X, fn, scale, base, HC_MULT, 1)
    V.number("eps", eps, positive=True)
    V.number("norm_eps", norm_eps, positive=True)
    return call("hc_head", X.device, X, fn, scale, base, float(eps), float(norm_eps))
