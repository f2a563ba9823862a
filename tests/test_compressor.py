"""compress_entries: the oracle against SPEC 6 written out by hand, the Triton kernel against the oracle."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, set_checks
from dsv4_triton.reference import compressor as ref
from dsv4_triton.reference import norm as ref_norm
from dsv4_triton.reference import quant as ref_quant
from dsv4_triton.reference import rope as ref_rope

ROPE_DIM = 64
YARN = dict(factor=16, original_max_position_embeddings=64, beta_fast=32, beta_slow=1)


def rope_table(max_pos, device="cpu"):
    return ops.rope_freqs(ROPE_DIM, max_pos, 160000.0, YARN, device=device)


def token_projections(g, n_tokens, width, z_scale=1.0):
    """Token-major ``wkv x`` and ``wgate x`` of a sequence (FP32 ``[T, width]``)."""
    return torch.randn(n_tokens, width, generator=g), torch.randn(n_tokens, width, generator=g) * z_scale


def windows(tokens, ratio, n_entries):
    """The ``[N, L, c*d]`` window view prefill builds over token-major projections whose
    row 0 is the first entry's first slot: for ratio 4 that is the previous window's
    first token (garbage for entry 0)."""
    width = tokens.shape[1]
    slots = 2 * ratio if ratio == 4 else ratio
    return tokens.as_strided((n_entries, slots, width), (ratio * width, width, 1))


def pool_by_hand(a_tok, z_tok, ape, ratio, entry, offset):
    """SPEC 6 pooling of entry ``entry`` from token-major projections, slot by slot.
    ``offset``: token index of row 0 of ``a_tok``."""
    if ratio == 128:
        rows = range(128 * entry, 128 * entry + 128)
        scores = torch.stack([z_tok[t - offset] + ape[t % 128] for t in rows])
        values = torch.stack([a_tok[t - offset] for t in rows])
    else:
        d = a_tok.shape[1] // 2
        hi = [(t, d) for t in range(4 * entry, 4 * entry + 4)]
        lo = [(t, 0) for t in range(4 * entry - 4, 4 * entry)] if entry > 0 else []
        scores = torch.stack([z_tok[t - offset, h:h + d] + ape[t % 4, h:h + d] for t, h in lo + hi])
        values = torch.stack([a_tok[t - offset, h:h + d] for t, h in lo + hi])
    weights = torch.exp(scores - scores.max(0).values)
    return (weights * values).sum(0) / weights.sum(0)


@given(ratio=st.sampled_from([4, 128]), first_entry=st.integers(0, 3), n_entries=st.integers(1, 3),
       d=st.sampled_from([128, 192]), seed=st.integers(0, 2**31))
def test_pooling_oracle_matches_spec_by_hand(ratio, first_entry, n_entries, d, seed):
    g = torch.Generator().manual_seed(seed)
    c = 2 if ratio == 4 else 1
    lead = ratio if ratio == 4 else 0
    n_tokens = lead + ratio * n_entries
    a_tok, z_tok = token_projections(g, n_tokens, c * d, z_scale=3.0)
    if first_entry == 0 and lead:
        # Entry 0 has no previous window: whatever lies before it must not matter.
        a_tok[:lead] = float("nan")
        z_tok[:lead] = float("inf")
    ape = torch.randn(ratio, c * d, generator=g)
    entry_idx = torch.arange(first_entry, first_entry + n_entries)
    pooled = ref.pool_windows(windows(a_tok, ratio, n_entries),
                              windows(z_tok, ratio, n_entries), ape, entry_idx, ratio)
    offset = ratio * first_entry - lead
    for n in range(n_entries):
        expected = pool_by_hand(a_tok, z_tok, ape, ratio, first_entry + n, offset)
        torch.testing.assert_close(pooled[n], expected, rtol=1e-5, atol=1e-6)


@given(ratio=st.sampled_from([4, 128]), kind=st.sampled_from(["kv", "indexer"]), n_entries=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_oracle_finishing_steps_follow_spec(ratio, kind, n_entries, seed):
    """After pooling: rmsnorm, RoPE at ratio * i, then the encode step; checked through its
    invariants (QAT grid, pair norms of the rotation, the Hadamard being orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    d = 128
    c = 2 if ratio == 4 else 1
    a = torch.randn(n_entries, 2 * ratio if ratio == 4 else ratio, c * d, generator=g)
    z = torch.randn(a.shape, generator=g)
    ape = torch.randn(ratio, c * d, generator=g)
    norm_w = torch.rand(d, generator=g) + 0.5
    entry_idx = torch.randint(0, 8, (n_entries,), generator=g)
    freqs = rope_table(8 * ratio)
    out = ops.compress_entries(a, z, ape, norm_w, freqs, entry_idx, ratio, kind)
    assert out.dtype == torch.bfloat16 and out.shape == (n_entries, d)
    normed = ref_norm.rms_norm(ref.pool_windows(a, z, ape, entry_idx, ratio), norm_w, 1e-6)
    roped = ref_rope.apply_rope(normed, freqs, entry_idx * ratio, False)
    y = out.float()
    if kind == "kv":
        nope = y[:, :d - ROPE_DIM]
        assert torch.equal(ref_quant.qat8(nope, 64, True), nope)  # on the FP8 grid, pow2 scales
        assert torch.equal(ref_quant.qat8(roped[:, :d - ROPE_DIM], 64, True), nope)
        torch.testing.assert_close(y[:, d - ROPE_DIM:], roped[:, d - ROPE_DIM:], rtol=2 ** -8, atol=1e-6)
    else:
        assert torch.equal(ref_quant.qat4(y, 32), y)  # on the MXFP4 grid
        h = torch.eye(d) @ ref_quant.sylvester(d, torch.device("cpu")) * d ** -0.5
        assert torch.equal(ref_quant.qat4(roped @ h, 32), y)
    # RoPE keeps each rotated pair's length.
    pairs = roped[:, d - ROPE_DIM:].reshape(n_entries, ROPE_DIM // 2, 2).norm(dim=-1)
    torch.testing.assert_close(pairs, normed[:, d - ROPE_DIM:].reshape(n_entries, ROPE_DIM // 2, 2).norm(dim=-1))


@pytest.mark.parametrize("ratio", [4, 128])
def test_no_entries_give_an_empty_result(device, ratio):
    args = _args(ratio=ratio, n=0)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = ops.compress_entries(**args)
    assert out.shape == (0, 128) and out.dtype == torch.bfloat16


def _args(ratio=4, d=128, n=3, kind="kv", **over):
    c = 2 if ratio == 4 else 1
    slots = 8 if ratio == 4 else 128
    args = dict(a=torch.zeros(n, slots, c * d), z=torch.zeros(n, slots, c * d), ape=torch.zeros(ratio, c * d),
                norm_w=torch.ones(d), freqs=rope_table(64), entry_idx=torch.arange(n), ratio=ratio, kind=kind)
    args.update(over)
    return args


@pytest.mark.parametrize("over, err, name", [
    (dict(a=torch.zeros(3, 8, 256, dtype=torch.bfloat16)), TypeError, "a"),
    (dict(a=torch.zeros(3, 7, 256)), ValueError, "a"),
    (dict(a=torch.zeros(3, 8, 255), z=torch.zeros(3, 8, 255)), ValueError, "a"),
    (dict(z=torch.zeros(3, 8, 128)), ValueError, "z"),
    (dict(ape=torch.zeros(4, 128)), ValueError, "ape"),
    (dict(ape=torch.zeros(4, 256, dtype=torch.float64)), TypeError, "ape"),
    (dict(norm_w=torch.ones(64)), ValueError, "norm_w"),
    (dict(freqs=torch.zeros(64, 32)), ValueError, "freqs"),
    (dict(entry_idx=torch.arange(3).float()), TypeError, "entry_idx"),
    (dict(entry_idx=torch.arange(4)), ValueError, "entry_idx"),
    (dict(ratio=8), ValueError, "ratio"),
    (dict(kind="value"), ValueError, "kind"),
    (dict(eps=0.0), ValueError, "eps"),
    # kv: d - rope_dim must be a positive multiple of 64; indexer: d a Hadamard size.
    (dict(a=torch.zeros(3, 8, 160), z=torch.zeros(3, 8, 160), ape=torch.zeros(4, 160), norm_w=torch.ones(80)),
     ValueError, "a"),
    (dict(a=torch.zeros(3, 8, 384), z=torch.zeros(3, 8, 384), ape=torch.zeros(4, 384), norm_w=torch.ones(192),
          kind="indexer"), ValueError, "a"),
])
def test_bad_input(over, err, name):
    with pytest.raises(err, match=name):
        ops.compress_entries(**_args(**over))


def test_checked_mode_rejects_positions_past_the_table():
    args = _args(entry_idx=torch.tensor([0, 1, 16]))  # 4 * 16 = 64 = freqs.shape[0]
    set_checks(True)
    try:
        with pytest.raises(ValueError, match="entry_idx"):
            ops.compress_entries(**args)
    finally:
        set_checks(False)
