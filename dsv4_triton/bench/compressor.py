"""Benchmark cases: compress_entries (SPEC 6) over a 16k-token prefill.

The windows are strided views of the token-major FP32 projections ``a = wkv x`` and
``z = wgate x``, as prefill builds them.  Minimum traffic: every projection value read
once (ratio 4: each token's lo half feeds the next entry, its hi half its own entry, so
each of the 2d channels is read once), ``ape`` and ``norm_w`` once, the BF16 entries
written once; memory bound, so the roof is the copy bandwidth.
"""

import torch

from .. import ops
from ..reference import compressor as ref
from .case import Case

TOKENS = 16384
ROPE_DIM = 64
YARN = dict(factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)


def _windows(tokens, ratio, n_entries):
    width = tokens.shape[1]
    slots = 2 * ratio if ratio == 4 else ratio
    return tokens.as_strided((n_entries, slots, width), (ratio * width, width, 1))


def _eager(a, z, ape, norm_w, freqs, entry_idx, ratio, kind):
    """What a user writes in torch, after the release's Compressor (FP32 pooling)."""
    if ratio == 4:
        d = a.shape[-1] // 2
        a = torch.cat((a[:, :4, :d], a[:, 4:, d:]), 1)
        score = torch.cat((z[:, :4, :d] + ape[:, :d], z[:, 4:, d:] + ape[:, d:]), 1)
        first = (entry_idx == 0)[:, None, None] & (torch.arange(8, device=a.device) < 4)[None, :, None]
        score = score.masked_fill(first, float("-inf"))
        a = a.masked_fill(first, 0.0)
    else:
        score = z + ape
    c = (a * score.softmax(dim=1)).sum(1)
    c = norm_w * c * torch.rsqrt(c.square().mean(-1, keepdim=True) + 1e-6)
    cs = freqs[entry_idx * ratio]
    rope = c[:, -ROPE_DIM:].unflatten(-1, (-1, 2))
    x0, x1 = rope[..., 0], rope[..., 1]
    rot = torch.stack((x0 * cs[..., 0] - x1 * cs[..., 1], x0 * cs[..., 1] + x1 * cs[..., 0]), -1).flatten(-2)
    c = torch.cat((c[:, :-ROPE_DIM], rot), -1)
    if kind == "kv":
        nope = c[:, :-ROPE_DIM].unflatten(-1, (-1, 64))
        s = torch.exp2(torch.ceil(torch.log2(nope.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448)))
        nope = (nope / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
        return torch.cat((nope.flatten(-2), c[:, -ROPE_DIM:]), -1).to(torch.bfloat16)
    n = c.shape[-1]
    h = torch.ones(1, 1, device=c.device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    c = (c @ h * n ** -0.5).unflatten(-1, (-1, 32))
    s = torch.exp2(torch.ceil(torch.log2(c.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0 ** -126) / 6)))
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=c.device)
    v = (c / s).clamp(-6, 6)
    mag = grid[torch.bucketize(v.abs(), (grid[1:] + grid[:-1]) / 2)]  # ties: a user's nearest, not RNE
    return (torch.sign(v) * mag * s).flatten(-2).to(torch.bfloat16)


def _case(ratio, kind, d):
    c = 2 if ratio == 4 else 1
    n_entries = TOKENS // ratio
    lead = ratio if ratio == 4 else 0

    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        width = c * d
        a_tok = torch.randn(lead + TOKENS, width, device="cuda", generator=g)
        z_tok = torch.randn(lead + TOKENS, width, device="cuda", generator=g) * 2
        ape = torch.randn(ratio, width, device="cuda", generator=g)
        norm_w = torch.rand(d, device="cuda", generator=g) + 0.5
        freqs = ops.rope_freqs(ROPE_DIM, TOKENS, 160000.0, YARN, device="cuda")
        entry_idx = torch.arange(n_entries, device="cuda")
        return (_windows(a_tok, ratio, n_entries), _windows(z_tok, ratio, n_entries), ape, norm_w, freqs,
                entry_idx)

    nbytes = 2 * TOKENS * c * d * 4 + ratio * c * d * 4 + d * 4 + n_entries * (8 + d * 2)
    return Case(
        op="compress_entries", shape=f"T={TOKENS} ratio={ratio} d={d} kind={kind}", make_inputs=make,
        run=lambda a, z, ape, w, f, i: ops.compress_entries(a, z, ape, w, f, i, ratio, kind),
        eager=lambda a, z, ape, w, f, i: _eager(a, z, ape, w, f, i, ratio, kind),
        oracle=lambda a, z, ape, w, f, i: ref.compress_entries(a, z, ape, w, f, i, ratio, kind, 1e-6),
        bytes=nbytes, ceiling="copy", launches=1,
        notes="fused pooling + rmsnorm + RoPE + encode; target >= 70% of copy")


def cases(quick: bool):
    shapes = [(4, "kv", 512), (128, "kv", 512)] if quick else \
        [(4, "kv", 512), (128, "kv", 512), (4, "indexer", 128)]
    return [_case(ratio, kind, d) for ratio, kind, d in shapes]
