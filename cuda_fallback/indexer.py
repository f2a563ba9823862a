"""The ``cuda`` backend of ``indexer_topk``: ``csrc/sm90_indexer_scores.cu`` scores FP4 key rows
(wgmma, sm_90a); the selection is the Triton kernels' (``select_top_k``), unchanged.

It covers the FP4 key rows (``pack_indexer_keys``, 68 bytes a key) with the model's 64
indexer heads, for up to ``MAX_QUERIES`` queries a call (decode, where every query streams
its own request's keys) whose keys give each CTA at least ``MIN_TILES_PER_CTA`` tiles: a
CTA's fixed cost (qi into shared memory, the first loads) is then paid back.  H100, scoring
pass alone: B = 32, 262144 keys 390 against 512 us, 32768 keys 53 against 71; B = 1, 262144
keys 17 against 21; B = 1, 32768 keys (2 tiles a CTA) 6.0 against 4.6, left to Triton.
Prefill (many queries over the same keys) stays on the Triton kernel, whose programs share
each decoded key tile among a block of queries; BF16 keys and other head counts go there
too, and forcing ``cuda`` on them raises ``BackendUnavailableError``.  Only sm_90a runs it
(wgmma does not exist on sm_100).

The scores are the Triton kernel's math (FP4 decoded exactly to BF16, FP32 accumulation,
relu keeping NaN, times w, summed over the heads in a fixed order), summed in another order,
so they agree with it within FP32 rounding and near-ties may select differently.
"""

from __future__ import annotations

import torch
import triton

from dsv4_triton.kernels.indexer import _sm_count, output_and_scores, select_top_k
from dsv4_triton.reference.indexer import FP4_KEY_BYTES
from dsv4_triton.registry import register

from .gemm import rows_aligned
from .loader import extension_at

HEADS = 64
TILE = 64  # keys a tile
CTAS_PER_SM = 2  # the kernel's launch bounds: every CTA of a one-wave grid is resident at once
# About one wave of one-query CTAs on an H100 (264 slots); sizes between this and prefill's
# thousands of queries were not measured.
MAX_QUERIES = 256
MIN_TILES_PER_CTA = 8


def indexer_topk_covers(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor, k: int) -> str:
    """``""`` when the sm_90a scoring kernel handles these ``indexer_topk`` arguments, else why not."""
    if keys.dtype != torch.uint8:
        return "BF16 keys (the kernel reads FP4 key rows)"
    if qi.shape[2] != HEADS:
        return f"{qi.shape[2]} heads (the kernel takes {HEADS})"
    queries = qi.shape[0] * qi.shape[1]
    if queries > MAX_QUERIES:
        return (f"{queries} queries (it takes up to {MAX_QUERIES}: with more, the Triton kernel shares each decoded "
                "key tile among a block of queries)")
    tiles = tiles_per_cta(queries, keys.shape[1], qi.device)
    if tiles < MIN_TILES_PER_CTA:
        return (f"{tiles} key tiles a CTA for {queries} queries of {keys.shape[1]} keys (it takes runs of at least "
                f"{MIN_TILES_PER_CTA}: shorter ones do not pay back a CTA's fixed cost)")
    return ""


def tiles_per_cta(queries: int, n_keys: int, device: torch.device) -> int:
    """64-key tiles a CTA: one wave of ``CTAS_PER_SM`` CTAs an SM shared evenly among the queries
    (a second, partial wave would leave most of the machine idle at its end)."""
    if device.type == "meta":  # shapes only (the benchmarks ask covers on meta tensors): the current GPU
        device = torch.device("cuda")
    ctas_per_query = max(1, CTAS_PER_SM * _sm_count(device) // max(queries, 1))
    return triton.cdiv(triton.cdiv(n_keys, TILE), ctas_per_query)


def indexer_scores(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """The scoring pass alone, the contract of the Triton ``indexer_scores``: FP32 ``[B*S, Nk]``,
    entries at or past each query's ``n_valid`` not written."""
    bsz, seq = qi.shape[:2]
    n_keys = keys.shape[1]
    scores = torch.empty(bsz * seq, n_keys, dtype=torch.float32, device=qi.device)
    if scores.numel() == 0:
        return scores
    if not rows_aligned(qi, 16):
        qi = qi.contiguous()
    if not rows_aligned(keys, 4) or keys.stride(1) != FP4_KEY_BYTES:
        keys = keys.contiguous()  # rows copied as one run of 4-byte words
    extension_at(qi.device.index).indexer_scores_fp4(
        qi, w, keys, n_valid, scores, tiles_per_cta(bsz * seq, n_keys, qi.device),
        torch._C._cuda_getCurrentRawStream(qi.device.index))
    return scores


@register("indexer_topk", "cuda", archs=("sm90a",), covers=indexer_topk_covers)
def indexer_topk(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                 k: int) -> torch.Tensor:
    out, scores = output_and_scores(qi, w, keys, n_valid, k, indexer_scores)
    if scores is not None:
        select_top_k(scores, n_valid, out, qi.shape[1], k)
    return out
