"""Benchmark cases: swiglu (memory bound: gate and up read once, the output written once)."""

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import activation as ref
from .case import Case

LIMIT = 10.0


def _eager(gate, up, weight=None):
    h = F.silu(gate.float().clamp(max=LIMIT)) * up.float().clamp(-LIMIT, LIMIT)
    if weight is not None:
        h = weight * h
    return h.to(gate.dtype)


def _make(rows, inter, fused, weighted):
    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        if fused:  # the two halves of one [T, 2 * inter] w1/w3 projection
            h = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16, generator=g) * 4
            gate, up = h[:, :inter], h[:, inter:]
        else:
            gate = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 4
            up = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 4
        if not weighted:
            return gate, up
        return gate, up, torch.rand(rows, 1, device="cuda", generator=g)
    return make


def cases(quick: bool):
    shapes = [(16384, 3072, False, False), (16384, 3072, True, True)]
    if not quick:
        shapes += [(65536, 2048, True, True), (16384, 2048, False, False)]
    out = []
    for rows, inter, fused, weighted in shapes:
        layout = "halves of [T, 2n]" if fused else "two tensors"
        shape = f"[{rows}, {inter}]x2 bf16 ({layout}{', row weight' if weighted else ''})"
        out.append(Case(op="swiglu", shape=shape, make_inputs=_make(rows, inter, fused, weighted),
                        run=lambda *a: ops.swiglu(a[0], a[1], LIMIT, *a[2:]), eager=_eager,
                        oracle=lambda *a: ref.swiglu(a[0], a[1], LIMIT, a[2] if len(a) > 2 else None),
                        bytes=3 * rows * inter * 2 + (rows * 4 if weighted else 0), launches=1))
    return out
