"""The cuda backend of fp8_linear against the oracle: the prefill kernel (cuda_fallback/csrc/
sm90_fp8_gemm.cu) at both tile heights, the decode kernel (csrc/sm90_fp8_decode_gemm.cu) at every
tile shape and K split, and the registry rules that send them prefill-sized calls with whole
128 x 128 scale blocks and a long K, and 1-16 BF16 rows.  GPU only: the sources are compiled on
the CPU by test_cuda_fallback."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, registry, use_backend
from cuda_fallback import gemm as cuda_gemm  # after dsv4_triton, which imports it while registering
from dsv4_triton.reference import gemm as ref
from dsv4_triton.registry import BackendUnavailableError
from helpers import assert_same_bits, counting_backends, needs_cuda_backend, replayed_and_eager
from test_gemm import _gen, assert_gemm_close, random_e8m0, random_fp8

pytestmark = pytest.mark.gpu


_needs_cuda_backend = needs_cuda_backend("fp8_linear")


def _cuda(*args):
    with use_backend("cuda", ops=["fp8_linear"]):
        return ops.fp8_linear(*args)


TILE_ROWS = pytest.mark.parametrize("tile_rows", [128, 256])


def _check(y, x, w, ws, what=""):
    assert_gemm_close(y, ref.fp8_linear(x, w, ws), ref.dequant_activation(x), ref.dequant_fp8_weight(w, ws),
                      what=what)


@TILE_ROWS
@given(m=st.integers(1, 700), nb=st.integers(1, 5), kb=st.integers(1, 9), fp32_scale=st.booleans(),
       seed=st.integers(0, 2**31))
def test_matches_oracle(device, tile_rows, m, nb, kb, fp32_scale, seed):
    # The kernel at any size (the registry sends it large calls only): rows past a whole tile
    # (the copies fill them with zeros, the stores skip them), an odd K block count (the last
    # pair of blocks is a single one), fewer blocks than pipeline stages and more, fp32 scales
    # that are not powers of two.
    g = _gen(seed)
    n, k = 128 * nb, 128 * kb
    x = (torch.randn(m, k, generator=g) * 4).to(torch.bfloat16).to(device)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((nb, kb), g, device)
    if fp32_scale:
        ws = ref.scale_to_float(ws) * (1 + torch.rand(ws.shape, generator=g)).to(device)
    y = cuda_gemm.fp8_gemm(x, w, ws, tile_rows)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    _check(y, x, w, ws)


@TILE_ROWS
@given(m=st.integers(1, 700), nb=st.integers(1, 3), kb=st.integers(1, 9), offset=st.sampled_from([0, 16, 8]),
       seed=st.integers(0, 2**31))
def test_codes_in_equal_the_pre_pass_path(device, tile_rows, m, nb, kb, offset, seed):
    """Quantised codes and scales handed in give the product of the BF16 rows they encode, bit
    for bit (the kernel reads the same operands); codes whose rows start off a 16-byte boundary
    (offset 8) are copied for the tensor map, not read misaligned."""
    g = _gen(seed)
    n, k = 128 * nb, 128 * kb
    x = (torch.randn(m, k, generator=g) * 4).to(torch.bfloat16).to(device)
    x[0, :2] = torch.tensor([float("nan"), 3e4])
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((nb, kb), g, device)
    q, s = ops.act_quant(x)
    room = torch.empty(m * k + offset, dtype=torch.uint8, device=device)
    q_at = room[offset:].view(m, k)
    q_at.copy_(q.view(torch.uint8))
    y = cuda_gemm.fp8_gemm(q_at.view(torch.float8_e4m3fn), w, ws, tile_rows, s)
    assert_same_bits(y, cuda_gemm.fp8_gemm(x, w, ws, tile_rows))
    _check(y, x, w, ws)


@TILE_ROWS
@pytest.mark.parametrize("e_lo, e_hi, x_scale", [(-100, -96, 1.0), (90, 94, 1.0), (-127, -127, 1e3)])
def test_extreme_scale_exponents(device, tile_rows, e_lo, e_hi, x_scale):
    g = _gen(6)
    x = (torch.randn(300, 256, generator=g) * x_scale).to(torch.bfloat16).to(device)
    w = random_fp8((256, 256), g, device)
    ws = random_e8m0((2, 2), g, device, e_lo, e_hi)
    _check(cuda_gemm.fp8_gemm(x, w, ws, tile_rows), x, w, ws, what=f"exponents {e_lo}..{e_hi}")


@TILE_ROWS
def test_nan_inf_zero_blocks_propagate_like_oracle(device, tile_rows):
    g = _gen(7)
    x = torch.randn(260, 256, generator=g).to(torch.bfloat16)
    x[0, 3] = float("nan")  # a NaN block: row 0 NaN
    x[1, 130] = float("-inf")  # an infinite block: row 1 NaN
    x[2] = 0.0  # an all-zero row: zeros (NaN only in poisoned columns)
    x[259, 5] = float("nan")  # in the partial last row tile
    x = x.to(device)
    w = random_fp8((256, 256), g, "cpu")
    w.view(torch.uint8)[7, 9] = 0x7F  # a NaN weight: column 7 NaN
    ws = random_e8m0((2, 2), g, "cpu")
    ws.view(torch.uint8)[1, 1] = 0xFF  # an E8M0 NaN: columns 128.. NaN
    w, ws = w.to(device), ws.to(device)
    y = cuda_gemm.fp8_gemm(x, w, ws, tile_rows)
    _check(y, x, w, ws)
    assert bool(torch.isnan(y[[0, 1, 259]]).all()) and bool(torch.isnan(y[:, 7]).all())
    assert bool(torch.isnan(y[:, 128:]).all())
    assert bool((y[2, :7] == 0).all()) and bool((y[2, 8:128] == 0).all())


@TILE_ROWS
@pytest.mark.parametrize("m", [300, 1000])
@pytest.mark.parametrize("n, k", [(7168, 1536), (1536, 7168), (24576, 7168)])
def test_real_shapes(device, tile_rows, m, n, k):
    # More tiles than SMs: each CTA walks several, the producer crossing tile boundaries.
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((n // 128, k // 128), g, device)
    _check(cuda_gemm.fp8_gemm(x, w, ws, tile_rows), x, w, ws, what=f"{m} x {n} x {k}, {tile_rows}-row tiles")


def test_public_op_leading_dims_and_strided_activation(device):
    g = _gen(11)
    base = torch.randn(2, 400, 2 * 2048, generator=g).to(torch.bfloat16).to(device)
    x = base[..., ::2]
    w = random_fp8((3072, 2048), g, device)
    ws = random_e8m0((24, 16), g, device)
    y = _cuda(x, w, ws)
    assert y.shape == (2, 400, 3072)
    _check(y.reshape(-1, 3072), x.reshape(-1, 2048), w, ws)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_public_op_other_activation_dtypes(device, dtype):
    # fp16 and fp32 rows take the same pre-pass (it quantises from FP32), so the same oracle.
    g = _gen(12)
    x = (torch.randn(1024, 2048, generator=g) * 3).to(dtype).to(device)
    w = random_fp8((3072, 2048), g, device)
    ws = random_e8m0((24, 16), g, device)
    _check(_cuda(x, w, ws), x, w, ws, what=str(dtype))


counted = counting_backends("fp8_linear")


def test_dispatch_sends_prefill_with_whole_blocks_to_cuda(device, counted):
    assert registry.selected_backend("fp8_linear", device) == "cuda, else triton"
    ran = counted
    g = _gen(3)
    w = random_fp8((256, 256), g, device)
    ws = random_e8m0((2, 2), g, device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n, k = 3072, 2048  # 24 column tiles: a tile an SM from ceil(sms / 24) row tiles
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((n // 128, k // 128), g, device)
    enough = 128 * -(-sms // 24)
    for m, expect in ((enough - 128, "triton"), (enough, "cuda"), (4096, "cuda")):
        ran.clear()
        ops.fp8_linear(torch.randn(m, k, generator=g).to(torch.bfloat16).to(device), w, ws)
        assert ran == [expect], (m, ran)
    for n2, k2 in ((3000, 2048), (3072, 2000), (3072, 1024)):  # N or K not a multiple of 128, K short
        ran.clear()
        w2 = random_fp8((n2, k2), g, device)
        ws2 = random_e8m0((-(-n2 // 128), -(-k2 // 128)), g, device)
        ops.fp8_linear(torch.randn(4096, k2, generator=g).to(torch.bfloat16).to(device), w2, ws2)
        assert ran == ["triton"], (n2, k2)
    ran.clear()
    wide = torch.zeros(n, k + 1, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    ops.fp8_linear(torch.randn(4096, k, generator=g).to(torch.bfloat16).to(device), wide[:, 1:], ws)
    assert ran == ["triton"]  # weight rows not 16-byte aligned
    q, s = ops.act_quant(torch.randn(4096, k, generator=g).to(torch.bfloat16).to(device))
    for m, expect in ((4096, "cuda"), (4, "triton")):  # codes: the decode kernel quantises BF16 rows itself
        ran.clear()
        ops.fp8_linear(q[:m], w, ws, s[:m])
        assert ran == [expect], (m, ran)


def test_forcing_cuda_on_arguments_it_does_not_cover_is_an_error(device):
    g = _gen(4)
    w = random_fp8((256, 2048), g, device)
    ws = random_e8m0((2, 16), g, device)
    x = torch.randn(65, 2048, generator=g).to(torch.bfloat16).to(device)  # past decode sizes
    with pytest.raises(BackendUnavailableError, match="2 output tiles"):
        _cuda(x, w, ws)
    with pytest.raises(BackendUnavailableError, match="K = 256"):
        _cuda(x[:, :256], w[:, :256], ws[:, :2])


@pytest.mark.parametrize("m, n, k", [(1024, 3072, 2048), (4, 1536, 7168)])  # the prefill and the decode kernel
def test_cuda_graph_replay(device, m, n, k):
    g = _gen(9)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((n // 128, k // 128), g, device)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    y, again = replayed_and_eager(lambda: ops.fp8_linear(x, w, ws), lambda: _cuda(x, w, ws), x,
                                  torch.randn(m, k, generator=g).to(torch.bfloat16))
    assert torch.equal(y, again)
    _check(y, x, w, ws)


# --- decode: 1 to 16 rows, one launch -------------------------------------------------------

@given(m=st.integers(1, 16), groups=st.integers(1, 12), ks=st.integers(1, 12), rows=st.sampled_from([16, 32, 64]),
       split=st.sampled_from([1, 2, 4, 8]), fp32_scale=st.booleans(), seed=st.integers(0, 2**31))
def test_decode_matches_oracle(device, m, groups, ks, rows, split, fp32_scale, seed):
    # Any tile shape and K split the kernel takes (the plan picks one): N a multiple of the
    # CTA's rows, K blocks a multiple of the split (clusters of 1-8 CTAs, each taking ks blocks,
    # fewer than its warps or more), one or two groups of 8 activation rows with the rows past
    # m left out, a 16-row group inside a 128-row scale block at any offset, fp32 scales that
    # are not powers of two.
    kb = ks * split
    g = _gen(seed)
    n, k = rows * groups, 128 * kb
    x = (torch.randn(m, k, generator=g) * 4).to(torch.bfloat16).to(device)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((-(-n // 128), kb), g, device)
    if fp32_scale:
        ws = ref.scale_to_float(ws) * (1 + torch.rand(ws.shape, generator=g)).to(device)
    y = cuda_gemm.fp8_decode(x, w, ws, rows, split)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    _check(y, x, w, ws, what=f"{rows} rows a CTA, split {split}")


@pytest.mark.parametrize("rows, split", [(16, 1), (32, 4), (64, 2)])
def test_decode_nan_inf_zero_blocks_propagate_like_oracle(device, rows, split):
    g = _gen(17)
    x = torch.randn(11, 512, generator=g).to(torch.bfloat16)
    x[0, 3] = float("nan")  # a NaN block: row 0 NaN
    x[1, 130] = float("-inf")  # an infinite block: row 1 NaN
    x[2] = 0.0  # an all-zero row: zeros (NaN only in poisoned columns)
    x[10, 300] = float("nan")  # in the second group of 8 rows
    x[4, :128] = 1e30  # a huge block (scale 2^91)
    x[5, 128:256] = 1e-30  # a tiny block (the 1e-4 floor)
    x = x.to(device)
    w = random_fp8((256, 512), g, "cpu")
    w.view(torch.uint8)[7, 9] = 0x7F  # a NaN weight: column 7 NaN
    ws = random_e8m0((2, 4), g, "cpu")
    ws.view(torch.uint8)[1, 3] = 0xFF  # an E8M0 NaN: columns 128.. NaN
    ws.view(torch.uint8)[0, 1] = 0  # 2^-127, a subnormal scale
    w, ws = w.to(device), ws.to(device)
    _check(cuda_gemm.fp8_decode(x, w, ws, rows, split), x, w, ws)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n, k", [(7168, 1536), (1536, 7168), (512, 7168), (3072, 2048)])
def test_decode_real_shapes_with_the_plan(device, m, n, k):
    g = _gen(m + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((n // 128, k // 128), g, device)
    plan = cuda_gemm.fp8_decode_plan(m, n, k, torch.cuda.get_device_properties(device).multi_processor_count)
    _check(cuda_gemm.fp8_decode(x, w, ws), x, w, ws, what=f"{m} x {n} x {k}, plan {plan}")


def test_decode_public_op_strided_and_misaligned_rows(device):
    g = _gen(18)
    base = torch.randn(3, 2 * 1536 + 1, generator=g).to(torch.bfloat16).to(device)
    w = random_fp8((7168, 1536), g, device)
    ws = random_e8m0((56, 12), g, device)
    for x in (base[:, :1536 * 2:2], base[:, 1:1537]):  # a strided view; rows 2 bytes off alignment
        _check(_cuda(x, w, ws), x, w, ws)
    x3 = base[:, :1536].reshape(1, 3, 1536)
    assert _cuda(x3, w, ws).shape == (1, 3, 7168)


def test_decode_bad_tiles_raise(device):
    g = _gen(19)
    x = torch.randn(2, 256, generator=g).to(torch.bfloat16).to(device)
    w = random_fp8((48, 256), g, device)
    ws = random_e8m0((1, 2), g, device)
    with pytest.raises(RuntimeError, match="N must be a positive multiple of rows"):
        cuda_gemm.fp8_decode(x, w, ws, 32, 1)
    with pytest.raises(RuntimeError, match="split: expected 1, 2, 4 or 8 dividing"):
        cuda_gemm.fp8_decode(x, w, ws, 16, 4)
    with pytest.raises(ValueError, match="rows, split: give both or neither"):
        cuda_gemm.fp8_decode(x, w, ws, 16)
    with pytest.raises(RuntimeError, match="expected 1 to 16 rows"):
        cuda_gemm.fp8_decode(torch.randn(17, 256, generator=g).to(torch.bfloat16).to(device), w, ws, 16, 1)


def test_dispatch_sends_one_to_four_rows_of_small_weights_to_cuda(device, counted):
    ran = counted
    g = _gen(20)
    for n, k, m, expect in ((7168, 1536, 1, "cuda"), (1536, 7168, 4, "cuda"), (512, 7168, 3, "cuda"),
                            (7168, 1536, 5, "triton"),  # 5-64 rows: measured slower
                            (24576, 7168, 64, "triton"),
                            (3072, 7168, 1, "triton"),  # 21 MB: past the decode kernel's weights
                            (24576, 7168, 1, "triton")):
        w = random_fp8((n, k), g, device)
        ws = random_e8m0((n // 128, k // 128), g, device)
        ran.clear()
        ops.fp8_linear(torch.randn(m, k, generator=g).to(torch.bfloat16).to(device), w, ws)
        assert ran == [expect], (n, k, m, ran)
    w = random_fp8((7168, 1536), g, device)
    ws = random_e8m0((56, 12), g, device)
    ran.clear()
    ops.fp8_linear(torch.randn(1, 1536, generator=g).to(torch.float16).to(device), w, ws)
    assert ran == ["triton"]  # fp16 rows
