"""The ``cuda`` backend of ``moe_experts``: the Triton path's align and combine around two
grouped MXFP4 GEMMs written in CUDA, one pair for decode sizes and one for prefill sizes.

Decode (``csrc/moe_decode.cu``, sm90a and sm100a): the batches whose expert blocks have 16 rows
(``block_m_for``: on average at most 16 pairs an expert, e.g. up to 1024 tokens x 6 of 384
experts).  Same launches as the Triton path (align 3, pre-pass, w13, w2, combine), same block
lists, same act_quant of the SwiGLU output; the GEMM sums differ from the Triton path's only
in FP32 summation order.

Prefill (``csrc/sm90_moe_prefill.cu``, sm90a): the batches of more than 24 pairs an expert on
average (e.g. from about 1600 tokens x 6 of 384 experts), in 128-row expert blocks
(``cuda_block_m``), even where most of a block is empty (the Triton path's own rule gives it 32-
or 64-row blocks up to 64 pairs an expert).
The weight is the warp-group MMA's A operand, expanded from FP4 in registers, the sorted
activation rows its B operand (``sorted_act_quant``: act_quant of each sorted row, in the
MMA's k-slot order); w13 writes the routed SwiGLU in FP32 and ``sorted_act_quant`` quantises
it for w2 as the Triton w13 epilogue does, then w2 and the same combine.  The FP8 operands
are the Triton path's, so again only the FP32 summation order differs.

Both take weights as ``moe_pack_experts`` lays them out (tiled, contiguous; codes 16-byte
and scales 4-byte aligned, as every allocation of torch's is).  Batches of 17-24 pairs an
expert, and on other GPUs than sm90a every batch past decode sizes, go to the Triton path;
forcing ``cuda`` on them raises ``BackendUnavailableError``.
"""

from __future__ import annotations

from typing import Optional

import torch

from dsv4_triton.kernels.gemm import ACT_BLOCK, act_quant_rows
from dsv4_triton.kernels.moe import align, combine, sorted_act_quant
from dsv4_triton.reference.moe import TILE_ROWS
from dsv4_triton.registry import register

from .loader import CUDA_ARCHS, arch_of, extension_at

DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 128


# Above this many pairs an expert on average the prefill kernel runs (at or below it, down to
# decode sizes, the Triton path's 32-row blocks: a tie measured at 24, see cuda_block_m).
PREFILL_MIN_MEAN = 24


def cuda_block_m(pairs: int, n_experts: int) -> Optional[int]:
    """Rows an expert block of this backend: the decode kernels' 16 up to 16 pairs an expert on
    average, the prefill kernel's 128 above ``PREFILL_MIN_MEAN``; None in between (the Triton
    path).  Past decode sizes the time goes into expanding each block's FP4 weight, whatever
    the rows in it, so fewer blocks pay even when mostly empty: measured on the H100 against
    the Triton path's 32- and 64-row blocks, Pro (384 experts) at 2048 / 3072 / 4096 tokens
    (32 / 48 / 64 an expert) 10.9 / 11.2 / 11.5 ms against 12.9 / 11.5 / 16.6, Flash (256) at
    2048 tokens (48) 3.43 against 3.59 and at 1024 (24) 3.38 against 3.30, a tie, so the
    Triton path keeps 24 and fewer (benchmarks/NOTES.md)."""
    mean = pairs / n_experts
    if mean <= DECODE_BLOCK_M:
        return DECODE_BLOCK_M
    return PREFILL_BLOCK_M if mean > PREFILL_MIN_MEAN else None


def moe_covers(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, limit, fmt) -> str:
    """``""`` when the decode or prefill kernels handle these ``moe_experts`` arguments, else why not."""
    if fmt != "mxfp4":
        return f"fmt {fmt!r} (the kernels read MXFP4 only)"
    pairs, n_experts = topk_ids.numel(), w13.shape[0]
    if pairs == 0:
        return "no tokens"
    block_m = cuda_block_m(pairs, n_experts)
    if block_m is None:
        return (f"{pairs} pairs over {n_experts} experts ({pairs / n_experts:.1f} an expert: from {DECODE_BLOCK_M} "
                f"to {PREFILL_MIN_MEAN} the Triton path's 32-row blocks are as fast)")
    if block_m == PREFILL_BLOCK_M:
        device = x.device if x.device.type == "cuda" else torch.device("cuda")
        arch = arch_of(device)
        if arch != "sm90a":
            return f"{pairs} pairs over {n_experts} experts: the prefill kernels target sm90a, this GPU is {arch}"
    if w13.data_ptr() % 16 or w2.data_ptr() % 16:
        return "weights not 16-byte aligned"
    if w13_scale.data_ptr() % 4 or w2_scale.data_ptr() % 4:
        return "scales not 4-byte aligned"
    return ""


@register("moe_experts", "cuda", archs=CUDA_ARCHS, covers=moe_covers)
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, limit: float,
                fmt: str) -> torch.Tensor:
    t, dim = x.shape
    n_experts, inter = w13.shape[0], w13.shape[1] * TILE_ROWS // 2
    ids = topk_ids.contiguous()
    block_m = cuda_block_m(ids.numel(), n_experts)
    sorted_pair, block_expert = align(ids, n_experts, block_m)
    rows = sorted_pair.shape[0]
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    route_w = topk_weights.contiguous().view(-1)
    part = torch.empty((ids.numel(), dim), dtype=torch.float32, device=x.device)
    module = extension_at(x.device.index)
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)
    w13s, w2s = w13_scale.view(torch.uint8), w2_scale.view(torch.uint8)
    if block_m == PREFILL_BLOCK_M:
        a, a_scale = sorted_act_quant(x2, sorted_pair, block_expert, n_experts, ids.shape[1], gather=True)
        h = torch.empty((rows, inter), dtype=torch.float32, device=x.device)
        module.moe_prefill_gemm(a, a_scale, w13, w13s, sorted_pair, block_expert, route_w, h, float(limit), stream)
        hq, hs = sorted_act_quant(h, sorted_pair, block_expert, n_experts, 1, gather=False)
        module.moe_prefill_gemm(hq, hs, w2, w2s, sorted_pair, block_expert, None, part, float(limit), stream)
    else:
        codes, scales = act_quant_rows(x2, fp16_pairs=True)
        hq = torch.empty((rows, inter), dtype=torch.float16, device=x.device)  # FP8 codes' values (exact)
        hs = torch.empty((rows, inter // ACT_BLOCK), dtype=torch.float32, device=x.device)
        module.moe_decode_w13(codes, scales, w13, w13s, sorted_pair, block_expert, route_w, hq, hs, ids.shape[1],
                              float(limit), stream)
        module.moe_decode_w2(hq, hs, w2, w2s, sorted_pair, block_expert, part, stream)
    y = torch.empty((t, dim), dtype=torch.bfloat16, device=x.device)
    combine(part, ids, n_experts, y)
    return y
