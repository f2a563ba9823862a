"""Triton sparse MQA attention with sink (SPEC 5.4), fused inverse RoPE (5.5), FP8 KV rows (11).

Design
------
One program = one query token x one block of ``BLOCK_H`` heads (x one slice of the
candidate list when the K dimension is split).  MQA: every head of the token attends to the
same candidate rows, so the program gathers each candidate's KV row ONCE for all its heads
and runs two tensor-core matmuls per block of ``BLOCK_K`` candidates:

    S [BLOCK_H, BLOCK_K] = Q [BLOCK_H, D] @ KV^T        (fp32 accumulate, K = V)
    online softmax in the exp2 domain (running max m, running sum l)
    O [BLOCK_H, D]      += P (bf16) @ KV

The sink joins only at the end: ``den = l * 2^(m - m') + 2^(sink - m')`` with
``m' = max(m, sink)``.  Rows are gathered with per-row pointers (a masked load per -1 or
out-of-range slot: nothing is read for it).  The FP8 cache rows are decoded in registers
(code * E8M0 scale, exact in bf16) straight into the matmul operand: no BF16 copy of the
cache is ever written.

Tile shapes.  ``BLOCK_H = 64`` (H >= 64; smaller H rounds up to a power of two >= 16, rows
masked), ``BLOCK_K`` 16/32/64 (autotuned), D = 128 or 512 whole.  Q [64, 512] bf16 (64 KB)
stays in shared memory for the whole loop; each KV tile (32 x 512 bf16 = 32 KB) is
double- or triple-buffered there.  The [64, 512] fp32 accumulator is 128 KB: at 8 warps
(256 threads) 128 registers a thread, the split FlashMLA uses (each warpgroup owns half
of the output columns); compiled for sm_90 (triton 3.6) this lands at 255 registers with
no spill, while 4 warps spill kilobytes (pruned) and 16 warps cap at 128
registers (more spill).  Splitting the output columns across programs instead would
shrink the accumulator but costs more than it saves: every program needs the full score
tile S (the whole D reduction), so with the columns split two ways the QK^T matmul runs
twice: 1.5x the FLOPs (and 2x the KV gathers, from L2) of a kernel that is compute bound
at H = 128.  So the columns stay in one program; only the candidate list is split.

Loads.  The candidate rows of the next tile are fetched by async copies while the
current one is in the matmuls (Triton's pipeliner, ``num_stages``).  For that every load
must be a whole vector of >= 4 bytes: rows are addressed as ``row * (stride8 * 8)`` so
the compiler knows they are 8-aligned, and the FP8 rows' rope values and scales are read
through bf16 / int64 views of the same memory (the 7 scale bytes + pad as one 8-byte word).

Flash-decoding split.  Decode has few programs (B * ceil(H / BLOCK_H)): B = 1, H = 128 is
2 programs for 132 SMs.  When that leaves at least half the SMs idle, the K candidates are
cut into ``splits`` slices (``_choose_splits``: as many as fit in one wave, each at least
two blocks of candidates); every slice writes its unnormalised partial output and (m, l)
to an fp32 workspace, then counts itself on a per-(token, head block) counter.  Programs
after all the slices (grid rows past them, so dispatched later: their wait always ends) each
merge one MERGE_W-wide block of output columns once the count is complete, in split order
(deterministic), with the sink and the inverse RoPE; the last to finish resets the counter.
The merge used to be the last slice's job: one program reading every slice's [64, 512] FP32
partial (1.2 MB at Pro B = 1) while the rest of the GPU idled (benchmarks/NOTES.md,
"attention, twenty-third round").  One launch either way; the workspace (tokens * H *
splits * (D + 2) floats + one int32 per (token, head block)) is kept per device and stream,
grown to the largest call, so a warm call allocates only its output.

What bounds it.  Per candidate and token: 4 * H * D FLOP against 584 B (FP8) or 1024 B
(BF16) of KV, ~450 FLOP/B at H = 128: the tensor cores, if the gathers are hidden.  In
practice (sm_90 compile of the tuned config by triton 3.6, BLOCK_K = 64, 8 warps, 255
registers: one program per SM) a tile's steps run one after another: the warps issue the
tile's instructions (FP8 ~1100 a warp: ~500 decoding the rows, ~170 softmax, 128 rescaling
the accumulator, the rest index loads and copy issue; BF16 ~740), then wait for the matmuls:
QK^T as 32 chained m64n32k16 wgmma per warpgroup (each warpgroup half the candidates, see
``_scores``; measured ~1.9 us of a ~5 us FP8 decode tile), P @ KV.  The stage variants
(``STAGE_VARIANTS``) time each part.  Nothing of the CUDA-core work runs under the QK^T
wgmma (Triton waits for a dot whose result is not loop-carried right after issuing it; an
async one would need a second 64 KB operand tile, and 217 of the 227 KB of shared memory are
taken); the row max crosses the two warpgroups (Triton's two-stage reduction: 3 barriers);
P goes to P @ KV through 8 KB of shared memory.  A CUDA (or Gluon) version on sm_90 would do
better with: TMA gathers of whole rows (``cp.async.bulk`` per row) into a multi-stage ring
driven by a producer warp; warp specialisation (one warpgroup decodes FP8 while two run
wgmma); and the two math warpgroups ping-ponging softmax and MMA (as FlashMLA does).

Interpreter (CPU tests): its bf16 ``tl.dot`` and fp32 -> bf16 conversion are wrong
(numpy has no bf16), so ``_dot`` and ``_to_bf16`` take exact fp32 / bit-level paths there.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..reference.attention import QUANT_BLOCK, ROPE_DIM, fp8_row_bytes
from ..registry import register
from .device import sm_count
from .formats import INTERPRET, amax_nan, dot_bf16, fp8_value
from .quant import fp8_block_codes
from .rows import as_rows
from .sync import splits_after_wait

LOG2E = 1.4426950408889634
MAX_SPLITS = 16
SPLIT_SLOTS = tl.constexpr(MAX_SPLITS)  # the merge's register row of per-slice weights
MERGE_ROUND_COLS = tl.constexpr(512)  # a merge program reads 512 / W slices of W columns per round trip
# Lazy rescale (the ``LAZY_RESCALE`` configs): the running max of a row moves only when a score
# passes it by more than this many doublings, so the exponents stay <= 2^8 (P in bf16 and the
# sums in fp32 keep their relative precision; the result is the same function: the final
# normalisation uses the max the sums were taken against).
RESCALE_MARGIN = tl.constexpr(8.0)

# Stage variants of the attention kernel: the same kernel with one stage left out or done
# twice, selected by the constexpr ``VARIANT``.  The public op always runs FULL; the
# benchmarks time the others (``run_stage_variant``) to measure where the time goes.
# (QK^T twice rather than P @ KV twice: a P @ KV chained to a second matmul would be laid
# out with all warps along the heads, doubling its work and spilling: another kernel.)
FULL, NO_DEQUANT, QK_ONLY, CONTIGUOUS_ROWS, QK_TWICE, NO_MAX = (tl.constexpr(v) for v in range(6))
STAGE_VARIANTS = {"no-dequant": NO_DEQUANT.value, "QK-only": QK_ONLY.value, "contiguous": CONTIGUOUS_ROWS.value,
                  "QK-twice": QK_TWICE.value, "no-max": NO_MAX.value}


@triton.jit
def _e8m0_scale(byte):
    """E8M0 byte (int tensor) -> float32 2**(b - 127), 0xFF -> NaN, 0 -> 2**-127 (subnormal).
    The value is built as integer bits in one expression: testing the two special bytes
    with float selects kept 16 predicates per thread alive across the tile decode, which
    the compiler packed into and unpacked from a register (~10 instructions a scale)."""
    b = byte.to(tl.int32)
    special = ((b + 1) & 0xFE) == 0  # b == 0 or b == 255: add the top mantissa bit
    return ((b << 23) | tl.where(special, 0x400000, 0)).to(tl.float32, bitcast=True)


@triton.jit
def _to_bf16(x):
    """fp32 -> bf16, round to nearest even (the GPU conversion).  The interpreter's own
    conversion truncates, so there the rounding is done on the bits."""
    if INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _gather_kv(kv_ptr, kv16_ptr, kv64_ptr, rows, valid, stride8, D: tl.constexpr, FP8: tl.constexpr,
               DEQUANT: tl.constexpr = True):
    """The candidates' KV rows as a bf16 [BLOCK_K, D] tile; empty slots read as 0.

    ``rows``: row numbers (0 where not ``valid``), int32 where every row offset fits (see
    ``_row_offsets_fit_int32``), else int64; a row starts at ``rows * stride8 * 8``
    elements of ``kv_ptr`` (bf16 cache) or bytes (FP8 cache).  The FP8 rows' rope values and
    scales are read through ``kv16_ptr``/``kv64_ptr``, the same memory typed as bf16/int64:
    typed pointers keep those loads whole vectors (and so pipelined as async copies).
    Multiplying by 8 in the kernel tells the compiler rows are 8-aligned.
    ``DEQUANT=False`` (the NO_DEQUANT stage variant) loads the same code bytes but skips their
    decode: each code byte shifted left by 6 is taken as bf16 bits (values in [0, 2)), the
    scales are not read."""
    if FP8:
        NBLK: tl.constexpr = D // 64  # D - 64 nope values in blocks of 64, then the 64 rope values
        DN: tl.constexpr = D - 64
        j = tl.arange(0, NBLK)
        e = tl.arange(0, 64)
        is_nope = j < NBLK - 1
        row = rows * (stride8 * 8)
        nope_mask = valid[:, None, None] & is_nope[None, :, None]
        codes = tl.load(kv_ptr + row[:, None, None] + j[None, :, None] * 64 + e[None, None, :], mask=nope_mask,
                        other=0)
        rope_ptrs = kv16_ptr + (rows * (stride8 * 4))[:, None] + DN // 2 + e[None, :]
        if not DEQUANT:
            raw = (codes.to(tl.uint16) << 6).to(tl.bfloat16, bitcast=True)
            rope = tl.load(rope_ptrs, mask=valid[:, None], other=0.0)
            tile = tl.where(is_nope[None, :, None], raw, rope[:, None, :])
            return tl.reshape(tile, [rows.shape[0], D])
        # The scales as one little-endian 8-byte word per row (8-aligned, inside the row: 7
        # scales + pad for D = 512, 1 scale + pad for D = 128); byte j is block j's scale.
        words = tl.load(kv64_ptr + rows * stride8 + (DN + 128) // 8, mask=valid, other=0x7F7F7F7F7F7F7F7F)
        sbytes = (words[:, None] >> (8 * j[None, :]).to(tl.int64)) & 0xFF
        nope = fp8_value(codes) * _e8m0_scale(sbytes)[:, :, None]
        rope = tl.load(rope_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        tile = tl.where(is_nope[None, :, None], nope, rope[:, None, :])
        return tl.reshape(tile, [rows.shape[0], D]).to(tl.bfloat16)
    else:
        d = tl.arange(0, D)
        return tl.load(kv_ptr + (rows * (stride8 * 8))[:, None] + d[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _inverse_rope_store(o, out_ptr, row_off, h_ok, freqs_ptr, pos, col0, D: tl.constexpr, HALF_R: tl.constexpr,
                        BLOCK_H: tl.constexpr, W: tl.constexpr):
    """Store the fp32 tile ``o [BLOCK_H, W]`` (output columns ``col0 .. col0 + W``, ``col0`` even)
    as bf16 at ``out_ptr + row_off[h] + column``, the columns among the last 2 * HALF_R rotated by
    -pos * f_i (interleaved pairs)."""
    pair = col0 // 2 + tl.arange(0, W // 2)
    rope_pair = pair - (D // 2 - HALF_R)
    is_rope = rope_pair >= 0
    table = freqs_ptr + pos * (2 * HALF_R) + 2 * tl.where(is_rope, rope_pair, 0)
    cos = tl.load(table, mask=is_rope, other=1.0)[None, :]
    sin = tl.load(table + 1, mask=is_rope, other=0.0)[None, :]
    x0, x1 = tl.split(tl.reshape(o, [BLOCK_H, W // 2, 2]))
    y0 = tl.where(is_rope[None, :], x0 * cos + x1 * sin, x0)
    y1 = tl.where(is_rope[None, :], x1 * cos - x0 * sin, x1)
    y = tl.reshape(tl.join(y0, y1), [BLOCK_H, W])
    d = col0 + tl.arange(0, W)
    tl.store(out_ptr + row_off[:, None] + d[None, :], _to_bf16(y), mask=h_ok[:, None])


@triton.jit
def _finish(o, out_ptr, row_off, h_ok, freqs_ptr, pos, col0, D: tl.constexpr, HALF_R: tl.constexpr,
            BLOCK_H: tl.constexpr, W: tl.constexpr):
    """Store output columns ``col0 .. col0 + W`` (static): rotated where they reach the rope part."""
    if HALF_R > 0 and col0 + W > D - 2 * HALF_R:
        _inverse_rope_store(o, out_ptr, row_off, h_ok, freqs_ptr, pos, col0, D, HALF_R, BLOCK_H, W)
    else:
        d = col0 + tl.arange(0, W)
        tl.store(out_ptr + row_off[:, None] + d[None, :], _to_bf16(o), mask=h_ok[:, None])


@triton.jit
def _position(pos_ptr, b, s, stride_pb, stride_ps, max_pos, HALF_R: tl.constexpr):
    """The token's RoPE position, clamped into the table (0 without RoPE)."""
    if HALF_R > 0:
        pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps)
        return tl.minimum(tl.maximum(pos, 0), max_pos - 1)
    else:
        return 0


@triton.jit
def _merge_block(part_o_ptr, part_ml_ptr, sink_ptr, out_ptr, freqs_ptr, counter_ptr, pos, tok, heads, h_ok, H, n_splits,
                 col0, D: tl.constexpr, HALF_R: tl.constexpr, BLOCK_H: tl.constexpr, W: tl.constexpr):
    """Output columns ``col0 .. col0 + W`` of one (token, head block): waits until its
    ``n_splits`` slices have counted themselves (acquire), then combines their (m, l, O) with
    the sink and stores (inverse RoPE included).  Every slice's (m, l) comes in one batch of
    loads; the partial columns 512 / W slices per L2 round trip (past the last slice the
    last is read again and weighs 0: no mask, so the loads go together), each element summed
    in split order: the same bits whichever slice finished last and whatever W."""
    n_ok = splits_after_wait(counter_ptr, n_splits, n_splits)  # bounds the loads below the acquire
    base = (tok * H + heads) * n_splits
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0) * 1.4426950408889634
    j = tl.arange(0, SPLIT_SLOTS)
    ml_ptrs = part_ml_ptr + 2 * (base[:, None] + j[None, :])
    ml_mask = h_ok[:, None] & (j < n_ok)[None, :]
    m_all = tl.load(ml_ptrs, mask=ml_mask, other=float("-inf"), cache_modifier=".cg")
    l_all = tl.load(ml_ptrs + 1, mask=ml_mask, other=0.0, cache_modifier=".cg")
    m_fin = tl.maximum(sink, tl.max(m_all, axis=1))
    scale_all = tl.exp2(m_all - m_fin[:, None])  # 0 for the slots past the last slice
    den = tl.exp2(sink - m_fin) + tl.sum(l_all * scale_all, axis=1)
    w_all = scale_all / den[:, None]
    c = col0 + tl.arange(0, W)
    o = tl.zeros([BLOCK_H, W], tl.float32)
    UNROLL: tl.constexpr = MERGE_ROUND_COLS // W
    for s0 in range(0, n_ok, UNROLL):
        for u in tl.static_range(UNROLL):
            i = tl.minimum(s0 + u, n_ok - 1)
            part = tl.load(part_o_ptr + (base + i)[:, None] * D + c[None, :], mask=h_ok[:, None], other=0.0,
                           cache_modifier=".cg")
            w = tl.sum(tl.where(j[None, :] == s0 + u, w_all, 0.0), axis=1)  # slice s0 + u's weight
            o += w[:, None] * part
    row_off = (tok * H + heads) * D
    if HALF_R > 0:
        _inverse_rope_store(o, out_ptr, row_off, h_ok, freqs_ptr, pos, col0, D, HALF_R, BLOCK_H, W)
    else:
        tl.store(out_ptr + row_off[:, None] + c[None, :], _to_bf16(o), mask=h_ok[:, None])


@triton.jit
def _scores(q, kv, branch, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """S = Q @ KV^T [BLOCK_H, BLOCK_K], fp32.

    The matmul sits in both arms of a branch on a runtime value (either arm computes S) so
    that Triton does not see its result feeding the P @ KV matmul: it lays out a matmul whose
    result reaches another matmul with all warps along its rows (the flash-attention layout),
    which with 64 heads and 8 warps made both warpgroups compute the whole score tile (twice
    the QK^T work, with half-width wgmma), kept 32 scores a thread live and spilled.  Seen from
    inside the branch, the result only reaches the branch's yield, so the two warpgroups split
    the candidates (half the QK^T wgmma each); P then goes to P @ KV through shared memory
    (8 KB bf16).  sm_90 compile (triton 3.6), BLOCK_K = 64: 36 wgmma a warp per tile instead
    of 68, and ~250 fewer instructions a warp (descriptors, and half the scores a thread)."""
    if branch:
        sc = dot_bf16(q, tl.trans(kv), tl.zeros([BLOCK_H, BLOCK_K], tl.float32))
    else:
        sc = dot_bf16(q, tl.trans(kv), tl.zeros([BLOCK_H, BLOCK_K], tl.float32))
    return sc


def _attention_configs():
    # (BLOCK_K, warps, stages, lazy rescale, merge width).  The first is valid for every shape
    # (the interpreter runs only it).  (64, 8, 3): at D = 512 the FP8 rows fit a third stage
    # (222 KB of shared memory), which keeps a tile of row gathers in flight while the matmuls
    # run (see the index prefetch in the kernel); BF16 rows do not (270 KB: the tuner skips it).
    # Lazy rescale (``LAZY_RESCALE``): sm_90 compile of (64, 8, 3) by triton 3.6, FP8 D = 512:
    # the loop's common path 1107 -> 1053 instructions a warp (130 multiplies fewer, the Q
    # descriptors reloaded from the stack instead of rebuilt: ~60 more), barriers 6 -> 6, so
    # the tuner decides.  ``MERGE_W`` (the merge programs' column block, see ``_merge_block``) only
    # differs where the candidates are split; elsewhere its 256 configs are pruned.
    shapes = ((32, 8, 2, False, 128), (64, 8, 2, False, 128), (64, 8, 3, False, 128), (16, 8, 2, False, 128),
              (32, 8, 3, False, 128), (16, 8, 3, False, 128), (64, 8, 1, False, 128), (32, 4, 2, False, 128),
              (64, 4, 2, False, 128), (64, 4, 3, False, 128),
              (64, 8, 3, True, 128), (64, 8, 2, True, 128), (64, 8, 3, False, 256), (64, 8, 3, True, 256),
              (64, 8, 3, False, 64), (32, 8, 2, False, 64))
    return [triton.Config({"BLOCK_K": bk, "LAZY_RESCALE": lazy, "MERGE_W": mw}, num_warps=w, num_stages=st)
            for bk, w, st, lazy, mw in shapes]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose fp32 [BLOCK_H, D] accumulator alone needs > 128 registers a thread
    (4 warps at D = 512 spill heavily), and the merge forms where nothing is merged (the
    same kernel as their twins); configs whose shared memory does not fit are skipped
    by the tuner itself."""
    keep = [c for c in configs if kwargs["BLOCK_H"] * kwargs["D"] <= 128 * 32 * c.num_warps
            and (kwargs["SPLIT"] or c.kwargs["MERGE_W"] == 128)]
    return keep or configs[:1]


@autotune(configs=_attention_configs(), key=["H", "D", "FP8", "HALF_R", "SPLIT", "K_BUCKET", "GRID_BUCKET"],
          name="sparse_attention", prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _sparse_attention_kernel(
        q_ptr, kv_ptr, kv16_ptr, kv64_ptr, sink_ptr, idx_ptr, out_ptr, freqs_ptr, pos_ptr, part_o_ptr, part_ml_ptr,
        counter_ptr,
        S, H, N, K, n_hblk, k_per_split, max_pos, qk_scale, K_BUCKET, GRID_BUCKET,
        stride_qb, stride_qs, stride_qh, stride_kvb8, stride_kvn8, stride_ib, stride_is, stride_pb, stride_ps,
        D: tl.constexpr, FP8: tl.constexpr, HALF_R: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LAZY_RESCALE: tl.constexpr = False,
        MERGE_W: tl.constexpr = 128, ROW_I32: tl.constexpr = False, VARIANT: tl.constexpr = FULL):
    pid = tl.program_id(0).to(tl.int64)
    tok = pid // n_hblk  # head blocks of one token are neighbours: they share its KV rows in L2
    heads = (pid % n_hblk) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    b = tok // S
    s = tok % S
    split = tl.program_id(1)
    MW: tl.constexpr = MERGE_W if MERGE_W <= D else D
    if SPLIT:
        # Programs past the slices merge one column block each (see _merge_block).
        n_splits = tl.num_programs(1) - D // MW
        if split >= n_splits:
            _merge_block(part_o_ptr, part_ml_ptr, sink_ptr, out_ptr, freqs_ptr, counter_ptr + pid,
                         _position(pos_ptr, b, s, stride_pb, stride_ps, max_pos, HALF_R), tok, heads, h_ok, H,
                         n_splits, (split - n_splits) * MW, D, HALF_R, BLOCK_H, MW)
            # The last merge program to finish leaves the counter zero for the next launch.
            if tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel") == n_splits + D // MW - 1:
                tl.store(counter_ptr + pid, 0)
            return
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + s * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None], other=0.0)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    idx_row = idx_ptr + b * stride_ib + s * stride_is
    kv_batch = kv_ptr + b * (stride_kvb8 * 8)
    kv16_batch = kv16_ptr + b * (stride_kvb8 * 4)
    kv64_batch = kv64_ptr + b * stride_kvb8

    score_scale = qk_scale * 0.5 if VARIANT == QK_TWICE else qk_scale
    # NO_MAX: the exponents are taken against 0 throughout (the max the sums end up relative to).
    m_i = tl.full([BLOCK_H], 0.0 if VARIANT == NO_MAX else float("-inf"), tl.float32)
    # The softmax denominators accumulate element-wise and are summed over the candidates once,
    # after the loop: a row sum per tile crossed the two warpgroups (3 barriers a tile).
    l_acc = tl.zeros([BLOCK_H, BLOCK_K], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    fresh = tl.full([], 1, tl.int32)  # lazy rescale: some row has no finite running max yet
    # Each tile's candidate rows are loaded one iteration ahead, by hand.  An index load
    # feeding a gather in the same iteration is pipelined by Triton (3.6) with the gathers
    # issued at the end of the previous iteration and waited for at the top of this one, in
    # every config: the whole gather latency on every tile.  With the rows loop-carried, 3
    # stages issue the gathers two tiles ahead (sm_90 SASS: the top-of-loop wait leaves the
    # latest tile's copies in flight).
    c_first = k_lo + tl.arange(0, BLOCK_K)
    rows_next = tl.load(idx_row + c_first, mask=c_first < k_hi, other=-1)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        if VARIANT == CONTIGUOUS_ROWS:  # candidate slot c reads cache row c: no index load, no scatter
            rows = c
            valid = (c < k_hi) & (c < N)
        else:
            rows = rows_next
            rows_next = tl.load(idx_row + c + BLOCK_K, mask=c + BLOCK_K < k_hi, other=-1)
            valid = rows.to(tl.uint32, bitcast=True) < N  # unsigned: -1 (any negative) wraps past N
        rows_safe = tl.where(valid, rows, 0)
        if not ROW_I32:  # row offsets past 2^31 elements: 64-bit products
            rows_safe = rows_safe.to(tl.int64)
        kv = _gather_kv(kv_batch, kv16_batch, kv64_batch, rows_safe, valid, stride_kvn8, D, FP8,
                        VARIANT != NO_DEQUANT)
        sc = _scores(q, kv, K > 0, BLOCK_H, BLOCK_K)
        if VARIANT == QK_TWICE:  # the scores computed twice (2 S; another branch, so not merged), half scale
            sc += _scores(q, kv, N > 0, BLOCK_H, BLOCK_K)
        # The scores stay unscaled: the (positive) scale enters the row max once per row
        # (rounding is monotonic, so max(s) * c == max(s * c)) and the exp2 argument as one
        # FMA per score instead of a multiply and a subtraction.
        sc = tl.where(valid[None, :], sc, float("-inf"))
        if VARIANT == NO_MAX:  # no row max, no rescale: what the running max costs
            p = tl.exp2(sc * score_scale)
            l_acc += p
            acc_in = acc
        elif LAZY_RESCALE:
            # The exponents against the running max as it stands (0 for a row without one);
            # the max moves, and the accumulator is rescaled, only when an exponent of the tile
            # passes RESCALE_MARGIN or while some row has no finite max.  The test is one
            # scalar max over the tile (the cross-warp reduction the row max of the eager
            # path costs); the rare branch works from the exponents alone, so the scores are
            # not kept alive across it.
            m_run = tl.where(m_i == float("-inf"), 0.0, m_i)
            x = tl.fma(sc, score_scale, -m_run[:, None])
            if (tl.max(x) > RESCALE_MARGIN) | (fresh != 0):
                m_new = tl.maximum(m_i, m_run + tl.max(x, axis=1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_ref)
                p = tl.exp2(x - (m_ref - m_run)[:, None])
                l_acc = l_acc * alpha[:, None]
                if VARIANT != QK_ONLY:
                    acc = acc * alpha[:, None]
                m_i = m_new
                fresh = tl.max((m_new == float("-inf")).to(tl.int32))
            else:
                p = tl.exp2(x)
            l_acc += p
            acc_in = acc
        else:
            m_new = tl.maximum(m_i, tl.max(sc, axis=1) * score_scale)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no candidate yet: keep exp2 finite
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(tl.fma(sc, score_scale, -m_ref[:, None]))
            l_acc = l_acc * alpha[:, None] + p
            m_i = m_new
            acc_in = acc * alpha[:, None]
        if VARIANT == QK_ONLY:
            # P @ KV left out.  P still feeds a (16-column, all-zero) matmul, so its trip to a
            # matmul operand (bf16, through shared memory) stays; the zero sum keeps that
            # matmul from being dropped.
            probe = dot_bf16(_to_bf16(p), tl.zeros([BLOCK_K, 16], tl.bfloat16), tl.zeros([BLOCK_H, 16], tl.float32))
            l_acc += tl.sum(probe, axis=1)[:, None]
        else:
            acc = dot_bf16(_to_bf16(p), kv, acc_in)
    l_i = tl.sum(l_acc, axis=1)

    if SPLIT:
        slot = (tok * H + heads) * n_splits + split
        tl.store(part_o_ptr + slot[:, None] * D + d[None, :], acc, mask=h_ok[:, None])
        tl.store(part_ml_ptr + 2 * slot, m_i, mask=h_ok)
        tl.store(part_ml_ptr + 2 * slot + 1, l_i, mask=h_ok)
        tl.debug_barrier()  # all threads' partials are written before the count is published
        tl.atomic_add(counter_ptr + pid, 1, sem="release")
    else:
        pos = _position(pos_ptr, b, s, stride_pb, stride_ps, max_pos, HALF_R)
        sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0) * 1.4426950408889634
        m_fin = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_fin)
        den = l_i * alpha + tl.exp2(sink - m_fin)
        o = acc * (alpha / den)[:, None]
        _finish(o, out_ptr, (tok * H + heads) * D, h_ok, freqs_ptr, pos, 0, D, HALF_R, BLOCK_H, D)


def _choose_splits(programs: int, k: int, num_sms: int, min_slice: int = 128) -> int:
    """Slices of the candidate list per (token, head block).

    ``num_sms // programs`` slices: one wave that covers the machine (a program holds most
    of an SM's registers and shared memory at D = 512, so one per SM; rounding up would
    start a second, mostly idle wave).  No slice shorter than ``min_slice`` candidates
    (two blocks of 64: shorter slices spend more on the prologue, the partial write and
    the merge than they gain) and at most ``MAX_SPLITS`` (the merge reads every slice)."""
    if k < 2 * min_slice:
        return 1
    return max(1, min(MAX_SPLITS, num_sms // programs, k // min_slice))


_workspaces: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _split_workspace(device: torch.device, n_partial: int, n_counters: int):
    """(partial outputs, partial (m, l), arrival counters) of the K split, for the current stream
    of ``device``, grown to the largest call seen: no allocation per call once warm (allocate
    before capturing a CUDA graph).  The counters are zeroed once; every launch leaves them zero."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _workspaces.get(key)
    if ws is None or ws[0].numel() < n_partial or ws[2].numel() < n_counters:
        n_partial = max(n_partial, ws[0].numel() if ws else 0)
        n_counters = max(n_counters, ws[2].numel() if ws else 0)
        ws = (torch.empty(n_partial, dtype=torch.float32, device=device),
              torch.empty(2 * n_partial // 128, dtype=torch.float32, device=device),  # D >= 128: one (m, l) a row
              torch.zeros(n_counters, dtype=torch.int32, device=device))
        _workspaces[key] = ws
    return ws


def _row_offsets_fit_int32(n_rows: int, row_stride: int) -> bool:
    """Whether every in-batch row offset of the cache (elements of its dtype: bytes for FP8 rows),
    plus a row, stays below 2^31, so the gathers can address rows with 32-bit products.  sm_90
    compile (triton 3.6) of the decode/prefill loops: FP8 1158 -> 1118 instructions a warp,
    BF16 867 -> 737 (the 64-bit row products of the rope, scale and BF16 row addresses)."""
    return (n_rows + 1) * row_stride < 2 ** 31


def _block_h(h: int) -> int:
    return min(64, max(16, triton.next_power_of_2(h)))


@register("sparse_attention", "triton")
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                     freqs: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch(q, kv, sink, idx, scale, freqs, positions, FULL.value)


def run_stage_variant(variant: str, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """The attention kernel with one stage left out or done twice (a key of ``STAGE_VARIANTS``),
    launched as the op would launch it (same tiles, splits and tuned config), for the benchmarks'
    attribution of time.  Not the op: "no-dequant" reads FP8 code bytes as raw bf16 bits,
    "QK-only" returns zeros, "contiguous" reads cache rows 0..K-1 instead of ``idx``,
    "QK-twice" computes the scores twice (output as the op's, up to rounding), "no-max" keeps
    no running max (exponents against 0: the op's output up to rounding while the scores stay
    below ~126 doublings).  Inputs as ``ops.sparse_attention`` validates them."""
    if variant not in STAGE_VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(STAGE_VARIANTS)}, got {variant!r}")
    if variant == "no-dequant" and kv.dtype != torch.uint8:
        raise ValueError(f"kv: the no-dequant variant needs FP8 cache rows (uint8), got {kv.dtype}")
    return _launch(q, kv, sink, idx, scale, None, None, STAGE_VARIANTS[variant])


def new_output(q: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """The bf16 output shaped like ``q``, and whether it is already final: no element, or no
    candidate anywhere (only the sink in every denominator: zeros)."""
    out = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)
    if out.numel() == 0 or idx.shape[2] == 0:
        return out.zero_(), True
    return out, False


def _launch(q, kv, sink, idx, scale, freqs, positions, variant):
    bsz, seq, heads, d = q.shape
    tokens, k = bsz * seq, idx.shape[2]
    out, done = new_output(q, idx)
    if done:
        return out
    if q.stride(3) != 1:
        q = q.contiguous()
    if kv.stride(2) != 1 or kv.stride(1) % 8 or kv.stride(0) % 8 or kv.storage_offset() % 8:
        kv = kv.contiguous()  # the kernel relies on 8-element (BF16) / 8-byte (FP8) aligned rows
    if idx.stride(2) != 1:
        idx = idx.contiguous()
    sink = sink.contiguous()
    fp8 = kv.dtype == torch.uint8
    half_r = 0 if freqs is None else freqs.shape[1]
    if freqs is not None:
        freqs = freqs.contiguous()
    pos = positions if positions is not None else idx  # any tensor; unused without freqs
    block_h = _block_h(heads)
    n_hblk = triton.cdiv(heads, block_h)
    splits = _choose_splits(tokens * n_hblk, k, sm_count(q.device))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), 64) * 64
    splits = triton.cdiv(k, k_per_split)
    if splits > 1:
        part_o, part_ml, counters = _split_workspace(q.device, tokens * heads * splits * d, tokens * n_hblk)
    else:
        part_o = part_ml = counters = out
    # Tuning keys: candidates per program and the grid size, bucketed to powers of two.
    k_bucket = triton.next_power_of_2(k_per_split)
    grid_bucket = min(triton.next_power_of_2(tokens * n_hblk * splits), 4096)
    kv16, kv64 = (kv.view(torch.bfloat16), kv.view(torch.int64)) if fp8 else (kv, kv)
    # Past the slices, one merge program per column block (MERGE_W wide, at most D).
    grid = lambda m: (tokens * n_hblk, splits + (d // min(m["MERGE_W"], d) if splits > 1 else 0))
    _sparse_attention_kernel[grid](
        q, kv, kv16, kv64, sink, idx, out, freqs if freqs is not None else sink, pos, part_o, part_ml, counters,
        seq, heads, kv.shape[1], k, n_hblk, k_per_split, freqs.shape[0] if freqs is not None else 1,
        scale * LOG2E, k_bucket, grid_bucket,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0) // 8, kv.stride(1) // 8, idx.stride(0), idx.stride(1),
        pos.stride(0), pos.stride(1),
        D=d, FP8=fp8, HALF_R=half_r, SPLIT=splits > 1, BLOCK_H=block_h,
        ROW_I32=_row_offsets_fit_int32(kv.shape[1], kv.stride(1)), VARIANT=variant)
    return out


# ---------------------------------------------------------------------------------------
# FP8 cache rows


@triton.jit
def _pack_kv_fp8_kernel(kv_ptr, out_ptr, n_rows, stride_kv, ROW_BYTES: tl.constexpr, D: tl.constexpr,
                        NBLK_P2: tl.constexpr, PAD_P2: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows per program: codes, rope bytes, scales and pad of each row, bit-exact with
    ``reference.attention.pack_kv_fp8`` (blocks of 64 nope values, 64 rope values)."""
    DN: tl.constexpr = D - 64
    NBLK: tl.constexpr = DN // 64
    PAD: tl.constexpr = ROW_BYTES - (DN + 128 + NBLK)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    j = tl.arange(0, NBLK_P2)
    e = tl.arange(0, 64)
    blk_ok = row_ok[:, None] & (j < NBLK)[None, :]
    x = tl.load(kv_ptr + rows[:, None, None] * stride_kv + j[None, :, None] * 64 + e[None, None, :],
                mask=blk_ok[:, :, None], other=0.0).to(tl.float32)
    codes, ex, invalid, _ = fp8_block_codes(x, amax_nan(x, 2))
    out_row = out_ptr + rows * ROW_BYTES
    tl.store(out_row[:, None, None] + j[None, :, None] * 64 + e[None, None, :], codes, mask=blk_ok[:, :, None])
    tl.store(out_row[:, None] + (DN + 128) + j[None, :], tl.where(invalid, 0xFF, ex + 127).to(tl.uint8),
             mask=blk_ok)
    rope = tl.load(kv_ptr + rows[:, None] * stride_kv + DN + e[None, :], mask=row_ok[:, None], other=0.0)
    rope_ptr = (out_row[:, None] + DN + 2 * e[None, :]).to(tl.pointer_type(tl.bfloat16))
    tl.store(rope_ptr, _to_bf16(rope.to(tl.float32)), mask=row_ok[:, None])
    pad = tl.arange(0, PAD_P2)
    tl.store(out_row[:, None] + (DN + 128 + NBLK) + pad[None, :], tl.zeros([ROWS, PAD_P2], tl.uint8),
             mask=row_ok[:, None] & (pad < PAD)[None, :])


@register("pack_kv_fp8", "triton")
def pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    d = kv.shape[-1]
    row_bytes = fp8_row_bytes(d)
    out = torch.empty(*kv.shape[:-1], row_bytes, dtype=torch.uint8, device=kv.device)
    if out.numel() == 0:
        return out
    kv2 = as_rows(kv)
    n_rows = kv2.shape[0]
    nblk = (d - ROPE_DIM) // QUANT_BLOCK
    pad = row_bytes - (d - ROPE_DIM + 2 * ROPE_DIM + nblk)
    rows_per_program = 4
    _pack_kv_fp8_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        kv2, out, n_rows, kv2.stride(0), ROW_BYTES=row_bytes, D=d, NBLK_P2=triton.next_power_of_2(nblk),
        PAD_P2=triton.next_power_of_2(max(pad, 1)), ROWS=rows_per_program, num_warps=4)
    return out
