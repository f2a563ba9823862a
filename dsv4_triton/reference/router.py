"""FP32 oracle: the MoE router (SPEC section 8).

Conventions chosen here (SPEC is silent on them), shared with the Triton kernel:

* Top-k ties go to the lower expert id (a stable descending sort).
* A NaN biased score ranks above every number, +inf included, and NaN ties again go to the
  lower id; the weights of such a token are NaN, so the NaN is not hidden.
* Hash routing clamps token ids into ``[0, vocab)`` and table entries into ``[0, E)`` before
  using them as indices: out-of-range ids are a checked-mode error in the public op, and
  never a read outside the tensors.

Scores ``x @ W^T`` are accumulated in FP64 and rounded once to FP32 (independent of the
summation order and of TF32 settings); the rest is FP32 in SPEC's order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..registry import register


def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sqrt(softplus(x @ W^T))`` (FP32 [T, E])."""
    logits = (x.double() @ weight.double().T).float()
    return torch.sqrt(F.softplus(logits))


def topk_lowest_id_ties(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row; ties -> lower index; NaN ranks highest."""
    key = torch.where(torch.isnan(key), torch.full_like(key, float("inf")), key)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]


@register("route", "reference")
def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tid2eid: Optional[torch.Tensor],
          token_ids: Optional[torch.Tensor], topk: int, route_scale: float):
    scores = router_scores(x, weight)
    n_experts = weight.shape[0]
    if tid2eid is not None:
        rows = token_ids.long().clamp(0, tid2eid.shape[0] - 1)
        ids = tid2eid[rows].long().clamp(0, n_experts - 1)
    else:
        biased = scores + bias.float() if bias is not None else scores
        ids = topk_lowest_id_ties(biased, topk)
    w = scores.gather(1, ids)
    w = w / w.sum(-1, keepdim=True)
    w = w * route_scale
    return w, ids.to(torch.int32)
