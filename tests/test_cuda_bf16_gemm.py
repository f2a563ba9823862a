"""The hand-written BF16 GEMM (cuda_fallback/csrc/sm90_bf16_gemm.cu) against the oracle: the
cuda backend of grouped_linear at prefill sizes and the BF16 route of fp4_linear's NVFP4
weights, and the registry rules that send them there.  GPU only: the source is compiled on the
CPU by test_cuda_fallback."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, registry, use_backend
from cuda_fallback import gemm as cuda_gemm  # after dsv4_triton, which imports it while registering
from helpers import counting_backends, needs_cuda_backend, replayed_and_eager
from test_gemm import _gen, assert_fp4_close, assert_gemm_close, random_fp4, random_fp4_linear_case

pytestmark = pytest.mark.gpu


_needs_cuda_backend = needs_cuda_backend("grouped_linear")


def _check(y, x, w, scale=None, what=""):
    # Per group: the FP32 product of the BF16 operands (times the scale), one BF16 rounding.
    s = 1.0 if scale is None else float(scale)
    for g in range(x.shape[1]):
        xd, wd = x[:, g].float(), w[g].float()
        oracle = ((xd @ wd.t()) * s).to(torch.bfloat16)
        assert_gemm_close(y[:, g], oracle, xd, wd * abs(s), what=f"{what} group {g}")


@pytest.mark.parametrize("tile_rows", [128, 256])
@given(t=st.integers(1, 700), g=st.integers(1, 3), n8=st.integers(1, 40), k8=st.integers(1, 60),
       scaled=st.booleans(), seed=st.integers(0, 2**31))
def test_matches_oracle(device, tile_rows, t, g, n8, k8, scaled, seed):
    # Any multiple of 8 for N and K: partial row, 128-column and 64-wide K tiles (the copies
    # fill them with zeros, the stores clip them), one K block and many.
    gen = _gen(seed)
    n, k = 8 * n8, 8 * k8
    x = torch.randn(t, g, k, generator=gen).to(torch.bfloat16).to(device)
    w = (torch.randn(g, n, k, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    scale = torch.tensor(0.37, device=device) if scaled else None
    y = torch.full((t, g, n), float("nan"), dtype=torch.bfloat16, device=device)
    cuda_gemm.bf16_gemm(x, w, y, scale, tile_rows)
    _check(y, x, w, scale)


def test_strided_operands_and_special_values(device):
    # x as a slice of a wider row (the attention output viewed [T, G, K]), y written in place
    # of a wider buffer; Inf and NaN inputs propagate as the oracle's.
    gen = _gen(2)
    base = torch.randn(300, 4, 2 * 264, generator=gen).to(torch.bfloat16)
    base[5, 1, 11] = float("nan")  # x[5, 1, 3]
    base[6, 0, 15] = float("inf")  # x[6, 0, 7]
    x = base.to(device)[:, :, 8:264]
    w = (torch.randn(4, 200, 256, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    out = torch.zeros(300, 4, 208, dtype=torch.bfloat16, device=device)
    y = out[:, :, :200]
    cuda_gemm.bf16_gemm(x, w, y)
    assert bool(torch.isnan(y[5, 1]).all()) and not bool(torch.isnan(y[5, 0]).any())
    assert bool((out[:, :, 200:] == 0).all())  # nothing written past the view
    fin = torch.ones(300, dtype=torch.bool)
    fin[[5, 6]] = False
    _check(y[fin], x[fin], w)
    # Groups outermost in memory (x made [G, T, K] and viewed [T, G, K]): strides out of order.
    xt = torch.randn(4, 300, 256, generator=gen).to(torch.bfloat16).to(device).transpose(0, 1)
    cuda_gemm.bf16_gemm(xt, w, y)
    _check(y, xt, w)


def test_rejects_bad_operands(device):
    x = torch.zeros(300, 2, 64, dtype=torch.bfloat16, device=device)
    w = torch.zeros(2, 64, 64, dtype=torch.bfloat16, device=device)
    y = torch.zeros(300, 2, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(RuntimeError, match="x: expected bf16"):
        cuda_gemm.bf16_gemm(x.float(), w, y)
    with pytest.raises(RuntimeError, match="w: expected"):
        cuda_gemm.bf16_gemm(x, w[:1], y)
    with pytest.raises(RuntimeError, match="x: expected bf16"):
        cuda_gemm.bf16_gemm(torch.zeros(300, 2, 65, dtype=torch.bfloat16, device=device)[:, :, 1:], w, y)
    with pytest.raises(RuntimeError, match="scale"):
        cuda_gemm.bf16_gemm(x, w, y, torch.ones(2, device=device))
    with pytest.raises(RuntimeError, match="tile_rows"):
        cuda_gemm.bf16_gemm(x, w, y, None, 64)


counted = counting_backends("grouped_linear")


def test_dispatch_sends_prefill_sizes_to_cuda(device, counted):
    assert registry.selected_backend("grouped_linear", device) == "cuda, else triton"
    ran = counted
    gen = _gen(3)
    w = torch.randn(16, 1024, 512, generator=gen).to(torch.bfloat16).to(device)
    first = cuda_gemm.GROUPED_MIN_ROWS
    for t, expect in ((first - 1, "triton"), (first, "cuda")):
        ran.clear()
        x = torch.randn(t, 16, 512, generator=gen).to(torch.bfloat16).to(device)
        y = ops.grouped_linear(x, w)
        assert ran == [expect], (t, ran)
        _check(y, x, w)
    ran.clear()
    ops.grouped_linear(torch.randn(first, 16, 512, generator=gen).to(torch.bfloat16).to(device), w[:, :1020])
    assert ran == ["triton"]  # N not a multiple of 8
    ran.clear()
    wide = torch.randn(first, 16, 516, generator=gen).to(torch.bfloat16).to(device)
    ops.grouped_linear(wide[:, :, 4:], w)
    assert ran == ["triton"]  # rows not 16-byte aligned


def test_cuda_graph_replay(device):
    gen = _gen(9)
    w = torch.randn(16, 1024, 1024, generator=gen).to(torch.bfloat16).to(device)
    x = torch.randn(600, 16, 1024, generator=gen).to(torch.bfloat16).to(device)
    with use_backend("cuda", ops=["grouped_linear"]):
        y, again = replayed_and_eager(lambda: ops.grouped_linear(x, w), lambda: ops.grouped_linear(x, w), x,
                                      torch.randn(600, 16, 1024, generator=gen).to(torch.bfloat16))
    assert torch.equal(y, again)
    _check(y, x, w)


# --- fp4_linear, NVFP4 weights at prefill sizes ------------------------------------------------

def _nvfp4_cuda(x, w, s, gs):
    with use_backend("cuda", ops=["fp4_linear"]):
        return ops.fp4_linear(x, w, s, "nvfp4", gs)


@given(m=st.integers(256, 700), n8=st.integers(1, 40), k16=st.integers(1, 30), seed=st.integers(0, 2**31))
def test_nvfp4_prefill_matches_oracle(device, m, n8, k16, seed):
    n = 8 * n8
    x, w, s, gs = random_fp4_linear_case(m, n, 16 * k16, seed, device, "nvfp4")
    y = _nvfp4_cuda(x, w, s, gs)
    assert y.shape == (m, n)
    assert_fp4_close(y, x, w, s, "nvfp4", gs)


counted_fp4 = counting_backends("fp4_linear")


def test_nvfp4_prefill_dispatch_and_real_shape(device, counted_fp4):
    ran = counted_fp4
    gen = _gen(4)
    w, s, gs = random_fp4(7168, 1536, gen, device, "nvfp4")
    for m, expect in ((255, "triton"), (600, "cuda")):
        ran.clear()
        x = torch.randn(m, 1536, generator=gen).to(torch.bfloat16).to(device)
        y = ops.fp4_linear(x, w, s, "nvfp4", gs)
        assert ran == [expect], (m, ran)
        assert_fp4_close(y, x, w, s, "nvfp4", gs, what=f"{m} rows")
