"""The cuda backend of hc_pre (cuda_fallback/csrc/sm90_hc_pre.cu: clusters of 16 CTAs holding fn,
sm_90a) against the FP32 oracle, and the registry rule that sends it only the calls it covers.

Its mixes use fn as two BF16 parts (the rest below 2^-16 of each element): the tolerance of
the Triton tests plus 2^-16 * sum|X fn| (``FN_PARTS_ERROR``), propagated through the same
bounds of pre, post, comb and y (``test_mhc._check_pre``).  GPU only (sm_90); the rule's
reasons are checked on the CPU in test_mhc.py."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cuda_fallback import mhc as cuda_mhc
from dsv4_triton import ops, use_backend
from dsv4_triton.reference import mhc as ref
from dsv4_triton.registry import BackendUnavailableError
from helpers import backends_called, needs_cuda_backend
from test_mhc import FP32_EPS, _check_pre, _inputs

FN_PARTS_ERROR = 2.0 ** -16


def _cuda(*args, **kw):
    with use_backend("cuda", ops=["hc_pre"]):
        return ops.hc_pre(*args, **kw)


_needs_cuda_backend = needs_cuda_backend("hc_pre")
gpu = pytest.mark.gpu


@gpu
@settings(max_examples=12, deadline=None)
@given(T=st.sampled_from([65, 100, 257, 1000, 4096]), dim=st.sampled_from([512, 1536, 4096, 7168]),
       scales=st.sampled_from([(0.5, 0.5, 0.5), (40.0, 40.0, 1.0), (0.5, 0.5, 30.0)]),
       iters=st.sampled_from([1, 20]), seed=st.integers(0, 2**31))
def test_matches_oracle(T, dim, scales, iters, seed):
    """Batches of 16 with a partial last one, one cluster or many, every multiple-of-512 width
    class, saturated sigmoids and one-hot softmax rows."""
    X, fn, scale, base = _inputs(T, dim, seed, "cuda", scale=scales)
    _check_pre(X, fn, scale, base, _cuda(X, fn, scale, base, iters), iters=iters, fn_parts_error=FN_PARTS_ERROR)


@gpu
def test_runs_on_the_cuda_backend_at_prefill_sizes(monkeypatch):
    X, fn, scale, base = _inputs(300, 4096, 3, "cuda")
    called = backends_called(monkeypatch, "hc_pre")
    ops.hc_pre(X, fn, scale, base)
    ops.hc_pre(X[:64], fn, scale, base)
    assert called == ["cuda", "triton"]


@gpu
def test_forced_on_uncovered_arguments_raises():
    X, fn, scale, base = _inputs(300, 1000, 3, "cuda")
    with pytest.raises(BackendUnavailableError, match="dim 1000"):
        _cuda(X, fn, scale, base)


@gpu
def test_single_products_err_by_the_dropped_part_only():
    # One non-zero X element (1.0) per token: each mix is one product fn * 1, which the two
    # BF16 parts give to 2^-16 relative (one part alone would err by up to 2^-8, failing this).
    T, dim = 80, 512
    g = torch.Generator().manual_seed(1)
    hot = torch.randint(0, 4 * dim, (T,), generator=g)
    X = torch.zeros(T, 4 * dim)
    X[torch.arange(T), hot] = 1.0
    X = X.view(T, 4, dim).to(torch.bfloat16).cuda()
    fn = (torch.randn(24, 4 * dim, generator=g) * (4 * dim) ** -0.5).cuda()
    scale = torch.tensor([1.0, 1.0, 1.0], device="cuda")
    base = torch.zeros(24, device="cuda")
    _, post, _ = _cuda(X, fn, scale, base)
    want = ref.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6)[1].cpu()
    mix = fn.cpu()[4:8, hot].T * (4 * dim) ** 0.5  # |mix| up to norm_eps
    # d post / d mix <= 1/2; the rsqrt and the sigmoid a few ulps.
    bound = 0.5 * mix.abs() * (FN_PARTS_ERROR + 8 * FP32_EPS) + 8 * FP32_EPS
    assert bool(((post.cpu() - want).abs() <= bound).all())


@gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_propagate_like_oracle(bad):
    X, fn, scale, base = _inputs(70, 512, 11, "cuda")
    X[33, 2, 17] = bad  # rsqrt(inf) = 0 and inf * 0 = NaN: the token's mixes are all NaN
    out = _cuda(X, fn, scale, base)
    others = [t for t in range(70) if t != 33]
    for got, name in zip(out, ("y", "post", "comb")):
        assert bool(torch.isnan(got[33].float()).all()), f"{name} of the bad token is not NaN"
        assert not bool(torch.isnan(got[others].float()).any()), f"{name}: NaN leaked to other tokens"
    _check_pre(X, fn, scale, base, out, fn_parts_error=FN_PARTS_ERROR)


@gpu
def test_deterministic_and_graph_replays():
    # Fixed summation orders: repeated launches are bit-identical; a captured launch replays
    # the eager result (no workspace: everything the kernel keeps is in shared memory).
    X, fn, scale, base = _inputs(2000, 7168, 29, "cuda")
    first = _cuda(X, fn, scale, base)
    for out in (_cuda(X, fn, scale, base) for _ in range(2)):
        for a, b in zip(out, first):
            assert torch.equal(a, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with use_backend("cuda", ops=["hc_pre"]), torch.cuda.graph(graph):
        captured = ops.hc_pre(X, fn, scale, base)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, first):
            assert torch.equal(a, b)


@gpu
def test_more_batches_than_clusters_and_one_batch_per_cluster(monkeypatch):
    # Grids of 1, 2 and 3 clusters: each loops over many batches, so every barrier slot is
    # reused many times; and more clusters than batches (the grid is cut to the batches).
    X, fn, scale, base = _inputs(1000, 1024, 7, "cuda")
    want = ref.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6)
    for clusters in (1, 2, 3, 1000):
        monkeypatch.setattr(cuda_mhc, "max_clusters", lambda index, dim, n=clusters: n)
        out = _cuda(X, fn, scale, base)
        _check_pre(X, fn, scale, base, out, fn_parts_error=FN_PARTS_ERROR)
        assert out[0].shape == want[0].shape
