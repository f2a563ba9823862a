"""rope_freqs, apply_rope, apply_rope_: Triton against the FP32 oracle, the oracle against SPEC 4."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.reference import rope as ref
from helpers import assert_close

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RELEASE_YARN = dict(factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)
TINY_YARN = dict(factor=16, original_max_position_embeddings=64, beta_fast=32, beta_slow=1)
# original 6 at R = 64, theta 1e4: both correction dims round to 0, so SPEC's high == low
# branch (high += 0.001) is taken.
DEGENERATE_YARN = dict(factor=4, original_max_position_embeddings=6, beta_fast=32, beta_slow=1)


def spec_table(rope_dim, max_pos, theta, yarn):
    """SPEC 4 evaluated directly in float64 Python: (cos, sin, angle) [max_pos, R/2] each."""
    half = rope_dim // 2
    freqs = [theta ** (-2 * i / rope_dim) for i in range(half)]
    if yarn is not None:
        def c(r):
            return rope_dim * math.log(yarn["original_max_position_embeddings"] / (2 * math.pi * r)) / (2 * math.log(theta))
        low = max(math.floor(c(yarn["beta_fast"])), 0)
        high = min(math.ceil(c(yarn["beta_slow"])), rope_dim - 1)
        if high == low:
            high += 0.001
        ramp = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(half)]
        freqs = [f / yarn["factor"] * r + f * (1 - r) for f, r in zip(freqs, ramp)]
    angle = torch.tensor([[p * f for f in freqs] for p in range(max_pos)], dtype=torch.float64)
    return angle.cos(), angle.sin(), angle


@pytest.mark.parametrize("rope_dim, theta, yarn", [
    (64, 10000.0, None), (64, 160000.0, RELEASE_YARN), (64, 160000.0, TINY_YARN),
    (64, 10000.0, DEGENERATE_YARN), (6, 500.0, None), (2, 10000.0, TINY_YARN),
])
def test_rope_freqs_oracle_matches_spec_formula(rope_dim, theta, yarn):
    max_pos = 3000
    table = ops.rope_freqs(rope_dim, max_pos, theta, yarn, device="cpu")
    assert table.shape == (max_pos, rope_dim // 2, 2) and table.dtype == torch.float32
    cos, sin, angle = spec_table(rope_dim, max_pos, theta, yarn)
    # The table's angle is pos * fp32(f_i) rounded to FP32: two relative roundings of 2^-24
    # of the angle, then cos/sin rounded to FP32 (2^-24 absolute at most).
    bound = 2 * angle.abs() * 2.0 ** -24 + 2.0 ** -24
    for got, want in ((table[..., 0], cos), (table[..., 1], sin)):
        excess = (got.double() - want).abs() - bound
        assert excess.max() <= 0, f"worst at {divmod(int(excess.argmax()), rope_dim // 2)}"


def test_rope_freqs_yarn_leaves_high_frequencies_and_divides_low_ones():
    plain = ops.rope_freqs(64, 2, 160000.0)
    scaled = ops.rope_freqs(64, 2, 160000.0, RELEASE_YARN)
    low, high = ref.yarn_ramp_range(64, 160000.0, 65536, 32, 1)
    assert (low, high) == (15.0, 25.0)  # SPEC 4 evaluated by hand for the release's config
    angle_plain = torch.atan2(plain[1, :, 1], plain[1, :, 0]).double()
    angle_scaled = torch.atan2(scaled[1, :, 1], scaled[1, :, 0]).double()
    assert torch.equal(angle_plain[:16], angle_scaled[:16])
    assert torch.allclose(angle_scaled[25:], angle_plain[25:] / 16, rtol=1e-6)


def _complex_rope(x, table, positions, inverse):
    """What a user writes: view the rotated dims as complex numbers and multiply."""
    rope_dim = 2 * table.shape[1]
    pairs = x[..., -rope_dim:].float().reshape(*x.shape[:-1], rope_dim // 2, 2).contiguous()
    rot = torch.view_as_complex(table[positions.long()])
    rot = rot.reshape(*rot.shape[:-1], *([1] * (x.dim() - positions.dim() - 1)), rot.shape[-1])
    if inverse:
        rot = rot.conj()
    out = torch.view_as_real(torch.view_as_complex(pairs) * rot).flatten(-2)
    return torch.cat((x[..., :-rope_dim].float(), out), -1).to(x.dtype)


@given(n_pos=st.integers(1, 5), heads=st.integers(1, 4), extra=st.integers(0, 70), inverse=st.booleans(),
       seed=st.integers(0, 2**31))
def test_apply_rope_oracle_matches_complex_multiply(n_pos, heads, extra, inverse, seed):
    g = torch.Generator().manual_seed(seed)
    table = ops.rope_freqs(64, 50, 10000.0)
    x = torch.randn(n_pos, heads, 64 + extra, generator=g)
    positions = torch.randint(0, 50, (n_pos,), generator=g)
    # Same FP32 products; the complex multiply may round its sums differently by an ulp.
    assert_close(ref.apply_rope(x, table, positions, inverse), _complex_rope(x, table, positions, inverse),
                 rtol=2.0 ** -21, atol=2.0 ** -22)
