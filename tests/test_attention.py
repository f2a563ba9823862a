"""sparse_attention and pack_kv_fp8: the oracle against SPEC, the Triton kernels against the oracle."""

import math

import pytest
import torch
import triton
from hypothesis import given, strategies as st

from dsv4_triton import ops, set_checks, use_backend
from dsv4_triton.bench import attention as bench
from dsv4_triton.kernels import attention as kernels
from dsv4_triton.reference import attention as ref
from helpers import ULP, assert_close

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
# Triton kernels against the oracle
#
# Tolerance of the attention output (per element): the kernel rounds the probabilities p to
# bf16 for the P @ KV matmul (relative error <= 2^-9 each) while the oracle keeps them in FP32,
# so |kernel - oracle| <= 2^-9 * sum_c p_c |kv_c| / den <= 2^-9 * max|kv|; doubled for the
# exp2 approximation and FP32 summation-order differences in the scores, plus one bf16 ulp of
# the result (both round an FP32 value once).  The inverse RoPE mixes two columns: twice that.


def _tol(kv, rope=False):
    """The tolerance above for a bf16 KV tensor or FP8 cache rows of head dim 128/512."""
    values = kv.float() if kv.dtype != torch.uint8 else ref.unpack_kv_fp8(kv, ref.head_dim_of_row_bytes(kv.shape[-1]))
    finite = values[torch.isfinite(values)]
    kvmax = float(finite.abs().amax()) if finite.numel() else 0.0
    return dict(rtol=ULP[torch.bfloat16], atol=(2 ** -7 if rope else 2 ** -8) * kvmax + 1e-6)


def _triton(*args, **kw):
    with use_backend("triton"):
        return ops.sparse_attention(*args, **kw)


def _rope_table(max_pos, half=32, theta=10000.0):
    f = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / (2 * half))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * f
    return torch.stack((ang.cos(), ang.sin()), -1).float()


def _check(q, kv, sink, idx, freqs=None, positions=None, what=""):
    d = q.shape[-1]
    got = _triton(q, kv, sink, idx, d ** -0.5, freqs, positions)
    want = ref.sparse_attention(q, kv, sink, idx, d ** -0.5, freqs, positions)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert_close(got, want, **_tol(kv.cpu(), rope=freqs is not None), what=what)
    return got


@given(bsz=st.integers(1, 2), seq=st.integers(1, 3), heads=st.sampled_from([8, 16, 64]), n=st.integers(1, 40),
       k=st.integers(1, 70), fp8=st.booleans(), rope=st.booleans(), sink=st.floats(-50, 50),
       magnitude=st.sampled_from([1.0, 8.0]), seed=st.integers(0, 2**31))
def test_sparse_attention_matches_oracle(device, bsz, seq, heads, n, k, fp8, rope, sink, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    d = 128
    q = (torch.randn(bsz, seq, heads, d, generator=g) * magnitude).to(torch.bfloat16)
    kv = make_kv(g, bsz, n, d, magnitude)
    sinks = sink + torch.randn(heads, generator=g)
    idx = make_idx(g, bsz, seq, k, n)
    freqs = positions = None
    if rope:
        freqs = _rope_table(64)
        positions = torch.randint(0, 64, (bsz, seq), generator=g, dtype=torch.int32)
        positions[0, 0] = 63
    cache = ops.pack_kv_fp8(kv) if fp8 else kv
    to = lambda t: None if t is None else t.to(device)
    _check(q.to(device), cache.to(device), sinks.to(device), idx.to(device), to(freqs), to(positions),
           what=f"fp8={fp8} rope={rope}")


@given(bsz=st.integers(1, 2), seq=st.integers(1, 2), heads=st.sampled_from([8, 16, 32, 64, 128]),
       d=st.sampled_from([128, 512]), n=st.integers(1, 300), k=st.integers(1, 300), fp8=st.booleans(),
       rope=st.booleans(), num_sms=st.sampled_from([1, 6, 1000]), empty_row=st.booleans(), seed=st.integers(0, 2**31))
def test_sparse_attention_head_blocks_and_splits_match_oracle(device, bsz, seq, heads, d, n, k, fp8, rope, num_sms,
                                                             empty_row, seed):
    """Every head-block size (H in 8..128: one or two blocks of 64, or one masked block), both
    head dims, and the K split (a machine of 6 or 1000 SMs splits up to 300 candidates into
    slices merged by the merge programs; 1 SM never splits), with holes, duplicates and rows
    of only -1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seq, heads, d, generator=g).to(torch.bfloat16)
    kv = make_kv(g, bsz, n, d)
    idx = make_idx(g, bsz, seq, k, n, hole_frac=0.3)
    if empty_row:
        idx[-1, -1] = -1
    sinks = torch.randn(heads, generator=g)
    freqs = positions = None
    if rope:
        freqs = _rope_table(50)
        positions = torch.randint(0, 50, (bsz, seq), generator=g, dtype=torch.int32)
    cache = ops.pack_kv_fp8(kv) if fp8 else kv
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "sm_count", lambda device: num_sms)
        got = _check(*(None if t is None else t.to(device) for t in (q, cache, sinks, idx, freqs, positions)),
                     what=f"H={heads} D={d} fp8={fp8} rope={rope} sms={num_sms}")
    if empty_row:
        assert not got[-1, -1].any()  # only the sink in the denominator: exact zeros


@pytest.mark.parametrize("num_sms", [1, 1000])
def test_sparse_attention_head_dim_512_fp8_rope_split_or_not(device, monkeypatch, num_sms):
    """D = 512 (the release's), FP8 rows, inverse RoPE; a machine of 1000 SMs makes the
    launcher split the 288 candidates (the merge programs apply the RoPE),
    of 1 SM not."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: num_sms)
    g = torch.Generator().manual_seed(7)
    bsz, seq, heads, d, n, k = 1, 1, 16, 512, 300, 288
    q = torch.randn(bsz, seq, heads, d, generator=g).to(torch.bfloat16)
    kv = make_kv(g, bsz, n, d)
    idx = make_idx(g, bsz, seq, k, n)
    sinks = torch.randn(heads, generator=g)
    freqs, positions = _rope_table(100), torch.tensor([[99]], dtype=torch.int32)
    assert (kernels._choose_splits(bsz * seq, k, num_sms) > 1) == (num_sms > 1)
    _check(*(t.to(device) for t in (q, ops.pack_kv_fp8(kv), sinks, idx, freqs, positions)), what="D=512")


def test_fp8_cache_matches_bf16_cache_on_qat_values(device):
    """The FP8 rows decode exactly to the qat8-ed bf16 values, so both paths feed the same
    bf16 tile to the matmuls: bit-identical with one tile config (the interpreter runs one),
    else within the kernel-vs-oracle tolerance (accumulation order of another config)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 16, 128, generator=g).to(torch.bfloat16).to(device)
    kv = torch.randn(2, 50, 128, generator=g) * 3.0
    kv[..., :16] *= 2.0 ** -14  # FP8 subnormal codes (below 2^-6 of the block scale) in every row
    kv[..., :64] = _qat8(kv[..., :64])
    kv = kv.to(torch.bfloat16)
    idx = make_idx(g, 2, 3, 45, 50).to(device)
    sinks = torch.randn(16, generator=g).to(device)
    assert (ops.pack_kv_fp8(kv)[..., :16] & 0x78 == 0).float().mean() > 0.5  # mostly exponent-0 codes
    via_bf16 = _triton(q, kv.to(device), sinks, idx, 128 ** -0.5)
    via_fp8 = _triton(q, ops.pack_kv_fp8(kv).to(device), sinks, idx, 128 ** -0.5)
    if device.type == "cpu":
        assert torch.equal(via_fp8, via_bf16)
    else:
        assert_close(via_fp8, via_bf16, **_tol(kv))


@pytest.mark.parametrize("variant", sorted(kernels.STAGE_VARIANTS))
@pytest.mark.parametrize("num_sms", [1, 1000])
def test_stage_variants_compute_what_they_claim(device, monkeypatch, variant, num_sms):
    """The benchmarks' stage variants (one stage left out or doubled) against a torch model of
    each: their timings are only meaningful if they run the op's tiles and split."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: num_sms)
    g = torch.Generator().manual_seed(15)
    bsz, seq, heads, d, n, k = 2, 2, 16, 128, 300, 290  # 290 > 2 * 128 candidates: split on 1000 SMs
    q = torch.randn(bsz, seq, heads, d, generator=g).to(torch.bfloat16)
    kv = make_kv(g, bsz, n, d)
    idx = make_idx(g, bsz, seq, k, n)
    sinks = torch.randn(heads, generator=g)
    caches = [ops.pack_kv_fp8(kv)] + ([] if variant == "no-dequant" else [kv])
    for cache in caches:
        args = [t.to(device) for t in (q, cache, sinks, idx)]
        got = kernels.run_stage_variant(variant, *args, d ** -0.5)
        want = bench.stage_variant_oracle(variant, *args, d ** -0.5)
        if variant == "QK-only":
            assert torch.equal(got, want)  # nothing accumulated: exact zeros
        else:  # the op's tolerance, for the KV values the variant reads
            read = bench.raw_bits_kv(cache) if variant == "no-dequant" else cache
            assert_close(got, want, **_tol(read), what=f"{variant} {cache.dtype}")


def test_stage_variant_bad_arguments():
    args = _args()
    inputs = (args["q"], args["kv"], args["sink"], args["idx"], args["scale"])
    with pytest.raises(ValueError, match="kv"):
        kernels.run_stage_variant("no-dequant", *inputs)  # a bf16 cache has nothing to decode
    with pytest.raises(ValueError, match="variant"):
        kernels.run_stage_variant("PV-thrice", *inputs)


def test_choose_splits():
    assert kernels._choose_splits(programs=128, k=1152, num_sms=132) == 1  # one full wave already
    assert kernels._choose_splits(programs=64, k=640, num_sms=132) == 2  # two slices: still one wave
    assert kernels._choose_splits(programs=2, k=1152, num_sms=132) == 9  # slices of >= 128 candidates
    assert kernels._choose_splits(programs=1, k=100000, num_sms=132) == kernels.MAX_SPLITS
    assert kernels._choose_splits(programs=1, k=200, num_sms=132) == 1  # too short to split


def test_split_over_k_matches_unsplit(device, monkeypatch):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 8, 128, generator=g).to(torch.bfloat16).to(device)
    kv = make_kv(g, 1, 400, 128).to(device)
    idx = make_idx(g, 1, 2, 390, 400, hole_frac=0.5).to(device)
    idx[0, 1, 130:] = -1  # the later slices of token 1 are empty: their partials must not count
    sinks = torch.randn(8, generator=g).to(device)
    outs = []
    for num_sms in (1, 1000):
        monkeypatch.setattr(kernels, "sm_count", lambda device: num_sms)
        outs.append(_check(q, kv, sinks, idx, what=f"{num_sms} SMs"))
    assert_close(outs[1], outs[0], **_tol(kv))
    # The merge programs sum in split order: the same bits whichever slice finishes last,
    # and the counters are left zero for the next call.
    assert torch.equal(_triton(q, kv, sinks, idx, 128 ** -0.5), outs[1])
    for _, _, counters in kernels._workspaces.values():
        assert not counters.any()


def test_empty_rows_give_exact_zero(device):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 16, 128, generator=g).to(torch.bfloat16).to(device)
    kv = make_kv(g, 2, 10, 128).to(device)
    idx = torch.full((2, 2, 40), -1, dtype=torch.int32, device=device)
    idx[1, 1, 3] = 4
    sinks = torch.full((16,), 50.0, device=device)
    out = _triton(q, kv, sinks, idx, 128 ** -0.5, _rope_table(8).to(device), torch.zeros(2, 2, dtype=torch.int32,
                                                                                              device=device))
    assert not out[0].any() and not out[1, 0].any()
    assert out[1, 1].abs().sum() > 0  # one candidate, weight e^z / (e^z + e^50): tiny but not 0
    assert torch.equal(_triton(q, kv, sinks, idx[..., :0], 128 ** -0.5), torch.zeros_like(q))  # K = 0


@pytest.mark.parametrize("bsz, seq, n, k", [(0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 0, 4)])
def test_zero_sizes(device, bsz, seq, n, k):
    """No tokens: an empty output, no launch.  An empty cache (N = 0): every slot is empty."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(bsz, seq, 8, 128, generator=g).to(torch.bfloat16).to(device)
    kv = torch.zeros(bsz, n, 128, dtype=torch.bfloat16, device=device)
    idx = torch.randint(-1, 5, (bsz, seq, k), generator=g, dtype=torch.int32).to(device)
    out = _triton(q, kv, torch.zeros(8, device=device), idx, 0.1)
    assert out.shape == q.shape and not out.any()
    assert torch.equal(out, ref.sparse_attention(q, kv, torch.zeros(8, device=device), idx, 0.1, None, None))


def test_duplicates_count_twice_and_bad_indices_are_masked(device):
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 8, 128, generator=g).to(torch.bfloat16).to(device)
    kv = make_kv(g, 1, 6, 128).to(device)
    sinks = torch.zeros(8, device=device)
    idx = torch.tensor([[[3, 3, 1, -1], [5, 0, 6, -7]]], dtype=torch.int32, device=device)
    _check(q, kv, sinks, idx, what="duplicates")
    masked = torch.tensor([[[3, 3, 1, -1], [5, 0, -1, -1]]], dtype=torch.int32, device=device)
    assert torch.equal(_triton(q, kv, sinks, idx, 128 ** -0.5), _triton(q, kv, sinks, masked, 128 ** -0.5))


def test_large_scores_are_stable(device):
    """Scores of several hundred (exp overflows FP32 beyond 88): the running max keeps it finite."""
    g = torch.Generator().manual_seed(8)
    q = (torch.randn(1, 2, 16, 128, generator=g) * 30).to(torch.bfloat16)
    kv = make_kv(g, 1, 20, 128, magnitude=3.0)
    idx = make_idx(g, 1, 2, 24, 20)
    sinks = torch.tensor([50.0, -50.0] * 8)
    want = ref.sparse_attention(q, kv, sinks, idx, 128 ** -0.5, None, None)
    assert float((128 ** -0.5 * q[0, 0].float() @ kv[0].float().T).abs().max()) > 200
    got = _check(*(t.to(device) for t in (q, kv, sinks, idx)), what="large scores")
    assert torch.isfinite(got.float()).all() and torch.isfinite(want.float()).all()


def _assert_nan_in_head_5_and_token_1(device, q, kv, sinks, idx, what):
    """Over the BF16 and the FP8 cache: NaN exactly in head 5 of token 0 (a NaN query) and in
    every head of token 1 (a NaN row it reads), as the oracle has it."""
    for cache in (kv, ops.pack_kv_fp8(kv)):
        got = _check(*(t.to(device) for t in (q, cache, sinks, idx)), what=what)
        nan = torch.isnan(got.float()).any(-1)[0].cpu()
        expect = torch.zeros(3, 16, dtype=torch.bool)
        expect[0, 5] = True
        expect[1, :] = True
        assert torch.equal(nan, expect)


def test_nan_propagates_like_the_oracle(device):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 3, 16, 128, generator=g).to(torch.bfloat16)
    kv = make_kv(g, 1, 10, 128)
    q[0, 0, 5, 17] = float("nan")  # one head of token 0
    kv[0, 7, 3] = float("nan")  # a row only token 1 reads
    kv[0, 8, 100] = float("nan")  # a row nobody reads (and one behind a -1)
    idx = torch.tensor([[[0, 1, 2, -1], [7, 2, 1, 0], [3, 4, -1, -1]]], dtype=torch.int32)
    sinks = torch.zeros(16)
    _assert_nan_in_head_5_and_token_1(device, q, kv, sinks, idx, "nan")


def test_split_merge_keeps_nan_and_large_scores(device, monkeypatch):
    """The merge of K slices (by the last to finish) with scores of several hundred, sinks of
    +-50 and NaN: a NaN query head, and a NaN KV row that only token 1 reads (in its second
    slice), propagate exactly as in the oracle; everything else stays finite."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: 1000)
    g = torch.Generator().manual_seed(16)
    q = (torch.randn(1, 3, 16, 128, generator=g) * 30).to(torch.bfloat16)
    kv = make_kv(g, 1, 320, 128, magnitude=3.0)
    idx = make_idx(g, 1, 3, 300, 300, hole_frac=0.2)  # rows < 300
    q[0, 0, 5, 17] = float("nan")
    kv[0, 310, 3] = float("nan")
    idx[0, 1, 200] = 310
    sinks = torch.tensor([50.0, -50.0] * 8)
    assert kernels._choose_splits(3, 300, 1000) == 2
    _assert_nan_in_head_5_and_token_1(device, q, kv, sinks, idx, "split, nan")


def _run_config(monkeypatch, num_stages=None, **kwargs):
    """From now on the kernel runs its first config with ``kwargs`` changed (the configs' other
    forms; the suite runs the first config)."""
    tuner = kernels._sparse_attention_kernel
    first = tuner.configs[0]
    monkeypatch.setattr(tuner, "configs", [triton.Config(dict(first.kwargs, **kwargs), num_warps=first.num_warps,
                                                         num_stages=num_stages or first.num_stages)])
    monkeypatch.setattr(tuner, "cache", {})


def _run_lazy_rescale(monkeypatch, block_k=16, num_stages=None):
    """The lazy-rescale form, by default with short candidate blocks so that a program sees many."""
    _run_config(monkeypatch, num_stages, BLOCK_K=block_k, LAZY_RESCALE=True)


@given(heads=st.sampled_from([8, 16]), fp8=st.booleans(), num_sms=st.sampled_from([1, 1000]),
       steep=st.booleans(), lead_holes=st.sampled_from([0, 20]), seed=st.integers(0, 2**31))
def test_lazy_rescale_matches_oracle(device, heads, fp8, num_sms, steep, lead_holes, seed):
    """Lazy rescale: the running max moves only when a score passes it by more than
    RESCALE_MARGIN doublings.  Flat scores (all below the margin: every block after the first
    takes the branch without rescale), or candidates ordered by growing KV magnitude whose
    scores pass the first block's by over 160 doublings (the rescaling branch taken again and
    again mid-list; without it the exponents overflow).  Leading -1 slots keep every row
    without a max for the first blocks; holes; split or not."""
    with pytest.MonkeyPatch.context() as mp:
        _run_lazy_rescale(mp)
        mp.setattr(kernels, "sm_count", lambda device: num_sms)
        g = torch.Generator().manual_seed(seed)
        n, k, d = 300, 290, 128
        q = (torch.randn(1, 2, heads, d, generator=g) * (8 if steep else 1)).to(torch.bfloat16)
        kv = make_kv(g, 1, n, d)
        if steep:
            kv = kv * torch.linspace(0.25, 40.0, n)[None, :, None].to(torch.bfloat16)
        idx = torch.sort(torch.randint(0, n, (1, 2, k), generator=g, dtype=torch.int32), dim=-1).values
        idx = torch.where(torch.rand(1, 2, k, generator=g) < 0.2, -1, idx)  # ascending rows, holes
        idx[..., :lead_holes] = -1
        sinks = torch.randn(heads, generator=g)
        z = (d ** -0.5) * torch.einsum("bshd,bnd->bshn", q.float(), kv.float()) * 1.4426950408889634
        if steep:
            assert float(z[..., -n // 8:].amax() - z[..., :n // 8].amax()) > 160
        else:
            assert float(z.amax()) < kernels.RESCALE_MARGIN.value
        cache = ops.pack_kv_fp8(kv) if fp8 else kv
        _check(*(t.to(device) for t in (q, cache, sinks, idx)), what=f"lazy fp8={fp8} sms={num_sms} steep={steep}")


def test_lazy_rescale_keeps_nan_empty_rows_and_large_scores(device, monkeypatch):
    """Lazy rescale with the NaN pattern (a NaN query head, a NaN row only token 1 reads),
    scores of several hundred with sinks of +-50, split and not, and rows of only -1."""
    _run_lazy_rescale(monkeypatch)
    g = torch.Generator().manual_seed(17)
    q = (torch.randn(1, 3, 16, 128, generator=g) * 30).to(torch.bfloat16)
    kv = make_kv(g, 1, 320, 128, magnitude=3.0)
    idx = make_idx(g, 1, 3, 300, 300, hole_frac=0.2)
    q[0, 0, 5, 17] = float("nan")
    kv[0, 310, 3] = float("nan")
    idx[0, 1, 200] = 310
    sinks = torch.tensor([50.0, -50.0] * 8)
    for num_sms in (1, 1000):
        monkeypatch.setattr(kernels, "sm_count", lambda device: num_sms)
        _assert_nan_in_head_5_and_token_1(device, q, kv, sinks, idx, f"lazy, nan, sms={num_sms}")
    idx[0, 2] = -1
    out = _check(*(t.to(device) for t in (q, kv, sinks, idx)), what="lazy, empty row")
    assert not out[0, 2].any()


@pytest.mark.parametrize("num_sms, k, splits", [(9, 400, 3), (1000, 2200, kernels.MAX_SPLITS)])
def test_merge_forms_match_each_other_and_oracle(device, monkeypatch, num_sms, k, splits):
    """The split merge's forms, merge programs of 128, 256 or 64 columns (MERGE_W), against
    the oracle and bit for bit against each other (one weighting code path, each element
    summed in split order): 3 slices (an odd count: the last slice read again must weigh 0)
    and MAX_SPLITS (the whole register row of weights); D = 512 with the inverse RoPE across
    the last column block, NaN, large scores and sinks, an empty row; run-to-run identical."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: num_sms)
    g = torch.Generator().manual_seed(18)
    q = torch.randn(1, 3, 8, 512, generator=g).to(torch.bfloat16)
    q[0, 1] *= 16  # token 1: scores of several hundred; token 0: weights spread over the slices
    kv = make_kv(g, 1, 2300, 512, magnitude=2.0)
    idx = make_idx(g, 1, 3, k, 2300, hole_frac=0.3)
    idx[0, 2] = -1
    q[0, 0, 5, 17] = float("nan")
    sinks = torch.tensor([30.0, -30.0, 2.0, -2.0] * 2)
    freqs, positions = _rope_table(40), torch.tensor([[3, 39, 0]], dtype=torch.int32)
    assert kernels._choose_splits(3, k, num_sms) == splits
    args = [t.to(device) for t in (q, ops.pack_kv_fp8(kv), sinks, idx, freqs, positions)]
    narrow = _check(*args, what=f"merge 128, {splits} slices")
    for form in (dict(MERGE_W=256), dict(MERGE_W=64)):
        _run_config(monkeypatch, **form)
        other = _check(*args, what=f"merge {form}, {splits} slices")
        assert torch.equal(other.view(torch.int16), narrow.view(torch.int16)), form
        assert torch.equal(_triton(*args[:4], 512 ** -0.5, *args[4:]).view(torch.int16), other.view(torch.int16))
        assert not other[0, 2].any()
        for _, _, counters in kernels._workspaces.values():  # every form leaves its counters zero
            assert not counters.any()


def test_row_offsets_fit_int32():
    assert kernels._row_offsets_fit_int32(8320, 584)  # a decode cache of FP8 rows
    assert kernels._row_offsets_fit_int32(2 ** 31 // 584 - 1, 584)
    assert not kernels._row_offsets_fit_int32(2 ** 31 // 584, 584)
    assert not kernels._row_offsets_fit_int32(2 ** 22, 512)  # 4M BF16 rows of 512: 2^31 elements


@pytest.mark.parametrize("d, fp8, num_sms", [(128, False, 1), (128, True, 1000), (512, True, 1), (512, False, 1000)])
def test_32_and_64_bit_row_offsets_agree_bit_for_bit(device, monkeypatch, d, fp8, num_sms):
    """The gathers address rows with 32-bit products where the cache allows: the same bytes
    are read, so the outputs are the same bits as with 64-bit products (NaN included), split
    or not, with the inverse RoPE."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: num_sms)
    g = torch.Generator().manual_seed(19)
    q = torch.randn(2, 2, 16, d, generator=g).to(torch.bfloat16)
    kv = make_kv(g, 2, 300, d)
    kv[1, 7, 3] = float("nan")
    idx = make_idx(g, 2, 2, 290, 300)
    idx[1, 1, 5] = 7
    sinks = torch.randn(16, generator=g)
    args = [t.to(device) for t in (q, ops.pack_kv_fp8(kv) if fp8 else kv, sinks, idx)]
    rope = (_rope_table(20).to(device), torch.randint(0, 20, (2, 2), generator=g, dtype=torch.int32).to(device))
    outs = []
    for fits in (True, False):
        monkeypatch.setattr(kernels, "_row_offsets_fit_int32", lambda n_rows, row_stride: fits)
        outs.append(_check(*args, *rope, what=f"32-bit rows {fits}").view(torch.int16))
    assert torch.equal(outs[0], outs[1])


def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(10)
    q = torch.randn(2, 16, 3, 128, generator=g).to(torch.bfloat16).to(device).transpose(1, 2)  # [B, S, H, D]
    big = make_kv(g, 2, 30, 256).to(device)
    kv = big[:, :, :128]  # row stride 256
    idx = make_idx(g, 2, 3, 40, 30).to(device).transpose(1, 2).contiguous().transpose(1, 2)
    idx = torch.stack((idx, idx), -1)[..., 0]  # idx with a non-unit last stride
    sinks = torch.randn(16, generator=g).to(device)
    _check(q, kv, sinks, idx, what="strided")
    pos = torch.randint(0, 8, (3, 2), generator=g, dtype=torch.int32).to(device).t()
    _check(q, kv, sinks, idx, _rope_table(8).to(device), pos, what="strided positions")


def test_out_of_range_positions_are_clamped(device):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 8, 128, generator=g).to(torch.bfloat16).to(device)
    kv = make_kv(g, 1, 5, 128).to(device)
    idx = make_idx(g, 1, 2, 5, 5).to(device)
    sinks = torch.zeros(8, device=device)
    freqs = _rope_table(10).to(device)
    wild = torch.tensor([[-3, 50]], dtype=torch.int64, device=device)
    clamped = torch.tensor([[0, 9]], dtype=torch.int64, device=device)
    assert torch.equal(_triton(q, kv, sinks, idx, 0.1, freqs, wild), _triton(q, kv, sinks, idx, 0.1, freqs, clamped))


@given(rows=st.integers(0, 9), d=st.sampled_from([128, 512]), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]), special=st.booleans(), seed=st.integers(0, 2**31))
def test_pack_kv_fp8_kernel_is_bit_exact(device, rows, d, dtype, magnitude, special, seed):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(rows, d, generator=g) * magnitude
    if special and rows:
        kv[0, :64] = 0.0
        kv[-1, 70] = float("nan")
        kv[rows // 2, 5] = float("inf")
        kv[rows // 2, d - 3] = -float("inf")  # in the rope part: stored as is
    kv = kv.to(dtype)
    with use_backend("triton"):
        got = ops.pack_kv_fp8(kv.to(device)).cpu()
    want = ref.pack_kv_fp8(kv)
    # Every byte equal, except that a NaN rope value only has to stay a NaN (its payload bits
    # are the converter's choice: 0x7FC0 here, 0x7FFF from the GPU's cvt).
    rope = slice(d - ROPE, d + ROPE)
    got_rope, want_rope = (t[:, rope].contiguous().view(torch.bfloat16) for t in (got, want))
    nan = torch.isnan(want_rope)
    assert torch.equal(torch.isnan(got_rope), nan)
    assert torch.equal(got_rope[~nan].view(torch.int16), want_rope[~nan].view(torch.int16))
    got[:, rope], want[:, rope] = 0, 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("d", [128, 512])
def test_pack_kv_fp8_kernel_scale_boundaries(device, d):
    # Block maxima at 448 * 2^k and one float32 ulp either side: the scale exponent is
    # ceil(log2(amax / 448)), so the division must round as the oracle's IEEE division does.
    blocks = (d - ROPE) // 64
    kv = torch.full((3 * 21, d), 0.25)
    for i, k in enumerate(range(-10, 11)):
        exact = 448.0 * 2.0 ** k
        for j, amax in enumerate((exact, torch.nextafter(torch.tensor(exact), torch.tensor(0.0)).item(),
                                  torch.nextafter(torch.tensor(exact), torch.tensor(1e30)).item())):
            kv[3 * i + j, 7:(d - ROPE):64] = amax  # one element per block
    with use_backend("triton"):
        got = ops.pack_kv_fp8(kv.to(device)).cpu()
    assert blocks >= 1 and torch.equal(got, ref.pack_kv_fp8(kv))


def test_pack_kv_fp8_kernel_any_leading_shape(device):
    kv = make_kv(torch.Generator().manual_seed(12), 3, 7, 512).to(device)
    with use_backend("triton"):
        rows = ops.pack_kv_fp8(kv[:, ::2])
    assert rows.shape == (3, 4, 584)
    assert torch.equal(ref.unpack_kv_fp8(rows.cpu(), 512), kv[:, ::2].float().cpu())


# ---------------------------------------------------------------------------------------
# Release shapes (GPU)


def release_inputs(heads, k, bsz, seq, fp8, pos_dtype=torch.int32):
    """(q, cache, sinks, idx, freqs, positions) at a release shape (D = 512): K distinct
    candidates of a 4096-row cache with every 97th slot -1, positions up to 70000."""
    g = torch.Generator().manual_seed(heads + k + seq)
    d, n = 512, 4096
    q = torch.randn(bsz, seq, heads, d, generator=g).to(torch.bfloat16)
    kv = make_kv(g, bsz, n, d)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(bsz * seq)]).view(bsz, seq, k).int()
    idx[..., ::97] = -1
    sinks = torch.randn(heads, generator=g)
    freqs = _rope_table(70000)
    positions = torch.randint(0, 70000, (bsz, seq), generator=g, dtype=pos_dtype)
    return q, ops.pack_kv_fp8(kv) if fp8 else kv, sinks, idx, freqs, positions


@pytest.mark.gpu
@pytest.mark.parametrize("heads, k, bsz, seq", [(128, 1152, 4, 1), (64, 640, 4, 1), (128, 1152, 1, 1),
                                                (64, 640, 1, 37), (128, 1152, 1, 300)])
@pytest.mark.parametrize("fp8", [True, False])
def test_release_shapes(device, heads, k, bsz, seq, fp8):
    q, cache, sinks, idx, freqs, positions = (t.to(device) for t in release_inputs(heads, k, bsz, seq, fp8))
    _check(q, cache, sinks, idx, what="release shape")
    _check(q, cache, sinks, idx, freqs, positions, what="release shape, inverse rope")


@pytest.mark.gpu
@pytest.mark.parametrize("block_k, stages, fp8, lazy, merge_w", [
    (64, 3, True, True, 128), (64, 2, True, True, 128), (64, 2, False, True, 128), (32, 2, False, True, 128),
    (64, 3, True, False, 256), (64, 3, True, True, 256), (64, 2, True, False, 256)])
@pytest.mark.parametrize("heads, k, bsz", [(128, 1152, 4), (64, 640, 2)])
def test_config_forms_release_shapes(device, monkeypatch, block_k, stages, fp8, lazy, merge_w, heads, k, bsz):
    """The lazy-rescale and wide-merge configs the tuner may choose, compiled for the GPU, at
    release shapes against the oracle (both shapes split their candidates on a GPU of >= 64
    SMs: 9 and 5 slices on 132)."""
    _run_config(monkeypatch, stages, BLOCK_K=block_k, LAZY_RESCALE=lazy, MERGE_W=merge_w)
    g = torch.Generator().manual_seed(heads + k + block_k)
    d, n = 512, 4096
    q = torch.randn(bsz, 1, heads, d, generator=g).to(torch.bfloat16)
    kv = make_kv(g, bsz, n, d)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(bsz)]).view(bsz, 1, k).int()
    idx[..., ::97] = -1
    sinks = torch.randn(heads, generator=g)
    cache = ops.pack_kv_fp8(kv) if fp8 else kv
    args = [t.to(device) for t in (q, cache, sinks, idx)]
    _check(*args, what=f"config form {block_k}/{stages} lazy={lazy} merge={merge_w}")
    _check(*args, _rope_table(100).to(device), torch.tensor([[99]] * bsz, dtype=torch.int32, device=device),
           what=f"config form {block_k}/{stages} lazy={lazy} merge={merge_w}, inverse rope")


# ---------------------------------------------------------------------------------------
# Validation and the torch.library ops


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) functions and tracing of the ops torch.compile sees."""
    g = torch.Generator().manual_seed(14)
    q = torch.randn(1, 2, 8, 128, generator=g).to(torch.bfloat16)
    kv = make_kv(g, 1, 6, 128)
    idx = make_idx(g, 1, 2, 5, 6)
    torch.library.opcheck(torch.ops.dsv4.sparse_attention.default, (q, kv, torch.zeros(8), idx, 0.1, None, None))
    torch.library.opcheck(torch.ops.dsv4.sparse_attention.default,
                          (q, ops.pack_kv_fp8(kv), torch.zeros(8), idx, 0.1, torch.zeros(4, 32, 2),
                           torch.zeros(1, 2, dtype=torch.int32)))
    torch.library.opcheck(torch.ops.dsv4.pack_kv_fp8.default, (kv,))


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
