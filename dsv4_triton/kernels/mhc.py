"""Triton mHC kernels: hc_pre / hc_head (one launch at decode sizes, else three) and hc_post (one pass).

hc_pre and hc_head
------------------
Per token the 24 (head: 4) mixes ``fn @ flatten(X)`` need the whole row of 4*dim values
before ``pre`` is known, and ``y = sum_i pre_i X_i`` needs the row again.  A row of 57 KB
(dim 7168) cannot stay on chip while enough tokens share one read of ``fn`` (2.7 MB), so
the work is split in launches with no waiting between programs:

* ``_split_fn_kernel`` (more than 64 tokens): fn as three BF16 parts hi + mid + lo, each
  ``[4*dim, N_PAD]`` with the columns in partial-row order.  With BF16 X every product with a
  part is exact and the FP32 sum of the three is as accurate as an FP32 dot.
* ``_mix_partial_kernel``, program ``(tile, split)``: ``BLOCK_T`` tokens times one stream's
  slice ``d in [d_lo, d_lo + CHUNK)`` (one contiguous run per token: runs a quarter as long,
  one per stream, streamed X at half the rate), multiplied by the matching rows of the parts
  (``tl.dot``), plus the sum of squares; it writes this partial row (``N_PAD`` floats per
  token and split) to a workspace.  With the parts prepared, both operands reach the sm_90
  warp-group MMA by asynchronous copies into shared memory, as in a plain GEMM.  Up to 64
  tokens (``SPLIT_IN_LOOP``), where the extra launch would cost more than it saves, fn is
  split inside the loop instead; there every k-step runs load -> split -> shared-memory
  store -> fence -> MMA -> wait in series, which measured 2.4x slower at 4096 tokens.
* ``_finalise_y_kernel``, program ``(tile, column block)``: sums the partials in split order
  (deterministic), applies rsqrt / sigmoid and writes ``y = sum_i pre_i X_i`` for its block
  of columns; for hc_pre one more program per tile does the Sinkhorn and writes post and
  comb, so the y programs stay at ~100 registers.  Tiles run in reverse order: the mix
  kernel's last tiles are the most likely to still be in L2.  (Sinkhorn divides with IEEE
  rounding, ``div_rn``, as the oracle does.)

Decode sizes (up to 64 tokens) run both passes in one launch, ``_decode_kernel``: its first
programs are the mix programs (fn split in the loop), the rest one token's y block (hc_pre:
or its Sinkhorn) each, which wait on a counter for every mix program.  They wait only on
lower linear ids, which are dispatched first, so the wait always ends; a y program's X loads
go out before it waits, and one load after it brings every split's partial row of its token
(``MAX_DECODE_SPLITS``).  The last program to finish zeroes the counters for the next launch.

X is read twice (the second time partly from L2).  Two earlier one-launch forms measured slower
(benchmarks/NOTES.md): all programs of a tile waiting for each other on a counter so that
each re-reads its slice from L2 (programs sat waiting for siblings dispatched later), and,
for decode sizes, the tile's last program writing all of the tile's y (one program's
serial loop over the row: 56 us at one token against 14.5 us for two launches).
Partial-row layout: columns ``0..3`` are the pre mixes and column ``SSQ_COL = 4`` the sum of
squares (one 32-byte sector: all that the y programs read), then the remaining mixes
(post, comb).

hc_post
-------
``X'_j = post_j F + sum_i comb[i][j] X_i``: one read of F and X, one write, FP32 math.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

from ..autotune import autotune, token_bucket
from ..registry import register
from .formats import cast_rne, dot_bf16, to_f32
from .sync import splits_after_wait

HC_MULT = 4
STREAMS = tl.constexpr(HC_MULT)  # the same, readable inside kernels
N_MIX_PRE = 24
N_MIX_HEAD = 4
SSQ_COL = tl.constexpr(4)  # partial-row column of the sum of squares (after the 4 pre mixes)
SPLIT_BLOCK = tl.constexpr(16)  # partial rows the y programs load at once
SPLIT_BLOCK_K = 256  # fn columns per program of the split kernel

_MIX_CONFIGS = [  # (BLOCK_T, CHUNK, BLOCK_K, num_warps, num_stages); the first one serves every shape
    (16, 256, 64, 4, 3), (16, 512, 64, 4, 3), (32, 256, 64, 4, 3), (64, 1024, 64, 4, 4), (64, 512, 64, 4, 4),
    (128, 1024, 64, 8, 3), (128, 512, 64, 8, 3), (32, 1024, 64, 4, 4), (64, 2048, 64, 4, 4), (64, 1024, 64, 4, 6),
]
SPLIT_IN_LOOP_MAX_T = 64  # up to this many tokens fn is split inside the mix loop (no extra launch)
MAX_DECODE_SPLITS = tl.constexpr(128)  # partial rows per token the one-launch decode form sums in one load
_Y_CONFIGS = [  # (BLOCK_T, BLOCK_D, num_warps): 4096 or 8192 X elements per stream and program
    (16, 256, 4), (1, 1024, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 8),
]


def _min_chunk(t_bucket: int) -> int:
    """Narrowest slice (columns of one stream) tuned for a token bucket: the partial rows
    (128 B per token and split) must stay small next to the X they summarise (2 * CHUNK bytes
    per token)."""
    return 256 if t_bucket <= 64 else 512


def _prune_mix_configs(configs, nargs, **kw):
    t_cap = nargs["t_bucket"]
    dim_cap = max(64, triton.next_power_of_2(nargs["dim"]))
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= t_cap and _min_chunk(t_cap) <= c.kwargs["CHUNK"] <= dim_cap]
    return kept or configs[:1]


def _prune_y_configs(configs, nargs, **kw):
    t_cap = nargs["t_bucket"]
    dim_cap = max(256, triton.next_power_of_2(nargs["dim"]))
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= t_cap and c.kwargs["BLOCK_D"] <= dim_cap]
    return kept or configs[:1]


@triton.jit
def _fn_column_rows(N_MIX: tl.constexpr, N_PAD: tl.constexpr):
    """Partial-row column c holds fn row c for c < SSQ_COL and fn row c - 1 above it; column
    SSQ_COL has no fn row (it gets the sum of squares).  -> (fn row per column, live mask)."""
    col = tl.arange(0, N_PAD)
    fn_row = tl.where(col < SSQ_COL, col, col - 1)
    return fn_row, (col != SSQ_COL) & (fn_row < N_MIX)


@triton.jit
def _split_fn_part(f):
    """fp32 -> three BF16 parts whose FP32 sum is f to 2^-24 relative (each step exact)."""
    f_hi = f.to(tl.bfloat16)
    r = f - to_f32(f_hi)  # exact, whatever rounding the conversion used
    f_mid = r.to(tl.bfloat16)
    f_lo = (r - to_f32(f_mid)).to(tl.bfloat16)
    return f_hi, f_mid, f_lo


@triton.jit
def _split_fn_kernel(fn_ptr, parts_ptr, K, N_MIX: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    fn_row, fn_live = _fn_column_rows(N_MIX, N_PAD)
    live = k < K
    f = tl.load(fn_ptr + fn_row[None, :].to(tl.int64) * K + k[:, None], mask=live[:, None] & fn_live[None, :],
                other=0.0)
    f_hi, f_mid, f_lo = _split_fn_part(f)
    out = parts_ptr + k[:, None].to(tl.int64) * N_PAD + tl.arange(0, N_PAD)[None, :]
    part_stride = tl.full([], N_PAD, tl.int64) * K
    tl.store(out, f_hi, mask=live[:, None])
    tl.store(out + part_stride, f_mid, mask=live[:, None])
    tl.store(out + 2 * part_stride, f_lo, mask=live[:, None])


@triton.jit
def _mix_partial_kernel(x_ptr, fn_ptr, parts_ptr, part_ptr, T, dim, stride_xt, stride_xs, t_bucket,
                        N_MIX: tl.constexpr, N_PAD: tl.constexpr, SPLIT_IN_LOOP: tl.constexpr,
                        BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
    _mix_partial(tl.program_id(0), x_ptr, fn_ptr, parts_ptr, part_ptr, T, dim, stride_xt, stride_xs, N_MIX, N_PAD,
                 SPLIT_IN_LOOP, BLOCK_T, CHUNK, BLOCK_K)


@triton.jit
def _mix_partial(pid, x_ptr, fn_ptr, parts_ptr, part_ptr, T, dim, stride_xt, stride_xs, N_MIX: tl.constexpr,
                 N_PAD: tl.constexpr, SPLIT_IN_LOOP: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # A split is one stream's columns [d_lo, d_lo + CHUNK): each token's slice is one
    # contiguous run of 2*CHUNK bytes (runs of 512 B and more stream near the copy rate;
    # four runs of a quarter of that, one per stream, measured 1.6x slower).
    n_d = tl.cdiv(dim, CHUNK)
    n_splits = STREAMS * n_d
    # Consecutive programs share a tile: the last programs read the last tiles, which the
    # y kernel (reverse order) reads first.
    tile = pid // n_splits
    split = pid % n_splits
    stream = split // n_d
    rows = tl.arange(0, BLOCK_T)
    tok = (tile * BLOCK_T + rows).to(tl.int64)
    live = tok < T
    d_lo = (split % n_d) * CHUNK
    col = tl.arange(0, N_PAD)
    fn_row, fn_live = _fn_column_rows(N_MIX, N_PAD)
    part_stride = tl.full([], STREAMS * N_PAD, tl.int64) * dim
    acc_hi = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
    squares = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)  # reduced once, after the loop
    for kk in range(0, CHUNK, BLOCK_K):
        d = d_lo + kk + tl.arange(0, BLOCK_K)
        d_live = d < dim
        x = tl.load(x_ptr + tok[:, None] * stride_xt + stream * stride_xs + d[None, :],
                    mask=live[:, None] & d_live[None, :], other=0.0)
        if SPLIT_IN_LOOP:
            f = tl.load(fn_ptr + fn_row[None, :].to(tl.int64) * (STREAMS * dim) + stream * dim + d[:, None],
                        mask=d_live[:, None] & fn_live[None, :], other=0.0)
            f_hi, f_mid, f_lo = _split_fn_part(f)
        else:
            p = parts_ptr + (stream * dim + d)[:, None].to(tl.int64) * N_PAD + col[None, :]
            f_hi = tl.load(p, mask=d_live[:, None], other=0.0)
            f_mid = tl.load(p + part_stride, mask=d_live[:, None], other=0.0)
            f_lo = tl.load(p + 2 * part_stride, mask=d_live[:, None], other=0.0)
        acc_hi = dot_bf16(x, f_hi, acc_hi)
        acc_lo = dot_bf16(x, f_mid, acc_lo)
        acc_lo = dot_bf16(x, f_lo, acc_lo)
        xf = to_f32(x)
        squares += xf * xf
    ssq = tl.sum(squares, axis=1)
    part = tl.where(col[None, :] == SSQ_COL, ssq[:, None], acc_hi + acc_lo)
    tl.store(part_ptr + (split * T + tok)[:, None] * N_PAD + col[None, :], part,
             mask=live[:, None] & (col <= N_MIX)[None, :])


@triton.jit
def _partial_sums(part_ptr, tok, live, n_splits, T, COL: tl.constexpr, WIDTH: tl.constexpr, N_PAD: tl.constexpr):
    """Sum over splits of partial-row columns ``COL .. COL + WIDTH - 1`` -> [BLOCK_T, WIDTH]
    (blocks of SPLIT_BLOCK splits in a fixed order: deterministic)."""
    cols = COL + tl.arange(0, WIDTH)
    acc = tl.zeros([tok.shape[0], WIDTH], dtype=tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        row_ptr = part_ptr + (s[:, None].to(tl.int64) * T + tok[None, :]) * N_PAD  # [SPLIT_BLOCK, BLOCK_T]
        m = (s < n_splits)[:, None] & live[None, :]
        acc += tl.sum(tl.load(row_ptr[:, :, None] + cols[None, None, :], mask=m[:, :, None], other=0.0), axis=0)
    return acc


@triton.jit
def _pick(v, i: tl.constexpr):
    """Column i of a [BLOCK_T, W] tensor as [BLOCK_T, 1] (a masked sum: NaN stays in its column)."""
    return tl.sum(tl.where(tl.arange(0, v.shape[1])[None, :] == i, v, 0.0), axis=1)[:, None]


@triton.jit
def _post_comb(acc_post, acc_comb, rs, scale_ptr, base_ptr, iters, eps):
    """post [BLOCK_T, 4] and comb [BLOCK_T, 4, 4] from the summed mixes (acc_comb as
    [BLOCK_T, 4, 4]) and each token's rsqrt: sigmoid, then the Sinkhorn iteration."""
    four = tl.arange(0, 4)
    post = 2.0 * tl.sigmoid(acc_post * rs[:, None] * tl.load(scale_ptr + 1) + tl.load(base_ptr + 4 + four)[None, :])
    ij = 4 * four[:, None] + four[None, :]
    c = acc_comb * rs[:, None, None] * tl.load(scale_ptr + 2) + tl.load(base_ptr + 8 + ij)[None, :, :]
    # softmax over each row (last axis), + eps, then columns (axis 1); then iters - 1 rounds.
    c = tl.exp(c - tl.max(c, axis=2)[:, :, None])
    c = tl.math.div_rn(c, tl.broadcast_to(tl.sum(c, axis=2)[:, :, None], c.shape)) + eps
    c = tl.math.div_rn(c, tl.broadcast_to(tl.sum(c, axis=1)[:, None, :] + eps, c.shape))
    for _ in range(iters - 1):
        c = tl.math.div_rn(c, tl.broadcast_to(tl.sum(c, axis=2)[:, :, None] + eps, c.shape))
        c = tl.math.div_rn(c, tl.broadcast_to(tl.sum(c, axis=1)[:, None, :] + eps, c.shape))
    return post, c


@triton.jit
def _y_value(m0, m1, m2, m3, ssq, x0, x1, x2, x3, dim, scale_ptr, base_ptr, eps, norm_eps):
    """``y = sum_i pre_i X_i`` in FP32 from the summed pre mixes ``m0..m3`` and sum of squares
    (each broadcastable against the X blocks ``x0..x3``)."""
    rs = tl.rsqrt(ssq / (STREAMS * dim) + norm_eps)
    scale0 = tl.load(scale_ptr)
    y = (tl.sigmoid(m0 * rs * scale0 + tl.load(base_ptr)) + eps) * to_f32(x0)
    y += (tl.sigmoid(m1 * rs * scale0 + tl.load(base_ptr + 1)) + eps) * to_f32(x1)
    y += (tl.sigmoid(m2 * rs * scale0 + tl.load(base_ptr + 2)) + eps) * to_f32(x2)
    y += (tl.sigmoid(m3 * rs * scale0 + tl.load(base_ptr + 3)) + eps) * to_f32(x3)
    return y


@triton.jit
def _finalise_y_kernel(x_ptr, part_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                       T, dim, n_splits, stride_xt, stride_xs, iters, eps, norm_eps, t_bucket,
                       HEAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # hc_pre gives each tile one extra program, first, for post and comb (the Sinkhorn), so the
    # y programs hold no more than their X block and pre.
    n_programs = tl.cdiv(dim, BLOCK_D) + (0 if HEAD else 1)
    n_tiles = tl.cdiv(T, BLOCK_T)
    tile = n_tiles - 1 - tl.program_id(0) // n_programs  # reverse order: see the module doc
    d_block = tl.program_id(0) % n_programs - (0 if HEAD else 1)
    rows = tl.arange(0, BLOCK_T)
    four = tl.arange(0, 4)
    tok = (tile * BLOCK_T + rows).to(tl.int64)
    live = tok < T
    if d_block < 0:
        ssq = tl.sum(_partial_sums(part_ptr, tok, live, n_splits, T, SSQ_COL, 1, N_PAD), axis=1)
        rs = tl.rsqrt(ssq / (STREAMS * dim) + norm_eps)
        acc_post = _partial_sums(part_ptr, tok, live, n_splits, T, SSQ_COL + 1, 4, N_PAD)
        acc_comb = tl.reshape(_partial_sums(part_ptr, tok, live, n_splits, T, SSQ_COL + 5, 16, N_PAD), [BLOCK_T, 4, 4])
        post, c = _post_comb(acc_post, acc_comb, rs, scale_ptr, base_ptr, iters, eps)
        ij = 4 * four[:, None] + four[None, :]
        tl.store(post_ptr + tok[:, None] * 4 + four[None, :], post, mask=live[:, None])
        tl.store(comb_ptr + tok[:, None, None] * 16 + ij[None, :, :], c, mask=live[:, None, None])
    else:
        d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (d < dim)[None, :]
        x_row = x_ptr + tok[:, None] * stride_xt + d[None, :]
        # Columns 0..3 are the pre mixes and column SSQ_COL = 4 the sum of squares: one sector.
        acc = _partial_sums(part_ptr, tok, live, n_splits, T, 0, 8, N_PAD)
        x0 = tl.load(x_row, mask=mask, other=0.0)
        x1 = tl.load(x_row + stride_xs, mask=mask, other=0.0)
        x2 = tl.load(x_row + 2 * stride_xs, mask=mask, other=0.0)
        x3 = tl.load(x_row + 3 * stride_xs, mask=mask, other=0.0)
        y = _y_value(_pick(acc, 0), _pick(acc, 1), _pick(acc, 2), _pick(acc, 3), _pick(acc, SSQ_COL), x0, x1, x2, x3,
                     dim, scale_ptr, base_ptr, eps, norm_eps)
        tl.store(y_ptr + tok[:, None] * dim + d[None, :], cast_rne(y, tl.bfloat16), mask=mask)


@triton.jit
def _decode_kernel(x_ptr, fn_ptr, part_ptr, sync_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                   T, dim, stride_xt, stride_xs, iters, eps, norm_eps, t_bucket,
                   HEAD: tl.constexpr, N_MIX: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # Decode sizes in one launch: programs 0 .. n_mix - 1 are the mix launch's (fn split in the
    # loop), each counting itself in sync[0] once its partial rows are stored; the others are one
    # token's y block (hc_pre: or its Sinkhorn) and wait for all of them.  They wait only on
    # lower linear ids, which are dispatched first, so the wait always ends.  sync[1] counts the
    # finishing programs; the last one leaves both counters zero for the next launch.
    n_splits = STREAMS * tl.cdiv(dim, CHUNK)
    n_mix = tl.cdiv(T, BLOCK_T) * n_splits
    per_token = tl.cdiv(dim, BLOCK_D) + (0 if HEAD else 1)
    pid = tl.program_id(0)
    if pid < n_mix:
        _mix_partial(pid, x_ptr, fn_ptr, fn_ptr, part_ptr, T, dim, stride_xt, stride_xs, N_MIX, N_PAD, True, BLOCK_T,
                     CHUNK, BLOCK_K)
        tl.debug_barrier()
        tl.atomic_add(sync_ptr, 1, sem="release")
    else:
        tok = ((pid - n_mix) // per_token).to(tl.int64)
        d_block = (pid - n_mix) % per_token - (0 if HEAD else 1)
        # Every split's partial row of the token in one load (at most MAX_DECODE_SPLITS).
        s = tl.arange(0, MAX_DECODE_SPLITS)
        row = part_ptr + (s.to(tl.int64) * T + tok)[:, None] * N_PAD
        if d_block < 0:
            s_ok = (s < splits_after_wait(sync_ptr, n_mix, n_splits))[:, None]
            cols = tl.arange(0, N_PAD)
            mixes = tl.sum(tl.load(row + cols[None, :], mask=s_ok, other=0.0, cache_modifier=".cg"), axis=0)
            rs = tl.rsqrt(_entry(mixes, SSQ_COL) / (STREAMS * dim) + norm_eps)
            acc_post = _columns(mixes, SSQ_COL + 1, 4)[None, :]
            acc_comb = tl.reshape(_columns(mixes, SSQ_COL + 5, 16), [1, 4, 4])
            post, c = _post_comb(acc_post, acc_comb, rs[None], scale_ptr, base_ptr, iters, eps)
            four = tl.arange(0, 4)
            tl.store(post_ptr + tok * 4 + four[None, :], post)
            tl.store(comb_ptr + tok * 16 + (4 * four[:, None] + four[None, :])[None, :, :], c)
        else:
            d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
            d_ok = d < dim
            x_row = x_ptr + tok * stride_xt + d
            # X is an input: its loads go out before the wait.
            x0 = tl.load(x_row, mask=d_ok, other=0.0)
            x1 = tl.load(x_row + stride_xs, mask=d_ok, other=0.0)
            x2 = tl.load(x_row + 2 * stride_xs, mask=d_ok, other=0.0)
            x3 = tl.load(x_row + 3 * stride_xs, mask=d_ok, other=0.0)
            s_ok = (s < splits_after_wait(sync_ptr, n_mix, n_splits))[:, None]
            # Columns 0..3 are the pre mixes and column SSQ_COL = 4 the sum of squares: one sector.
            acc = tl.sum(tl.load(row + tl.arange(0, 8)[None, :], mask=s_ok, other=0.0, cache_modifier=".cg"), axis=0)
            # Scalars before meeting the X blocks (a [1, 8] operand would drag its layout into them).
            y = _y_value(_entry(acc, 0), _entry(acc, 1), _entry(acc, 2), _entry(acc, 3), _entry(acc, SSQ_COL), x0, x1,
                         x2, x3, dim, scale_ptr, base_ptr, eps, norm_eps)
            tl.store(y_ptr + tok * dim + d, cast_rne(y, tl.bfloat16), mask=d_ok)
        tl.debug_barrier()
        if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == T * per_token - 1:
            tl.store(sync_ptr, 0)
            tl.store(sync_ptr + 1, 0)


@triton.jit
def _entry(v, i: tl.constexpr):
    """Entry i of the vector ``v`` as a scalar (a masked sum: NaN stays put)."""
    return tl.sum(tl.where(tl.arange(0, v.shape[0]) == i, v, 0.0), axis=0)


@triton.jit
def _columns(v, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    """Entries FIRST .. FIRST + WIDTH - 1 of the vector ``v`` (masked sums: NaN stays put)."""
    c = tl.arange(0, v.shape[0])
    return tl.sum(tl.where(c[None, :] == FIRST + tl.arange(0, WIDTH)[:, None], v[None, :], 0.0), axis=1)


_hc_pre_mix = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "CHUNK": c, "BLOCK_K": bk}, num_warps=w, num_stages=st)
             for bt, c, bk, w, st in _MIX_CONFIGS],
    key=["dim", "t_bucket"], name="hc_pre_mix", prune_configs_by={"early_config_prune": _prune_mix_configs},
)(_mix_partial_kernel)
_hc_head_mix = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "CHUNK": c, "BLOCK_K": bk}, num_warps=w, num_stages=st)
             for bt, c, bk, w, st in _MIX_CONFIGS],
    key=["dim", "t_bucket"], name="hc_head_mix", prune_configs_by={"early_config_prune": _prune_mix_configs},
)(_mix_partial_kernel)
_hc_pre_y = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w) for bt, bd, w in _Y_CONFIGS],
    key=["dim", "t_bucket"], name="hc_pre_y", prune_configs_by={"early_config_prune": _prune_y_configs},
)(_finalise_y_kernel)
_hc_head_y = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w) for bt, bd, w in _Y_CONFIGS],
    key=["dim", "t_bucket"], name="hc_head_y", prune_configs_by={"early_config_prune": _prune_y_configs},
)(_finalise_y_kernel)

_DECODE_CONFIGS = [  # (BLOCK_T, CHUNK, BLOCK_K, num_warps, num_stages, BLOCK_D); the first serves every shape
    (16, 256, 64, 4, 3, 1024), (16, 256, 64, 4, 3, 512), (16, 512, 64, 4, 3, 1024), (64, 256, 64, 4, 3, 1024),
    (64, 512, 64, 4, 3, 1024), (64, 512, 64, 4, 3, 512), (64, 256, 64, 4, 3, 2048), (16, 256, 64, 4, 3, 2048),
    (64, 256, 64, 8, 3, 4096),
]


def _prune_decode_configs(configs, nargs, **kw):
    t_cap = max(16, nargs["t_bucket"])
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= t_cap
            and HC_MULT * triton.cdiv(nargs["dim"], c.kwargs["CHUNK"]) <= MAX_DECODE_SPLITS.value]
    return kept or configs[:1]


def _decode_fits(dim: int) -> bool:
    """Whether the one-launch decode form can hold every split's partial row for ``dim``."""
    return HC_MULT * triton.cdiv(dim, max(c[1] for c in _DECODE_CONFIGS)) <= MAX_DECODE_SPLITS.value


def _decode_tuner(name):
    return autotune(configs=[triton.Config({"BLOCK_T": bt, "CHUNK": c, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w,
                                           num_stages=st) for bt, c, bk, w, st, bd in _DECODE_CONFIGS],
                    key=["dim", "t_bucket"], name=name, prune_configs_by={"early_config_prune": _prune_decode_configs},
                    )(_decode_kernel)


_hc_pre_decode = _decode_tuner("hc_pre_decode")
_hc_head_decode = _decode_tuner("hc_head_decode")

_workspaces: Dict[Tuple, torch.Tensor] = {}
_outgrown: List[torch.Tensor] = []  # kept alive: a captured CUDA graph may still use them


def _workspace(device: torch.device, kind: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A workspace (partial rows, fn parts, counters) for launches on the current stream of
    ``device`` (each stream has its own, so streams can run concurrently); grown only when a
    launch needs more, and an outgrown one is never freed.  New ones are zeroed (the counters
    must start at zero; every launch leaves them so)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, kind)
    ws = _workspaces.get(key)
    if ws is None or ws.numel() < numel:
        if ws is not None:
            _outgrown.append(ws)
        ws = torch.zeros(numel, dtype=dtype, device=device)
        _workspaces[key] = ws
    return ws


def _mix_launch(mix_kernel, y_kernel, decode_kernel, X, fn, scale, base, iters, eps, norm_eps, head: bool,
                config=None, y_config=None, decode_config=None):
    T, _, dim = X.shape
    y = torch.empty((T, dim), dtype=torch.bfloat16, device=X.device)
    post = torch.empty((0 if head else T, HC_MULT), dtype=torch.float32, device=X.device)
    comb = torch.empty((0 if head else T, HC_MULT, HC_MULT), dtype=torch.float32, device=X.device)
    if T == 0:
        return y, post, comb
    if X.stride(2) != 1:
        X = X.contiguous()
    fn = fn.contiguous()
    t_bucket = token_bucket(T)
    n_mix, n_pad = (N_MIX_HEAD, 16) if head else (N_MIX_PRE, 32)
    if decode_config is not None or (config is None and y_config is None and T <= SPLIT_IN_LOOP_MAX_T
                                     and _decode_fits(dim)):
        _decode_launch(decode_kernel, X, fn, scale, base, iters, eps, norm_eps, head, y, post, comb, n_mix, n_pad,
                       decode_config)
        return y, post, comb
    # Sized for the narrowest slice that any config the tuner may run uses; the y kernel is
    # told the split count of the config that actually ran.
    if config is None:
        min_chunk = min(c.kwargs["CHUNK"] for c in _prune_mix_configs(mix_kernel.configs, dict(dim=dim, t_bucket=t_bucket)))
    else:
        min_chunk = config[1]
    part = _workspace(X.device, "partials", HC_MULT * triton.cdiv(dim, min_chunk) * T * n_pad, torch.float32)
    split_in_loop = T <= SPLIT_IN_LOOP_MAX_T
    parts = fn  # unread when fn is split inside the loop
    if not split_in_loop:
        K = HC_MULT * dim
        parts = _workspace(X.device, "fn_parts", 3 * K * n_pad, torch.bfloat16)
        _split_fn_kernel[(triton.cdiv(K, SPLIT_BLOCK_K),)](fn, parts, K, N_MIX=n_mix, N_PAD=n_pad, BLOCK=SPLIT_BLOCK_K)
    chosen = {}

    def mix_grid(meta):
        chosen["CHUNK"] = meta["CHUNK"]
        return (triton.cdiv(T, meta["BLOCK_T"]) * HC_MULT * triton.cdiv(dim, meta["CHUNK"]),)

    mix_args = (X, fn, parts, part, T, dim, X.stride(0), X.stride(1), t_bucket)
    consts = dict(N_MIX=n_mix, N_PAD=n_pad, SPLIT_IN_LOOP=split_in_loop)
    if config is None:
        mix_kernel[mix_grid](*mix_args, **consts)
    else:  # an explicit config (the tests sweep every one)
        bt, c, bk, w, st = config
        _mix_partial_kernel[mix_grid(dict(BLOCK_T=bt, CHUNK=c))](*mix_args, **consts, BLOCK_T=bt, CHUNK=c,
                                                                 BLOCK_K=bk, num_warps=w, num_stages=st)
    y_args = (X, part, scale, base, y, y if head else post, y if head else comb, T, dim,
              HC_MULT * triton.cdiv(dim, chosen["CHUNK"]), X.stride(0), X.stride(1), iters, eps, norm_eps, t_bucket)
    y_grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]) * (triton.cdiv(dim, m["BLOCK_D"]) + (0 if head else 1)),)
    if y_config is None:
        y_kernel[y_grid](*y_args, HEAD=head, N_PAD=n_pad)
    else:
        bt, bd, w = y_config
        _finalise_y_kernel[y_grid(dict(BLOCK_T=bt, BLOCK_D=bd))](*y_args, HEAD=head, N_PAD=n_pad, BLOCK_T=bt,
                                                                BLOCK_D=bd, num_warps=w)
    return y, post, comb


def _decode_launch(kernel, X, fn, scale, base, iters, eps, norm_eps, head, y, post, comb, n_mix, n_pad, config=None):
    T, _, dim = X.shape
    if config is not None and HC_MULT * triton.cdiv(dim, config[1]) > MAX_DECODE_SPLITS.value:
        raise ValueError(f"decode_config: slices of {config[1]} columns give more than {MAX_DECODE_SPLITS.value} "
                         f"partial rows per token at dim {dim}")
    min_chunk = min(c[1] for c in _DECODE_CONFIGS) if config is None else config[1]
    part = _workspace(X.device, "partials", HC_MULT * triton.cdiv(dim, min_chunk) * T * n_pad, torch.float32)
    sync = _workspace(X.device, "decode_counters", 2, torch.int32)

    def grid(meta):
        n_splits = HC_MULT * triton.cdiv(dim, meta["CHUNK"])
        return (triton.cdiv(T, meta["BLOCK_T"]) * n_splits + T * (triton.cdiv(dim, meta["BLOCK_D"]) + (not head)),)

    args = (X, fn, part, sync, scale, base, y, y if head else post, y if head else comb, T, dim, X.stride(0),
            X.stride(1), iters, eps, norm_eps, token_bucket(T))
    if config is None:
        kernel[grid](*args, HEAD=head, N_MIX=n_mix, N_PAD=n_pad)
    else:
        bt, c, bk, w, st, bd = config
        _decode_kernel[grid(dict(BLOCK_T=bt, CHUNK=c, BLOCK_D=bd))](
            *args, HEAD=head, N_MIX=n_mix, N_PAD=n_pad, BLOCK_T=bt, CHUNK=c, BLOCK_K=bk, BLOCK_D=bd, num_warps=w,
            num_stages=st)


@register("hc_pre", "triton")
def hc_pre(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           iters: int, eps: float, norm_eps: float, config=None, y_config=None, decode_config=None):
    return _mix_launch(_hc_pre_mix, _hc_pre_y, _hc_pre_decode, X, fn, scale, base, iters, eps, norm_eps, head=False,
                       config=config, y_config=y_config, decode_config=decode_config)


@register("hc_head", "triton")
def hc_head(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            eps: float, norm_eps: float, config=None, y_config=None, decode_config=None) -> torch.Tensor:
    return _mix_launch(_hc_head_mix, _hc_head_y, _hc_head_decode, X, fn, scale, base, 1, eps, norm_eps, head=True,
                       config=config, y_config=y_config, decode_config=decode_config)[0]


@autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
             for bt, bd, w in ((1, 1024, 4), (1, 512, 4), (1, 1024, 8), (1, 2048, 8), (2, 1024, 4), (1, 512, 2),
                               (1, 256, 1))],
    key=["dim", "t_bucket"], name="hc_post",
)
@triton.jit
def _hc_post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, T, dim, stride_ft, stride_xt, stride_xs, t_bucket,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # Each output stream written out as post_j f + sum_i comb_ij x_i over four 1-D rows: as a
    # [4, 4, BLOCK_D] product reduced over i, the best of its configs measured 15-25% slower
    # at T <= 256 (H100), slower than torch.compile's kernel at decode sizes.
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_live = d < dim
    for r in tl.static_range(BLOCK_T):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + r
        if t < T:
            f = to_f32(tl.load(f_ptr + t * stride_ft + d, mask=d_live, other=0.0))
            x_row = x_ptr + t * stride_xt + d
            x0 = to_f32(tl.load(x_row, mask=d_live, other=0.0))
            x1 = to_f32(tl.load(x_row + stride_xs, mask=d_live, other=0.0))
            x2 = to_f32(tl.load(x_row + 2 * stride_xs, mask=d_live, other=0.0))
            x3 = to_f32(tl.load(x_row + 3 * stride_xs, mask=d_live, other=0.0))
            comb = comb_ptr + t * 16
            for j in tl.static_range(4):
                out = (tl.load(post_ptr + t * 4 + j) * f + tl.load(comb + j) * x0 + tl.load(comb + 4 + j) * x1
                       + tl.load(comb + 8 + j) * x2 + tl.load(comb + 12 + j) * x3)
                tl.store(out_ptr + (t * 4 + j) * dim + d, cast_rne(out, tl.bfloat16), mask=d_live)


@register("hc_post", "triton")
def hc_post(F: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    T, _, dim = X.shape
    out = torch.empty((T, HC_MULT, dim), dtype=torch.bfloat16, device=X.device)
    if T == 0:
        return out
    if X.stride(2) != 1:
        X = X.contiguous()
    if F.stride(1) != 1:
        F = F.contiguous()
    grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(dim, m["BLOCK_D"]))
    _hc_post_kernel[grid](F, X, post.contiguous(), comb.contiguous(), out, T, dim, F.stride(0), X.stride(0),
                          X.stride(1), token_bucket(T))
    return out
