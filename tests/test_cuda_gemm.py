"""The cuda backend of fp4_linear (cuda_fallback/csrc/mxfp4_decode_gemm.cu) against the oracle,
and the registry rule that sends it decode-sized MXFP4 calls only.  GPU only: the source is
compiled on the CPU by test_cuda_fallback."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, registry, use_backend
from dsv4_triton.reference import gemm as ref
from dsv4_triton.registry import BackendUnavailableError
from helpers import counting_backends, needs_cuda_backend, replayed_and_eager
from test_gemm import SPEC_FP4, _gen, assert_gemm_close, random_e8m0, random_fp4, spread_inputs

pytestmark = pytest.mark.gpu


_needs_cuda_backend = needs_cuda_backend("fp4_linear")


def _cuda(*args):
    with use_backend("cuda", ops=["fp4_linear"]):
        return ops.fp4_linear(*args)


def _check(y, x, w, ws, extra=None, what=""):
    assert_gemm_close(y, ref.fp4_linear(x, w, ws, "mxfp4", None), ref.dequant_activation(x),
                      ref.dequant_fp4_weight(w, ws, "mxfp4", None), extra=extra, what=what)


@given(m=st.integers(1, 8), n=st.integers(1, 100), kb=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_matches_oracle(device, m, n, kb, seed):
    # Odd N (a partial 16-row tile), 1 to 8 rows (the MMA's 8 columns, some unused),
    # K from one 128-block up (fewer blocks than warps included).
    g = _gen(seed)
    k = 128 * kb
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16).to(device)
    w, ws, _ = random_fp4(n, k, g, device)
    y = _cuda(x, w, ws)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    _check(y, x, w, ws)


def test_decodes_every_byte_exactly(device):
    # Unit activation rows (act_quant exact: q = 256, s = 2^-8): y is the decoded weight element
    # by element, bit for bit, every byte in both rows' orders, 8 rows a call.
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    w = torch.stack([packed, packed.flip(0)]).to(device)  # [2, 256] -> K = 512
    ws = torch.full((2, 16), 127 + 3, dtype=torch.uint8).view(torch.float8_e8m0fnu).to(device)
    eye = torch.eye(512, dtype=torch.bfloat16, device=device)
    y = torch.cat([_cuda(eye[i:i + 8], w, ws) for i in range(0, 512, 8)])
    for row in range(2):
        b = w[row].cpu()
        codes = torch.stack([b & 15, b >> 4], -1).flatten().long()  # element 2k in the low nibble
        assert torch.equal(y[:, row].float().cpu(), torch.tensor(SPEC_FP4)[codes] * 8.0), row


@given(m=st.integers(1, 8), n=st.integers(1, 40), spread=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_exponent_spread_within_a_block(device, m, n, spread, seed):
    # Exact (up to FP32 summation order) while the four exponents of a 128-block span <= 23
    # binades; beyond, fp16 rounding of the smaller blocks' values, within the bound the
    # Triton kernel's FP8 expansion is held to (2^(e_max - 16) per element).
    x, w, ws, _, extra = spread_inputs(m, n, spread, seed, device)
    _check(_cuda(x, w, ws), x, w, ws, extra=None if spread <= 23 else extra, what=f"spread {spread}")


@pytest.mark.parametrize("e_lo, e_hi, x_scale", [(-104, -100, 1e3), (96, 100, 1e-3), (-127, -127, 1e3)])
def test_extreme_scale_exponents(device, e_lo, e_hi, x_scale):
    g = _gen(5)
    x = (torch.randn(8, 256, generator=g) * x_scale).to(torch.bfloat16).to(device)
    w, _, _ = random_fp4(24, 256, g, device)
    ws = random_e8m0((24, 8), g, device, e_lo, e_hi)
    _check(_cuda(x, w, ws), x, w, ws, what=f"exponents {e_lo}..{e_hi}")


def test_nan_inf_zero_blocks_propagate_like_oracle(device):
    g = _gen(7)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    x[0, 3] = float("nan")  # a NaN block: row 0 NaN
    x[1, 130] = float("-inf")  # an infinite block: row 1 NaN
    x[2] = 0.0  # an all-zero row: zeros (NaN only in poisoned columns)
    x = x.to(device)
    w, ws, _ = random_fp4(40, 256, g, "cpu")
    w[:, 64:80] = 0  # an all-zero 32-block ...
    ws.view(torch.uint8)[:, 4] = 1  # ... with the tiniest scale
    ws.view(torch.uint8)[11, 6] = 0xFF  # an E8M0 NaN: column 11 NaN
    w, ws = w.to(device), ws.to(device)
    y = _cuda(x, w, ws)
    _check(y, x, w, ws)
    assert bool(torch.isnan(y[:2]).all()) and bool(torch.isnan(y[:, 11]).all())
    assert bool((y[2, :11] == 0).all())


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n, k", [(24576, 7168), (7168, 1536), (3072, 7168), (512, 7168)])
def test_real_shapes(device, m, n, k):
    # Both launch forms: many row tiles (4 warps split K) and few (8 warps).
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, ws, _ = random_fp4(n, k, g, device)
    _check(_cuda(x, w, ws), x, w, ws, what=f"{m} x {n} x {k}")


def test_leading_dims_and_strided_activation(device):
    g = _gen(11)
    base = torch.randn(2, 2, 2 * 384, generator=g).to(torch.bfloat16).to(device)
    x = base[..., ::2]
    w, ws, _ = random_fp4(72, 384, g, device)
    y = _cuda(x, w, ws)
    assert y.shape == (2, 2, 72)
    _check(y.reshape(-1, 72), x.reshape(-1, 384), w, ws)


counted = counting_backends("fp4_linear")


def test_dispatch_sends_decode_mxfp4_to_cuda_and_the_rest_to_triton(device, counted):
    assert registry.selected_backend("fp4_linear", device) == "cuda, else triton"
    ran = counted
    g = _gen(3)
    w, ws, _ = random_fp4(64, 256, g, device)
    for m, expect in ((1, "cuda"), (8, "cuda"), (9, "triton")):
        ran.clear()
        ops.fp4_linear(torch.randn(m, 256, generator=g).to(torch.bfloat16).to(device), w, ws)
        assert ran == [expect], (m, ran)
    ran.clear()
    w96, ws96, _ = random_fp4(8, 96, g, device)  # K not a multiple of 128
    ops.fp4_linear(torch.randn(4, 96, generator=g).to(torch.bfloat16).to(device), w96, ws96)
    assert ran == ["triton"]
    ran.clear()
    wn, wsn, gs = random_fp4(8, 256, g, device, "nvfp4")
    ops.fp4_linear(torch.randn(4, 256, generator=g).to(torch.bfloat16).to(device), wn, wsn, "nvfp4", gs)
    assert ran == ["triton"]
    ran.clear()
    wide = torch.zeros(64, 129, dtype=torch.uint8, device=device)
    ops.fp4_linear(torch.randn(4, 256, generator=g).to(torch.bfloat16).to(device), wide[:, 1:], ws)
    assert ran == ["triton"]  # weight rows not 16-byte aligned


def test_forcing_cuda_on_arguments_it_does_not_cover_is_an_error(device):
    g = _gen(4)
    w, ws, _ = random_fp4(16, 256, g, device)
    x = torch.randn(9, 256, generator=g).to(torch.bfloat16).to(device)
    with pytest.raises(BackendUnavailableError, match="9 activation rows"):
        _cuda(x, w, ws)


def test_cuda_graph_replay(device):
    g = _gen(9)
    w, ws, _ = random_fp4(3072, 7168, g, device)
    x = torch.randn(4, 7168, generator=g).to(torch.bfloat16).to(device)
    y, again = replayed_and_eager(lambda: ops.fp4_linear(x, w, ws), lambda: _cuda(x, w, ws), x,
                                  torch.randn(4, 7168, generator=g).to(torch.bfloat16))
    assert torch.equal(y, again)
    _check(y, x, w, ws)
