"""mHC (hc_pre, hc_post, hc_head): Triton against the FP32 oracles, and the oracles against SPEC 9."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.kernels import mhc as kern
from dsv4_triton.reference import mhc as ref
from helpers import ULP, assert_close, compile_for_sm90

BF16_ULP = ULP[torch.bfloat16]
FP32_EPS = 2.0 ** -24


def _inputs(T, dim, seed, device, scale=(0.5, 0.5, 0.5), n_mix=24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, 4, dim, generator=g).to(torch.bfloat16)
    # Default fn of rms 1/sqrt(4 dim) keeps the mixes O(1), as trained weights do.
    fn = torch.randn(n_mix, 4 * dim, generator=g) * (4 * dim) ** -0.5
    scale_t = torch.tensor(scale[: 3 if n_mix == 24 else 1], dtype=torch.float32)
    base = torch.randn(n_mix, generator=g)
    return [t.to(device) for t in (X, fn, scale_t, base)]


def _mix_error_bound(X, fn, norm_eps=1e-6):
    """Bound on |mix_kernel - mix_oracle| per token and mix row (FP32 [T, n_mix]).

    The kernel's products are exact (BF16 X times the three BF16 parts of fn, whose sum is fn to
    2^-24 relative) and are summed in FP32 in another order than the oracle's (FP64, rounded
    once).  An FP32 sum of n terms in blocked order errs by far less than
    sqrt(n) * 2^-24 * sum|terms| in practice (rounding errors are unbiased); we allow 8x that,
    plus 4 FP32 ulps of |mix| for the rsqrt and the split of fn.
    """
    v = X.reshape(X.shape[0], -1).double().cpu()
    mag = v.abs() @ fn.double().abs().cpu().T
    rs = torch.rsqrt(v.square().mean(-1, keepdim=True) + norm_eps)
    return (8 * math.sqrt(v.shape[1]) * FP32_EPS * mag * rs + 4 * FP32_EPS * (v @ fn.double().cpu().T).abs() * rs).float()


def _check_pre(X, fn, scale, base, out, iters=20, eps=1e-6):
    y, post, comb = out
    y_r, post_r, comb_r = ref.hc_pre(X, fn, scale, base, iters, eps, 1e-6)
    assert y.dtype == torch.bfloat16 and post.dtype == torch.float32 and comb.dtype == torch.float32
    dmix = _mix_error_bound(X, fn)
    s = scale.float().abs().cpu()
    # sigmoid' <= 1/4: |d pre| <= s0 |d mix| / 4, |d post| <= s1 |d mix| / 2; plus a few FP32 ulps.
    pre_tol = s[0] * dmix[:, :4] / 4 + 4 * FP32_EPS
    post_err = (post.cpu() - post_r.cpu()).abs()
    fin = torch.isfinite(post_r.cpu())
    assert torch.equal(torch.isnan(post.cpu()), torch.isnan(post_r.cpu())), "post: NaN mismatch"
    assert bool((post_err[fin] <= (s[1] * dmix[:, 4:8] / 2 + 8 * FP32_EPS)[fin]).all()), f"post: err {post_err.max()}"
    # Sinkhorn on logits perturbed by at most e changes each entry by a factor within
    # exp(+-4e) (softmax and each normalisation are ratios of sums of the perturbed entries);
    # plus 64 FP32 ulps for the 2*iters rounded divisions.
    e = (s[2] * dmix[:, 8:].amax(-1)).reshape(-1, 1, 1)
    comb_err = (comb.cpu() - comb_r.cpu()).abs()
    fin = torch.isfinite(comb_r.cpu())
    assert torch.equal(torch.isnan(comb.cpu()), torch.isnan(comb_r.cpu())), "comb: NaN mismatch"
    bound = comb_r.cpu().abs() * (torch.expm1(4 * e) + 64 * FP32_EPS) + 1e-30
    assert bool((comb_err[fin] <= bound.expand_as(comb_err)[fin]).all()), f"comb: err {comb_err.max()}"
    # y = sum_i pre_i X_i: one BF16 rounding, plus the pre error times sum_i |X_i|.
    xs = X.float().abs().sum(1).cpu()
    y_err = (y.float().cpu() - y_r.float().cpu()).abs()
    y_tol = BF16_ULP * y_r.float().cpu().abs() + pre_tol.amax(-1, keepdim=True) * xs + 1e-30
    fin = torch.isfinite(y_r.float().cpu())
    assert torch.equal(torch.isnan(y.float().cpu()), torch.isnan(y_r.float().cpu())), "y: NaN mismatch"
    assert bool((y_err[fin] <= y_tol[fin]).all()), f"y: err {y_err[fin].max()}"


def _triton(name, *args, **kw):
    with use_backend("triton"):
        return getattr(ops, name)(*args, **kw)


# ---------------------------------------------------------------- the oracle against SPEC 9

def test_sinkhorn_oracle_is_spec_and_doubly_stochastic():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, 4, generator=g) * 3
    eps = 1e-6
    # SPEC 9 written out element by element.
    for t in range(6):
        m = [[0.0] * 4 for _ in range(4)]
        for i in range(4):
            row = [math.exp(logits[t, i, j].item()) for j in range(4)]
            for j in range(4):
                m[i][j] = row[j] / sum(row) + eps
        for j in range(4):
            c = sum(m[i][j] for i in range(4)) + eps
            for i in range(4):
                m[i][j] /= c
        for _ in range(19):
            for i in range(4):
                r = sum(m[i]) + eps
                m[i] = [v / r for v in m[i]]
            for j in range(4):
                c = sum(m[i][j] for i in range(4)) + eps
                for i in range(4):
                    m[i][j] /= c
        assert_close(ref.sinkhorn(logits[t:t + 1], 20, eps)[0], torch.tensor(m), rtol=1e-5, atol=1e-7, what="sinkhorn")
    # Columns are normalised last: they sum to 1 up to eps and rounding for any logits.  Rows
    # converge geometrically; for logits of spread ~1 (trained mixes) 20 rounds leave < 1e-4.
    comb = ref.sinkhorn(logits, 20, eps)
    assert_close(comb.sum(-2), torch.ones(6, 4), rtol=0, atol=1e-5, what="column sums")
    comb = ref.sinkhorn(torch.randn(1000, 4, 4, generator=g) * 0.5, 20, eps)
    assert_close(comb.sum(-1), torch.ones(1000, 4), rtol=0, atol=1e-4, what="row sums")


# ---------------------------------------------------------------- Triton against the oracle

@given(T=st.sampled_from([1, 2, 3, 7, 17, 33]), dim=st.sampled_from([256, 320, 512, 1000, 1024]),
       seed=st.integers(0, 2**31))
def test_hc_pre_matches_oracle(device, T, dim, seed):
    X, fn, scale, base = _inputs(T, dim, seed, device)
    out = _triton("hc_pre", X, fn, scale, base)
    assert out[0].shape == (T, dim) and out[1].shape == (T, 4) and out[2].shape == (T, 4, 4)
    _check_pre(X, fn, scale, base, out)


@given(T=st.sampled_from([1, 4, 9]), dim=st.sampled_from([256, 384, 1024]), seed=st.integers(0, 2**31),
       scales=st.sampled_from([(40.0, 40.0, 1.0), (0.5, 0.5, 30.0), (1e-3, 1e-3, 1e-3)]),
       iters=st.sampled_from([1, 3, 20]))
def test_hc_pre_extreme_mixes(device, T, dim, seed, scales, iters):
    # Large scales saturate the sigmoids (pre -> eps or 1 + eps, post -> 0 or 2) and make the
    # Sinkhorn logits huge (softmax rows one-hot); tiny scales leave everything near base.
    X, fn, scale, base = _inputs(T, dim, seed, device, scale=scales)
    _check_pre(X, fn, scale, base, _triton("hc_pre", X, fn, scale, base, iters), iters=iters)


@pytest.mark.parametrize("dim", [256, 300])
def test_hc_pre_and_head_mixes_are_fp32_exact_on_one_hot_rows(device, dim):
    # With one non-zero X element (1.0) per token, each mix is a single product fn * 1 and
    # must come out as fn's FP32 value exactly (so the three BF16 parts of fn must add up to
    # it): the only rounding left is rsqrt and the activations, a few FP32 ulps.  Dropping the
    # smallest part of fn alone would err by ~2^-17 relative, far outside these bounds.
    T, u = 7, FP32_EPS
    g = torch.Generator().manual_seed(dim)
    hot = torch.randint(0, 4 * dim, (T,), generator=g)
    X = torch.zeros(T, 4 * dim)
    X[torch.arange(T), hot] = 1.0
    X = X.view(T, 4, dim).to(torch.bfloat16).to(device)
    fn = (torch.randn(24, 4 * dim, generator=g) * (4 * dim) ** -0.5).to(device)
    scale = torch.tensor([1.0, 1.0, 4.0], device=device)
    base = torch.randn(24, generator=g).to(device)
    y, post, comb = _triton("hc_pre", X, fn, scale, base)
    y_r, post_r, comb_r = ref.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6)
    mix = (fn.cpu()[:, hot].T * (4 * dim) ** 0.5).abs()  # |mix|, rs = sqrt(4 dim) up to eps
    z = mix * scale.cpu().repeat_interleave(torch.tensor([4, 4, 16])) + base.cpu().abs()
    dz = 4 * u * mix * scale.cpu().repeat_interleave(torch.tensor([4, 4, 16])) + u * z  # rsqrt: 4 ulps
    assert bool(((post.cpu() - post_r.cpu()).abs() <= dz[:, 4:8] / 2 + 4 * u * 2).all()), "post"
    e = dz[:, 8:].amax(-1).reshape(-1, 1, 1)
    assert bool(((comb.cpu() - comb_r.cpu()).abs() <= comb_r.cpu() * (torch.expm1(4 * e) + 64 * u)).all()), "comb"
    assert_close(y, y_r, rtol=BF16_ULP, atol=0, what="y")
    y = _triton("hc_head", X, fn[:4], scale[2:], base[:4])
    assert_close(y, ref.hc_head(X, fn[:4], scale[2:], base[:4], 1e-6, 1e-6), rtol=BF16_ULP, atol=0, what="head y")


def test_hc_pre_comb_is_doubly_stochastic(device):
    X, fn, scale, base = _inputs(9, 256, 3, device, scale=(0.5, 0.5, 0.3))
    _, _, comb = _triton("hc_pre", X, fn, scale, base)
    # Columns are normalised last (sum 1 up to eps and rounding); rows after 20 rounds of
    # Sinkhorn on logits of spread ~1 are within 1e-4 of 1 (see the oracle test).
    assert_close(comb.sum(-2), torch.ones(9, 4), rtol=0, atol=1e-5, what="column sums")
    assert_close(comb.sum(-1), torch.ones(9, 4), rtol=0, atol=1e-4, what="row sums")
    assert bool((comb > 0).all())


def test_hc_pre_many_tiles_and_splits(device):
    # 150 tokens at dim 200: 10 tiles of 16 and 4 splits (one 256-column slice per stream,
    # running past dim), so the y programs sum partial rows from several splits and tiles; more
    # than 64 tokens, so fn is split by its own launch.  A second, shorter launch (fn split in the loop) reuses the
    # larger workspace without reading the first launch's rows.
    X, fn, scale, base = _inputs(150, 200, 5, device)
    _check_pre(X, fn, scale, base, _triton("hc_pre", X, fn, scale, base))
    _check_pre(X[:50], fn, scale, base, _triton("hc_pre", X[:50], fn, scale, base))


def test_split_fn_parts_sum_to_fn(device):
    # The three BF16 parts sum (in FP32) to fn within 2^-24 relative, columns in partial-row
    # order (column SSQ_COL and those past the mixes zero), for normal, tiny and huge values.
    g = torch.Generator().manual_seed(3)
    fn = torch.randn(24, 300, generator=g) * torch.logspace(-30, 30, 300)
    fn[3, 7], fn[5, 8] = 1e-40, -0.0
    parts = torch.empty(3, 300, 32, dtype=torch.bfloat16, device=device)
    kern._split_fn_kernel[(2,)](fn.to(device), parts, 300, N_MIX=24, N_PAD=32, BLOCK=256)
    total = parts.float().sum(0).cpu()  # [K, 32]
    expected = torch.zeros(300, 32)
    expected[:, :4] = fn[:4].T
    expected[:, 5:25] = fn[4:].T
    assert bool(((total - expected).abs() <= FP32_EPS * expected.abs() + 1e-38).all())


def test_hc_pre_strided_input(device):
    X, fn, scale, base = _inputs(6, 256, 7, device)
    wide = torch.zeros(6, 4, 300, dtype=torch.bfloat16, device=device)
    wide[:, :, :256] = X
    _check_pre(X, fn, scale, base, _triton("hc_pre", wide[:, :, :256], fn, scale, base))
    t_major = X.transpose(0, 1).contiguous().transpose(0, 1)  # stride(1) > stride(0)
    _check_pre(X, fn, scale, base, _triton("hc_pre", t_major, fn, scale, base))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_hc_pre_nan_inf_propagate_like_oracle(device, bad):
    X, fn, scale, base = _inputs(5, 256, 11, device)
    X[1, 2, 17] = bad  # rsqrt(inf) = 0 and inf * 0 = NaN: the token's mixes are all NaN
    out = _triton("hc_pre", X, fn, scale, base)
    for got, name in zip(out, ("y", "post", "comb")):
        assert bool(torch.isnan(got[1].float()).all()), f"{name} of the bad token is not NaN"
        assert not bool(torch.isnan(got[[0, 2, 3, 4]].float()).any()), f"{name}: NaN leaked to other tokens"
    _check_pre(X, fn, scale, base, out)


@pytest.mark.parametrize("config, y_config", [((16, 64, 64, 4, 3), (4, 256, 4)), ((32, 128, 64, 4, 3), (1, 128, 4))])
def test_hc_pre_and_head_explicit_configs(device, config, y_config):
    # 20 tokens and dim 300 or 1100: partial tiles, chunks and y blocks running past dim, and
    # more than SPLIT_BLOCK splits at the narrow chunk.
    X, fn, scale, base = _inputs(20, 300 if config[1] > 64 else 1100, 13, device)
    _check_pre(X, fn, scale, base, kern.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6, config=config, y_config=y_config))
    _check_head(X, fn[:4], scale[:1], base[:4], kern.hc_head(X, fn[:4], scale[:1], base[:4], 1e-6, 1e-6,
                                                               config=config, y_config=y_config))


def _decode_counters(X):
    stream = torch.cuda.current_stream(X.device).cuda_stream if X.device.type == "cuda" else 0
    return kern._workspaces[(X.device, stream, "decode_counters")]


@pytest.mark.parametrize("T, dim, decode_config", [(5, 300, kern._DECODE_CONFIGS[1]),
                                                   (20, 1100, kern._DECODE_CONFIGS[2])])
def test_one_launch_decode_form(device, T, dim, decode_config):
    # Mix programs first, then per token its y blocks (and hc_pre's Sinkhorn program), which
    # wait for every mix program; slices and y blocks run past dim, 20 tokens span two mix
    # tiles.  Every launch leaves its counters at zero for the next one.
    X, fn, scale, base = _inputs(T, dim, T, device)
    for _ in range(2):
        _check_pre(X, fn, scale, base, kern.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6, decode_config=decode_config))
        assert _decode_counters(X).tolist() == [0, 0]
        _check_head(X, fn[:4], scale[:1], base[:4], kern.hc_head(X, fn[:4], scale[:1], base[:4], 1e-6, 1e-6,
                                                                   decode_config=decode_config))
        assert _decode_counters(X).tolist() == [0, 0]


def test_decode_config_must_fit_one_partial_row_load():
    X, fn, scale, base = _inputs(1, 16400, 1, "cpu")
    with pytest.raises(ValueError, match="decode_config"):
        kern.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6, decode_config=kern._DECODE_CONFIGS[0])


def _check_head(X, fn, scale, base, y, eps=1e-6):
    y_r = ref.hc_head(X, fn, scale, base, eps, 1e-6)
    assert y.dtype == torch.bfloat16 and y.shape == y_r.shape
    pre_tol = scale.float().abs().cpu()[0] * _mix_error_bound(X, fn) / 4 + 4 * FP32_EPS
    y_err = (y.float().cpu() - y_r.float().cpu()).abs()
    y_tol = BF16_ULP * y_r.float().cpu().abs() + pre_tol.amax(-1, keepdim=True) * X.float().abs().sum(1).cpu() + 1e-30
    fin = torch.isfinite(y_r.float().cpu())
    assert torch.equal(torch.isnan(y.float().cpu()), torch.isnan(y_r.float().cpu())), "y: NaN mismatch"
    assert bool((y_err[fin] <= y_tol[fin]).all()), f"y: err {y_err[fin].max()}"


@given(T=st.sampled_from([1, 2, 5, 19]), dim=st.sampled_from([256, 300, 768]), seed=st.integers(0, 2**31),
       s=st.sampled_from([0.5, 30.0]))
def test_hc_head_matches_oracle(device, T, dim, seed, s):
    X, fn, scale, base = _inputs(T, dim, seed, device, scale=(s,), n_mix=4)
    _check_head(X, fn, scale, base, _triton("hc_head", X, fn, scale, base))


def test_hc_head_nan_propagates(device):
    X, fn, scale, base = _inputs(3, 256, 17, device, n_mix=4)
    X[2, 0, 0] = float("nan")
    y = _triton("hc_head", X, fn, scale, base)
    assert bool(torch.isnan(y[2].float()).all()) and not bool(torch.isnan(y[:2].float()).any())


@given(T=st.integers(1, 9), dim=st.sampled_from([1, 7, 256, 1000, 1100]), seed=st.integers(0, 2**31))
def test_hc_post_matches_oracle(device, T, dim, seed):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(T, dim, generator=g).to(torch.bfloat16).to(device)
    X = torch.randn(T, 4, dim, generator=g).to(torch.bfloat16).to(device)
    post = (2 * torch.rand(T, 4, generator=g)).to(device)
    comb = torch.rand(T, 4, 4, generator=g).to(device)
    out = _triton("hc_post", F, X, post, comb)
    assert out.dtype == torch.bfloat16 and out.shape == (T, 4, dim)
    # Five FP32 products summed in another order (a few FP32 ulps of sum |terms|), then one
    # BF16 rounding.
    mag = (post.unsqueeze(-1) * F.float().abs().unsqueeze(1)
           + (comb.unsqueeze(-1) * X.float().abs().unsqueeze(2)).sum(1)).cpu()
    expected = ref.hc_post(F, X, post, comb).float().cpu()
    err = (out.float().cpu() - expected).abs()
    assert bool((err <= BF16_ULP * expected.abs() + 8 * FP32_EPS * mag + 1e-30).all()), f"hc_post: err {err.max()}"


def test_hc_post_strided_and_nan(device):
    g = torch.Generator().manual_seed(19)
    F = torch.randn(4, 2 * 256, generator=g).to(torch.bfloat16).to(device)[:, ::2]  # non-unit stride
    X = torch.randn(4, 4, 256, generator=g).to(torch.bfloat16).to(device).transpose(0, 1).contiguous().transpose(0, 1)
    post = torch.rand(4, 4, generator=g).to(device)
    comb = torch.rand(4, 4, 4, generator=g).to(device)
    X[0, 3, 9] = float("nan")
    comb[2, 1, 1] = float("inf")
    out = _triton("hc_post", F, X, post, comb)
    expected = ref.hc_post(F, X, post, comb)
    # The NaN of stream 3 reaches every output stream of token 0 at column 9 only; the inf
    # weight reaches output stream 1 of token 2 (as +-inf, or NaN where X is 0).
    assert_close(out, expected, rtol=2 * BF16_ULP, atol=1e-6, what="hc_post")


def test_zero_tokens(device):
    X, fn, scale, base = _inputs(0, 256, 0, device)
    y, post, comb = _triton("hc_pre", X, fn, scale, base)
    assert y.shape == (0, 256) and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    assert _triton("hc_head", X, fn[:4], scale[:1], base[:4]).shape == (0, 256)
    assert _triton("hc_post", y, X, post, comb).shape == (0, 4, 256)


def test_custom_ops_schema_and_fake():
    X, fn, scale, base = _inputs(3, 64, 23, "cpu")
    torch.library.opcheck(torch.ops.dsv4.hc_pre.default, (X, fn, scale, base, 20, 1e-6, 1e-6))
    torch.library.opcheck(torch.ops.dsv4.hc_head.default, (X, fn[:4], scale[:1], base[:4], 1e-6, 1e-6))
    y, post, comb = ops.hc_pre(X, fn, scale, base)
    torch.library.opcheck(torch.ops.dsv4.hc_post.default, (y, X, post, comb))


_X = torch.zeros(2, 4, 8, dtype=torch.bfloat16)
_FN, _SC, _B = torch.zeros(24, 32), torch.zeros(3), torch.zeros(24)


@pytest.mark.parametrize("kw, err, name", [
    (dict(X=_X.float()), TypeError, "X"),
    (dict(X=torch.zeros(2, 3, 8, dtype=torch.bfloat16)), ValueError, "X"),
    (dict(X=torch.zeros(8, 32, dtype=torch.bfloat16)), ValueError, "X"),
    (dict(fn=torch.zeros(24, 33)), ValueError, "fn"),
    (dict(fn=torch.zeros(24, 32, dtype=torch.bfloat16)), TypeError, "fn"),
    (dict(scale=torch.zeros(2)), ValueError, "scale"),
    (dict(base=torch.zeros(24, dtype=torch.float64)), TypeError, "base"),
    (dict(iters=0), ValueError, "iters"),
    (dict(iters=2.0), TypeError, "iters"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(norm_eps=-1.0), ValueError, "norm_eps"),
])
def test_hc_pre_bad_input(kw, err, name):
    args = dict(X=_X, fn=_FN, scale=_SC, base=_B)
    args.update(kw)
    with pytest.raises(err, match=name):
        ops.hc_pre(**args)


@pytest.mark.parametrize("kw, err, name", [
    (dict(F=torch.zeros(2, 9, dtype=torch.bfloat16)), ValueError, "F"),
    (dict(F=torch.zeros(2, 8)), TypeError, "F"),
    (dict(post=torch.zeros(2, 3)), ValueError, "post"),
    (dict(comb=torch.zeros(2, 4, 4, dtype=torch.bfloat16)), TypeError, "comb"),
    (dict(X=torch.zeros(3, 4, 8, dtype=torch.bfloat16)), ValueError, "F"),
])
def test_hc_post_bad_input(kw, err, name):
    args = dict(F=torch.zeros(2, 8, dtype=torch.bfloat16), X=_X, post=torch.zeros(2, 4), comb=torch.zeros(2, 4, 4))
    args.update(kw)
    with pytest.raises(err, match=name):
        ops.hc_post(**args)


@pytest.mark.parametrize("kw, err, name", [
    (dict(fn=_FN), ValueError, "fn"),
    (dict(scale=_SC), ValueError, "scale"),
    (dict(base=_B), ValueError, "base"),
    (dict(eps=-1e-6), ValueError, "eps"),
])
def test_hc_head_bad_input(kw, err, name):
    args = dict(X=_X, fn=torch.zeros(4, 32), scale=torch.zeros(1), base=torch.zeros(4))
    args.update(kw)
    with pytest.raises(err, match=name):
        ops.hc_head(**args)


# ---------------------------------------------------------------- sm_90 compilation (no GPU needed)



@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("head, split_in_loop, config", [(False, False, kern._MIX_CONFIGS[-1]),
                                                         (False, False, kern._MIX_CONFIGS[3]),
                                                         (True, True, kern._MIX_CONFIGS[0])])
def test_mix_kernel_compiles_for_sm90_without_spills(head, split_in_loop, config):
    bt, chunk, bk, warps, stages = config
    consts = dict(N_MIX=4 if head else 24, N_PAD=16 if head else 32, SPLIT_IN_LOOP=split_in_loop, BLOCK_T=bt,
                  CHUNK=chunk, BLOCK_K=bk)
    usage = compile_for_sm90("dsv4_triton.kernels.mhc", "_mix_partial_kernel", dict(x_ptr="*bf16", parts_ptr="*bf16"),
                             consts, ["dim", "stride_xt", "stride_xs", "T"], warps, stages)
    assert usage["stack"] == 0 and usage["pipelined"], usage
    assert usage["tensor_core_dot"] == (bt >= 64), usage  # warp-group MMA from 64 rows; mma.sync below
    if not split_in_loop:  # both operands from asynchronous copies: no tile loaded back for the MMA
        assert usage["tile_reloads"] <= 1, usage  # (one: X to registers for the sum of squares)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("head, config", [(False, kern._Y_CONFIGS[-1]), (True, kern._Y_CONFIGS[0])])
def test_finalise_y_kernel_compiles_for_sm90_without_spills(head, config):
    bt, bd, warps = config
    types = dict(x_ptr="*bf16", y_ptr="*bf16", eps="fp32", norm_eps="fp32")
    consts = dict(HEAD=head, N_PAD=16 if head else 32, BLOCK_T=bt, BLOCK_D=bd)
    usage = compile_for_sm90("dsv4_triton.kernels.mhc", "_finalise_y_kernel", types, consts,
                             ["dim", "stride_xt", "stride_xs", "T"], warps)
    assert usage["stack"] == 0, usage


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("head, config", [(False, kern._DECODE_CONFIGS[0]), (True, kern._DECODE_CONFIGS[-1])])
def test_decode_kernel_compiles_for_sm90_without_spills(head, config):
    bt, chunk, bk, warps, stages, bd = config
    types = dict(x_ptr="*bf16", y_ptr="*bf16", sync_ptr="*i32", eps="fp32", norm_eps="fp32")
    consts = dict(HEAD=head, N_MIX=4 if head else 24, N_PAD=16 if head else 32, BLOCK_T=bt, CHUNK=chunk, BLOCK_K=bk,
                  BLOCK_D=bd)
    usage = compile_for_sm90("dsv4_triton.kernels.mhc", "_decode_kernel", types, consts,
                             ["dim", "stride_xt", "stride_xs", "T"], warps, stages)
    assert usage["stack"] == 0 and usage["pipelined"], usage
    assert usage["tensor_core_dot"] == (bt >= 64), usage


# ---------------------------------------------------------------- GPU: model sizes, every config

@pytest.mark.gpu
@given(T=st.sampled_from([1, 3, 8, 64, 65, 300, 1000, 4096]), dim=st.sampled_from([4096, 7168]),
       seed=st.integers(0, 2**31))
def test_hc_pre_head_model_sizes_gpu(T, dim, seed):
    X, fn, scale, base = _inputs(T, dim, seed, "cuda")
    _check_pre(X, fn, scale, base, _triton("hc_pre", X, fn, scale, base))
    _check_head(X, fn[:4], scale[:1], base[:4], _triton("hc_head", X, fn[:4], scale[:1], base[:4]))


@pytest.mark.gpu
@pytest.mark.parametrize("config, y_config", [(c, kern._Y_CONFIGS[i % len(kern._Y_CONFIGS)])
                                              for i, c in enumerate(kern._MIX_CONFIGS)]
                         + [(kern._MIX_CONFIGS[-1], y) for y in kern._Y_CONFIGS])
@pytest.mark.parametrize("T, dim", [(1, 7168), (64, 4096), (333, 7168), (4096, 4096)])
def test_every_mix_config_gpu(config, y_config, T, dim):
    X, fn, scale, base = _inputs(T, dim, T + dim, "cuda")
    _check_pre(X, fn, scale, base, kern.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6, config=config, y_config=y_config))
    _check_head(X, fn[:4], scale[:1], base[:4], kern.hc_head(X, fn[:4], scale[:1], base[:4], 1e-6, 1e-6,
                                                               config=config, y_config=y_config))


@pytest.mark.gpu
@pytest.mark.parametrize("decode_config", kern._DECODE_CONFIGS)
@pytest.mark.parametrize("T, dim", [(1, 7168), (8, 4096), (64, 7168)])
def test_every_decode_config_gpu(decode_config, T, dim):
    X, fn, scale, base = _inputs(T, dim, T + dim, "cuda")
    for _ in range(2):
        _check_pre(X, fn, scale, base, kern.hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6, decode_config=decode_config))
        _check_head(X, fn[:4], scale[:1], base[:4], kern.hc_head(X, fn[:4], scale[:1], base[:4], 1e-6, 1e-6,
                                                                   decode_config=decode_config))
    assert _decode_counters(X).tolist() == [0, 0]


@pytest.mark.gpu
def test_decode_sizes_past_the_one_launch_form_gpu():
    # More than MAX_DECODE_SPLITS partial rows per token even at the widest slices: two launches.
    X, fn, scale, base = _inputs(3, 16400, 5, "cuda")
    assert not kern._decode_fits(16400)
    _check_pre(X, fn, scale, base, _triton("hc_pre", X, fn, scale, base))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 300])  # one launch, one launch, three
def test_hc_pre_in_a_cuda_graph_replays_gpu(T):
    # The workspaces (partial rows, fn parts, counters) stay where the capture saw them, so
    # replays keep giving the eager result, also after a larger call has grown them.
    X, fn, scale, base = _inputs(T, 7168, 31, "cuda")
    eager = _triton("hc_pre", X, fn, scale, base)
    with use_backend("triton"):
        ops.hc_pre(X, fn, scale, base)  # tuned and compiled outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ops.hc_pre(X, fn, scale, base)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)
        _triton("hc_pre", *_inputs(700, 7168, 32, "cuda"))  # grows the workspaces


@pytest.mark.gpu
def test_hc_pre_deterministic_and_stream_safe_gpu():
    # Partials are summed in a fixed order: repeated launches are bit-identical, also when
    # two streams run launches at the same time (each stream has its own workspace).
    X, fn, scale, base = _inputs(2048, 7168, 29, "cuda")
    first = _triton("hc_pre", X, fn, scale, base)
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = []
    torch.cuda.synchronize()
    for s in streams:
        with torch.cuda.stream(s):
            outs.append([_triton("hc_pre", X, fn, scale, base) for _ in range(3)])
    torch.cuda.synchronize()
    for per_stream in outs:
        for out in per_stream:
            for a, b in zip(out, first):
                assert torch.equal(a, b)


@pytest.mark.gpu
@given(T=st.sampled_from([1, 8, 64, 4096]), dim=st.sampled_from([4096, 7168]), seed=st.integers(0, 2**31))
def test_hc_post_model_sizes_gpu(T, dim, seed):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(T, dim, generator=g).to(torch.bfloat16).cuda()
    X = torch.randn(T, 4, dim, generator=g).to(torch.bfloat16).cuda()
    post, comb = (2 * torch.rand(T, 4, generator=g)).cuda(), torch.rand(T, 4, 4, generator=g).cuda()
    out = _triton("hc_post", F, X, post, comb)
    mag = post.unsqueeze(-1) * F.float().abs().unsqueeze(1) + (comb.unsqueeze(-1) * X.float().abs().unsqueeze(2)).sum(1)
    expected = ref.hc_post(F, X, post, comb).float()
    assert bool(((out.float() - expected).abs() <= BF16_ULP * expected.abs() + 8 * FP32_EPS * mag + 1e-30).all())
