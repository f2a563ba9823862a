"""FP32 oracles: manifold-constrained hyper-connections, n = 4 streams (SPEC section 9).

The mixes ``fn @ flatten(X)`` are accumulated in FP64 and rounded once to FP32: the oracle
is then independent of summation order and of TF32 matmul settings on a GPU, and every
later step is plain FP32 in the order SPEC writes it.
"""

from __future__ import annotations

import torch

from ..registry import register

HC_MULT = 4


def _mixes(X: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """``(fn v) * rsqrt(mean(v^2) + norm_eps)`` per token, v = flatten(X) (FP32 [T, fn rows])."""
    v = X.reshape(X.shape[0], -1)
    mix = (v.double() @ fn.double().T).float()
    vf = v.float()
    return mix * torch.rsqrt(vf.square().mean(-1, keepdim=True) + norm_eps)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """SPEC 9: softmax over rows + eps, normalise columns, then ``iters - 1`` times rows then
    columns, each divisor ``+ eps``.  ``logits`` [..., 4, 4] FP32 -> same shape."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


@register("hc_pre", "reference")
def hc_pre(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           iters: int, eps: float, norm_eps: float):
    n = HC_MULT
    scale, base = scale.float(), base.float()
    mix = _mixes(X, fn, norm_eps)
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
    logits = mix[:, 2 * n:].reshape(-1, n, n) * scale[2] + base[2 * n:].reshape(n, n)
    comb = sinkhorn(logits, iters, eps)
    y = (pre.unsqueeze(-1) * X.float()).sum(1)
    return y.to(torch.bfloat16), post, comb


@register("hc_post", "reference")
def hc_post(F: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    # X'_j = post_j * F + sum_i comb[i][j] * X_i
    mixed = (comb.float().unsqueeze(-1) * X.float().unsqueeze(2)).sum(1)
    out = post.float().unsqueeze(-1) * F.float().unsqueeze(1) + mixed
    return out.to(torch.bfloat16)


@register("hc_head", "reference")
def hc_head(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            eps: float, norm_eps: float) -> torch.Tensor:
    mix = _mixes(X, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.float()[0] + base.float()) + eps
    return (pre.unsqueeze(-1) * X.float()).sum(1).to(torch.bfloat16)
