"""Benchmark cases: the router family (route) at V4-Pro size (E = 384, dim 7168, top-6).

Prefill (T = 4096): 22.5 GFLOP against 64 MB moved, past the H100's ridge point, so the
ceiling is the bf16 matmul rate; target >= 3x eager.  Decode (T = 64, T = 1): the 5.5 MB
router weight dominates the bytes (ceiling: copy bandwidth); target < 15 us at T = 64, one
launch.  ``eager`` is the release's reference code as a user would write it in torch: FP32
``F.linear`` (the weight "used in FP32"), softplus, sqrt, topk, gather, normalise.
"""

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import router as ref
from .case import Case

E, DIM, TOPK, ROUTE_SCALE, VOCAB = 384, 7168, 6, 2.5, 129280


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _score_inputs(T):
    def make(seed):
        g = _gen(seed)
        x = torch.randn(T, DIM, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(E, DIM, device="cuda", generator=g) * DIM ** -0.5).to(torch.bfloat16)
        bias = torch.randn(E, device="cuda", generator=g) * 0.1
        return x, w, bias
    return make


def _hash_inputs(T):
    def make(seed):
        x, w, _ = _score_inputs(T)(seed)
        g = _gen(seed + 1000)
        table = torch.randint(0, E, (VOCAB, TOPK), device="cuda", generator=g, dtype=torch.int32)
        token_ids = torch.randint(0, VOCAB, (T,), device="cuda", generator=g)
        return x, w, table, token_ids
    return make


def _eager_score(x, w, bias):
    scores = F.softplus(F.linear(x.float(), w.float())).sqrt()
    ids = (scores + bias).topk(TOPK, dim=-1).indices
    weights = scores.gather(1, ids)
    return weights / weights.sum(-1, keepdim=True) * ROUTE_SCALE, ids.int()


def _eager_hash(x, w, table, token_ids):
    scores = F.softplus(F.linear(x.float(), w.float())).sqrt()
    ids = table[token_ids]
    weights = scores.gather(1, ids.long())
    return weights / weights.sum(-1, keepdim=True) * ROUTE_SCALE, ids


def _bytes(T, hash_mode=False):
    io = T * DIM * 2 + E * DIM * 2 + T * TOPK * 8
    return io + (T * (8 + TOPK * 4) if hash_mode else E * 4)


def cases(quick: bool):
    out = []
    for T in (4096, 64) if quick else (4096, 64, 1):
        out.append(Case(op="route", shape=f"T={T} E={E} dim={DIM} score", make_inputs=_score_inputs(T),
                        run=lambda x, w, b: ops.route(x, w, b, topk=TOPK, route_scale=ROUTE_SCALE),
                        eager=_eager_score, oracle=lambda x, w, b: ref.route(x, w, b, None, None, TOPK, ROUTE_SCALE),
                        bytes=_bytes(T), flops=2 * T * E * DIM, ceiling="bf16" if T >= 1024 else "copy",
                        launches=1))
    for T in (4096, 64):
        out.append(Case(op="route", shape=f"T={T} E={E} dim={DIM} hash", make_inputs=_hash_inputs(T),
                        run=lambda x, w, tab, tid: ops.route(x, w, tid2eid=tab, token_ids=tid, topk=TOPK,
                                                             route_scale=ROUTE_SCALE),
                        eager=_eager_hash,
                        oracle=lambda x, w, tab, tid: ref.route(x, w, None, tab, tid, TOPK, ROUTE_SCALE),
                        bytes=_bytes(T, hash_mode=True), flops=2 * T * E * DIM,
                        ceiling="bf16" if T >= 1024 else "copy", launches=1,
                        notes="computes all E scores, as score routing does" if T == 4096 else ""))
    return out
