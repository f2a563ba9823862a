"""The ``cuda`` backend of ``indexer_topk`` at decode sizes: the CUDA kernels where they beat
Triton, the Triton launches for the rest of the op.

* Scoring: ``csrc/sm90_indexer_scores.cu`` (wgmma, sm_90a) for FP4 key rows
  (``pack_indexer_keys``, 68 bytes a key) with the model's 64 indexer heads, when each CTA
  gets at least ``MIN_TILES_PER_CTA`` key tiles (its fixed cost, qi into shared memory and
  the first loads, is then paid back).  H100, scoring pass alone: B = 32, 262144 keys 354
  against 508 us, 32768 keys 50 against 70; B = 1, 262144 keys 15.6 against 19; B = 1, 32768
  keys (1-2 tiles a CTA) 5.5 against 4.1, left to Triton, as are BF16 keys and other head counts.
* Selection: ``csrc/row_topk.cu``, one launch with a CTA cluster a row (or one CTA a row for
  many rows of up to ``ONE_CTA_ROW_KEYS``, ``select_rows``), for rows of up to
  ``MAX_ROW_KEYS`` keys.  H100, selection alone against the Triton selection
  (``select_top_k``): B = 32, 262144 keys 53 against 233 us, 32768 keys 23 against 33; B = 1,
  262144 keys 15.2 against 16.9, 32768 keys 8.4 against 14.4; 128 rows of 4096 keys 8.5
  against 27.7, of 32768 keys 22.7 against 135.

Both need at most ``MAX_QUERIES`` queries a call (decode, where every query streams its own
request's keys).  Prefill (many queries over the same keys) stays on Triton, whose scoring
programs share each decoded key tile among a block of queries; arguments that neither kernel
takes go to Triton too, and forcing ``cuda`` on them raises ``BackendUnavailableError``.

The CUDA scores are the Triton kernel's math (FP4 decoded exactly to BF16, FP32 accumulation,
relu keeping NaN, times w, summed over the heads in a fixed order), summed in another order,
so they agree with it within FP32 rounding and near-ties may select differently.  The CUDA
selection is exact: the same indices as the Triton selection and the oracle on the same scores.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import triton

from dsv4_triton.kernels.device import sm_count
from dsv4_triton.kernels.indexer import output_and_scores, select_top_k
from dsv4_triton.kernels.indexer import indexer_scores as triton_indexer_scores
from dsv4_triton.reference.indexer import FP4_KEY_BYTES
from dsv4_triton.registry import register

from .layout import rows_aligned
from .loader import extension_at

HEADS = 64
TILE = 64  # keys a tile
CTAS_PER_SM = 3  # the kernel's launch bounds: every CTA of a one-wave grid is resident at once
# At most one wave of one-query CTAs on an H100 (396 slots); sizes between this and prefill's
# thousands of queries were not measured.
MAX_QUERIES = 256
# Shorter runs go to Triton.  H100, scoring pass alone, CUDA / Triton us by tiles a CTA: 3
# (B = 1, 65536 keys) 7.7 / 6.7, (B = 4, 16384) 8.2 / 6.4; 4 (B = 1, 98304) 8.8 / 8.6; 6
# (B = 1, 131072) 10.5 / 10.7, (B = 8, 16384) 11.1 / 10.1, (B = 16, 8192) 11.2 / 11.2; 7
# (B = 1, 163840) 11.6 / 14.0 (benchmarks/NOTES.md, "indexer, twenty-ninth round").
MIN_TILES_PER_CTA = 7
MAX_ROW_KEYS = 8 * 1024 * 32  # row_topk.cu: a cluster of 8 CTAs (16 take twice as many), 1024 threads, 32 keys each
ONE_CTA_ROW_KEYS = 1024 * 32  # the same kernel with one CTA a row
# One CTA a row (no cluster exchange, each CTA counting its whole row) for at least
# ONE_CTA_MIN_ROWS rows, or ONE_CTA_FEW_ROWS rows of at most ONE_CTA_FEW_ROW_KEYS: H100,
# selection alone, k = 1024, one CTA / a cluster of 8 a row: 32 rows of 4096 keys 8.4 / 15.7 us,
# of 32768 22.7 / 21.9, 256 rows of 16384 27.3 / 107.2, 16 rows of 4096 8.5 / 10.6, of 16384
# 14.9 / 12.2, one row of 32768 20.6 / 8.3 (benchmarks/NOTES.md, "indexer, twenty-fourth round").
ONE_CTA_MIN_ROWS, ONE_CTA_FEW_ROWS, ONE_CTA_FEW_ROW_KEYS = 32, 16, 4096
# 16 CTAs a row for up to MAX_WIDE_ROWS rows longer than WIDE_ROW_KEYS (H100, one row of
# 262144 keys: 15.2 against 20.3 us with 8), else 8 (more clusters at once; 8 rows of 32768
# keys: 8.5 against 14.2 us).
MAX_WIDE_ROWS, WIDE_ROW_KEYS = 4, 65536


def indexer_topk_covers(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor, k: int) -> str:
    """``""`` when the CUDA scoring or selection kernel handles these ``indexer_topk``
    arguments, else why neither does."""
    queries = qi.shape[0] * qi.shape[1]
    if queries > MAX_QUERIES:
        return (f"{queries} queries (the kernels take up to {MAX_QUERIES}: with more, the Triton scoring shares each "
                "decoded key tile among a block of queries)")
    scoring, selection = scoring_covers(qi, keys), selection_covers(keys.shape[1])
    return f"{scoring}; {selection}" if scoring and selection else ""


def scoring_covers(qi: torch.Tensor, keys: torch.Tensor) -> str:
    """``""`` when the sm_90a scoring kernel scores these keys (at most ``MAX_QUERIES`` queries), else why not."""
    if keys.dtype != torch.uint8:
        return "scoring: BF16 keys (the kernel reads FP4 key rows)"
    if qi.shape[2] != HEADS:
        return f"scoring: {qi.shape[2]} heads (the kernel takes {HEADS})"
    queries = qi.shape[0] * qi.shape[1]
    tiles = tiles_per_cta(queries, keys.shape[1], qi.device)
    if tiles < MIN_TILES_PER_CTA:
        return (f"scoring: {tiles} key tiles a CTA for {queries} queries of {keys.shape[1]} keys (the kernel takes "
                f"runs of at least {MIN_TILES_PER_CTA}: shorter ones do not pay back a CTA's fixed cost)")
    return ""


def selection_covers(n_keys: int) -> str:
    """``""`` when the selection kernel takes rows of ``n_keys`` scores, else why not."""
    if n_keys > MAX_ROW_KEYS:
        return f"selection: rows of {n_keys} keys (the kernel holds up to {MAX_ROW_KEYS} in a cluster's registers)"
    return ""


def tiles_per_cta(queries: int, n_keys: int, device: torch.device) -> int:
    """64-key tiles a CTA: one wave of ``CTAS_PER_SM`` CTAs an SM shared evenly among the queries
    (a second, partial wave would leave most of the machine idle at its end)."""
    if device.type == "meta":  # shapes only (the benchmarks ask covers on meta tensors): the current GPU
        device = torch.device("cuda")
    ctas_per_query = max(1, CTAS_PER_SM * sm_count(device) // max(queries, 1))
    return triton.cdiv(triton.cdiv(n_keys, TILE), ctas_per_query)


def select_rows(scores: torch.Tensor, n_valid: torch.Tensor, out: torch.Tensor, k: int,
                cluster: Optional[int] = None) -> None:
    """The top-k of every FP32 score row ``[B*S, Nk]`` (Nk at most ``MAX_ROW_KEYS``) below its
    query's ``n_valid`` into ``out`` (``[B, S, k]`` int32), by ``row_topk.cu``: one launch of
    ``cluster`` CTAs a row (1, 8 or 16; default: 16 for at most ``MAX_WIDE_ROWS`` rows longer
    than ``WIDE_ROW_KEYS`` where the GPU places clusters of 16; 1 for many rows of up to
    ``ONE_CTA_ROW_KEYS``; else 8)."""
    rows, n_keys = scores.shape
    if n_keys > MAX_ROW_KEYS:
        raise ValueError(f"scores: expected rows of at most {MAX_ROW_KEYS} keys, got {n_keys}")
    if cluster is None:
        cluster = default_cluster(rows, n_keys, lambda: _runs_clusters_of_16(scores.device.index))
    if cluster not in (1, 8, 16):
        raise ValueError(f"cluster: expected 1, 8 or 16 CTAs a row, got {cluster}")
    if cluster == 1 and n_keys > ONE_CTA_ROW_KEYS:
        raise ValueError(f"scores: expected rows of at most {ONE_CTA_ROW_KEYS} keys for one CTA a row, got {n_keys}")
    extension_at(scores.device.index).row_topk(scores, n_valid, out, k, cluster,
                                               torch._C._cuda_getCurrentRawStream(scores.device.index))


def default_cluster(rows: int, n_keys: int, places_16: Callable[[], bool]) -> int:
    """CTAs a row for ``rows`` rows of ``n_keys`` scores (the measured rule above);
    ``places_16()`` says whether the GPU places clusters of 16, asked only where they would be
    chosen."""
    if n_keys <= ONE_CTA_ROW_KEYS and (
            rows >= ONE_CTA_MIN_ROWS or (rows >= ONE_CTA_FEW_ROWS and n_keys <= ONE_CTA_FEW_ROW_KEYS)):
        return 1
    if rows <= MAX_WIDE_ROWS and n_keys > WIDE_ROW_KEYS and places_16():
        return 16
    return 8


@functools.lru_cache(maxsize=None)
def _runs_clusters_of_16(device_index: int) -> bool:
    """Whether this GPU places clusters of 16 CTAs (non-portable: an sm_90 part needs a GPC
    with 16 free SMs; 8, the portable size, runs everywhere)."""
    return extension_at(device_index).row_topk_max_clusters(16, device_index) > 0


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
    scorer = triton_indexer_scores if scoring_covers(qi, keys) else indexer_scores
    out, scores = output_and_scores(qi, w, keys, n_valid, k, scorer)
    if scores is None:
        return out
    if selection_covers(scores.shape[1]):
        select_top_k(scores, n_valid, out, qi.shape[1], k)
    else:
        select_rows(scores, n_valid, out, k)
    return out
