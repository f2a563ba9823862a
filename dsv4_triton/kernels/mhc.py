"""Triton mHC kernels: hc_pre / hc_head (one launch each) and hc_post (one pass).

hc_pre and hc_head
------------------
Per token the 24 (head: 4) mixes ``fn @ flatten(X)`` need the whole row of 4*dim values
before ``pre`` is known, and ``y = sum_i pre_i X_i`` needs the row again.  A row of 57 KB
(dim 7168) cannot stay on chip while enough tokens share one read of ``fn`` (2.7 MB), so
the kernel splits the work and orders it so that X comes from HBM once:

* Program ``(tile, split)`` multiplies ``BLOCK_T`` tokens' slice ``d in [split*CHUNK, +CHUNK)``
  of all 4 streams by the matching columns of ``fn`` (``tl.dot``; fn is split into three
  BF16 parts hi + mid + lo, so with BF16 X every product is exact and the sum is FP32, as
  accurate as an FP32 dot) and the sum of squares, and writes this partial to a workspace.
* The last split of a tile to arrive (an arrival counter) sums the partials in split order
  (deterministic), applies rsqrt / sigmoid / Sinkhorn in registers, writes post and comb,
  and publishes pre.
* The same program then does the y-work of tile ``tile - LAG`` on its own slice: it waits
  for that tile's pre and reads its X slice, which the program ``LAG * n_splits`` tickets
  earlier has just read, so it comes from L2.  ``LAG`` extra rows of programs drain the
  last tiles.  (Sinkhorn divides with IEEE rounding, ``div_rn``, as the oracle does.)

Programs take their ``(tile, split)`` from an atomic ticket in start order, and only ever
wait on programs with a smaller ticket, which have started and never wait on later ones:
no deadlock for any grid size or residency (the scheme of decoupled look-back scans), and
the interpreter, which runs programs one by one in order, never waits at all.  Partials and
pre live in a ring of tile slots (a small fixed workspace of ``RING_TILES`` tiles of the
widest split at the largest BLOCK_T, so narrower splits get more slots, up to MAX_SLOTS); a
tile's programs wait until the tile one ring earlier has released its slot, which in
practice has long happened.  Every counter returns to zero by the end of a launch, so
launches on one stream need no reset; each (device, stream) has its own workspace, so
streams can run concurrently.  (Only a launch that dies part-way, which leaves the CUDA
context unusable anyway, could leave a counter behind.)

hc_post
-------
``X'_j = post_j F + sum_i comb[i][j] X_i``: one read of F and X, one write, FP32 math.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..registry import register
from .formats import INTERPRET, cast_rne, to_f32

HC_MULT = 4
STREAMS = tl.constexpr(HC_MULT)  # the same, readable inside kernels
N_MIX_PRE = 24
N_MIX_HEAD = 4
RING_TILES = 8  # workspace: this many tiles of the widest split (CHUNK = MIN_CHUNK, BLOCK_T = MAX_BLOCK_T)
MAX_SLOTS = 64  # ring slots at most (counters)
LAG = 2  # a program's y-work is for the tile LAG tiles before its mix tile; LAG < slots
MAX_BLOCK_T = 64
MIN_CHUNK = 64

_MIX_CONFIGS = [  # (BLOCK_T, CHUNK, BLOCK_K, num_warps); the first one serves every shape
    (16, 64, 64, 4), (16, 128, 64, 4), (32, 128, 64, 4), (32, 256, 64, 4), (32, 512, 64, 4),
    (64, 128, 64, 4), (64, 128, 64, 8), (64, 256, 64, 8), (64, 512, 64, 8),
]


def token_bucket(T: int) -> int:
    """Tuning key for the token count: 16, 64, 256, 1024 or 4096 (the next power of 4, capped),
    so varying batch sizes share a few tuned entries instead of tuning every T."""
    b = 16
    while b < min(T, 4096):
        b *= 4
    return b


def _prune_mix_configs(configs, nargs, **kw):
    t_cap = nargs["t_bucket"]
    dim_cap = max(MIN_CHUNK, triton.next_power_of_2(nargs["dim"]))
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= t_cap and c.kwargs["CHUNK"] <= dim_cap]
    return kept or configs[:1]


@triton.jit
def _dot_bf16(a, b, acc):
    """acc + a @ b for BF16 a, b with FP32 accumulation (products are exact)."""
    if INTERPRET:
        # The interpreter multiplies BF16 tensors as raw integers: go through FP32 (exact).
        return tl.dot(to_f32(a), to_f32(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _wait_at_least(counter_ptr, target):
    # Spin on plain volatile reads (many programs may poll one counter; atomics would
    # serialise at L2), then an acquiring read orders the loads that follow.  The acquiring
    # read is a loop condition because an atomic add of 0 whose result is unused is removed
    # by the compiler; it passes at the first try.
    while tl.load(counter_ptr, volatile=True) < target:
        pass
    while tl.atomic_add(counter_ptr, 0, sem="acquire") < target:
        pass


@triton.jit
def _finalise_tile(part_ptr, pre_ws_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr, slot, tile, n_splits,
                   T, dim, iters, eps, norm_eps,
                   HEAD: tl.constexpr, N_MIX: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.arange(0, BLOCK_T)
    four = tl.arange(0, 4)
    tok = tile * BLOCK_T + rows
    live = tok < T
    slot_base = part_ptr + slot.to(tl.int64) * n_splits * BLOCK_T * N_PAD
    acc_pre = tl.zeros([BLOCK_T, 4], dtype=tl.float32)
    acc_post = tl.zeros([BLOCK_T, 4], dtype=tl.float32)
    acc_comb = tl.zeros([BLOCK_T, 4, 4], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for s in range(n_splits):
        row_ptr = slot_base + (s * BLOCK_T + rows) * N_PAD
        acc_pre += tl.load(row_ptr[:, None] + four[None, :], mask=live[:, None], other=0.0, cache_modifier=".cg")
        ssq += tl.load(row_ptr + N_MIX, mask=live, other=0.0, cache_modifier=".cg")
        if not HEAD:
            acc_post += tl.load(row_ptr[:, None] + 4 + four[None, :], mask=live[:, None], other=0.0,
                                cache_modifier=".cg")
            acc_comb += tl.load(row_ptr[:, None, None] + 8 + 4 * four[None, :, None] + four[None, None, :],
                                mask=live[:, None, None], other=0.0, cache_modifier=".cg")
    rs = tl.rsqrt(ssq / (STREAMS * dim) + norm_eps)
    pre = tl.sigmoid(acc_pre * rs[:, None] * tl.load(scale_ptr) + tl.load(base_ptr + four)[None, :]) + eps
    tl.store(pre_ws_ptr + (slot * BLOCK_T + rows[:, None]) * 4 + four[None, :], pre)
    if not HEAD:
        post = 2.0 * tl.sigmoid(acc_post * rs[:, None] * tl.load(scale_ptr + 1) + tl.load(base_ptr + 4 + four)[None, :])
        ij = 4 * four[:, None] + four[None, :]
        m = acc_comb * rs[:, None, None] * tl.load(scale_ptr + 2) + tl.load(base_ptr + 8 + ij)[None, :, :]
        # softmax over each row (last axis), + eps, then columns (axis 1); then iters - 1 rounds.
        m = tl.exp(m - tl.max(m, axis=2)[:, :, None])
        m = tl.math.div_rn(m, tl.broadcast_to(tl.sum(m, axis=2)[:, :, None], m.shape)) + eps
        m = tl.math.div_rn(m, tl.broadcast_to(tl.sum(m, axis=1)[:, None, :] + eps, m.shape))
        for _ in range(iters - 1):
            m = tl.math.div_rn(m, tl.broadcast_to(tl.sum(m, axis=2)[:, :, None] + eps, m.shape))
            m = tl.math.div_rn(m, tl.broadcast_to(tl.sum(m, axis=1)[:, None, :] + eps, m.shape))
        tok64 = tok.to(tl.int64)
        tl.store(post_ptr + tok64[:, None] * 4 + four[None, :], post, mask=live[:, None])
        tl.store(comb_ptr + tok64[:, None, None] * 16 + ij[None, :, :], m, mask=live[:, None, None])


@triton.jit
def _mix_kernel(x_ptr, fn_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                part_ptr, pre_ws_ptr, sync_ptr,
                T, dim, stride_xt, stride_xs, iters, eps, norm_eps, ring_rows, t_bucket,
                HEAD: tl.constexpr, N_MIX: tl.constexpr, N_PAD: tl.constexpr,
                BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
                MAX_RING_SLOTS: tl.constexpr, LAG_TILES: tl.constexpr):
    n_splits = tl.cdiv(dim, CHUNK)
    n_tiles = tl.cdiv(T, BLOCK_T)
    n_slots = tl.minimum(ring_rows // (n_splits * BLOCK_T), MAX_RING_SLOTS)
    events_per_tile = 2 * n_splits + 1  # n_splits arrivals, 1 publish, n_splits consumptions
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    if ticket == (n_tiles + LAG_TILES) * n_splits - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed")  # every program has its ticket
    tile = ticket // n_splits
    split = ticket % n_splits
    rows = tl.arange(0, BLOCK_T)
    d_lo = split * CHUNK

    if tile < n_tiles:
        slot = tile % n_slots
        gen = tile // n_slots
        state = sync_ptr + 1 + slot
        if gen > 0:
            _wait_at_least(state, gen * events_per_tile)  # tile - n_slots released the slot
        tok = (tile * BLOCK_T + rows).to(tl.int64)
        live = tok < T
        mix_col = tl.arange(0, N_PAD)
        mix_live = mix_col < N_MIX
        acc_hi = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
        ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for kk in range(0, STREAMS * CHUNK, BLOCK_K):
            stream = kk // CHUNK
            d = d_lo + kk % CHUNK + tl.arange(0, BLOCK_K)
            d_live = d < dim
            x = tl.load(x_ptr + tok[:, None] * stride_xt + stream * stride_xs + d[None, :],
                        mask=live[:, None] & d_live[None, :], other=0.0)
            f = tl.load(fn_ptr + mix_col[None, :].to(tl.int64) * (STREAMS * dim) + stream * dim + d[:, None],
                        mask=d_live[:, None] & mix_live[None, :], other=0.0)
            f_hi = f.to(tl.bfloat16)
            r = f - to_f32(f_hi)  # exact, whatever rounding the conversion used
            f_mid = r.to(tl.bfloat16)
            f_lo = (r - to_f32(f_mid)).to(tl.bfloat16)
            acc_hi = _dot_bf16(x, f_hi, acc_hi)
            acc_lo = _dot_bf16(x, f_mid, acc_lo)
            acc_lo = _dot_bf16(x, f_lo, acc_lo)
            xf = to_f32(x)
            ssq += tl.sum(xf * xf, axis=1)
        # Column N_MIX of the mixes is zero padding: it carries the sum of squares.
        part = tl.where(mix_col[None, :] == N_MIX, ssq[:, None], acc_hi + acc_lo)
        part_rows = (slot * n_splits + split) * BLOCK_T + rows
        tl.store(part_ptr + part_rows[:, None].to(tl.int64) * N_PAD + mix_col[None, :], part, mask=live[:, None])
        tl.debug_barrier()  # all threads' partials are written before the arrival is published
        arrived = tl.atomic_add(state, 1, sem="acq_rel")
        if arrived == gen * events_per_tile + n_splits - 1:
            _finalise_tile(part_ptr, pre_ws_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr, slot, tile, n_splits,
                           T, dim, iters, eps, norm_eps, HEAD, N_MIX, N_PAD, BLOCK_T)
            tl.debug_barrier()
            tl.atomic_add(state, 1, sem="release")  # pre of this tile is published

    if tile >= LAG_TILES:
        y_tile = tile - LAG_TILES
        slot = y_tile % n_slots
        gen = y_tile // n_slots
        state = sync_ptr + 1 + slot
        _wait_at_least(state, gen * events_per_tile + n_splits + 1)
        tok = (y_tile * BLOCK_T + rows).to(tl.int64)
        live = tok < T
        pre_row = pre_ws_ptr + (slot * BLOCK_T + rows) * 4
        p0 = tl.load(pre_row, cache_modifier=".cg")[:, None]
        p1 = tl.load(pre_row + 1, cache_modifier=".cg")[:, None]
        p2 = tl.load(pre_row + 2, cache_modifier=".cg")[:, None]
        p3 = tl.load(pre_row + 3, cache_modifier=".cg")[:, None]
        for dd in range(0, CHUNK, BLOCK_K):
            d = d_lo + dd + tl.arange(0, BLOCK_K)
            mask = live[:, None] & (d < dim)[None, :]
            x_row = x_ptr + tok[:, None] * stride_xt + d[None, :]
            y = p0 * to_f32(tl.load(x_row, mask=mask, other=0.0))
            y += p1 * to_f32(tl.load(x_row + stride_xs, mask=mask, other=0.0))
            y += p2 * to_f32(tl.load(x_row + 2 * stride_xs, mask=mask, other=0.0))
            y += p3 * to_f32(tl.load(x_row + 3 * stride_xs, mask=mask, other=0.0))
            tl.store(y_ptr + tok[:, None] * dim + d[None, :], cast_rne(y, tl.bfloat16), mask=mask)
        tl.debug_barrier()  # every thread has read pre before the slot can be released
        consumed = tl.atomic_add(state, 1, sem="acq_rel")
        if (consumed == gen * events_per_tile + 2 * n_splits) & (y_tile + n_slots >= n_tiles):
            tl.atomic_xchg(state, 0, sem="relaxed")  # last use of this slot in the launch


def _tuned(name: str):
    return autotune(
        configs=[triton.Config({"BLOCK_T": bt, "CHUNK": c, "BLOCK_K": bk}, num_warps=w)
                 for bt, c, bk, w in _MIX_CONFIGS],
        key=["dim", "t_bucket"], name=name, prune_configs_by={"early_config_prune": _prune_mix_configs},
    )(_mix_kernel)


_hc_pre_kernel = _tuned("hc_pre")
_hc_head_kernel = _tuned("hc_head")

_workspaces: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(partials, pre, counters) for launches on the current stream of ``device``.

    Sized for the largest config and grown only when a wider ``dim`` arrives; counters are
    zeroed once here and every launch leaves them zero.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _workspaces.get(key)
    ring_rows = RING_TILES * triton.cdiv(dim, MIN_CHUNK) * MAX_BLOCK_T
    if ws is None or ws[0].numel() < ring_rows * 32:
        ws = (torch.empty(ring_rows * 32, dtype=torch.float32, device=device),
              torch.empty(MAX_SLOTS * MAX_BLOCK_T * HC_MULT, dtype=torch.float32, device=device),
              torch.zeros(1 + MAX_SLOTS, dtype=torch.int32, device=device))
        _workspaces[key] = ws
    return ws


def _mix_launch(kernel, X, fn, scale, base, iters, eps, norm_eps, head: bool, config=None):
    T, _, dim = X.shape
    y = torch.empty((T, dim), dtype=torch.bfloat16, device=X.device)
    post = torch.empty((0 if head else T, HC_MULT), dtype=torch.float32, device=X.device)
    comb = torch.empty((0 if head else T, HC_MULT, HC_MULT), dtype=torch.float32, device=X.device)
    if T == 0:
        return y, post, comb
    if X.stride(2) != 1:
        X = X.contiguous()
    part, pre_ws, sync = _workspace(X.device, dim)
    n_mix = N_MIX_HEAD if head else N_MIX_PRE
    args = (X, fn.contiguous(), scale, base, y, post if not head else y, comb if not head else y,
            part, pre_ws, sync, T, dim, X.stride(0), X.stride(1), iters, eps, norm_eps, part.numel() // 32,
            token_bucket(T))
    meta = dict(HEAD=head, N_MIX=n_mix, N_PAD=16 if head else 32, MAX_RING_SLOTS=MAX_SLOTS, LAG_TILES=LAG)
    grid = lambda m: ((triton.cdiv(T, m["BLOCK_T"]) + LAG) * triton.cdiv(dim, m["CHUNK"]),)
    if config is None:
        kernel[grid](*args, **meta)
    else:  # an explicit config (the tests sweep every one)
        bt, c, bk, w = config
        _mix_kernel[grid(dict(BLOCK_T=bt, CHUNK=c))](*args, **meta, BLOCK_T=bt, CHUNK=c, BLOCK_K=bk, num_warps=w)
    return y, post, comb


@register("hc_pre", "triton")
def hc_pre(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           iters: int, eps: float, norm_eps: float, config=None):
    return _mix_launch(_hc_pre_kernel, X, fn, scale, base, iters, eps, norm_eps, head=False, config=config)


@register("hc_head", "triton")
def hc_head(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            eps: float, norm_eps: float, config=None) -> torch.Tensor:
    return _mix_launch(_hc_head_kernel, X, fn, scale, base, 1, eps, norm_eps, head=True, config=config)[0]


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
