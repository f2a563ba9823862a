"""FP32 oracle: the routed experts of an MoE layer (SPEC section 8), and the packed
expert-weight layout that every backend of ``moe_experts`` reads.

Packed layout (made once at load by ``pack_experts``):

* w1 and w3 interleaved in blocks of ``PACK_ROWS`` rows, ``[w1[0:128], w3[0:128],
  w1[128:256], w3[128:256], ...]`` (``2 * inter`` rows of ``w13``), so one 256-row tile of
  ``w13`` holds the gate and the up projection of the same 128 outputs of the SwiGLU (its
  epilogue then sees both, and the 128 outputs are exactly one activation-quantisation
  block of the w2 input).  ``w2``: ``dim`` rows, as stored.
* Every expert matrix (rows ``R``, ``K`` in the GEMM's reduction) is then stored in tiles of
  ``TILE_ROWS`` rows by one 128-wide K block: codes ``[E, R/16, K/128, 16, 64]`` (the tile's
  16 rows of 64 bytes, 1 KB), E8M0 scales ``[E, R/16, K/128, 16, 4]``.  A GEMM streams each
  16-row tile as one contiguous run; read from row-major rows, the same bytes come as 64-byte
  pieces of 16 rows a row apart, which the H100's HBM delivered at 2.0 TB/s instead of 3.2
  (a load-only kernel with the decode GEMM's access pattern; see benchmarks/NOTES.md).
  ``row_major`` turns a tiled tensor back into ``[E, R, K/2]`` / ``[E, R, K/32]``.

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
TILE_ROWS = 16
TILE_K = 128
CODE_BYTES = TILE_K // 2  # a row's FP4 codes of one K block
SCALE_BYTES = TILE_K // 32  # and its E8M0 scales


def packed_shapes(n_experts: int, rows: int, k: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Shapes of the packed codes and scales of ``n_experts`` matrices ``[rows, K]``."""
    tiles = (n_experts, rows // TILE_ROWS, k // TILE_K, TILE_ROWS)
    return (*tiles, CODE_BYTES), (*tiles, SCALE_BYTES)


def tiled(w: torch.Tensor, per_block: int) -> torch.Tensor:
    """Row-major ``[E, R, C]`` with ``per_block`` bytes a row per 128-wide K block (codes:
    ``CODE_BYTES``, scales: ``SCALE_BYTES``) -> the tiled layout ``[E, R/16, K/128, 16,
    per_block]``, contiguous."""
    e, rows, c = w.shape
    return w.reshape(e, rows // TILE_ROWS, TILE_ROWS, c // per_block, per_block).transpose(2, 3).contiguous()


def row_major(w: torch.Tensor) -> torch.Tensor:
    """The tiled layout ``[E, R/16, K/128, 16, b]`` -> row-major ``[E, R, (K/128) * b]``."""
    e, tiles, blocks, rows, per_block = w.shape
    return w.transpose(2, 3).reshape(e, tiles * rows, blocks * per_block)


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
    w2_codes = torch.stack([t.view(torch.uint8) for t in w2])
    return (tiled(w13, CODE_BYTES), tiled(w13_scale, SCALE_BYTES), tiled(w2_codes, CODE_BYTES),
            tiled(torch.stack(w2_scale), SCALE_BYTES))


def unpack_w13(w13: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-major ``[..., 2 * inter, c]`` (``row_major`` of the packed ``w13``) -> (w1
    ``[..., inter, c]``, w3 ``[..., inter, c]``)."""
    *lead, rows, c = w13.shape
    blocks = w13.reshape(*lead, rows // (2 * PACK_ROWS), 2, PACK_ROWS, c)
    inter = rows // 2
    return blocks.select(-3, 0).reshape(*lead, inter, c), blocks.select(-3, 1).reshape(*lead, inter, c)


@register("moe_experts", "reference")
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, limit: float,
                fmt: str) -> torch.Tensor:
    w13, w13_scale, w2, w2_scale = (row_major(t) for t in (w13, w13_scale, w2, w2_scale))
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
