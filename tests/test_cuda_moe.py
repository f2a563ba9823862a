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
    with mock.patch.object(cuda_moe, "block_m_for", lambda pairs, n_experts: cuda_moe.PREFILL_BLOCK_M):
        return _cuda_moe(*args)


_needs_sm90a = pytest.mark.skipif(not torch.cuda.is_available() or arch_of(torch.device("cuda")) != "sm90a",
                                  reason="the prefill kernels target sm90a")


def _packed(n_experts, dim, inter, g, device):
    return [p.to(device) for p in ops.moe_pack_experts(*random_experts(n_experts, dim, inter, g))]


@given(t=st.integers(1, 40), k=st.integers(1, 3), limit=st.sampled_from([10.0, 0.05]), integer_x=st.booleans(),
       seed=st.integers(0, 2**31))
def test_matches_oracle(device, t, k, limit, integer_x, seed):
    # Up to 120 pairs over 8 experts: blocks of several real rows, in both MMA column groups.
    g = _gen(seed)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    x = integer_activations(t, DIM, g) if integer_x else torch.randn(t, DIM, generator=g).to(torch.bfloat16)
    w, ids = routing(t, k, EXPERTS, g)
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    y = _cuda_moe(x, w, ids, *packed, limit)
    assert y.dtype == torch.bfloat16 and y.shape == (t, DIM)
    assert_moe_close(y, x, w, ids, packed, limit)


@pytest.mark.parametrize("case", EDGE_CASES + ["nan_scale"])
def test_routing_edge_cases(device, case):
    g = _gen(11)
    experts = random_experts(EXPERTS, DIM, INTER, g)
    if case == "nan_scale":  # an E8M0 NaN in expert 2's w2: its pairs' outputs NaN in column 7
        experts[5][2].view(torch.uint8)[7, 1] = 0xFF
    packed = [p.to(device) for p in ops.moe_pack_experts(*experts)]
    x, w, ids = edge_case_routing(case, g)
    if case == "nan_scale":
        ids[0, 0] = 2
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    expect = assert_moe_close(_cuda_moe(x, w, ids, *packed), x, w, ids, packed)
    if case == "nan_token":
        assert bool(torch.isnan(expect[4]).all()) and not bool(torch.isnan(expect[3]).any())
    if case == "nan_scale":
        assert bool(torch.isnan(expect[0, 7]))


def test_model_sized_rows(device):
    # dim 1024 / inter 512 (8 and 4 K blocks, 4 w13 column tiles, 8 w2 row tiles of a CTA),
    # 64 tokens x 6 of 64 experts: blocks with up to 16 real rows, experts with none.
    g = _gen(21)
    packed = _packed(64, 1024, 512, g, device)
    x = torch.randn(64, 1024, generator=g).to(torch.bfloat16)
    w, ids = routing(64, 6, 64, g)
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    assert_moe_close(_cuda_moe(x, w, ids, *packed), x, w, ids, packed)


def test_pro_decode_shape(device):
    # Pro's decode step (dim 7168, inter 3072, 6 experts of a token, 64 tokens), with 32 experts
    # so the weights stay small; the oracle (reference backend, FP32) on the GPU.
    g = torch.Generator(device=device).manual_seed(5)
    e, dim, inter = 32, 7168, 3072
    (codes13, scales13), (codes2, scales2) = ref.packed_shapes(e, 2 * inter, dim), ref.packed_shapes(e, dim, inter)
    w13 = torch.randint(0, 256, codes13, device=device, generator=g, dtype=torch.uint8)
    w2 = torch.randint(0, 256, codes2, device=device, generator=g, dtype=torch.uint8)
    s13 = (torch.randint(-10, -6, scales13, device=device, generator=g) + 127).to(torch.uint8)
    s2 = (torch.randint(-10, -6, scales2, device=device, generator=g) + 127).to(torch.uint8)
    s13, s2 = s13.view(torch.float8_e8m0fnu), s2.view(torch.float8_e8m0fnu)
    x = torch.randn(64, dim, device=device, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, device=device, generator=g)[:6] for _ in range(64)]).to(torch.int32)
    w = torch.rand(64, 6, device=device, generator=g) + 0.1
    y = _cuda_moe(x, w, ids, w13, s13, w2, s2)
    with use_backend("reference", ops=["moe_experts"]):
        oracle = ops.moe_experts(x, w, ids, w13, s13, w2, s2)
    # Relative Frobenius error, as the Triton path's test at Flash sizes: FP32 summation order and
    # a few flipped FP8 codes of the w2 input, far less than one bf16 rounding.
    err = (y.float() - oracle.float()).norm() / oracle.float().norm()
    assert err < 2.0 ** -8, f"relative error {err:.3g}"


counted = counting_backends("moe_experts")


def test_dispatch_sends_16_and_128_row_blocks_to_cuda_and_the_rest_to_triton(device, counted):
    assert registry.selected_backend("moe_experts", device) == "cuda, else triton"
    g = _gen(3)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    prefill = "cuda" if arch_of(device) == "sm90a" else "triton"
    for t, expect in ((1, ["cuda"]), (64, ["cuda"]), (65, ["triton"]), (0, ["triton"]), (600, [prefill])):
        counted.clear()
        w, ids = routing(t, 2, EXPERTS, g)
        ops.moe_experts(torch.randn(t, DIM, generator=g).to(torch.bfloat16).to(device), w.to(device), ids.to(device),
                        *packed)
        assert counted == expect, (t, counted)


def test_forcing_cuda_on_32_row_blocks_is_an_error(device):
    g = _gen(4)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    w, ids = routing(70, 2, EXPERTS, g)
    with pytest.raises(BackendUnavailableError, match="32-row expert blocks"):
        _cuda_moe(torch.randn(70, DIM, generator=g).to(torch.bfloat16).to(device), w.to(device), ids.to(device),
                  *packed)


def test_cuda_graph_replay(device):
    g = _gen(9)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    w, ids = routing(8, 2, EXPERTS, g)
    x = torch.randn(8, DIM, generator=g).to(torch.bfloat16).to(device)
    w, ids = w.to(device), ids.to(device)
    ops.moe_experts(x, w, ids, *packed)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.moe_experts(x, w, ids, *packed)
    x.copy_(torch.randn(8, DIM, generator=g).to(torch.bfloat16))
    ids.copy_(routing(8, 2, EXPERTS, g)[1].to(device))
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
    g = _gen(seed)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    x = integer_activations(t, DIM, g) if integer_x else torch.randn(t, DIM, generator=g).to(torch.bfloat16)
    w, ids = routing(t, k, EXPERTS, g)
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    y = _prefill_moe(x, w, ids, *packed, limit)
    assert y.dtype == torch.bfloat16 and y.shape == (t, DIM)
    assert_moe_close(y, x, w, ids, packed, limit)


@_needs_sm90a
@pytest.mark.parametrize("case", EDGE_CASES + ["nan_scale"])
def test_prefill_routing_edge_cases(device, case):
    g = _gen(13)
    experts = random_experts(EXPERTS, DIM, INTER, g)
    if case == "nan_scale":  # an E8M0 NaN in expert 2's w2: its pairs' outputs NaN in column 7
        experts[5][2].view(torch.uint8)[7, 1] = 0xFF
    packed = [p.to(device) for p in ops.moe_pack_experts(*experts)]
    x, w, ids = edge_case_routing(case, g)
    if case == "nan_scale":
        ids[0, 0] = 2
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    expect = assert_moe_close(_prefill_moe(x, w, ids, *packed), x, w, ids, packed)
    if case == "nan_token":
        assert bool(torch.isnan(expect[4]).all()) and not bool(torch.isnan(expect[3]).any())
    if case == "nan_scale":
        assert bool(torch.isnan(expect[0, 7]))


@_needs_sm90a
def test_prefill_full_blocks(device):
    # dim 1024 / inter 512 (8 and 4 K blocks; 8 w13 and 8 w2 weight tiles), 256 tokens x 6 of 8
    # experts: ~192 rows an expert, so full 128-row blocks and partly filled ones, chosen by
    # the registry's own rule.
    g = _gen(22)
    packed = _packed(8, 1024, 512, g, device)
    x = torch.randn(256, 1024, generator=g).to(torch.bfloat16)
    w, ids = routing(256, 6, 8, g)
    x, w, ids = x.to(device), w.to(device), ids.to(device)
    assert cuda_moe.block_m_for(ids.numel(), 8) == cuda_moe.PREFILL_BLOCK_M
    assert_moe_close(_cuda_moe(x, w, ids, *packed), x, w, ids, packed)


@_needs_sm90a
def test_prefill_pro_shape(device):
    # Pro's expert sizes (dim 7168, inter 3072) with 8 experts and 256 tokens x 6: the oracle
    # (reference backend, FP32) on the GPU, and the Triton path beside it.
    g = torch.Generator(device=device).manual_seed(6)
    e, dim, inter, t = 8, 7168, 3072, 256
    (codes13, scales13), (codes2, scales2) = ref.packed_shapes(e, 2 * inter, dim), ref.packed_shapes(e, dim, inter)
    w13 = torch.randint(0, 256, codes13, device=device, generator=g, dtype=torch.uint8)
    w2 = torch.randint(0, 256, codes2, device=device, generator=g, dtype=torch.uint8)
    s13 = (torch.randint(-10, -6, scales13, device=device, generator=g) + 127).to(torch.uint8)
    s2 = (torch.randint(-10, -6, scales2, device=device, generator=g) + 127).to(torch.uint8)
    s13, s2 = s13.view(torch.float8_e8m0fnu), s2.view(torch.float8_e8m0fnu)
    x = torch.randn(t, dim, device=device, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, device=device, generator=g)[:6] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, 6, device=device, generator=g) + 0.1
    y = _cuda_moe(x, w, ids, w13, s13, w2, s2)
    with use_backend("reference", ops=["moe_experts"]):
        oracle = ops.moe_experts(x, w, ids, w13, s13, w2, s2)
    with use_backend("triton", ops=["moe_experts"]):
        triton_y = ops.moe_experts(x, w, ids, w13, s13, w2, s2)
    # As test_pro_decode_shape: FP32 summation order and a few flipped FP8 codes of the w2 input.
    for name, got in (("cuda", y), ("triton", triton_y)):
        err = (got.float() - oracle.float()).norm() / oracle.float().norm()
        assert err < 2.0 ** -8, f"{name}: relative error {err:.3g}"


@_needs_sm90a
def test_prefill_cuda_graph_replay(device):
    g = _gen(19)
    packed = _packed(EXPERTS, DIM, INTER, g, device)
    w, ids = routing(600, 2, EXPERTS, g)
    x = torch.randn(600, DIM, generator=g).to(torch.bfloat16).to(device)
    w, ids = w.to(device), ids.to(device)
    ops.moe_experts(x, w, ids, *packed)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.moe_experts(x, w, ids, *packed)
    x.copy_(torch.randn(600, DIM, generator=g).to(torch.bfloat16))
    ids.copy_(routing(600, 2, EXPERTS, g)[1].to(device))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, _cuda_moe(x, w, ids, *packed))
