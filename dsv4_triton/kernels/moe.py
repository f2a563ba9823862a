"""Triton routed experts: sort by expert, two grouped MXFP4 GEMMs, deterministic combine.

1. Align (three launches of many programs, no host sync, see ``align``): the ``T * k``
   (token, slot) pairs are sorted by expert, in pair order within an expert, and each
   expert's run is padded to a multiple of ``BLOCK_M``; ``sorted_pair[r]`` is the pair at
   padded row r (-1 for padding) and ``block_expert[b]`` the expert of row block b (``E``
   past the end).  Per 128-pair chunk an expert histogram; per expert the counts of the
   earlier chunks (a scan over chunks); then each chunk's pairs are scattered to their rows
   while other programs write the block experts and padding rows.  The number of blocks is
   never read on the host: the GEMM grids are sized for the worst case,
   ``ceil(T*k / BLOCK_M) + min(E, T*k)`` blocks, and programs past the end exit at once.
2. w13 GEMM: program (block, j) multiplies the block's token rows by the expert's gate and
   up rows ``128j .. 128j+127`` (one 256-row tile of the packed ``w13``, read in the packed
   layout's 16-row x 128-K tiles: ``reference/moe.py``), then in the
   epilogue applies the clamped SwiGLU and the pair's routing weight and quantises the
   128 outputs per row (exactly one ``act_quant`` block of the w2 input) to FP8 + scale.
3. w2 GEMM: the same block structure over ``dim``; each row's FP32 result goes to its
   own (token, slot) row of an FP32 buffer.
4. Combine: each token sums its k rows in slot order in FP32 and rounds to bf16 once.
   No atomics anywhere, so the result is deterministic, and it does not depend on how
   the pairs were ordered within an expert (each GEMM row is computed independently).

A pair whose id is outside ``[0, E)`` is placed in no row and is skipped by the combine:
it contributes nothing, and nothing is read out of bounds.

The activation of w13 is ``act_quant(x)``: quantised once per token by the pre-pass of
``kernels/gemm.py`` (one more launch), and read as FP8 codes and scales; for 16-row blocks
(decode) a config may instead quantise the block's BF16 rows in every K step (the tuner
keeps the faster; the codes and scales are the same either way).  Blocks of fewer than 64
rows run both GEMMs transposed (``scaled_dot_t``: the expanded weight tile is the A side of
an FP8 warp-group MMA, the block's rows its N side), and their configs may also take w13's
gate and up rows as one 256-row operand (``JOINT_TILE``) or two K blocks per loop step
(``TWO_BLOCKS``, both GEMMs): every form multiplies and promotes the same values in the
same K order, so the tuner's choice never changes a bit of the result.
SwiGLU uses the GPU's fast ``exp`` (about 2 ulp) and a correctly rounded division; the
tests bound the effect on the FP8 codes of the w2 input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..reference.moe import PACK_ROWS, TILE_ROWS
from ..registry import register
from .formats import clamp_nan
from .gemm import (ACT_BLOCK, FUSED_QUANT_MAX_ROWS, W_MXFP4, activation_operand, as_fp8_operand, fp4_fp8_table,
                   load_act_block, load_act_scales, load_fp8_codes, load_weight_block, mxfp4_scale_words,
                   quantise_act_tile, scaled_dot, scaled_dot_t)
from .rope import cast_rne


def block_m_for(pairs: int, n_experts: int) -> int:
    """Rows per expert block: about the mean number of rows an expert gets."""
    mean = pairs / n_experts
    for bm in (16, 32, 64):
        if mean <= bm:
            return bm
    return 128


# Pairs per program of the align's count and scatter launches (the scatter ranks a chunk's pairs
# by a CHUNK x CHUNK comparison), experts per program of its scan launch, row blocks per
# program of its block pass, experts per step of the scatter's expert-start sums.
ALIGN_CHUNK = 128
ALIGN_SCAN_EXPERTS = 16
ALIGN_SCAN_CHUNKS = 256
ALIGN_BLOCKS = 16
ALIGN_EXPERT_TILE = 32


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, n_pairs, n_experts, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Program c: the expert histogram of pairs ``c * CHUNK ..`` -> ``counts[c, :]``.  Ids outside
    [0, E) go to bucket E (E_PAD > E), which is never placed."""
    c = tl.program_id(0)
    p = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + p, mask=p < n_pairs, other=n_experts)
    e = tl.where((e >= 0) & (e < n_experts), e, n_experts)
    tl.store(counts_ptr + c.to(tl.int64) * E_PAD + tl.arange(0, E_PAD), tl.histogram(e, E_PAD))


@triton.jit
def _align_scan_kernel(counts_ptr, totals_ptr, n_chunks, n_experts, E_PAD: tl.constexpr,
                       EXPERTS: tl.constexpr, CHUNKS: tl.constexpr):
    """Program g, experts ``g * EXPERTS ..``: ``counts[c, e]`` becomes the number of the
    expert's pairs in chunks before c (in place), ``totals[e]`` its number of pairs."""
    ex = tl.program_id(0) * EXPERTS + tl.arange(0, EXPERTS)
    ex_ok = ex < n_experts
    before = tl.zeros((EXPERTS,), dtype=tl.int32)
    for c0 in range(0, n_chunks, CHUNKS):
        c = c0 + tl.arange(0, CHUNKS)
        at = counts_ptr + c.to(tl.int64)[:, None] * E_PAD + ex[None, :]
        ok = (c < n_chunks)[:, None] & ex_ok[None, :]
        n = tl.load(at, mask=ok, other=0)
        tl.store(at, tl.cumsum(n, axis=0) - n + before[None, :], mask=ok)
        before += tl.sum(n, axis=0)
    tl.store(totals_ptr + ex, before, mask=ex_ok)


@triton.jit
def _align_scatter_kernel(ids_ptr, chunk_base_ptr, totals_ptr, sorted_pair_ptr, block_expert_ptr, n_pairs,
                          n_chunks, n_experts, max_blocks, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
                          CHUNK: tl.constexpr, BLOCKS: tl.constexpr, TILE: tl.constexpr):
    """Program i places the pairs of chunk i (if any) and fills row blocks ``i * BLOCKS ..``
    (if any): their experts and their padding rows.  Expert e's rows start after the padded
    rows of the experts below it; a pair's row is that start, plus the expert's pairs in
    earlier chunks, plus the earlier pairs of its own chunk: each expert's rows keep pair
    (token) order, whatever the scheduling.  Every row is written by exactly one program."""
    pid = tl.program_id(0)
    if pid < n_chunks:
        lane = tl.arange(0, CHUNK)
        p = pid * CHUNK + lane
        e = tl.load(ids_ptr + p, mask=p < n_pairs, other=-1)
        placed = (e >= 0) & (e < n_experts)
        e = tl.where(placed, e, 0)
        start = tl.zeros((CHUNK,), dtype=tl.int32)
        for t in tl.static_range(E_PAD // TILE):
            ex = t * TILE + tl.arange(0, TILE)
            padded = (tl.load(totals_ptr + ex, mask=ex < n_experts, other=0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
            start += tl.sum(tl.where(ex[None, :] < e[:, None], padded[None, :], 0), axis=1)
        earlier = lane[None, :] < lane[:, None]
        rank = tl.sum(((e[None, :] == e[:, None]) & placed[None, :] & earlier).to(tl.int32), axis=1)
        base = tl.load(chunk_base_ptr + pid.to(tl.int64) * E_PAD + e, mask=placed, other=0)
        tl.store(sorted_pair_ptr + start + base + rank, p, mask=placed)
    if pid * BLOCKS < max_blocks:
        # Block b belongs to the expert whose padded range holds row b * BLOCK_M, its number is
        # that of the experts ending at or before it (empty ones included); E past the last one.
        b = pid * BLOCKS + tl.arange(0, BLOCKS)
        first = b * BLOCK_M
        ex = tl.arange(0, E_PAD)
        real = ex < n_experts
        count = tl.load(totals_ptr + ex, mask=real, other=0)
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        end = tl.cumsum(padded, 0)
        begin = end - padded
        ends_before = (end[None, :] <= first[:, None]) & real[None, :]
        holds = (begin[None, :] <= first[:, None]) & (first[:, None] < end[None, :])
        tl.store(block_expert_ptr + b, tl.sum(ends_before.to(tl.int32), axis=1), mask=b < max_blocks)
        own_begin = tl.sum(tl.where(holds, begin[None, :], 0), axis=1)
        own_count = tl.sum(tl.where(holds, count[None, :], 0), axis=1)  # 0 past the last expert
        r = first[:, None] + tl.arange(0, BLOCK_M)[None, :]
        padding = (r - own_begin[:, None] >= own_count[:, None]) & (b < max_blocks)[:, None]
        tl.store(sorted_pair_ptr + r, tl.full(r.shape, -1, tl.int32), mask=padding)


def align(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """(sorted_pair int32 ``[max_blocks * block_m]``, block_expert int32 ``[max_blocks]``),
    three launches (count, scan, scatter), no host sync.

    ``sorted_pair[r]`` is the pair id ``t * k + slot`` at padded row r, -1 for a padding
    row; within an expert the pairs are in pair order (token order).  ``block_expert[b]`` is
    the expert of row block b, ``E`` past the last used block.  ``max_blocks`` is the worst
    case ``ceil(T*k / block_m) + min(E, T*k)``, known on the host.  Pairs whose id is outside
    ``[0, E)`` are not placed (they contribute nothing).  Duplicate ids in a row are two
    pairs like any other (``ops.moe_experts`` rejects them in checked mode).  The counts are
    integers and every output element is written by one program, so the result is the same
    on every run.
    """
    pairs = topk_ids.numel()
    max_blocks = triton.cdiv(pairs, block_m) + min(n_experts, pairs)
    max_rows = max_blocks * block_m
    e_pad = max(triton.next_power_of_2(n_experts + 1), ALIGN_EXPERT_TILE)
    n_chunks = triton.cdiv(pairs, ALIGN_CHUNK)
    # One allocation: the two outputs and the workspace (per-chunk counts, then bases; totals).
    buf = torch.empty(max_rows + max_blocks + (n_chunks + 1) * e_pad, dtype=torch.int32, device=topk_ids.device)
    sorted_pair, block_expert = buf[:max_rows], buf[max_rows:max_rows + max_blocks]
    chunk_base = buf[max_rows + max_blocks:max_rows + max_blocks + n_chunks * e_pad]
    totals = buf[max_rows + max_blocks + n_chunks * e_pad:]
    ids = topk_ids.contiguous()
    _align_count_kernel[(n_chunks,)](ids, chunk_base, pairs, n_experts, E_PAD=e_pad, CHUNK=ALIGN_CHUNK,
                                     num_warps=4)
    _align_scan_kernel[(triton.cdiv(n_experts, ALIGN_SCAN_EXPERTS),)](
        chunk_base, totals, n_chunks, n_experts, E_PAD=e_pad, EXPERTS=ALIGN_SCAN_EXPERTS, CHUNKS=ALIGN_SCAN_CHUNKS,
        num_warps=4)
    _align_scatter_kernel[(max(n_chunks, triton.cdiv(max_blocks, ALIGN_BLOCKS)),)](
        ids, chunk_base, totals, sorted_pair, block_expert, pairs, n_chunks, n_experts, max_blocks, BLOCK_M=block_m,
        E_PAD=e_pad, CHUNK=ALIGN_CHUNK, BLOCKS=ALIGN_BLOCKS, TILE=ALIGN_EXPERT_TILE, num_warps=8)
    return sorted_pair, block_expert


# Each with the MXFP4 table rows computed (first: the interpreter's config) and gathered (see
# load_weight_block in kernels/gemm.py): the same values, so the tuner keeps the faster.
_MOE_CONFIGS = [triton.Config({"COMPUTED_TABLE": computed}, num_warps=w, num_stages=s)
                for computed in (True, False) for w, s in ((4, 3), (4, 4), (8, 3), (8, 4), (4, 5))]
# w13 reads the activation's FP8 codes and scales from the pre-pass (first: valid for every
# block size), or, for blocks of up to FUSED_QUANT_MAX_ROWS rows, quantises the BF16 rows in
# each K step itself (every one of the 24 N programs of a block redoes it): the same codes
# and scales, so the same results, and the tuner keeps the faster.
_W13_CONFIGS = [triton.Config(dict(c.kwargs, FUSED_QUANT=fused, JOINT_TILE=False, TWO_BLOCKS=False),
                               num_warps=c.num_warps, num_stages=c.num_stages)
                for fused in (False, True) for c in _MOE_CONFIGS]
# Under 64 rows, the gate and up rows of a program (256 consecutive rows of the packed w13) may
# also be one 256-row operand: one expansion, one chain of MMAs and one wait per K step in place
# of two (the up tile's MMAs issued before the gate's result is waited for), the same MMA
# instructions per row in the same K order, so the same sums.  8 warps only (4 warps need 255
# registers and spill), capped at 128 registers so that two programs share an SM (sm_90,
# triton 3.6: 127-156 uncapped, no spills capped).
_W13_CONFIGS += [triton.Config(dict(c.kwargs, JOINT_TILE=True), num_warps=c.num_warps, num_stages=c.num_stages,
                               maxnreg=128) for c in _W13_CONFIGS if c.num_warps == 8]
# The joint tile over two K blocks per loop step (K a multiple of 256): each 16-row weight tile is
# read 2 KB at a time instead of 1 KB (two adjacent blocks of the packed layout), the blocks expanded, multiplied and promoted one
# after the other in K order (the same operations).  Fused quantisation only: with the
# pre-pass's scales carried for two blocks it spills (56 B); two stages of two blocks keep two
# programs per SM (84-92 KB of shared memory).
_W13_CONFIGS += [triton.Config({"COMPUTED_TABLE": computed, "FUSED_QUANT": True, "JOINT_TILE": True,
                                "TWO_BLOCKS": True}, num_warps=8, num_stages=2, maxnreg=128)
                 for computed in (True, False)]


# Configs that would spill registers (compiled for sm_90 with Triton's ptxas): the w13 program
# holds two accumulators and expands two weight tiles, which four warps cannot hold from 32
# rows up; a w2 program spills past 64 accumulator elements per thread.  And w13 forms where
# they do not apply: the fused quantisation past FUSED_QUANT_MAX_ROWS rows (it would cost as
# much as the weight stream), the joint tile from 64 rows (its accumulator would not fit), two
# K blocks per step where K is not a multiple of 256.
def _prune_w13(configs, nargs, **kw):
    small = kw["BLOCK_M"] <= FUSED_QUANT_MAX_ROWS
    return [c for c in configs if (small or c.num_warps >= 8) and (small or not c.kwargs["FUSED_QUANT"])
            and (kw["BLOCK_M"] < 64 or not c.kwargs["JOINT_TILE"])
            and (nargs["K"] % (2 * kw["BLOCK_K"]) == 0 or not c.kwargs["TWO_BLOCKS"])] or configs[:1]


def _prune_w2(configs, nargs, **kw):
    two_blocks_apply = kw["BLOCK_M"] < 64 and nargs["K"] % (2 * kw["BLOCK_K"]) == 0
    return [c for c in configs if kw["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps
            and (two_blocks_apply or not c.kwargs["TWO_BLOCKS"])] or configs[:1]


@autotune(configs=_W13_CONFIGS, key=["BLOCK_M", "K", "N_INTER"], name="moe_w13",
          prune_configs_by={"early_config_prune": _prune_w13})
@triton.jit
def _moe_w13_kernel(x_ptr, a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, lut_ptr, sorted_pair_ptr, block_expert_ptr,
                    route_w_ptr, hq_ptr, hs_ptr, n_experts, K, N_INTER, limit, stride_xm, stride_am, stride_sm,
                    stride_we, stride_se, TOPK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PACK: tl.constexpr, SCALE_WORDS: tl.constexpr,
                    COMPUTED_TABLE: tl.constexpr, FUSED_QUANT: tl.constexpr, JOINT_TILE: tl.constexpr,
                    TWO_BLOCKS: tl.constexpr):
    blk = tl.program_id(0)
    j = tl.program_id(1)
    expert = tl.load(block_expert_ptr + blk)
    if expert >= n_experts:
        return
    rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + rows)
    row_ok = pair >= 0
    token = tl.where(row_ok, pair // TOPK, 0).to(tl.int64)
    e64 = expert.to(tl.int64)
    w_base = w_ptr + e64 * stride_we
    s_base = w_scale_ptr + e64 * stride_se
    gate_rows = j.to(tl.int64) * (2 * PACK) + tl.arange(0, PACK)
    up_rows = gate_rows + PACK
    all_rows = gate_rows < 2 * N_INTER  # always true: the packed tile is whole
    # Under 64 rows the accumulators are transposed, [PACK, BLOCK_M] (see scaled_dot_t).
    SWAP: tl.constexpr = BLOCK_M < 64
    if JOINT_TILE:  # gate rows then up rows, [2 * PACK, BLOCK_M]
        tl.static_assert(SWAP)
        tile_rows = j.to(tl.int64) * (2 * PACK) + tl.arange(0, 2 * PACK)
        acc = tl.zeros((2 * PACK, BLOCK_M), dtype=tl.float32)
    elif SWAP:
        acc_g = tl.zeros((PACK, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((PACK, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, PACK), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, PACK), dtype=tl.float32)
    n_kb = tl.cdiv(K, BLOCK_K)
    if not FUSED_QUANT:  # pre-pass scales one K step ahead (load_act_scales in kernels/gemm.py)
        a_scale_next = load_act_scales(a_scale_ptr, token, row_ok, 0, n_kb, stride_sm)
    for kb in range(0, n_kb, 2 if TWO_BLOCKS else 1):
        if FUSED_QUANT:
            a, a_scale = load_act_block(x_ptr, x_ptr, token, row_ok, kb, K, stride_xm, 0, True, BLOCK_K)
        else:
            a = load_fp8_codes(a_ptr, token, row_ok, kb, K, stride_am, BLOCK_K)
            a_scale = a_scale_next
        if JOINT_TILE:
            w, ws = load_weight_block(w_base, s_base, lut_ptr, tile_rows, tile_rows < 2 * N_INTER, kb, K, 0, 0,
                                      W_MXFP4, BLOCK_K, COMPUTED_TABLE, SCALE_WORDS, TILED=True)
            acc = scaled_dot_t(acc, a, a_scale, w, ws)
            if TWO_BLOCKS:  # block kb + 1 exists: these configs run only where K is a multiple of 256
                tl.static_assert(FUSED_QUANT)
                a, a_scale = load_act_block(x_ptr, x_ptr, token, row_ok, kb + 1, K, stride_xm, 0, True, BLOCK_K)
                w, ws = load_weight_block(w_base, s_base, lut_ptr, tile_rows, tile_rows < 2 * N_INTER, kb + 1, K,
                                          0, 0, W_MXFP4, BLOCK_K, COMPUTED_TABLE, SCALE_WORDS, TILED=True)
                acc = scaled_dot_t(acc, a, a_scale, w, ws)
        else:
            wg, sg = load_weight_block(w_base, s_base, lut_ptr, gate_rows, all_rows, kb, K, 0, 0, W_MXFP4, BLOCK_K,
                                       COMPUTED_TABLE, SCALE_WORDS, TILED=True)
            wu, su = load_weight_block(w_base, s_base, lut_ptr, up_rows, all_rows, kb, K, 0, 0, W_MXFP4, BLOCK_K,
                                       COMPUTED_TABLE, SCALE_WORDS, TILED=True)
            if SWAP:
                acc_g = scaled_dot_t(acc_g, a, a_scale, wg, sg)
                acc_u = scaled_dot_t(acc_u, a, a_scale, wu, su)
            else:
                acc_g = scaled_dot(acc_g, a, a_scale, wg, sg, W_MXFP4)
                acc_u = scaled_dot(acc_u, a, a_scale, wu, su, W_MXFP4)
        if not FUSED_QUANT:
            a_scale_next = load_act_scales(a_scale_ptr, token, row_ok, kb + 1, n_kb, stride_sm)
    if JOINT_TILE:
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (2, PACK, BLOCK_M)), (2, 1, 0)))  # [BLOCK_M, PACK]
    elif SWAP:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    g = clamp_nan(acc_g, -float("inf"), limit)
    u = clamp_nan(acc_u, -limit, limit)
    h = tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u
    h = h * tl.load(route_w_ptr + tl.where(row_ok, pair, 0), mask=row_ok, other=0.0)[:, None]
    q, s = quantise_act_tile(h)
    # Padding rows are written too (zeros in, zeros out), so the w2 GEMM reads defined data.
    cols = j * PACK + tl.arange(0, PACK)
    tl.store(hq_ptr + rows[:, None] * N_INTER + cols[None, :], q.to(tl.uint8, bitcast=True))
    tl.store(hs_ptr + rows * (N_INTER // PACK) + j, s)


# Each with the table rows computed (first) and gathered; plus, under 64 rows, two K blocks
# per loop step (as w13's TWO_BLOCKS: 2 KB of each 16-row weight tile per step, the blocks
# promoted one after the other in K order).  Triton 3.6, BLOCK_N 64, 4 warps: 535
# instructions per two-block step (308 per block), 103-106 registers (four programs per SM).
_W2_CONFIGS = [triton.Config({"BLOCK_N": bn, "COMPUTED_TABLE": computed, "TWO_BLOCKS": False}, num_warps=w,
                             num_stages=s)
               for computed in (True, False)
               for bn, w, s in ((256, 8, 3), (64, 4, 3), (128, 4, 4), (128, 8, 3), (64, 4, 5), (32, 4, 4))]
_W2_CONFIGS += [triton.Config({"BLOCK_N": bn, "COMPUTED_TABLE": computed, "TWO_BLOCKS": True}, num_warps=w,
                              num_stages=s)
                for computed in (True, False) for bn, w, s in ((64, 4, 2), (64, 4, 3), (128, 8, 2))]


@autotune(configs=_W2_CONFIGS, key=["BLOCK_M", "N", "K"], name="moe_w2",
          prune_configs_by={"early_config_prune": _prune_w2})
@triton.jit
def _moe_w2_kernel(hq_ptr, hs_ptr, w_ptr, w_scale_ptr, lut_ptr, sorted_pair_ptr, block_expert_ptr, out_ptr,
                   n_experts, N, K, stride_we, stride_se,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SCALE_WORDS: tl.constexpr, COMPUTED_TABLE: tl.constexpr, TWO_BLOCKS: tl.constexpr):
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + blk)
    if expert >= n_experts:
        return
    rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + rows)
    row_ok = pair >= 0
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    e64 = expert.to(tl.int64)
    # Under 64 rows and from 64 columns the accumulator is transposed (see scaled_dot_t).
    SWAP: tl.constexpr = (BLOCK_M < 64) * (BLOCK_N >= 64)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_kb = K // BLOCK_K
    w_base = w_ptr + e64 * stride_we
    s_base = w_scale_ptr + e64 * stride_se
    # The input's scales one K step ahead (load_act_scales in kernels/gemm.py); with two K
    # blocks per step (n_kb even, see _prune_w2), both blocks' scales as one [BLOCK_M, 2] load.
    pair_kb = tl.arange(0, 2)
    if TWO_BLOCKS:
        scales_next = tl.load(hs_ptr + rows[:, None] * n_kb + pair_kb[None, :], mask=row_ok[:, None], other=0.0)
    else:
        a_scale_next = load_act_scales(hs_ptr, rows, row_ok, 0, n_kb, n_kb)
    for kb in range(0, n_kb, 2 if TWO_BLOCKS else 1):
        a = load_fp8_codes(hq_ptr, rows, row_ok, kb, K, K, BLOCK_K)
        if TWO_BLOCKS:
            a_scale, a_scale1 = tl.split(scales_next)
        else:
            a_scale = a_scale_next
        w, w_scale = load_weight_block(w_base, s_base, lut_ptr, cols, col_ok, kb, K, 0, 0, W_MXFP4, BLOCK_K,
                                       COMPUTED_TABLE, SCALE_WORDS, TILED=True)
        if SWAP:
            acc = scaled_dot_t(acc, a, a_scale, w, w_scale)
        else:
            acc = scaled_dot(acc, a, a_scale, w, w_scale, W_MXFP4)
        if TWO_BLOCKS:  # block kb + 1, after block kb: the same operations in K order
            a = load_fp8_codes(hq_ptr, rows, row_ok, kb + 1, K, K, BLOCK_K)
            w, w_scale = load_weight_block(w_base, s_base, lut_ptr, cols, col_ok, kb + 1, K, 0, 0, W_MXFP4,
                                           BLOCK_K, COMPUTED_TABLE, SCALE_WORDS, TILED=True)
            if SWAP:
                acc = scaled_dot_t(acc, a, a_scale1, w, w_scale)
            else:
                acc = scaled_dot(acc, a, a_scale1, w, w_scale, W_MXFP4)
            scales_next = tl.load(hs_ptr + rows[:, None] * n_kb + (kb + 2 + pair_kb)[None, :],
                                  mask=row_ok[:, None] & ((kb + 2 + pair_kb) < n_kb)[None, :], other=0.0)
        else:
            a_scale_next = load_act_scales(hs_ptr, rows, row_ok, kb + 1, n_kb, n_kb)
    dest = tl.where(row_ok, pair, 0).to(tl.int64)
    if SWAP:
        tl.store(out_ptr + dest[None, :] * N + cols[:, None], acc, mask=col_ok[:, None] & row_ok[None, :])
    else:
        tl.store(out_ptr + dest[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(part_ptr, ids_ptr, y_ptr, n_experts, N, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        e = tl.load(ids_ptr + t * TOPK + j)
        n_used = tl.where((e >= 0) & (e < n_experts), N, 0)  # a dropped pair's row was never written
        acc += tl.load(part_ptr + (t * TOPK + j) * N + cols, mask=cols < n_used, other=0.0)
    tl.store(y_ptr + t * N + cols, cast_rne(acc, tl.bfloat16), mask=col_ok)


def combine(part: torch.Tensor, ids: torch.Tensor, n_experts: int, y: torch.Tensor) -> None:
    """``y[t] = sum_j part[t * k + j]`` in slot order, FP32, one rounding to bf16; the rows of
    pairs with an id outside ``[0, E)`` were never written and are skipped."""
    t, dim = y.shape
    block = 1024
    _combine_kernel[(t, triton.cdiv(dim, block))](part, ids, y, n_experts, dim, TOPK=ids.shape[1], BLOCK=block,
                                                 num_warps=4)


# The activation of the CUDA prefill GEMMs (cuda_fallback/csrc/sm90_moe_prefill.cu): the sorted
# rows' FP8 codes with each 128-block's columns in the MMA's k-slot order (element
# 32q + 8s + 4h + b at slot 32s + 16h + 4q + b), and the scales K block major.
SORTED_QUANT_ROWS = 16


@triton.jit
def _sorted_act_quant_kernel(x_ptr, q_ptr, s_ptr, sorted_pair_ptr, block_expert_ptr, n_experts, n_rows, K,
                             stride_xm, TOPK: tl.constexpr, GATHER: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    kb = tl.program_id(1)
    if tl.load(block_expert_ptr + pid // (BLOCK_M // ROWS)) >= n_experts:
        return  # a block past the last expert's: the GEMMs skip it
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pair = tl.load(sorted_pair_ptr + rows)
    ok = pair >= 0
    src = tl.where(ok, pair // TOPK, 0).to(tl.int64) if GATHER else rows
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + src[:, None] * stride_xm + k[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    q, s = quantise_act_tile(x)
    v = tl.reshape(q.to(tl.uint8, bitcast=True), (ROWS, 4, 4, 2, 4))  # [row, q, s, h, b]
    v = tl.reshape(tl.permute(v, (0, 2, 3, 1, 4)), (ROWS, BLOCK_K))  # [row, s, h, q, b]
    tl.store(q_ptr + rows[:, None] * K + k[None, :], v)
    tl.store(s_ptr + kb * n_rows + rows, s)


def sorted_act_quant(x2: torch.Tensor, sorted_pair: torch.Tensor, block_expert: torch.Tensor, n_experts: int,
                     topk: int, gather: bool):
    """``act_quant`` of the sorted rows of an align of ``block_m``-row blocks: (codes uint8
    ``[rows, K]`` in the k-slot order above, scales fp32 ``[K / 128, rows]``).  Row r is token
    ``sorted_pair[r] // topk`` of ``x2`` (``gather``) or row r of ``x2`` itself; padding rows
    get zero codes; the rows of blocks past the last expert's are not written.  K: a multiple
    of 128."""
    rows, k = sorted_pair.shape[0], x2.shape[1]
    block_m = rows // block_expert.shape[0]
    if x2.stride(1) != 1 or k % ACT_BLOCK or block_m % SORTED_QUANT_ROWS:
        raise ValueError(f"sorted_act_quant: expected rows with a contiguous last dim of a multiple of {ACT_BLOCK} "
                         f"and blocks of a multiple of {SORTED_QUANT_ROWS} rows, got x2 strides {x2.stride()}, "
                         f"K = {k}, {block_m}-row blocks")
    q = torch.empty((rows, k), dtype=torch.uint8, device=x2.device)
    s = torch.empty((k // ACT_BLOCK, rows), dtype=torch.float32, device=x2.device)
    _sorted_act_quant_kernel[(rows // SORTED_QUANT_ROWS, k // ACT_BLOCK)](
        x2, q, s, sorted_pair, block_expert, n_experts, rows, k, x2.stride(0), TOPK=topk, GATHER=gather,
        ROWS=SORTED_QUANT_ROWS, BLOCK_M=block_m, BLOCK_K=ACT_BLOCK, num_warps=4)
    return q, s


@register("moe_experts", "triton")
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, limit: float,
                fmt: str) -> torch.Tensor:
    t, dim = x.shape
    topk = topk_ids.shape[1]
    n_experts, inter = w13.shape[0], w13.shape[1] * TILE_ROWS // 2
    y = torch.empty((t, dim), dtype=torch.bfloat16, device=x.device)
    if t == 0:
        return y
    pairs = t * topk
    block_m = block_m_for(pairs, n_experts)
    sorted_pair, block_expert = align(topk_ids, n_experts, block_m)
    max_blocks = block_expert.shape[0]
    ids = topk_ids.contiguous()
    route_w = topk_weights.contiguous()
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    # The pre-pass codes, and the BF16 rows for the configs that quantise them in the K loop.
    a, a_scale, stride_am, stride_sm = activation_operand(x2, False)
    w13s, w2s = w13_scale.view(torch.uint8), w2_scale.view(torch.uint8)
    lut = fp4_fp8_table(x.device)
    hq = torch.empty((max_blocks * block_m, inter), dtype=torch.uint8, device=x.device)
    hs = torch.empty((max_blocks * block_m, inter // ACT_BLOCK), dtype=torch.float32, device=x.device)
    _moe_w13_kernel[(max_blocks, inter // PACK_ROWS)](
        x2, a, a_scale, w13, w13s, lut, sorted_pair, block_expert, route_w, hq, hs, n_experts, dim, inter, limit,
        x2.stride(0), stride_am, stride_sm, w13.stride(0), w13s.stride(0),
        TOPK=topk, BLOCK_M=block_m, BLOCK_K=ACT_BLOCK, PACK=PACK_ROWS,
        SCALE_WORDS=mxfp4_scale_words(w13s, dim))
    part = torch.empty((pairs, dim), dtype=torch.float32, device=x.device)
    grid = lambda meta: (max_blocks, triton.cdiv(dim, meta["BLOCK_N"]))
    _moe_w2_kernel[grid](as_fp8_operand(hq), hs, w2, w2s, lut, sorted_pair, block_expert, part, n_experts, dim, inter,
                         w2.stride(0), w2s.stride(0),
                         BLOCK_M=block_m, BLOCK_K=ACT_BLOCK, SCALE_WORDS=mxfp4_scale_words(w2s, inter))
    combine(part, ids, n_experts, y)
    return y
