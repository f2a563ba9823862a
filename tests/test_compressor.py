"""compress_entries: the oracle against SPEC 6 written out by hand, the Triton kernel against the oracle;
the encoded cache-row forms (compress_entries with cache/rows, compress_entries_to_cache,
store_window_kv) byte for byte against pack_kv_fp8 / pack_indexer_keys of the BF16 values."""

import pytest
import torch
import triton
from hypothesis import given, strategies as st

from dsv4_triton import ops, set_checks, use_backend
from dsv4_triton.reference import attention as ref_attention
from dsv4_triton.reference import compressor as ref
from dsv4_triton.reference import indexer as ref_indexer
from dsv4_triton.reference import norm as ref_norm
from dsv4_triton.reference import quant as ref_quant
from dsv4_triton.reference import rope as ref_rope
from helpers import ULP, assert_close

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


# --- the Triton kernel against the oracle ------------------------------------------------

def _run_triton(*args, **kw):
    with use_backend("triton"):
        return ops.compress_entries(*args, **kw)


def _fp8_spacing(m):
    """Distance between neighbouring E4M3 values at magnitude ``m`` (subnormal step 2^-9)."""
    return torch.exp2(torch.floor(torch.log2(m.clamp_min(2.0 ** -6))) - 3)


def _fp4_spacing(m):
    return torch.where(m < 2, 0.5, torch.where(m < 4, 1.0, 2.0))


def assert_matches_oracle(out, a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps=1e-6):
    """The kernel's entries against the oracle's.

    Before the encode step the two differ by FP32 rounding only (exp, rsqrt, division and
    summation order).  So: NaN exactly where the oracle has NaN; the unquantised RoPE dims
    (kind "kv") within one BF16 rounding plus 2^-16 of the row's largest value; each
    quantised value on the QAT grid and equal to the oracle's, or one grid step apart where
    the FP32 value sits on a rounding boundary (two steps if the block's amax sits on a
    power of two and the scale doubles).  FP32 rounding moves a value across a BF16 or QAT
    rounding boundary with probability ~2^-14 or less, so at most 0.1% of the values (plus
    two values, or one block whose scale flipped) may differ from the oracle at all: a
    systematic error far below one BF16 step still fails that count.
    """
    args = (a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps)
    cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args]
    expected = ref.compress_entries(*cpu).float()
    got = out.float().cpu()
    assert out.dtype == torch.bfloat16 and got.shape == expected.shape
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), "NaN positions differ"
    n, d = got.shape
    pooled = ref.pool_windows(cpu[0], cpu[1], cpu[2], cpu[5], ratio)
    v = ref_rope.apply_rope(ref_norm.rms_norm(pooled, cpu[3].float(), eps), cpu[4], cpu[5].long() * ratio, False)
    if kind == "kv":
        row_max = v.abs().amax(-1, keepdim=True).nan_to_num(0.0)
        assert_close(got[:, d - ROPE_DIM:], expected[:, d - ROPE_DIM:], rtol=ULP[torch.bfloat16],
                     atol=float(2.0 ** -16 * row_max.max()), what="rope dims")
        rope_fin = ~torch.isnan(expected[:, d - ROPE_DIM:])
        differing = int((got[:, d - ROPE_DIM:] != expected[:, d - ROPE_DIM:])[rope_fin].sum())
        assert differing <= 2 + rope_fin.sum() // 1000, f"rope dims: {differing} values differ from the oracle"
        got, expected, v = got[:, :d - ROPE_DIM], expected[:, :d - ROPE_DIM], v[:, :d - ROPE_DIM]
        block, qmax, floor, spacing, qat = 64, 448.0, ref_quant.FP8_AMAX_FLOOR, _fp8_spacing, \
            lambda x: ref_quant.qat8(x, 64, True)
    else:
        v = ref_quant.hadamard(v)
        block, qmax, floor, spacing, qat = 32, 6.0, ref_quant.FP4_AMAX_FLOOR, _fp4_spacing, \
            lambda x: ref_quant.qat4(x, 32)
    fin = ~torch.isnan(expected)
    assert torch.equal(qat(got)[fin], got[fin]), "kernel values off the QAT grid"
    vb = v.reshape(n, -1, block)
    scale = torch.exp2(torch.ceil(torch.log2(vb.abs().amax(-1, keepdim=True).clamp_min(floor) / qmax)))
    scale = scale.expand_as(vb).reshape(got.shape)
    mag = torch.maximum(got.abs(), expected.abs()) / scale
    bound = 2 * scale * spacing(mag)
    err = (got - expected).abs()
    assert bool((err[fin] <= bound[fin]).all()), f"{kind}: a value more than one grid step from the oracle"
    differing = int((err[fin] > 0).sum())
    assert differing <= block + fin.sum() // 1000, f"{kind}: {differing} quantised values differ from the oracle"


@given(ratio=st.sampled_from([4, 128]), kind=st.sampled_from(["kv", "indexer"]), n_entries=st.integers(1, 5),
       wide=st.booleans(), z_scale=st.sampled_from([1.0, 30.0, 1e4]), a_scale=st.sampled_from([1e-3, 1.0, 1e3]),
       token_major=st.booleans(), seed=st.integers(0, 2**31))
def test_kernel_matches_oracle(device, ratio, kind, n_entries, wide, z_scale, a_scale, token_major, seed):
    """Both ratios and kinds, odd entry counts, entry 0 (no previous window), d not a power
    of two (kind kv), saturated softmaxes (large z), strided window views."""
    g = torch.Generator().manual_seed(seed)
    d = (192 if wide else 128) if kind == "kv" else (256 if wide and ratio == 4 else 64 if wide else 128)
    c = 2 if ratio == 4 else 1
    slots = 2 * ratio if ratio == 4 else ratio
    first = int(torch.randint(0, 3, (), generator=g))
    if token_major:
        lead = ratio if ratio == 4 else 0
        a_tok, z_tok = token_projections(g, lead + ratio * n_entries, c * d, z_scale)
        a, z = windows(a_tok * a_scale, ratio, n_entries), windows(z_tok, ratio, n_entries)
        entry_idx = torch.arange(first, first + n_entries)
    else:
        a = torch.randn(n_entries, slots, c * d, generator=g) * a_scale
        z = torch.randn(n_entries, slots, c * d, generator=g) * z_scale
        entry_idx = torch.randint(0, 40, (n_entries,), generator=g)
        entry_idx[0] = 0
    ape = torch.randn(ratio, c * d, generator=g)
    norm_w = torch.rand(d, generator=g) + 0.5
    freqs = rope_table(40 * ratio + 1)
    args = [t.to(device) for t in (a, z, ape, norm_w, freqs, entry_idx.to(torch.int32 if seed % 2 else torch.int64))]
    out = _run_triton(*args, ratio, kind)
    assert_matches_oracle(out, *args, ratio, kind)


@pytest.mark.parametrize("ratio, kind", [(4, "kv"), (4, "indexer"), (128, "kv")])
def test_kernel_nan_and_absent_slots(device, ratio, kind):
    """A NaN in a present slot poisons its entry (as in the oracle); a NaN or Inf in the
    absent previous window of entry 0 changes nothing."""
    g = torch.Generator().manual_seed(1)
    d, c = 128, (2 if ratio == 4 else 1)
    slots = 2 * ratio if ratio == 4 else ratio
    a = torch.randn(3, slots, c * d, generator=g)
    z = torch.randn(3, slots, c * d, generator=g)
    entry_idx = torch.tensor([0, 5, 6])
    if ratio == 4:
        a[0, :4] = float("nan")
        z[0, :4] = float("inf")
    a[1, slots - 1, -1] = float("nan")  # a used channel of entry 1
    ape = torch.randn(ratio, c * d, generator=g)
    norm_w = torch.rand(d, generator=g) + 0.5
    args = [t.to(device) for t in (a, z, ape, norm_w, rope_table(8 * ratio), entry_idx)]
    out = _run_triton(*args, ratio, kind)
    assert not torch.isnan(out[0].float()).any() and not torch.isnan(out[2].float()).any()
    assert torch.isnan(out[1].float()).all()
    assert_matches_oracle(out, *args, ratio, kind)


def test_kernel_clamps_positions_past_the_table(device):
    """Unchecked mode: entries whose position ratio * i passes the table rotate at its last
    row (as the oracle's apply_rope clamps), and nothing is read out of bounds."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 8, 256, generator=g)
    z = torch.randn(2, 8, 256, generator=g)
    args = [t.to(device) for t in (a, z, torch.randn(4, 256, generator=g), torch.rand(128, generator=g) + 0.5,
                                   rope_table(16), torch.tensor([3, 1000]))]
    out = _run_triton(*args, 4, "kv")
    assert_matches_oracle(out, *args, 4, "kv")


@pytest.mark.gpu
@pytest.mark.parametrize("ratio, kind, d", [(4, "kv", 512), (128, "kv", 512), (4, "indexer", 128), (128, "indexer", 128)])
def test_kernel_matches_oracle_at_model_size(device, ratio, kind, d):
    """Prefill-sized: 4096 tokens as a strided view of token-major projections."""
    g = torch.Generator().manual_seed(ratio + d)
    c = 2 if ratio == 4 else 1
    n_entries = 4096 // ratio
    lead = ratio if ratio == 4 else 0
    a_tok, z_tok = token_projections(g, lead + ratio * n_entries, c * d, z_scale=4.0)
    a_tok, z_tok = a_tok.to(device), z_tok.to(device)
    a, z = windows(a_tok, ratio, n_entries), windows(z_tok, ratio, n_entries)
    ape = torch.randn(ratio, c * d, generator=g).to(device)
    norm_w = (torch.rand(d, generator=g) + 0.5).to(device)
    entry_idx = torch.arange(n_entries, device=device)
    freqs = rope_table(4096, device)
    out = _run_triton(a, z, ape, norm_w, freqs, entry_idx, ratio, kind)
    assert_matches_oracle(out, a, z, ape, norm_w, freqs, entry_idx, ratio, kind)


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
    (dict(freqs=torch.zeros(64, 16, 2)), ValueError, "freqs"),
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


# --- encoded cache rows --------------------------------------------------------------------

SENTINEL = 0xA5  # bytes no encoder writes at a row's pad: a skipped row must keep them


def _row_bytes(kind, d):
    return ref_attention.fp8_row_bytes(d) if kind == "kv" else ref_indexer.FP4_KEY_BYTES


def _reference_rows(values, kind):
    """The oracle's cache rows of BF16 entries: the pack_* of the reader ops' families."""
    values = values.cpu()
    return ref_attention.pack_kv_fp8(values) if kind == "kv" else ref_indexer.pack_indexer_keys(values)


def _entry_inputs(g, ratio, d, n_entries, a_scale=1.0, z_scale=1.0):
    c = 2 if ratio == 4 else 1
    slots = 2 * ratio if ratio == 4 else ratio
    a = torch.randn(n_entries, slots, c * d, generator=g) * a_scale
    z = torch.randn(n_entries, slots, c * d, generator=g) * z_scale
    ape = torch.randn(ratio, c * d, generator=g)
    norm_w = torch.rand(d, generator=g) + 0.5
    entry_idx = torch.randint(0, 8, (n_entries,), generator=g)
    entry_idx[0] = 0
    return a, z, ape, norm_w, rope_table(8 * ratio), entry_idx


def assert_rows_written(cache, before, rows, expected_rows):
    """Row ``rows[i]`` of the flat cache holds ``expected_rows[i]`` bit for bit; every row no
    entry targets (-1 or out of range) is exactly as before."""
    flat, flat_before = cache.cpu().view(-1, cache.shape[-1]), before.view(-1, before.shape[-1])
    targets = rows.tolist()
    for i, r in enumerate(targets):
        if 0 <= r < flat.shape[0]:
            assert torch.equal(flat[r], expected_rows[i]), f"row {r} (entry {i}) differs from pack_* of its values"
    untouched = [r for r in range(flat.shape[0]) if r not in targets]
    assert torch.equal(flat[untouched], flat_before[untouched]), "a row no entry targets was written"


@pytest.mark.parametrize("backend", ["triton", "reference"])
@given(ratio=st.sampled_from([4, 128]), kind=st.sampled_from(["kv", "indexer"]), n_entries=st.integers(1, 5),
       wide=st.booleans(), a_scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**31))
def test_encoded_rows_equal_pack_of_values(device, backend, ratio, kind, n_entries, wide, a_scale, seed):
    """Both kinds and ratios, entry 0, -1 rows skipped, int32/int64 rows: the cache rows the
    fused launch writes are pack_* of the BF16 entries it returns, bit for bit; the values
    equal compress_entries' own, and the rows-only form writes the same bytes."""
    g = torch.Generator().manual_seed(seed)
    d = 512 if wide and kind == "kv" else 128
    args = [t.to(device) for t in _entry_inputs(g, ratio, d, n_entries, a_scale)]
    n_rows = 2 * n_entries + 1
    rows = torch.randperm(n_rows, generator=g)[:n_entries]
    rows[torch.rand(n_entries, generator=g) < 0.3] = -1
    rows = rows.to(torch.int32 if seed % 2 else torch.int64).to(device)
    rb = _row_bytes(kind, d)
    before = torch.randint(0, 256, (n_rows, rb), generator=g, dtype=torch.uint8)
    cache = before.clone().to(device)
    with use_backend(backend):
        values = ops.compress_entries(*args, ratio, kind, cache=cache, rows=rows)
        plain = ops.compress_entries(*args, ratio, kind)
        rows_only = before.clone().to(device)
        ops.compress_entries_to_cache(*args, rows_only, rows, ratio, kind)
    assert torch.equal(values, plain), "the fused form changed the entries"
    assert_rows_written(cache, before, rows.cpu(), _reference_rows(values, kind))
    assert torch.equal(rows_only, cache), "the rows-only form wrote other bytes"
    if backend == "triton":
        assert_matches_oracle(values, *args, ratio, kind)


@pytest.mark.parametrize("ratio, kind", [(4, "kv"), (4, "indexer"), (128, "kv")])
def test_encoded_rows_of_nan_entries_and_out_of_range_rows(device, ratio, kind):
    """A NaN entry encodes as pack_* encodes NaN (NaN codes, scale byte 0xFF); rows past the
    cache (unchecked mode) are skipped, never written out of bounds."""
    g = torch.Generator().manual_seed(3)
    a, z, ape, norm_w, freqs, entry_idx = _entry_inputs(g, ratio, 128, 3)
    a[1, -1, -1] = float("nan")  # a used channel of entry 1 (the last slot's hi half)
    args = [t.to(device) for t in (a, z, ape, norm_w, freqs, entry_idx)]
    rows = torch.tensor([2, 0, 4], device=device)  # 4 is past the 4 x 1 rows below
    before = torch.full((4, 1, _row_bytes(kind, 128)), SENTINEL, dtype=torch.uint8)
    cache = before.clone().to(device)
    with use_backend("triton"):
        values = ops.compress_entries(*args, ratio, kind, cache=cache, rows=rows)
    assert torch.isnan(values[1].float()).all()
    assert_rows_written(cache, before, rows.cpu(), _reference_rows(values, kind))
    set_checks(True)
    try:
        with pytest.raises(ValueError, match="rows"):
            ops.compress_entries_to_cache(*args, cache, rows, ratio, kind)
    finally:
        set_checks(False)


@pytest.mark.parametrize("ratio", [4, 128])
def test_encoded_kv_rows_into_a_cache_off_8_byte_alignment(device, ratio):
    """A cache whose rows start one byte past an 8-byte boundary gets the same bytes as an
    aligned one: the rope values go out a byte at a time there (a 2-byte store at an odd
    address faults on a GPU)."""
    g = torch.Generator().manual_seed(ratio + 5)
    args = [t.to(device) for t in _entry_inputs(g, ratio, 512, 3)]
    rows = torch.tensor([2, -1, 0], device=device)
    rb = _row_bytes("kv", 512)
    aligned = torch.zeros(4, rb, dtype=torch.uint8, device=device)
    shifted = torch.zeros(4 * rb + 1, dtype=torch.uint8, device=device)[1:].view(4, rb)
    with use_backend("triton"):
        for cache in (aligned, shifted):
            ops.compress_entries_to_cache(*args, cache, rows, ratio, "kv")
        values = ops.compress_entries(*args, ratio, "kv")
    assert_rows_written(aligned, torch.zeros(4, rb, dtype=torch.uint8), rows.cpu(), _reference_rows(values, "kv"))
    assert torch.equal(shifted, aligned)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio, kind, d", [(4, "kv", 512), (128, "kv", 512), (4, "indexer", 128)])
def test_encoded_rows_at_model_size(device, ratio, kind, d):
    """Prefill-sized (4096 tokens, strided windows) into a [requests, W + entries, row] cache:
    the fused launch's rows are pack_* of its values; the rows-only launch (decode's) writes
    the same bytes, which needs both to pool in the same order (one tuned config)."""
    g = torch.Generator().manual_seed(ratio + d + 1)
    c = 2 if ratio == 4 else 1
    n_entries = 4096 // ratio
    lead = ratio if ratio == 4 else 0
    a_tok, z_tok = token_projections(g, lead + ratio * n_entries, c * d, z_scale=4.0)
    a, z = windows(a_tok.to(device), ratio, n_entries), windows(z_tok.to(device), ratio, n_entries)
    ape = torch.randn(ratio, c * d, generator=g).to(device)
    norm_w = (torch.rand(d, generator=g) + 0.5).to(device)
    entry_idx = torch.arange(n_entries, device=device)
    freqs = rope_table(4096, device)
    cache = torch.zeros(2, 128 + n_entries, _row_bytes(kind, d), dtype=torch.uint8, device=device)
    rows = (128 + n_entries) + 128 + entry_idx  # request 1, entry j at W + j
    with use_backend("triton"):
        values = ops.compress_entries(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, cache=cache, rows=rows)
        rows_only = torch.zeros_like(cache)
        ops.compress_entries_to_cache(a, z, ape, norm_w, freqs, entry_idx, rows_only, rows, ratio, kind)
    assert torch.equal(cache[1, 128:].cpu(), _reference_rows(values, kind))
    assert not cache[0].any() and not cache[1, :128].any()
    assert torch.equal(rows_only, cache)
    assert_matches_oracle(values, a, z, ape, norm_w, freqs, entry_idx, ratio, kind)


@pytest.mark.parametrize("ratio, kind, d", [(4, "indexer", 128),
                                           pytest.param(4, "indexer", 64, marks=pytest.mark.gpu),
                                           pytest.param(128, "indexer", 256, marks=pytest.mark.gpu),
                                           pytest.param(4, "kv", 192, marks=pytest.mark.gpu)])
def test_every_config_matches_oracle_and_packs(device, ratio, kind, d):
    """Each config the tuner may pick for the shape (entries a program, slots a step, warps,
    pipeline depth), so a tuned choice other than the tests' first config is covered too:
    the entries against the oracle, the rows pack_* of the values.  An odd entry count: a
    last program with padding rows whatever its entry count.  The interpreter ignores warps
    and stages, so on the CPU one config per entry count, fewer entries.  (FP4 key rows
    exist for d = 128 only.)"""
    from dsv4_triton.kernels import compressor as kern

    g = torch.Generator().manual_seed(d + ratio)
    n_entries = 37 if device == "cuda" else 19
    args = [t.to(device) for t in _entry_inputs(g, ratio, d, n_entries, z_scale=4.0)]
    slots = 2 * ratio if ratio == 4 else ratio
    configs = [cfg for cfg in kern.CONFIGS if kern.config_fits(cfg, triton.next_power_of_2(d), slots, kind == "kv")]
    if device == "cpu":
        configs = list({cfg.kwargs["ROWS"]: cfg for cfg in configs}.values())
    with_rows = kind == "kv" or d == 128
    rows = torch.arange(n_entries, device=device) if with_rows else None
    for cfg in configs:
        values = torch.empty(n_entries, d, dtype=torch.bfloat16, device=device)
        cache = torch.zeros(n_entries, _row_bytes(kind, d), dtype=torch.uint8, device=device) if with_rows else None
        kern._compress(*args, ratio, kind, 1e-6, values, rows, cache, config=cfg)
        if with_rows:
            assert torch.equal(cache.cpu(), _reference_rows(values, kind)), f"rows of {cfg}"
        assert_matches_oracle(values, *args, ratio, kind)


def _window_expected(kv, freqs, positions, backend):
    """pack_kv_fp8(rope_qat8(kv)): the chain of public ops the fused write must equal."""
    with use_backend(backend):
        return ops.pack_kv_fp8(ops.rope_qat8(kv, freqs, positions)).cpu()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@given(d=st.sampled_from([128, 512]), window=st.sampled_from([1, 4, 16]), batch=st.integers(1, 3),
       seq=st.integers(1, 6), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       with_lengths=st.booleans(), one_token=st.booleans(), scale=st.sampled_from([1e-6, 1.0, 1e4]),
       seed=st.integers(0, 2**31))
def test_window_rows_equal_pack_of_rope_qat8(device, backend, d, window, batch, seq, dtype, with_lengths,
                                             one_token, scale, seed):
    """Per-request positions around the ring's wrap (p % W crossing 0), prompts shorter or
    longer than W (with lengths: only the last W real tokens land), the one-token decode
    form; the bytes equal pack_kv_fp8(rope_qat8(kv)) of the oracles."""
    g = torch.Generator().manual_seed(seed)
    # Without lengths every token is written: at most W per request, or two share a slot.
    seq = 1 if one_token else seq if with_lengths else min(seq, window)
    start = torch.randint(0, 3 * window + 2, (batch,), generator=g)
    positions = start[:, None] + torch.arange(seq)
    kv = (torch.randn(batch, seq, d, generator=g) * scale).to(dtype)
    lengths = start + torch.randint(1, seq + 1, (batch,), generator=g) if with_lengths and not one_token else None
    n_slots = window + 3  # entries after the ring must stay untouched
    before = torch.randint(0, 256, (batch + 1, n_slots, ref_attention.fp8_row_bytes(d)), generator=g,
                           dtype=torch.uint8)
    freqs = rope_table(8 * window + 16)
    kv_d, pos_d, freqs_d = kv.to(device), positions.to(device), freqs.to(device)
    cache = before.clone().to(device)
    with use_backend(backend):
        if one_token:
            ops.store_window_kv(kv_d[:, 0], freqs_d, pos_d[:, 0], cache, window)
        else:
            ops.store_window_kv(kv_d, freqs_d, pos_d, cache, window,
                                None if lengths is None else lengths.to(device))
    expected = before.clone()
    for b in range(batch):
        for s in range(seq):
            p = int(positions[b, s])
            if lengths is not None and not int(lengths[b]) - window <= p < int(lengths[b]):
                continue
            expected[b, p % window] = _window_expected(kv[b, s][None], freqs, positions[b, s][None], "reference")[0]
    assert torch.equal(cache.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_window_block_whose_max_rounds_to_224_takes_half_the_scale(device, dtype):
    """A block whose largest value quantises to 224 x 2^e (225 and 232, the tie, round down;
    233 rounds up) is re-encoded by pack_kv_fp8 with 2^(e - 1): every code doubles, the
    subnormal ones by their mantissa.  The bytes equal the oracle's, and the scale bytes show
    that both cases occurred."""
    g = torch.Generator().manual_seed(4)
    d = 512
    kv = torch.randn(2, 3, d, generator=g) * 40
    kv[..., 1::7] *= 2.0 ** -12  # values that take subnormal codes
    tops = torch.tensor([225.0, 232.0, 233.0, -225.0, 448.0, 100.0, 232.0])
    kv[:, :, 5:448:64] = tops
    kv[:, 1] *= 2.0 ** -20  # the same blocks at scales near the amax floor
    kv = kv.to(dtype)
    positions = torch.arange(3).repeat(2, 1) + 5
    freqs = rope_table(16)
    cache = torch.zeros(2, 8, ref_attention.fp8_row_bytes(d), dtype=torch.uint8, device=device)
    with use_backend("triton"):
        ops.store_window_kv(kv.to(device), freqs.to(device), positions.to(device), cache, 8)
    expected = torch.zeros(2, 8, ref_attention.fp8_row_bytes(d), dtype=torch.uint8)
    ref.store_window_kv(kv, freqs, positions, expected, 8, None)
    assert torch.equal(cache.cpu(), expected)
    scale_bytes = expected[0, 5, 576:583].int()
    assert int(scale_bytes[0]) == 126 and int(scale_bytes[2]) == 127, scale_bytes


def test_window_write_every_config(device):
    """Each config the tuner may pick (tokens a program, warps), with a last program that is
    partly padding: the same bytes as pack_kv_fp8(rope_qat8(kv)).  On the CPU one config per
    token count (the interpreter ignores warps)."""
    from dsv4_triton.kernels import compressor as kern

    g = torch.Generator().manual_seed(9)
    batch, seq, window, d = 3, 7, 16, 512
    kv = torch.randn(batch, seq, d, generator=g).to(torch.bfloat16)
    positions = torch.randint(0, 20, (batch, 1), generator=g) + torch.arange(seq)
    freqs = rope_table(64)
    configs = kern.WINDOW_CONFIGS
    if device == "cpu":
        configs = list({cfg.kwargs["ROWS"]: cfg for cfg in configs}.values())
    expected = torch.zeros(batch, window, ref_attention.fp8_row_bytes(d), dtype=torch.uint8)
    for b in range(batch):
        expected[b, positions[b] % window] = _window_expected(kv[b], freqs, positions[b], "reference")
    for cfg in configs:
        cache = torch.zeros_like(expected).to(device)
        kern.store_window(kv.to(device), freqs.to(device), positions.to(device), cache, window, None, config=cfg)
        assert torch.equal(cache.cpu(), expected), cfg


def test_window_write_into_a_cache_off_8_byte_alignment(device):
    """A cache view whose rows start one byte past an 8-byte boundary (strides still multiples
    of 8, as the op requires) takes the byte stores, not the 8-byte ones, and gets the same
    bytes as an aligned cache."""
    from dsv4_triton.kernels import compressor as kern

    g = torch.Generator().manual_seed(12)
    batch, seq, window, d = 2, 5, 8, 512
    row_bytes = ref_attention.fp8_row_bytes(d)
    kv = torch.randn(batch, seq, d, generator=g).to(torch.bfloat16)
    positions = torch.arange(seq).repeat(batch, 1) + 3
    freqs = rope_table(16)
    aligned = torch.zeros(batch, window, row_bytes, dtype=torch.uint8, device=device)
    flat = torch.zeros(batch * window * row_bytes + 1, dtype=torch.uint8, device=device)
    shifted = flat[1:].view(batch, window, row_bytes)
    assert kern.rows_on_8_bytes(aligned) and not kern.rows_on_8_bytes(shifted)
    with use_backend("triton"):
        for cache in (aligned, shifted):
            ops.store_window_kv(kv.to(device), freqs.to(device), positions.to(device), cache, window)
    expected = torch.zeros(batch, window, row_bytes, dtype=torch.uint8)
    ref.store_window_kv(kv, freqs, positions, expected, window, None)
    assert torch.equal(aligned.cpu(), expected) and torch.equal(shifted.cpu(), expected)


def test_window_write_nan_and_negative_positions(device):
    """A NaN or Inf token encodes as pack_kv_fp8 encodes it (NaN codes, scale byte 0xFF); a
    negative position writes nothing."""
    kv = torch.randn(2, 2, 128, dtype=torch.bfloat16)
    kv[0, 1, 5] = float("nan")
    kv[1, 1, 7] = float("-inf")
    positions = torch.tensor([[3, 4], [-1, 0]])
    freqs = rope_table(16)
    before = torch.full((2, 4, 200), SENTINEL, dtype=torch.uint8)
    cache = before.clone().to(device)
    with use_backend("triton"):
        ops.store_window_kv(kv.to(device), freqs.to(device), positions.to(device), cache, 4)
    expected = before.clone()
    rows = _window_expected(kv, freqs, positions.clamp(min=0), "reference")
    expected[0, 3], expected[0, 0], expected[1, 0] = rows[0, 0], rows[0, 1], rows[1, 1]
    assert torch.equal(cache.cpu(), expected)


@pytest.mark.gpu
def test_window_rows_at_model_size(device):
    """A 16-request decode step and a 4096-token prefill at D = 512, W = 128 (hardware FP8
    conversion, no FMA contraction in the rotation) against the oracle chain."""
    g = torch.Generator().manual_seed(7)
    freqs = rope_table(8192, device)
    for batch, seq in ((16, 1), (2, 4096)):
        kv = torch.randn(batch, seq, 512, generator=g).to(device, torch.bfloat16)
        positions = (torch.randint(0, 4000, (batch, 1), generator=g) + torch.arange(seq)).to(device)
        lengths = positions[:, -1] + 1
        cache = torch.zeros(batch, 128 + 8, 584, dtype=torch.uint8, device=device)
        with use_backend("triton"):
            ops.store_window_kv(kv, freqs, positions, cache, 128, lengths)
        last = positions[:, -min(seq, 128):]
        rows = _window_expected(kv[:, -min(seq, 128):].cpu(), freqs.cpu(), last.cpu(), "reference")
        got = cache.cpu()[torch.arange(batch)[:, None], (last % 128).cpu()]
        assert torch.equal(got, rows)


def test_encoded_forms_of_nothing_launch_nothing(device):
    """Zero entries, a cache without rows, zero tokens: nothing written, no error."""
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _args(n=0).items()}
    cache = torch.full((2, 4, 200), SENTINEL, dtype=torch.uint8, device=device)
    rows = torch.zeros(0, dtype=torch.int64, device=device)
    full = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _args(n=3).items()}
    with use_backend("triton"):
        assert ops.compress_entries(**args, cache=cache, rows=rows).shape == (0, 128)
        ops.compress_entries_to_cache(*list(args.values())[:6], cache, rows, 4, "kv")
        no_rows = torch.zeros(0, 4, 200, dtype=torch.uint8, device=device)
        ops.compress_entries_to_cache(*list(full.values())[:6], no_rows, torch.full((3,), -1, device=device), 4, "kv")
        ops.store_window_kv(torch.zeros(2, 0, 128, dtype=torch.bfloat16, device=device), rope_table(16, device),
                            torch.zeros(2, 0, dtype=torch.int64, device=device), cache, 4)
    assert (cache == SENTINEL).all()


@pytest.mark.parametrize("call, err, name", [
    (lambda a, c, r: ops.compress_entries(*a, 4, "kv", cache=c), ValueError, "cache/rows"),
    (lambda a, c, r: ops.compress_entries(*a, 4, "kv", cache=c.view(torch.int8), rows=r), TypeError, "cache"),
    (lambda a, c, r: ops.compress_entries(*a, 4, "kv", cache=c[..., :199], rows=r), ValueError, "cache"),
    (lambda a, c, r: ops.compress_entries(*a, 4, "indexer", cache=c, rows=r), ValueError, "cache"),
    (lambda a, c, r: ops.compress_entries(*a, 4, "kv", cache=c[:, ::2], rows=r), ValueError, "cache"),
    (lambda a, c, r: ops.compress_entries_to_cache(*a, c, r.float(), 4, "kv"), TypeError, "rows"),
    (lambda a, c, r: ops.compress_entries_to_cache(*a, c, r[:2], 4, "kv"), ValueError, "rows"),
])
def test_encoded_form_bad_input(call, err, name):
    args = list(_args().values())[:6]
    cache = torch.zeros(2, 4, 200, dtype=torch.uint8)
    with pytest.raises(err, match=name):
        call(args, cache, torch.arange(3))


@pytest.mark.parametrize("over, err, name", [
    (dict(kv=torch.zeros(2, 3, 256, dtype=torch.bfloat16)), ValueError, "kv"),
    (dict(kv=torch.zeros(2, 3, 128, dtype=torch.int32)), TypeError, "kv"),
    (dict(positions=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "positions"),
    (dict(positions=torch.zeros(2, 3)), TypeError, "positions"),
    (dict(cache=torch.zeros(1, 4, 200, dtype=torch.uint8)), ValueError, "cache"),
    (dict(cache=torch.zeros(2, 3, 200, dtype=torch.uint8)), ValueError, "cache"),
    (dict(cache=torch.zeros(2, 4, 584, dtype=torch.uint8)), ValueError, "cache"),
    (dict(cache=torch.zeros(2, 4, 201, dtype=torch.uint8)[..., :200]), ValueError, "cache"),
    (dict(window=0), ValueError, "window"),
    (dict(lengths=torch.ones(3, dtype=torch.int64)), ValueError, "lengths"),
    (dict(freqs=torch.zeros(16, 16, 2)), ValueError, "freqs"),
])
def test_window_write_bad_input(over, err, name):
    args = dict(kv=torch.zeros(2, 3, 128, dtype=torch.bfloat16), freqs=rope_table(16),
                positions=torch.zeros(2, 3, dtype=torch.int64), cache=torch.zeros(2, 4, 200, dtype=torch.uint8),
                window=4, lengths=None)
    args.update(over)
    with pytest.raises(err, match=name):
        ops.store_window_kv(**args)
