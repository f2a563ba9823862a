"""The cuda backend of fp4_linear against the oracle: the decode kernel
(cuda_fallback/csrc/fp4_decode_gemm.cu, MXFP4 and NVFP4), the NVFP4 warp-group MMA kernel
(cuda_fallback/csrc/sm90_nvfp4_decode_gemm.cu, 17-64 rows on sm90a) and the MXFP4 prefill path (the weight
re-encoded as FP8 blocks, then the FP8 kernel of sm90_fp8_gemm.cu), and the registry rule that
sends it decode-sized calls and prefill-sized MXFP4 calls (NVFP4 prefill: test_cuda_bf16_gemm).
GPU only: the source is compiled on the CPU by test_cuda_fallback."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, registry, use_backend
from dsv4_triton.kernels import gemm as kern
from dsv4_triton.reference import gemm as ref
from dsv4_triton.registry import BackendUnavailableError
from helpers import counting_backends, needs_cuda_backend, replayed_and_eager
from cuda_fallback import gemm as cuda_gemm  # after dsv4_triton, which imports it while registering
from cuda_fallback.loader import arch_of
from test_gemm import (SPEC_FP4, _gen, assert_fp4_close, block_spread_error, random_block_exponents, random_e8m0,
                       random_fp4, random_fp4_linear_case, spread_inputs)

pytestmark = pytest.mark.gpu


_needs_cuda_backend = needs_cuda_backend("fp4_linear")


def _cuda(*args):
    with use_backend("cuda", ops=["fp4_linear"]):
        return ops.fp4_linear(*args)


def _decode(x, w, ws, fmt="mxfp4", gs=None):
    # The decode kernel itself, past the registry's size rule: it takes up to 16 rows at any K
    # (the registry sends 9-16 rows there on long K only).
    return cuda_gemm.fp4_decode(x, w, ws, gs)


def _wgmma(x, w, ws, gs):
    # The NVFP4 warp-group MMA kernel itself, at any N and 1-64 rows (the registry sends it
    # 17-64 rows of wide weights); sm90a only.
    if arch_of(x.device) != "sm90a":
        pytest.skip(f"the warp-group MMA kernel targets sm90a, this GPU is {arch_of(x.device)}")
    return cuda_gemm.nvfp4_wgmma(x, w, ws, gs)


def _check(y, x, w, ws, extra=None, what=""):
    assert_fp4_close(y, x, w, ws, "mxfp4", None, extra=extra, what=what)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@given(m=st.integers(1, 16), n=st.integers(1, 100), kb=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_matches_oracle(device, fmt, m, n, kb, seed):
    # Odd N (a partial 16-row tile), 1 to 16 rows (one or two groups of the MMA's 8 columns),
    # K from one 128-block up (fewer blocks than warps included), a NaN row for odd seeds.
    x, w, ws, gs = random_fp4_linear_case(m, n, 128 * kb, seed, device, fmt)
    y = _decode(x, w, ws, fmt, gs)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_fp4_close(y, x, w, ws, fmt, gs)


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


@given(m=st.integers(1, 16), n=st.integers(1, 40), spread=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_exponent_spread_within_a_block(device, m, n, spread, seed):
    # Exact (up to FP32 summation order) while the four exponents of a 128-block span <= 23
    # binades; beyond, fp16 rounding of the smaller blocks' values, within the bound the
    # Triton kernel's FP8 expansion is held to (2^(e_max - 16) per element).
    x, w, ws, _, extra = spread_inputs(m, n, spread, seed, device)
    _check(_decode(x, w, ws), x, w, ws, extra=None if spread <= 23 else extra, what=f"spread {spread}")


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n, k", [(24576, 7168), (7168, 1536), (1536, 7168), (512, 7168)])
def test_real_shapes(device, fmt, m, n, k):
    # Both launch forms: many row tiles (4 warps split K) and few (8 warps), one and two groups.
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, ws, gs = random_fp4(n, k, g, device, fmt)
    assert_fp4_close(_decode(x, w, ws, fmt, gs), x, w, ws, fmt, gs, what=f"{fmt} {m} x {n} x {k}")


@given(m=st.integers(1, 64), n=st.integers(1, 300), kb=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_nvfp4_wgmma_matches_oracle(device, m, n, kb, seed):
    # Odd N (a partial 64-row CTA), 1 to 64 rows (the MMA's N is always 64: rows past M are
    # never copied nor stored), K from one block up (fewer blocks than stages), a NaN row for
    # odd seeds.
    x, w, ws, gs = random_fp4_linear_case(m, n, 128 * kb, seed, device, "nvfp4")
    y = _wgmma(x, w, ws, gs)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_fp4_close(y, x, w, ws, "nvfp4", gs)


@pytest.mark.parametrize("m", [17, 40, 64])
@pytest.mark.parametrize("n, k", [(24576, 7168), (7168, 1536)])
def test_nvfp4_wgmma_real_shapes(device, m, n, k):
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, ws, gs = random_fp4(n, k, g, device, "nvfp4")
    assert_fp4_close(_wgmma(x, w, ws, gs), x, w, ws, "nvfp4", gs, what=f"{m} x {n} x {k}")


def test_nvfp4_wgmma_rejects_bad_arguments(device):
    g = _gen(14)
    w, ws, gs = random_fp4(64, 256, g, device, "nvfp4")
    with pytest.raises(RuntimeError, match="x_codes: expected 1 to 64 rows, got 65"):
        _wgmma(torch.randn(65, 256, generator=g).to(torch.bfloat16).to(device), w, ws, gs)
    odd = torch.zeros(64, 18, dtype=torch.float8_e4m3fn, device=device)[:, 2:]  # scale rows 2-byte aligned
    with pytest.raises(RuntimeError, match="w_scale: expected 4-byte aligned rows"):
        _wgmma(torch.randn(17, 256, generator=g).to(torch.bfloat16).to(device), w, odd, gs)


def test_leading_dims_and_strided_activation(device):
    g = _gen(11)
    base = torch.randn(2, 2, 2 * 384, generator=g).to(torch.bfloat16).to(device)
    x = base[..., ::2]
    w, ws, _ = random_fp4(72, 384, g, device)
    y = _cuda(x, w, ws)
    assert y.shape == (2, 2, 72)
    _check(y.reshape(-1, 72), x.reshape(-1, 384), w, ws)


counted = counting_backends("fp4_linear")


def test_dispatch_sends_decode_and_prefill_mxfp4_to_cuda_and_the_rest_to_triton(device, counted):
    assert registry.selected_backend("fp4_linear", device) == "cuda, else triton"
    ran = counted
    g = _gen(3)
    w, ws, _ = random_fp4(64, 256, g, device)
    last = cuda_gemm.DECODE_MAX_ROWS
    for m, expect in ((1, "cuda"), (last, "cuda"), (last + 1, "triton"), (4096, "triton")):  # 4096: K = 256 is short
        ran.clear()
        ops.fp4_linear(torch.randn(m, 256, generator=g).to(torch.bfloat16).to(device), w, ws)
        assert ran == [expect], (m, ran)
    k_long = cuda_gemm.DECODE_TWO_GROUP_MIN_K
    wl, wsl, _ = random_fp4(64, k_long, g, device)
    for m, expect in ((last + 1, "cuda"), (cuda_gemm.DECODE_KERNEL_ROWS, "cuda"),
                      (cuda_gemm.DECODE_KERNEL_ROWS + 1, "triton")):
        ran.clear()
        ops.fp4_linear(torch.randn(m, k_long, generator=g).to(torch.bfloat16).to(device), wl, wsl)
        assert ran == [expect], (m, ran)
    n, k = 1536, 1536  # fewer output tiles than SMs: the row count alone decides
    wp, wsp, _ = random_fp4(n, k, g, device)
    first = cuda_gemm.FP4_PREFILL_MIN_ROWS
    for m, expect in ((first - 1, "triton"), (first, "cuda")):
        ran.clear()
        ops.fp4_linear(torch.randn(m, k, generator=g).to(torch.bfloat16).to(device), wp, wsp)
        assert ran == [expect], (m, ran)
    for n2, k2 in ((n - 64, k), (n, 1024)):  # N not a multiple of 128, K short
        ran.clear()
        ops.fp4_linear(torch.randn(first, k2, generator=g).to(torch.bfloat16).to(device), wp[:n2, :k2 // 2],
                       wsp[:n2, :k2 // 32])
        assert ran == ["triton"], (n2, k2)
    ran.clear()
    w96, ws96, _ = random_fp4(8, 96, g, device)  # K not a multiple of 128
    ops.fp4_linear(torch.randn(4, 96, generator=g).to(torch.bfloat16).to(device), w96, ws96)
    assert ran == ["triton"]
    wn, wsn, gs = random_fp4(8, 256, g, device, "nvfp4")
    for m, expect in ((1, "cuda"), (last, "cuda"), (last + 1, "triton")):
        ran.clear()
        ops.fp4_linear(torch.randn(m, 256, generator=g).to(torch.bfloat16).to(device), wn, wsn, "nvfp4", gs)
        assert ran == [expect], (m, ran)
    # NVFP4 at 17-64 rows: the warp-group MMA kernel on wide weights, sm90a only.
    wide = cuda_gemm.wgmma_min_n(device)
    wv, wsv, gsv = random_fp4(wide, 256, g, device, "nvfp4")
    on_sm90 = arch_of(device) == "sm90a"
    for n_rows, m, expect in ((wide, 17, "cuda" if on_sm90 else "triton"),
                              (wide, cuda_gemm.WGMMA_MAX_ROWS, "cuda" if on_sm90 else "triton"),
                              (wide, cuda_gemm.WGMMA_MAX_ROWS + 1, "triton"), (wide - 64, 17, "triton")):
        ran.clear()
        ops.fp4_linear(torch.randn(m, 256, generator=g).to(torch.bfloat16).to(device), wv[:n_rows], wsv[:n_rows],
                       "nvfp4", gsv)
        assert ran == [expect], (n_rows, m, ran)
    ran.clear()
    odd = torch.zeros(8, 17, dtype=torch.float8_e4m3fn, device=device)[:, 1:]  # scale rows 1-byte aligned
    ops.fp4_linear(torch.randn(4, 256, generator=g).to(torch.bfloat16).to(device), wn, odd, "nvfp4", gs)
    assert ran == ["triton"]
    ran.clear()
    wide = torch.zeros(64, 129, dtype=torch.uint8, device=device)
    ops.fp4_linear(torch.randn(4, 256, generator=g).to(torch.bfloat16).to(device), wide[:, 1:], ws)
    assert ran == ["triton"]  # weight rows not 16-byte aligned


def test_forcing_cuda_on_arguments_it_does_not_cover_is_an_error(device):
    g = _gen(4)
    w, ws, _ = random_fp4(16, 256, g, device)
    m = cuda_gemm.DECODE_MAX_ROWS + 1
    x = torch.randn(m, 256, generator=g).to(torch.bfloat16).to(device)
    with pytest.raises(BackendUnavailableError, match=f"{m} activation rows"):
        _cuda(x, w, ws)


# --- NVFP4 at decode: E4M3 scales per 16 and the FP32 global scale --------------------------

def _check_nvfp4(y, x, w, ws, gs, what=""):
    assert_fp4_close(y, x, w, ws, "nvfp4", gs, what=what)


def test_nvfp4_decodes_every_code_and_scale_byte_exactly(device):
    # Unit activation rows (act_quant exact) and a power-of-two global scale: y is the decoded
    # weight times it, bit for bit.  Every code byte in both orders, and the 254 finite E4M3
    # scale bytes (subnormal, negative, +-0, 448) with 0x00 and 0x80 again, 32 per row.
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    w = torch.stack([packed, packed.flip(0)] * 4).to(device)  # [8, 256] -> K = 512
    finite = [b for b in range(256) if b & 0x7F != 0x7F] + [0x00, 0x80]
    ws = torch.tensor(finite, dtype=torch.uint8).reshape(8, 32).view(torch.float8_e4m3fn).to(device)
    gs = torch.tensor(0.25, device=device)
    eye = torch.eye(512, dtype=torch.bfloat16, device=device)
    y = torch.cat([_cuda(eye[i:i + 8], w, ws, "nvfp4", gs) for i in range(0, 512, 8)])
    want = ref.dequant_fp4_weight(w.cpu(), ws.cpu(), "nvfp4", gs.cpu()).t()
    assert torch.equal(y.float().cpu(), want)


@pytest.mark.parametrize("kernel", ["decode", "wgmma"])
def test_nvfp4_nan_and_inf_propagate_like_oracle(device, kernel):
    g = _gen(12)
    x = torch.randn(6, 256, generator=g).to(torch.bfloat16)
    x[0, 3] = float("nan")  # row 0 NaN
    x[1, 130] = float("-inf")  # an infinite block: row 1 NaN
    x[2] = 0.0
    w, ws, gs = random_fp4(40, 256, g, "cpu", "nvfp4")
    ws.view(torch.uint8)[11, 5] = 0x7F  # an E4M3 NaN scale: column 11 NaN
    ws.view(torch.uint8)[12, 9] = 0xFF  # the negative NaN: column 12
    ws.view(torch.uint8)[13] = 0  # a whole row of zero scales: zeros
    args = x.to(device), w.to(device), ws.to(device)
    y = _decode(*args, "nvfp4", gs.to(device)) if kernel == "decode" else _wgmma(*args, gs.to(device))
    _check_nvfp4(y, *args, gs.to(device))
    assert bool(torch.isnan(y[:2]).all()) and bool(torch.isnan(y[:, 11:13]).all())
    assert not bool(torch.isnan(y[2:, 13:]).any()) and bool((y[2:, 13] == 0).all())


@pytest.mark.parametrize("m", [4, 17], ids=["decode", "wgmma"])
def test_nvfp4_graph_replay_reads_the_global_scale_on_the_device(device, m):
    # A new activation and a new global scale written after capture: the replay uses both.  17
    # rows of a weight just wide enough: the warp-group MMA kernel on sm90a.
    g = _gen(13)
    w, ws, gs = random_fp4(3072 if m == 4 else cuda_gemm.wgmma_min_n(device), 7168, g, device, "nvfp4")
    x = torch.randn(m, 7168, generator=g).to(torch.bfloat16).to(device)
    call = lambda: ops.fp4_linear(x, w, ws, "nvfp4", gs)  # noqa: E731
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call()
    x.copy_(torch.randn(m, 7168, generator=g).to(torch.bfloat16))
    gs.fill_(-3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, call())
    _check_nvfp4(y, x, w, ws, gs)


@pytest.mark.parametrize("m, n, k", [(4, 3072, 7168), (600, 24576, 1536)], ids=["decode", "prefill"])
def test_cuda_graph_replay(device, m, n, k):
    g = _gen(9)
    w, ws, _ = random_fp4(n, k, g, device)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    y, again = replayed_and_eager(lambda: ops.fp4_linear(x, w, ws), lambda: _cuda(x, w, ws), x,
                                  torch.randn(m, k, generator=g).to(torch.bfloat16))
    assert torch.equal(y, again)
    _check(y, x, w, ws)


# --- prefill: the weight re-encoded as FP8 blocks, then the FP8 kernel ----------------------

def _prefill(x, w, ws):
    # The prefill path itself, past the registry's size rule.
    return cuda_gemm.mxfp4_prefill(x, w, ws)


@given(m=st.integers(17, 700), nb=st.integers(1, 5), kb=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_prefill_matches_oracle(device, m, nb, kb, seed):
    n = 128 * nb
    x, w, ws, _ = random_fp4_linear_case(m, n, 128 * kb, seed, device)
    y = _prefill(x, w, ws)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    _check(y, x, w, ws)


@given(spread=st.integers(0, 40), base=st.sampled_from([0, 4, 100]), seed=st.integers(0, 2**31))
def test_prefill_exponent_spread_within_a_block(device, spread, base, seed):
    # Exact (up to FP32 summation order) while each 128 x 128 block's exponents span <= 14
    # binades; beyond, the small values are rounded to the block's E4M3 step
    # (test_gemm.block_spread_error), the only error this path adds.
    g = _gen(seed)
    x = torch.randn(200, 256, generator=g).to(torch.bfloat16).to(device)
    w = torch.randint(0, 256, (256, 128), generator=g, dtype=torch.int32).to(torch.uint8).to(device)
    ws = random_block_exponents(2, 2, g, spread, base).to(device)
    xd = ref.dequant_activation(x)
    extra = xd.double().abs() @ block_spread_error(ws).to(device).t()
    _check(_prefill(x, w, ws), x, w, ws, extra=extra, what=f"spread {spread} base {base}")


# Both paths: 8 and 16 rows (the decode kernel, one and two row groups, forced) and 300 (the
# prefill path).
PATHS = pytest.mark.parametrize("m, run", [(8, _cuda), (16, _decode), (300, _prefill)],
                                ids=["decode", "decode-two-groups", "prefill"])


@PATHS
@pytest.mark.parametrize("e_lo, e_hi, x_scale", [(-127, -127, 1e3), (-127, -122, 1e3), (-104, -100, 1e3),
                                                 (96, 100, 1e-3)])
def test_extreme_scale_exponents(device, m, run, e_lo, e_hi, x_scale):
    # -127..-122 on the prefill path: the block byte clamps at 0 (the FP8 values then carry the
    # whole exponent).
    g = _gen(5)
    x = (torch.randn(m, 256, generator=g) * x_scale).to(torch.bfloat16).to(device)
    w, _, _ = random_fp4(256, 256, g, device)
    ws = random_e8m0((256, 8), g, device, e_lo, e_hi)
    _check(run(x, w, ws), x, w, ws, what=f"exponents {e_lo}..{e_hi}")


@PATHS
def test_nan_inf_zero_blocks_propagate_like_oracle(device, m, run):
    g = _gen(7)
    x = torch.randn(m, 256, generator=g).to(torch.bfloat16)
    x[0, 3] = float("nan")  # a NaN block: row 0 NaN
    x[1, 130] = float("-inf")  # an infinite block: row 1 NaN
    x[2] = 0.0  # an all-zero row: zeros (NaN only in the poisoned column)
    x = x.to(device)
    w, ws, _ = random_fp4(256, 256, g, "cpu")
    w[:, 64:80] = 0  # an all-zero 32-block ...
    ws.view(torch.uint8)[:, 4] = 1  # ... with the tiniest scale
    ws.view(torch.uint8)[11, 6] = 0xFF  # an E8M0 NaN: column 11 NaN (on the prefill path its block's other rows not)
    w, ws = w.to(device), ws.to(device)
    y = run(x, w, ws)
    _check(y, x, w, ws)
    assert bool(torch.isnan(y[:2]).all()) and bool(torch.isnan(y[:, 11]).all())
    assert not bool(torch.isnan(y[2:, 12:]).any())
    assert bool((y[2, :11] == 0).all()) and bool((y[2, 12:] == 0).all())


@pytest.mark.parametrize("n, k", [(7168, 1536), (24576, 7168)])
def test_prefill_real_shapes(device, n, k):
    m = 600
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, ws, _ = random_fp4(n, k, g, device)
    y = _cuda(x, w, ws)  # through the registry: these sizes are the prefill path's
    _check(y, x, w, ws, what=f"{m} x {n} x {k}")


def test_prefill_reencoding_on_the_gpu_is_bit_exact(device):
    # The PTX table rows (the CPU tests run the interpreter's table reads) on spreads past 19
    # binades (rounding to zero), tiny exponents and NaN bytes.
    g = _gen(8)
    w = torch.randint(0, 256, (384, 320), generator=g, dtype=torch.int32).to(torch.uint8)
    for spread, base in ((40, 0), (25, 150), (4, 0), (14, 240)):
        ws = random_block_exponents(3, 5, g, spread, base, nan_blocks=3)
        codes, scales = kern.mxfp4_to_fp8_blocks(w.to(device), ws.to(device))
        want_codes, want_scales = ref.mxfp4_as_fp8_blocks(w, ws)
        assert torch.equal(scales.view(torch.uint8).cpu(), want_scales.view(torch.uint8)), (spread, base)
        assert torch.equal(codes.view(torch.uint8).cpu(), want_codes.view(torch.uint8)), (spread, base)
