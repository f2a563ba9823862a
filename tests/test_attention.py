"""sparse_attention and pack_kv_fp8: the oracle against SPEC, the Triton kernels against the oracle."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, set_checks, use_backend
from dsv4_triton.reference import attention as ref
from helpers import assert_close

ROPE = ref.ROPE_DIM


def _qat8(x: torch.Tensor) -> torch.Tensor:
    """SPEC 2 qat8 (block 64, pow2 scales) of FP32 ``x``, written independently of the packer."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 64, 64)
    amax = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = torch.clamp(blocks / s, -448.0, 448.0).to(torch.float8_e4m3fn).float()
    return (q * s).reshape(x.shape)


def make_kv(g, bsz, n, d, magnitude=1.0):
    """bf16 KV vectors as the model makes them: nope part qat8-ed, rope part plain bf16."""
    kv = torch.randn(bsz, n, d, generator=g) * magnitude
    kv[..., :d - ROPE] = _qat8(kv[..., :d - ROPE])
    return kv.to(torch.bfloat16)


def make_idx(g, bsz, seq, k, n, hole_frac=0.2, dup_frac=0.1):
    """Random candidate rows: -1 holes, duplicates, and the extreme slots 0 and N-1."""
    idx = torch.randint(0, max(n, 1), (bsz, seq, k), generator=g, dtype=torch.int32)
    if k >= 2 and n >= 1:
        idx[..., 0] = 0
        idx[..., 1] = n - 1
    dup = torch.rand(bsz, seq, k, generator=g) < dup_frac
    idx = torch.where(dup, idx[..., :1].expand_as(idx), idx)
    holes = (torch.rand(bsz, seq, k, generator=g) < hole_frac) | (n == 0)
    return torch.where(holes, torch.full_like(idx, -1), idx)


def naive_attention(q, kv, sink, idx, scale):
    """SPEC 5.4 literally, one (token, head) at a time, in float64."""
    bsz, seq, heads, d = q.shape
    out = torch.zeros(bsz, seq, heads, d, dtype=torch.float64)
    kvd = kv.double()
    for b in range(bsz):
        for s in range(seq):
            rows = [int(i) for i in idx[b, s] if 0 <= int(i) < kv.shape[1]]
            for h in range(heads):
                z = [scale * float(q[b, s, h].double() @ kvd[b, r]) for r in rows]
                m = max(z + [float(sink[h])])
                w = [math.exp(v - m) for v in z]
                den = sum(w) + math.exp(float(sink[h]) - m)
                for wi, r in zip(w, rows):
                    out[b, s, h] += wi * kvd[b, r] / den
    return out


# ---------------------------------------------------------------------------------------
# The oracle against SPEC


@given(bsz=st.integers(1, 2), seq=st.integers(1, 3), heads=st.sampled_from([1, 3]), k=st.integers(0, 6),
       n=st.integers(0, 7), sink=st.floats(-50, 50), seed=st.integers(0, 2**31))
def test_oracle_matches_spec_literally(bsz, seq, heads, k, n, sink, seed):
    g = torch.Generator().manual_seed(seed)
    d = 128
    q = torch.randn(bsz, seq, heads, d, generator=g).to(torch.bfloat16)
    kv = make_kv(g, bsz, n, d)
    sinks = torch.full((heads,), sink)
    idx = make_idx(g, bsz, seq, k, n)
    got = ref.sparse_attention(q, kv, sinks, idx, d ** -0.5, None, None)
    # FP32 against float64, then one bf16 rounding: one bf16 ulp plus FP32 summation noise.
    assert_close(got, naive_attention(q, kv, sinks, idx, d ** -0.5), rtol=2 ** -8, atol=1e-5, what="oracle")


def test_oracle_empty_rows_give_zero_and_duplicates_count_twice():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 2, 128, generator=g).to(torch.bfloat16)
    kv = make_kv(g, 1, 4, 128)
    sink = torch.tensor([0.5, -2.0])
    idx = torch.tensor([[[-1, -1, -1], [2, 2, -1]]], dtype=torch.int32)
    out = ref.sparse_attention(q, kv, sink, idx, 128 ** -0.5, None, None).float()
    assert torch.equal(out[0, 0], torch.zeros(2, 128))
    # Two copies of row 2: weight 2 e^z / (2 e^z + e^sink) on kv[2].
    z = 128 ** -0.5 * (q[0, 1].float() @ kv[0, 2].float())
    w = 2 * torch.exp(z) / (2 * torch.exp(z) + torch.exp(sink))
    assert_close(out[0, 1], w[:, None] * kv[0, 2].float()[None], rtol=2 ** -8, atol=1e-6)


def test_oracle_inverse_rope_rotates_last_dims_back():
    """Rotating a vector by +pos (SPEC 4 RoPE) and then the oracle's inverse gives it back."""
    g = torch.Generator().manual_seed(1)
    half, max_pos = 32, 50
    freqs_i = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / (2 * half))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * freqs_i
    freqs = torch.stack((ang.cos(), ang.sin()), -1).float()
    x = torch.randn(2, 3, 4, 128, generator=g)
    pos = torch.randint(0, max_pos, (2, 3), generator=g)
    a = ang[pos].unsqueeze(2).float()
    x0, x1 = x[..., -64::2], x[..., -63::2]
    forward = x.clone()
    forward[..., -64::2] = x0 * a.cos() - x1 * a.sin()
    forward[..., -63::2] = x0 * a.sin() + x1 * a.cos()
    assert_close(ref.inverse_rope(forward, freqs, pos), x, rtol=1e-5, atol=1e-5, what="inverse rope")


# ---------------------------------------------------------------------------------------
# FP8 cache rows


def test_fp8_row_bytes():
    assert ref.fp8_row_bytes(512) == 584 and ref.fp8_row_bytes(128) == 200


@pytest.mark.parametrize("d", [128, 512])
def test_pack_kv_fp8_layout_and_exact_round_trip(d):
    g = torch.Generator().manual_seed(d)
    kv = make_kv(g, 3, 5, d, magnitude=4.0)
    kv[0, 0, :64] = 0.0  # an all-zero block: scale from the 1e-4 floor, codes 0
    rows = ops.pack_kv_fp8(kv)
    nope = d - ROPE
    assert rows.dtype == torch.uint8 and rows.shape == (3, 5, ref.fp8_row_bytes(d))
    assert torch.equal(ref.unpack_kv_fp8(rows, d), kv.float())  # qat8-ed values pack exactly
    assert torch.equal(rows[..., nope:nope + 2 * ROPE].contiguous().view(torch.bfloat16), kv[..., nope:])
    assert not rows[..., nope + 2 * ROPE + nope // 64:].any()  # zero pad
    assert torch.equal(rows[0, 0, :64], torch.zeros(64, dtype=torch.uint8))
    assert rows[0, 0, nope + 2 * ROPE] == 127 - 22  # 2^ceil(log2(1e-4 / 448)) = 2^-22


def test_pack_kv_fp8_nan_inf_blocks_decode_to_nan():
    kv = torch.ones(2, 128)
    kv[0, 5] = float("nan")
    kv[1, 63] = float("inf")
    rows = ops.pack_kv_fp8(kv)
    back = ref.unpack_kv_fp8(rows, 128)
    assert torch.isnan(back[:, :64]).all() and torch.isfinite(back[:, 64:]).all()
    assert (rows[:, 128 + 64] == 0xFF).all()


# ---------------------------------------------------------------------------------------
# Validation


def _args(bsz=1, seq=2, heads=4, d=128, n=6, k=3):
    g = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(bsz, seq, heads, d, generator=g).to(torch.bfloat16), kv=make_kv(g, bsz, n, d),
                sink=torch.zeros(heads), idx=make_idx(g, bsz, seq, k, n), scale=d ** -0.5)


@pytest.mark.parametrize("change, err, name", [
    (dict(q=torch.zeros(1, 2, 4, 128)), TypeError, "q"),
    (dict(q=torch.zeros(1, 2, 4, 96, dtype=torch.bfloat16)), ValueError, "q"),
    (dict(q=torch.zeros(2, 4, 128, dtype=torch.bfloat16)), ValueError, "q"),
    (dict(kv=torch.zeros(1, 6, 128)), TypeError, "kv"),
    (dict(kv=torch.zeros(2, 6, 128, dtype=torch.bfloat16)), ValueError, "kv"),
    (dict(kv=torch.zeros(1, 6, 584, dtype=torch.uint8)), ValueError, "kv"),
    (dict(sink=torch.zeros(4, dtype=torch.bfloat16)), TypeError, "sink"),
    (dict(sink=torch.zeros(5)), ValueError, "sink"),
    (dict(idx=torch.zeros(1, 2, 3, dtype=torch.int64)), TypeError, "idx"),
    (dict(idx=torch.zeros(1, 3, 3, dtype=torch.int32)), ValueError, "idx"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(freqs=torch.zeros(8, 32, 2)), ValueError, "freqs/positions"),
    (dict(freqs=torch.zeros(8, 32, 2), positions=torch.zeros(1, 2)), TypeError, "positions"),
    (dict(freqs=torch.zeros(8, 32, 2), positions=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "positions"),
    (dict(freqs=torch.zeros(8, 65, 2), positions=torch.zeros(1, 2, dtype=torch.int32)), ValueError, "freqs"),
    (dict(freqs=torch.zeros(8, 32, 2, dtype=torch.float64), positions=torch.zeros(1, 2, dtype=torch.int32)),
     TypeError, "freqs"),
])
def test_sparse_attention_bad_input(change, err, name):
    args = _args()
    args.update(change)
    with pytest.raises(err, match=name):
        ops.sparse_attention(**args)


def test_pack_kv_fp8_bad_input():
    with pytest.raises(TypeError, match="kv"):
        ops.pack_kv_fp8(torch.zeros(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="kv"):
        ops.pack_kv_fp8(torch.zeros(4, 256))


@pytest.mark.parametrize("bad_index", [6, 100, -2])
def test_checked_mode_rejects_out_of_range_indices(bad_index):
    args = _args(n=6)
    args["idx"][0, 1, 2] = bad_index
    set_checks(True)
    try:
        with pytest.raises(ValueError, match="idx"):
            ops.sparse_attention(**args)
    finally:
        set_checks(False)
    # Unchecked: the index is treated as empty.
    masked = dict(args, idx=torch.where(args["idx"] == bad_index, -1, args["idx"]))
    assert torch.equal(ops.sparse_attention(**args), ops.sparse_attention(**masked))


def test_checked_mode_rejects_out_of_range_positions():
    args = _args()
    freqs = torch.zeros(8, 32, 2)
    set_checks(True)
    try:
        with pytest.raises(ValueError, match="positions"):
            ops.sparse_attention(**args, freqs=freqs, positions=torch.tensor([[0, 8]], dtype=torch.int32))
    finally:
        set_checks(False)
