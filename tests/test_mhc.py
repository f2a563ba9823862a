"""mHC (hc_pre, hc_post, hc_head): Triton against the FP32 oracles, and the oracles against SPEC 9."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.kernels import mhc as kern
from dsv4_triton.reference import mhc as ref
from helpers import ULP, assert_close

BF16_ULP = ULP[torch.bfloat16]
FP32_EPS = 2.0 ** -24


def _inputs(T, dim, seed, device, fn_std=None, scale=(0.5, 0.5, 0.5), n_mix=24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, 4, dim, generator=g).to(torch.bfloat16)
    # Default fn of rms 1/sqrt(4 dim) keeps the mixes O(1), as trained weights do.
    fn = torch.randn(n_mix, 4 * dim, generator=g) * (fn_std if fn_std is not None else (4 * dim) ** -0.5)
    scale_t = torch.tensor(scale[: 3 if n_mix == 24 else 1], dtype=torch.float32)
    base = torch.randn(n_mix, generator=g)
    return [t.to(device) for t in (X, fn, scale_t, base)]


def _mix_error_bound(X, fn, norm_eps=1e-6):
    """Bound on |mix_kernel - mix_oracle| per token and mix row (FP32 [T, n_mix]).

    The kernel's products are exact (BF16 X times the three BF16 parts of fn, whose sum is fn to
    2^-24 relative) and are summed in FP32 in another order than the oracle's (FP64, rounded
    once).  An FP32 sum of n terms in blocked order errs by far less than
    sqrt(n) * 2^-24 * sum|terms| in practice (rounding errors are unbiased); we allow 4x that,
    plus the same again for the rsqrt and the split of fn.
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
