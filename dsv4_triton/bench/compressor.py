"""Benchmark cases: compress_entries (SPEC 6) over a 16k-token prefill, in its BF16 form
and its encoded cache-row form (compress_entries_to_cache), and store_window_kv.

The windows are strided views of the token-major FP32 projections ``a = wkv x`` and
``z = wgate x``, as prefill builds them.  Minimum traffic: every projection value read
once (ratio 4: each token's lo half feeds the next entry, its hi half its own entry, so
each of the 2d channels is read once), ``ape`` and ``norm_w`` once, the BF16 entries
(or their encoded rows, plus the entry ids and destination rows) written once; memory
bound, so the roof is the copy bandwidth.  store_window_kv: each token's BF16 kv and
position read once, its 584-byte row written once.
"""

import torch

from .. import ops
from ..reference import compressor as ref
from ..reference import quant as ref_quant
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


def _inputs(seed, ratio, d):
    """(a, z, ape, norm_w, freqs, entry_idx) of a TOKENS-token prompt: every complete window."""
    c = 2 if ratio == 4 else 1
    n_entries = TOKENS // ratio
    lead = ratio if ratio == 4 else 0
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = c * d
    a_tok = torch.randn(lead + TOKENS, width, device="cuda", generator=g)
    z_tok = torch.randn(lead + TOKENS, width, device="cuda", generator=g) * 2
    ape = torch.randn(ratio, width, device="cuda", generator=g)
    norm_w = torch.rand(d, device="cuda", generator=g) + 0.5
    freqs = ops.rope_freqs(ROPE_DIM, TOKENS, 160000.0, YARN, device="cuda")
    entry_idx = torch.arange(n_entries, device="cuda")
    return (_windows(a_tok, ratio, n_entries), _windows(z_tok, ratio, n_entries), ape, norm_w, freqs, entry_idx)


def _case(ratio, kind, d):
    c = 2 if ratio == 4 else 1
    n_entries = TOKENS // ratio

    def make(seed):
        return _inputs(seed, ratio, d)

    nbytes = 2 * TOKENS * c * d * 4 + ratio * c * d * 4 + d * 4 + n_entries * (8 + d * 2)
    return Case(
        op="compress_entries", shape=f"T={TOKENS} ratio={ratio} d={d} kind={kind}", make_inputs=make,
        run=lambda a, z, ape, w, f, i: ops.compress_entries(a, z, ape, w, f, i, ratio, kind),
        eager=lambda a, z, ape, w, f, i: _eager(a, z, ape, w, f, i, ratio, kind),
        oracle=lambda a, z, ape, w, f, i: ref.compress_entries(a, z, ape, w, f, i, ratio, kind, 1e-6),
        bytes=nbytes, ceiling="copy", launches=1,
        notes="fused pooling + rmsnorm + RoPE + encode; target >= 70% of copy")


WINDOW = 128


def _encoded_case(ratio, kind, d):
    """The prefill's entries written as cache rows of one request (``[W + n, row]``)."""
    c = 2 if ratio == 4 else 1
    n_entries = TOKENS // ratio
    row_bytes = ref.encode_rows(torch.zeros(1, d), kind).shape[-1]

    def make(seed):
        inputs = _inputs(seed, ratio, d)
        cache = torch.zeros(1, WINDOW + n_entries, row_bytes, dtype=torch.uint8, device="cuda")
        return (*inputs, cache, WINDOW + inputs[-1])

    def run(a, z, ape, w, f, i, cache, rows):
        ops.compress_entries_to_cache(a, z, ape, w, f, i, cache, rows, ratio, kind)
        return cache

    def eager(a, z, ape, w, f, i, cache, rows):
        cache.view(-1, row_bytes)[rows] = ref.encode_rows(_eager(a, z, ape, w, f, i, ratio, kind), kind)
        return cache

    def oracle(a, z, ape, w, f, i, cache, rows):
        expected = torch.zeros_like(cache)
        ref.compress_entries_to_cache(a, z, ape, w, f, i, expected, rows, ratio, kind, 1e-6)
        return expected

    nbytes = 2 * TOKENS * c * d * 4 + ratio * c * d * 4 + d * 4 + n_entries * (8 + 8 + row_bytes)
    return Case(
        op="compress_entries_to_cache", shape=f"T={TOKENS} ratio={ratio} d={d} kind={kind} rows={row_bytes}B",
        make_inputs=make, run=run, eager=eager, oracle=oracle, bytes=nbytes, ceiling="copy", launches=1,
        notes="fused pooling + rmsnorm + RoPE + encode into cache rows; error = fraction of differing bytes "
              "(codes one step apart where the FP32 value sits on a rounding boundary); target >= 70% of copy")


def _window_case(batch, seq, d=512):
    """A decode step of ``batch`` requests (seq 1), or a prefill of ``batch`` requests of
    ``seq`` <= W tokens (every token lands in its ring slot)."""
    row_bytes = ref.encode_rows(torch.zeros(1, d), "kv").shape[-1]

    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        kv = torch.randn(batch, seq, d, device="cuda", generator=g).to(torch.bfloat16)
        start = torch.randint(0, 4096, (batch, 1), device="cuda", generator=g)
        positions = start + torch.arange(seq, device="cuda")
        freqs = ops.rope_freqs(ROPE_DIM, 8192, 160000.0, YARN, device="cuda")
        cache = torch.zeros(batch, WINDOW + 8, row_bytes, dtype=torch.uint8, device="cuda")
        return kv, freqs, positions, cache

    def run(kv, freqs, positions, cache):
        ops.store_window_kv(kv, freqs, positions, cache, WINDOW)
        return cache

    def eager(kv, freqs, positions, cache):
        rows = ref.encode_rows(ref_quant.rope_qat8(kv, freqs, positions, 64), "kv")
        batch_ids = torch.arange(batch, device=kv.device)[:, None]
        cache[batch_ids, positions % WINDOW] = rows
        return cache

    def oracle(kv, freqs, positions, cache):
        expected = torch.zeros_like(cache)
        ref.store_window_kv(kv, freqs, positions, expected, WINDOW, None)
        return expected

    tokens = batch * seq
    return Case(
        op="store_window_kv", shape=f"B={batch} S={seq} D={d} W={WINDOW}", make_inputs=make, run=run, eager=eager,
        oracle=oracle, bytes=tokens * (2 * d + 8 + row_bytes), ceiling="copy", launches=1,
        notes="RoPE + qat8 + FP8 row encode into the ring slots; error = fraction of differing bytes (0 expected); "
              + ("decode-sized: launch-latency bound" if seq == 1 else "target >= 70% of copy"))


def cases(quick: bool):
    shapes = [(4, "kv", 512), (128, "kv", 512)] if quick else \
        [(4, "kv", 512), (128, "kv", 512), (4, "indexer", 128)]
    encoded = [(4, "kv", 512), (128, "kv", 512), (4, "indexer", 128)]
    return ([_case(ratio, kind, d) for ratio, kind, d in shapes]
            + [_encoded_case(ratio, kind, d) for ratio, kind, d in encoded]
            + [_window_case(128, 128), _window_case(64, 1)])
