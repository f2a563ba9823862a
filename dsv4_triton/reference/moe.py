"""FP32 oracle: the routed experts of an MoE layer (SPEC section 8), and the packed
expert-weight layout that every backend of ``moe_experts`` reads.

Packed layout (made once at load by ``pack_experts``):

* ``w13`` ``[E, 2 * inter, dim / 2]`` FP4 bytes: w1 and w3 interleaved in blocks of
  ``PACK_ROWS`` rows, ``[w1[0:128], w3[0:128], w1[128:256], w3[128:256], ...]``, so one
  256-row tile of ``w13`` holds the gate and the up projection of the same 128 outputs
  of the SwiGLU (its epilogue then sees both, and the 128 outputs are exactly one
  activation-quantisation block of the w2 input).  ``w13_scale`` ``[E, 2 * inter, dim / 32]``
  follows the same row order.
* ``w2`` ``[E, dim, inter / 2]``, ``w2_scale`` ``[E, dim, inter / 32]``: stacked as stored.

Oracle: for each expert, the tokens routed to it (in either slot) go through
``y_e = w2 act_quant(w_e * swiglu(w1 act_quant(x), w3 act_quant(x)))``, every linear as in
``reference/gemm.py`` (FP32 matmul of exactly dequantised operands); the outputs are
summed per token in FP32, in expert order, and rounded to bf16 once.  Ids outside
``[0, E)`` contribute nothing; an expert listed twice in a row contributes twice.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ..registry import register
from .activation import swiglu
from .gemm import dequant_activation, dequant_fp4_weight

PACK_ROWS = 128


def pack_experts(w1: List[torch.Tensor], w1_scale: List[torch.Tensor], w3: List[torch.Tensor],
                 w3_scale: List[torch.Tensor], w2: List[torch.Tensor], w2_scale: List[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert checkpoint tensors -> (w13, w13_scale, w2, w2_scale) in the packed layout."""
    def interleave(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
        a, b = torch.stack(a), torch.stack(b)  # [E, inter, c]
        e, inter, c = a.shape
        blocks = torch.stack((a.view(e, inter // PACK_ROWS, PACK_ROWS, c),
                              b.view(e, inter // PACK_ROWS, PACK_ROWS, c)), dim=2)
        return blocks.reshape(e, 2 * inter, c)

    as_bytes = [t.view(torch.uint8) for t in w1], [t.view(torch.uint8) for t in w3]
    w13 = interleave(*as_bytes)
    w13_scale = interleave(w1_scale, w3_scale)
    return w13, w13_scale, torch.stack([t.view(torch.uint8) for t in w2]), torch.stack(w2_scale)


def unpack_w13(w13: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed ``[..., 2 * inter, c]`` -> (w1 ``[..., inter, c]``, w3 ``[..., inter, c]``)."""
    *lead, rows, c = w13.shape
    blocks = w13.reshape(*lead, rows // (2 * PACK_ROWS), 2, PACK_ROWS, c)
    inter = rows // 2
    return blocks.select(-3, 0).reshape(*lead, inter, c), blocks.select(-3, 1).reshape(*lead, inter, c)


@register("moe_experts", "reference")
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, limit: float,
                fmt: str) -> torch.Tensor:
    n_experts = w13.shape[0]
    xd = dequant_activation(x)  # the same act_quant(x) feeds every expert of a token
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(n_experts):
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        (w1, w3), (s1, s3) = unpack_w13(w13[e]), unpack_w13(w13_scale[e])
        gate = xd[tok] @ dequant_fp4_weight(w1, s1, fmt, None).t()
        up = xd[tok] @ dequant_fp4_weight(w3, s3, fmt, None).t()
        h = swiglu(gate, up, limit, topk_weights[tok, slot].float())
        y.index_add_(0, tok, dequant_activation(h) @ dequant_fp4_weight(w2[e], w2_scale[e], fmt, None).t())
    return y.to(torch.bfloat16)
