"""Triton MoE router: scores, top-k and weights in one launch, by one of two paths.

Decode sizes (``T <= DECODE_MAX_T``) take the split path (``route_split``, described at
``_route_split_kernel``): the weight read is spread over (token tile, expert chunk, dim split)
programs whose FP32 partial logits are summed, per token, by programs of the same launch that
wait for them and then select over all experts.  Larger T take the tiled path (``route_tiled``)
below.

Tiled path: program ``(tile, chunk)`` computes the logits ``x @ W^T`` of ``BLOCK_T`` tokens
against ``BLOCK_E`` experts over the whole dim (``tl.dot``, BF16 operands, FP32 accumulation:
the BF16 products are exact, so this is an FP32 dot in another summation order), then
``s = sqrt(softplus(z))`` in registers, and writes a short list per token:

* score routing: the chunk's own top ``topk`` experts by ``s + bias`` (ids and ``s``);
  the global top-k is inside the union of the chunks' top-k lists;
* hash routing: ``s`` at each table id that falls in the chunk (one writer per id).

The last program of a tile to arrive (an arrival counter, reset by that program) merges
the lists, normalises the weights and writes the outputs.  Nothing waits, so any grid is
safe.  Selection order everywhere: larger key first, ties to the lower expert id, a NaN key
ranks above everything (as ``reference.router``).  Hash routing clamps token ids into
``[0, vocab)`` and table entries into ``[0, E)``, so no read leaves the tensors.

The lists (8 bytes per candidate: 512 B per token at E = 384 from T = 257 on, where chunks
have at least 64 experts) and the counters live in a workspace per (device, stream) that
grows with the largest T seen; every launch leaves the counters zero.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..autotune import autotune, token_bucket
from ..registry import register
from .formats import dot_bf16
from .sync import splits_after_wait

MIN_BLOCK_E = 16
NO_ID = tl.constexpr(2147483647)  # "no expert" in selections (above every id)
# From this token bucket on, chunks of fewer than 64 experts are not tried: x is re-read once
# per chunk, and the candidate lists (sized by the smallest chunk) grow with T.
WIDE_CHUNK_BUCKET = 1024

_CONFIGS = [  # (BLOCK_T, BLOCK_E, BLOCK_K, num_warps, num_stages); the first one serves every shape
    (16, 16, 64, 4, 3), (16, 32, 128, 4, 3), (16, 64, 128, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 4),
    (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
]


def _allowed(block_t: int, block_e: int, bucket: int, n_experts: int) -> bool:
    e_cap = max(MIN_BLOCK_E, triton.next_power_of_2(n_experts))
    min_e = min(64, e_cap) if bucket >= WIDE_CHUNK_BUCKET else MIN_BLOCK_E
    return block_t <= bucket and min_e <= block_e <= e_cap


def _prune(configs, nargs, **kw):
    kept = [c for c in configs if _allowed(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_E"], nargs["t_bucket"],
                                           nargs["n_experts"])]
    return kept or configs[:1]


@triton.jit
def _sqrt_softplus(z):
    """sqrt(softplus(z)) with softplus = max(z, 0) + log1p(exp(-|z|)), log1p kept accurate
    for tiny arguments (log(w) * u / (w - 1) with w = 1 + u), so scores far below zero keep
    their relative precision."""
    u = tl.exp(-tl.abs(z))
    w = 1.0 + u
    log1p_u = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.sqrt_rn(tl.maximum(z, 0.0) + log1p_u)


@triton.jit
def _rank_key(key):
    """Selection key: NaN ranks above every number."""
    return tl.where(key != key, float("inf"), key)


@triton.jit
def _next_best(key, ids, valid, last_key, last_id):
    """Per row, the entry after ``(last_key, last_id)`` in selection order (key descending,
    then id ascending): the largest key among the entries ranked below the last pick, ties
    to the lowest id.  Keeping only the last pick, rather than a mask of taken entries, keeps
    one [rows, cols] tensor fewer live.  Returns (key, id); id is NO_ID where none is left."""
    later = valid & ((key < last_key[:, None]) | ((key == last_key[:, None]) & (ids > last_id[:, None])))
    best = tl.max(tl.where(later, key, float("-inf")), axis=1)
    sel = tl.min(tl.where(later & (key == best[:, None]), ids, NO_ID), axis=1)
    return best, sel


@triton.jit
def _pick(values, onehot):
    """values at the one-hot position per row (NaN/Inf kept; 0 where the row has none)."""
    return tl.sum(tl.where(onehot, values, 0.0), axis=1)


@triton.jit
def _route_kernel(x_ptr, w_ptr, bias_ptr, table_ptr, tok_ids_ptr, weights_ptr, ids_ptr,
                  cand_s_ptr, cand_id_ptr, counter_ptr,
                  T, dim, n_experts, vocab, stride_x, stride_w, topk, route_scale, t_bucket,
                  HASH: tl.constexpr, HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    N_CAND: tl.constexpr = (E_PAD // BLOCK_E) * K_PAD  # candidate slots per token (E_PAD >= BLOCK_E)
    n_chunks = tl.cdiv(n_experts, BLOCK_E)
    pid = tl.program_id(0)
    tile = pid // n_chunks
    chunk = pid % n_chunks
    rows = tl.arange(0, BLOCK_T)
    tok = (tile * BLOCK_T + rows).to(tl.int64)
    live = tok < T
    e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
    e_live = e < n_experts
    kcol = tl.arange(0, K_PAD)

    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_live = k < dim
        xt = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=live[:, None] & k_live[None, :], other=0.0)
        wt = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_w + k[None, :],
                     mask=e_live[:, None] & k_live[None, :], other=0.0)
        acc = dot_bf16(xt, tl.trans(wt), acc)
    s = _sqrt_softplus(acc)
    if HASH:
        # s at each table id of the token that falls in this chunk; exactly one chunk writes it.
        row = tl.minimum(tl.maximum(tl.load(tok_ids_ptr + tok, mask=live, other=0).to(tl.int64), 0), vocab - 1)
        table = tl.load(table_ptr + row[:, None] * topk + kcol[None, :], mask=live[:, None] & (kcol < topk)[None, :],
                        other=0)
        table = tl.minimum(tl.maximum(table, 0), n_experts - 1)
        for kk in tl.static_range(K_PAD):
            if kk < topk:
                want = tl.sum(tl.where(kcol[None, :] == kk, table, 0), axis=1)
                s_kk = _pick(s, e[None, :] == want[:, None])
                mine = live & (want >= chunk * BLOCK_E) & (want < chunk * BLOCK_E + BLOCK_E)
                tl.store(cand_s_ptr + tok * N_CAND + kk, s_kk, mask=mine)
    else:
        key = s
        if HAS_BIAS:
            key = s + tl.load(bias_ptr + e, mask=e_live, other=0.0)[None, :]
        key = _rank_key(key)
        last_key = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
        last_id = tl.full([BLOCK_T], -1, dtype=tl.int32)
        top_s = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        top_id = tl.full([BLOCK_T, K_PAD], -1, dtype=tl.int32)
        for kk in tl.static_range(K_PAD):
            if kk < topk:
                last_key, last_id = _next_best(key, e[None, :], e_live[None, :], last_key, last_id)
                top_s = tl.where(kcol[None, :] == kk, _pick(s, e[None, :] == last_id[:, None])[:, None], top_s)
                top_id = tl.where(kcol[None, :] == kk, tl.where(last_id == NO_ID, -1, last_id)[:, None], top_id)
        cand = tok[:, None] * N_CAND + chunk * K_PAD + kcol[None, :]
        tl.store(cand_s_ptr + cand, top_s, mask=live[:, None])
        tl.store(cand_id_ptr + cand, top_id, mask=live[:, None])

    tl.debug_barrier()  # all threads' lists are written before the arrival is published
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
    if arrived == n_chunks - 1:
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed")
        out_col = kcol < topk
        if HASH:
            w = tl.load(cand_s_ptr + tok[:, None] * N_CAND + kcol[None, :], mask=live[:, None] & out_col[None, :],
                        other=0.0, cache_modifier=".cg")
            row = tl.minimum(tl.maximum(tl.load(tok_ids_ptr + tok, mask=live, other=0).to(tl.int64), 0), vocab - 1)
            sel_id = tl.load(table_ptr + row[:, None] * topk + kcol[None, :], mask=live[:, None] & out_col[None, :],
                             other=0)
            sel_id = tl.minimum(tl.maximum(sel_id, 0), n_experts - 1)
        else:
            c = tl.arange(0, N_CAND)
            c_live = (c // K_PAD) < n_chunks
            all_cand = tok[:, None] * N_CAND + c[None, :]
            cs = tl.load(cand_s_ptr + all_cand, mask=live[:, None] & c_live[None, :], other=0.0,
                         cache_modifier=".cg")
            cid = tl.load(cand_id_ptr + all_cand, mask=live[:, None] & c_live[None, :], other=-1,
                          cache_modifier=".cg")
            ckey = cs
            if HAS_BIAS:
                ckey = cs + tl.load(bias_ptr + cid, mask=cid >= 0, other=0.0)
            ckey = _rank_key(ckey)
            last_key = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
            last_id = tl.full([BLOCK_T], -1, dtype=tl.int32)
            w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
            sel_id = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
            for kk in tl.static_range(K_PAD):
                if kk < topk:
                    # topk <= E valid candidates exist: every pick is found.
                    last_key, last_id = _next_best(ckey, cid, cid >= 0, last_key, last_id)
                    w = tl.where(kcol[None, :] == kk, _pick(cs, cid == last_id[:, None])[:, None], w)
                    sel_id = tl.where(kcol[None, :] == kk, last_id[:, None], sel_id)
        w = w / tl.sum(w, axis=1)[:, None]
        w = w * route_scale
        out = tok[:, None] * topk + kcol[None, :]
        tl.store(weights_ptr + out, w, mask=live[:, None] & out_col[None, :])
        tl.store(ids_ptr + out, sel_id, mask=live[:, None] & out_col[None, :])


_route_tuned = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_E": be, "BLOCK_K": bk}, num_warps=w, num_stages=st)
             for bt, be, bk, w, st in _CONFIGS],
    key=["n_experts", "dim", "t_bucket", "topk"], name="route", prune_configs_by={"early_config_prune": _prune},
)(_route_kernel)

_workspaces: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n_rows: int, n_cand: int, n_tiles: int):
    """(candidate s, candidate ids, arrival counters) for the current stream of ``device``,
    grown to the largest call seen; counters are zeroed once and every launch leaves them zero."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _workspaces.get(key)
    if ws is None or ws[0].numel() < n_rows * n_cand or ws[2].numel() < n_tiles:
        size = max(n_rows * n_cand, ws[0].numel() if ws else 0)
        tiles = max(n_tiles, ws[2].numel() if ws else 0)
        ws = (torch.empty(size, dtype=torch.float32, device=device), torch.empty(size, dtype=torch.int32, device=device),
              torch.zeros(tiles, dtype=torch.int32, device=device))
        _workspaces[key] = ws
    return ws


def _outputs_and_operands(x: torch.Tensor, weight: torch.Tensor, topk: int):
    """The outputs (weights fp32, ids int32, ``[T, topk]``) and x / weight with unit inner stride."""
    T = x.shape[0]
    weights = torch.empty((T, topk), dtype=torch.float32, device=x.device)
    ids = torch.empty((T, topk), dtype=torch.int32, device=x.device)
    return weights, ids, (x if x.stride(1) == 1 else x.contiguous()), \
        (weight if weight.stride(1) == 1 else weight.contiguous())


def _optional_operands(x, bias, tid2eid, token_ids, topk: int):
    """(hash mode, (bias, table, token ids) with ``x`` standing in for the absent ones, K_PAD)."""
    hash_mode = tid2eid is not None
    optional = (bias if bias is not None else x, tid2eid.contiguous() if hash_mode else x,
                token_ids if hash_mode else x)
    return hash_mode, optional, max(2, triton.next_power_of_2(topk))  # tensors of width 1 are avoided


def route_tiled(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tid2eid: Optional[torch.Tensor],
                token_ids: Optional[torch.Tensor], topk: int, route_scale: float, config=None):
    """The tiled path: one launch of ``_route_kernel`` (tuned per token bucket unless ``config`` =
    (BLOCK_T, BLOCK_E, BLOCK_K, num_warps, num_stages) is given)."""
    weights, ids, x, weight = _outputs_and_operands(x, weight, topk)
    if x.shape[0] == 0:
        return weights, ids
    T, dim = x.shape
    n_experts = weight.shape[0]
    hash_mode, optional, k_pad = _optional_operands(x, bias, tid2eid, token_ids, topk)
    e_pad = max(MIN_BLOCK_E, triton.next_power_of_2(n_experts))  # >= every BLOCK_E the pruning keeps
    bucket = token_bucket(T)
    if config is None:  # the configs the tuner may run here (it holds only the first without tuning)
        runnable = _prune(_route_tuned.configs, {"t_bucket": bucket, "n_experts": n_experts})
        smallest_chunk = min(c.kwargs["BLOCK_E"] for c in runnable)
    else:
        smallest_chunk = config[1]
        if not MIN_BLOCK_E <= smallest_chunk <= e_pad:
            raise ValueError(f"config: BLOCK_E must be in [{MIN_BLOCK_E}, {e_pad}] for E = {n_experts}, "
                             f"got {smallest_chunk}")
    # Candidate slots per token for the smallest chunk the launch may use (the most lists).
    n_cand = e_pad // smallest_chunk * k_pad
    cand_s, cand_id, counters = _workspace(x.device, T, n_cand, triton.cdiv(T, 16))
    args = (x, weight, *optional, weights, ids, cand_s, cand_id, counters,
            T, dim, n_experts, tid2eid.shape[0] if hash_mode else 1, x.stride(0), weight.stride(0), topk,
            route_scale, bucket)
    meta = dict(HASH=hash_mode, HAS_BIAS=bias is not None, K_PAD=k_pad, E_PAD=e_pad)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]) * triton.cdiv(n_experts, m["BLOCK_E"]),)
    if config is None:
        _route_tuned[grid](*args, **meta)
    else:  # an explicit config (the tests sweep every one)
        bt, be, bk, w, st = config
        _route_kernel[grid(dict(BLOCK_T=bt, BLOCK_E=be))](*args, **meta, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk,
                                                          num_warps=w, num_stages=st)
    return weights, ids

# ---------------------------------------------------------------- decode path: split over dim

DECODE_MAX_T = 256
# The split workspace has room for this many tokens from the first call (decode batches of
# any size up to it share one allocation); larger calls grow it.
SPLIT_ROOM_T = 64

_SPLIT_CONFIGS = [  # (BLOCK_T, BLOCK_E, BLOCK_K, SPLIT_K, num_warps, num_stages); the first one serves every shape
    (16, 32, 128, 256, 4, 3), (16, 32, 128, 512, 4, 3), (16, 64, 128, 512, 4, 3), (16, 32, 128, 1024, 4, 3),
    (32, 32, 128, 512, 4, 3), (32, 64, 128, 256, 4, 3), (32, 32, 128, 512, 8, 3),
    # 64-row tiles: W read once at T = 64, the tile's partials stored by 8 warps.
    (64, 32, 128, 512, 8, 3), (64, 64, 128, 512, 8, 3), (64, 32, 128, 256, 8, 3),
]
MIN_SPLIT_K = min(c[3] for c in _SPLIT_CONFIGS)  # the narrowest tuned split: the workspace fits its partials
MIN_SPLIT_T = 16  # the smallest BLOCK_T: one arrival counter per 16 tokens covers every config
# Splits a selection program sums per step: one load of [SPLIT_BLOCK, E_PAD] partials.
SPLIT_BLOCK = tl.constexpr(16)


def _split_allowed(block_t: int, block_e: int, bucket: int, n_experts: int) -> bool:
    return block_t <= max(MIN_SPLIT_T, bucket) and block_e <= max(MIN_BLOCK_E, triton.next_power_of_2(n_experts))


def _split_prune(configs, nargs, **kw):
    kept = [c for c in configs if _split_allowed(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_E"], nargs["t_bucket"],
                                                 nargs["n_experts"])]
    return kept or configs[:1]


INT64_MIN = tl.constexpr(-9223372036854775808)
INT64_MAX = tl.constexpr(9223372036854775807)


@triton.jit
def _packed_key(key, ids):
    """One int64 per (key, id) whose signed order is the selection order: key descending
    (NaN above everything, -0 equal to +0), then id ascending.  High word: the key's bits
    made monotone as a signed int32; low word: 2^31 - 1 - id (ids are in [0, 2^31))."""
    key = _rank_key(key)
    key = tl.where(key == 0.0, 0.0, key)  # -0 -> +0: equal keys, equal words
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (2147483647 - ids).to(tl.int64)


@triton.jit
def _packed_id(packed):
    return 2147483647 - (packed & 0x7FFFFFFF).to(tl.int32)  # the low word is below 2^31


@triton.jit
def _larger_key(key_a, s_a, key_b, s_b):
    """Combine of a max over packed keys that carries each key's score along, so a pick
    comes with its weight and no gather is needed after the selection."""
    a_wins = key_a > key_b
    return tl.where(a_wins, key_a, key_b), tl.where(a_wins, s_a, s_b)


@triton.jit
def _below(key, s, last):
    """(key, s) where the key ranks after the row's last pick, else (INT64_MIN, s)."""
    return tl.where(key < last[:, None], key, INT64_MIN), s


@triton.jit
def _fixed_order_row_sum(w, K_PAD: tl.constexpr):
    """Row sums of [rows, K_PAD] in one order whatever the layout: neighbours added in
    pairs, then pairs of pairs ((w0 + w1) + (w2 + w3)) + ...; a sum of two terms is the
    same either way round, so every path and config normalises to the same bits."""
    ROWS: tl.constexpr = w.shape[0]
    a, b = tl.split(tl.reshape(w, [ROWS, K_PAD // 2, 2]))
    w = a + b
    if K_PAD >= 4:
        a, b = tl.split(tl.reshape(w, [ROWS, K_PAD // 4, 2]))
        w = a + b
    if K_PAD >= 8:
        a, b = tl.split(tl.reshape(w, [ROWS, K_PAD // 8, 2]))
        w = a + b
    return tl.reshape(w, [ROWS])


@triton.jit
def _route_split_kernel(x_ptr, w_ptr, bias_ptr, table_ptr, tok_ids_ptr, weights_ptr, ids_ptr, partial_ptr, sync_ptr,
                        T, dim, n_experts, vocab, stride_x, stride_w, TOPK: tl.constexpr, route_scale, t_bucket,
                        HASH: tl.constexpr, HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Two kinds of program in one launch.

    Programs ``0 .. n_gemm - 1``, (tile, chunk, split): the FP32 logits of BLOCK_T tokens x
    BLOCK_E experts over SPLIT_K of dim (BF16 products, exact, summed in FP32), stored in the
    split's [T, E] slab of the partial workspace, then counted on the tile's counter (release).

    The T programs after them, one token each: wait until the token's tile has counted all its
    n_chunks * n_splits programs (acquire), sum the token's row of every slab (blocks of
    SPLIT_BLOCK splits in split order, each reduced by one tl.sum: the same bits run to run), apply
    sqrt(softplus) and select the top TOPK of all experts by packed key (key descending, ties to
    the lower id, NaN first), the weights from the picks' scores; for hash routing, the sums at
    the table's ids.  They wait only on lower linear ids, which are dispatched first, so the
    wait always ends.  Inputs no program writes (bias, token ids, table rows) are loaded before
    the wait.  ``sync[0]`` counts the finished token programs; the last zeroes every counter,
    so the next launch (and a CUDA-graph replay) starts from zero.

    An earlier form reduced each (tile, chunk) in the last split to arrive and merged the
    chunks' top-k lists in the last chunk to arrive: two arrivals and two L2 round trips of
    lists on the serial path, and W read once per token tile where its tail bounded the tile
    height (benchmarks/NOTES.md, "router, twenty-third round").

    Reads of x and W are masked to the tensors, hash routing clamps ids as the tiled path does,
    and every workspace index stays below the sizes ``route_split`` allocates."""
    n_splits = tl.cdiv(dim, SPLIT_K)
    n_chunks = tl.cdiv(n_experts, BLOCK_E)
    n_tiles = tl.cdiv(T, BLOCK_T)
    n_gemm = n_tiles * n_chunks * n_splits
    slab = tl.cast(T, tl.int64) * n_experts  # floats per split
    pid = tl.program_id(0)
    kcol = tl.arange(0, K_PAD)
    out_col = kcol < TOPK
    if pid < n_gemm:
        split = pid % n_splits
        chunk = (pid // n_splits) % n_chunks
        tile = pid // (n_splits * n_chunks)
        tok = tile.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        live = tok < T
        e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
        e_live = e < n_experts
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for k0 in range(0, SPLIT_K, BLOCK_K):
            k = split * SPLIT_K + k0 + tl.arange(0, BLOCK_K)
            k_live = k < dim
            xt = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=live[:, None] & k_live[None, :],
                         other=0.0)
            wt = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_w + k[None, :],
                         mask=e_live[:, None] & k_live[None, :], other=0.0)
            acc = dot_bf16(xt, tl.trans(wt), acc)
        # Rows past T are neither written nor read (T = 1 stores 1/16 of a 16-row tile).
        tl.store(partial_ptr + split * slab + tok[:, None] * n_experts + e[None, :], acc,
                 mask=live[:, None] & e_live[None, :])
        tl.debug_barrier()  # every thread's partials are written before the count is published
        tl.atomic_add(sync_ptr + 1 + tile, 1, sem="release")
    else:
        token = pid - n_gemm
        if HASH:
            cols = tl.load(table_ptr + tl.minimum(tl.maximum(tl.load(tok_ids_ptr + token).to(tl.int64), 0), vocab - 1)
                           * TOPK + kcol, mask=out_col, other=0)
            cols = tl.minimum(tl.maximum(cols, 0), n_experts - 1)
            col_ok = out_col
        else:
            cols = tl.arange(0, E_PAD)
            col_ok = cols < n_experts
            if HAS_BIAS:
                e_bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        n_ok = splits_after_wait(sync_ptr + 1 + token // BLOCK_T, n_chunks * n_splits, n_splits)
        sp = tl.arange(0, SPLIT_BLOCK)
        row = partial_ptr + token.to(tl.int64) * n_experts + cols[None, :]
        z = tl.zeros(cols.shape, dtype=tl.float32)
        for s0 in range(0, n_splits, SPLIT_BLOCK):
            z += tl.sum(tl.load(row + (s0 + sp)[:, None].to(tl.int64) * slab, mask=(s0 + sp < n_ok)[:, None]
                                & col_ok[None, :], other=0.0, cache_modifier=".cg"), axis=0)
        s = _sqrt_softplus(z)[None, :]
        if HASH:
            w = s
            sel_id = cols[None, :]
        else:
            key = s
            if HAS_BIAS:
                key = s + e_bias[None, :]
            packed = tl.where(col_ok[None, :], _packed_key(key, cols[None, :]), INT64_MIN)
            last = tl.full([1], INT64_MAX, dtype=tl.int64)
            top = tl.full([1, K_PAD], INT64_MIN, dtype=tl.int64)
            w = tl.zeros([1, K_PAD], dtype=tl.float32)
            for kk in tl.static_range(K_PAD):
                if kk < TOPK:  # TOPK <= E live experts: every pick is found
                    last, last_s = tl.reduce(_below(packed, s, last), 1, _larger_key)
                    top = tl.where(kcol[None, :] == kk, last[:, None], top)
                    w = tl.where(kcol[None, :] == kk, last_s[:, None], w)
            sel_id = _packed_id(top)
        w = tl.where(out_col[None, :], w, 0.0)
        w = w / _fixed_order_row_sum(w, K_PAD)[:, None]
        w = w * route_scale
        out = token * TOPK + kcol[None, :]
        tl.store(weights_ptr + out, w, mask=out_col[None, :])
        tl.store(ids_ptr + out, sel_id, mask=out_col[None, :])
        tl.debug_barrier()
        if tl.atomic_add(sync_ptr, 1, sem="acq_rel") == T - 1:
            for t in range(0, n_tiles):
                tl.store(sync_ptr + 1 + t, 0)
            tl.store(sync_ptr, 0)


_route_split_tuned = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_E": be, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=st)
             for bt, be, bk, sk, w, st in _SPLIT_CONFIGS],
    key=["n_experts", "dim", "t_bucket", "TOPK"], name="route_split",
    prune_configs_by={"early_config_prune": _split_prune},
)(_route_split_kernel)


class _SplitWorkspace:
    """Partial logits and the counters (finished token programs, then one per 16-token tile) of
    the split path, for one (device, stream); grown to the largest sizes seen, counters zeroed
    once (every launch leaves them zero)."""

    def __init__(self, device, n_partial, n_sync):
        self.partial = torch.empty(n_partial, dtype=torch.float32, device=device)
        self.sync = torch.zeros(n_sync, dtype=torch.int32, device=device)

    def fits(self, n_partial, n_sync):
        return self.partial.numel() >= n_partial and self.sync.numel() >= n_sync


_split_workspaces: Dict[Tuple, _SplitWorkspace] = {}
# Outgrown workspaces stay allocated: a CUDA graph captured with one keeps its addresses.
_outgrown: List[_SplitWorkspace] = []


def _split_workspace(device: torch.device, n_partial: int, n_sync: int) -> _SplitWorkspace:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _split_workspaces.get(key)
    if ws is None or not ws.fits(n_partial, n_sync):
        if ws is not None:
            _outgrown.append(ws)
            n_partial, n_sync = max(n_partial, ws.partial.numel()), max(n_sync, ws.sync.numel())
        ws = _split_workspaces[key] = _SplitWorkspace(device, n_partial, n_sync)
    return ws


def _check_split_config(config):
    if len(config) != 6:
        raise ValueError(f"config: expected (BLOCK_T, BLOCK_E, BLOCK_K, SPLIT_K, num_warps, num_stages), got {config}")
    pow2 = all(v >= 16 and v & (v - 1) == 0 for v in config[:4])
    if not pow2 or config[3] < config[2]:
        raise ValueError(f"config: expected powers of two >= 16 with SPLIT_K >= BLOCK_K, got {config}")


def route_split(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tid2eid: Optional[torch.Tensor],
                token_ids: Optional[torch.Tensor], topk: int, route_scale: float, config=None):
    """The decode path: one launch of ``_route_split_kernel`` (tuned per token bucket unless
    ``config`` = (BLOCK_T, BLOCK_E, BLOCK_K, SPLIT_K, num_warps, num_stages) is given)."""
    weights, ids, x, weight = _outputs_and_operands(x, weight, topk)
    if x.shape[0] == 0:
        return weights, ids
    T, dim = x.shape
    n_experts = weight.shape[0]
    hash_mode, optional, k_pad = _optional_operands(x, bias, tid2eid, token_ids, topk)
    split_k = MIN_SPLIT_K
    if config is not None:
        _check_split_config(config)
        split_k = min(split_k, config[3])
    room = max(T, SPLIT_ROOM_T)
    ws = _split_workspace(x.device, triton.cdiv(dim, split_k) * room * n_experts, 1 + triton.cdiv(room, MIN_SPLIT_T))
    args = (x, weight, *optional, weights, ids, ws.partial, ws.sync, T, dim, n_experts,
            tid2eid.shape[0] if hash_mode else 1, x.stride(0), weight.stride(0), topk, route_scale, token_bucket(T))
    meta = dict(HASH=hash_mode, HAS_BIAS=bias is not None, K_PAD=k_pad,
                E_PAD=max(MIN_BLOCK_E, triton.next_power_of_2(n_experts)))
    grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]) * triton.cdiv(n_experts, m["BLOCK_E"])
                      * triton.cdiv(dim, m["SPLIT_K"]) + T,)
    if config is None:
        _route_split_tuned[grid](*args, **meta)
    else:
        bt, be, bk, sk, w, st = config
        _route_split_kernel[grid(dict(BLOCK_T=bt, BLOCK_E=be, SPLIT_K=sk))](
            *args, **meta, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
    return weights, ids


@register("route", "triton")
def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tid2eid: Optional[torch.Tensor],
          token_ids: Optional[torch.Tensor], topk: int, route_scale: float):
    """Decode sizes (T <= DECODE_MAX_T) take the split path, larger T the tiled one."""
    if x.shape[0] <= DECODE_MAX_T:
        return route_split(x, weight, bias, tid2eid, token_ids, topk, route_scale)
    return route_tiled(x, weight, bias, tid2eid, token_ids, topk, route_scale)
