"""Benchmark cases: rms_norm (memory bound: one read, one write) and rms_norm_act_quant (one
read; the normed rows, their FP8 codes and scales written), beside which the two ops it
replaces in the model's prefill (``rms_norm`` then ``act_quant``) are timed back to back."""

import torch

from .. import ops
from ..reference import norm as ref
from .case import Case


def _eager(x, w):
    xf = x.float()
    return (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))).to(x.dtype)


def _act_quant_eager(y):
    yb = y.float().unflatten(-1, (-1, 128))
    s = torch.exp2(torch.ceil(torch.log2(yb.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0)))
    return (yb / s).clamp(-448, 448).to(torch.float8_e4m3fn).flatten(-2), s.squeeze(-1)


def _quant_eager(x, w):
    y = _eager(x, w)
    return (y, *_act_quant_eager(y))


def _two_ops(x, w):
    y = ops.rms_norm(x, w)
    return (y, *ops.act_quant(y))


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
    for rows, n in [(4096, 7168), (16384, 4096)]:
        def make(seed, rows=rows, n=n):
            g = torch.Generator(device="cuda").manual_seed(seed)
            x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g)
            return x, torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
        written = rows * n * 2 + rows * n + rows * (n // 128) * 4  # y, codes, scales
        out.append(Case(op="rms_norm_act_quant", shape=f"[{rows}, {n}] bf16", make_inputs=make,
                        run=lambda x, w: ops.rms_norm_act_quant(x, w), eager=_quant_eager,
                        oracle=lambda x, w: ref.rms_norm(x, w, 1e-6), bytes=rows * n * 2 + written + 2 * n,
                        launches=1, notes="one pass; error column: y against the oracle"))
        out.append(Case(op="rms_norm + act_quant", shape=f"[{rows}, {n}] bf16", make_inputs=make, run=_two_ops,
                        oracle=lambda x, w: ref.rms_norm(x, w, 1e-6), bytes=rows * n * 2 + written + 2 * n,
                        launches=2, notes="the two ops rms_norm_act_quant replaces (same bytes counted)"))
    return out
