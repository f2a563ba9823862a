"""Triton lightning indexer: scores on tensor cores, then an exact radix top-k, no host sync.

Scoring (one launch): a program takes ``QROWS`` queries of one sequence (all their heads:
``QROWS * Hi`` rows of ``qi``, at least 16 for the tensor cores) and ``TILES`` tiles of
``BLOCK_N`` keys; per tile ``[rows, 128] @ [128, BLOCK_N]`` in FP32 accumulation, relu,
times ``w``, summed over the heads, stored as FP32 scores ``[B*S, Nk]`` (a workspace of
4 B per query and key: 1/64 of the BF16 key bytes it is made from).  Key tiles at or
past every query's ``n_valid`` are skipped (the causal half in prefill).

Selection: exact top-k by a radix select on an order-preserving 32-bit key of each FP32
score (up to four levels of one byte; a histogram pass per level finds the digit holding
the k-th largest, and the levels stop once that digit is taken whole), then one pass that
writes, in ascending index order, every index above the threshold and the lowest-index
ones equal to it, and pads with -1.  Deterministic either way (integer sums only):
- few long rows (decode): the row-parallel select, 3 launches with every SM busy in the
  first two: the scoring launch also builds each row's histogram of the top 11 key bits;
  chunk programs then copy the row's survivors (the keys in the k-th largest's bin or
  above: about k plus that bin's share) to a small buffer; one program per row finds the
  exact cut key among them by radix levels and writes the selection (ties at the cut to the
  lowest indices) in ascending index order.  See "Row-parallel selection" below.
- many rows (prefill): one program per row segment, all levels in one launch; a row cut
  into ``splits`` segments writes each segment's top-k with values and a second launch
  selects among those (exact: an element of the row's top-k is in its segment's top-k).
  2 launches, 3 when a row is split.

FP4 keys (``uint8 [B, Nk, 68]``, see ``reference/indexer.py``) are decoded in registers to
BF16 (exact: an E2M1 value times a power of two; 3 integer ops and 2 multiplies per element,
see ``_fp4_key_tile``) before the same tensor-core product, so both layouts give identical
scores; the FP4 rows move 68 B per key instead of 256 B.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..reference.indexer import FP4_KEY_BYTES
from ..registry import register
from .formats import INTERPRET, e8m0_value
from .norm import as_rows
from .quant import fp4_quantise

HEAD_DIM: tl.constexpr = tl.constexpr(128)
FP4_BLOCK: tl.constexpr = tl.constexpr(32)
RADIX_BITS: tl.constexpr = tl.constexpr(8)
RADIX_BINS: tl.constexpr = tl.constexpr(256)
INT32_MIN: tl.constexpr = tl.constexpr(-2147483648)
# First level of the row-parallel selection: the top 11 bits of the order key (sign, exponent,
# 2 mantissa bits: quarter-octave bins), histogrammed by the scoring kernel.
FIRST_BITS: tl.constexpr = tl.constexpr(11)
FIRST_BINS: tl.constexpr = tl.constexpr(2048)
TWO_POW_126: tl.constexpr = tl.constexpr(2.0 ** 126)
_KEY_ROW_BYTES: tl.constexpr = tl.constexpr(FP4_KEY_BYTES)
PACK_ROWS = 16
MIN_DOT_ROWS = 16
MAX_TILE_ROWS = 128
MAX_SPLITS = 64


@triton.jit
def _mma(a, b):
    if INTERPRET:
        # The interpreter multiplies BF16 operands as raw integers: use the exact FP32 values.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def _prune_scores(configs, nargs, **kw):
    rows = kw["QROWS"] * kw["HEADS_P"]
    return [c for c in configs if rows * c.kwargs["BLOCK_N"] <= 16384] or configs[:1]


@triton.jit
def _score_tiles(qi_ptr, w_ptr, keys_ptr, nv_ptr, scores_ptr, hist_ptr, seq, heads, n_keys,
                 s_qb, s_qs, s_qh, s_wb, s_ws, s_wh, s_kb, s_kn, s_nb, s_ns, s_hist,
                 KEYS_FP4: tl.constexpr, HEADS_P: tl.constexpr, QROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 TILES: tl.constexpr, HIST: tl.constexpr):
    """One scoring program; with ``HIST`` (one query per program) it also adds the histogram of
    its scores' top ``FIRST_BITS`` key bits to the query's row of ``hist_ptr`` (integer atomics:
    exact in any order)."""
    M: tl.constexpr = QROWS * HEADS_P
    pid_n = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    t0 = tl.program_id(1) * QROWS
    m = tl.arange(0, M)
    t = t0 + m // HEADS_P
    h = m % HEADS_P
    q_ok = (t < seq) & (h < heads)
    dcol = tl.arange(0, HEAD_DIM)
    q = tl.load(qi_ptr + b * s_qb + t.to(tl.int64)[:, None] * s_qs + h[:, None] * s_qh + dcol[None, :],
                mask=q_ok[:, None], other=0.0)
    wv = tl.load(w_ptr + b * s_wb + t.to(tl.int64) * s_ws + h * s_wh, mask=q_ok, other=0.0)
    tq = t0 + tl.arange(0, QROWS)
    nv = tl.load(nv_ptr + b * s_nb + tq.to(tl.int64) * s_ns, mask=tq < seq, other=0)
    nv = tl.minimum(tl.maximum(nv, 0), n_keys)
    keys_end = tl.max(nv, axis=0)
    row_base = (b * seq + tq) * n_keys
    for tile in range(TILES):
        start = (pid_n * TILES + tile) * BLOCK_N
        if start < keys_end:
            kidx = start + tl.arange(0, BLOCK_N)
            key_row = keys_ptr + b * s_kb + kidx.to(tl.int64)[:, None] * s_kn
            key_ok = (kidx < keys_end)[:, None]
            if KEYS_FP4:
                kt = _fp4_key_tile(key_row, key_ok, BLOCK_N)
            else:
                kt = tl.load(key_row + dcol[None, :], mask=key_ok, other=0.0)
            logits = _mma(q, tl.trans(kt))
            # relu that keeps NaN (as torch's); padding rows contribute exactly nothing.
            part = tl.where(q_ok[:, None], tl.where(logits < 0, 0.0, logits) * wv[:, None], 0.0)
            score = tl.sum(tl.reshape(part, [QROWS, HEADS_P, BLOCK_N]), axis=1)
            tl.store(scores_ptr + row_base[:, None] + kidx[None, :], score, mask=kidx[None, :] < nv[:, None])
    if HIST:
        # The histogram of the scores just stored, read back in a plain 1-D layout (the
        # scores' own layout derives from the MMA's); the barrier makes every warp's stores
        # visible to the whole program.
        tl.debug_barrier()
        row = b * seq + t0
        kidx = pid_n * TILES * BLOCK_N + tl.arange(0, TILES * BLOCK_N)
        valid = kidx < keys_end
        score = tl.load(scores_ptr + row * n_keys + kidx, mask=valid, other=0.0)
        hist = tl.histogram(_first_digit(_order_key(score)), FIRST_BINS, mask=valid)
        tl.atomic_add(hist_ptr + row * s_hist + tl.arange(0, FIRST_BINS), hist, mask=hist > 0, sem="relaxed")


@autotune(
    configs=[triton.Config({"BLOCK_N": n, "TILES": t}, num_warps=w, num_stages=s) for n, t, w, s in
             ((64, 1, 4, 2), (64, 4, 4, 3), (128, 1, 4, 3), (128, 1, 8, 3), (128, 4, 4, 3), (128, 4, 8, 4),
              (128, 8, 8, 4), (64, 8, 4, 4), (256, 2, 8, 3))],
    key=["HEADS_P", "QROWS", "KEYS_BUCKET", "KEYS_FP4"],
    name="indexer_scores",
    prune_configs_by={"early_config_prune": _prune_scores},
)
@triton.jit
def _scores_kernel(qi_ptr, w_ptr, keys_ptr, nv_ptr, scores_ptr, seq, heads, n_keys, KEYS_BUCKET,
                   s_qb, s_qs, s_qh, s_wb, s_ws, s_wh, s_kb, s_kn, s_nb, s_ns,
                   KEYS_FP4: tl.constexpr, HEADS_P: tl.constexpr, QROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   TILES: tl.constexpr):
    _score_tiles(qi_ptr, w_ptr, keys_ptr, nv_ptr, scores_ptr, scores_ptr, seq, heads, n_keys,
                 s_qb, s_qs, s_qh, s_wb, s_ws, s_wh, s_kb, s_kn, s_nb, s_ns, 0,
                 KEYS_FP4, HEADS_P, QROWS, BLOCK_N, TILES, False)


@autotune(
    configs=[triton.Config({"BLOCK_N": n, "TILES": t}, num_warps=w, num_stages=s) for n, t, w, s in
             ((128, 4, 4, 3), (128, 1, 8, 3), (128, 2, 8, 3), (128, 4, 8, 3), (128, 2, 4, 3), (64, 4, 4, 3),
              (128, 8, 8, 4))],
    key=["HEADS_P", "KEYS_BUCKET", "KEYS_FP4"],
    name="indexer_scores_hist",
    restore_value=["hist_ptr"],  # the timing runs must not add to the histograms
)
@triton.jit
def _scores_hist_kernel(qi_ptr, w_ptr, keys_ptr, nv_ptr, scores_ptr, hist_ptr, seq, heads, n_keys, KEYS_BUCKET,
                        s_qb, s_qs, s_qh, s_wb, s_ws, s_wh, s_kb, s_kn, s_nb, s_ns, s_hist,
                        KEYS_FP4: tl.constexpr, HEADS_P: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr):
    """Program (key tiles, query, batch): scores and the first-level histogram of one query."""
    _score_tiles(qi_ptr, w_ptr, keys_ptr, nv_ptr, scores_ptr, hist_ptr, seq, heads, n_keys,
                 s_qb, s_qs, s_qh, s_wb, s_ws, s_wh, s_kb, s_kn, s_nb, s_ns, s_hist,
                 KEYS_FP4, HEADS_P, 1, BLOCK_N, TILES, True)


@triton.jit
def _shift_left(x, S: tl.constexpr):
    """``x << S``; a right shift for negative ``S`` (the callers mask the sign-filled bits off)."""
    if S >= 0:
        return x << S
    else:
        return x >> (-S)


@triton.jit
def _e2m1_times_2_126(word, NIBBLE: tl.constexpr):
    """FP32 of nibble ``NIBBLE`` of each 32-bit word, as its E2M1 value times 2^-126: the bits
    (c & 7) << 22 | (c & 8) << 28 put e and m in the exponent's low bits and the mantissa's top
    bit (codes 0 and 1 become the subnormals 0 and 2^-127), the sign on top."""
    bits = (_shift_left(word, 22 - 4 * NIBBLE) & 0x01C00000) | (_shift_left(word, 28 - 4 * NIBBLE) & INT32_MIN)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fp4_key_tile(key_row, key_ok, BLOCK_N: tl.constexpr):
    """BF16 ``[BLOCK_N, 128]`` values of FP4 key rows (64 code bytes, then 4 E8M0 scales).

    Codes are read as 32-bit words (8 per word, element 8j + i in nibble i of word j; the
    launcher makes rows 4-byte aligned).  Per element: 3 integer ops (2 shifts, 1 LOP3) for
    the value times 2^-126, one exact multiply by 2^126, one by the block's scale."""
    NBLK: tl.constexpr = HEAD_DIM // FP4_BLOCK
    WORDS: tl.constexpr = FP4_BLOCK // 8  # code words per scale block
    row = key_row[:, :, None]
    ok = key_ok[:, :, None]
    blk = tl.arange(0, NBLK)[None, :, None]
    word = tl.load(row.to(tl.pointer_type(tl.int32)) + blk * WORDS + tl.arange(0, WORDS)[None, None, :],
                   mask=ok, other=0)
    scale = e8m0_value(tl.load(row + HEAD_DIM // 2 + blk, mask=ok, other=127))
    # Two multiplies, not one by scale * 2^126: that product overflows FP32 for scales > 4.
    v0 = _e2m1_times_2_126(word, 0) * TWO_POW_126 * scale
    v1 = _e2m1_times_2_126(word, 1) * TWO_POW_126 * scale
    v2 = _e2m1_times_2_126(word, 2) * TWO_POW_126 * scale
    v3 = _e2m1_times_2_126(word, 3) * TWO_POW_126 * scale
    v4 = _e2m1_times_2_126(word, 4) * TWO_POW_126 * scale
    v5 = _e2m1_times_2_126(word, 5) * TWO_POW_126 * scale
    v6 = _e2m1_times_2_126(word, 6) * TWO_POW_126 * scale
    v7 = _e2m1_times_2_126(word, 7) * TWO_POW_126 * scale
    # A join's new axis is the last: the outermost join picks the lowest bit of the element index.
    values = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(values, [BLOCK_N, HEAD_DIM]).to(tl.bfloat16)


@triton.jit
def _order_key(v):
    """FP32 -> int32 with the same order: NaN (any sign) above +Inf, -0.0 equal to +0.0."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(v != v, 0x7FFFFFFF, key)


@triton.jit
def _first_digit(key):
    """Bin of the first level: the key's top ``FIRST_BITS`` bits, taken signed, shifted to >= 0."""
    return (key >> (32 - FIRST_BITS)) + FIRST_BINS // 2


@triton.jit
def _segment_keys(val_ptr, idx_ptr, offs, n, HAS_IDX: tl.constexpr):
    """Keys, values and validity of segment elements ``offs`` (candidates with index -1 are padding)."""
    ok = offs < n
    if HAS_IDX:
        ok = ok & (tl.load(idx_ptr + offs, mask=ok, other=-1) >= 0)
    v = tl.load(val_ptr + offs, mask=ok, other=0.0)
    return _order_key(v), v, ok


@triton.jit
def _level_histogram(val_ptr, idx_ptr, n, prefix, LEVEL: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of radix digit ``LEVEL`` (0 = the top byte, taken signed) over the elements
    whose higher digits equal ``prefix``."""
    DIGIT_SHIFT: tl.constexpr = 32 - RADIX_BITS * (LEVEL + 1)
    hist = tl.zeros([RADIX_BINS], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        key, v, ok = _segment_keys(val_ptr, idx_ptr, start + tl.arange(0, BLOCK), n, HAS_IDX)
        if LEVEL == 0:
            digit = (key >> DIGIT_SHIFT) + RADIX_BINS // 2  # arithmetic shift: signed top digit
            match = ok
        else:
            digit = (key >> DIGIT_SHIFT) & (RADIX_BINS - 1)
            match = ok & ((key >> (DIGIT_SHIFT + RADIX_BITS)) == prefix)
        hist += tl.histogram(digit, RADIX_BINS, mask=match)
    return hist


@triton.jit
def _pick_bin(hist, remaining, BINS: tl.constexpr):
    """The bin (of ``BINS``) holding the ``remaining``-th largest element, how many are still
    needed from it, and how many it holds."""
    bins = tl.arange(0, BINS)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    digit = tl.max(tl.where(at_or_above >= remaining, bins, 0), axis=0)
    above = tl.sum(tl.where(bins > digit, hist, 0), axis=0)
    count = tl.sum(tl.where(bins == digit, hist, 0), axis=0)
    return digit, remaining - above, count


@triton.jit
def _refine(val_ptr, idx_ptr, n, prefix, remaining, done, LEVEL: tl.constexpr, HAS_IDX: tl.constexpr,
            BLOCK: tl.constexpr):
    """One radix level below ``prefix`` (skipped, state kept, once ``done``)."""
    hist = _level_histogram(val_ptr, idx_ptr, tl.where(done, 0, n), prefix, LEVEL, HAS_IDX, BLOCK)
    digit, rest, count = _pick_bin(hist, remaining, RADIX_BINS)
    # Done when the whole digit is taken: no lower level can split it.
    return (tl.where(done, prefix, prefix * RADIX_BINS + digit), tl.where(done, remaining, rest),
            done | (count == rest))


@triton.jit
def _select_segment(val_ptr, idx_ptr, n, k, first_index, out_idx_ptr, out_val_ptr,
                    HAS_IDX: tl.constexpr, WRITE_VALS: tl.constexpr, BLOCK: tl.constexpr):
    """Top ``min(k, valid)`` of a segment of ``n`` scores, in segment order, then -1 up to ``k``.

    Indices are ``first_index + position`` or, with ``HAS_IDX``, loaded (-1 = padding).
    The threshold key is found one byte at a time (4 levels of 256 bins: ``tl.histogram``
    lowers to a ballot per digit bit and a popcount per 32 bins for every 32 elements, so a
    byte needs 8 popcounts where 11 bits needed 64); the levels stop as soon as the digit
    holding the k-th largest is taken whole.
    """
    # Level 0 is skipped when the segment has at most k elements (all are taken); the
    # lower levels also when the valid elements (padding excluded) are at most k.
    h0 = _level_histogram(val_ptr, idx_ptr, tl.where(n > k, n, 0), 0, 0, HAS_IDX, BLOCK)
    take_all = tl.sum(h0, axis=0) <= k
    d0, remaining, count = _pick_bin(h0, k, RADIX_BINS)
    prefix = d0 - RADIX_BINS // 2
    done = take_all | (count == remaining)
    prefix, remaining, done1 = _refine(val_ptr, idx_ptr, n, prefix, remaining, done, 1, HAS_IDX, BLOCK)
    prefix, remaining, done2 = _refine(val_ptr, idx_ptr, n, prefix, remaining, done1, 2, HAS_IDX, BLOCK)
    prefix, remaining, done3 = _refine(val_ptr, idx_ptr, n, prefix, remaining, done2, 3, HAS_IDX, BLOCK)
    # ``prefix`` holds the digits of the levels run: shift it up to a full key.  Stopped
    # early, every key of that digit is taken: threshold = its lowest key - 1, no ties.
    # Every key is > INT32_MIN (that bit pattern is a NaN, mapped to the top), so
    # INT32_MIN with no ties takes every valid element.
    # (Shifts, not products: every branch of a where is evaluated, and may wrap.)
    lowest = tl.where(done, prefix << 24, tl.where(done1, prefix << 16, tl.where(done2, prefix << 8, prefix)))
    threshold = tl.where(take_all, INT32_MIN, tl.where(done2, tl.maximum(lowest, INT32_MIN + 1) - 1, lowest))
    ties = tl.where(done2, 0, remaining)

    none = tl.zeros_like(ties)  # a tensor: literal 0 would reach _compact's loop as a constant
    taken = _compact(val_ptr, idx_ptr, n, first_index, threshold, ties, none, none, out_idx_ptr, out_val_ptr,
                     HAS_IDX, WRITE_VALS, BLOCK)
    _pad(out_idx_ptr, taken, k, BLOCK)


@triton.jit
def _compact(val_ptr, idx_ptr, n, first_index, threshold, ties, taken, ties_seen, out_idx_ptr, out_val_ptr,
             HAS_IDX: tl.constexpr, WRITE_VALS: tl.constexpr, BLOCK: tl.constexpr):
    """Write, in order, the elements above ``threshold`` and the ties ranked ``<= ties``
    (``ties_seen`` of them came before), from output position ``taken``; returns the new count."""
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key, v, ok = _segment_keys(val_ptr, idx_ptr, offs, n, HAS_IDX)
        if HAS_IDX:
            idx = tl.load(idx_ptr + offs, mask=ok, other=-1)
        else:
            idx = first_index + offs
        tie = ok & (key == threshold)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0)
        take = (ok & (key > threshold)) | (tie & (tie_rank <= ties))
        pos = taken + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out_idx_ptr + pos, idx, mask=take)
        if WRITE_VALS:
            tl.store(out_val_ptr + pos, v, mask=take)
        taken += tl.sum(take.to(tl.int32), axis=0)
        ties_seen += tl.sum(tie.to(tl.int32), axis=0)
    return taken


@triton.jit
def _pad(out_idx_ptr, taken, k, BLOCK: tl.constexpr):
    """-1 in output positions ``[taken, k)``."""
    for start in range(taken, k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(out_idx_ptr + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < k)


_SELECT_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in
                   ((1024, 4), (1024, 8), (2048, 8), (4096, 8), (4096, 16), (8192, 16))]


@autotune(configs=_SELECT_CONFIGS, key=["N_BUCKET", "K_BUCKET"], name="indexer_select")
@triton.jit
def _select_kernel(scores_ptr, nv_ptr, out_idx_ptr, out_val_ptr, seq, n_keys, k, chunk, N_BUCKET, K_BUCKET,
                   s_nb, s_ns, WRITE_VALS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): top-k of the row's scores ``[split * chunk, ...)`` below ``n_valid``."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = row // seq
    nv = tl.load(nv_ptr + b * s_nb + (row - b * seq) * s_ns)
    nv = tl.minimum(tl.maximum(nv, 0), n_keys)
    first = split * chunk
    n = tl.maximum(tl.minimum(first + chunk, nv) - first, 0)
    out = (row * tl.num_programs(1) + split) * k
    _select_segment(scores_ptr + row * n_keys + first, out_idx_ptr, n, k, first, out_idx_ptr + out,
                    out_val_ptr + out, False, WRITE_VALS, BLOCK)


@autotune(configs=_SELECT_CONFIGS, key=["N_BUCKET", "K_BUCKET"], name="indexer_merge")
@triton.jit
def _merge_kernel(cand_val_ptr, cand_idx_ptr, out_ptr, k, n_cand, N_BUCKET, K_BUCKET, BLOCK: tl.constexpr):
    """Program (row): top-k among the row's segment candidates (ascending index order kept)."""
    row = tl.program_id(0).to(tl.int64)
    _select_segment(cand_val_ptr + row * n_cand, cand_idx_ptr + row * n_cand, n_cand, k, 0, out_ptr + row * k,
                    out_ptr, True, False, BLOCK)


# --- Row-parallel selection (few long rows) -----------------------------------------------
# Three launches, every SM busy in the first two:
# 1. ``_scores_hist_kernel``: the scores, and each row's histogram of the top 11 key bits
#    (2048 quarter-octave bins) added by integer atomics into a zeroed workspace.
# 2. ``_survivor_kernel`` (row, part): every chunk replays the pick of the first level (the
#    bin holding the k-th largest) from the histogram and copies its survivors (keys in that
#    bin or above: the selection is among them) into the row's survivor buffer, at an offset
#    taken from the row's counter by one atomic per chunk; the chunk's run stays in index order.
# 3. ``_survivor_select_kernel`` (row): the exact cut key among the survivors by radix levels
#    (8, 8, 5 bits below the first level), then one pass of running (above, tied) counts in
#    buffer order and one that writes each taken index at its slot: the taken ones of lower
#    index are those of the chunks before its own (per-chunk sums) and those before it in its
#    run, ties taken lowest index first; pads with -1, and zeroes the row's histogram and
#    counter for the next call.
# Rows whose survivors exceed the buffer (a first-level bin holding more than ``survivor_cap``
# of the top: many equal or near-equal scores) are selected in launch 3 by one program over
# the whole row (``_select_segment``): exact, slower.
#
# Workspace invariant: ``zeroed`` (per row: FIRST_BINS counts, then the survivor counter) is
# zero when a call starts; allocated zeroed, every call leaves it zeroed.  One workspace per
# stream: calls on one stream run in order, so they never overlap on it.

ROW_PARALLEL_BLOCK = 1024
ROW_PARALLEL_WARPS = 4
SURVIVOR_BLOCK = 4096
SURVIVOR_WARPS = 16
SURVIVOR_CAP = 16384
MAX_SURVIVOR_CAP = 32767  # running (above, tied) counts share one int32, 16 bits each
MAX_PARTS: tl.constexpr = tl.constexpr(1024)


@triton.jit
def _first_level(row_ws, k):
    """From a row's first-level histogram: (take_all, bin d0 holding the k-th largest, how many
    are still needed from it, how many it holds, survivors = keys in d0 or above)."""
    hist = tl.load(row_ws + tl.arange(0, FIRST_BINS))
    take_all = tl.sum(hist, axis=0) <= k
    d0, remaining, count = _pick_bin(hist, k, FIRST_BINS)
    return take_all, d0, remaining, count, k - remaining + count


@triton.jit
def _row_chunk(nv_ptr, seq, n_keys, chunk, s_nb, s_ns):
    """(row, first index, length) of this program's chunk of valid scores."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    nv = tl.load(nv_ptr + b * s_nb + (row - b * seq) * s_ns)
    nv = tl.minimum(tl.maximum(nv, 0), n_keys)
    first = tl.program_id(1) * chunk
    return row, first, tl.maximum(tl.minimum(first + chunk, nv) - first, 0)


@triton.jit
def _survivor_kernel(scores_ptr, nv_ptr, zeroed_ptr, scratch_ptr, seq, n_keys, k, chunk, cap, s_zero, s_scratch,
                     s_nb, s_ns, BLOCK: tl.constexpr):
    """Program (row, part): copy the chunk's survivors (key, index) to the row's buffer, in
    index order from an offset reserved on the row's counter; record (offset, count)."""
    row, first, n = _row_chunk(nv_ptr, seq, n_keys, chunk, s_nb, s_ns)
    row_ws = zeroed_ptr + row * s_zero
    take_all, d0, remaining, count, survivors = _first_level(row_ws, k)
    n = tl.where(take_all | (survivors > cap), 0, n)
    vals = scores_ptr + row * n_keys + first
    found = 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key = _order_key(tl.load(vals + offs, mask=offs < n, other=0.0))
        found += tl.sum(((offs < n) & (_first_digit(key) >= d0)).to(tl.int32), axis=0)
    base = tl.atomic_add(row_ws + FIRST_BINS, found, sem="relaxed")
    row_scratch = scratch_ptr + row * s_scratch
    written = base
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key = _order_key(tl.load(vals + offs, mask=offs < n, other=0.0))
        keep = (offs < n) & (_first_digit(key) >= d0)
        pos = written + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(row_scratch + pos, key, mask=keep)
        tl.store(row_scratch + cap + pos, first + offs, mask=keep)
        written += tl.sum(keep.to(tl.int32), axis=0)
    runs = row_scratch + 3 * cap + 2 * tl.program_id(1)
    tl.store(runs, base)
    tl.store(runs + 1, found)


@triton.jit
def _survivor_level(key_ptr, n, prefix, remaining, done, SHIFT: tl.constexpr, BITS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """One radix level over the survivors whose key bits above ``SHIFT + BITS`` equal
    ``prefix``, on the ``BITS`` bits at ``SHIFT``.  Returns (the key's bits from ``SHIFT`` up,
    remaining, done).  A level skipped once ``done`` appends a zero digit, so the last
    level's prefix is the lowest key of the digit where the levels stopped."""
    hist = tl.zeros([RADIX_BINS], dtype=tl.int32)
    for start in range(0, tl.where(done, 0, n), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key = tl.load(key_ptr + offs, mask=offs < n, other=0)
        match = (offs < n) & ((key >> (SHIFT + BITS)) == prefix)
        hist += tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), RADIX_BINS, mask=match)
    # Skipped: an empty histogram picks digit 0 and leaves ``remaining`` as it is.
    digit, rest, count = _pick_bin(hist, remaining, RADIX_BINS)
    return (prefix << BITS) + digit, rest, done | (count == rest)


@triton.jit
def _survivor_cut(key_ptr, n, d0, remaining, count, BLOCK: tl.constexpr):
    """(cut key, ties): the selection is every survivor with ``key > cut`` and the ``ties``
    lowest-index ones with ``key == cut``."""
    # Level 0 was the first level (the top 11 key bits); then 8, 8 and 5 key bits.
    done = count == remaining
    p1, remaining, done = _survivor_level(key_ptr, n, d0 - FIRST_BINS // 2, remaining, done, 13, 8, BLOCK)
    p2, remaining, done = _survivor_level(key_ptr, n, p1, remaining, done, 5, 8, BLOCK)
    cut, remaining, done = _survivor_level(key_ptr, n, p2, remaining, done, 0, 5, BLOCK)
    # Stopped early, the whole digit is taken: every key from its lowest (``cut``) up.
    return cut, tl.where(done, 2147483647, remaining)


@triton.jit
def _survivor_flags(key_ptr, offs, n, cut):
    """Above the cut, and tied with it, packed as ``above + (tie << 16)`` (survivor counts
    stay below 2^16, so running sums of both fit one int32)."""
    key = tl.load(key_ptr + offs, mask=offs < n, other=0)
    return tl.where(offs < n, (key > cut).to(tl.int32) + ((key == cut).to(tl.int32) << 16), 0)


@triton.jit
def _survivor_select_kernel(scores_ptr, nv_ptr, zeroed_ptr, scratch_ptr, out_ptr, seq, n_keys, k, chunk, cap,
                            s_zero, s_scratch, s_nb, s_ns, PARTS_P: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row): the row's selection from its survivors (ascending indices, -1 padding),
    then its histogram and counter back to zero."""
    row, first, nv = _row_chunk(nv_ptr, seq, n_keys, n_keys, s_nb, s_ns)
    parts = tl.cdiv(n_keys, chunk)
    row_ws = zeroed_ptr + row * s_zero
    take_all, d0, remaining, count, survivors = _first_level(row_ws, k)
    out_row = out_ptr + row * k
    row_scratch = scratch_ptr + row * s_scratch
    key_ptr = row_scratch
    idx_ptr = row_scratch + cap
    cum_ptr = row_scratch + 2 * cap
    runs_ptr = row_scratch + 3 * cap
    before_ptr = runs_ptr + 2 * MAX_PARTS
    start_ptr = before_ptr + MAX_PARTS
    if take_all:
        # At most k valid scores: all of them, in order.
        for start in range(0, nv, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(out_row + offs, offs, mask=offs < nv)
        _pad(out_row, nv, k, BLOCK)
    elif survivors > cap:
        _select_segment(scores_ptr + row * n_keys, scores_ptr, nv, k, 0, out_row, out_row, False, False, BLOCK)
    else:
        cut, ties = _survivor_cut(key_ptr, survivors, d0, remaining, count, BLOCK)
        # Running (above, tied) counts in buffer order.
        total = 0
        for start in range(0, survivors, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            flags = _survivor_flags(key_ptr, offs, survivors, cut)
            tl.store(cum_ptr + offs, total + tl.cumsum(flags, axis=0), mask=offs < survivors)
            total += tl.sum(flags, axis=0)
        tl.debug_barrier()
        # Chunk c's run [base, base + found) is in index order; the runs of the chunks before
        # it (in index order) hold ``before[c]`` (above, tied) survivors.
        p = tl.arange(0, PARTS_P)
        has = p < parts
        base = tl.load(runs_ptr + 2 * p, mask=has, other=0)
        found = tl.load(runs_ptr + 2 * p + 1, mask=has, other=0)
        run_start = tl.load(cum_ptr + base - 1, mask=has & (found > 0) & (base > 0), other=0)
        run_end = tl.load(cum_ptr + base + found - 1, mask=has & (found > 0), other=0)
        run = tl.where(found > 0, run_end - run_start, 0)
        tl.store(before_ptr + p, tl.cumsum(run, axis=0) - run, mask=has)
        tl.store(start_ptr + p, run_start, mask=has)
        tl.debug_barrier()
        # Each survivor's output slot: the taken ones with lower indices, i.e. those above the
        # cut plus the first ``ties`` tied ones.
        for start in range(0, survivors, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < survivors
            idx = tl.load(idx_ptr + offs, mask=ok, other=0)
            flags = _survivor_flags(key_ptr, offs, survivors, cut)
            c = idx // chunk
            lower = tl.load(before_ptr + c, mask=ok, other=0)
            in_run = tl.load(cum_ptr + offs, mask=ok, other=0)
            own_start = tl.load(start_ptr + c, mask=ok, other=0)
            above_lower = (lower & 0xFFFF) + (in_run & 0xFFFF) - (own_start & 0xFFFF) - (flags & 0xFFFF)
            tied_lower = (lower >> 16) + (in_run >> 16) - (own_start >> 16) - (flags >> 16)
            take = ((flags & 0xFFFF) > 0) | (((flags >> 16) > 0) & (tied_lower < ties))
            tl.store(out_row + above_lower + tl.minimum(tied_lower, ties), idx, mask=ok & take)
        _pad(out_row, (total & 0xFFFF) + tl.minimum(total >> 16, ties), k, BLOCK)
    # Every program of launch 2 has read the histogram (this launch follows it): zero it and
    # the counter for the next call.
    tl.debug_barrier()
    tl.store(row_ws + tl.arange(0, FIRST_BINS), tl.zeros([FIRST_BINS], dtype=tl.int32))
    tl.store(row_ws + FIRST_BINS, 0)


_workspaces: dict = {}


def _workspace(device: torch.device, rows: int, cap: int):
    """(zeroed, scratch) for the current stream of ``device``: ``zeroed`` int32
    ``[rows, FIRST_BINS + 1]`` (zero between calls, see the invariant above), ``scratch`` int32
    ``[rows, 3 * cap + 4 * MAX_PARTS]`` (survivor keys, indices, running counts, then per chunk
    its run's (offset, count), the counts before it and at its start).  Grown to the largest
    call seen, never shrunk, so the decode hot path allocates nothing."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    have = _workspaces.get(key)
    width = 3 * cap + 4 * MAX_PARTS.value
    if have is None or have[0].shape[0] < rows or have[1].shape[1] < width:
        rows = max(rows, have[0].shape[0] if have is not None else 0)
        width = max(width, have[1].shape[1] if have is not None else 0)
        have = (torch.zeros(rows, FIRST_BINS.value + 1, dtype=torch.int32, device=device),
                torch.empty(rows, width, dtype=torch.int32, device=device))
        _workspaces[key] = have
    return have


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: enough to exercise split rows in tests
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(rows: int, n_keys: int, k: int, device: torch.device) -> int:
    """Segments per row: enough programs to fill the GPU, but a segment at least ~sqrt(Nk k)
    long, which balances the segment pass (Nk / splits) against the merge (splits * k)."""
    if n_keys <= 2 * k:
        return 1
    by_balance = int(math.sqrt(n_keys / k))
    by_occupancy = -(-2 * _sm_count(device) // rows)
    return max(1, min(by_balance, by_occupancy, MAX_SPLITS))


def _aligned_keys(keys: torch.Tensor) -> torch.Tensor:
    """Keys with a unit last stride; FP4 rows also 4-byte aligned (read as 32-bit code words)."""
    misaligned = keys.dtype == torch.uint8 and (keys.data_ptr() % 4 or keys.stride(0) % 4 or keys.stride(1) % 4)
    if keys.stride(-1) != 1 or misaligned:
        return keys.clone(memory_format=torch.contiguous_format)
    return keys


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _query_rows(heads: int, seq: int) -> int:
    """Queries per scoring program: all heads of each, at least 16 rows, at most 128 when
    the sequence has that many queries to share a key tile."""
    heads_p = triton.next_power_of_2(heads)
    return max(MIN_DOT_ROWS // heads_p, min(triton.next_power_of_2(seq), max(1, MAX_TILE_ROWS // heads_p)))


def indexer_scores(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """The scoring pass alone: FP32 ``[B*S, Nk]``, row ``b*S + t`` holds query (b, t)'s scores of
    entries ``s < n_valid[b, t]`` (the rest of the row is not written)."""
    bsz, seq, heads, _ = qi.shape
    n_keys = keys.shape[1]
    scores = torch.empty(bsz * seq, n_keys, dtype=torch.float32, device=qi.device)
    if scores.numel() == 0:
        return scores
    if qi.stride(-1) != 1:
        qi = qi.contiguous()
    keys = _aligned_keys(keys)
    qrows = _query_rows(heads, seq)
    grid = lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"] * meta["TILES"]), triton.cdiv(seq, qrows), bsz)
    _scores_kernel[grid](qi, w, keys, n_valid, scores, seq, heads, n_keys, _bucket(n_keys),
                         qi.stride(0), qi.stride(1), qi.stride(2), *w.stride(), keys.stride(0), keys.stride(1),
                         *n_valid.stride(), KEYS_FP4=keys.dtype == torch.uint8, HEADS_P=triton.next_power_of_2(heads),
                         QROWS=qrows)
    return scores


def _output_and_scores(qi, w, keys, n_valid, k: int):
    """The [B, S, k] index output and the FP32 scores [B*S, Nk]; scores is None when there is
    nothing to select (no rows: the empty output; no keys: every slot -1)."""
    bsz, seq = qi.shape[:2]
    out = torch.empty(bsz, seq, k, dtype=torch.int32, device=qi.device)
    if bsz * seq == 0:
        return out, None
    if keys.shape[1] == 0:
        return out.fill_(-1), None
    return out, indexer_scores(qi, w, keys, n_valid)


def indexer_topk_splits(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                        k: int, splits: int) -> torch.Tensor:
    """``indexer_topk`` with an explicit number of segments per row (1 = no merge launch)."""
    out, scores = _output_and_scores(qi, w, keys, n_valid, k)
    if scores is None:
        return out
    rows, n_keys = scores.shape
    seq = qi.shape[1]
    splits = max(1, min(splits, triton.cdiv(n_keys, k)))
    chunk = triton.cdiv(n_keys, splits)
    if splits == 1:
        _select_kernel[(rows, 1)](scores, n_valid, out, out, seq, n_keys, k, chunk, _bucket(chunk), _bucket(k),
                                  *n_valid.stride(), WRITE_VALS=False)
        return out
    cand_idx = torch.empty(rows, splits * k, dtype=torch.int32, device=qi.device)
    cand_val = torch.empty(rows, splits * k, dtype=torch.float32, device=qi.device)
    _select_kernel[(rows, splits)](scores, n_valid, cand_idx, cand_val, seq, n_keys, k, chunk, _bucket(chunk),
                                   _bucket(k), *n_valid.stride(), WRITE_VALS=True)
    _merge_kernel[(rows,)](cand_val, cand_idx, out, k, splits * k, _bucket(splits * k), _bucket(k))
    return out


def plan_parts(rows: int, n_keys: int, k: int, device: torch.device) -> int:
    """Chunks per row for the row-parallel selection (0: rows are too many or too short for
    it, or k too large for the survivor buffer).  About four programs per SM in all, each
    chunk at least one block long."""
    sms = _sm_count(device)
    if rows >= sms or n_keys < 8 * k or 4 * k > SURVIVOR_CAP:
        return 0
    return max(2, min(triton.cdiv(n_keys, ROW_PARALLEL_BLOCK), triton.cdiv(4 * sms, rows), MAX_PARTS.value))


def _scores_and_histogram(qi, w, keys, n_valid, zeroed):
    """``indexer_scores`` that also adds each row's first-level histogram into ``zeroed``.
    One query per program (``HEADS_P`` at least 16 rows for the tensor cores)."""
    bsz, seq, heads, _ = qi.shape
    n_keys = keys.shape[1]
    scores = torch.empty(bsz * seq, n_keys, dtype=torch.float32, device=qi.device)
    if qi.stride(-1) != 1:
        qi = qi.contiguous()
    keys = _aligned_keys(keys)
    grid = lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"] * meta["TILES"]), seq, bsz)
    _scores_hist_kernel[grid](qi, w, keys, n_valid, scores, zeroed, seq, heads, n_keys, _bucket(n_keys),
                              qi.stride(0), qi.stride(1), qi.stride(2), *w.stride(), keys.stride(0), keys.stride(1),
                              *n_valid.stride(), zeroed.stride(0), KEYS_FP4=keys.dtype == torch.uint8,
                              HEADS_P=max(MIN_DOT_ROWS, triton.next_power_of_2(heads)))
    return scores


def indexer_topk_parts(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                       k: int, parts: int, survivor_cap: int = SURVIVOR_CAP) -> torch.Tensor:
    """``indexer_topk`` by the row-parallel selection with ``parts`` chunks per row (at most
    ``MAX_PARTS``) and a survivor buffer of ``survivor_cap`` per row: 3 launches."""
    if not 1 <= survivor_cap <= MAX_SURVIVOR_CAP:
        raise ValueError(f"survivor_cap: expected 1..{MAX_SURVIVOR_CAP}, got {survivor_cap}")
    bsz, seq = qi.shape[:2]
    rows, n_keys = bsz * seq, keys.shape[1]
    out = torch.empty(bsz, seq, k, dtype=torch.int32, device=qi.device)
    if rows == 0:
        return out
    if n_keys == 0:
        return out.fill_(-1)
    zeroed, scratch = _workspace(qi.device, rows, survivor_cap)
    scores = _scores_and_histogram(qi, w, keys, n_valid, zeroed)
    chunk = triton.cdiv(n_keys, max(1, min(parts, n_keys, MAX_PARTS.value)))
    _collect_survivors(scores, n_valid, zeroed, scratch, seq, k, chunk, survivor_cap)
    _select_survivors(scores, n_valid, zeroed, scratch, out, seq, k, chunk, survivor_cap)
    return out


def _collect_survivors(scores, n_valid, zeroed, scratch, seq: int, k: int, chunk: int, cap: int) -> None:
    rows, n_keys = scores.shape
    _survivor_kernel[(rows, triton.cdiv(n_keys, chunk))](
        scores, n_valid, zeroed, scratch, seq, n_keys, k, chunk, cap, zeroed.stride(0), scratch.stride(0),
        *n_valid.stride(), BLOCK=ROW_PARALLEL_BLOCK, num_warps=ROW_PARALLEL_WARPS)


def _select_survivors(scores, n_valid, zeroed, scratch, out, seq: int, k: int, chunk: int, cap: int) -> None:
    rows, n_keys = scores.shape
    _survivor_select_kernel[(rows,)](
        scores, n_valid, zeroed, scratch, out, seq, n_keys, k, chunk, cap, zeroed.stride(0), scratch.stride(0),
        *n_valid.stride(), PARTS_P=triton.next_power_of_2(triton.cdiv(n_keys, chunk)), BLOCK=SURVIVOR_BLOCK,
        num_warps=SURVIVOR_WARPS)


@register("indexer_topk", "triton")
def indexer_topk(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                 k: int) -> torch.Tensor:
    rows = qi.shape[0] * qi.shape[1]
    parts = plan_parts(rows, keys.shape[1], k, qi.device)
    if parts:
        return indexer_topk_parts(qi, w, keys, n_valid, k, parts)
    return indexer_topk_splits(qi, w, keys, n_valid, k, plan_splits(rows, keys.shape[1], k, qi.device))


@triton.jit
def _pack_keys_kernel(x_ptr, out_ptr, n_rows, stride_x, ROWS: tl.constexpr):
    """FP4 key rows: per row of 128 values, 64 code bytes then 4 E8M0 scale bytes."""
    NBLK: tl.constexpr = HEAD_DIM // FP4_BLOCK
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = row < n_rows
    blk = tl.arange(0, ROWS * NBLK)
    blk_row = tl.program_id(0).to(tl.int64) * ROWS + blk // NBLK
    blk_ok = blk_row < n_rows
    x = tl.load(x_ptr + blk_row[:, None] * stride_x + (blk % NBLK)[:, None] * FP4_BLOCK
                + tl.arange(0, FP4_BLOCK)[None, :], mask=blk_ok[:, None], other=0.0).to(tl.float32)
    codes, e, invalid = fp4_quantise(x)
    lo, hi = tl.split(tl.reshape(codes, [ROWS, HEAD_DIM // 2, 2]))
    tl.store(out_ptr + row[:, None] * _KEY_ROW_BYTES + tl.arange(0, HEAD_DIM // 2)[None, :],
             (lo | (hi << 4)).to(tl.uint8), mask=ok[:, None])
    tl.store(out_ptr + blk_row * _KEY_ROW_BYTES + HEAD_DIM // 2 + blk % NBLK,
             tl.where(invalid, 255, e + 127).to(tl.uint8), mask=blk_ok)


@register("pack_indexer_keys", "triton")
def pack_indexer_keys(keys: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*keys.shape[:-1], FP4_KEY_BYTES, dtype=torch.uint8, device=keys.device)
    rows = out.numel() // FP4_KEY_BYTES
    if rows == 0:
        return out
    x = as_rows(keys)
    _pack_keys_kernel[(triton.cdiv(rows, PACK_ROWS),)](x, out, rows, x.stride(0), ROWS=PACK_ROWS)
    return out
