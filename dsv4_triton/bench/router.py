"""Benchmark cases: the router family (route) at V4-Pro size (E = 384, dim 7168, top-6) and
V4-Flash size (E = 256, dim 4096).

Prefill (T = 4096): 22.5 GFLOP against 64 MB moved, past the H100's ridge point, so the
ceiling is the bf16 matmul rate; target >= 3x eager (the tiled path).  Decode (T = 64, 8, 1:
the split path, T <= DECODE_MAX_T = 256): the router weight (5.5 MB Pro, 2 MB Flash) dominates
the bytes (ceiling: copy bandwidth); target < 15 us at T = 64, one launch.  At T = 256 (the
split path's last size) both paths run forced, to check that the split path still pays
there.  ``eager`` is the
release's reference code as a user would write it in torch: FP32 ``F.linear`` (the weight
"used in FP32"), softplus, sqrt, topk, gather, normalise.
"""

import torch
import torch.nn.functional as F

from .. import ops
from ..kernels import router as kern
from ..reference import router as ref
from .case import Case

TOPK, VOCAB = 6, 129280
SIZES = {"Pro": (384, 7168, 2.5), "Flash": (256, 4096, 1.5)}  # E, dim, route_scale


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _score_inputs(T, E, dim):
    def make(seed):
        g = _gen(seed)
        x = torch.randn(T, dim, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(E, dim, device="cuda", generator=g) * dim ** -0.5).to(torch.bfloat16)
        bias = torch.randn(E, device="cuda", generator=g) * 0.1
        return x, w, bias
    return make


def _hash_inputs(T, E, dim):
    def make(seed):
        x, w, _ = _score_inputs(T, E, dim)(seed)
        g = _gen(seed + 1000)
        table = torch.randint(0, E, (VOCAB, TOPK), device="cuda", generator=g, dtype=torch.int32)
        token_ids = torch.randint(0, VOCAB, (T,), device="cuda", generator=g)
        return x, w, table, token_ids
    return make


def _eager_score(route_scale):
    def run(x, w, bias):
        scores = F.softplus(F.linear(x.float(), w.float())).sqrt()
        ids = (scores + bias).topk(TOPK, dim=-1).indices
        weights = scores.gather(1, ids)
        return weights / weights.sum(-1, keepdim=True) * route_scale, ids.int()
    return run


def _eager_hash(route_scale):
    def run(x, w, table, token_ids):
        scores = F.softplus(F.linear(x.float(), w.float())).sqrt()
        ids = table[token_ids]
        weights = scores.gather(1, ids.long())
        return weights / weights.sum(-1, keepdim=True) * route_scale, ids
    return run


def _bytes(T, E, dim, hash_mode=False):
    io = T * dim * 2 + E * dim * 2 + T * TOPK * 8
    return io + (T * (8 + TOPK * 4) if hash_mode else E * 4)


def _score_case(size, T):
    E, dim, scale = SIZES[size]
    return Case(op="route", shape=f"T={T} E={E} dim={dim} score", make_inputs=_score_inputs(T, E, dim),
                run=lambda x, w, b: ops.route(x, w, b, topk=TOPK, route_scale=scale),
                eager=_eager_score(scale), oracle=lambda x, w, b: ref.route(x, w, b, None, None, TOPK, scale),
                bytes=_bytes(T, E, dim), flops=2 * T * E * dim, ceiling="bf16" if T >= 1024 else "copy",
                launches=1)


def _hash_case(size, T):
    E, dim, scale = SIZES[size]
    return Case(op="route", shape=f"T={T} E={E} dim={dim} hash", make_inputs=_hash_inputs(T, E, dim),
                run=lambda x, w, tab, tid: ops.route(x, w, tid2eid=tab, token_ids=tid, topk=TOPK, route_scale=scale),
                eager=_eager_hash(scale), oracle=lambda x, w, tab, tid: ref.route(x, w, None, tab, tid, TOPK, scale),
                bytes=_bytes(T, E, dim, hash_mode=True), flops=2 * T * E * dim,
                ceiling="bf16" if T >= 1024 else "copy", launches=1,
                notes="computes all E scores, as score routing does" if T >= 1024 else "")


def _path_case(T, path):
    """Pro score routing through one path forced, to check the split/tiled choice at a T
    above DECODE_MAX_T."""
    E, dim, scale = SIZES["Pro"]
    launcher = {"split": kern.route_split, "tiled": kern.route_tiled}[path]
    return Case(op="route", shape=f"T={T} E={E} dim={dim} score, {path} path", make_inputs=_score_inputs(T, E, dim),
                run=lambda x, w, b: launcher(x, w, b, None, None, TOPK, scale),
                eager=_eager_score(scale), oracle=lambda x, w, b: ref.route(x, w, b, None, None, TOPK, scale),
                bytes=_bytes(T, E, dim), flops=2 * T * E * dim, ceiling="copy", launches=1)


# Split-path tiles side by side at Pro T = 64, whatever the tuner keeps: 16-row tiles (W read
# from L2 by four token tiles) and 64-row ones (W read once).
FORM_TILES = ((16, 32, 128, 512, 4, 3), (64, 32, 128, 512, 8, 3))


def _form_case(T, config):
    """Pro score routing on the split path with one explicit config."""
    E, dim, scale = SIZES["Pro"]
    form = f"{config[0]}x{config[1]} {config[4]} warps"
    return Case(op="route", shape=f"T={T} E={E} dim={dim} score, split {form}",
                make_inputs=_score_inputs(T, E, dim),
                run=lambda x, w, b: kern.route_split(x, w, b, None, None, TOPK, scale, config=config),
                eager=_eager_score(scale), oracle=lambda x, w, b: ref.route(x, w, b, None, None, TOPK, scale),
                bytes=_bytes(T, E, dim), flops=2 * T * E * dim, ceiling="copy", launches=1)


def cases(quick: bool):
    out = [_score_case("Pro", T) for T in (4096, 64, 8, 1)]
    out += [_score_case("Flash", T) for T in (64, 8, 1)]
    out += [_hash_case("Pro", T) for T in (4096, 64)]
    out += [_path_case(256, "split"), _path_case(256, "tiled")]
    out += [_form_case(64, config) for config in FORM_TILES]
    if not quick:
        out += [_hash_case("Pro", 1), _hash_case("Flash", 64)]
    return out
