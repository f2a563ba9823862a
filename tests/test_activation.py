"""swiglu: Triton against the FP32 oracle, the oracle against SPEC 4."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.reference import activation as ref
from helpers import ULP, assert_close

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def test_swiglu_oracle_matches_spec_formula():
    gate = torch.tensor([-30.0, -1.0, 0.0, 0.5, 9.0, 10.0, 11.0, 1e30])
    up = torch.tensor([1.0, -12.0, 3.0, 0.25, 10.0, -10.5, 2.0, -1e30])
    g = torch.minimum(gate.double(), torch.tensor(10.0, dtype=torch.float64))
    u = up.double().clamp(-10.0, 10.0)
    want = g / (1 + torch.exp(-g)) * u
    assert_close(ref.swiglu(gate, up, 10.0, None), want, rtol=4 * 2.0 ** -24, atol=0.0)
    rows = torch.stack((gate, gate)), torch.stack((up, up))
    assert_close(ref.swiglu(*rows, 10.0, torch.tensor([0.5, -3.0])), torch.stack((want * 0.5, want * -3.0)),
                 rtol=4 * 2.0 ** -24, atol=0.0)


def _triton(*args, **kw):
    with use_backend("triton"):
        return ops.swiglu(*args, **kw)


# The kernel uses the GPU's fast FP32 exp and division (~2 ulp each) and exp(-g) carries a
# further ~|g| * 2^-24 relative error from its range reduction: for g >= -20 that is
# < 2^-19 relative in total.  Below g = -20 the product is < 20 e^-20 |u w| ~ 1e-7 and its
# absolute error far below ATOL.  Output rounding adds one ulp of the output dtype
# (fp16 subnormals have an absolute spacing of 2^-24).
RTOL = {dt: ULP[dt] + 2.0 ** -19 for dt in DTYPES}
ATOL = {torch.bfloat16: 1e-9, torch.float16: 2.0 ** -24, torch.float32: 1e-9}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy; inf is right
@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=2), n=st.integers(1, 700), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), limit=st.sampled_from([10.0, 0.5, float("inf")]),
       weight_form=st.sampled_from([None, "flat", "column", "lead"]), fused=st.booleans(), seed=st.integers(0, 2**31))
def test_swiglu_matches_oracle(device, lead, n, dtype, scale, limit, weight_form, fused, seed):
    g = torch.Generator().manual_seed(seed)
    if fused:  # gate and up as the two halves of one [..., 2n] projection, as the MoE produces them
        h = (torch.randn(*lead, 2 * n, generator=g) * scale).to(dtype).to(device)
        gate, up = h[..., :n], h[..., n:]
    else:
        gate = (torch.randn(*lead, n, generator=g) * scale).to(dtype).to(device)
        up = (torch.randn(*lead, n, generator=g) * scale).to(dtype).to(device)
    rows = gate.numel() // n
    weight = {None: None, "flat": (rows,), "column": (rows, 1), "lead": tuple(lead)}[weight_form]
    if weight is not None:
        weight = (torch.rand(weight, generator=g) * 4 - 2).to(device)
    y = _triton(gate, up, limit, weight)
    assert y.dtype == dtype and y.shape == gate.shape
    assert_close(y, ref.swiglu(gate, up, limit, weight), rtol=RTOL[dtype], atol=ATOL[dtype], what="swiglu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_saturates_at_limit(device, dtype):
    limit = 10.0
    gate = torch.tensor([[10.0, 11.0, 1e4, 3.0, 3.0, 3.0, 3.0, -10.0, -11.0]], device=device).to(dtype)
    up = torch.tensor([[1.0, 1.0, 1.0, 10.0, 10.5, -1e4, -10.0, 1.0, 1.0]], device=device).to(dtype)
    silu = lambda v: v / (1 + math.exp(-v))
    want = torch.tensor([[silu(10), silu(10), silu(10), silu(3) * 10, silu(3) * 10, silu(3) * -10, silu(3) * -10,
                          silu(-10), silu(-11)]], dtype=torch.float64)
    assert_close(_triton(gate, up, limit), want, rtol=RTOL[dtype], atol=ATOL[dtype], what="saturation")
    assert_close(_triton(gate, up, limit, torch.tensor([0.5], device=device)), want * 0.5,
                 rtol=RTOL[dtype], atol=ATOL[dtype], what="weighted saturation")


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy on -inf / inf
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_nan_inf_like_oracle(device, dtype):
    nan, inf = float("nan"), float("inf")
    gate = torch.tensor([[nan, 1.0, inf, -inf, 2.0, 2.0, -0.0, 0.0]], device=device).to(dtype)
    up = torch.tensor([[1.0, nan, 1.0, 1.0, inf, -inf, 1.0, -1.0]], device=device).to(dtype)
    y = _triton(gate, up, 10.0)
    # NaN in -> NaN out; +inf gate and +-inf up saturate; -inf gate gives -inf / inf = NaN (torch's silu too).
    assert torch.isnan(y[0, :2]).all() and torch.isfinite(y[0, 2]) and torch.isnan(y[0, 3])
    assert_close(y, ref.swiglu(gate, up, 10.0, None), rtol=RTOL[dtype], atol=ATOL[dtype])
    w = torch.tensor([nan], device=device)
    assert torch.isnan(_triton(gate, up, 10.0, w)).all()


def test_swiglu_zero_size_and_wide_rows(device):
    gate = torch.empty(0, 64, device=device)
    assert _triton(gate, gate, 10.0, torch.empty(0, device=device)).shape == (0, 64)
    gate, up = torch.randn(2, 9000, device=device), torch.randn(2, 9000, device=device)  # several column blocks
    assert_close(_triton(gate, up), ref.swiglu(gate, up, 10.0, None), rtol=RTOL[torch.float32], atol=1e-9)


@pytest.mark.parametrize("bad, err, name", [
    (dict(gate=torch.zeros(4, 8, dtype=torch.int32)), TypeError, "gate"),
    (dict(up=torch.zeros(4, 8, dtype=torch.bfloat16)), TypeError, "up"),
    (dict(up=torch.zeros(4, 9)), ValueError, "up"),
    (dict(limit=0.0), ValueError, "limit"),
    (dict(limit="10"), TypeError, "limit"),
    (dict(weight=torch.zeros(4, dtype=torch.bfloat16)), TypeError, "weight"),
    (dict(weight=torch.zeros(5)), ValueError, "weight"),
    (dict(weight=torch.zeros(1, 4)), ValueError, "weight"),
])
def test_swiglu_bad_input(bad, err, name):
    args = dict(gate=torch.zeros(4, 8), up=torch.zeros(4, 8), limit=10.0, weight=None)
    args.update(bad)
    with pytest.raises(err, match=name):
        ops.swiglu(**args)


def test_swiglu_traces_under_torch_compile():
    gate, up, w = torch.randn(3, 16), torch.randn(3, 16), torch.rand(3, 1)
    f = lambda a, b, c: ops.swiglu(a, b, 10.0, c)
    assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(gate, up, w), f(gate, up, w), 0.0, 0.0)


@pytest.mark.gpu
def test_swiglu_large_fused_halves(device):
    h = torch.randn(16384, 2 * 3072, device=device, generator=torch.Generator(device=device).manual_seed(0)) * 4
    h = h.to(torch.bfloat16)
    gate, up = h[:, :3072], h[:, 3072:]
    w = torch.rand(16384, 1, device=device)
    assert_close(_triton(gate, up, 10.0, w), ref.swiglu(gate, up, 10.0, w), rtol=RTOL[torch.bfloat16],
                 atol=ATOL[torch.bfloat16])
