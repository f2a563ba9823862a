"""gemm family: the FP32 oracles against SPEC 2/3 directly, then the Triton kernels against
the oracles."""


import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.formats import fp4_pack
from dsv4_triton.kernels import gemm as kern
from dsv4_triton.reference import gemm as ref
from dsv4_triton.reference import quant as ref_quant
from helpers import SM90_COMPILE, ULP, assert_close, assert_same_bits, compile_for_sm90

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


def random_fp4_linear_case(m, n, k, seed, device, fmt="mxfp4"):
    """(x, packed codes, scales, global scale) for ``fp4_linear`` at [m, k] x [n, k]: activation
    rows of N(0, 9) in bf16, row 0 NaN for odd seeds (the oracle's NaN row)."""
    g = _gen(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    if seed % 2:
        x[0, 0] = float("nan")
    return (x.to(device),) + random_fp4(n, k, g, device, fmt)


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
    (ops.fp8_linear, _fp8_args() + (torch.ones(2, 1),), TypeError, "x"),  # a scale with BF16 rows
    (ops.fp8_linear, (torch.zeros(2, 64, dtype=torch.float8_e4m3fn), torch.zeros(8, 64, dtype=torch.float8_e4m3fn),
                      torch.zeros(1, 1), torch.ones(2, 1)), ValueError, "x"),  # codes of a partial block
    (ops.fp8_linear, (torch.zeros(2, 128, dtype=torch.float8_e4m3fn),) + _fp8_args()[1:] + (torch.ones(2, 2),),
     ValueError, "x_scale"),
    (ops.fp8_linear, (torch.zeros(2, 128, dtype=torch.float8_e4m3fn),) + _fp8_args()[1:]
     + (torch.ones(2, 1, dtype=torch.float64),), TypeError, "x_scale"),
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



# --- Triton kernels against the oracles ----------------------------------------------------

def _triton(fn, *args):
    with use_backend("triton"):
        return fn(*args)


def sum_tolerance(device) -> float:
    """Difference allowed (relative to the sum of |terms|) between two FP32 sums of the same
    products beyond the K * 2^-24 of each: on a GPU the FP8 tensor-core dot of one
    128-block keeps about 14 significant bits internally (DeepSeek-V3 report, 3.3.2); that
    is why the kernels promote every 128-block into FP32 and why no more is allowed."""
    return 2.0 ** -11 if device.type == "cuda" else 0.0


def assert_gemm_close(y, oracle, xd, wd, extra=None, what=""):
    """|y - oracle| <= one bf16 rounding (2^-8 relative each side) + the FP32 summation error
    of both (K * 2^-23 of the sum of |terms|) + the GPU FP8-dot allowance [+ ``extra``];
    NaN exactly where the oracle has NaN.  ``xd``/``wd``: the dequantised operands."""
    k = xd.shape[-1]
    mag = xd.double().abs().nan_to_num(0) @ wd.double().abs().nan_to_num(0).t()
    # + K * 2^-126: FP32 subnormal products may be flushed to zero on a GPU.
    bound = (2.0 ** -7 * oracle.double().abs() + (k * 2.0 ** -23 + sum_tolerance(y.device)) * mag
             + k * 2.0 ** -126)
    if extra is not None:
        bound = bound + extra
    a, e = y.double(), oracle.double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ"
    fin = ~torch.isnan(e)
    err, bound = (a - e).abs()[fin], bound[fin]
    ok = err <= bound
    assert bool(ok.all()), (f"{what}: {int((~ok).sum())} of {ok.numel()} out of tolerance, worst excess "
                            f"{(err - bound).max().item():.3g}")


def assert_fp4_close(y, x, w, ws, fmt, gs, extra=None, what=""):
    """assert_gemm_close against the fp4_linear oracle of these arguments."""
    assert_gemm_close(y, ref.fp4_linear(x, w, ws, fmt, gs), ref.dequant_activation(x),
                      ref.dequant_fp4_weight(w, ws, fmt, gs), extra=extra, what=what)


@given(m=st.integers(1, 300), n=st.integers(1, 160), k=st.integers(1, 300), fused=st.booleans(),
       fp32_scale=st.booleans(), seed=st.integers(0, 2**31))
def test_fp8_linear_matches_oracle(device, m, n, k, fused, fp32_scale, seed):
    g = _gen(seed)
    x = (torch.randn(m, k, generator=g) * 4).to(torch.bfloat16).to(device)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((_cdiv(n, 128), _cdiv(k, 128)), g, device)
    if fp32_scale:
        ws = ref.scale_to_float(ws) * (1 + torch.rand(ws.shape, generator=g)).to(device)  # not powers of two
    y = kern.scaled_gemm(x, w, ws, "fp8", None, fused_quant=fused)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_gemm_close(y, ref.fp8_linear(x, w, ws), ref.dequant_activation(x), ref.dequant_fp8_weight(w, ws))


@given(m=st.integers(1, 300), n=st.integers(1, 160), kb=st.integers(1, 3), fp32_scale=st.booleans(),
       seed=st.integers(0, 2**31))
def test_fp8_linear_of_quantised_codes_equals_the_pre_pass_path(device, m, n, kb, fp32_scale, seed):
    """Codes and scales from act_quant give what the kernel computes from the BF16 rows through
    its own pre-pass, bit for bit (the same operands reach the same MMAs), and the oracle's
    result within its tolerance."""
    g = _gen(seed)
    k = 128 * kb
    x = (torch.randn(m, k, generator=g) * 4).to(torch.bfloat16).to(device)
    x[0, :3] = torch.tensor([float("nan"), 1e30, 0.0])  # a NaN block: NaN scale, NaN codes
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((_cdiv(n, 128), kb), g, device)
    if fp32_scale:
        ws = ref.scale_to_float(ws) * (1 + torch.rand(ws.shape, generator=g)).to(device)
    q, s = _triton(ops.act_quant, x, 128, True)
    y = _triton(ops.fp8_linear, q, w, ws, s)
    assert_same_bits(y, kern.scaled_gemm(x, w, ws, "fp8", None, fused_quant=False), "codes against pre-pass")
    assert_same_bits(ref.fp8_linear(q, w, ws, s), ref.fp8_linear(x, w, ws), "oracle of codes against oracle")
    assert_gemm_close(y, ref.fp8_linear(x, w, ws), ref.dequant_activation(x), ref.dequant_fp8_weight(w, ws))


@given(lead=st.sampled_from([(), (1,), (2, 3), (5,)]), seed=st.integers(0, 2**31))
def test_fp8_linear_public_op_any_leading_shape_and_strides(device, lead, seed):
    g = _gen(seed)
    base = torch.randn(*lead, 2 * 192, generator=g).to(torch.bfloat16).to(device)
    x = base[..., ::2]  # K = 192, non-unit stride
    w = random_fp8((72, 192), g, device)
    ws = random_e8m0((1, 2), g, device)
    y = _triton(ops.fp8_linear, x, w, ws)
    assert y.shape == (*lead, 72)
    assert_gemm_close(y.reshape(-1, 72), ref.fp8_linear(x, w, ws).reshape(-1, 72),
                      ref.dequant_activation(x).reshape(-1, 192), ref.dequant_fp8_weight(w, ws))


@given(m=st.integers(1, 300), n=st.integers(1, 100), kb=st.integers(1, 9), fmt=st.sampled_from(["mxfp4", "nvfp4"]),
       fused=st.booleans(), seed=st.integers(0, 2**31))
def test_fp4_linear_matches_oracle(device, m, n, kb, fmt, fused, seed):
    g = _gen(seed)
    k = 32 * kb  # K a multiple of the MXFP4 block, not always of 128
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, ws, gs = random_fp4(n, k, g, device, fmt)
    y = kern.scaled_gemm(x, w, ws, fmt, gs, fused_quant=fused)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_fp4_close(y, x, w, ws, fmt, gs)


def _mxfp4_spread_error(ws: torch.Tensor, k: int) -> torch.Tensor:
    """Per weight element, the largest error the FP8 expansion may make: 0 where the row's
    128-block exponents span <= 14 binades (exact), else 2^(e_max - 16) (kernels/gemm.py)."""
    e = ws.view(torch.uint8).long().cpu() - 127
    n, nsub = e.shape
    pad = (-nsub) % 4
    eb = torch.nn.functional.pad(e, (0, pad), value=-127).reshape(n, -1, 4)
    e_max = eb.amax(-1, keepdim=True)
    err = torch.where(e_max - eb > 14, torch.pow(2.0, (e_max - 16).double()), torch.zeros(()).double())
    return err.reshape(n, -1)[:, :nsub].repeat_interleave(32, 1)[:, :k]


def spread_inputs(m, n, spread, seed, device):
    """(x, w, w_scale, dequantised x, per-output error allowed by _mxfp4_spread_error) for
    MXFP4 weights whose 32-block exponents spread over ``spread`` binades (K = 256)."""
    g = _gen(seed)
    k = 256
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, _, _ = random_fp4(n, k, g, device)
    e = torch.randint(0, spread + 1, (n, k // 32), generator=g) - spread // 2 - 5
    ws = (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu).to(device)
    xd = ref.dequant_activation(x)
    return x, w, ws, xd, xd.double().abs() @ _mxfp4_spread_error(ws, k).to(device).t()


@given(m=st.integers(1, 40), n=st.integers(1, 40), spread=st.integers(0, 30), seed=st.integers(0, 2**31))
def test_mxfp4_exponent_spread_within_a_block(device, m, n, spread, seed):
    # Exact (up to FP32 summation order) while the four 32-block exponents of a 128-block span
    # <= 14 binades; beyond, the small blocks' values are off by at most 2^(e_max - 16) each.
    x, w, ws, xd, extra = spread_inputs(m, n, spread, seed, device)
    y = _triton(ops.fp4_linear, x, w, ws)
    if spread <= 14:
        assert float(extra.max()) == 0.0
    assert_gemm_close(y, ref.fp4_linear(x, w, ws, "mxfp4", None), xd, ref.dequant_fp4_weight(w, ws, "mxfp4", None),
                      extra=extra)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_kernel_decodes_every_byte_exactly(device, fmt):
    # x = unit rows (act_quant exact: q = 256, s = 2^-8), so y = w_deq^T element by element,
    # bit for bit: every byte value, both nibbles, in both rows' orders.  (A sum with +0
    # terms cannot keep -0.0, so the sign of zero is checked on the oracle's decoder only.)
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    w = torch.stack([packed, packed.flip(0)]).to(device)  # [2, 256] -> K = 512
    k = 512
    x = torch.eye(k, dtype=torch.bfloat16, device=device)
    if fmt == "mxfp4":
        ws = torch.full((2, k // 32), 127 + 3, dtype=torch.uint8).view(torch.float8_e8m0fnu).to(device)
        gs = None
    else:
        ws = torch.full((2, k // 16), 0.75).to(torch.float8_e4m3fn).to(device)
        gs = torch.tensor(2.0, device=device)
    y = _triton(ops.fp4_linear, x, w, ws, fmt, gs)
    expect = torch.tensor(SPEC_FP4)[torch.stack([packed & 15, packed >> 4], -1).flatten().long()]
    scale = 8.0 if fmt == "mxfp4" else 1.5
    assert torch.equal(y[:, 0].float().cpu(), expect * scale)
    assert torch.equal(y[:, 1].float().cpu(), expect.reshape(256, 2).flip(0).flatten() * scale)


@triton.jit
def _expand_mxfp4_kernel(w_ptr, s_ptr, lut_ptr, out_ptr, scale_ptr, ROWS: tl.constexpr,
                         COMPUTED_TABLE: tl.constexpr, SCALE_WORDS: tl.constexpr):
    # One 128-wide K block of ROWS weight rows through the GEMMs' own operand builder.
    rows = tl.arange(0, ROWS)
    w, s = kern.load_weight_block(w_ptr, s_ptr, lut_ptr, rows, rows < ROWS, 0, 128, 64, 4, kern.W_MXFP4, 128,
                                  COMPUTED_TABLE, SCALE_WORDS)
    tl.store(out_ptr + rows[:, None] * 128 + tl.arange(0, 128)[None, :], w.to(tl.uint8, bitcast=True))
    tl.store(scale_ptr + rows, s)


def expected_mxfp4_operand(w, e):
    """The operand's definition element by element: FP8(lut[code] * 2^max(e_j - e_max + 6, -30)),
    rounded to nearest even by torch, and the column scale 2^(e_max - 127) (NaN for 0xFF)."""
    codes = torch.stack([w & 15, w >> 4], -1).reshape(w.shape[0], -1).long()
    lut = torch.tensor(SPEC_FP4, dtype=torch.float64)[codes]
    e = e.long()
    e_max = e.amax(1)
    shift = torch.clamp(e - e_max[:, None] + 6, min=-30).repeat_interleave(32, 1)
    operand = (lut * torch.pow(2.0, shift.double())).to(torch.float8_e4m3fn).view(torch.uint8)
    scale = torch.where(e_max == 255, float("nan"), torch.pow(2.0, (e_max - 127).double())).float()
    return operand, scale


# How the operand builder gets its table rows and scale bytes: (COMPUTED_TABLE, SCALE_WORDS).
EXPANSION_FORMS = [(False, False), (True, False), (True, True)]


def check_mxfp4_expansion(device, computed, words):
    # All 256 bytes (every code in both nibbles) in every row, rotated per row so each byte
    # meets every 32-block; rows of scale gaps 0..40 (exact FP8 normals up to 11, subnormals
    # 12..18, all zero from 19, the table's last row from 31), extreme and NaN exponent bytes,
    # and an all-zero weight row.
    gaps = list(range(0, 41)) + [254]
    rows = []
    for gap in gaps:
        base = 127 if gap < 127 else 254
        rows.append([base, base - gap, base - min(gap, 3), base - gap // 2])
    rows += [[0, 0, 0, 0], [255, 255, 255, 255], [255, 3, 127, 200], [254, 254, 254, 254], [1, 0, 0, 1]]
    n = 64
    e = torch.tensor(rows + [[127, 120, 127, 127]] * (n - len(rows)), dtype=torch.int32)
    w = torch.stack([torch.arange(256, dtype=torch.int32).roll(3 * r)[:64] for r in range(n)]).to(torch.uint8)
    w[-1] = 0
    expect_w, expect_s = expected_mxfp4_operand(w, e)
    out = torch.empty((n, 128), dtype=torch.uint8, device=device)
    scale = torch.empty(n, dtype=torch.float32, device=device)
    _expand_mxfp4_kernel[(1,)](w.to(device), e.to(torch.uint8).to(device), kern.fp4_fp8_table(device), out,
                               scale, ROWS=n, COMPUTED_TABLE=computed, SCALE_WORDS=words)
    assert torch.equal(out.cpu(), expect_w), (out.cpu() != expect_w).nonzero()[:5].tolist()
    assert torch.equal(torch.isnan(scale.cpu()), torch.isnan(expect_s))
    assert torch.equal(scale.cpu().nan_to_num(), expect_s.nan_to_num())


@pytest.mark.parametrize("computed, words", EXPANSION_FORMS)
def test_mxfp4_expansion_is_bit_exact(device, computed, words):
    check_mxfp4_expansion(device, computed, words)


@pytest.mark.gpu
@pytest.mark.parametrize("computed, words", EXPANSION_FORMS)
def test_mxfp4_expansion_ptx_is_bit_exact(device, computed, words):
    # The inline-PTX expansion and table rows (a GPU runs them; the interpreter runs their
    # integer emulations).
    check_mxfp4_expansion(device, computed, words)


@triton.jit
def _table_row_kernel(gap_ptr, lut_ptr, out_ptr, N: tl.constexpr):
    gap = tl.load(gap_ptr + tl.arange(0, N))
    lo, hi = kern.fp4_table_row(gap, lut_ptr)
    tl.store(out_ptr + 2 * tl.arange(0, N), lo)
    tl.store(out_ptr + 2 * tl.arange(0, N) + 1, hi)


@pytest.mark.gpu
def test_computed_table_rows_match_the_table(device):
    # The PTX rows (FP16 pairs converted by cvt.rn.satfinite.e4m3x2.f16x2; the interpreter
    # reads the table itself) for every gap a scale pair can have, 0..255: the stored row
    # min(gap, 31), word for word.
    gaps = torch.arange(256, dtype=torch.int32)
    out = torch.empty(256, 2, dtype=torch.int32, device=device)
    _table_row_kernel[(1,)](gaps.to(device), kern.fp4_fp8_table(device), out, N=256)
    table = kern.fp4_fp8_table(torch.device("cpu"))
    assert torch.equal(out.cpu(), table[torch.clamp(gaps, max=kern.FP4_LUT_ROWS.value - 1).long()])


def test_scale_words_only_for_whole_aligned_blocks(device):
    scales = torch.zeros(6, 12, dtype=torch.uint8, device=device)  # K = 384
    assert kern.mxfp4_scale_words(scales, 384)
    assert kern.mxfp4_scale_words(scales.view(2, 3, 12), 384)
    assert not kern.mxfp4_scale_words(scales[:, :10], 320)  # K not a multiple of 128
    assert not kern.mxfp4_scale_words(scales[:, 1:9], 256)  # rows not 4-byte aligned
    assert not kern.mxfp4_scale_words(torch.zeros(8, 6, dtype=torch.uint8, device=device)[:, 2:6], 128)
    assert not kern.mxfp4_scale_words(torch.zeros(8, 16, dtype=torch.uint8, device=device)[:, ::2], 256)  # strided


def test_table_row_fp16_pairs_round_to_the_table():
    # The constants of FP4_TABLE_ROW_ASM: for each gap d (clamped at 19) the words
    # pair - d * 0x04000400 (pair (0, 0.5): pair - (d << 26)) read as FP16 pairs are the exact
    # magnitudes times 2^(6 - d), and rounded to E4M3 (torch, nearest even) the table's row.
    table = kern.fp4_fp8_table(torch.device("cpu")).view(torch.uint8).reshape(kern.FP4_LUT_ROWS.value, 8)
    magnitudes = torch.tensor(SPEC_FP4[:8], dtype=torch.float64)
    for gap in range(40):
        d = min(gap, kern.FP4_GAP_CLAMP.value)
        words = [kern.FP4_FP16_PAIRS[0] - (d << 26)] + [p - d * 0x04000400 for p in kern.FP4_FP16_PAIRS[1:]]
        halves = torch.tensor([[w & 0xFFFF, w >> 16] for w in words], dtype=torch.int32).flatten()
        values = halves.to(torch.int16).view(torch.float16)  # bit patterns below 0x8000: no wrap
        assert torch.equal(values.double(), magnitudes * 2.0 ** (6 - d)), gap
        row = table[min(gap, kern.FP4_LUT_ROWS.value - 1)]
        assert torch.equal(values.to(torch.float8_e4m3fn).view(torch.uint8), row), gap


def test_mxfp4_table_is_the_rounded_product():
    table = kern.fp4_fp8_table(torch.device("cpu")).view(torch.uint8).reshape(kern.FP4_LUT_ROWS.value, 8)
    magnitudes = torch.tensor(SPEC_FP4[:8], dtype=torch.float64)
    for gap in range(kern.FP4_LUT_ROWS.value):
        expect = (magnitudes * 2.0 ** max(6 - gap, -30)).to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(table[gap], expect), gap
    assert int(table[19].max()) == 0 and int(table[18].max()) == 1  # past gap 18 everything rounds to 0


@pytest.mark.parametrize("m, n, k, fused, computed, bn", [(1, 64, 128, True, True, 64), (5, 70, 256, True, False, 64),
                                                       (17, 130, 384, False, True, 64), (40, 64, 256, False, False, 64),
                                                       (3, 64, 160, True, True, 64), (2, 300, 256, True, True, 256)])
def test_mxfp4_few_rows_run_transposed(device, monkeypatch, m, n, k, fused, computed, bn):
    # 16-row tiles against 64- and 256-row weight tiles: the weight is the MMA's A side and the
    # accumulator is [BLOCK_N, BLOCK_M] (scaled_dot_t); the interpreter otherwise runs only the
    # first (64 x 64) config.  Masked rows and columns on both sides of the transposed store;
    # table rows computed or gathered, scale words (K a multiple of 128) or bytes (K = 160).
    tuner = kern._mxfp4_gemm_kernel
    monkeypatch.setattr(tuner, "configs", [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "GROUP_M": 8,
                                                          "COMPUTED_TABLE": computed},
                                                         num_warps=4 if bn < 256 else 8, num_stages=4)])
    monkeypatch.setattr(tuner, "cache", {})
    g = _gen(m + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, ws, _ = random_fp4(n, k, g, device)
    y = kern.scaled_gemm(x, w, ws, "mxfp4", None, fused_quant=fused)
    assert_fp4_close(y, x, w, ws, "mxfp4", None)


def _force_config(monkeypatch, tuner, **kwargs):
    warps = kwargs.pop("num_warps", 4)
    monkeypatch.setattr(tuner, "configs", [triton.Config(dict(GROUP_M=8, **kwargs), num_warps=warps, num_stages=3)])
    monkeypatch.setattr(tuner, "cache", {})


@pytest.mark.parametrize("m, n, k, fused, bm, bn", [
    (1, 64, 128, True, 16, 64), (5, 70, 300, True, 16, 64), (17, 130, 384, False, 16, 128),
    (40, 64, 256, False, 64, 64), (3, 300, 200, True, 16, 128)])
def test_fp8_few_rows_run_transposed(device, monkeypatch, m, n, k, fused, bm, bn):
    # FP8_T: the weight tile is the MMA's A side, the accumulator [BLOCK_N, BLOCK_M]; masked
    # rows and columns on both sides of the transposed store, K not a multiple of 128.
    _force_config(monkeypatch, kern._scaled_gemm_kernel, BLOCK_M=bm, BLOCK_N=bn, FP8_T=True)
    g = _gen(m + n + k)
    x = (torch.randn(m, k, generator=g) * 4).to(torch.bfloat16).to(device)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((_cdiv(n, 128), _cdiv(k, 128)), g, device)
    y = kern.scaled_gemm(x, w, ws, "fp8", None, fused_quant=fused)
    assert_gemm_close(y, ref.fp8_linear(x, w, ws), ref.dequant_activation(x), ref.dequant_fp8_weight(w, ws))


@pytest.mark.parametrize("fmt, m, n, k, fused, bm, bn, transposed, split", [
    ("fp8", 1, 64, 384, True, 16, 64, True, 2),     # 3 K blocks over 2 splits: 2 + 1
    ("fp8", 5, 70, 300, True, 16, 32, False, 4),    # 3 K blocks over 4 splits: the last one empty
    ("fp8", 3, 200, 256, True, 16, 128, True, 8),   # 2 K blocks over 8 splits: six empty
    ("fp8", 40, 130, 1000, False, 64, 64, False, 8),
    ("nvfp4", 7, 96, 512, True, 16, 32, False, 2)])  # the global scale applied once, after the sum
def test_split_k_matches_oracle_and_leaves_counters_zero(device, monkeypatch, fmt, m, n, k, fused, bm, bn,
                                                         transposed, split):
    # Split K: every split stores its partial tile and the last to arrive adds them in split
    # order, so two calls give the same bits, and the arrival counters are zero after each call.
    kwargs = dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split)
    if transposed:
        kwargs["FP8_T"] = True
    _force_config(monkeypatch, kern._scaled_gemm_kernel, **kwargs)
    g = _gen(m + n + k + split)
    x = (torch.randn(m, k, generator=g) * 4).to(torch.bfloat16).to(device)
    if fmt == "fp8":
        w = random_fp8((n, k), g, device)
        ws = random_e8m0((_cdiv(n, 128), _cdiv(k, 128)), g, device)
        gs, oracle, wd = None, ref.fp8_linear(x, w, ws), ref.dequant_fp8_weight(w, ws)
    else:
        w, ws, gs = random_fp4(n, k, g, device, fmt)
        oracle, wd = ref.fp4_linear(x, w, ws, fmt, gs), ref.dequant_fp4_weight(w, ws, fmt, gs)
    y = kern.scaled_gemm(x, w, ws, fmt, gs, fused_quant=fused)
    assert_gemm_close(y, oracle, ref.dequant_activation(x), wd)
    counters = kern._split_workspaces[next(iter(kern._split_workspaces))][1]
    assert int(counters.abs().sum()) == 0
    assert torch.equal(kern.scaled_gemm(x, w, ws, fmt, gs, fused_quant=fused), y)
    assert int(counters.abs().sum()) == 0


def test_split_k_is_tried_only_for_few_rows_and_few_column_tiles():
    configs = kern._fp8_gemm_configs()  # (the interpreter's tuner keeps the first one only)
    kept = lambda m, n: {c.kwargs.get("SPLIT_K", 1) for c in kern._prune_gemm(configs, {"M_BUCKET": m, "N": n})}
    assert kept(1, 1536) == {1, 2, 4, 8} and kept(64, 512) == {1, 2, 4, 8}
    assert kept(128, 1536) == {1} and kept(1, 24576) == {1}


@pytest.mark.parametrize("e_lo, e_hi, x_scale", [(-104, -100, 1e3), (96, 100, 1e-3), (-127, -127, 1e3)])
def test_fp4_extreme_scale_exponents(device, e_lo, e_hi, x_scale):
    # Tiny and huge E8M0 scales, down to byte 0 (2^-127, an FP32 subnormal); the products and
    # the results stay normal FP32 numbers (see reference/gemm.py).
    g = _gen(5)
    x = (torch.randn(20, 256, generator=g) * x_scale).to(torch.bfloat16).to(device)
    w, _, _ = random_fp4(24, 256, g, device)
    ws = random_e8m0((24, 8), g, device, e_lo, e_hi)
    for fused in (True, False):
        y = kern.scaled_gemm(x, w, ws, "mxfp4", None, fused_quant=fused)
        assert_fp4_close(y, x, w, ws, "mxfp4", None, what=f"exponents {e_lo}..{e_hi}")


@pytest.mark.parametrize("e_lo, e_hi", [(-100, -96), (90, 94)])
def test_fp8_extreme_scale_exponents(device, e_lo, e_hi):
    g = _gen(6)
    x = torch.randn(20, 256, generator=g).to(torch.bfloat16).to(device)
    w = random_fp8((24, 256), g, device)
    ws = random_e8m0((1, 2), g, device, e_lo, e_hi)
    y = _triton(ops.fp8_linear, x, w, ws)
    assert_gemm_close(y, ref.fp8_linear(x, w, ws), ref.dequant_activation(x), ref.dequant_fp8_weight(w, ws))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy: a non-finite row times 0
@pytest.mark.parametrize("fused", [True, False])
def test_nan_inf_zero_blocks_propagate_like_oracle(device, fused):
    g = _gen(7)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    x[0, 3] = float("nan")  # a NaN block: row 0 NaN
    x[1, 130] = float("-inf")  # an infinite block: row 1 NaN
    x[2] = 0.0  # an all-zero row: zeros (and NaN only in poisoned columns)
    x = x.to(device)
    w8 = random_fp8((160, 256), g, "cpu")
    if device.type == "cuda":  # the interpreter decodes the FP8 NaN byte 0x7F as a number
        w8.view(torch.uint8)[7, 9] = 0x7F  # a NaN weight: column 7 NaN
    ws8 = random_e8m0((2, 2), g, "cpu")
    ws8.view(torch.uint8)[1, 1] = 0xFF  # an E8M0 NaN: columns 128.. NaN
    w8, ws8 = w8.to(device), ws8.to(device)
    y = kern.scaled_gemm(x, w8, ws8, "fp8", None, fused_quant=fused)
    assert_gemm_close(y, ref.fp8_linear(x, w8, ws8), ref.dequant_activation(x), ref.dequant_fp8_weight(w8, ws8))
    w4, ws4, _ = random_fp4(40, 256, g, "cpu")
    w4[:, 64:80] = 0  # an all-zero 32-block ...
    ws4.view(torch.uint8)[:, 4] = 1  # ... with the tiniest scale
    ws4.view(torch.uint8)[11, 6] = 0xFF  # an E8M0 NaN: column 11 NaN
    w4, ws4 = w4.to(device), ws4.to(device)
    y = kern.scaled_gemm(x, w4, ws4, "mxfp4", None, fused_quant=fused)
    assert_fp4_close(y, x, w4, ws4, "mxfp4", None)
    assert bool(torch.isnan(y[:2]).all()) and bool(torch.isnan(y[:, 11]).all())
    assert bool((y[2, :11] == 0).all())


# Position p of a 128-block -> the element it holds, for each fp16 order of the pre-pass.
FP16_ORDERS = {
    # elements 1 and 2 of every four swapped (mma.sync B fragments)
    "fp16_pairs": [4 * (p // 4) + [0, 2, 1, 3][p % 4] for p in range(128)],
    # run s = p // 16 of a warp-group MMA's k slots: slot 2q + r1 holds element 32q + 4s + 2r1,
    # slot 8 + 2q + r1 element 32q + 4s + 1 + 2r1
    "mma_slots": [32 * ((p % 8) // 2) + 4 * (p // 16) + 2 * (p % 2) + (p % 16) // 8 for p in range(128)],
}


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy: the FP8 NaN byte
@pytest.mark.parametrize("order", sorted(FP16_ORDERS))
def test_act_quant_fp16_orders_are_the_codes_reordered(device, order):
    # The pre-pass forms the CUDA decode GEMMs read: each code's value as fp16 (exact), in the
    # kernel's order; the same scales.  (The interpreter reads the FP8 NaN byte as a number,
    # so NaN codes are compared on a GPU only; their block's scale is NaN anyway.)
    x = (torch.randn(3, 300, generator=_gen(12)) * 5).to(torch.bfloat16)
    x[1, 7] = float("nan")
    x = x.to(device)
    q, s = kern.act_quant_rows(x)
    q16, s16 = kern.act_quant_rows(x, **{order: True})
    assert q16.dtype == torch.float16 and q16.shape == q.shape
    assert torch.equal(s16.isnan(), s.isnan()) and torch.equal(s16[~s.isnan()], s[~s.isnan()])
    expect = q.view(torch.float8_e4m3fn).to(torch.float16).view(3, -1, 128)[:, :, FP16_ORDERS[order]].reshape(q.shape)
    known = ~expect.isnan() if device.type == "cpu" else torch.ones_like(expect, dtype=torch.bool)
    assert torch.equal(q16.view(torch.int16)[known], expect.view(torch.int16)[known]) or \
        torch.equal(q16[known].isnan(), expect[known].isnan()) and \
        torch.equal(q16[known].nan_to_num(), expect[known].nan_to_num())


def test_act_quant_takes_one_fp16_order():
    with pytest.raises(ValueError, match="fp16_pairs and mma_slots"):
        kern.act_quant_rows(torch.zeros(1, 128, dtype=torch.bfloat16), fp16_pairs=True, mma_slots=True)


def test_zero_rows_return_empty(device):
    x = torch.zeros(0, 256, dtype=torch.bfloat16, device=device)
    w, ws, _ = random_fp4(8, 256, _gen(8), device)
    assert _triton(ops.fp4_linear, x, w, ws).shape == (0, 8)
    assert _triton(ops.grouped_linear, torch.zeros(0, 2, 8, dtype=torch.bfloat16, device=device),
                   torch.zeros(2, 4, 8, dtype=torch.bfloat16, device=device)).shape == (0, 2, 4)


@given(t=st.integers(1, 70), grp=st.integers(1, 4), n=st.integers(1, 100), k=st.integers(1, 200),
       transposed=st.booleans(), seed=st.integers(0, 2**31))
def test_grouped_linear_matches_oracle(device, t, grp, n, k, transposed, seed):
    g = _gen(seed)
    if transposed:  # x arrives as a permuted view, as the attention output does
        x = torch.randn(grp, t, k, generator=g).to(torch.bfloat16).to(device).transpose(0, 1)
    else:
        x = torch.randn(t, grp, k, generator=g).to(torch.bfloat16).to(device)
    w = torch.randn(grp, n, k, generator=g).to(torch.bfloat16).to(device)
    y = _triton(ops.grouped_linear, x, w)
    assert y.shape == (t, grp, n) and y.dtype == torch.bfloat16
    oracle = ref.grouped_linear(x, w)
    for j in range(grp):
        assert_gemm_close(y[:, j], oracle[:, j], x[:, j].float(), w[j].float(), what=f"group {j}")


def test_grouped_linear_tile_order_covers_every_tile(device):
    """More row tiles than a band of the tile order holds (with a short last band) and several
    column tiles: every output tile is written once, by the right program."""
    from dsv4_triton.kernels.gemm import GROUPED_LINEAR_BAND

    g = _gen(5)
    t = 64 * (GROUPED_LINEAR_BAND + 1) + 5
    x = torch.randn(t, 2, 16, generator=g).to(torch.bfloat16).to(device)
    w = torch.randn(2, 130, 16, generator=g).to(torch.bfloat16).to(device)
    y = _triton(ops.grouped_linear, x, w)
    oracle = ref.grouped_linear(x, w)
    for j in range(2):
        assert_gemm_close(y[:, j], oracle[:, j], x[:, j].float(), w[j].float(), what=f"group {j}")


# --- sm_90 compilation (no GPU needed) -------------------------------------------------------

# The block-scaled GEMM at the prefill configs, with the launcher's argument types (FP8 codes
# typed FP8): both operands must go from the asynchronous copies straight to the tensor cores.
GEMM_CONSTS = dict(A_QUANT=False, W_FMT=0, SCALE_FP32=False, HAS_GLOBAL=False, BLOCK_K=128, GROUP_M=8,
                   SCALE_WORDS=False, COMPUTED_TABLE=False, FP8_T=False, SPLIT_K=1)
GEMM_TYPES = dict(a_ptr="*fp8e4nv", a_scale_ptr="*fp32", w_ptr="*fp8e4nv", w_scale_ptr="*u8",
                  global_scale_ptr="*u8", y_ptr="*bf16", count_ptr="*i32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("config", [(128, 128, 8, 4), (64, 128, 4, 4)])
def test_fp8_gemm_compiles_for_sm90_with_operands_in_shared_memory(config):
    bm, bn, warps, stages = config
    usage = compile_for_sm90("dsv4_triton.kernels.gemm", "_scaled_gemm_kernel", GEMM_TYPES,
                             dict(GEMM_CONSTS, BLOCK_M=bm, BLOCK_N=bn),
                             ["K", "N", "stride_am", "stride_wn", "stride_ym"], warps, stages)
    assert usage["stack"] == 0 and usage["pipelined"] and usage["tensor_core_dot"], usage
    assert usage["tile_reloads"] == 0, usage
    # The promotion: one FMA per accumulator element per K block, and nothing else per element.
    per_thread = bm * bn // (32 * warps)
    assert usage["fma"] == per_thread and usage["mul"] < per_thread, usage


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("bn, split", [(64, 1), (128, 1), (64, 4)])
def test_fp8_transposed_decode_gemm_compiles_to_warp_group_mma(bn, split):
    # 16 rows, fused activation quantisation, FP8_T: an FP8 warp-group MMA with the weight
    # tile from shared memory as its A side (the rows were an FP16 mma.sync before), split or not.
    usage = compile_for_sm90("dsv4_triton.kernels.gemm", "_scaled_gemm_kernel", dict(GEMM_TYPES, a_ptr="*bf16"),
                             dict(GEMM_CONSTS, A_QUANT=True, BLOCK_M=16, BLOCK_N=bn, FP8_T=True, SPLIT_K=split),
                             ["K", "N", "stride_am", "stride_wn", "stride_ym"], 4, 4)
    assert usage["stack"] == 0 and usage["pipelined"] and usage["tensor_core_dot"], usage


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_mxfp4_decode_gemm_compiles_to_warp_group_mma():
    # 16 rows, fused activation quantisation (decode): FP8 warp-group MMA with the expanded
    # weight as its register A operand, no spills.
    usage = compile_for_sm90("dsv4_triton.kernels.gemm", "_mxfp4_gemm_kernel",
                             dict(GEMM_TYPES, a_ptr="*bf16", w_ptr="*u8", lut_ptr="*i32"),
                             dict(GEMM_CONSTS, A_QUANT=True, W_FMT=1, BLOCK_M=16, BLOCK_N=64, SCALE_WORDS=True,
                                  COMPUTED_TABLE=True),
                             ["K", "N", "stride_am", "stride_wn", "stride_sn", "stride_ym"], 4, 4)
    assert usage["stack"] == 0 and usage["pipelined"] and usage["tensor_core_dot"], usage


# Appended to the sm_90 compile script: the plain (synchronous) global loads of the K loop
# (the first scf.for of the TTGIR) whose value the same iteration uses, i.e. that a K step
# waits for; a load consumed only by the loop's yield is issued one step ahead.
_K_LOOP_WAITS = r"""
lines = ttgir.splitlines()
start = next(i for i, line in enumerate(lines) if " scf.for " in line)
indent = len(lines[start]) - len(lines[start].lstrip())
end = next(i for i in range(start + 1, len(lines))
           if lines[i].startswith(" " * indent + "}") and len(lines[i]) - len(lines[i].lstrip()) == indent)
body = lines[start + 1:end]
loads = [re.match(r"\s*(%[\w.]+) = tt.load ", line).group(1) for line in body if " = tt.load " in line]
used = lambda v, line: re.search(re.escape(v) + r"(?![\w.])", line) and not line.lstrip().startswith(v + " =")
waited = [v for v in loads if any(used(v, line) for line in body if "scf.yield" not in line)]
print(json.dumps(dict(loads=loads, waited=waited)))
"""


def k_loop_waits(module, kernel, types, consts, aligned, warps, stages):
    """(plain loads in the K loop, those a K step waits for) of a kernel compiled for sm_90."""
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parent.parent)
    run = subprocess.run([sys.executable, "-c", SM90_COMPILE + _K_LOOP_WAITS,
                          json.dumps([module, kernel, types, consts, aligned, warps, stages])],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["loads"], result["waited"]


MXFP4_DECODE_TYPES = dict(GEMM_TYPES, a_ptr="*bf16", w_ptr="*u8", lut_ptr="*i32")
MXFP4_GEMM_ALIGNED = ["K", "N", "stride_am", "stride_sm", "stride_wn", "stride_sn", "stride_ym"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("bm, bn, warps, stages, fused, computed", [
    (16, 64, 4, 4, True, True), (128, 128, 8, 3, False, True), (16, 64, 4, 4, True, False)])
def test_mxfp4_k_loop_waits_on_no_load_of_its_own_step(bm, bn, warps, stages, fused, computed):
    # Computed table rows and scale words: the scale bytes are asynchronous copies with the
    # weight tile, and the pre-pass activation scales (not fused) are loaded a step ahead, so a
    # K step waits on no plain load.  The gathered form waits for its scale bytes every step.
    types = MXFP4_DECODE_TYPES if fused else dict(MXFP4_DECODE_TYPES, a_ptr="*fp8e4nv")
    consts = dict(GEMM_CONSTS, A_QUANT=fused, W_FMT=1, BLOCK_M=bm, BLOCK_N=bn, SCALE_WORDS=True,
                  COMPUTED_TABLE=computed)
    loads, waited = k_loop_waits("dsv4_triton.kernels.gemm", "_mxfp4_gemm_kernel", types, consts,
                                 MXFP4_GEMM_ALIGNED, warps, stages)
    if computed:
        assert waited == [] and len(loads) == (0 if fused else 1), loads
    else:
        assert waited, "the gathered form's scale bytes are expected to be a plain load of the step"


# --- GPU: real shapes ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 65, 4096])
@pytest.mark.parametrize("n, k", [(7168, 1536), (1536, 7168), (24576, 7168), (512, 7168)])
def test_fp8_linear_real_shapes(device, m, n, k):
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((_cdiv(n, 128), _cdiv(k, 128)), g, device)
    y = _triton(ops.fp8_linear, x, w, ws)
    assert_gemm_close(y, ref.fp8_linear(x, w, ws), ref.dequant_activation(x), ref.dequant_fp8_weight(w, ws))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=64, FP8_T=True), dict(BLOCK_M=16, BLOCK_N=128, FP8_T=True),
                                    dict(BLOCK_M=16, BLOCK_N=64, FP8_T=True, SPLIT_K=8),
                                    dict(BLOCK_M=16, BLOCK_N=64, FP8_T=True, SPLIT_K=4),
                                    dict(BLOCK_M=16, BLOCK_N=128, FP8_T=True, SPLIT_K=2),
                                    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=8),
                                    dict(BLOCK_M=64, BLOCK_N=64, FP8_T=True, SPLIT_K=4)])
@pytest.mark.parametrize("m", [1, 16, 40])
@pytest.mark.parametrize("n, k", [(7168, 1536), (1536, 7168), (512, 7168)])
def test_fp8_decode_configs_real_shapes(device, monkeypatch, config, m, n, k):
    # The decode configs the tuner may pick beyond the first one (the suite otherwise runs
    # the first config only): transposed tiles and split K, fused and pre-pass activations.
    if config["BLOCK_M"] > max(16, m):
        pytest.skip("the tuner tries this tile from 17 rows on")
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w = random_fp8((n, k), g, device)
    ws = random_e8m0((_cdiv(n, 128), _cdiv(k, 128)), g, device)
    _force_config(monkeypatch, kern._scaled_gemm_kernel, **config)
    for fused in (True, False) if m <= 16 else (False,):
        y = kern.scaled_gemm(x, w, ws, "fp8", None, fused_quant=fused)
        assert_gemm_close(y, ref.fp8_linear(x, w, ws), ref.dequant_activation(x), ref.dequant_fp8_weight(w, ws),
                          what=f"fused={fused}")


@pytest.mark.gpu
def test_fp8_split_k_replays_in_a_cuda_graph(device, monkeypatch):
    # The split path's counters are left zero by every launch, so graph replays (new inputs
    # in the same buffers) give the eager results bit for bit.
    _force_config(monkeypatch, kern._scaled_gemm_kernel, BLOCK_M=16, BLOCK_N=64, FP8_T=True, SPLIT_K=8)
    g = _gen(7)
    x = torch.randn(3, 7168, generator=g).to(torch.bfloat16).to(device)
    w = random_fp8((1536, 7168), g, device)
    ws = random_e8m0((12, 56), g, device)
    kern.scaled_gemm(x, w, ws, "fp8", None)  # compiles and sizes the workspace outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kern.scaled_gemm(x, w, ws, "fp8", None)
    for i in range(3):
        x.copy_(torch.randn(3, 7168, generator=_gen(i)).to(torch.bfloat16))
        graph.replay()
        assert torch.equal(y, kern.scaled_gemm(x, w, ws, "fp8", None)), f"replay {i}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 64, 4096])
@pytest.mark.parametrize("n, k", [(7168, 1536), (3072, 7168)])
def test_fp4_linear_real_shapes(device, fmt, m, n, k):
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, ws, gs = random_fp4(n, k, g, device, fmt)
    y = _triton(ops.fp4_linear, x, w, ws, fmt, gs)
    assert_fp4_close(y, x, w, ws, fmt, gs)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 6), (16, 32, 4, 4), (16, 128, 8, 4),
                                    (16, 256, 8, 3)])
@pytest.mark.parametrize("m", [1, 16, 40])
@pytest.mark.parametrize("n, k", [(7168, 1536), (3072, 7168)])
def test_mxfp4_decode_configs_real_shapes(device, monkeypatch, config, m, n, k):
    # The decode configs the tuner may pick (the suite otherwise runs the first config only):
    # transposed warp-group tiles, and a 32-column tile that stays an mma.sync.  Table rows
    # computed and gathered give the same operand, so the same bits.
    bm, bn, warps, stages = config
    tuner = kern._mxfp4_gemm_kernel
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, ws, _ = random_fp4(n, k, g, device)
    for fused in (True, False):
        results = []
        for computed in (True, False):
            monkeypatch.setattr(tuner, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8,
                                                                  "COMPUTED_TABLE": computed},
                                                                 num_warps=warps, num_stages=stages)])
            monkeypatch.setattr(tuner, "cache", {})
            results.append(kern.scaled_gemm(x, w, ws, "mxfp4", None, fused_quant=fused))
        assert_gemm_close(results[0], ref.fp4_linear(x, w, ws, "mxfp4", None), ref.dequant_activation(x),
                          ref.dequant_fp4_weight(w, ws, "mxfp4", None), what=f"fused={fused}")
        assert torch.equal(results[0], results[1]), f"fused={fused}: computed and gathered table rows differ"


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_grouped_linear_real_shapes(device, t):
    g = _gen(t)
    x = torch.randn(16, t, 4096, generator=g).to(torch.bfloat16).to(device).transpose(0, 1)  # Pro wo_a
    w = torch.randn(16, 1024, 4096, generator=g).to(torch.bfloat16).to(device) * 0.02
    y = _triton(ops.grouped_linear, x, w)
    oracle = ref.grouped_linear(x, w)
    for j in (0, 15):
        assert_gemm_close(y[:, j], oracle[:, j], x[:, j].float(), w[j].float(), what=f"group {j}")


# --- MXFP4 re-encoded as FP8 blocks (the operands of the CUDA prefill path) -----------------

def random_block_exponents(nb, kb, g, spread, base, nan_blocks=0):
    """E8M0 bytes ``[128 nb, 4 kb]``: per 128 x 128 block, exponents in [b, b + spread] around a
    block's own ``base`` offset (so blocks differ), ``nan_blocks`` random 32-blocks 0xFF."""
    e = torch.randint(0, spread + 1, (128 * nb, 4 * kb), generator=g)
    offsets = torch.randint(0, 12, (nb, kb), generator=g).repeat_interleave(128, 0).repeat_interleave(4, 1)
    e = (e + offsets + base).clamp(0, 254)
    for _ in range(nan_blocks):
        e[torch.randint(0, 128 * nb, (1,), generator=g), torch.randint(0, 4 * kb, (1,), generator=g)] = 0xFF
    return e.to(torch.uint8).view(torch.float8_e8m0fnu)


def block_spread_error(ws: torch.Tensor) -> torch.Tensor:
    """Per weight element, the largest error of the FP8-block re-encoding: 0 where the element's
    exponent is within 14 binades of its 128 x 128 block's largest (exact), else half the E4M3
    step at the block scale: 2^(b - 127 - 10) with the block byte b = max(e_max - 6, 0)."""
    e = ws.view(torch.uint8).long().cpu()
    e = torch.where(e == 0xFF, torch.zeros_like(e), e)
    n, nsub = e.shape
    e_max = e.reshape(n // 128, 128, nsub // 4, 4).amax(dim=(1, 3))
    b = (e_max - 6).clamp(min=0)
    e_max_at = e_max.repeat_interleave(128, 0).repeat_interleave(4, 1)
    b_at = b.repeat_interleave(128, 0).repeat_interleave(4, 1)
    err = torch.where(e_max_at - e > 14, torch.pow(2.0, (b_at - 137).double()), torch.zeros(()).double())
    return err.repeat_interleave(32, 1)


def test_fp8_block_reencoding_oracle_is_exact_within_14_binades():
    # The oracle against the MXFP4 dequantisation: equal element for element while every
    # block's exponents span <= 14 binades (with tiny exponents: the block byte clamps at 0),
    # off by at most half an E4M3 step at the block scale beyond; NaN scale bytes give NaN.
    g = _gen(1)
    for spread, base in ((0, 120), (14, 100), (14, 0), (3, 0), (30, 90)):
        w = torch.randint(0, 256, (256, 192), generator=g, dtype=torch.int32).to(torch.uint8)
        ws = random_block_exponents(2, 3, g, spread, base, nan_blocks=2)
        codes, scales = ref.mxfp4_as_fp8_blocks(w, ws)
        got = ref.dequant_fp8_weight(codes, scales).double()
        want = ref.dequant_fp4_weight(w, ws, "mxfp4", None).double()
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        err = (got - want).nan_to_num().abs()
        bound = block_spread_error(ws)
        assert bool((err <= bound).all()), (spread, base)
        if spread <= 14 - 11:  # offsets add up to 11 binades between a block's rows
            assert float(err.max()) == 0.0


@given(nb=st.integers(1, 3), kb=st.integers(1, 3), spread=st.sampled_from([0, 5, 14, 20, 40]),
       base=st.sampled_from([0, 3, 60, 110, 200]), seed=st.integers(0, 2**31))
def test_mxfp4_to_fp8_blocks_is_bit_exact(device, nb, kb, spread, base, seed):
    g = _gen(seed)
    w = torch.randint(0, 256, (128 * nb, 64 * kb), generator=g, dtype=torch.int32).to(torch.uint8)
    ws = random_block_exponents(nb, kb, g, spread, base, nan_blocks=seed % 3)
    codes, scales = kern.mxfp4_to_fp8_blocks(w.to(device), ws.to(device))
    want_codes, want_scales = ref.mxfp4_as_fp8_blocks(w, ws)
    assert codes.shape == (128 * nb, 128 * kb) and scales.dtype == torch.float8_e8m0fnu
    assert torch.equal(scales.view(torch.uint8).cpu(), want_scales.view(torch.uint8))
    got = codes.view(torch.uint8).cpu()
    assert torch.equal(got, want_codes.view(torch.uint8)), (got != want_codes.view(torch.uint8)).nonzero()[:5].tolist()


# --- NVFP4 at prefill sizes: the weight expanded to BF16, then a BF16 GEMM ---------------

def test_nvfp4_to_bf16_is_exact(device):
    g = _gen(2)
    w, s, _ = random_fp4(70, 160, g, device, "nvfp4")
    s = s.view(torch.uint8).clone()
    s[3, 2] = 0x7F  # an E4M3 NaN scale
    s[4, 0] = 0x01  # the smallest subnormal scale
    s[5, 1] = 0x7E  # the largest, 448
    s = s.view(torch.float8_e4m3fn)
    got = kern.nvfp4_to_bf16(w, s).float().cpu()
    want = ref.dequant_fp4_weight(w.cpu(), s.cpu(), "nvfp4", torch.tensor(1.0))
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@given(m=st.integers(1, 70), n=st.integers(1, 100), k16=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_nvfp4_expanded_gemm_matches_oracle(device, m, n, k16, seed):
    # K any multiple of 16 (the activation blocks' last one short), odd M and N.
    x, w, s, gs = random_fp4_linear_case(m, n, 16 * k16, seed, device, "nvfp4")
    y = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    kern.nvfp4_expanded_gemm(x, w, s, gs, y)
    assert_fp4_close(y, x, w, s, "nvfp4", gs)


def test_nvfp4_prefill_rows_take_the_bf16_route(device, monkeypatch):
    calls = []
    monkeypatch.setattr(kern, "NVFP4_EXPAND_MIN_ROWS", 20)
    real = kern.nvfp4_expanded_gemm
    monkeypatch.setattr(kern, "nvfp4_expanded_gemm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    g = _gen(3)
    w, s, gs = random_fp4(40, 128, g, device, "nvfp4")
    for m in (19, 20):
        x = torch.randn(m, 128, generator=g).to(torch.bfloat16).to(device)
        y = _triton(ops.fp4_linear, x, w, s, "nvfp4", gs)
        assert_fp4_close(y, x, w, s, "nvfp4", gs)
    assert calls == [20]
