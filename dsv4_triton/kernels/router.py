"""Triton MoE router: scores, top-k and weights in one launch.

Program ``(tile, chunk)`` computes the logits ``x @ W^T`` of ``BLOCK_T`` tokens against
``BLOCK_E`` experts over the whole dim (``tl.dot``, BF16 operands, FP32 accumulation: the
BF16 products are exact, so this is an FP32 dot in another summation order), then
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

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..autotune import autotune, token_bucket
from ..registry import register
from .formats import dot_bf16

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


@register("route", "triton")
def route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tid2eid: Optional[torch.Tensor],
          token_ids: Optional[torch.Tensor], topk: int, route_scale: float, config=None):
    T, dim = x.shape
    n_experts = weight.shape[0]
    weights = torch.empty((T, topk), dtype=torch.float32, device=x.device)
    ids = torch.empty((T, topk), dtype=torch.int32, device=x.device)
    if T == 0:
        return weights, ids
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    hash_mode = tid2eid is not None
    k_pad = max(2, triton.next_power_of_2(topk))  # tensors of width 1 are avoided
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
    args = (x, weight, bias if bias is not None else x, tid2eid.contiguous() if hash_mode else x,
            token_ids if hash_mode else x, weights, ids, cand_s, cand_id, counters,
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
