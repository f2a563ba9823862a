"""The cuda backend of moe_experts at decode sizes (cuda_fallback/csrc/moe_decode.cu) and at
prefill sizes (csrc/sm90_moe_prefill.cu) against the oracle with the same allowances as the
Triton path, and the registry rule that sends it the batches of 16-row and (sm90a) 128-row
expert blocks only.  GPU only."""

from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

from cuda_fallback import moe as cuda_moe
from cuda_fallback.loader import arch_of
from dsv4_triton import ops, registry, use_backend
from dsv4_triton.reference import moe as ref
from dsv4_triton.registry import BackendUnavailableError
from helpers import counting_backends, needs_cuda_backend
from test_moe import (DIM, EDGE_CASES, EXPERTS, INTER, _gen, assert_moe_close, edge_case_routing, flash_error,
                      integer_activations, random_experts, routing)

pytestmark = pytest.mark.gpu


_needs_cuda_backend = needs_cuda_backend("moe_experts")


def _cuda_moe(*args):
    with use_backend("cuda", ops=["moe_experts"]):
        return ops.moe_experts(*args)


def _prefill_moe(*args):
    """The cuda backend with 128-row expert blocks (the prefill kernels) whatever the batch size."""
    with mock.patch.object(cuda_moe, "cuda_block_m", lambda pairs, n_experts: cuda_moe.PREFILL_BLOCK_M):
        return _cuda_moe(*args)


_needs_sm90a = pytest.mark.skipif(not torch.cuda.is_available() or arch_of(torch.device("cuda")) != "sm90a",
                                  reason="the prefill kernels target sm90a")


def _packed(n_experts, dim, inter, g, device):
    return [p.to(device) for p in ops.moe_pack_experts(*random_experts(n_experts, dim, inter, g))]


def _check_oracle(run, device, t, k, limit, integer_x, seed):
    """One drawn batch over the tiny experts through ``run`` against the oracle."""
    g = _gen(seed)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    x = integer_activations(t, DIM, g) if integer_x else torch.randn(t, DIM, generator=g).to(torch.bfloat16)
    w, ids = routing(t, k, EXPERTS, g)
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    y = run(x, w, ids, *packed, limit)
    assert y.dtype == torch.bfloat16 and y.shape == (t, DIM)
    assert_moe_close(y, x, w, ids, packed, limit)


def _check_edge_case(run, device, case, seed):
    """An EDGE_CASES routing, or ``nan_scale`` (an E8M0 NaN in expert 2's w2: its pairs' outputs
    NaN in column 7), through ``run`` against the oracle."""
    g = _gen(seed)
    experts = random_experts(EXPERTS, DIM, INTER, g)
    if case == "nan_scale":
        experts[5][2].view(torch.uint8)[7, 1] = 0xFF
    packed = [p.to(device) for p in ops.moe_pack_experts(*experts)]
    x, w, ids = edge_case_routing(case, g)
    if case == "nan_scale":
        ids[0, 0] = 2
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    expect = assert_moe_close(run(x, w, ids, *packed), x, w, ids, packed)
    if case == "nan_token":
        assert bool(torch.isnan(expect[4]).all()) and not bool(torch.isnan(expect[3]).any())
    if case == "nan_scale":
        assert bool(torch.isnan(expect[0, 7]))


def _pro_sized(device, seed, n_experts, t):
    """Pro's expert sizes (dim 7168, inter 3072) with ``n_experts`` experts of random codes and
    ``t`` tokens x 6: the moe_experts arguments, on the GPU."""
    g = torch.Generator(device=device).manual_seed(seed)
    dim, inter = 7168, 3072
    (codes13, scales13), (codes2, scales2) = (ref.packed_shapes(n_experts, 2 * inter, dim),
                                              ref.packed_shapes(n_experts, dim, inter))
    w13 = torch.randint(0, 256, codes13, device=device, generator=g, dtype=torch.uint8)
    w2 = torch.randint(0, 256, codes2, device=device, generator=g, dtype=torch.uint8)
    s13 = (torch.randint(-10, -6, scales13, device=device, generator=g) + 127).to(torch.uint8)
    s2 = (torch.randint(-10, -6, scales2, device=device, generator=g) + 127).to(torch.uint8)
    x = torch.randn(t, dim, device=device, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(n_experts, device=device, generator=g)[:6] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, 6, device=device, generator=g) + 0.1
    return x, w, ids, w13, s13.view(torch.float8_e8m0fnu), w2, s2.view(torch.float8_e8m0fnu)


def _relative_error(y, args):
    """Relative Frobenius error of ``y`` against the oracle (reference backend, FP32) on the GPU:
    FP32 summation order and a few flipped FP8 codes of the w2 input, far less than one bf16
    rounding."""
    with use_backend("reference", ops=["moe_experts"]):
        oracle = ops.moe_experts(*args).float()
    return float((y.float() - oracle).norm() / oracle.norm())


@given(t=st.integers(1, 40), k=st.integers(1, 3), limit=st.sampled_from([10.0, 0.05]), integer_x=st.booleans(),
       seed=st.integers(0, 2**31))
def test_matches_oracle(device, t, k, limit, integer_x, seed):
    # Up to 120 pairs over 8 experts: blocks of several real rows, in both MMA column groups.
    _check_oracle(_cuda_moe, device, t, k, limit, integer_x, seed)


@pytest.mark.parametrize("case", EDGE_CASES + ["nan_scale"])
def test_routing_edge_cases(device, case):
    _check_edge_case(_cuda_moe, device, case, 11)


@pytest.mark.parametrize("t, n_experts, block_m", [(64, 64, 16), pytest.param(256, 8, 128, marks=_needs_sm90a)],
                         ids=["decode", "prefill"])
def test_model_sized_rows(device, t, n_experts, block_m):
    # dim 1024 / inter 512 (8 and 4 K blocks; decode: 4 w13 column tiles, 8 w2 row tiles of a
    # CTA; prefill: 8 w13 and 8 w2 weight tiles), 6 experts a token, blocks chosen by the
    # registry's own rule: decode, 64 tokens of 64 experts, blocks of up to 16 real rows and
    # experts with none; prefill, 256 tokens of 8 experts, ~192 rows an expert, so full 128-row
    # blocks and partly filled ones.
    g = _gen(21)
    packed = _packed(n_experts, 1024, 512, g, device)
    x = torch.randn(t, 1024, generator=g).to(torch.bfloat16)
    w, ids = routing(t, 6, n_experts, g)
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    assert cuda_moe.cuda_block_m(ids.numel(), n_experts) == block_m
    assert_moe_close(_cuda_moe(x, w, ids, *packed), x, w, ids, packed)


def test_pro_decode_shape(device):
    # Pro's decode step (dim 7168, inter 3072, 6 experts of a token, 64 tokens), with 32 experts
    # so the weights stay small.
    args = _pro_sized(device, 5, 32, 64)
    err = _relative_error(_cuda_moe(*args), args)
    assert err < 2.0 ** -8, f"relative error {err:.3g}"


counted = counting_backends("moe_experts")


def test_dispatch_sends_decode_sizes_and_past_24_an_expert_to_cuda(device, counted):
    assert registry.selected_backend("moe_experts", device) == "cuda, else triton"
    g = _gen(3)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    prefill = "cuda" if arch_of(device) == "sm90a" else "triton"
    # 2 experts a token of 8: 16 pairs an expert at 64 tokens, 24 at 96
    for t, expect in ((1, ["cuda"]), (64, ["cuda"]), (65, ["triton"]), (96, ["triton"]), (97, [prefill]),
                      (0, ["triton"]), (600, [prefill])):
        counted.clear()
        w, ids = routing(t, 2, EXPERTS, g)
        ops.moe_experts(torch.randn(t, DIM, generator=g).to(torch.bfloat16).to(device), w.to(device), ids.to(device),
                        *packed)
        assert counted == expect, (t, counted)


def test_forcing_cuda_on_17_to_24_pairs_an_expert_is_an_error(device):
    g = _gen(4)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    w, ids = routing(70, 2, EXPERTS, g)
    with pytest.raises(BackendUnavailableError, match="32-row blocks are as fast"):
        _cuda_moe(torch.randn(70, DIM, generator=g).to(torch.bfloat16).to(device), w.to(device), ids.to(device),
                  *packed)


@pytest.mark.parametrize("t", [8, pytest.param(600, marks=_needs_sm90a)], ids=["decode", "prefill"])
def test_cuda_graph_replay(device, t):
    g = _gen(9)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    w, ids = routing(t, 2, EXPERTS, g)
    x = torch.randn(t, DIM, generator=g).to(torch.bfloat16).to(device)
    w, ids = w.to(device), ids.to(device)
    ops.moe_experts(x, w, ids, *packed)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.moe_experts(x, w, ids, *packed)
    x.copy_(torch.randn(t, DIM, generator=g).to(torch.bfloat16))
    ids.copy_(routing(t, 2, EXPERTS, g)[1].to(device))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, _cuda_moe(x, w, ids, *packed))
    assert_moe_close(y, x, w, ids, packed)


@pytest.mark.parametrize("t", [1, 64])
def test_flash_shapes(device, t):
    err = flash_error("cuda", t, device)
    assert err < 2.0 ** -8, f"relative error {err:.3g}"


# --- prefill: 128-row expert blocks (csrc/sm90_moe_prefill.cu) ---------------------------------

@_needs_sm90a
@given(t=st.integers(1, 40), k=st.integers(1, 3), limit=st.sampled_from([10.0, 0.05]), integer_x=st.booleans(),
       seed=st.integers(0, 2**31))
def test_prefill_matches_oracle(device, t, k, limit, integer_x, seed):
    # 128-row blocks forced on small batches: blocks mostly padding, several experts with none,
    # one K block in w2 (inter 128) and two in w13.
    _check_oracle(_prefill_moe, device, t, k, limit, integer_x, seed)


@_needs_sm90a
@pytest.mark.parametrize("case", EDGE_CASES + ["nan_scale"])
def test_prefill_routing_edge_cases(device, case):
    _check_edge_case(_prefill_moe, device, case, 13)


@_needs_sm90a
def test_prefill_pro_shape(device):
    # Pro's expert sizes with 8 experts and 256 tokens x 6 (128-row blocks by the registry's
    # rule), and the Triton path beside it.
    args = _pro_sized(device, 6, 8, 256)
    with use_backend("triton", ops=["moe_experts"]):
        triton_y = ops.moe_experts(*args)
    for name, got in (("cuda", _cuda_moe(*args)), ("triton", triton_y)):
        err = _relative_error(got, args)
        assert err < 2.0 ** -8, f"{name}: relative error {err:.3g}"
