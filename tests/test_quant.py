"""quant family: the FP32 oracles against SPEC 2/4 directly, then the Triton kernels against
the oracles (bit-exact codes and scales; QAT outputs bit-identical)."""

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.formats import FP4_VALUES, e8m0_to_float, exp2_int, fp4_decode, fp4_encode, fp4_unpack
from dsv4_triton.formats import div_rn
from dsv4_triton.kernels.formats import cast_rne, fp4_code, fp4_round_in_range, fp4_value, to_f32
from dsv4_triton.kernels.quant import fp4_scale_exponent, hadamard_butterfly
from dsv4_triton.reference import quant as ref
from helpers import ULP, assert_same_bits

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _fp8_grid() -> torch.Tensor:
    """All finite non-negative FP8-E4M3 values, ascending (FP32)."""
    return torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).cpu()


# --- the oracles against SPEC ------------------------------------------------------------

@given(rows=st.integers(1, 5), nblocks=st.integers(1, 4), block=st.sampled_from([32, 64, 128]),
       pow2=st.booleans(), scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e4]), seed=st.integers(0, 2**31))
def test_act_quant_oracle_follows_spec(rows, nblocks, block, pow2, scale, seed):
    x = torch.randn(rows, nblocks * block, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = ref.act_quant(x, block, pow2)
    amax = x.reshape(rows, nblocks, block).abs().amax(-1).clamp_min(1e-4)
    if pow2:
        e = torch.log2(s)
        assert torch.equal(e, e.round()), "pow2 scales must be powers of two"
        # s is the smallest power of two with amax / s <= 448.
        assert bool((amax / s <= 448).all()) and bool((amax / (s / 2) > 448).all())
    else:
        assert torch.equal(s, amax / 448)
    # Every code is the FP8 value nearest to x / s (|x / s| <= 448 needs no clamp).
    v = (x.reshape(rows, nblocks, block) / s[..., None]).reshape(rows, -1)
    err = (q.float() - v).abs()
    grid = _fp8_grid()
    nearest = (v.abs()[..., None] - grid).abs().min(-1).values
    assert torch.equal(err, nearest)


def test_act_quant_oracle_rounds_ties_to_even():
    # Block amax 448 -> s = 1 exactly; then x are midpoints between neighbouring FP8 values.
    grid = _fp8_grid()
    lo, hi = grid[:-1], grid[1:]
    mids = (lo + hi) / 2
    x = torch.cat([torch.tensor([448.0]), mids, -mids])
    x = torch.cat([x, torch.zeros(-x.numel() % 128)]).reshape(1, -1)
    q, s = ref.act_quant(x, x.shape[-1], True)
    assert s.item() == 1.0
    # The even neighbour is the one whose code (mantissa LSB = byte LSB) is even.
    lo_codes = torch.arange(0, lo.numel())
    even = torch.where(lo_codes % 2 == 0, lo, hi)
    got = q.float()[0, 1:1 + mids.numel()]
    assert torch.equal(got, even)
    assert torch.equal(q.float()[0, 1 + mids.numel():1 + 2 * mids.numel()], -even)


def test_act_quant_oracle_floor_and_saturation():
    x = torch.zeros(2, 64)
    x[1, 0] = 1e-30  # tiny values: amax floored at 1e-4
    q, s = ref.act_quant(x, 64, True)
    assert torch.equal(s, torch.full((2, 1), 2.0 ** math.ceil(math.log2(1e-4 / 448))))
    assert torch.equal(q.float(), torch.zeros_like(x))
    # Non-pow2: the scale is amax / 448 exactly, so the largest element maps to 448 exactly.
    x = torch.tensor([[3.0, -7.0, 1.0, 0.5]])
    q, s = ref.act_quant(x, 4, False)
    assert s.item() == torch.tensor(7.0 / 448).item() and q.float()[0, 1].item() == -448.0


def test_act_quant_oracle_non_finite_blocks_decode_to_nan():
    x = torch.ones(3, 64)
    x[0, 3] = float("inf")
    x[1, 7] = float("nan")
    x[2, 9] = float("-inf")
    q, s = ref.act_quant(x, 32, True)
    assert torch.isnan(s[:, 0]).all() and torch.equal(s[:, 1], torch.full((3,), 2.0 ** -8))
    assert bool((_bytes(q)[:, :32] == 0x7F).all())
    y = ref.qat8(x, 32, True)
    assert torch.isnan(y[:, :32]).all() and torch.equal(y[:, 32:], x[:, 32:])


def test_fp4_oracle_every_code_round_trips_in_both_nibbles():
    lut = torch.tensor(FP4_VALUES)
    for e in (-126, -3, 0, 5, 125):  # 6 * 2^125 is the largest finite block amax of this form
        # One block: the 16 code values then the same in reverse (each code in both nibbles).
        x = torch.cat([lut, lut.flip(0)]) * 2.0 ** e
        packed, scale = ref.fp4_quant(x[None], 32)
        assert _bytes(scale).item() == e + 127
        codes = fp4_unpack(packed)[0]
        expect = torch.cat([torch.arange(16), torch.arange(16).flip(0)]).to(torch.uint8)
        assert torch.equal(codes, expect)
        assert torch.equal(_bytes(packed)[0, :8], (expect[0:16:2] | (expect[1:16:2] << 4)))
        y = ref.fp4_dequant(packed, scale, torch.float32)
        assert torch.equal(y[0], x) and torch.equal(torch.signbit(y[0]), torch.signbit(x))


def test_fp4_oracle_ties_go_to_the_even_code():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    even = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    x = torch.cat([torch.tensor([6.0]), mids, -mids, torch.zeros(17)])  # amax 6 -> s = 1
    y = ref.qat4(x[None], 32)[0]
    assert torch.equal(y[1:8], even) and torch.equal(y[8:15], -even)
    # Just off a tie rounds to the nearer value.
    up = torch.nextafter(mids, torch.full_like(mids, 10.0))
    x = torch.cat([torch.tensor([6.0]), up, torch.zeros(24)])
    assert torch.equal(ref.qat4(x[None], 32)[0, 1:8], torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]))


def test_fp4_oracle_scale_floor_saturation_and_non_finite():
    x = torch.zeros(4, 32)
    x[1, 0] = 2.0 ** -140  # subnormal block: floor 6 * 2^-126 -> scale 2^-126
    x[2, 0] = 6.0  # amax / 6 = 1 exactly -> s = 1, the largest code
    x[2, 1] = 6.0 * (1 - 2.0 ** -22)  # just below 6 stays in the same block scale, rounds to 6
    x[3, 0] = float("nan")
    x[3, 1] = -5.0
    packed, scale = ref.fp4_quant(x, 32)
    assert _bytes(scale).tolist() == [[1], [1], [127], [255]]
    codes = fp4_unpack(packed)
    assert codes[2, 0].item() == 7 and int(codes[3].max()) == 0
    y = ref.qat4(x, 32)
    assert torch.isnan(y[3]).all() and y[2, 0].item() == 6.0 and torch.equal(y[0], x[0])
    assert torch.isnan(ref.fp4_dequant(packed, scale, torch.float32)[3]).all()


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Fast Walsh-Hadamard butterflies in float64 (independent of the matrix form)."""
    y = x.double().clone()
    n, h = y.shape[-1], 1
    while h < n:
        y = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), -2).reshape(*x.shape)
        h *= 2
    return y * n ** -0.5


@pytest.mark.parametrize("n", [64, 128, 256, 512])
def test_hadamard_oracle_matches_butterflies_and_is_an_involution(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    y = ref.hadamard(x)
    # FP32 matmul against the float64 butterflies: n products of |x| summed in FP32.
    bound = n * 2.0 ** -23 * x.abs().sum(-1, keepdim=True) * n ** -0.5
    assert bool(((y.double() - _fwht(x)).abs() <= bound).all())
    assert torch.allclose(ref.hadamard(y), x, atol=1e-5)


# --- argument checks ---------------------------------------------------------------------

_x = torch.zeros(4, 64)


@pytest.mark.parametrize("fn, kwargs, err, match", [
    (ops.act_quant, dict(x=torch.zeros(4, 64, dtype=torch.int32)), TypeError, "x: expected dtype"),
    (ops.act_quant, dict(x=_x, block=48), ValueError, "block: expected a power of two"),
    (ops.act_quant, dict(x=torch.zeros(4, 96)), ValueError, "x: last dim must be a multiple of 128"),
    (ops.act_quant, dict(x=_x, block=64, pow2=1), TypeError, "pow2: expected a bool"),
    (ops.act_quant, dict(x=torch.zeros(())), ValueError, "x: expected at least 1 dims"),
    (ops.qat8, dict(x=_x, block=0), ValueError, "block: expected a positive int"),
    (ops.qat8, dict(x=_x, block=64.0), TypeError, "block: expected an int"),
    (ops.fp4_quant, dict(x=torch.zeros(4, 48)), ValueError, "x: last dim must be a multiple of 32"),
    (ops.fp4_quant, dict(x=_x, block=1), ValueError, "block: expected a power of two in \\[2"),
    (ops.qat4, dict(x=_x.to(torch.float64)), TypeError, "x: expected dtype"),
    (ops.fp4_dequant, dict(packed=torch.zeros(4, 16, dtype=torch.int32), scale=torch.zeros(4, 1, dtype=torch.uint8)),
     TypeError, "packed: expected dtype"),
    (ops.fp4_dequant, dict(packed=torch.zeros(4, 16, dtype=torch.uint8), scale=torch.zeros(4, 1)),
     TypeError, "scale: expected dtype"),
    (ops.fp4_dequant, dict(packed=torch.zeros(4, 16, dtype=torch.uint8), scale=torch.zeros(3, 1, dtype=torch.uint8)),
     ValueError, "scale: expected leading dims"),
    (ops.fp4_dequant, dict(packed=torch.zeros(4, 16, dtype=torch.uint8), scale=torch.zeros(4, 3, dtype=torch.uint8)),
     ValueError, "scale: last dim must divide"),
    (ops.fp4_dequant, dict(packed=torch.zeros(4, 16, dtype=torch.uint8), scale=torch.zeros(4, 1, dtype=torch.uint8),
                           dtype=torch.int8), TypeError, "dtype: expected"),
    (ops.hadamard, dict(x=torch.zeros(4, 32)), ValueError, "x: last dim must be one of"),
    (ops.hadamard, dict(x=torch.zeros(4, 64, dtype=torch.int64)), TypeError, "x: expected dtype"),
])
def test_bad_input(fn, kwargs, err, match):
    with pytest.raises(err, match=match):
        fn(**kwargs)


# --- Triton kernels against the oracles --------------------------------------------------

def _triton(fn, *args, **kw):
    with use_backend("triton"):
        return fn(*args, **kw)


def _tie_blocks(g: torch.Generator, count: int, block: int, kind: str) -> torch.Tensor:
    """``count`` blocks whose scale is exactly 2^k (one element is 448 * 2^k, or 6 * 2^k for
    FP4) and whose other elements are rounding ties at that scale."""
    if kind == "fp8":
        grid = _fp8_grid()
        mids, top = (grid[:-1] + grid[1:]) / 2, 448.0
    else:
        mids, top = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]), 6.0
    vals = mids[torch.randint(0, mids.numel(), (count, block), generator=g)]
    vals = torch.where(torch.rand(count, block, generator=g) < 0.5, -vals, vals)
    vals[torch.arange(count), torch.randint(0, block, (count,), generator=g)] = top
    return vals * torch.exp2(torch.randint(-8, 7, (count, 1), generator=g).float())


def _input(seed: int, lead, n: int, block: int, dtype: torch.dtype, scale: float, specials: bool,
           kind: str = "fp8") -> torch.Tensor:
    """Random values; with ``specials`` each block may instead be all zeros, subnormal, near the
    dtype's max, hold a +-Inf or a NaN, or consist of rounding ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=g) * scale
    if specials and x.numel():
        fi = torch.finfo(dtype)
        xb = x.view(-1, block)
        nb = xb.shape[0]
        case = torch.randint(0, 9, (nb,), generator=g)
        col = torch.randint(0, block, (nb,), generator=g)
        rand = torch.randn(nb, block, generator=g)
        xb[case == 1] = 0.0
        xb[case == 2] = (rand * fi.tiny * 0.25)[case == 2]  # subnormal in dtype
        huge = (torch.rand(nb, block, generator=g) * 0.5 + 0.5) * fi.max * rand.sign()
        xb[case == 3] = huge[case == 3]
        for c, v in ((4, float("inf")), (5, float("-inf")), (6, float("nan"))):
            m = case == c
            xb[m.nonzero()[:, 0], col[m]] = v
        ties = case == 7
        xb[ties] = _tie_blocks(g, int(ties.sum()), block, kind)
    return x.to(dtype)


_lead = st.lists(st.integers(0, 5), min_size=1, max_size=2)  # odd sizes, 1 and 0 included


@given(lead=_lead, nblocks=st.integers(1, 4), block=st.sampled_from([1, 16, 32, 64, 128]),
       dtype=st.sampled_from(DTYPES), pow2=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       specials=st.booleans(), seed=st.integers(0, 2**31))
def test_act_quant_and_qat8_bit_exact(device, lead, nblocks, block, dtype, pow2, scale, specials, seed):
    x = _input(seed, lead, nblocks * block, block, dtype, scale, specials).to(device)
    q, s = _triton(ops.act_quant, x, block, pow2)
    rq, rs = ref.act_quant(x, block, pow2)
    assert_same_bits(q.view(torch.uint8), rq.view(torch.uint8), "act_quant codes")
    assert_same_bits(s, rs, "act_quant scales")
    assert_same_bits(_triton(ops.qat8, x, block, pow2), ref.qat8(x, block, pow2), "qat8")


@given(lead=_lead, nblocks=st.integers(1, 4), block=st.sampled_from([2, 16, 32, 64]),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-3, 1.0, 1e3]), specials=st.booleans(),
       seed=st.integers(0, 2**31))
def test_fp4_quant_and_qat4_bit_exact(device, lead, nblocks, block, dtype, scale, specials, seed):
    x = _input(seed, lead, nblocks * block, block, dtype, scale, specials, kind="fp4").to(device)
    p, s = _triton(ops.fp4_quant, x, block)
    rp, rs = ref.fp4_quant(x, block)
    assert_same_bits(p, rp, "fp4_quant codes")
    assert_same_bits(s.view(torch.uint8), rs.view(torch.uint8), "fp4_quant scales")
    assert_same_bits(_triton(ops.qat4, x, block), ref.qat4(x, block), "qat4")


@given(lead=_lead, nblocks=st.integers(1, 4), block=st.sampled_from([2, 32, 64]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_fp4_dequant_bit_exact(device, lead, nblocks, block, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = nblocks * block
    packed = torch.randint(0, 256, (*lead, n // 2), generator=g, dtype=torch.uint8)
    # Scale bytes: anywhere, with the extremes (2^-127, 2^127, NaN) and 1.0 likely.
    pool = torch.tensor([0, 1, 2, 126, 127, 128, 253, 254, 255], dtype=torch.uint8)
    byte = torch.where(torch.rand(*lead, nblocks, generator=g) < 0.5,
                       pool[torch.randint(0, pool.numel(), (*lead, nblocks), generator=g)],
                       torch.randint(0, 256, (*lead, nblocks), generator=g, dtype=torch.uint8))
    scale = byte.view(torch.float8_e8m0fnu)
    packed, scale = packed.to(device), scale.to(device)
    assert_same_bits(_triton(ops.fp4_dequant, packed, scale, dtype), ref.fp4_dequant(packed, scale, dtype), "fp4_dequant")
    # int8 and float4_e2m1fn_x2 storage and raw uint8 scale bytes decode the same.
    for p in (packed.view(torch.int8), packed.view(torch.float4_e2m1fn_x2)):
        assert_same_bits(_triton(ops.fp4_dequant, p, scale.view(torch.uint8), dtype),
                         ref.fp4_dequant(packed, scale, dtype), "fp4_dequant views")


def test_fp4_dequant_every_byte_in_every_position(device):
    packed = torch.arange(256, dtype=torch.uint8).reshape(2, 128).to(device)
    scale = torch.tensor([[120, 127, 130, 0, 254, 255, 1, 128]] * 2, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    scale = scale.to(device)
    y = _triton(ops.fp4_dequant, packed, scale, torch.float32)
    assert_same_bits(y, ref.fp4_dequant(packed, scale, torch.float32), "fp4_dequant")
    lut = torch.tensor(FP4_VALUES)
    b = torch.arange(256)
    expect = torch.stack((lut[b & 15], lut[b >> 4]), -1).reshape(2, 256) * e8m0_to_float(scale.cpu()).repeat_interleave(32, -1)
    assert_same_bits(y.cpu(), expect, "fp4_dequant vs SPEC table")


def test_quantisers_strided_inputs(device):
    base = torch.randn(6, 5, 2 * 128, device=device)
    for x in (base[..., ::2], base.transpose(0, 1)[..., :128]):
        assert_same_bits(_triton(ops.act_quant, x, 32)[0].view(torch.uint8),
                         ref.act_quant(x, 32, True)[0].view(torch.uint8), "act_quant strided")
        assert_same_bits(_triton(ops.qat8, x, 64), ref.qat8(x, 64, True), "qat8 strided")
        assert_same_bits(_triton(ops.fp4_quant, x)[0], ref.fp4_quant(x, 32)[0], "fp4_quant strided")
        assert_same_bits(_triton(ops.qat4, x), ref.qat4(x, 32), "qat4 strided")
    p, s = ref.fp4_quant(base, 32)
    assert_same_bits(_triton(ops.fp4_dequant, p[..., ::2], s[..., ::2]), ref.fp4_dequant(p[..., ::2], s[..., ::2], torch.bfloat16))


def test_zero_size_inputs(device):
    x = torch.zeros(0, 3, 64, device=device)
    q, s = _triton(ops.act_quant, x, 64)
    assert q.shape == (0, 3, 64) and s.shape == (0, 3, 1)
    p, e = _triton(ops.fp4_quant, x)
    assert p.shape == (0, 3, 32) and e.shape == (0, 3, 2)
    assert _triton(ops.fp4_dequant, p, e).shape == (0, 3, 64)
    for fn in (ops.qat8, ops.qat4, ops.hadamard):
        assert _triton(fn, x).shape == x.shape


@given(rows=st.integers(1, 6), dtype=st.sampled_from(DTYPES), pow2=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**31))
def test_qat_round_trip_error_is_at_most_half_a_step(device, rows, dtype, pow2, scale, seed):
    x = _input(seed, [rows], 128, 32, dtype, scale, specials=False).to(device)
    xf = x.float().cpu()
    # FP8 (3 mantissa bits): half a step is <= 2^-4 |v| for normal v, 2^-10 below (subnormal
    # spacing 2^-9), in units of the block scale s.
    _, s = ref.act_quant(x, 32, pow2)
    s = s.cpu().repeat_interleave(32, -1)
    err = (_triton(ops.qat8, x, 32, pow2).float().cpu() - xf).abs()
    # Non-pow2 scales: q * s rounds again to the dtype, by up to an ulp of the value or, for a
    # subnormal result, the dtype's subnormal spacing (2^-24 in float16).
    subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    out_rounding = torch.clamp(ULP[dtype] * xf.abs(), min=subnormal_step)
    assert bool((err <= torch.maximum(xf.abs() * 2.0 ** -4, s * 2.0 ** -10) + out_rounding).all())
    # FP4 grid 0 .5 1 1.5 2 3 4 6: half a step is <= max(s / 4, |v| / 4).
    _, sc = ref.fp4_quant(x, 32)
    s4 = e8m0_to_float(sc.cpu()).repeat_interleave(32, -1)
    err = (_triton(ops.qat4, x, 32).float().cpu() - xf).abs()
    assert bool((err <= torch.maximum(s4 / 4, xf.abs() / 4)).all())


def _hadamard_bound(x: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Kernel vs oracle: both sum the same n exact products in FP32 in different orders
    (tensor cores may truncate, so unit 2^-23): each is within (n-1) 2^-23 sum|x| n^-0.5 of the
    exact value; then each rounds once to the output dtype (one ulp apart at most). FP32 inputs
    below 2^-100 lose low bits in the BF16 three-way split: 2^-120 absolute covers it."""
    n = x.shape[-1]
    xf = x.float().cpu()
    order = 2 * (n - 1) * 2.0 ** -23 * xf.abs().sum(-1, keepdim=True) * n ** -0.5
    return order + ULP[x.dtype] * expected.float().cpu().abs() + 2.0 ** -120


@given(lead=_lead, n=st.sampled_from([64, 128, 256, 512]), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e4]), seed=st.integers(0, 2**31))
def test_hadamard_matches_oracle(device, lead, n, dtype, scale, seed):
    if dtype == torch.float16 and scale == 1e-20:
        scale = 1e-5  # stay inside FP16's range
    x = (torch.randn(*lead, n, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(device)
    y = _triton(ops.hadamard, x)
    expected = ref.hadamard(x)
    assert y.dtype == dtype and y.shape == x.shape
    err = (y.float().cpu() - expected.float().cpu()).abs()
    assert bool((err <= _hadamard_bound(x, expected)).all()), f"max err {err.max().item():.3g}"


@pytest.mark.parametrize("n", [64, 512])
def test_hadamard_exact_on_integers_and_non_finite(device, n):
    # Small integers: every sum is exact in FP32, so kernel and oracle agree bit for bit.
    x = torch.randint(-100, 100, (5, n), generator=torch.Generator().manual_seed(n)).float().to(device)
    for dtype in DTYPES:
        assert_same_bits(_triton(ops.hadamard, x.to(dtype)), ref.hadamard(x.to(dtype)), "hadamard integers")
    x[1, 3] = float("inf")  # one Inf: every output +-Inf, no cancellation
    x[2, 0] = float("nan")
    x[3, 1] = x[3, 2] = float("inf")  # two Infs: Inf - Inf = NaN in half the outputs
    y = _triton(ops.hadamard, x)
    assert_same_bits(y, ref.hadamard(x), "hadamard non-finite")
    assert torch.isinf(y[1]).all() and torch.isnan(y[2]).all()


def test_hadamard_strided_input(device):
    base = torch.randn(4, 3, 2 * 256, device=device)
    for x in (base[..., ::2], base.transpose(0, 1)[..., :256]):
        err = (_triton(ops.hadamard, x).cpu() - ref.hadamard(x).cpu()).abs()
        assert bool((err <= _hadamard_bound(x, ref.hadamard(x))).all())


@triton.jit
def _butterfly_kernel(x_ptr, y_ptr, R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(y_ptr + offs, hadamard_butterfly(tl.load(x_ptr + offs), LOG_N))


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _butterfly_kernel[(1,)](x, y, R=x.shape[0], N=x.shape[1], LOG_N=x.shape[1].bit_length() - 1)
    return y.cpu()


@given(rows=st.sampled_from([1, 2, 16]), log_n=st.integers(1, 9), scale=st.sampled_from([1e-20, 1.0, 1e20]),
       seed=st.integers(0, 2**31))
def test_hadamard_butterfly_within_fp32_rounding_of_the_product(device, rows, log_n, scale, seed):
    """The compressor's CUDA-core Hadamard against x @ H_N in FP64.  Each output is a
    balanced tree of log2 N FP32 additions, each rounding by at most 2^-24 of a partial sum
    whose magnitude is at most sum|x|: |error| <= log2(N) 2^-24 sum|x| (first order; the
    factor 1.001 covers the rest)."""
    n = 1 << log_n
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed)) * scale
    exact = x.double() @ ref.sylvester(n, torch.device("cpu")).double()
    err = (_butterfly(x.to(device)).double() - exact).abs()
    bound = 1.001 * log_n * 2.0 ** -24 * x.double().abs().sum(-1, keepdim=True)
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, bound {bound.max().item():.3g}"


@pytest.mark.parametrize("n", [2, 128, 512])
def test_hadamard_butterfly_exact_on_integers_and_non_finite(device, n):
    x = torch.randint(-100, 100, (4, n), generator=torch.Generator().manual_seed(n)).float()
    h = ref.sylvester(n, torch.device("cpu")).double()
    assert torch.equal(_butterfly(x.to(device)), (x.double() @ h).float())
    x[1, 1] = float("inf")  # one Inf: every output +-Inf
    x[2, 0] = float("nan")
    x[3, 0] = x[3, 1] = float("inf")  # two Infs: Inf - Inf = NaN in half the outputs
    y, expected = _butterfly(x.to(device)), (x.double() @ h).float()
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y[~y.isnan()], expected[~y.isnan()])
    assert torch.isinf(y[1]).all() and torch.isnan(y[2]).all()


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, cast_rne(x, y_ptr.dtype.element_ty), mask=offs < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rne_matches_torch(device, dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-140, 128, (4096,), generator=g).float())
    # Exact ties between neighbouring BF16 values (odd and even), values that round up to
    # Inf, subnormals, signed zeros, Inf and NaN.
    bf = torch.randn(512, generator=g).to(torch.bfloat16)
    ties = (bf.float() + torch.nextafter(bf, torch.full_like(bf, float("inf"))).float()) / 2
    fmax = torch.finfo(torch.float32).max
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), fmax, -fmax,
                            3.3961e38, 1e-40, -1e-45, 65520.0, 65519.0, 2.0 ** -25, 2.0 ** -24 * 1.5])
    x = torch.cat([base, ties, special]).to(device)
    y = torch.empty(x.shape, dtype=dtype, device=device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert_same_bits(y, x.to(dtype), "cast_rne")


@triton.jit
def _upcast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, to_f32(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_f32_is_exact_for_every_16_bit_pattern(device, dtype):
    x = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)
    y = torch.empty(x.shape, dtype=torch.float32, device=device)
    _upcast_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    assert_same_bits(y, x.float(), "to_f32")


@triton.jit
def _fp4_helpers_kernel(v_ptr, code_ptr, round_ptr, value_ptr, exp_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n)
    tl.store(code_ptr + offs, fp4_code(v), mask=offs < n)
    tl.store(round_ptr + offs, fp4_round_in_range(v), mask=offs < n)
    tl.store(value_ptr + offs, fp4_value(offs & 15), mask=offs < n)
    tl.store(exp_ptr + offs, fp4_scale_exponent(tl.abs(v)), mask=offs < n)


def _run_fp4_helpers(v: torch.Tensor):
    outs = [torch.empty(v.shape, dtype=d, device=v.device) for d in (torch.int32, torch.float32, torch.float32,
                                                                      torch.int32)]
    _fp4_helpers_kernel[(triton.cdiv(v.numel(), 4096),)](v, *outs, v.numel(), BLOCK=4096)
    return [o.cpu() for o in outs]


def test_fp4_device_helpers_match_the_codec(device):
    # Every FP32 value next to each E2M1 rounding tie and grid point (ties, one ulp either side),
    # random values in [-7, 7], signed zeros, subnormals, saturation and non-finite values.
    g = torch.Generator().manual_seed(4)
    marks = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 1e-45, 2.0 ** -126])
    near = torch.cat([marks, torch.nextafter(marks, torch.zeros_like(marks)), torch.nextafter(marks, marks + 1)])
    near = torch.cat([near, 6.0 * (1 + torch.arange(1, 9) * 2.0 ** -23), torch.rand(20000, generator=g) * 7])
    v = torch.cat([near, -near, torch.tensor([0.0, -0.0, 6.5, -6.99, 7.0, 1e30, float("inf"), -float("inf"),
                                              float("nan")])])
    code, rounded, value, _ = _run_fp4_helpers(v.to(device))
    expected = fp4_encode(v.clamp(-6.0, 6.0))
    assert_same_bits(code.to(torch.uint8), expected, "fp4_code")
    in_range = v.abs() < 7
    assert_same_bits(rounded[in_range], fp4_decode(expected)[in_range], "fp4_round_in_range")
    assert_same_bits(value, torch.tensor(FP4_VALUES).repeat(v.numel() // 16 + 1)[:v.numel()], "fp4_value")


def test_fp4_scale_exponent_without_division_equals_the_oracle(device):
    # ceil(log2(RN(amax / 6))) from the bits against the oracle's division, in the binade of the
    # amax floor 6 * 2^-126, a middle one and the largest: every mantissa within 2^12 of 1.5
    # (where the quotient crosses a power of two), the ends of the binade and a stride through it.
    middle = 0x400000 + torch.arange(-4096, 4097)
    mantissa = torch.cat([middle, torch.arange(0, 1 << 23, 997), torch.arange((1 << 23) - 16, 1 << 23)]).to(torch.int32)
    amax = torch.cat([(((exponent + 127) << 23) | mantissa).view(torch.float32) for exponent in (-124, 0, 127)])
    amax = amax[amax >= ref.FP4_AMAX_FLOOR]
    _, _, _, e = _run_fp4_helpers(amax.to(device))
    assert torch.equal(e, ref.fp4_exponent(amax, torch.zeros_like(amax, dtype=torch.bool)))
    assert torch.equal(e, ceil_log2_of_quotient(amax))


def ceil_log2_of_quotient(amax: torch.Tensor) -> torch.Tensor:
    """ceil(log2(amax / 6)) with the quotient rounded to FP32, via float64 (independent of bits)."""
    q = div_rn(amax, 6.0).double()
    return torch.ceil(torch.log2(q)).to(torch.int32)


# --- fused finishing steps ---------------------------------------------------------------

def _table(max_pos: int, rope_dim: int, g: torch.Generator, right_angles: bool = False) -> torch.Tensor:
    """A (cos, sin) table: real RoPE angles, or rotations by multiples of 90 degrees (exact)."""
    if right_angles:
        k = torch.randint(0, 4, (max_pos, rope_dim // 2), generator=g)
        return torch.stack((torch.tensor([1.0, 0.0, -1.0, 0.0])[k], torch.tensor([0.0, 1.0, 0.0, -1.0])[k]), -1)
    return ops.rope_freqs(rope_dim, max_pos, 10000.0)


def _positions(g: torch.Generator, shape, max_pos: int) -> torch.Tensor:
    # A few out-of-range positions: the kernels clamp them like the oracle (unchecked mode).
    return torch.randint(-2, max_pos + 2, shape, generator=g)


@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), rope_dim=st.sampled_from([32, 64]),
       nblocks=st.integers(0, 7), block=st.sampled_from([32, 64]), dtype=st.sampled_from(DTYPES),
       specials=st.booleans(), seed=st.integers(0, 2**31))
def test_rope_qat8_equals_the_chain_bit_for_bit(device, lead, rope_dim, nblocks, block, dtype, specials, seed):
    g = torch.Generator().manual_seed(seed)
    nope = nblocks * block
    x = torch.cat([_input(seed, lead, nope, block, torch.float32, 1.0, specials).reshape(*lead, nope),
                   torch.randn(*lead, rope_dim, generator=g)], -1).to(dtype).to(device)
    freqs = _table(40, rope_dim, g).to(device)
    pos = _positions(g, lead[:int(torch.randint(1, len(lead) + 1, (), generator=g))], 40).to(device)
    y = _triton(ops.rope_qat8, x, freqs, pos, block)
    expected = ref.rope_qat8(x, freqs, pos, block)
    assert_same_bits(y, expected, "rope_qat8")
    # The oracle itself is the chain of public ops.
    assert_same_bits(expected[..., nope:], ops.apply_rope(x, freqs, pos)[..., nope:], "rope part")
    if nope:
        assert_same_bits(expected[..., :nope], ref.qat8(x[..., :nope], block, True), "qat8 part")


def test_rope_qat8_strided_kv_slice(device):
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(6, 3, 512 + 128, generator=g).to(torch.bfloat16).to(device)
    x = fused[..., 128:]  # the KV vector inside a wider projection output
    freqs, pos = _table(16, 64, g).to(device), torch.arange(6, device=device)
    assert_same_bits(_triton(ops.rope_qat8, x, freqs, pos), ref.rope_qat8(x, freqs, pos, 64), "strided")
    xt = fused.transpose(0, 1)[..., :512]  # positions on a non-leading stride
    pos3 = torch.arange(3, device=device)
    assert_same_bits(_triton(ops.rope_qat8, xt, freqs, pos3), ref.rope_qat8(xt, freqs, pos3, 64), "permuted")


def _assert_qat4_of_nearby(y: torch.Tensor, h: torch.Tensor, slack: torch.Tensor, what: str) -> None:
    """``y`` must be ``qat4(h')`` (block 32) for some ``h'`` with ``|h' - h| <= slack``: each
    block on the FP4 grid of one power-of-two scale that some amax in range gives, each
    element between the codes of ``h - slack`` and ``h + slack`` at that scale."""
    yb, hb = y.float().cpu().reshape(-1, 32), h.float().cpu().reshape(-1, 32)
    sb = slack.expand(h.shape).reshape(-1, 32)
    grid = torch.tensor(FP4_VALUES[:8])
    ok = torch.zeros(yb.shape[0], dtype=torch.bool)
    for amax in ((hb.abs() - sb).clamp_min(0).amax(-1), (hb.abs() + sb).amax(-1)):
        amax = amax.clamp_min(ref.FP4_AMAX_FLOOR)
        s = exp2_int(ref.fp4_exponent(amax, torch.zeros_like(amax, dtype=torch.bool)))[:, None]
        v = yb / s
        lo = fp4_decode(fp4_encode(((hb - sb) / s).clamp(-6, 6)))
        hi = fp4_decode(fp4_encode(((hb + sb) / s).clamp(-6, 6)))
        on_grid = (v.abs()[..., None] == grid).any(-1)
        ok |= (on_grid & (v >= lo) & (v <= hi)).all(-1)
    assert bool(ok.all()), f"{what}: {int((~ok).sum())} of {ok.numel()} blocks are not qat4 of a nearby input"


@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), n=st.sampled_from([64, 128, 256, 512]),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-2, 1.0, 1e2]), seed=st.integers(0, 2**31))
def test_rope_hadamard_qat4_matches_the_chain(device, lead, n, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, n, generator=g) * scale).to(dtype).to(device)
    freqs = _table(30, 64, g).to(device)
    pos = _positions(g, lead[:1], 30).to(device)
    y = _triton(ops.rope_hadamard_qat4, x, freqs, pos)
    assert y.dtype == dtype and y.shape == x.shape
    r = ref._rope.apply_rope(x, freqs, pos, False)
    h = ref.hadamard(r)
    # The Hadamard sums may round differently (see _hadamard_bound); the quantiser after them
    # is exact, so the result is qat4 of a Hadamard output within that bound.
    _assert_qat4_of_nearby(y, h, _hadamard_bound(r, h), "rope_hadamard_qat4")
    assert_same_bits(ref.rope_hadamard_qat4(x, freqs, pos), ref.qat4(h, 32), "oracle is the chain")


@pytest.mark.parametrize("n", [64, 128, 512])
def test_rope_hadamard_qat4_bit_exact_when_sums_are_exact(device, n):
    # Small integers rotated by multiples of 90 degrees: every RoPE and Hadamard sum is exact,
    # so kernel and oracle see identical values before the quantiser and agree bit for bit.
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-8, 9, (7, 3, n), generator=g).float()
    x[2, 1, 5] = float("inf")
    x[4, 0, n - 3] = float("nan")  # in the rotated dims
    freqs = _table(10, 64, g, right_angles=True).to(device)
    pos = torch.randint(0, 10, (7,), generator=g).to(device)
    for dtype in DTYPES:
        xd = x.to(dtype).to(device)
        y = _triton(ops.rope_hadamard_qat4, xd, freqs, pos)
        assert_same_bits(y, ref.rope_hadamard_qat4(xd, freqs, pos), f"rope_hadamard_qat4 {dtype}")
        assert torch.isnan(y[2, 1]).all() and torch.isnan(y[4, 0]).all()


def test_rope_hadamard_qat4_strided(device):
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-8, 9, (4, 6, 2 * 128), generator=g).to(torch.bfloat16).to(device)
    freqs = _table(8, 64, g, right_angles=True).to(device)
    for x, pos in ((base[..., ::2], torch.arange(4)), (base.transpose(0, 1)[..., :128], torch.arange(6))):
        pos = pos.to(device)
        assert_same_bits(_triton(ops.rope_hadamard_qat4, x, freqs, pos), ref.rope_hadamard_qat4(x, freqs, pos))


_f = torch.zeros(8, 32, 2)
_p = torch.zeros(4, dtype=torch.int64)


@pytest.mark.parametrize("fn, kwargs, err, match", [
    (ops.rope_qat8, dict(x=torch.zeros(4, 100), freqs=_f, positions=_p), ValueError,
     "x: last dim minus rope_dim 64 must be a multiple of 64"),
    (ops.rope_qat8, dict(x=torch.zeros(4, 128), freqs=_f, positions=_p, block=48), ValueError, "block"),
    (ops.rope_qat8, dict(x=torch.zeros(4, 128), freqs=_f, positions=_p.float()), TypeError, "positions"),
    (ops.rope_qat8, dict(x=torch.zeros(4, 128), freqs=_f, positions=torch.zeros(5, dtype=torch.int64)),
     ValueError, "positions"),
    (ops.rope_qat8, dict(x=torch.zeros(4, 32), freqs=_f, positions=_p), ValueError, "x: last dim must be >= rope_dim"),
    (ops.rope_hadamard_qat4, dict(x=torch.zeros(4, 96), freqs=_f, positions=_p), ValueError, "x: last dim must be one of"),
    (ops.rope_hadamard_qat4, dict(x=torch.zeros(4, 128), freqs=torch.zeros(8, 24, 2), positions=_p), ValueError,
     "freqs: rope_dim"),
    (ops.rope_hadamard_qat4, dict(x=torch.zeros(4, 128), freqs=_f.double(), positions=_p), TypeError, "freqs"),
])
def test_fused_bad_input(fn, kwargs, err, match):
    with pytest.raises(err, match=match):
        fn(**kwargs)


def _every_bf16(limit: float) -> torch.Tensor:
    """Every finite BF16 value with ``|v| <= limit`` (FP32)."""
    v = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return v[torch.isfinite(v) & (v.abs() <= limit)]


def test_every_bf16_value_encodes_like_the_oracle(device):
    # Blocks of two [top, v] fix the scale at 1, so v itself goes through the FP8 / FP4
    # rounding: every BF16 value in range, subnormals and ties included (on a GPU this is
    # the hardware FP8 conversion).
    for top, quant, qat in ((448.0, lambda x: _triton(ops.act_quant, x, 2)[0].view(torch.uint8), ops.qat8),
                            (6.0, lambda x: _triton(ops.fp4_quant, x, 2)[0], ops.qat4)):
        v = _every_bf16(top)
        x = torch.stack((torch.full_like(v, top), v), -1).reshape(1, -1).to(device)
        expect = (ref.act_quant(x, 2, True)[0].view(torch.uint8) if top == 448.0 else ref.fp4_quant(x, 2)[0])
        assert_same_bits(quant(x), expect, f"encode, top {top}")
        assert_same_bits(_triton(qat, x, 2), (ref.qat8(x, 2, True) if top == 448.0 else ref.qat4(x, 2)), "qat")


# --- large shapes on a GPU (hardware FP8 conversion, FTZ behaviour, many tiles) --------------

# Row counts of the GPU tests (odd, so the last tile is partial).
GPU_ROWS = dict(wide=1031, kv=4099, hadamard=20011, exact=4097, rope=8191, query=1023)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_quantisers_large(device, dtype):
    x = _input(11, [GPU_ROWS['wide']], 7168, 128, dtype, 1.0, specials=True).to(device)
    q, s = _triton(ops.act_quant, x, 128)
    rq, rs = ref.act_quant(x, 128, True)
    assert_same_bits(q.view(torch.uint8), rq.view(torch.uint8), "act_quant codes")
    assert_same_bits(s, rs, "act_quant scales")
    q, s = _triton(ops.act_quant, x, 128, False)
    assert_same_bits(q.view(torch.uint8), ref.act_quant(x, 128, False)[0].view(torch.uint8), "act_quant non-pow2")
    x = _input(12, [GPU_ROWS['kv']], 448, 64, dtype, 1.0, specials=True).to(device)
    assert_same_bits(_triton(ops.qat8, x, 64), ref.qat8(x, 64, True), "qat8")
    assert_same_bits(_triton(ops.qat8, x, 64, False), ref.qat8(x, 64, False), "qat8 non-pow2")
    x = _input(13, [GPU_ROWS['wide']], 7168, 32, dtype, 1.0, specials=True, kind="fp4").to(device)
    p, s = _triton(ops.fp4_quant, x, 32)
    rp, rs = ref.fp4_quant(x, 32)
    assert_same_bits(p, rp, "fp4_quant codes")
    assert_same_bits(s.view(torch.uint8), rs.view(torch.uint8), "fp4_quant scales")
    assert_same_bits(_triton(ops.qat4, x, 32), ref.qat4(x, 32), "qat4")
    assert_same_bits(_triton(ops.fp4_dequant, rp, rs, dtype), ref.fp4_dequant(rp, rs, dtype), "fp4_dequant")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 128, 256, 512])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_hadamard_large(device, n, dtype):
    g = torch.Generator().manual_seed(n)
    rows = GPU_ROWS["hadamard"]
    x = torch.randn(rows, n, generator=g) * torch.exp2(torch.randint(-20, 10, (rows, 1), generator=g).float())
    x = x.to(dtype).to(device)
    y, expected = _triton(ops.hadamard, x), ref.hadamard(x)
    err = (y.float().cpu() - expected.float().cpu()).abs()
    assert bool((err <= _hadamard_bound(x, expected)).all()), f"max err {err.max().item():.3g}"
    xi = torch.randint(-100, 100, (GPU_ROWS['exact'], n), generator=g).to(dtype).to(device)
    assert_same_bits(_triton(ops.hadamard, xi), ref.hadamard(xi), "hadamard integers")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_fused_large(device, dtype):
    g = torch.Generator().manual_seed(7)
    freqs = ops.rope_freqs(64, 4096, 160000.0, dict(factor=16, original_max_position_embeddings=65536,
                                                     beta_fast=32, beta_slow=1), device=device)
    rows, queries = GPU_ROWS["rope"], GPU_ROWS["query"]
    x = torch.cat([_input(7, [rows], 448, 64, dtype, 1.0, specials=True).float(),
                   torch.randn(rows, 64, generator=g)], -1).to(dtype).to(device)
    pos = torch.randint(0, 4096, (rows,), generator=g).to(device)
    assert_same_bits(_triton(ops.rope_qat8, x, freqs, pos), ref.rope_qat8(x, freqs, pos, 64), "rope_qat8")
    xq = torch.randn(queries, 64, 128, generator=g).to(dtype).to(device)
    posq = torch.randint(0, 4096, (queries,), generator=g).to(device)
    r = ref._rope.apply_rope(xq, freqs, posq, False)
    h = ref.hadamard(r)
    _assert_qat4_of_nearby(_triton(ops.rope_hadamard_qat4, xq, freqs, posq), h, _hadamard_bound(r, h),
                           "rope_hadamard_qat4")
    xi = torch.randint(-8, 9, (queries, 64, 128), generator=g).to(dtype).to(device)
    table = _table(4096, 64, g, right_angles=True).to(device)
    assert_same_bits(_triton(ops.rope_hadamard_qat4, xi, table, posq), ref.rope_hadamard_qat4(xi, table, posq),
                     "rope_hadamard_qat4 exact sums")


def test_custom_ops_fake_tensors_match():
    # torch.compile traces each op as one opaque node through its fake implementation.
    x = torch.randn(4, 128).to(torch.bfloat16)
    p, s = ref.fp4_quant(x, 32)
    freqs, pos = ops.rope_freqs(64, 10, 10000.0), torch.arange(4)
    for name, args in [("act_quant", (x, 128, True)), ("qat8", (x, 64, True)), ("fp4_quant", (x, 32)),
                       ("fp4_dequant", (p, s, torch.bfloat16)), ("qat4", (x, 32)), ("hadamard", (x,)),
                       ("rope_qat8", (x, freqs, pos, 64)), ("rope_hadamard_qat4", (x, freqs, pos))]:
        result = torch.library.opcheck(getattr(torch.ops.dsv4, name), args, test_utils=("test_faketensor",))
        assert result == {"test_faketensor": "SUCCESS"}, name
