"""Triton mHC kernels: hc_pre / hc_head (one launch each) and hc_post (one pass).

hc_pre and hc_head
------------------
Per token the 24 (head: 4) mixes ``fn @ flatten(X)`` need the whole row of 4*dim values
before ``pre`` is known, and ``y = sum_i pre_i X_i`` needs the row again.  A row is 57 KB
at dim 7168, and fn (2.7 MB) must be shared by many tokens, so one program cannot hold its
tokens' rows.  ``_hc_mix_kernel`` therefore splits each tile of ``BLOCK_T`` tokens into
``n_splits`` dim slices, one program each, in two phases:

1. mix: the slice ``d in [split*chunk, +chunk)`` of all 4 streams times the matching columns
   of fn (``tl.dot``; fn is split into three BF16 parts hi + mid + lo, so with BF16 X every
   product is exact and the sum is FP32, as accurate as an FP32 dot), plus the sum of
   squares; the program writes this partial row (``N_PAD`` floats per token) to a
   workspace and arrives at its tile's counter.
2. y: once all slices of the tile have arrived, the program sums the tile's partial rows in
   split order (deterministic), applies rsqrt / sigmoid and writes ``y = sum_i pre_i X_i``
   for its slice, reading the slice again: it read it a few microseconds earlier, so the
   second read hits L2 and X crosses HBM once.  For hc_pre the split-0 program also runs the
   Sinkhorn and writes post and comb.

The wait is a spin on the tile's arrival counter.  It cannot deadlock: the GPU dispatches a
grid's programs in order, so every program of an earlier tile is already resident or done,
and a tile's ``n_splits`` programs need only ``n_splits`` resident slots; ``n_splits`` is
capped at half the SM count (``max_splits``), which leaves room for several such launches
running at once on other streams.  The last program to leave a tile resets its counters,
so the workspace is ready for the next launch (and for CUDA-graph replays).  Under
``TRITON_INTERPRET=1`` programs run one after another, so there the two phases are two
launches of the same kernel (``PHASES`` 1 then 2) with no counters.

Partial-row layout: columns ``0..3`` are the pre mixes and column ``SSQ_COL = 4`` the sum of
squares (one 32-byte sector: all that the y phase of most programs reads), then the
remaining mixes (post, comb).  Sinkhorn divides with IEEE rounding (``div_rn``), as the
oracle does.

hc_post
-------
``X'_j = post_j F + sum_i comb[i][j] X_i``: one read of F and X, one write, FP32 math.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from ..autotune import autotune, token_bucket
from ..registry import register, triton_interpreter_on
from .formats import cast_rne, dot_bf16, to_f32

HC_MULT = 4
STREAMS = tl.constexpr(HC_MULT)  # the same, readable inside kernels
N_MIX_PRE = 24
N_MIX_HEAD = 4
SSQ_COL = tl.constexpr(4)  # partial-row column of the sum of squares (after the 4 pre mixes)
SPLIT_BLOCK = tl.constexpr(16)  # partial rows the y phase loads at once
Y_BLOCK = tl.constexpr(64)  # columns of the slice the y phase handles at once
MIX, WRITE_Y, BOTH = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)  # PHASES: mix, y, both

_CONFIGS = [  # (BLOCK_T, CHUNK, BLOCK_K, num_warps); the first one serves every shape
    (16, 256, 64, 4), (16, 128, 64, 4), (32, 256, 64, 4), (64, 256, 64, 4), (64, 256, 64, 8),
    (64, 512, 64, 8), (128, 256, 64, 8),
]


def _min_chunk(t_bucket: int) -> int:
    """Narrowest dim slice tuned for a token bucket.  Every program of a tile re-reads the
    tile's partial rows (32 B per token and split), so that traffic grows with the square of
    the split count: large batches take wide slices."""
    return 64 if t_bucket <= 64 else 256


def _chunk(dim: int, chunk: int, max_splits: int) -> int:
    """The slice width a launch uses: ``chunk``, or the power of two that makes ``dim`` take
    at most ``max_splits`` slices if that is wider (see the module doc)."""
    return max(chunk, triton.next_power_of_2(triton.cdiv(dim, max_splits)))


def _prune_configs(configs, nargs, **kw):
    t_cap, dim = nargs["t_bucket"], nargs["dim"]
    dim_cap = max(64, triton.next_power_of_2(dim))
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(16, t_cap) and _min_chunk(t_cap) <= c.kwargs["CHUNK"] <= dim_cap]
    out, seen = [], set()
    for c in kept or configs[:1]:
        kw = dict(c.kwargs, CHUNK=_chunk(dim, c.kwargs["CHUNK"], nargs["max_splits"]))
        key = (tuple(sorted(kw.items())), c.num_warps)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


@triton.jit
def _partial_sums(part_ptr, tok, live, n_splits, T, COL: tl.constexpr, WIDTH: tl.constexpr, N_PAD: tl.constexpr):
    """Sum over splits of partial-row columns ``COL .. COL + WIDTH - 1`` -> [BLOCK_T, WIDTH]
    (blocks of SPLIT_BLOCK splits in a fixed order: deterministic).  The rows were written by
    other programs of this launch: read through L2 (``.cg``), never a stale L1 line."""
    cols = COL + tl.arange(0, WIDTH)
    acc = tl.zeros([tok.shape[0], WIDTH], dtype=tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        row_ptr = part_ptr + (s[:, None].to(tl.int64) * T + tok[None, :]) * N_PAD  # [SPLIT_BLOCK, BLOCK_T]
        m = (s < n_splits)[:, None] & live[None, :]
        acc += tl.sum(tl.load(row_ptr[:, :, None] + cols[None, None, :], mask=m[:, :, None], other=0.0,
                              cache_modifier=".cg"), axis=0)
    return acc


@triton.jit
def _pick(v, i: tl.constexpr):
    """Column i of a [BLOCK_T, W] tensor as [BLOCK_T, 1] (a masked sum: NaN stays in its column)."""
    return tl.sum(tl.where(tl.arange(0, v.shape[1])[None, :] == i, v, 0.0), axis=1)[:, None]


@triton.jit
def _sinkhorn_store(part_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr, tok, live, n_splits, T, dim, iters, eps,
                    norm_eps, N_PAD: tl.constexpr):
    """post and comb of a tile from its summed partial rows (SPEC 9)."""
    BLOCK_T: tl.constexpr = tok.shape[0]
    four = tl.arange(0, 4)
    ssq = tl.sum(_partial_sums(part_ptr, tok, live, n_splits, T, SSQ_COL, 1, N_PAD), axis=1)
    rs = tl.rsqrt(ssq / (STREAMS * dim) + norm_eps)
    acc_post = _partial_sums(part_ptr, tok, live, n_splits, T, SSQ_COL + 1, 4, N_PAD)
    acc_comb = tl.reshape(_partial_sums(part_ptr, tok, live, n_splits, T, SSQ_COL + 5, 16, N_PAD), [BLOCK_T, 4, 4])
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
    tl.store(post_ptr + tok[:, None] * 4 + four[None, :], post, mask=live[:, None])
    tl.store(comb_ptr + tok[:, None, None] * 16 + ij[None, :, :], c, mask=live[:, None, None])


@triton.jit
def _hc_mix_kernel(x_ptr, fn_ptr, part_ptr, sync_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                   T, dim, stride_xt, stride_xs, max_splits, iters, eps, norm_eps, t_bucket,
                   HEAD: tl.constexpr, N_MIX: tl.constexpr, N_PAD: tl.constexpr, PHASES: tl.constexpr,
                   BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
    n_splits = tl.cdiv(dim, CHUNK)  # the launcher keeps it <= max_splits
    n_tiles = tl.cdiv(T, BLOCK_T)
    tile = tl.program_id(0) // n_splits
    split = tl.program_id(0) % n_splits
    rows = tl.arange(0, BLOCK_T)
    tok = (tile * BLOCK_T + rows).to(tl.int64)
    live = tok < T
    d_lo = split * CHUNK
    if PHASES != WRITE_Y:  # MIX or BOTH
        # Partial-row column c holds fn row c for c < SSQ_COL and fn row c - 1 above it; column
        # SSQ_COL gets a zero fn row (masked) and then the sum of squares.
        col = tl.arange(0, N_PAD)
        fn_row = tl.where(col < SSQ_COL, col, col - 1)
        fn_live = (col != SSQ_COL) & (fn_row < N_MIX)
        acc_hi = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
        squares = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)  # reduced once, after the loop
        for kk in range(0, STREAMS * CHUNK, BLOCK_K):
            stream = kk // CHUNK
            d = d_lo + kk % CHUNK + tl.arange(0, BLOCK_K)
            d_live = d < tl.minimum(dim, d_lo + CHUNK)
            # Kept in L2 for the y phase's second read of the slice.
            x = tl.load(x_ptr + tok[:, None] * stride_xt + stream * stride_xs + d[None, :],
                        mask=live[:, None] & d_live[None, :], other=0.0, eviction_policy="evict_last")
            f = tl.load(fn_ptr + fn_row[None, :].to(tl.int64) * (STREAMS * dim) + stream * dim + d[:, None],
                        mask=d_live[:, None] & fn_live[None, :], other=0.0)
            f_hi = f.to(tl.bfloat16)
            r = f - to_f32(f_hi)  # exact, whatever rounding the conversion used
            f_mid = r.to(tl.bfloat16)
            f_lo = (r - to_f32(f_mid)).to(tl.bfloat16)
            acc_hi = dot_bf16(x, f_hi, acc_hi)
            acc_lo = dot_bf16(x, f_mid, acc_lo)
            acc_lo = dot_bf16(x, f_lo, acc_lo)
            xf = to_f32(x)
            squares += xf * xf
        ssq = tl.sum(squares, axis=1)
        part = tl.where(col[None, :] == SSQ_COL, ssq[:, None], acc_hi + acc_lo)
        tl.store(part_ptr + (split * T + tok)[:, None] * N_PAD + col[None, :], part,
                 mask=live[:, None] & (col <= N_MIX)[None, :])
    if PHASES == BOTH:
        arrived = sync_ptr + tile
        departed = sync_ptr + n_tiles + tile
        tl.debug_barrier()  # every thread's partial row is stored before the release
        seen = tl.atomic_add(arrived, 1, sem="release", scope="gpu") + 1
        while seen < n_splits:
            seen = tl.atomic_add(arrived, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
        if tl.atomic_add(departed, 1, sem="relaxed", scope="gpu") == n_splits - 1:
            # Everyone has stopped reading `arrived`: the last one out resets the tile.
            tl.atomic_xchg(arrived, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(departed, 0, sem="relaxed", scope="gpu")
    if PHASES != MIX:  # WRITE_Y or BOTH
        if not HEAD:
            if split == 0:
                _sinkhorn_store(part_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr, tok, live, n_splits, T, dim,
                                iters, eps, norm_eps, N_PAD)
        # Columns 0..3 are the pre mixes and column SSQ_COL = 4 the sum of squares: one sector.
        acc = _partial_sums(part_ptr, tok, live, n_splits, T, 0, 8, N_PAD)
        rs_col = tl.rsqrt(_pick(acc, SSQ_COL) / (STREAMS * dim) + norm_eps)
        scale0 = tl.load(scale_ptr)
        pre0 = tl.sigmoid(_pick(acc, 0) * rs_col * scale0 + tl.load(base_ptr)) + eps
        pre1 = tl.sigmoid(_pick(acc, 1) * rs_col * scale0 + tl.load(base_ptr + 1)) + eps
        pre2 = tl.sigmoid(_pick(acc, 2) * rs_col * scale0 + tl.load(base_ptr + 2)) + eps
        pre3 = tl.sigmoid(_pick(acc, 3) * rs_col * scale0 + tl.load(base_ptr + 3)) + eps
        d_end = tl.minimum(dim, d_lo + CHUNK)
        for dd in range(0, CHUNK, Y_BLOCK):
            d = d_lo + dd + tl.arange(0, Y_BLOCK)
            mask = live[:, None] & (d < d_end)[None, :]
            x_row = x_ptr + tok[:, None] * stride_xt + d[None, :]
            y = pre0 * to_f32(tl.load(x_row, mask=mask, other=0.0, eviction_policy="evict_first"))
            y += pre1 * to_f32(tl.load(x_row + stride_xs, mask=mask, other=0.0, eviction_policy="evict_first"))
            y += pre2 * to_f32(tl.load(x_row + 2 * stride_xs, mask=mask, other=0.0, eviction_policy="evict_first"))
            y += pre3 * to_f32(tl.load(x_row + 3 * stride_xs, mask=mask, other=0.0, eviction_policy="evict_first"))
            tl.store(y_ptr + tok[:, None] * dim + d[None, :], cast_rne(y, tl.bfloat16), mask=mask)


_hc_pre_mix = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "CHUNK": c, "BLOCK_K": bk}, num_warps=w) for bt, c, bk, w in _CONFIGS],
    key=["dim", "t_bucket"], name="hc_pre_fused", prune_configs_by={"early_config_prune": _prune_configs},
)(_hc_mix_kernel)
_hc_head_mix = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "CHUNK": c, "BLOCK_K": bk}, num_warps=w) for bt, c, bk, w in _CONFIGS],
    key=["dim", "t_bucket"], name="hc_head_fused", prune_configs_by={"early_config_prune": _prune_configs},
)(_hc_mix_kernel)

_workspaces: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n_partial: int, n_sync: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partial rows and tile counters for launches on the current stream of ``device`` (each
    stream has its own, so streams can run concurrently); grown only when a launch needs
    more.  The counters are zero between launches: each launch leaves them so."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    part, sync = _workspaces.get(key, (None, None))
    if part is None or part.numel() < n_partial:
        part = torch.empty(n_partial, dtype=torch.float32, device=device)
    if sync is None or sync.numel() < n_sync:
        sync = torch.zeros(n_sync, dtype=torch.int32, device=device)
    _workspaces[key] = (part, sync)
    return part, sync


def _max_splits(device: torch.device) -> int:
    """Slices per tile: at most half the SMs (see the module doc), and 32."""
    if device.type != "cuda":
        return 32
    return max(1, min(32, torch.cuda.get_device_properties(device).multi_processor_count // 2))


def _mix_launch(kernel, X, fn, scale, base, iters, eps, norm_eps, head: bool, config=None):
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
    max_splits = _max_splits(X.device)
    # Sized for the most slices and tiles any config may use (the smallest BLOCK_T is 16).
    part, sync = _workspace(X.device, max_splits * T * n_pad, 2 * triton.cdiv(T, 16))

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(dim, meta["CHUNK"]),)

    args = (X, fn, part, sync, scale, base, y, y if head else post, y if head else comb, T, dim,
            X.stride(0), X.stride(1), max_splits, iters, eps, norm_eps, t_bucket)
    consts = dict(HEAD=head, N_MIX=n_mix, N_PAD=n_pad)
    phases = (MIX.value, WRITE_Y.value) if triton_interpreter_on() else (BOTH.value,)
    for phase in phases:
        if config is None:
            kernel[grid](*args, **consts, PHASES=phase)
        else:  # an explicit config (the tests sweep every one)
            bt, c, bk, w = config
            c = _chunk(dim, c, max_splits)
            _hc_mix_kernel[grid(dict(BLOCK_T=bt, CHUNK=c, BLOCK_K=bk))](*args, **consts, PHASES=phase, BLOCK_T=bt,
                                                                        CHUNK=c, BLOCK_K=bk, num_warps=w)
    return y, post, comb


@register("hc_pre", "triton")
def hc_pre(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           iters: int, eps: float, norm_eps: float, config=None):
    return _mix_launch(_hc_pre_mix, X, fn, scale, base, iters, eps, norm_eps, head=False, config=config)


@register("hc_head", "triton")
def hc_head(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            eps: float, norm_eps: float, config=None) -> torch.Tensor:
    return _mix_launch(_hc_head_mix, X, fn, scale, base, 1, eps, norm_eps, head=True, config=config)[0]


@autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
             for bt, bd, w in ((1, 1024, 4), (1, 512, 4), (2, 512, 4), (1, 2048, 8), (4, 256, 4), (1, 256, 4))],
    key=["dim", "t_bucket"], name="hc_post",
)
@triton.jit
def _hc_post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, T, dim, stride_ft, stride_xt, stride_xs, t_bucket,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    four = tl.arange(0, 4)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_live = d < dim
    for r in tl.static_range(BLOCK_T):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + r
        if t < T:
            f = to_f32(tl.load(f_ptr + t * stride_ft + d, mask=d_live, other=0.0))
            x = to_f32(tl.load(x_ptr + t * stride_xt + four[:, None] * stride_xs + d[None, :],
                               mask=d_live[None, :], other=0.0))  # [4 (i), BLOCK_D]
            post = tl.load(post_ptr + t * 4 + four)  # [4 (j)]
            comb = tl.load(comb_ptr + t * 16 + four[:, None] * 4 + four[None, :])  # [4 (i), 4 (j)]
            out = post[:, None] * f[None, :] + tl.sum(comb[:, :, None] * x[:, None, :], axis=0)
            tl.store(out_ptr + t * 4 * dim + four[:, None] * dim + d[None, :], cast_rne(out, tl.bfloat16),
                     mask=d_live[None, :])


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
