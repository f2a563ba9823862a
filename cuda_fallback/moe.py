"""The ``cuda`` backend of ``moe_experts`` at decode sizes: the two grouped MXFP4 GEMMs of
``csrc/moe_decode.cu`` between the Triton path's align, activation pre-pass and combine.

It covers the batches whose expert blocks have 16 rows (``block_m_for``: on average at most
16 pairs an expert, e.g. up to 1024 tokens x 6 of 384 experts) with weights as
``moe_pack_experts`` lays them out (tiled, contiguous; codes 16-byte and scales 4-byte
aligned, as every allocation of torch's is).  Larger
batches go to the Triton path, whose warp-group MMA tiles win once many rows share each weight
tile; forcing ``cuda`` on them raises ``BackendUnavailableError``.  Same launches as the
Triton path (align 3, pre-pass, w13, w2, combine), same block lists, same act_quant of the
SwiGLU output; the GEMM sums differ from the Triton path's only in FP32 summation order.
"""

from __future__ import annotations

import torch

from dsv4_triton.kernels.gemm import ACT_BLOCK, act_quant_rows
from dsv4_triton.kernels.moe import align, block_m_for, combine
from dsv4_triton.reference.moe import TILE_ROWS
from dsv4_triton.registry import register

from .loader import CUDA_ARCHS, extension_at

DECODE_BLOCK_M = 16


def moe_decode_covers(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, limit, fmt) -> str:
    """``""`` when the decode kernels handle these ``moe_experts`` arguments, else why not."""
    if fmt != "mxfp4":
        return f"fmt {fmt!r} (the kernels read MXFP4 only)"
    pairs, n_experts = topk_ids.numel(), w13.shape[0]
    if pairs == 0:
        return "no tokens"
    if block_m_for(pairs, n_experts) != DECODE_BLOCK_M:
        return f"{pairs} pairs over {n_experts} experts (more than {DECODE_BLOCK_M} an expert on average)"
    if w13.data_ptr() % 16 or w2.data_ptr() % 16:
        return "weights not 16-byte aligned"
    if w13_scale.data_ptr() % 4 or w2_scale.data_ptr() % 4:
        return "scales not 4-byte aligned"
    return ""


@register("moe_experts", "cuda", archs=CUDA_ARCHS, covers=moe_decode_covers)
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, limit: float,
                fmt: str) -> torch.Tensor:
    t, dim = x.shape
    n_experts, inter = w13.shape[0], w13.shape[1] * TILE_ROWS // 2
    ids = topk_ids.contiguous()
    sorted_pair, block_expert = align(ids, n_experts, DECODE_BLOCK_M)
    rows = sorted_pair.shape[0]
    codes, scales = act_quant_rows(x if x.stride(-1) == 1 else x.contiguous(), fp16_pairs=True)
    hq = torch.empty((rows, inter), dtype=torch.float16, device=x.device)  # FP8 codes' values (exact)
    hs = torch.empty((rows, inter // ACT_BLOCK), dtype=torch.float32, device=x.device)
    part = torch.empty((ids.numel(), dim), dtype=torch.float32, device=x.device)
    module = extension_at(x.device.index)
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)
    module.moe_decode_w13(codes, scales, w13, w13_scale.view(torch.uint8), sorted_pair, block_expert,
                          topk_weights.contiguous().view(-1), hq, hs, ids.shape[1], float(limit), stream)
    module.moe_decode_w2(hq, hs, w2, w2_scale.view(torch.uint8), sorted_pair, block_expert, part, stream)
    y = torch.empty((t, dim), dtype=torch.bfloat16, device=x.device)
    combine(part, ids, n_experts, y)
    return y
