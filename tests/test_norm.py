"""rms_norm: Triton against the FP32 oracle."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.reference import norm as ref
from helpers import ULP, assert_close

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
