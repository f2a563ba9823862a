"""gemm family: the FP32 oracles against SPEC 2/3 directly, then the Triton kernels against
the oracles."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops
from dsv4_triton.formats import fp4_pack
from dsv4_triton.reference import gemm as ref
from dsv4_triton.reference import quant as ref_quant
from helpers import ULP, assert_close

# SPEC 2, written out again here so that the oracle's decoder is checked against the text.
SPEC_FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def random_fp8(shape, g, device) -> torch.Tensor:
    """Random finite FP8-E4M3 values (every byte but the two NaNs)."""
    b = torch.randint(0, 254, shape, generator=g, dtype=torch.int32)
    b = b + (b >= 0x7F).to(torch.int32)  # skip 0x7F (NaN); 0xFF is never drawn
    return b.to(torch.uint8).view(torch.float8_e4m3fn).to(device)


def random_e8m0(shape, g, device, lo: int = -8, hi: int = 4) -> torch.Tensor:
    """E8M0 scales 2^e with e uniform in [lo, hi]."""
    e = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int32)
    return (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu).to(device)


def random_fp4(n, k, g, device, fmt="mxfp4", exp_lo=-8, exp_hi=4):
    """(packed codes [n, k/2], scales, global scale) of a random FP4 weight."""
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8).to(device)
    if fmt == "mxfp4":
        return packed, random_e8m0((n, k // 32), g, device, exp_lo, exp_hi), None
    s = (torch.rand(n, k // 16, generator=g) * 4 + 0.01).to(torch.float8_e4m3fn).to(device)
    return packed, s, torch.tensor(0.37, device=device)


# --- the oracles against SPEC ------------------------------------------------------------

def test_fp4_oracle_decodes_every_byte_in_spec_nibble_order():
    # All 256 bytes: element 2k is the low nibble, element 2k+1 the high nibble (SPEC 2).
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 256).repeat(1, 1)
    packed = torch.cat([packed, packed.flip(-1)], dim=0)  # two rows, 512 elements each
    scale = torch.full((2, 512 // 32), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    got = ref.dequant_fp4_weight(packed, scale, "mxfp4", None)
    for r in range(2):
        for j, byte in enumerate(packed[r].tolist()):
            expect = [SPEC_FP4[byte & 15], SPEC_FP4[byte >> 4]]
            pair = got[r, 2 * j:2 * j + 2].tolist()
            assert pair == expect, f"byte {byte:#04x}: got {pair}, SPEC says {expect}"
            # -0.0 keeps its sign bit
            assert [str(v) for v in pair] == [str(v) for v in expect]


def test_fp4_oracle_applies_one_scale_per_block():
    g = _gen(1)
    codes = torch.randint(0, 16, (3, 64), generator=g, dtype=torch.int32).to(torch.uint8)
    lut = torch.tensor(SPEC_FP4)
    e = torch.tensor([[-127, 127], [0, -3], [5, 100]])
    mx = ref.dequant_fp4_weight(fp4_pack(codes), (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu),
                                "mxfp4", None)
    expect = lut[codes.long()] * torch.pow(2.0, e.double()).float().repeat_interleave(32, 1)
    assert torch.equal(mx, expect)
    s16 = (torch.rand(3, 4, generator=g) * 3).to(torch.float8_e4m3fn)
    gs = torch.tensor(0.75)
    nv = ref.dequant_fp4_weight(fp4_pack(codes), s16, "nvfp4", gs)
    assert torch.equal(nv, lut[codes.long()] * s16.float().repeat_interleave(16, 1) * 0.75)


@given(m=st.integers(1, 5), n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_fp8_oracle_is_spec_formula(m, n, k, seed):
    # y[i, j] = sum_k act_quant(x)[i, k] * s_x[i, k // 128] * w[j, k] * s_w[j // 128, k // 128],
    # evaluated here in float64 from the codes (FP32 oracle: FP32 rounding of the sum).
    g = _gen(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = random_fp8((n, k), g, "cpu")
    ws = random_e8m0((_cdiv(n, 128), _cdiv(k, 128)), g, "cpu")
    xp = torch.nn.functional.pad(x.float(), (0, -k % 128))
    q, s = ref_quant.act_quant(xp, 128, True)
    xd = (q.double().reshape(m, -1, 128) * s.double()[..., None]).reshape(m, -1)[:, :k]
    sw = ref.scale_to_float(ws).double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    expect = xd @ (w.double() * sw).t()
    got = ops.fp8_linear(x, w, ws)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # FP32 accumulation vs float64, then one bf16 rounding.
    bound = ULP[torch.bfloat16] * expect.abs() + k * 2.0 ** -23 * (xd.abs() @ (w.double() * sw).abs().t())
    assert bool(((got.double() - expect).abs() <= bound).all())


def test_fp8_oracle_nan_policy():
    g = _gen(2)
    x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    x[0, 5] = float("nan")
    x[1, 200] = float("inf")
    w = random_fp8((130, 256), g, "cpu")
    ws = random_e8m0((2, 2), g, "cpu")
    ws.view(torch.uint8)[1, 0] = 0xFF  # an E8M0 NaN scale poisons its 128 x 128 block
    y = ops.fp8_linear(x, w, ws)
    assert bool(torch.isnan(y[0]).all()) and bool(torch.isnan(y[1]).all())  # a non-finite block
    assert bool(torch.isnan(y[2, 128:]).all()) and bool(torch.isfinite(y[2, :128]).all())


def test_linear_oracle_accumulates_in_fp32():
    g = _gen(3)
    x = torch.randn(4, 3, 96, generator=g).to(torch.bfloat16)
    w = torch.randn(40, 96, generator=g).to(torch.bfloat16)
    y = ops.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 3, 40)
    expect = x.double() @ w.double().t()
    assert_close(y, expect, rtol=ULP[torch.bfloat16], atol=1e-6, what="bf16 out")
    y32 = ops.linear(x, w, out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    assert_close(y32, expect, rtol=96 * 2.0 ** -23, atol=1e-6, what="fp32 out")
    wf = torch.randn(40, 96, generator=g)
    assert ops.linear(x, wf, torch.float32).dtype == torch.float32


def test_grouped_linear_oracle_is_per_group():
    g = _gen(4)
    x = torch.randn(5, 3, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(3, 20, 64, generator=g).to(torch.bfloat16)
    y = ops.grouped_linear(x, w)
    for grp in range(3):
        expect = x[:, grp].double() @ w[grp].double().t()
        assert_close(y[:, grp], expect, rtol=ULP[torch.bfloat16], atol=1e-6, what=f"group {grp}")


# --- argument checks ---------------------------------------------------------------------

def _fp8_args(n=128, k=128):
    return (torch.zeros(2, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.float8_e4m3fn),
            torch.zeros(_cdiv(n, 128), _cdiv(k, 128)))


@pytest.mark.parametrize("fn, args, err, name", [
    (ops.linear, (torch.zeros(2, 8, dtype=torch.int32), torch.zeros(4, 8)), TypeError, "x"),
    (ops.linear, (torch.zeros(2, 8), torch.zeros(4, 9)), ValueError, "w"),
    (ops.linear, (torch.zeros(2, 8), torch.zeros(4, 8), torch.int8), TypeError, "out_dtype"),
    (ops.fp8_linear, (torch.zeros(2, 128), torch.zeros(128, 128), torch.zeros(1, 1)), TypeError, "w"),
    (ops.fp8_linear, _fp8_args()[:2] + (torch.zeros(2, 1),), ValueError, "w_scale"),
    (ops.fp8_linear, _fp8_args()[:2] + (torch.zeros(1, 1, dtype=torch.float16),), TypeError, "w_scale"),
    (ops.fp8_linear, (torch.zeros(2, 64, dtype=torch.bfloat16),) + _fp8_args()[1:], ValueError, "w"),
    (ops.fp4_linear, (torch.zeros(2, 64), torch.zeros(4, 32, dtype=torch.uint8),
                      torch.zeros(4, 1, dtype=torch.uint8)), TypeError, "w_scale"),
    (ops.fp4_linear, (torch.zeros(2, 64), torch.zeros(4, 32, dtype=torch.uint8),
                      torch.zeros(4, 3, dtype=torch.float8_e8m0fnu)), ValueError, "w_scale"),
    (ops.fp4_linear, (torch.zeros(2, 48), torch.zeros(4, 24, dtype=torch.uint8),
                      torch.zeros(4, 1, dtype=torch.float8_e8m0fnu)), ValueError, "w"),
    (ops.fp4_linear, (torch.zeros(2, 64), torch.zeros(4, 32, dtype=torch.uint8),
                      torch.zeros(4, 2, dtype=torch.float8_e8m0fnu), "fp4"), ValueError, "fmt"),
    (ops.fp4_linear, (torch.zeros(2, 64), torch.zeros(4, 32, dtype=torch.uint8),
                      torch.zeros(4, 4, dtype=torch.float8_e4m3fn), "nvfp4"), ValueError, "global_scale"),
    (ops.fp4_linear, (torch.zeros(2, 64), torch.zeros(4, 32, dtype=torch.uint8),
                      torch.zeros(4, 2, dtype=torch.float8_e8m0fnu), "mxfp4", torch.ones(1)), ValueError,
     "global_scale"),
    (ops.grouped_linear, (torch.zeros(2, 3, 8, dtype=torch.bfloat16), torch.zeros(2, 4, 8, dtype=torch.bfloat16)),
     ValueError, "w"),
    (ops.grouped_linear, (torch.zeros(2, 3, 8), torch.zeros(3, 4, 8, dtype=torch.bfloat16)), TypeError, "x"),
])
def test_bad_input_names_the_argument(fn, args, err, name):
    with pytest.raises(err, match=rf"^{name}:"):
        fn(*args)
