"""Public op: the MoE router (route), SPEC 8."""


from typing import Optional, Tuple

import torch

from .. import validate as V
from ..kernels import router as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import router as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op

__all__ = ["route"]

_INT_DTYPES = (torch.int32, torch.int64)


def _stub(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tid2eid: Optional[torch.Tensor],
          token_ids: Optional[torch.Tensor], topk: int, route_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _fake(x, weight, bias, tid2eid, token_ids, topk, route_scale):
    T = x.shape[0]
    return x.new_empty((T, topk), dtype=torch.float32), x.new_empty((T, topk), dtype=torch.int32)


define_op("route", _stub, fake=_fake)


def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
          tid2eid: Optional[torch.Tensor] = None, token_ids: Optional[torch.Tensor] = None, topk: int = 6,
          route_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """MoE routing (SPEC 8) -> ``(weights fp32 [T, topk], ids int32 [T, topk])``.

    x: bf16 ``[T, dim]``; weight: bf16 ``[E, dim]``.  Scores ``s = sqrt(softplus(x @ W^T))`` (FP32).
    Score routing (``tid2eid`` None): ids = the top ``topk`` of ``s + bias`` (bias fp32 ``[E]`` or
    None = 0), ties to the lower expert id, a NaN score ranking highest.  Hash routing: ``tid2eid``
    int32 ``[vocab, topk]`` and ``token_ids`` int ``[T]`` give ids = ``tid2eid[token_ids]`` (bias must
    be None).  Weights: ``s[ids]`` normalised to sum 1 per token, times ``route_scale``.

    Token ids outside ``[0, vocab)`` and table entries outside ``[0, E)`` raise ``ValueError`` in
    checked mode (``DSV4_CHECKS=1``); otherwise they are clamped into range (never read out of
    bounds).
    """
    V.tensor("x", x, (torch.bfloat16,), ndim=2)
    V.tensor("weight", weight, (torch.bfloat16,), ndim=2)
    V.same_device("weight", weight, "x", x)
    n_experts, dim = weight.shape
    if x.shape[1] != dim:
        raise ValueError(f"x: expected last dim {dim} (that of weight [E, dim]), got shape {tuple(x.shape)}")
    if n_experts == 0 or dim == 0:
        raise ValueError(f"weight: expected E >= 1 and dim >= 1, got shape {tuple(weight.shape)}")
    V.positive_int("topk", topk)
    if topk > n_experts:
        raise ValueError(f"topk: expected at most E = {n_experts}, got {topk}")
    V.number("route_scale", route_scale)
    if bias is not None:
        V.tensor("bias", bias, (torch.float32,), ndim=1)
        V.shape("bias", bias, (n_experts,))
        V.same_device("bias", bias, "x", x)
    if tid2eid is None:
        if token_ids is not None:
            raise ValueError("token_ids: only used with hash routing (tid2eid); expected None, got a tensor")
    else:
        if bias is not None:
            raise ValueError("bias: score routing (bias) and hash routing (tid2eid) are exclusive; pass one")
        V.tensor("tid2eid", tid2eid, (torch.int32,), ndim=2)
        if tid2eid.shape[1] != topk or tid2eid.shape[0] == 0:
            raise ValueError(f"tid2eid: expected shape [vocab >= 1, topk = {topk}], got {tuple(tid2eid.shape)}")
        V.same_device("tid2eid", tid2eid, "x", x)
        if token_ids is None:
            raise ValueError("token_ids: hash routing (tid2eid given) needs token_ids int [T], got None")
        V.tensor("token_ids", token_ids, _INT_DTYPES, ndim=1)
        V.shape("token_ids", token_ids, (x.shape[0],))
        V.same_device("token_ids", token_ids, "x", x)
        if V.checks_enabled() and token_ids.numel():
            lo, hi = int(token_ids.min()), int(token_ids.max())
            if lo < 0 or hi >= tid2eid.shape[0]:
                raise ValueError(f"token_ids: expected values in [0, {tid2eid.shape[0]}), got range [{lo}, {hi}]")
        if V.checks_enabled():
            lo, hi = int(tid2eid.min()), int(tid2eid.max())
            if lo < 0 or hi >= n_experts:
                raise ValueError(f"tid2eid: expected expert ids in [0, {n_experts}), got range [{lo}, {hi}]")
    return call("route", x.device, x, weight, bias, tid2eid, token_ids, topk, float(route_scale))
