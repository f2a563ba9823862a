"""Benchmark cases: the mhc family (hc_pre, hc_post, hc_head) at V4-Pro / V4-Flash sizes.

All three are memory bound (ceiling: copy bandwidth).  Bytes are the minimum traffic: X
(and F) read once, outputs written once, fn read once.  hc_pre and hc_head read X twice (mix
partials, then finalise + y; at decode sizes in one launch), the second time partly from L2,
so their bound is ~55-65% of copy at T = 4096; hc_post targets >= 80%.  At decode hc_pre's bytes
are mostly ``fn`` (24 x 4*dim FP32 = 2.75 MB at dim 7168), which the mix kernel spreads over
dim / CHUNK programs.

``eager`` is the torch a user would write from the release's reference code (FP32 mixes
with F.linear, Sinkhorn as a Python loop of tensor ops).
"""

import torch
import torch.nn.functional as F

from .. import ops
from ..kernels import mhc as kern
from ..reference import mhc as ref
from .case import Case

PREFILL_T = 4096
DECODE_T = (1, 8, 64)
DIMS = (7168, 4096)  # Pro, Flash


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _pre_inputs(T, dim, n_mix):
    def make(seed):
        g = _gen(seed)
        X = torch.randn(T, 4, dim, device="cuda", generator=g).to(torch.bfloat16)
        fn = torch.randn(n_mix, 4 * dim, device="cuda", generator=g) * (4 * dim) ** -0.5
        scale = torch.full((3 if n_mix == 24 else 1,), 0.5, device="cuda")
        base = torch.randn(n_mix, device="cuda", generator=g)
        return X, fn, scale, base
    return make


def _post_inputs(T, dim):
    def make(seed):
        g = _gen(seed)
        Fo = torch.randn(T, dim, device="cuda", generator=g).to(torch.bfloat16)
        X = torch.randn(T, 4, dim, device="cuda", generator=g).to(torch.bfloat16)
        post = 2 * torch.rand(T, 4, device="cuda", generator=g)
        comb = torch.rand(T, 4, 4, device="cuda", generator=g)
        return Fo, X, post, comb
    return make


def _eager_pre(X, fn, scale, base, iters=20, eps=1e-6):
    T = X.shape[0]
    x = X.flatten(1).float()
    mix = F.linear(x, fn) * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(mix[:, :4] * scale[0] + base[:4]) + eps
    post = 2 * torch.sigmoid(mix[:, 4:8] * scale[1] + base[4:8])
    comb = torch.softmax((mix[:, 8:] * scale[2] + base[8:]).view(T, 4, 4), -1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    y = (pre.unsqueeze(-1) * X.float()).sum(1).to(torch.bfloat16)
    return y, post, comb


def _eager_head(X, fn, scale, base, eps=1e-6):
    x = X.flatten(1).float()
    mix = F.linear(x, fn) * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(mix * scale[0] + base) + eps
    return (pre.unsqueeze(-1) * X.float()).sum(1).to(torch.bfloat16)


def _eager_post(Fo, X, post, comb):
    y = post.unsqueeze(-1) * Fo.float().unsqueeze(1) + (comb.unsqueeze(-1) * X.float().unsqueeze(2)).sum(1)
    return y.to(torch.bfloat16)


def _pre_bytes(T, dim, n_mix, with_post_comb=True):
    x, y, fn = T * 4 * dim * 2, T * dim * 2, n_mix * 4 * dim * 4
    return x + y + fn + (T * (16 + 64) if with_post_comb else 0)


def _launches(T: int) -> int:
    """One at decode sizes (mix and finalise in one launch); else fn split, mix, y."""
    return 1 if T <= kern.SPLIT_IN_LOOP_MAX_T else 3


def cases(quick: bool):
    out = []
    dims = DIMS[:1] if quick else DIMS
    decode = (1, 64) if quick else DECODE_T
    for dim in dims:
        for T in (PREFILL_T,) + (decode if dim == DIMS[0] else ()):
            out.append(Case(op="hc_pre", shape=f"T={T} dim={dim}", make_inputs=_pre_inputs(T, dim, 24),
                            run=ops.hc_pre, eager=_eager_pre,
                            oracle=lambda X, fn, s, b: ref.hc_pre(X, fn, s, b, 20, 1e-6, 1e-6),
                            bytes=_pre_bytes(T, dim, 24), flops=2 * T * 24 * 4 * dim, ceiling="copy",
                            launches=_launches(T),
                            notes="fn (2.75 MB at dim 7168) dominates the bytes" if T == 1 and dim == 7168 else ""))
            out.append(Case(op="hc_post", shape=f"T={T} dim={dim}", make_inputs=_post_inputs(T, dim),
                            run=ops.hc_post, eager=_eager_post, oracle=ref.hc_post,
                            bytes=T * dim * 2 + 2 * T * 4 * dim * 2 + T * (16 + 64), ceiling="copy", launches=1))
        for T in (PREFILL_T, 1) if dim == DIMS[0] else (PREFILL_T,):
            out.append(Case(op="hc_head", shape=f"T={T} dim={dim}", make_inputs=_pre_inputs(T, dim, 4),
                            run=ops.hc_head, eager=_eager_head,
                            oracle=lambda X, fn, s, b: ref.hc_head(X, fn, s, b, 1e-6, 1e-6),
                            bytes=_pre_bytes(T, dim, 4, with_post_comb=False), flops=2 * T * 4 * 4 * dim,
                            ceiling="copy", launches=_launches(T)))
    return out
