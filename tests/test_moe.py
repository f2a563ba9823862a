"""moe family: the packed layout, the per-expert-loop oracle against a per-token evaluation
of SPEC 8, then the Triton path against the oracle."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, set_checks
from dsv4_triton.reference import activation as ref_act
from dsv4_triton.reference import gemm as ref_gemm
from dsv4_triton.reference import moe as ref

DIM, INTER, EXPERTS = 256, 128, 8  # tiny shapes: the interpreter is slow


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_experts(n_experts, dim, inter, g, device="cpu", exp_lo=-9, exp_hi=-5):
    """Checkpoint-style per-expert lists (w1, w1_scale, w3, w3_scale, w2, w2_scale)."""
    def fp4(rows, cols):
        packed = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.int32).to(torch.uint8)
        e = torch.randint(exp_lo, exp_hi + 1, (rows, cols // 32), generator=g, dtype=torch.int32)
        return packed.to(device), (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu).to(device)

    lists = [[] for _ in range(6)]
    for _ in range(n_experts):
        for i, (rows, cols) in enumerate(((inter, dim), (inter, dim), (dim, inter))):
            w, s = fp4(rows, cols)
            lists[2 * i].append(w)
            lists[2 * i + 1].append(s)
    return lists  # w1, w1_scale, w3, w3_scale, w2, w2_scale


def routing(t, k, n_experts, g, device="cpu"):
    """Distinct expert ids per row (random), positive weights."""
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(t)]) if t else \
        torch.zeros(0, k, dtype=torch.int64)
    w = torch.rand(t, k, generator=g) * 2 + 0.05
    return w.to(device), ids.to(torch.int32).to(device)


def integer_activations(t, dim, g):
    """bf16 integers in [-8, 8]: act_quant codes are then exact integers (x * 2^5 or x * 2^6),
    and with FP4 scales 2^-9..2^-5 every w1/w3 product is a multiple of 2^-10 below 2^6, so
    the gate/up sums (dim = 256 terms) are exact in FP32 in any order: both sides feed the
    identical SwiGLU into the FP8 quantisation of the w2 input."""
    return torch.randint(-8, 9, (t, dim), generator=g).to(torch.bfloat16)


def per_token_oracle(x, weights, ids, experts, limit=10.0):
    """SPEC 8 evaluated token by token from the unpacked checkpoint lists, float64 sums.
    Returns (y, sum of |terms| of each output, for the FP32 rounding bound)."""
    w1, s1, w3, s3, w2, s2 = experts
    xd = ref_gemm.dequant_activation(x).double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    mag = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate = (xd[t] @ ref_gemm.dequant_fp4_weight(w1[e], s1[e], "mxfp4", None).double().t()).float()
            up = (xd[t] @ ref_gemm.dequant_fp4_weight(w3[e], s3[e], "mxfp4", None).double().t()).float()
            h = ref_act.swiglu(gate[None], up[None], limit, weights[t, j].reshape(1))
            hd = ref_gemm.dequant_activation(h)[0].double()
            w2d = ref_gemm.dequant_fp4_weight(w2[e], s2[e], "mxfp4", None).double()
            out[t] += hd @ w2d.t()
            mag[t] += hd.abs() @ w2d.abs().t()
    return out, mag


def fp32_bound(expect, mag, n_terms):
    """One bf16 rounding of the result plus FP32 summation of n_terms terms in any order."""
    return 2.0 ** -7 * expect.abs() + n_terms * 2.0 ** -23 * mag


# --- packing and the oracle ----------------------------------------------------------------

def test_pack_interleaves_w1_w3_in_blocks_and_unpacks_back():
    g = _gen(0)
    experts = random_experts(3, DIM, 2 * 128, g)
    w13, w13s, w2, w2s = ops.moe_pack_experts(*experts)
    assert w13.shape == (3, 4 * 128, DIM // 2) and w13.dtype == torch.uint8
    assert w13s.shape == (3, 4 * 128, DIM // 32) and w13s.dtype == torch.float8_e8m0fnu
    assert w2.shape == (3, DIM, 128) and w2s.shape == (3, DIM, 256 // 32)
    for e in range(3):
        assert torch.equal(w13[e, 128:256], experts[2][e][:128])  # w3 rows 0..127 second
        assert torch.equal(w13[e, 256:384], experts[0][e][128:])  # w1 rows 128..255 third
        w1, w3 = ref.unpack_w13(w13[e])
        assert torch.equal(w1, experts[0][e]) and torch.equal(w3, experts[2][e])
        s1, s3 = ref.unpack_w13(w13s[e])
        assert torch.equal(s1.view(torch.uint8), experts[1][e].view(torch.uint8))
        assert torch.equal(s3.view(torch.uint8), experts[3][e].view(torch.uint8))
        assert torch.equal(w2[e], experts[4][e]) and torch.equal(w2s[e].view(torch.uint8), experts[5][e].view(torch.uint8))


@given(t=st.integers(1, 6), k=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_oracle_matches_per_token_spec(t, k, seed):
    g = _gen(seed)
    experts = random_experts(EXPERTS, DIM, INTER, g)
    packed = ops.moe_pack_experts(*experts)
    x = integer_activations(t, DIM, g)
    w, ids = routing(t, k, EXPERTS, g)
    y = ops.moe_experts(x, w, ids, *packed)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    expect, mag = per_token_oracle(x, w, ids, experts)
    err = (y.double() - expect).abs()
    assert bool((err <= fp32_bound(expect, mag, INTER + k)).all())


# --- argument checks ---------------------------------------------------------------------

def _args(t=2, k=2, seed=0):
    g = _gen(seed)
    packed = ops.moe_pack_experts(*random_experts(4, DIM, INTER, g))
    x = torch.randn(t, DIM, generator=g).to(torch.bfloat16)
    w, ids = routing(t, k, 4, g)
    return [x, w, ids, *packed]


def test_duplicate_and_out_of_range_ids_rejected_in_checked_mode():
    args = _args()
    args[2] = torch.tensor([[1, 1], [0, 2]], dtype=torch.int32)
    set_checks(True)
    try:
        with pytest.raises(ValueError, match=r"^topk_ids: expected distinct experts"):
            ops.moe_experts(*args)
        args[2] = torch.tensor([[1, 4], [0, 2]], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"^topk_ids: expected expert ids in \[0, 4\)"):
            ops.moe_experts(*args)
    finally:
        set_checks(False)


@pytest.mark.parametrize("index, bad, err, name", [
    (0, torch.zeros(2, DIM), TypeError, "x"),
    (0, torch.zeros(2, DIM - 2, dtype=torch.bfloat16), ValueError, "w13"),
    (1, torch.ones(2, 3), ValueError, "topk_weights"),
    (1, torch.ones(2, 2, dtype=torch.float64), TypeError, "topk_weights"),
    (2, torch.zeros(2, 2, dtype=torch.int64), TypeError, "topk_ids"),
    (2, torch.zeros(3, 2, dtype=torch.int32), ValueError, "topk_ids"),
    (3, torch.zeros(4, 2 * INTER, DIM // 2, dtype=torch.int8), TypeError, "w13"),
    (4, torch.zeros(4, 2 * INTER, DIM // 16, dtype=torch.float8_e8m0fnu), ValueError, "w13_scale"),
    (5, torch.zeros(4, DIM, INTER, dtype=torch.uint8), ValueError, "w2"),
    (6, torch.zeros(4, DIM, INTER // 32, dtype=torch.float8_e4m3fn), TypeError, "w2_scale"),
    (7, 0.0, ValueError, "limit"),
    (8, "nvfp4", ValueError, "fmt"),
])
def test_bad_input_names_the_argument(index, bad, err, name):
    args = _args() + [10.0, "mxfp4"]
    args[index] = bad
    with pytest.raises(err, match=rf"^{name}:"):
        ops.moe_experts(*args)


def test_pack_rejects_bad_lists():
    g = _gen(1)
    experts = random_experts(2, DIM, INTER, g)
    with pytest.raises(ValueError, match=r"^w3: expected 2 tensors"):
        ops.moe_pack_experts(experts[0], experts[1], experts[2][:1], experts[3], experts[4], experts[5])
    bad = list(experts)
    bad[4] = [experts[4][0], experts[4][1][:, :-1]]
    with pytest.raises(ValueError, match=r"^w2\[1\]"):
        ops.moe_pack_experts(*bad)
    with pytest.raises(ValueError, match=r"^w1\[0\]: inter"):
        ops.moe_pack_experts(*random_experts(1, DIM, 64, g))
