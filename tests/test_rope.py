"""rope_freqs, apply_rope, apply_rope_: Triton against the FP32 oracle, the oracle against SPEC 4."""

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.kernels.formats import cast_rne
from dsv4_triton.reference import rope as ref
from helpers import assert_close

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RELEASE_YARN = dict(factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)
TINY_YARN = dict(factor=16, original_max_position_embeddings=64, beta_fast=32, beta_slow=1)
# original 6 at R = 64, theta 1e4: both correction dims round to 0, so SPEC's high == low
# branch (high += 0.001) is taken.
DEGENERATE_YARN = dict(factor=4, original_max_position_embeddings=6, beta_fast=32, beta_slow=1)
# At theta 1e4 the ramp runs from i = 22 to high = 35 > R/2 - 1: SPEC bounds high by R - 1,
# so the last frequency is still only 9/13 of the way along the ramp.
WIDE_RAMP_YARN = dict(factor=8, original_max_position_embeddings=138000, beta_fast=32, beta_slow=1)


def spec_table(rope_dim, max_pos, theta, yarn):
    """SPEC 4 evaluated directly in float64 Python: (cos, sin, angle) [max_pos, R/2] each."""
    half = rope_dim // 2
    freqs = [theta ** (-2 * i / rope_dim) for i in range(half)]
    if yarn is not None:
        def c(r):
            original = yarn["original_max_position_embeddings"]
            return rope_dim * math.log(original / (2 * math.pi * r)) / (2 * math.log(theta))
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
    (64, 10000.0, DEGENERATE_YARN), (64, 10000.0, WIDE_RAMP_YARN), (6, 500.0, None), (2, 10000.0, TINY_YARN),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rope_freqs_matches_spec_formula(device, backend, rope_dim, theta, yarn):
    max_pos = 3000
    with use_backend(backend):
        table = ops.rope_freqs(rope_dim, max_pos, theta, yarn, device=device).cpu()
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
    # clone: view_as_complex needs an even storage offset
    pairs = x[..., -rope_dim:].float().reshape(*x.shape[:-1], rope_dim // 2, 2).clone()
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


def _triton(fn, *args, **kw):
    with use_backend("triton"):
        return fn(*args, **kw)


def _yarn_configs():
    return st.one_of(st.none(), st.builds(
        lambda factor, original, beta_slow, ratio: dict(factor=factor, original_max_position_embeddings=original,
                                                        beta_fast=beta_slow * ratio, beta_slow=beta_slow),
        st.sampled_from([1.5, 4.0, 16.0, 40.0]), st.integers(2, 200000), st.sampled_from([0.5, 1.0, 2.0]),
        st.sampled_from([1.5, 8.0, 32.0])))


@given(half=st.integers(1, 70), max_pos=st.integers(1, 300), theta=st.sampled_from([10000.0, 160000.0, 511.5, 1e6]),
       yarn=_yarn_configs())
def test_rope_freqs_triton_matches_oracle(device, half, max_pos, theta, yarn):
    got = _triton(ops.rope_freqs, 2 * half, max_pos, theta, yarn, device=device)
    want = ops.rope_freqs(2 * half, max_pos, theta, yarn, device=device)
    # Both round FP64 frequencies and FP64 cos/sin of the same FP32 angle once to FP32;
    # the FP64 pow/cos/sin of the two libraries may differ by an FP64 ulp, which can flip
    # an FP32 rounding in rare cases: at most one FP32 ulp.
    assert got.shape == want.shape and got.device == want.device
    assert_close(got, want, rtol=2.0 ** -23, atol=0.0, what="rope_freqs")


def test_rope_freqs_triton_degenerate_yarn_ramp(device):
    got = _triton(ops.rope_freqs, 64, 40, 10000.0, DEGENERATE_YARN, device=device)
    assert_close(got, ops.rope_freqs(64, 40, 10000.0, DEGENERATE_YARN, device=device), rtol=2.0 ** -23, atol=0.0)


@st.composite
def _rope_problem(draw):
    half = draw(st.sampled_from([1, 3, 32]))
    head_dim = 2 * half + draw(st.sampled_from([0, 1, 7, 64, 200]))
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    n_pos_dims = draw(st.integers(0, len(lead)))
    return half, head_dim, lead, n_pos_dims


@given(problem=_rope_problem(), dtype=st.sampled_from(DTYPES), inverse=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**31))
def test_apply_rope_matches_oracle(device, problem, dtype, inverse, scale, seed):
    half, head_dim, lead, n_pos_dims = problem
    g = torch.Generator().manual_seed(seed)
    table = ops.rope_freqs(2 * half, 97, 10000.0, device=device)
    x = (torch.randn(*lead, head_dim, generator=g) * scale).to(dtype).to(device)
    positions = torch.randint(0, 97, tuple(lead[:n_pos_dims]), generator=g).to(device)
    y = _triton(ops.apply_rope, x, table, positions, inverse)
    assert y.dtype == dtype and y.shape == x.shape
    # Same FP32 products and sums in the same order, no FMA, one rounding: bit-exact.
    assert_close(y, ref.apply_rope(x, table, positions, inverse), rtol=0.0, atol=0.0, what="apply_rope")
    assert torch.equal(y[..., :head_dim - 2 * half], x[..., :head_dim - 2 * half])
    x_inplace = x.clone()
    assert _triton(ops.apply_rope_, x_inplace, table, positions, inverse) is x_inplace
    assert torch.equal(x_inplace, y)


@given(tokens=st.integers(1, 9), heads=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_apply_rope_inverse_undoes_rotation(device, tokens, heads, seed):
    g = torch.Generator().manual_seed(seed)
    table = ops.rope_freqs(64, 4096, 160000.0, RELEASE_YARN, device=device)
    x = torch.randn(tokens, heads, 192, generator=g).to(device)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(device)
    back = _triton(ops.apply_rope, _triton(ops.apply_rope, x, table, positions), table, positions, inverse=True)
    # Two rotations, each a few FP32 roundings of the pair's size, and cos^2 + sin^2 = 1
    # only to ~2^-23: a few FP32 ulps of the largest element.
    assert_close(back, x, rtol=0.0, atol=2.0 ** -20 * float(x.abs().max()), what="inverse(apply(x))")


def test_apply_rope_batch_positions_and_scalar_position(device):
    table = ops.rope_freqs(64, 64, 10000.0, device=device)
    x = torch.randn(2, 3, 4, 96, device=device, dtype=torch.bfloat16)
    positions = torch.tensor([[5, 0, 63], [1, 2, 3]], device=device, dtype=torch.int32)
    assert_close(_triton(ops.apply_rope, x, table, positions), ref.apply_rope(x, table, positions, False), 0.0, 0.0)
    # The [B, S] positions broadcast over heads: each head equals the same token at [T] positions.
    flat = _triton(ops.apply_rope, x.reshape(6, 4, 96), table, positions.reshape(6))
    assert torch.equal(flat.reshape(2, 3, 4, 96), _triton(ops.apply_rope, x, table, positions))
    scalar = torch.tensor(17, device=device)
    assert_close(_triton(ops.apply_rope, x, table, scalar), ref.apply_rope(x, table, scalar, False), 0.0, 0.0)


def test_apply_rope_strided_inputs(device):
    table = ops.rope_freqs(64, 32, 10000.0, device=device)
    positions = torch.arange(5, device=device)
    base = torch.randn(7, 5, 2 * 96, device=device)
    for x in (base[:, :, ::2].transpose(0, 1), base.transpose(0, 1)[..., 10:106], base[:, :, 96:].transpose(0, 1)):
        assert_close(_triton(ops.apply_rope, x, table, positions), ref.apply_rope(x, table, positions, False), 0.0, 0.0)
    # In place on the kv half of a fused [T, H, 2D] buffer: only that half's rope dims change.
    buf = base.transpose(0, 1).clone()
    kv = buf[..., 96:]
    want = ref.apply_rope(kv, table, positions, False)
    untouched = buf[..., :128].clone()
    _triton(ops.apply_rope_, kv, table, positions)
    assert torch.equal(buf[..., 96:], want) and torch.equal(buf[..., :128], untouched)


def test_apply_rope_zero_size(device):
    table = ops.rope_freqs(64, 8, 10000.0, device=device)
    for shape, pos_shape in (((0, 4, 64), (0,)), ((3, 0, 80), (3,)), ((2, 0, 64), (2, 0))):
        x = torch.empty(shape, device=device)
        y = _triton(ops.apply_rope, x, table, torch.zeros(pos_shape, dtype=torch.long, device=device))
        assert y.shape == x.shape


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy on inf * 0
def test_apply_rope_nan_inf_propagate_like_oracle(device):
    table = ops.rope_freqs(64, 16, 10000.0, device=device)
    x = torch.randn(4, 2, 80, device=device)
    x[0, 0, 3] = float("nan")  # copied dim
    x[1, 0, 20] = float("inf")  # rotated, position 1
    x[2, 1, 17] = float("-inf")  # rotated, position 0: inf * sin(0) is NaN in both
    x[3, 1, 40] = float("nan")
    positions = torch.tensor([3, 1, 0, 9], device=device)
    for dtype in DTYPES:
        xd = x.to(dtype)
        assert_close(_triton(ops.apply_rope, xd, table, positions), ref.apply_rope(xd, table, positions, False),
                     0.0, 0.0, what=str(dtype))


def test_apply_rope_out_of_range_positions_clamp_or_raise(device):
    from dsv4_triton import set_checks
    table = ops.rope_freqs(64, 10, 10000.0, device=device)
    x = torch.randn(3, 2, 64, device=device)
    positions = torch.tensor([-4, 3, 99], device=device)
    clamped = torch.tensor([0, 3, 9], device=device)
    assert torch.equal(_triton(ops.apply_rope, x, table, positions), _triton(ops.apply_rope, x, table, clamped))
    set_checks(True)
    try:
        with pytest.raises(ValueError, match=r"positions: expected values in \[0, 10\)"):
            _triton(ops.apply_rope, x, table, positions)
        _triton(ops.apply_rope, x, table, clamped)
    finally:
        set_checks(False)


_T = ops.rope_freqs(64, 8, 10000.0, device="cpu")


@pytest.mark.parametrize("bad, err, name", [
    (dict(x=torch.zeros(4, 64, dtype=torch.int32)), TypeError, "x"),
    (dict(x=torch.zeros(4, 32)), ValueError, "x"),
    (dict(freqs=_T.double()), TypeError, "freqs"),
    (dict(freqs=_T[..., :1]), ValueError, "freqs"),
    (dict(freqs=_T[0]), ValueError, "freqs"),
    (dict(positions=torch.zeros(4, dtype=torch.float32)), TypeError, "positions"),
    (dict(positions=torch.zeros(5, dtype=torch.long)), ValueError, "positions"),
    (dict(positions=torch.zeros(4, 64, dtype=torch.long)), ValueError, "positions"),
    (dict(inverse=1), TypeError, "inverse"),
])
def test_apply_rope_bad_input(bad, err, name):
    args = dict(x=torch.zeros(4, 64), freqs=_T, positions=torch.zeros(4, dtype=torch.long), inverse=False)
    args.update(bad)
    with pytest.raises(err, match=name):
        ops.apply_rope(**args)


def test_apply_rope_inplace_rejects_layouts_it_cannot_write():
    heads_not_flat = torch.zeros(3, 4, 5, 64).permute(0, 2, 1, 3)  # dims [5, 4] after the position dim
    with pytest.raises(ValueError, match="x: in-place RoPE needs the dims"):
        ops.apply_rope_(heads_not_flat, _T, torch.zeros(3, dtype=torch.long))
    overlapping = torch.zeros(1, 64).expand(4, 64)
    with pytest.raises(ValueError, match="x: in-place RoPE needs x without overlapping"):
        ops.apply_rope_(overlapping, _T, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("bad, err, name", [
    (dict(rope_dim=63), ValueError, "rope_dim"),
    (dict(rope_dim=64.0), TypeError, "rope_dim"),
    (dict(max_pos=0), ValueError, "max_pos"),
    (dict(max_pos=2 ** 24 + 1), ValueError, "max_pos"),
    (dict(theta=1.0), ValueError, "theta"),
    (dict(yarn=[16, 4096, 32, 1]), TypeError, "yarn"),
    (dict(yarn=dict(factor=16, beta_fast=32, beta_slow=1)), ValueError, "original_max_position_embeddings"),
    (dict(yarn=dict(RELEASE_YARN, extra=1)), ValueError, "extra"),
    (dict(yarn=dict(RELEASE_YARN, type="linear")), ValueError, "yarn"),
    (dict(yarn=dict(RELEASE_YARN, factor=0)), ValueError, "factor"),
    (dict(yarn=dict(RELEASE_YARN, beta_fast=1)), ValueError, "beta_fast"),
    (dict(device=3.0), TypeError, "device"),
])
def test_rope_freqs_bad_input(bad, err, name):
    args = dict(rope_dim=64, max_pos=16, theta=10000.0, yarn=None, device="cpu")
    args.update(bad)
    with pytest.raises(err, match=name):
        ops.rope_freqs(**args)


def test_rope_freqs_accepts_release_rope_scaling_dict():
    scaling = dict(RELEASE_YARN, type="yarn", mscale=1.0, mscale_all_dim=1.0)
    assert torch.equal(ops.rope_freqs(64, 8, 160000.0, scaling), ops.rope_freqs(64, 8, 160000.0, RELEASE_YARN))


def test_rope_ops_trace_under_torch_compile():
    positions = torch.arange(4)

    def f(x):
        table = ops.rope_freqs(64, 8, 10000.0, RELEASE_YARN, device=x.device)
        y = ops.apply_rope(x, table, positions)
        ops.apply_rope_(y, table, positions, inverse=True)
        return y

    x = torch.randn(4, 2, 96)
    assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x), 0.0, 0.0)


@pytest.mark.gpu
def test_apply_rope_large_matches_oracle(device):
    g = torch.Generator(device=device).manual_seed(0)
    table = ops.rope_freqs(64, 1 << 16, 160000.0, RELEASE_YARN, device=device)
    x = torch.randn(8192, 128, 512, device=device, generator=g).to(torch.bfloat16)
    positions = torch.randint(0, 1 << 16, (8192,), device=device, generator=g)
    for inverse in (False, True):
        want = ref.apply_rope(x, table, positions, inverse)
        assert_close(_triton(ops.apply_rope, x, table, positions, inverse), want, 0.0, 0.0)
    x_kv = x[:, 0]  # [T, D] rows with a stride of 128 * D
    y = ref.apply_rope(x_kv, table, positions, False)
    _triton(ops.apply_rope_, x_kv, table, positions)
    assert torch.equal(x[:, 0], y)


@pytest.mark.gpu
@pytest.mark.parametrize("yarn", [None, RELEASE_YARN])
def test_rope_freqs_full_length_matches_oracle(device, yarn):
    got = _triton(ops.rope_freqs, 64, 1 << 20, 160000.0, yarn, device=device)
    assert_close(got, ops.rope_freqs(64, 1 << 20, 160000.0, yarn, device=device), rtol=2.0 ** -23, atol=0.0)


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < n)
    tl.store(dst_ptr + offs, cast_rne(v, dst_ptr.dtype.element_ty), mask=offs < n)


def test_output_rounding_to_bf16_is_nearest_even(device):
    bits = torch.randint(-2**31, 2**31, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.3895314e38, 3.4028235e38, float("inf"),
                            float("-inf"), float("nan"), 0.0, -0.0, 1e-40, -1e-45, 2**-126 * (1 - 2**-8)])
    src = torch.cat((bits.to(torch.int32).view(torch.float32), special)).to(device)
    dst = torch.empty(src.shape, dtype=torch.bfloat16, device=device)
    _cast_kernel[(triton.cdiv(src.numel(), 1024),)](src, dst, src.numel(), BLOCK=1024)
    want = src.to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(dst), nan)
    assert torch.equal(dst[~nan].view(torch.int16), want[~nan].view(torch.int16))
