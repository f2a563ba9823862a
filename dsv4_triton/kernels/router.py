"""Triton MoE router: scores, top-k and weights in one launch, by one of two paths.

Decode sizes (``T <= DECODE_MAX_T``) take the split path (``route_split``, described at
``_route_split_kernel``): the weight read is spread over (token tile, expert chunk, dim split)
programs whose FP32 partial logits are added in a fixed order by the last split to arrive.
Larger T take the tiled path (``route_tiled``) below.

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
from .formats import INTERPRET, dot_bf16

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
# Tail rows are a power of two >= T, capped here: at the largest BLOCK_T a config may have.
MAX_TAIL_ROWS = 64

_SPLIT_CONFIGS = [  # (BLOCK_T, BLOCK_E, BLOCK_K, SPLIT_K, num_warps, num_stages); the first one serves every shape
    (16, 32, 128, 256, 4, 3), (16, 32, 128, 128, 4, 2), (16, 64, 128, 256, 4, 3), (16, 32, 128, 512, 4, 3),
    (32, 32, 128, 256, 4, 3), (32, 32, 128, 512, 4, 3), (64, 32, 128, 256, 8, 3), (64, 32, 128, 512, 8, 3),
    # 8 warps for the tail's selections; 64-expert chunks halve the x re-reads and the final merge's slots.
    (16, 32, 128, 512, 8, 3), (16, 64, 128, 512, 8, 3), (32, 64, 128, 512, 8, 3), (32, 64, 128, 512, 16, 3),
    # 32-row tiles with 8 warps: W read from L2 by half as many tiles at T = 64 (22 MB of L2 reads
    # instead of 33), while a thread's share of the tail stays 4 partial floats (336 programs, 3 per SM).
    (32, 32, 128, 512, 8, 3),
]
# The same tiles with MERGE_TREE (selections as one reduction that merges sorted lists; results
# identical): the configs chosen so far at decode sizes, the 256-token one, the 32-row tiles
# whose tail is as short per thread as the 16-row ones', and the 64-row tile (W read once).
_TREE_CONFIGS = [(16, 32, 128, 256, 4, 3), (16, 64, 128, 256, 4, 3), (16, 32, 128, 512, 4, 3),
                 (32, 32, 128, 512, 4, 3), (16, 64, 128, 512, 8, 3), (32, 32, 128, 512, 8, 3),
                 (64, 32, 128, 512, 8, 3)]
# Top-k the merge tree's lists hold (every model's top-k; the op allows up to 8).
TREE_MAX_TOPK = 8

# Bounds every split config respects, so one workspace fits whichever config the tuner runs:
# BLOCK_T and BLOCK_E divide SPLIT_TILE_ALIGN, SPLIT_K >= MIN_SPLIT_K, BLOCK_E >= MIN_BLOCK_E.
SPLIT_TILE_ALIGN = 64
MIN_SPLIT_K = 128


def _reduce_budget(num_warps: int) -> int:
    """Floats of partial tiles the reducer aims to keep in flight per step: 32 per thread (a
    16 x 32 tile on 4 warps: 8 tiles a step, 32 registers)."""
    return 32 * 32 * num_warps


def _split_allowed(block_t: int, block_e: int, bucket: int, n_experts: int) -> bool:
    return block_t <= bucket and block_e <= max(MIN_BLOCK_E, triton.next_power_of_2(n_experts))


def _split_prune(configs, nargs, **kw):
    # Hash routing makes no selection: the MERGE_TREE forms would repeat the others.
    tree_ok = not kw.get("HASH", False) and nargs["TOPK"] <= TREE_MAX_TOPK
    kept = [c for c in configs if _split_allowed(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_E"], nargs["t_bucket"],
                                                 nargs["n_experts"]) and (tree_ok or not c.kwargs["MERGE_TREE"])]
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
def _fold_position(best, best_s, key, s, last):
    """Element-wise: the better of (best, best_s) and this list position's entry ranked
    after the row's last pick."""
    key, s = _below(key, s, last)
    return _larger_key(best, best_s, key, s)


@triton.jit
def _list_position(cand_ptr, cand_s_ptr, slot, mask, position: tl.constexpr, NC_PAD: tl.constexpr):
    """Entry ``position`` of every chunk's sorted candidate list ([rows, NC_PAD] keys and scores)."""
    key = tl.load(cand_ptr + slot + position * NC_PAD, mask=mask, other=INT64_MIN, cache_modifier=".cg")
    s = tl.load(cand_s_ptr + slot + position * NC_PAD, mask=mask, other=0.0, cache_modifier=".cg")
    return key, s


@triton.jit
def _exchange(key_a, s_a, key_b, s_b):
    """Compare-exchange of two (key, score) entries: the larger key first."""
    a_first = key_a > key_b
    return (tl.where(a_first, key_a, key_b), tl.where(a_first, s_a, s_b),
            tl.where(a_first, key_b, key_a), tl.where(a_first, s_b, s_a))


@triton.jit
def _merge_top8(a0, a1, a2, a3, a4, a5, a6, a7, sa0, sa1, sa2, sa3, sa4, sa5, sa6, sa7,
                b0, b1, b2, b3, b4, b5, b6, b7, sb0, sb1, sb2, sb3, sb4, sb5, sb6, sb7):
    """Combine of a reduction over sorted lists of 8 packed keys (descending) with their
    scores: the top 8 of the union of lists a and b, sorted.  c_i = max(a_i, b_{7-i}) holds
    the top 8 as a bitonic sequence; half-cleaners at distances 4, 2, 1 sort it (a bitonic
    merge).  Keys are distinct (the id is in the key) except the INT64_MIN fill of short
    lists, which is never picked, so the result, and a reduction's result in any order, is
    the unique top 8 in selection order."""
    c0, t0 = _larger_key(a0, sa0, b7, sb7)
    c1, t1 = _larger_key(a1, sa1, b6, sb6)
    c2, t2 = _larger_key(a2, sa2, b5, sb5)
    c3, t3 = _larger_key(a3, sa3, b4, sb4)
    c4, t4 = _larger_key(a4, sa4, b3, sb3)
    c5, t5 = _larger_key(a5, sa5, b2, sb2)
    c6, t6 = _larger_key(a6, sa6, b1, sb1)
    c7, t7 = _larger_key(a7, sa7, b0, sb0)
    c0, t0, c4, t4 = _exchange(c0, t0, c4, t4)
    c1, t1, c5, t5 = _exchange(c1, t1, c5, t5)
    c2, t2, c6, t6 = _exchange(c2, t2, c6, t6)
    c3, t3, c7, t7 = _exchange(c3, t3, c7, t7)
    c0, t0, c2, t2 = _exchange(c0, t0, c2, t2)
    c1, t1, c3, t3 = _exchange(c1, t1, c3, t3)
    c4, t4, c6, t6 = _exchange(c4, t4, c6, t6)
    c5, t5, c7, t7 = _exchange(c5, t5, c7, t7)
    c0, t0, c1, t1 = _exchange(c0, t0, c1, t1)
    c2, t2, c3, t3 = _exchange(c2, t2, c3, t3)
    c4, t4, c5, t5 = _exchange(c4, t4, c5, t5)
    c6, t6, c7, t7 = _exchange(c6, t6, c7, t7)
    return c0, c1, c2, c3, c4, c5, c6, c7, t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _halves(t):
    """[rows, 2n] -> ([rows, n], [rows, n]): columns 2j and 2j + 1."""
    return tl.split(tl.reshape(t, [t.shape[0], t.shape[1] // 2, 2]))


@triton.jit
def _merge_rows(k0, k1, k2, k3, k4, k5, k6, k7, s0, s1, s2, s3, s4, s5, s6, s7):
    """Per row of [rows, n] (n a power of two), the top 8 of the n sorted lists of 8 held in
    (k_j, s_j) (list entry j): one reduction with _merge_top8.  The interpreter runs a
    reduction's combine one element at a time, so there the same merges run as halving steps
    over whole tensors; the result is the unique top 8 whatever the order of the merges."""
    if INTERPRET:
        while k0.shape[1] > 1:
            a0, b0 = _halves(k0)
            a1, b1 = _halves(k1)
            a2, b2 = _halves(k2)
            a3, b3 = _halves(k3)
            a4, b4 = _halves(k4)
            a5, b5 = _halves(k5)
            a6, b6 = _halves(k6)
            a7, b7 = _halves(k7)
            c0, d0 = _halves(s0)
            c1, d1 = _halves(s1)
            c2, d2 = _halves(s2)
            c3, d3 = _halves(s3)
            c4, d4 = _halves(s4)
            c5, d5 = _halves(s5)
            c6, d6 = _halves(s6)
            c7, d7 = _halves(s7)
            k0, k1, k2, k3, k4, k5, k6, k7, s0, s1, s2, s3, s4, s5, s6, s7 = _merge_top8(
                a0, a1, a2, a3, a4, a5, a6, a7, c0, c1, c2, c3, c4, c5, c6, c7,
                b0, b1, b2, b3, b4, b5, b6, b7, d0, d1, d2, d3, d4, d5, d6, d7)
        rows: tl.constexpr = k0.shape[0]
        return (tl.reshape(k0, [rows]), tl.reshape(k1, [rows]), tl.reshape(k2, [rows]), tl.reshape(k3, [rows]),
                tl.reshape(k4, [rows]), tl.reshape(k5, [rows]), tl.reshape(k6, [rows]), tl.reshape(k7, [rows]),
                tl.reshape(s0, [rows]), tl.reshape(s1, [rows]), tl.reshape(s2, [rows]), tl.reshape(s3, [rows]),
                tl.reshape(s4, [rows]), tl.reshape(s5, [rows]), tl.reshape(s6, [rows]), tl.reshape(s7, [rows]))
    else:
        return tl.reduce((k0, k1, k2, k3, k4, k5, k6, k7, s0, s1, s2, s3, s4, s5, s6, s7), 1, _merge_top8)


@triton.jit
def _list_entry(cand_ptr, cand_s_ptr, slot, mask, position: tl.constexpr, NC_PAD: tl.constexpr, TOPK: tl.constexpr):
    """Entry ``position`` of every chunk's list, or the empty entry (INT64_MIN, 0) past TOPK
    (those positions are neither written nor read)."""
    if position < TOPK:
        key, s = _list_position(cand_ptr, cand_s_ptr, slot, mask, position, NC_PAD)
    else:
        key = tl.full(slot.shape, INT64_MIN, dtype=tl.int64)
        s = tl.zeros(slot.shape, dtype=tl.float32)
    return key, s


@triton.jit
def _place(v0, v1, v2, v3, v4, v5, v6, v7, kcol, TOPK: tl.constexpr):
    """[rows, K_PAD] with column j = v_j for j < TOPK (0 past it; the stores mask those)."""
    out = tl.where(kcol[None, :] == 0, v0[:, None], 0)
    if TOPK > 1:
        out = tl.where(kcol[None, :] == 1, v1[:, None], out)
    if TOPK > 2:
        out = tl.where(kcol[None, :] == 2, v2[:, None], out)
    if TOPK > 3:
        out = tl.where(kcol[None, :] == 3, v3[:, None], out)
    if TOPK > 4:
        out = tl.where(kcol[None, :] == 4, v4[:, None], out)
    if TOPK > 5:
        out = tl.where(kcol[None, :] == 5, v5[:, None], out)
    if TOPK > 6:
        out = tl.where(kcol[None, :] == 6, v6[:, None], out)
    if TOPK > 7:
        out = tl.where(kcol[None, :] == 7, v7[:, None], out)
    return out


@triton.jit
def _chunk_top8(packed, s, kcol, TOPK: tl.constexpr):
    """A chunk's sorted list: the top 8 packed keys of each row of [rows, cols] (with their
    scores) as [rows, K_PAD] columns 0..TOPK-1.  Each group of 4 neighbouring columns (the
    partial loads' vector, held by one thread) is sorted by 5 exchanges, then one reduction
    over the groups merges the sorted lists (_merge_top8)."""
    ROWS: tl.constexpr = packed.shape[0]
    GROUPS: tl.constexpr = packed.shape[1] // 4
    k01, k23 = tl.split(tl.reshape(packed, [ROWS, GROUPS, 2, 2]))
    k0, k1 = tl.split(k01)
    k2, k3 = tl.split(k23)
    s01, s23 = tl.split(tl.reshape(s, [ROWS, GROUPS, 2, 2]))
    s0, s1 = tl.split(s01)
    s2, s3 = tl.split(s23)
    k0, s0, k1, s1 = _exchange(k0, s0, k1, s1)
    k2, s2, k3, s3 = _exchange(k2, s2, k3, s3)
    k0, s0, k2, s2 = _exchange(k0, s0, k2, s2)
    k1, s1, k3, s3 = _exchange(k1, s1, k3, s3)
    k1, s1, k2, s2 = _exchange(k1, s1, k2, s2)
    empty = tl.full([ROWS, GROUPS], INT64_MIN, dtype=tl.int64)
    none = tl.zeros([ROWS, GROUPS], dtype=tl.float32)
    k0, k1, k2, k3, k4, k5, k6, k7, s0, s1, s2, s3, s4, s5, s6, s7 = _merge_rows(
        k0, k1, k2, k3, empty, empty, empty, empty, s0, s1, s2, s3, none, none, none, none)
    return (_place(k0, k1, k2, k3, k4, k5, k6, k7, kcol, TOPK),
            _place(s0, s1, s2, s3, s4, s5, s6, s7, kcol, TOPK))


@triton.jit
def _four_partials(slot, first, n_splits, TILE: tl.constexpr, tail_live):
    """Partial tiles of splits first .. first + 3 at ``slot`` (split 0's tail rows).  Past the
    last split a valid slot is read (the last one: no split mask, so the loads batch) and its
    value is dropped by _add_four."""
    p0 = tl.load(slot + tl.minimum(first, n_splits - 1) * TILE, mask=tail_live[:, None], other=0.0,
                 cache_modifier=".cg")
    p1 = tl.load(slot + tl.minimum(first + 1, n_splits - 1) * TILE, mask=tail_live[:, None], other=0.0,
                 cache_modifier=".cg")
    p2 = tl.load(slot + tl.minimum(first + 2, n_splits - 1) * TILE, mask=tail_live[:, None], other=0.0,
                 cache_modifier=".cg")
    p3 = tl.load(slot + tl.minimum(first + 3, n_splits - 1) * TILE, mask=tail_live[:, None], other=0.0,
                 cache_modifier=".cg")
    return p0, p1, p2, p3


@triton.jit
def _xor_bits(p0, p1, p2, p3):
    """The XOR of four FP32 tensors' bits.  A step of the reduce adds +0 or -0 (the sign bit of
    its loads' XOR, as a float by bit operations: nothing a compiler can fold) before its first
    partial: that changes at most the sign of a zero sum (never a score: sqrt(softplus(+-0))
    is one value), and makes the first add wait on every load of the step, so ptxas issues
    them all before it.  Without it, where the rest of the kernel needs fewer registers than
    the loads (the tree form: 56; 16-load steps), ptxas issues them a few at a time behind the
    adds (~2 L2 round trips a step instead of 1).  The pick form's 8-load steps (T = 64 tile)
    go out whole without it, and it would take that kernel from 72 to 79 registers."""
    return (p0.to(tl.int32, bitcast=True) ^ p1.to(tl.int32, bitcast=True) ^ p2.to(tl.int32, bitcast=True)
            ^ p3.to(tl.int32, bitcast=True))


@triton.jit
def _add_four(z, p0, p1, p2, p3, first, n_splits):
    """z + p0 + p1 + p2 + p3 in that order, a term past the last split taken as 0."""
    z += tl.where(first < n_splits, p0, 0.0)
    z += tl.where(first + 1 < n_splits, p1, 0.0)
    z += tl.where(first + 2 < n_splits, p2, 0.0)
    z += tl.where(first + 3 < n_splits, p3, 0.0)
    return z


@triton.jit
def _fixed_order_sum(v0, v1, v2, v3, v4, v5, v6, v7, TOPK: tl.constexpr, K_PAD: tl.constexpr):
    """_fixed_order_row_sum of the row [v0, .., v_{K_PAD-1}] with the entries past TOPK taken as
    0 (as the pick form's rows hold them), from one vector per position."""
    if TOPK <= 1:
        v1 = tl.zeros_like(v1)
    if TOPK <= 2:
        v2 = tl.zeros_like(v2)
    if TOPK <= 3:
        v3 = tl.zeros_like(v3)
    if TOPK <= 4:
        v4 = tl.zeros_like(v4)
    if TOPK <= 5:
        v5 = tl.zeros_like(v5)
    if TOPK <= 6:
        v6 = tl.zeros_like(v6)
    if TOPK <= 7:
        v7 = tl.zeros_like(v7)
    total = v0 + v1
    if K_PAD >= 4:
        total = total + (v2 + v3)
    if K_PAD >= 8:
        total = total + ((v4 + v5) + (v6 + v7))
    return total


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
def _route_split_kernel(x_ptr, w_ptr, bias_ptr, table_ptr, tok_ids_ptr, weights_ptr, ids_ptr,
                        partial_ptr, score_ptr, cand_ptr, cand_s_ptr, chunk_counter_ptr, tile_counter_ptr,
                        T, dim, n_experts, vocab, stride_x, stride_w, TOPK: tl.constexpr, route_scale, t_bucket,
                        HASH: tl.constexpr, HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                        TAIL_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, REDUCE_BUDGET: tl.constexpr,
                        MERGE_TREE: tl.constexpr):
    """Program (tile, chunk, split): the FP32 logits of BLOCK_T tokens x BLOCK_E experts over
    SPLIT_K of dim, written to its own slot of the partial workspace.  The last split of a
    (tile, chunk) to arrive sums the slots in split order, applies sqrt(softplus) and writes,
    for score routing, the chunk's top ``TOPK`` packed keys in order with their scores (for
    hash routing, the scores); the last chunk of a tile to arrive merges the sorted lists
    (pick kk looks at list positions 0..kk only) and takes the weights from the picks' scores,
    or (hash) reads the scores at the table ids.  Each arriver that acts resets its counter.

    Two forms of the two selections, same results bit for bit (the same keys in the same
    total order, each carrying its score): TOPK picks, each a cross-lane reduction after the
    last (MERGE_TREE off), or one reduction whose combine merges two sorted lists of 8
    (MERGE_TREE on; the chunk's columns first sorted in groups of 4 within a thread): more
    instructions (sm_90, T = 64 tile: chunk stage ~900 against ~680, final ~800 against
    ~620), but 3 + 1 dependent merge steps per selection instead of TOPK x (3 shuffle
    levels + the in-thread fold), which bound the single warp per scheduler that runs them.

    The arrivers' work (the tail) covers the tile's first TAIL_T = min(BLOCK_T, TAIL_ROWS)
    rows: ``route_split`` passes TAIL_ROWS >= T (a power of two), so no live row is left out,
    and a decode step of 1 token reduces and selects 2 rows, not BLOCK_T.  Inputs the tail
    needs that no other program writes (bias; token ids, then table rows) are loaded before
    the arrivals, so their latency is not on the serial chain.

    Reads of x and W are masked to the tensors; every workspace slot index stays below the
    sizes ``route_split`` allocates; hash routing clamps ids as the tiled path does."""
    NC_PAD: tl.constexpr = (E_PAD + BLOCK_E - 1) // BLOCK_E  # chunk lists per token (a power of two)
    N_CAND: tl.constexpr = NC_PAD * K_PAD  # candidate slots per token
    TILE: tl.constexpr = BLOCK_T * BLOCK_E
    if MERGE_TREE:
        tl.static_assert(TOPK <= 8, "the merge tree holds lists of 8")
    TAIL_T: tl.constexpr = BLOCK_T if BLOCK_T <= TAIL_ROWS else TAIL_ROWS
    # Partial tiles summed per step: 16 where they keep at most REDUCE_BUDGET floats of tail rows
    # in flight (32 per thread), else 8 (the loads past the last split are issued too).
    REDUCE_FIT: tl.constexpr = REDUCE_BUDGET // (TAIL_T * BLOCK_E)
    REDUCE_UNROLL: tl.constexpr = 16 if REDUCE_FIT >= 16 else 8
    n_splits = tl.cdiv(dim, SPLIT_K)
    n_chunks = tl.cdiv(n_experts, BLOCK_E)
    pid = tl.program_id(0)
    split = pid % n_splits
    chunk = (pid // n_splits) % n_chunks
    tile = pid // (n_splits * n_chunks)
    rows = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    tok = tile.to(tl.int64) * BLOCK_T + rows
    live = tok < T
    e = chunk * BLOCK_E + cols
    e_live = e < n_experts
    tail_rows = tl.arange(0, TAIL_T)
    tail_tok = tile.to(tl.int64) * BLOCK_T + tail_rows
    tail_live = tail_tok < T
    kcol = tl.arange(0, K_PAD)
    out_col = kcol < TOPK
    if HASH:
        tail_tok_id = tl.load(tok_ids_ptr + tail_tok, mask=tail_live, other=0)
    elif HAS_BIAS:
        e_bias = tl.load(bias_ptr + e, mask=e_live, other=0.0)

    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, SPLIT_K, BLOCK_K):
        k = split * SPLIT_K + k0 + tl.arange(0, BLOCK_K)
        k_live = k < dim
        xt = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=live[:, None] & k_live[None, :], other=0.0)
        wt = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_w + k[None, :],
                     mask=e_live[:, None] & k_live[None, :], other=0.0)
        acc = dot_bf16(xt, tl.trans(wt), acc)
    if HASH:  # the table rows, issued before the arrivals (only the tile's last arriver uses them)
        table_row = tl.minimum(tl.maximum(tail_tok_id.to(tl.int64), 0), vocab - 1)
        table_ids = tl.load(table_ptr + table_row[:, None] * TOPK + kcol[None, :],
                            mask=tail_live[:, None] & out_col[None, :], other=0)
    # Slots of one (tile, chunk) are contiguous, one [BLOCK_T, BLOCK_E] tile per split.
    group = (tile * n_chunks + chunk).to(tl.int64)
    in_tile = rows[:, None] * BLOCK_E + cols[None, :]
    # Rows past T are neither written nor read back (T = 1 moves 1/16 of a 16-row tile).
    tl.store(partial_ptr + (group * n_splits + split) * TILE + in_tile, acc, mask=live[:, None])

    tl.debug_barrier()  # all threads' partials are written before the arrival is published
    arrived = tl.atomic_add(chunk_counter_ptr + group, 1, sem="acq_rel")
    if arrived == n_splits - 1:
        tl.atomic_xchg(chunk_counter_ptr + group, 0, sem="relaxed")
        tail_in_tile = tail_rows[:, None] * BLOCK_E + cols[None, :]
        # Fixed order (split 0, 1, ...), whichever program reduces: bit-identical run to run.
        # A step's loads all precede a barrier and its adds follow it, so every load of the step
        # is in flight at once whatever registers the rest of the kernel leaves the scheduler
        # (without it ptxas may issue them two at a time behind the adds).
        slot = partial_ptr + group * n_splits * TILE + tail_in_tile
        z = tl.zeros([TAIL_T, BLOCK_E], dtype=tl.float32)
        for s0 in range(0, n_splits, REDUCE_UNROLL):
            a0, a1, a2, a3 = _four_partials(slot, s0, n_splits, TILE, tail_live)
            b0, b1, b2, b3 = _four_partials(slot, s0 + 4, n_splits, TILE, tail_live)
            if REDUCE_UNROLL > 8:
                c0, c1, c2, c3 = _four_partials(slot, s0 + 8, n_splits, TILE, tail_live)
                d0, d1, d2, d3 = _four_partials(slot, s0 + 12, n_splits, TILE, tail_live)
            tl.debug_barrier()
            if MERGE_TREE or REDUCE_UNROLL > 8:  # see _xor_bits
                bits = _xor_bits(a0, a1, a2, a3) ^ _xor_bits(b0, b1, b2, b3)
                if REDUCE_UNROLL > 8:
                    bits = bits ^ _xor_bits(c0, c1, c2, c3) ^ _xor_bits(d0, d1, d2, d3)
                z += (bits & -2147483648).to(tl.float32, bitcast=True)  # +0 or -0: the sign bit
            z = _add_four(z, a0, a1, a2, a3, s0, n_splits)
            z = _add_four(z, b0, b1, b2, b3, s0 + 4, n_splits)
            if REDUCE_UNROLL > 8:
                z = _add_four(z, c0, c1, c2, c3, s0 + 8, n_splits)
                z = _add_four(z, d0, d1, d2, d3, s0 + 12, n_splits)
        s = _sqrt_softplus(z)
        if HASH:  # the tile's last arriver reads the scores at the table ids
            tl.store(score_ptr + tail_tok[:, None] * n_experts + e[None, :], s,
                     mask=tail_live[:, None] & e_live[None, :])
        else:
            key = s
            if HAS_BIAS:
                key = s + e_bias[None, :]
            packed = tl.where(e_live[None, :], _packed_key(key, e[None, :]), INT64_MIN)
            if MERGE_TREE:
                top, top_s = _chunk_top8(packed, s, kcol, TOPK)
            else:
                last = tl.full([TAIL_T], INT64_MAX, dtype=tl.int64)
                top = tl.full([TAIL_T, K_PAD], INT64_MIN, dtype=tl.int64)
                top_s = tl.zeros([TAIL_T, K_PAD], dtype=tl.float32)
                for kk in tl.static_range(K_PAD):
                    if kk < TOPK:  # a chunk with fewer live experts than TOPK leaves INT64_MIN (no candidate)
                        last, last_s = tl.reduce(_below(packed, s, last), 1, _larger_key)
                        top = tl.where(kcol[None, :] == kk, last[:, None], top)
                        top_s = tl.where(kcol[None, :] == kk, last_s[:, None], top_s)
            # Position-major lists: entry j of every chunk side by side (see the final selection).
            cand_slot = tail_tok[:, None] * N_CAND + kcol[None, :] * NC_PAD + chunk
            tl.store(cand_ptr + cand_slot, top, mask=tail_live[:, None] & out_col[None, :])
            tl.store(cand_s_ptr + cand_slot, top_s, mask=tail_live[:, None] & out_col[None, :])

        tl.debug_barrier()  # scores and candidates are written before the arrival is published
        done = tl.atomic_add(tile_counter_ptr + tile, 1, sem="acq_rel")
        if done == n_chunks - 1:
            tl.atomic_xchg(tile_counter_ptr + tile, 0, sem="relaxed")
            out_mask = tail_live[:, None] & out_col[None, :]
            if HASH:
                sel_id = tl.minimum(tl.maximum(table_ids, 0), n_experts - 1)
                w = tl.load(score_ptr + tail_tok[:, None] * n_experts + sel_id, mask=out_mask, other=0.0,
                            cache_modifier=".cg")
                w = w / _fixed_order_row_sum(w, K_PAD)[:, None]
                w = w * route_scale
            else:
                c = tl.arange(0, NC_PAD)
                list_slot = tail_tok[:, None] * N_CAND + c[None, :]
                has_list = tail_live[:, None] & (c < n_chunks)[None, :]
                if MERGE_TREE:
                    # One reduction over the chunks whose combine merges two sorted lists
                    # (_merge_top8): log2(NC_PAD) dependent steps in all instead of one
                    # cross-lane reduction per pick.
                    key0, val0 = _list_entry(cand_ptr, cand_s_ptr, list_slot, has_list, 0, NC_PAD, TOPK)
                    key1, val1 = _list_entry(cand_ptr, cand_s_ptr, list_slot, has_list, 1, NC_PAD, TOPK)
                    key2, val2 = _list_entry(cand_ptr, cand_s_ptr, list_slot, has_list, 2, NC_PAD, TOPK)
                    key3, val3 = _list_entry(cand_ptr, cand_s_ptr, list_slot, has_list, 3, NC_PAD, TOPK)
                    key4, val4 = _list_entry(cand_ptr, cand_s_ptr, list_slot, has_list, 4, NC_PAD, TOPK)
                    key5, val5 = _list_entry(cand_ptr, cand_s_ptr, list_slot, has_list, 5, NC_PAD, TOPK)
                    key6, val6 = _list_entry(cand_ptr, cand_s_ptr, list_slot, has_list, 6, NC_PAD, TOPK)
                    key7, val7 = _list_entry(cand_ptr, cand_s_ptr, list_slot, has_list, 7, NC_PAD, TOPK)
                    (key0, key1, key2, key3, key4, key5, key6, key7,
                     val0, val1, val2, val3, val4, val5, val6, val7) = _merge_rows(
                        key0, key1, key2, key3, key4, key5, key6, key7,
                        val0, val1, val2, val3, val4, val5, val6, val7)
                    # The normalising sum from the picks' scores as they come (no [rows, K_PAD]
                    # round trip), in _fixed_order_row_sum's order: the same bits.
                    total = _fixed_order_sum(val0, val1, val2, val3, val4, val5, val6, val7, TOPK, K_PAD)
                    scale = route_scale
                    w = _place(val0 / total * scale, val1 / total * scale, val2 / total * scale,
                               val3 / total * scale, val4 / total * scale, val5 / total * scale,
                               val6 / total * scale, val7 / total * scale, kcol, TOPK)
                    sel_id = _place(_packed_id(key0), _packed_id(key1), _packed_id(key2), _packed_id(key3),
                                    _packed_id(key4), _packed_id(key5), _packed_id(key6), _packed_id(key7), kcol, TOPK)
                else:
                    # Positions past TOPK - 1 are neither written nor read.
                    p0, q0 = _list_position(cand_ptr, cand_s_ptr, list_slot, has_list, 0, NC_PAD)
                    if TOPK > 1:
                        p1, q1 = _list_position(cand_ptr, cand_s_ptr, list_slot, has_list, 1, NC_PAD)
                    if TOPK > 2:
                        p2, q2 = _list_position(cand_ptr, cand_s_ptr, list_slot, has_list, 2, NC_PAD)
                    if TOPK > 3:
                        p3, q3 = _list_position(cand_ptr, cand_s_ptr, list_slot, has_list, 3, NC_PAD)
                    if TOPK > 4:
                        p4, q4 = _list_position(cand_ptr, cand_s_ptr, list_slot, has_list, 4, NC_PAD)
                    if TOPK > 5:
                        p5, q5 = _list_position(cand_ptr, cand_s_ptr, list_slot, has_list, 5, NC_PAD)
                    if TOPK > 6:
                        p6, q6 = _list_position(cand_ptr, cand_s_ptr, list_slot, has_list, 6, NC_PAD)
                    if TOPK > 7:
                        p7, q7 = _list_position(cand_ptr, cand_s_ptr, list_slot, has_list, 7, NC_PAD)
                    last = tl.full([TAIL_T], INT64_MAX, dtype=tl.int64)
                    w = tl.zeros([TAIL_T, K_PAD], dtype=tl.float32)
                    sel_id = tl.zeros([TAIL_T, K_PAD], dtype=tl.int32)
                    for kk in tl.static_range(K_PAD):
                        if kk < TOPK:  # TOPK <= E live candidates exist: every pick is found
                            best, best_s = _below(p0, q0, last)
                            if kk >= 1:
                                best, best_s = _fold_position(best, best_s, p1, q1, last)
                            if kk >= 2:
                                best, best_s = _fold_position(best, best_s, p2, q2, last)
                            if kk >= 3:
                                best, best_s = _fold_position(best, best_s, p3, q3, last)
                            if kk >= 4:
                                best, best_s = _fold_position(best, best_s, p4, q4, last)
                            if kk >= 5:
                                best, best_s = _fold_position(best, best_s, p5, q5, last)
                            if kk >= 6:
                                best, best_s = _fold_position(best, best_s, p6, q6, last)
                            if kk >= 7:
                                best, best_s = _fold_position(best, best_s, p7, q7, last)
                            last, last_s = tl.reduce((best, best_s), 1, _larger_key)
                            w = tl.where(kcol[None, :] == kk, last_s[:, None], w)
                            sel_id = tl.where(kcol[None, :] == kk, _packed_id(last)[:, None], sel_id)
                    w = w / _fixed_order_row_sum(w, K_PAD)[:, None]
                    w = w * route_scale
            out = tail_tok[:, None] * TOPK + kcol[None, :]
            tl.store(weights_ptr + out, w, mask=out_mask)
            tl.store(ids_ptr + out, sel_id, mask=out_mask)

_route_split_tuned = autotune(
    configs=[triton.Config({"BLOCK_T": bt, "BLOCK_E": be, "BLOCK_K": bk, "SPLIT_K": sk,
                            "REDUCE_BUDGET": _reduce_budget(w), "MERGE_TREE": tree}, num_warps=w, num_stages=st)
             for configs, tree in ((_SPLIT_CONFIGS, False), (_TREE_CONFIGS, True))
             for bt, be, bk, sk, w, st in configs],
    key=["n_experts", "dim", "t_bucket", "TOPK"], name="route_split",
    prune_configs_by={"early_config_prune": _split_prune},
)(_route_split_kernel)


class _SplitWorkspace:
    """Partials, scores, candidates (packed keys and their scores) and the two counter arrays
    of the split path, for one (device, stream); grown to the largest sizes seen, counters
    zeroed once (every launch leaves them zero)."""

    def __init__(self, device, n_partial, n_score, n_cand, n_chunk_counters, n_tile_counters):
        self.partial = torch.empty(n_partial, dtype=torch.float32, device=device)
        self.score = torch.empty(n_score, dtype=torch.float32, device=device)
        self.cand = torch.empty(n_cand, dtype=torch.int64, device=device)
        self.cand_s = torch.empty(n_cand, dtype=torch.float32, device=device)
        counters = torch.zeros(n_chunk_counters + n_tile_counters, dtype=torch.int32, device=device)
        self.chunk_counters, self.tile_counters = counters[:n_chunk_counters], counters[n_chunk_counters:]

    def fits(self, n_partial, n_score, n_cand, n_chunk_counters, n_tile_counters):
        return (self.partial.numel() >= n_partial and self.score.numel() >= n_score and self.cand.numel() >= n_cand
                and self.chunk_counters.numel() >= n_chunk_counters and self.tile_counters.numel() >= n_tile_counters)


_split_workspaces: Dict[Tuple, _SplitWorkspace] = {}
# Outgrown workspaces stay allocated: a CUDA graph captured with one keeps its addresses.
_outgrown: List[_SplitWorkspace] = []


def _split_workspace(device: torch.device, *sizes: int) -> _SplitWorkspace:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _split_workspaces.get(key)
    if ws is None or not ws.fits(*sizes):
        if ws is not None:
            _outgrown.append(ws)
            sizes = tuple(max(n, have) for n, have in zip(sizes, (
                ws.partial.numel(), ws.score.numel(), ws.cand.numel(), ws.chunk_counters.numel(),
                ws.tile_counters.numel())))
        ws = _split_workspaces[key] = _SplitWorkspace(device, *sizes)
    return ws


def _check_split_config(config):
    if len(config) not in (6, 7):
        raise ValueError(f"config: expected (BLOCK_T, BLOCK_E, BLOCK_K, SPLIT_K, num_warps, num_stages[, "
                         f"MERGE_TREE]), got {config}")
    bt, be, bk, sk = config[:4]
    pow2 = all(v >= 16 and v & (v - 1) == 0 for v in (bt, be, bk, sk))
    if not pow2 or sk < bk or bt > MAX_TAIL_ROWS:
        raise ValueError(f"config: expected powers of two >= 16 with SPLIT_K >= BLOCK_K and BLOCK_T <= "
                         f"{MAX_TAIL_ROWS}, got {config}")


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
    e_pad = triton.next_power_of_2(n_experts)
    room = max(T, SPLIT_ROOM_T)
    if config is None:  # sized for every split config (BLOCK_T, BLOCK_E divide 64; SPLIT_K >= 128)
        rows = triton.cdiv(room, SPLIT_TILE_ALIGN) * SPLIT_TILE_ALIGN
        cols = triton.cdiv(n_experts, SPLIT_TILE_ALIGN) * SPLIT_TILE_ALIGN
        n_splits, block_t, block_e = triton.cdiv(dim, MIN_SPLIT_K), MIN_BLOCK_E, MIN_BLOCK_E
    else:
        _check_split_config(config)
        if len(config) == 7 and config[6] and topk > TREE_MAX_TOPK:
            raise ValueError(f"config: MERGE_TREE holds top-k up to {TREE_MAX_TOPK}, got topk = {topk}")
        block_t, block_e = config[0], config[1]
        rows = triton.cdiv(room, block_t) * block_t
        cols = triton.cdiv(n_experts, block_e) * block_e
        n_splits = triton.cdiv(dim, config[3])
    n_tiles = triton.cdiv(room, block_t)
    ws = _split_workspace(x.device, rows * cols * n_splits, room * n_experts,
                          room * triton.cdiv(e_pad, block_e) * k_pad, n_tiles * triton.cdiv(n_experts, block_e),
                          n_tiles)
    args = (x, weight, *optional, weights, ids, ws.partial, ws.score, ws.cand, ws.cand_s, ws.chunk_counters,
            ws.tile_counters, T, dim, n_experts, tid2eid.shape[0] if hash_mode else 1, x.stride(0), weight.stride(0),
            topk, route_scale, token_bucket(T))
    meta = dict(HASH=hash_mode, HAS_BIAS=bias is not None, K_PAD=k_pad, E_PAD=e_pad,
                TAIL_ROWS=min(MAX_TAIL_ROWS, max(2, triton.next_power_of_2(T))))
    grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]) * triton.cdiv(n_experts, m["BLOCK_E"])
                      * triton.cdiv(dim, m["SPLIT_K"]),)
    if config is None:
        _route_split_tuned[grid](*args, **meta)
    else:
        bt, be, bk, sk, w, st = config[:6]
        _route_split_kernel[grid(dict(BLOCK_T=bt, BLOCK_E=be, SPLIT_K=sk))](
            *args, **meta, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, SPLIT_K=sk, REDUCE_BUDGET=_reduce_budget(w),
            MERGE_TREE=bool(config[6]) if len(config) == 7 else False, num_warps=w, num_stages=st)
    return weights, ids


@register("route", "triton")
def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tid2eid: Optional[torch.Tensor],
          token_ids: Optional[torch.Tensor], topk: int, route_scale: float):
    """Decode sizes (T <= DECODE_MAX_T) take the split path, larger T the tiled one."""
    if x.shape[0] <= DECODE_MAX_T:
        return route_split(x, weight, bias, tid2eid, token_ids, topk, route_scale)
    return route_tiled(x, weight, bias, tid2eid, token_ids, topk, route_scale)
