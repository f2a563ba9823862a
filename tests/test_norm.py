"""rms_norm and rms_norm_act_quant: Triton against the FP32 oracles."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.reference import norm as ref
from dsv4_triton.reference import quant as ref_quant
from helpers import ULP, assert_close, assert_same_bits

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _run_triton(*args, **kw):
    with use_backend("triton"):
        return ops.rms_norm(*args, **kw)


@given(rows=st.integers(0, 9), n=st.integers(1, 700), dtype=st.sampled_from(DTYPES),
       weighted=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**31))
def test_rms_norm_matches_oracle(device, rows, n, dtype, weighted, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * scale).to(dtype).to(device)
    w = torch.randn(n, generator=g).to(dtype).to(device) if weighted else None
    y = _run_triton(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    # Both compute in FP32 and round once; rsqrt.approx adds ~2 FP32 ulps.
    assert_close(y, ref.rms_norm(x, w, 1e-6), rtol=ULP[dtype] + 1e-5, atol=1e-6, what="rms_norm")


@given(n=st.sampled_from([16385, 20000]), seed=st.integers(0, 2**31))
def test_rms_norm_long_rows_take_the_two_pass_path(device, n, seed):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(device)
    assert_close(_run_triton(x), ref.rms_norm(x, None, 1e-6), rtol=ULP[torch.bfloat16] + 1e-5, atol=1e-6)


def test_rms_norm_strided_and_3d_input(device):
    base = torch.randn(5, 7, 2 * 96, device=device)
    x = base[:, :, ::2]  # non-unit last stride
    assert_close(_run_triton(x), ref.rms_norm(x, None, 1e-6), rtol=1e-5, atol=1e-6)
    x = base.transpose(0, 1)[..., :96]  # permuted leading dims
    assert_close(_run_triton(x), ref.rms_norm(x, None, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_nan_inf_propagate_like_oracle(device):
    x = torch.randn(4, 64, device=device)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, :] = 0.0
    assert_close(_run_triton(x), ref.rms_norm(x, None, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, err", [
    (dict(x=torch.zeros(4, 8, dtype=torch.int32)), TypeError),
    (dict(x=torch.zeros(4, 8), weight=torch.zeros(9)), ValueError),
    (dict(x=torch.zeros(4, 8), eps=0.0), ValueError),
    (dict(x=torch.zeros(4, 8), weight=torch.zeros(8, dtype=torch.int64)), TypeError),
])
def test_rms_norm_bad_input(bad, err):
    with pytest.raises(err, match="x|weight|eps"):
        ops.rms_norm(**bad)


# --- rms_norm_act_quant --------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's numpy, on the NaN rows
@pytest.mark.filterwarnings("ignore:invalid value encountered")
@given(rows=st.integers(0, 9), kb=st.integers(1, 5), dtype=st.sampled_from(DTYPES), weighted=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), poison=st.sampled_from(["none", "nan", "inf", "zero row"]),
       seed=st.integers(0, 2**31))
def test_rms_norm_act_quant_is_the_norm_then_act_quant(device, rows, kb, dtype, weighted, scale, poison, seed):
    """y within rms_norm's tolerance of the oracle; codes and scales equal, bit for bit, what
    act_quant's oracle gives for the y returned (a NaN or Inf input makes its row NaN, the
    blocks NaN-coded with NaN scales, as the oracle does)."""
    n = 128 * kb
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * scale).to(dtype)
    if rows and poison != "none":
        x[-1] = 0.0 if poison == "zero row" else x[-1]
        x[0, n // 2] = {"nan": float("nan"), "inf": float("inf"), "zero row": 0.0}[poison]
    x = x.to(device)
    w = torch.randn(n, generator=g).to(dtype).to(device) if weighted else None
    with use_backend("triton"):
        y, q, s = ops.rms_norm_act_quant(x, w, 1e-6)
    assert y.dtype == dtype and q.dtype == torch.float8_e4m3fn and s.shape == (rows, kb)
    assert_close(y, ref.rms_norm(x, w, 1e-6), rtol=ULP[dtype] + 1e-5, atol=1e-6, what="rms_norm_act_quant y")
    q_ref, s_ref = ref_quant.act_quant(y, 128, True)
    assert_same_bits(q, q_ref, "codes")
    assert_same_bits(s, s_ref, "scales")


def test_rms_norm_act_quant_long_rows_and_leading_dims(device):
    """Rows wider than one chunk take the two-pass path, whose chunks store their own blocks;
    leading dims and strides are kept as rms_norm keeps them."""
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(2, 16512, generator=g).to(torch.bfloat16).to(device),
              torch.randn(3, 2, 2 * 256, generator=g).to(torch.bfloat16).to(device)[..., ::2]):
        with use_backend("triton"):
            y, q, s = ops.rms_norm_act_quant(x)
        assert y.shape == q.shape == x.shape and s.shape == (*x.shape[:-1], x.shape[-1] // 128)
        assert_close(y, ref.rms_norm(x, None, 1e-6), rtol=ULP[torch.bfloat16] + 1e-5, atol=1e-6)
        q_ref, s_ref = ref_quant.act_quant(y, 128, True)
        assert_same_bits(q, q_ref, "codes")
        assert_same_bits(s, s_ref, "scales")


def test_rms_norm_act_quant_reference_composes_the_oracles():
    x = torch.randn(4, 256).to(torch.bfloat16)
    w = torch.randn(256).to(torch.bfloat16)
    y, q, s = ref.rms_norm_act_quant(x, w, 1e-6)
    assert torch.equal(y, ref.rms_norm(x, w, 1e-6))
    q_ref, s_ref = ref_quant.act_quant(y, 128, True)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_rms_norm_act_quant_traces_under_torch_compile():
    x, w = torch.randn(3, 256), torch.randn(256)
    result = torch.library.opcheck(torch.ops.dsv4.rms_norm_act_quant, (x, w, 1e-6), test_utils=("test_faketensor",))
    assert result == {"test_faketensor": "SUCCESS"}

    def f(x):
        y, q, s = ops.rms_norm_act_quant(x * 2.0, w)
        return y + 1.0, q, s

    got, expected = torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x)
    for a, e in zip(got, expected):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           e.view(torch.uint8) if e.dtype == torch.float8_e4m3fn else e)


@pytest.mark.parametrize("bad, err", [
    (dict(x=torch.zeros(4, 200)), ValueError),
    (dict(x=torch.zeros(4, 128, dtype=torch.int32)), TypeError),
    (dict(x=torch.zeros(4, 128), weight=torch.zeros(64)), ValueError),
    (dict(x=torch.zeros(4, 128), eps=-1.0), ValueError),
])
def test_rms_norm_act_quant_bad_input(bad, err):
    with pytest.raises(err, match=r"^(x|weight|eps):"):
        ops.rms_norm_act_quant(**bad)
