"""The cuda backend of indexer_topk at decode sizes (cuda_fallback/csrc/sm90_indexer_scores.cu:
FP4 key rows, 64 heads, sm_90a; cuda_fallback/csrc/row_topk.cu: the selection of rows up to
MAX_ROW_KEYS): the scoring pass against the oracle, its exact FP4 decode, the selection
against the oracle's on the same scores, and the registry rule that sends the backend only
those arguments.  GPU only."""

import pytest
import torch
from hypothesis import assume, given, strategies as st

from cuda_fallback import indexer as cuda_indexer
from cuda_fallback.loader import extension_at
from dsv4_triton import ops, registry, use_backend
from dsv4_triton.kernels import indexer as kernels
from dsv4_triton.reference import indexer as ref
from dsv4_triton.reference import quant as ref_quant
from dsv4_triton.registry import BackendUnavailableError
from helpers import backends_called, needs_cuda_backend
from test_indexer import (assert_a_top_k, fp4_rows_every_code_and_scale, make_inputs, random_n_valid,
                          scores_tolerance)

pytestmark = pytest.mark.gpu
HEADS = 64


_needs_cuda_backend = needs_cuda_backend("indexer_topk")


def _cuda_topk(*args):
    """The cuda backend's function itself: these tests run it on sizes its registry rule
    (``covers``) leaves to Triton too."""
    return registry.ops()["indexer_topk"].impls["cuda"].fn(*args)


def _scores_over(args, fill):
    """The scoring kernel's output written over a tensor filled with ``fill``."""
    qi, w, keys, n_valid = args
    queries, n_keys = qi.shape[0] * qi.shape[1], keys.shape[1]
    scores = torch.full((queries, n_keys), fill, device=qi.device)
    extension_at(qi.device.index).indexer_scores_fp4(qi, w, keys, n_valid, scores,
                                                     cuda_indexer.tiles_per_cta(queries, n_keys, qi.device),
                                                     torch.cuda.current_stream(qi.device).cuda_stream)
    return scores


def _packed_inputs(seed, bsz, seq, n_keys, integer=False):
    g = torch.Generator().manual_seed(seed)
    qi, w, keys = make_inputs(g, bsz, seq, HEADS, n_keys, integer=integer)
    packed = ref.pack_indexer_keys(keys if integer else ref_quant.qat4(keys, 32))
    return g, qi, w, packed


@given(bsz=st.integers(1, 3), seq=st.integers(1, 2), n_keys=st.integers(1, 700), k=st.integers(1, 80),
       sms=st.sampled_from([1, 3, 1000]), seed=st.integers(0, 2**31))
def test_scores_and_selection_match_oracle(device, bsz, seq, n_keys, k, sms, seed):
    """Gaussian inputs (QAT'd keys): the scores below each query's n_valid equal the oracle's
    within FP32 summation order (``scores_tolerance``), nothing past it is written; the
    selection is a top-k of the oracle's scores up to that tolerance.  The
    SM count sets the tiles a CTA runs (1 SM: every tile of a query in one CTA, an odd or even
    number of them; 1000: one tile a CTA)."""
    g, qi, w, packed = _packed_inputs(seed, bsz, seq, n_keys)
    n_valid = random_n_valid(g, bsz, seq, n_keys)
    args = [t.to(device) for t in (qi, w, packed, n_valid)]
    sentinel = 12345.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_indexer, "sm_count", lambda device: sms)
        scores = _scores_over(args, sentinel).cpu().reshape(bsz, seq, n_keys)
        got = _cuda_topk(*args, k).cpu()
    expected = ref.indexer_scores(qi, w, packed)
    for b in range(bsz):
        for t in range(seq):
            n = int(n_valid[b, t])
            assert torch.all(scores[b, t, n:] == sentinel), "written past n_valid"
            want = expected[b, t, :n]
            torch.testing.assert_close(scores[b, t, :n], want, rtol=0, atol=scores_tolerance(want))
            assert_a_top_k(got[b, t], want, k)


@pytest.mark.parametrize("bsz, n_keys, k", [(1, 32768, 1024), (4, 5000, 512), (32, 2048, 1024), (3, 63, 16)])
def test_integer_scores_select_exactly(device, bsz, n_keys, k):
    """Small integers: every score is exact in FP32 whatever the summation order, so the
    selection equals the oracle's index for index (decode sizes of the release and odd ones)."""
    g, qi, w, packed = _packed_inputs(7, bsz, 1, n_keys, integer=True)
    n_valid = random_n_valid(g, bsz, 1, n_keys)
    args = [t.to(device) for t in (qi, w, packed, n_valid)]
    assert torch.equal(cuda_indexer.indexer_scores(*args).cpu().reshape(bsz, 1, n_keys)[n_valid[..., None] >
                                                                                       torch.arange(n_keys)],
                       ref.indexer_scores(qi, w, packed)[n_valid[..., None] > torch.arange(n_keys)])
    assert torch.equal(_cuda_topk(*args, k).cpu(), ref.indexer_topk(qi, w, packed, n_valid, k))


@pytest.mark.parametrize("bsz, n_keys, k", [(1, 32768, 1024), (32, 4096, 512), (2, 70000, 100)])
def test_bf16_keys_scored_by_triton_selected_by_cluster(device, bsz, n_keys, k):
    """BF16 keys: the backend scores them with the Triton kernel and selects with the cluster
    kernel (8 CTAs a row, 16 for the two long rows, one CTA a row for the 32 short ones);
    small integers make every score exact, so the result is the oracle's index for index."""
    g = torch.Generator().manual_seed(11)
    qi, w, keys = make_inputs(g, bsz, 1, HEADS, n_keys, integer=True)
    n_valid = random_n_valid(g, bsz, 1, n_keys)
    assert cuda_indexer.selection_covers(n_keys) == ""
    args = [t.to(device) for t in (qi, w, keys, n_valid)]
    assert torch.equal(_cuda_topk(*args, k).cpu(), ref.indexer_topk(qi, w, keys, n_valid, k))


def test_fp4_decode_every_code_and_scale(device):
    """Every key value alone: query b is 1.0 in value b of every head (0 elsewhere) and w keeps
    head 0 only, so score (b, s) is key s's value b (one product, nothing summed) whatever
    the order of the sums.  Random codes (all 16 in row 0) under E8M0 scales 2^-127 .. 2^127
    and the NaN byte: the CUDA decode gives what the Triton kernel gives on the BF16 keys
    they decode to, bit for bit (NaN and Inf included), and the oracle's value where finite."""
    n_rows = 600
    rows = fp4_rows_every_code_and_scale(torch.Generator().manual_seed(3), n_rows)
    packed = rows[None].expand(128, -1, -1).contiguous()
    decoded = ref.key_values(packed).to(torch.bfloat16)
    qi = torch.zeros(128, 1, HEADS, 128, dtype=torch.bfloat16)
    qi[torch.arange(128), 0, :, torch.arange(128)] = 1.0
    w = torch.zeros(128, 1, HEADS)
    w[:, 0, 0] = 1.0
    n_valid = torch.full((128, 1), n_rows, dtype=torch.int32)
    args = [t.to(device) for t in (qi, w)]
    got = cuda_indexer.indexer_scores(*args, packed.to(device), n_valid.to(device)).cpu()
    triton_bf16 = kernels.indexer_scores(*args, decoded.to(device), n_valid.to(device)).cpu()
    torch.testing.assert_close(got, triton_bf16, rtol=0, atol=0, equal_nan=True)
    finite = ref.indexer_scores(qi, w, packed).reshape(128, n_rows)
    ok = finite.isfinite()
    assert torch.equal(got[ok], finite[ok]) and got.isnan().any() and (got[ok] != 0).any()


def test_empty_and_clamped_lengths(device):
    """n_valid 0 (nothing written, all -1), past Nk (clamped: every key), and no keys at all."""
    _, qi, w, packed = _packed_inputs(4, 3, 1, 300, integer=True)
    n_valid = torch.tensor([[0], [300], [1000]], dtype=torch.int32)
    args = [t.to(device) for t in (qi, w, packed, n_valid)]
    got = _cuda_topk(*args, 8).cpu()
    assert torch.all(got[0] == -1)
    assert torch.equal(got[1:], ref.indexer_topk(qi[1:], w[1:], packed[1:], n_valid[1:].clamp(max=300), 8))
    none = _cuda_topk(args[0], args[1], args[2][:, :0], args[3], 8).cpu()
    assert torch.all(none == -1)


def test_strided_and_misaligned_inputs(device):
    """Non-contiguous qi / w / n_valid and key rows that are not 4-byte aligned (copied first)."""
    _, qi, w, packed = _packed_inputs(5, 2, 1, 777, integer=True)
    n_valid = torch.tensor([[777], [400]], dtype=torch.int32)
    want = ref.indexer_topk(qi, w, packed, n_valid, 64)
    qi_s = torch.zeros(2, 1, HEADS, 256, dtype=qi.dtype, device=device)[..., :128]  # rows 512 bytes apart
    qi_s.copy_(qi)
    w_s = torch.zeros(2, 1, 2 * HEADS, device=device)[..., ::2]
    w_s.copy_(w)
    nv_s = torch.zeros(2, 2, dtype=torch.int32, device=device)[:, ::2]
    nv_s.copy_(n_valid)
    keys_odd = torch.zeros(2, 777 * 68 + 1, dtype=torch.uint8)
    keys_odd[:, 1:] = packed.reshape(2, -1)
    keys_odd = keys_odd.to(device)[:, 1:].view(2, 777, 68)
    assert torch.equal(_cuda_topk(qi_s, w_s, keys_odd, nv_s, 64).cpu(), want)


def test_cuda_graph_replays(device):
    _, qi, w, packed = _packed_inputs(6, 2, 1, 4000, integer=True)
    n_valid = torch.tensor([[4000], [1234]], dtype=torch.int32)
    args = [t.to(device) for t in (qi, w, packed, n_valid)]
    eager = _cuda_topk(*args, 256)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        _cuda_topk(*args, 256)  # warm: build, tune the selection
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = _cuda_topk(*args, 256)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    args[3].fill_(100)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ref.indexer_topk(qi, w, packed, torch.full_like(n_valid, 100), 256))


def _special_scores(g, rows, n_keys, kind):
    """FP32 score rows of one kind: Gaussian over many octaves; small integers (many ties);
    distinct values of one binade (the top digits shared: every radix level decides); one value
    everywhere; Gaussian with NaN, +-Inf, +-0, subnormals and huge values scattered in."""
    if kind == "gaussian":
        return torch.randn(rows, n_keys, generator=g) * torch.exp2(torch.randint(-20, 20, (rows, 1), generator=g))
    if kind == "integers":
        return torch.randint(-3, 4, (rows, n_keys), generator=g).float()
    if kind == "one binade":
        return torch.stack([1024.0 + torch.randperm(n_keys, generator=g).float() * (1024.0 / max(n_keys, 1024))
                            for _ in range(rows)])
    if kind == "equal":
        return torch.full((rows, n_keys), -2.5)
    scores = torch.randn(rows, n_keys, generator=g)
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45,
                             3e38, -3e38])
    where = torch.rand(rows, n_keys, generator=g) < 0.05
    pick = torch.randint(0, len(specials), (rows, n_keys), generator=g)
    return torch.where(where, specials[pick], scores)


@pytest.mark.parametrize("row_keys", [None, 8192, 8193, 16385, 32769, 65537, 131073, cuda_indexer.MAX_ROW_KEYS])
@given(bsz=st.integers(1, 3), seq=st.integers(1, 2), short_keys=st.integers(1, 3000), k=st.integers(1, 2100),
       kind=st.sampled_from(["gaussian", "integers", "one binade", "equal", "special"]),
       cluster=st.sampled_from([1, 8, 16]), seed=st.integers(0, 2**31))
def test_row_selection_equals_oracle(device, row_keys, bsz, seq, short_keys, k, kind, cluster, seed):
    """The cluster selection on given scores: the oracle's indices exactly (ascending, ties to
    the lower index, NaN first, -0.0 == +0.0, -1 padding), for every keys-a-thread size (rows
    just past each power of two up to MAX_ROW_KEYS, and short ones), n_valid 0 / Nk / between,
    k above and below both, one CTA a row and clusters of 8 and 16; no write lands past a row's
    k slots."""
    n_keys = row_keys or short_keys
    assume(cluster != 1 or n_keys <= cuda_indexer.ONE_CTA_ROW_KEYS)  # longer rows: ValueError, tested below
    g = torch.Generator().manual_seed(seed)
    rows = bsz * seq
    scores = _special_scores(g, rows, n_keys, kind)
    n_valid = random_n_valid(g, bsz, seq, n_keys)
    out = torch.full((rows + 1, k), -7, dtype=torch.int32, device=device)  # the last row guards
    cuda_indexer.select_rows(scores.to(device), n_valid.to(device), out[:rows], k, cluster)
    assert torch.equal(out[:rows].cpu().view(bsz, seq, k), ref.select_topk(scores.view(bsz, seq, n_keys), n_valid, k))
    assert torch.all(out[rows] == -7)


def test_row_selection_rejects_long_rows(device):
    scores = torch.zeros(1, cuda_indexer.MAX_ROW_KEYS + 1, device=device)
    n_valid = torch.ones(1, 1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="scores: expected rows of at most"):
        cuda_indexer.select_rows(scores, n_valid, torch.empty(1, 4, dtype=torch.int32, device=device), 4)
    with pytest.raises(ValueError, match="cluster: expected 1, 8 or 16"):
        cuda_indexer.select_rows(scores[:, :8], n_valid, torch.empty(1, 4, dtype=torch.int32, device=device), 4, 4)
    with pytest.raises(ValueError, match="for one CTA a row"):
        cuda_indexer.select_rows(scores[:, :cuda_indexer.ONE_CTA_ROW_KEYS + 1], n_valid,
                                 torch.empty(1, 4, dtype=torch.int32, device=device), 4, 1)


def test_cluster_occupancy_query(device):
    """Clusters of 8 (the portable size) run on every sm_90 part, and so do clusters of 16 on
    a full H100 SXM (132 SMs, GPCs of 16 and more); other sizes raise, with the message."""
    index = torch.cuda.current_device()
    ext = extension_at(index)
    assert ext.row_topk_max_clusters(8, index) > 0
    if torch.cuda.get_device_properties(index).multi_processor_count >= 132:
        assert ext.row_topk_max_clusters(16, index) > 0 and cuda_indexer._runs_clusters_of_16(index)
    with pytest.raises(RuntimeError, match="cluster: expected 8 or 16 CTAs a row, got 4"):
        ext.row_topk_max_clusters(4, index)


def test_registry_rule(device, monkeypatch):
    """Up to MAX_QUERIES queries go to the cuda backend by default when its scoring kernel
    takes them (FP4 keys, 64 heads, runs of MIN_TILES_PER_CTA tiles a CTA) or its selection
    does (rows of up to MAX_ROW_KEYS keys); the rest, and prefill sizes, go to Triton, and
    forcing cuda on them raises with both reasons."""
    monkeypatch.setattr(cuda_indexer, "sm_count", lambda device: 1)
    monkeypatch.setattr(cuda_indexer, "CTAS_PER_SM", 3)  # 500 keys: 8 tiles, 3 a CTA
    monkeypatch.setattr(cuda_indexer, "MIN_TILES_PER_CTA", 3)
    monkeypatch.setattr(cuda_indexer, "MAX_ROW_KEYS", 300)
    _, qi, w, packed = _packed_inputs(8, 1, 1, 500, integer=True)
    n_valid = torch.tensor([[500]], dtype=torch.int32)
    args = [t.to(device) for t in (qi, w, packed, n_valid)]
    ran = backends_called(monkeypatch, "indexer_topk")
    bf16_keys = ref.key_values(packed).to(torch.bfloat16).to(device)
    ops.indexer_topk(*args, 16)  # scored and selected by CUDA
    ops.indexer_topk(args[0], args[1], bf16_keys, args[3], 16)  # neither: 500 keys a row
    ops.indexer_topk(args[0], args[1], args[2][:, :200], args[3], 16)  # selected only (2 tiles a CTA)
    ops.indexer_topk(args[0], args[1], bf16_keys[:, :300], args[3], 16)  # selected only (BF16 keys)
    assert ran == ["cuda", "triton", "cuda", "cuda"]
    covers = registry.ops()["indexer_topk"].impls["cuda"].covers
    many = qi.to(device).expand(1, cuda_indexer.MAX_QUERIES + 1, HEADS, 128)
    assert "queries" in covers(many, args[1], args[2], args[3], 16)
    assert "heads" in covers(args[0][:, :, :32], args[1][:, :, :32], args[2], args[3], 16)
    assert "tiles a CTA" in covers(args[0], args[1], args[2][:, :350], args[3], 16)  # 2 tiles a CTA, 350 keys
    with use_backend("cuda", ops=["indexer_topk"]), pytest.raises(BackendUnavailableError, match="BF16 keys.*500"):
        ops.indexer_topk(args[0], args[1], bf16_keys, args[3], 16)
    assert cuda_indexer.selection_covers(cuda_indexer.MAX_ROW_KEYS) == ""
    assert "rows of" in cuda_indexer.selection_covers(cuda_indexer.MAX_ROW_KEYS + 1)
