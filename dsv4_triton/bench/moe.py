"""Benchmark cases: moe_experts at V4 sizes.

Expert weights (Pro: 384 experts x 3 x 3072 x 7168 FP4 = 12.7 GB with scales) are built
once on the GPU from random codes and shared by every input set of a size: they are far
larger than L2, so no call finds another's weights cached.  Routing is uniform: each token
picks k distinct experts at random, weights in [0.05, 2].

* decode (T = 64, k = 6): weight-stream bound.  Bytes = the FP4 weights and E8M0 scales
  of the distinct experts the routing touches (expected ``E (1 - (1 - k/E)^T)``, about 244
  of 384 for Pro) + x + y; ceiling = copy bandwidth.  Target: time <= 1.4 x bytes / copy
  bandwidth, i.e. >= 71% of the ceiling.
* prefill (T = 4096 and 8192): FLOP = 2 T k 3 dim inter; ceiling = the FP8 matmul rate.  Target
  >= 60% of it.

Both run what dispatch picks (the ``cuda`` backend where it is built: decode kernels anywhere,
prefill kernels on sm90a); ``moe_experts[triton]`` times the Triton path on the same inputs.

``eager`` (decode only) is the per-expert loop a user writes: for each expert, its tokens,
dequantised weights, three matmuls; prefill has none (it dequantises all 12.7 GB per call).
"""

import torch

from .. import ops, use_backend
from ..reference import moe as ref
from .case import Case, runs_cuda

SIZES = {"pro": (384, 7168, 3072), "flash": (256, 4096, 2048)}  # experts, dim, inter
TOPK = 6
_WEIGHTS = {}


def _weights(name):
    if name not in _WEIGHTS:
        _WEIGHTS.clear()  # one size resident at a time
        n_experts, dim, inter = SIZES[name]
        g = torch.Generator(device="cuda").manual_seed(0)

        def fp4(rows, cols):  # random bytes, in the packed layout
            codes, scales = ref.packed_shapes(n_experts, rows, cols)
            packed = torch.randint(0, 256, codes, device="cuda", generator=g, dtype=torch.uint8)
            e = torch.randint(-9, -5, scales, device="cuda", generator=g, dtype=torch.int32)
            return packed, (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)

        _WEIGHTS[name] = (*fp4(2 * inter, dim), *fp4(dim, inter))
    return _WEIGHTS[name]


def _make(name, t):
    n_experts, dim, _ = SIZES[name]

    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(t, dim, device="cuda", generator=g).to(torch.bfloat16)
        ids = torch.rand(t, n_experts, device="cuda", generator=g).argsort(dim=1)[:, :TOPK].to(torch.int32)
        w = torch.rand(t, TOPK, device="cuda", generator=g) * 1.95 + 0.05
        return (x, w, ids, *_weights(name))
    return make


def _triton_moe(*args):
    with use_backend("triton", ops=["moe_experts"]):
        return ops.moe_experts(*args)


def _expert_bytes(dim, inter):
    return 3 * dim * inter // 2 + 3 * dim * inter // 32


def _prefill_runs_cuda(name, t):
    """Whether dispatch sends the prefill case to the ``cuda`` backend's prefill kernels here."""
    n_experts, dim, inter = SIZES[name]
    meta = dict(device="meta")
    (codes13, scales13), (codes2, scales2) = (ref.packed_shapes(n_experts, 2 * inter, dim),
                                              ref.packed_shapes(n_experts, dim, inter))
    return runs_cuda("moe_experts", torch.empty(t, dim, dtype=torch.bfloat16, **meta),
                     torch.empty(t, TOPK, **meta), torch.empty(t, TOPK, dtype=torch.int32, **meta),
                     torch.empty(codes13, dtype=torch.uint8, **meta), torch.empty(scales13, dtype=torch.uint8, **meta),
                     torch.empty(codes2, dtype=torch.uint8, **meta), torch.empty(scales2, dtype=torch.uint8, **meta),
                     10.0, "mxfp4")


def cases(quick: bool):
    out = []
    for name in ("pro",) if quick else ("pro", "flash"):
        n_experts, dim, inter = SIZES[name]
        t = 64
        touched = n_experts * (1 - (1 - TOPK / n_experts) ** t)
        out.append(Case(op="moe_experts", shape=f"{name} decode T={t} k={TOPK} E={n_experts} dim={dim} inter={inter}",
                        make_inputs=_make(name, t), run=ops.moe_experts,
                        eager=lambda *a: ref.moe_experts(*a, 10.0, "mxfp4"), compile_eager=False,
                        oracle=lambda *a: ref.moe_experts(*a, 10.0, "mxfp4"),
                        bytes=int(touched * _expert_bytes(dim, inter)) + 4 * t * dim,
                        flops=2 * t * TOPK * 3 * dim * inter, ceiling="copy",
                        launches=7,  # activation pre-pass, align (count, scan, scatter), w13, w2, combine
                        notes=f"bytes: the ~{touched:.0f} experts touched (expected); target >= 71% of copy"))
        out.append(Case(op="moe_experts[triton]", shape=out[-1].shape, make_inputs=_make(name, t), run=_triton_moe,
                        oracle=lambda *a: ref.moe_experts(*a, 10.0, "mxfp4"), bytes=out[-1].bytes,
                        flops=out[-1].flops, ceiling="copy", launches=7))
        for t in (4096, 8192):  # a 4096-token prompt (~64 pairs an expert in Pro), and twice that
            out.append(Case(op="moe_experts",
                            shape=f"{name} prefill T={t} k={TOPK} E={n_experts} dim={dim} inter={inter}",
                            make_inputs=_make(name, t), run=ops.moe_experts,
                            oracle=lambda *a: ref.moe_experts(*a, 10.0, "mxfp4"),
                            bytes=n_experts * _expert_bytes(dim, inter) + 4 * t * dim,
                            flops=2 * t * TOPK * 3 * dim * inter, ceiling="fp8",
                            # align (count, scan, scatter), sorted act_quant, w13, act_quant, w2, combine;
                            # the Triton path: align, activation pre-pass, w13, w2, combine
                            launches=8 if _prefill_runs_cuda(name, t) else 7,
                            notes="target >= 60% of the fp8 matmul rate"))
            out.append(Case(op="moe_experts[triton]", shape=out[-1].shape, make_inputs=_make(name, t),
                            run=_triton_moe, oracle=lambda *a: ref.moe_experts(*a, 10.0, "mxfp4"),
                            bytes=out[-1].bytes, flops=out[-1].flops, ceiling="fp8", launches=7))
    return out
