"""The cuda backend of sparse_attention (cuda_fallback/csrc/sm90_sparse_attention.cu: FP8 cache,
head dim 512, heads in blocks of 64, sm_90a) against the oracle with the Triton kernel's
tolerance, and the registry rule that sends it only those arguments.  GPU only (sm_90)."""

import pytest
import torch
from hypothesis import given, strategies as st

from cuda_fallback import attention as cuda_attention
from dsv4_triton import ops, use_backend
from dsv4_triton.reference import attention as ref
from dsv4_triton.registry import BackendUnavailableError
from helpers import assert_close, backends_called, needs_cuda_backend
from test_attention import _rope_table, _tol, make_idx, make_kv, release_inputs

pytestmark = pytest.mark.gpu
D = 512


_needs_cuda_backend = needs_cuda_backend("sparse_attention")


def _cuda(*args):
    with use_backend("cuda", ops=["sparse_attention"]):
        return ops.sparse_attention(*args)


def _inputs(seed, bsz, seq, heads, n, k, magnitude=1.0, rope=False):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(bsz, seq, heads, D, generator=g) * magnitude).to(torch.bfloat16)
    kv = make_kv(g, bsz, n, D, magnitude)
    sinks = torch.randn(heads, generator=g) * 3
    idx = make_idx(g, bsz, seq, k, n)
    freqs = positions = None
    if rope:
        freqs = _rope_table(4096)
        positions = torch.randint(0, 4096, (bsz, seq), generator=g, dtype=torch.int32)
    return q, ops.pack_kv_fp8(kv), sinks, idx, freqs, positions


def _check(device, q, cache, sinks, idx, freqs=None, positions=None, what=""):
    args = [None if t is None else t.to(device) for t in (q, cache, sinks, idx)]
    extra = [None if t is None else t.to(device) for t in (freqs, positions)]
    got = _cuda(*args, D ** -0.5, *extra)
    want = ref.sparse_attention(*args, D ** -0.5, *extra)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert_close(got, want, **_tol(cache, rope=freqs is not None), what=what)
    return got


@given(bsz=st.integers(1, 2), seq=st.integers(1, 4), heads=st.sampled_from([64, 128, 192, 256]),
       n=st.integers(1, 400), k=st.integers(1, 400), rope=st.booleans(), num_sms=st.sampled_from([1, 6, 1000]),
       magnitude=st.sampled_from([1.0, 8.0]), crossover=st.booleans(), seed=st.integers(0, 2**31))
def test_matches_oracle(device, bsz, seq, heads, n, k, rope, num_sms, magnitude, crossover, seed):
    """Partial tiles, holes, duplicates, both ends of the cache, one to four head blocks with and
    without crossover (pairs of head blocks sharing decoded tiles), and the K split (1 SM never
    splits; 6 or 1000 split up to 400 candidates into merged slices)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_attention, "sm_count", lambda device: num_sms)
        mp.setattr(cuda_attention, "CROSSOVER", crossover)
        _check(device, *_inputs(seed, bsz, seq, heads, n, k, magnitude, rope),
               what=f"sms={num_sms} rope={rope} peers={cuda_attention.peers(heads)}")


def test_crossover_needs_head_block_pairs(device):
    """The host entry refuses crossover over an odd number of 64-head blocks."""
    from cuda_fallback.loader import extension_at

    q, cache, sinks, idx, _, _ = (t.to(device) if t is not None else t for t in _inputs(1, 1, 1, 64, 70, 64))
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="peers: expected 1, or 2 with a multiple of 128 heads; got 2 with 64"):
        extension_at(q.device.index).sparse_attention_fp8(q, cache, sinks, idx, out, sinks, sinks, 0, sinks, sinks,
                                                        1.0, 1, 64, 2, torch.cuda.current_stream(q.device).cuda_stream)


@pytest.mark.parametrize("heads, k, bsz, seq", [(128, 1152, 8, 1), (64, 640, 16, 1), (64, 640, 1, 1),
                                                (128, 1152, 1, 5)])
def test_release_shapes(device, heads, k, bsz, seq):
    q, cache, sinks, idx, freqs, positions = release_inputs(heads, k, bsz, seq, True, pos_dtype=torch.int64)
    _check(device, q, cache, sinks, idx, what="release shape")
    _check(device, q, cache, sinks, idx, freqs, positions, what="release shape, inverse rope")


@pytest.mark.parametrize("num_sms", [1, 1000])
def test_empty_rows_nan_and_large_scores(device, monkeypatch, num_sms):
    """Rows of only -1 (and out-of-range indices) give exactly 0; scores of several hundred and
    sinks of +-50 stay finite; a NaN query head and a NaN KV row propagate as in the oracle."""
    monkeypatch.setattr(cuda_attention, "sm_count", lambda device: num_sms)
    q, cache, sinks, idx, _, _ = _inputs(5, 1, 4, 64, 300, 260, magnitude=8.0)
    idx[0, 0] = -1
    idx[0, 1, ::2] = 300  # == N: masked like -1 outside checked mode
    idx[0, 1, 1::2] = -1
    sinks[:8] = 50.0
    sinks[8:16] = -50.0
    q[0, 2, 5, 17] = float("nan")
    kv = ref.unpack_kv_fp8(cache, D)
    kv[0, 7, 3] = float("nan")
    idx[0, 3, 10] = 7
    idx[0, 2] = torch.where(idx[0, 2] == 7, 0, idx[0, 2])
    cache = ops.pack_kv_fp8(kv.to(torch.bfloat16))
    got = _check(device, q, cache, sinks, idx, what=f"edge rows, sms={num_sms}")
    assert bool((got[0, :2] == 0).all())
    nan = torch.isnan(got.float()).any(-1)[0].cpu()
    assert bool(nan[2, 5]) and int(nan[2].sum()) == 1
    assert bool(nan[3].all()) and not bool(nan[:2].any())


@pytest.mark.parametrize("heads, crossover", [(128, True), (64, False)])
def test_decode_of_every_code_and_scale_is_exact(device, monkeypatch, heads, crossover):
    """Each query has one candidate, a zero query and a sink of -1e4, so its output is that
    row's values times exactly 1: every non-NaN E4M3 code under scales 2^-127 .. 2^113 must
    come out as the oracle's BF16 value (-0 as +0: the P @ V sum adds the tile's empty rows).
    A NaN code under a finite scale, and a NaN scale, make the output NaN."""
    monkeypatch.setattr(cuda_attention, "CROSSOVER", crossover)
    g = torch.Generator().manual_seed(11)
    plain = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    scales = torch.tensor([0, 1, 2, 60, 120, 127, 133, 134, 135, 136, 150, 240], dtype=torch.uint8)
    n = 48
    rows = torch.zeros(n, ref.fp8_row_bytes(D), dtype=torch.uint8)
    for r in range(n):
        rows[r, :448] = plain[(torch.arange(448) + 61 * r) % len(plain)]  # every code in every row
        rows[r, 576:583] = scales[torch.randint(0, len(scales), (7,), generator=g)]
    rows[:, 448:576] = torch.randn(n, 64, generator=g).to(torch.bfloat16).view(torch.uint8)
    rows[n - 2, 100] = 0x7F  # NaN code, finite scale
    rows[n - 1, 576 + 3] = 0xFF  # NaN scale
    want = ref.unpack_kv_fp8(rows, D).to(torch.bfloat16)
    # Without crossover the registry takes up to 16 (token, head block) pairs a call.
    per_call = n if crossover else 16
    for lo in range(0, n, per_call):
        m = min(per_call, n - lo)
        q = torch.zeros(1, m, heads, D, dtype=torch.bfloat16)
        idx = torch.arange(lo, lo + m, dtype=torch.int32).view(1, m, 1)
        sinks = torch.full((heads,), -1e4)
        got = _cuda(q.to(device), rows[None].to(device), sinks.to(device), idx.to(device), D ** -0.5).cpu()
        for r in range(lo, lo + m):
            if r < n - 2:
                assert torch.equal(got[0, r - lo], want[r].expand(heads, D)), f"row {r}"
            else:
                assert bool(torch.isnan(got[0, r - lo].float()).all()), f"row {r}"


def test_agrees_with_triton(device):
    q, cache, sinks, idx, freqs, positions = _inputs(17, 2, 2, 128, 2000, 1152, rope=True)
    args = [t.to(device) for t in (q, cache, sinks, idx)]
    got = _cuda(*args, D ** -0.5, freqs.to(device), positions.to(device))
    with use_backend("triton"):
        other = ops.sparse_attention(*args, D ** -0.5, freqs.to(device), positions.to(device))
    assert_close(got, other, **_tol(cache, rope=True), what="cuda vs triton")


@pytest.mark.parametrize("num_sms", [1, 1000])
def test_replays_in_a_cuda_graph(device, monkeypatch, num_sms):
    monkeypatch.setattr(cuda_attention, "sm_count", lambda device: num_sms)
    q, cache, sinks, idx, freqs, positions = (t.to(device) for t in _inputs(3, 2, 1, 128, 700, 640, rope=True))
    eager = _cuda(q, cache, sinks, idx, D ** -0.5, freqs, positions)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _cuda(q, cache, sinks, idx, D ** -0.5, freqs, positions)
    q.copy_(torch.flip(q, dims=[2]))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, _cuda(q, cache, sinks, idx, D ** -0.5, freqs, positions))
    assert not torch.equal(out, eager)


def test_registry_sends_only_covered_arguments(device, monkeypatch):
    """FP8 rows at D = 512 with 64 heads and up to 16 (token, head block) pairs, or 128 heads
    (crossover) at any count, run the cuda kernel; a BF16 cache, 16 heads and 17 pairs of 64
    heads run Triton, and forcing cuda on them raises."""
    ran = backends_called(monkeypatch, "sparse_attention")
    q, cache, sinks, idx, _, _ = (None if t is None else t.to(device) for t in _inputs(1, 1, 16, 64, 100, 70))
    ops.sparse_attention(q, cache, sinks, idx, 0.05)
    kv = ref.unpack_kv_fp8(cache, D).to(torch.bfloat16)
    ops.sparse_attention(q, kv, sinks, idx, 0.05)
    ops.sparse_attention(q[:, :, :16].contiguous(), cache, sinks[:16].contiguous(), idx, 0.05)
    q17, cache17, sinks17, idx17, _, _ = (None if t is None else t.to(device) for t in _inputs(2, 1, 17, 64, 100, 70))
    ops.sparse_attention(q17, cache17, sinks17, idx17, 0.05)
    q34, cache34, sinks34, idx34 = (t.to(device) for t in _inputs(3, 1, 17, 128, 100, 70)[:4])
    ops.sparse_attention(q34, cache34, sinks34, idx34, 0.05)
    assert ran == ["cuda", "triton", "triton", "triton", "cuda"]
    with pytest.raises(BackendUnavailableError, match="BF16 cache"):
        _cuda(q, kv, sinks, idx, 0.05)
    with pytest.raises(BackendUnavailableError, match="17 .token, 64-head block. pairs"):
        _cuda(q17, cache17, sinks17, idx17, 0.05)
