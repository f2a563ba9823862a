"""Benchmark cases: rms_norm (memory bound: one read, one write)."""

import torch

from .. import ops
from ..reference import norm as ref
from .case import Case


def _eager(x, w):
    xf = x.float()
    return (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))).to(x.dtype)


def cases(quick: bool):
    shapes = [(16384, 4096), (8192, 7168)] if quick else [(16384, 4096), (8192, 7168), (65536, 1024),
                                                          (4096, 512), (64, 7168)]
    out = []
    for rows, n in shapes:
        def make(seed, rows=rows, n=n):
            g = torch.Generator(device="cuda").manual_seed(seed)
            x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g)
            w = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
            return x, w
        out.append(Case(op="rms_norm", shape=f"[{rows}, {n}] bf16", make_inputs=make,
                        run=lambda x, w: ops.rms_norm(x, w), eager=_eager,
                        oracle=lambda x, w: ref.rms_norm(x, w, 1e-6),
                        bytes=2 * rows * n * 2 + 2 * n, launches=1))
    return out
