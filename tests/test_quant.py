"""quant family: the FP32 oracles against SPEC 2/4 directly, then the Triton kernels against
the oracles (bit-exact codes and scales; QAT outputs bit-identical)."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.formats import FP4_VALUES, e8m0_to_float, fp4_unpack
from dsv4_triton.reference import quant as ref

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
