"""indexer_topk: the oracle against SPEC 7 written out by hand, the Triton kernels against the oracle,
and the rule by which the cuda backend picks its selection kernel's CTAs a row."""

from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

from cuda_fallback import indexer as cuda_indexer
from dsv4_triton import ops, set_checks, use_backend
from dsv4_triton.kernels import indexer as kernels
from dsv4_triton.reference import indexer as ref
from dsv4_triton.reference import quant as ref_quant

from helpers import compile_for_sm90

HEAD_DIM = 128


def make_inputs(g, bsz, seq, heads, n_keys, integer=False):
    """Random indexer inputs.  ``integer``: small integers in qi, keys and w, so every score
    is an integer below 2^24 and exact in FP32 whatever the summation order."""
    if integer:
        qi = torch.randint(-2, 3, (bsz, seq, heads, HEAD_DIM), generator=g).to(torch.bfloat16)
        keys = torch.randint(-2, 3, (bsz, n_keys, HEAD_DIM), generator=g).to(torch.bfloat16)
        w = torch.randint(-3, 4, (bsz, seq, heads), generator=g).float()
    else:
        qi = torch.randn(bsz, seq, heads, HEAD_DIM, generator=g).to(torch.bfloat16)
        keys = torch.randn(bsz, n_keys, HEAD_DIM, generator=g).to(torch.bfloat16)
        w = torch.randn(bsz, seq, heads, generator=g)
    return qi, w, keys


def brute_force(qi, w, keys, n_valid, k):
    """SPEC 7 with Python loops: score every valid entry, rank by (score desc, index asc)."""
    bsz, seq, heads, _ = qi.shape
    out = torch.full((bsz, seq, k), -1, dtype=torch.int32)
    for b in range(bsz):
        for t in range(seq):
            n = max(0, min(int(n_valid[b, t]), keys.shape[1]))
            scores = []
            for s in range(n):
                total = 0.0
                for h in range(heads):
                    dot = float((qi[b, t, h].double() * keys[b, s].double()).sum())
                    total += float(w[b, t, h]) * max(dot, 0.0)
                scores.append((-total, s))
            chosen = sorted(s for _, s in sorted(scores)[:k])
            out[b, t, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


@given(bsz=st.integers(1, 2), seq=st.integers(1, 3), heads=st.integers(1, 5), n_keys=st.integers(0, 40),
       k=st.integers(1, 48), seed=st.integers(0, 2**31))
def test_oracle_matches_spec_by_hand(bsz, seq, heads, n_keys, k, seed):
    g = torch.Generator().manual_seed(seed)
    qi, w, keys = make_inputs(g, bsz, seq, heads, n_keys, integer=True)
    n_valid = torch.randint(0, n_keys + 1, (bsz, seq), generator=g, dtype=torch.int32)
    assert torch.equal(ref.indexer_topk(qi, w, keys, n_valid, k), brute_force(qi, w, keys, n_valid, k))


def test_oracle_ties_take_lower_indices_and_nan_ranks_first():
    scores = torch.tensor([[[1.0, 3.0, 3.0, float("nan"), 3.0, -0.0, 0.0, 2.0]]])
    n_valid = torch.tensor([[8]], dtype=torch.int32)
    assert ref.select_topk(scores, n_valid, 3).tolist() == [[[1, 2, 3]]]
    assert ref.select_topk(scores, n_valid, 5).tolist() == [[[1, 2, 3, 4, 7]]]
    # -0.0 and +0.0 tie: the lower index wins.
    assert ref.select_topk(scores, n_valid, 7).tolist() == [[[0, 1, 2, 3, 4, 5, 7]]]
    # Invalid entries never come back, even with k > n_valid, and n_valid is clamped to [0, Nk].
    assert ref.select_topk(scores, torch.tensor([[2]], dtype=torch.int32), 4).tolist() == [[[0, 1, -1, -1]]]
    assert ref.select_topk(scores, torch.tensor([[-3]], dtype=torch.int32), 2).tolist() == [[[-1, -1]]]
    assert ref.select_topk(scores, torch.tensor([[99]], dtype=torch.int32), 10).tolist() == \
        [[[0, 1, 2, 3, 4, 5, 6, 7, -1, -1]]]


# --- the Triton kernels against the oracle -----------------------------------------------

def _run_triton(qi, w, keys, n_valid, k, splits=None):
    """``splits``: None = the registered op (its own plan), n = one program per row segment
    and a merge (n segments), ("parts", n) = the row-parallel selection (n chunks per row)."""
    if splits is None:
        with use_backend("triton"):
            return ops.indexer_topk(qi, w, keys, n_valid, k)
    if isinstance(splits, tuple):
        return kernels.indexer_topk_parts(qi, w, keys, n_valid, k, *splits[1:])
    return kernels.indexer_topk_splits(qi, w, keys, n_valid, k, splits)


PARTS = [("parts", 1), ("parts", 3), ("parts", 16), ("parts", 5)]


def random_n_valid(g, bsz, seq, n_keys):
    """Valid lengths in [0, Nk], with 0 and Nk themselves often."""
    n_valid = torch.randint(0, n_keys + 1, (bsz, seq), generator=g, dtype=torch.int32)
    pick = torch.randint(0, 4, (bsz, seq), generator=g)
    n_valid = torch.where(pick == 0, 0, torch.where(pick == 1, n_keys, n_valid))
    return n_valid.to(torch.int32)


@given(bsz=st.integers(1, 2), seq=st.integers(1, 3), heads=st.sampled_from([1, 3, 4, 8]),
       n_keys=st.integers(1, 300), k=st.integers(1, 64), splits=st.sampled_from([None, 1, 2, 3, 7] + PARTS),
       seed=st.integers(0, 2**31))
def test_kernel_exact_on_integer_scores(device, bsz, seq, heads, n_keys, k, splits, seed):
    """Integer inputs make every score exact in FP32 in any summation order, so the kernel's
    selection must equal the oracle's element for element: same set, ascending order, the
    same tie-breaking (many ties: scores are small integers), -1 padding when n_valid < k."""
    g = torch.Generator().manual_seed(seed)
    qi, w, keys = make_inputs(g, bsz, seq, heads, n_keys, integer=True)
    n_valid = random_n_valid(g, bsz, seq, n_keys)
    expected = ref.indexer_topk(qi, w, keys, n_valid, k)
    got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), k, splits)
    assert got.dtype == torch.int32 and got.shape == (bsz, seq, k)
    assert torch.equal(got.cpu(), expected)


@given(seq=st.integers(1, 3), heads=st.sampled_from([2, 5]), n_keys=st.integers(1, 200), k=st.integers(1, 40),
       splits=st.sampled_from([1, 4, ("parts", 5)]), seed=st.integers(0, 2**31))
def test_kernel_selects_a_true_top_k_of_real_scores(device, seq, heads, n_keys, k, splits, seed):
    """Gaussian inputs: the kernel's FP32 scores differ from the oracle's by summation order
    (relative ~1e-6), so near-ties may resolve either way.  The selection must still be
    a top-k of the oracle's scores up to that rounding: min(k, n_valid) distinct valid
    indices in ascending order, none scoring below the k-th largest minus the tolerance,
    no unselected one above it plus the tolerance."""
    g = torch.Generator().manual_seed(seed)
    qi, w, keys = make_inputs(g, 1, seq, heads, n_keys)
    n_valid = random_n_valid(g, 1, seq, n_keys)
    got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), k, splits).cpu()
    scores = ref.indexer_scores(qi, w, keys)
    for t in range(seq):
        assert_a_top_k(got[0, t], scores[0, t, :int(n_valid[0, t])], k)


def scores_tolerance(valid: torch.Tensor) -> float:
    """FP32 summation-order tolerance of a row of scores: relative 1e-5 of its largest magnitude."""
    return 1e-5 * (float(valid.abs().max()) + 1.0) if valid.numel() else 0.0


def assert_a_top_k(row: torch.Tensor, valid: torch.Tensor, k: int) -> None:
    """``row`` (a query's k output slots) is a top-k of the oracle's ``valid`` scores (those below
    its n_valid) up to ``scores_tolerance``: min(k, n) distinct valid indices in ascending order,
    then -1; none scoring below the k-th largest minus the tolerance, no unselected one above
    it plus the tolerance."""
    n = valid.numel()
    take = min(k, n)
    assert torch.all(row[take:] == -1)
    chosen = row[:take].long()
    assert torch.all(chosen[1:] > chosen[:-1]) and (take == 0 or (0 <= int(chosen[0]) and int(chosen[-1]) < n))
    if take == 0:
        return
    tol = scores_tolerance(valid)
    kth = float(torch.topk(valid, take).values[-1])
    assert float(valid[chosen].min()) >= kth - tol
    rest = torch.ones(n, dtype=torch.bool)
    rest[chosen] = False
    if rest.any():
        assert float(valid[rest].max()) <= kth + tol


def test_kernel_scoring_pass_alone(device):
    """The scoring pass (timed on its own by the benchmarks): exact on integer inputs,
    written below each query's n_valid."""
    g = torch.Generator().manual_seed(2)
    qi, w, keys = make_inputs(g, 2, 3, 5, 70, integer=True)
    n_valid = torch.tensor([[70, 0, 33], [1, 69, 70]], dtype=torch.int32)
    got = kernels.indexer_scores(*(t.to(device) for t in (qi, w, keys, n_valid))).cpu().reshape(2, 3, 70)
    expected = ref.indexer_scores(qi, w, keys)
    for b in range(2):
        for t in range(3):
            n = int(n_valid[b, t])
            assert torch.equal(got[b, t, :n], expected[b, t, :n])


@pytest.mark.parametrize("splits", [1, 3, ("parts", 4)])
def test_kernel_nan_scores_rank_first(device, splits):
    g = torch.Generator().manual_seed(3)
    qi, w, keys = make_inputs(g, 2, 2, 4, 50, integer=True)
    keys[0, 7, 5] = float("nan")  # entry 7 of batch 0 scores NaN for every query
    qi[1, 1, 2, 0] = float("nan")  # every score of query (1, 1) is NaN
    n_valid = torch.tensor([[50, 5], [50, 40]], dtype=torch.int32)
    got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), 6, splits).cpu()
    assert torch.equal(got, ref.indexer_topk(qi, w, keys, n_valid, 6))
    assert 7 in got[0, 0].tolist() and 7 not in got[0, 1].tolist()  # entry 7 is past n_valid = 5 there
    assert got[1, 1].tolist() == [0, 1, 2, 3, 4, 5]  # all NaN: ties go to the lowest indices


@pytest.mark.parametrize("splits", [None, 1, 2, ("parts", 3)])
def test_kernel_edge_lengths(device, splits):
    """n_valid = 0, k > Nk, Nk = 0, and out-of-range n_valid clamped (unchecked mode)."""
    g = torch.Generator().manual_seed(4)
    qi, w, keys = make_inputs(g, 1, 4, 3, 20, integer=True)
    n_valid = torch.tensor([[0, 20, 35, -2]], dtype=torch.int32)
    for k in (1, 20, 25):
        got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), k, splits).cpu()
        assert torch.equal(got, ref.indexer_topk(qi, w, keys, n_valid, k))
        assert torch.all(got[0, 0] == -1) and torch.all(got[0, 3] == -1)
    empty = keys[:, :0]
    got = _run_triton(*(t.to(device) for t in (qi, w, empty, n_valid)), 3, splits)
    assert torch.all(got == -1) and got.shape == (1, 4, 3)


def test_kernel_strided_inputs(device):
    """keys as a view into a larger cache, qi and w sliced from wider buffers."""
    g = torch.Generator().manual_seed(5)
    qi_buf, w_buf, cache = make_inputs(g, 2, 5, 6, 90, integer=True)
    qi, w, keys = qi_buf[:, 1:4, 1:5], w_buf[:, 1:4, 1:5], cache[:, 10:70]
    n_valid = torch.tensor([[60, 31, 7], [12, 60, 59]], dtype=torch.int32).t().contiguous().t()
    for splits in (2, ("parts", 4)):
        got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), 9, splits).cpu()
        assert torch.equal(got, ref.indexer_topk(qi, w, keys, n_valid, 9))


# --- the row-parallel selection: level histograms summed over chunks, counts, write ------

def distinct_score_inputs(g, bsz, seq, n_keys, low, high, special):
    """Inputs whose score for entry s is exactly ``v[s]`` (distinct integers drawn from
    ``[low, high)``, |v| < 2^23): two heads, ``relu(v) - relu(-v)``, with dot products
    ``k0 + 2^8 k1 + 2^16 k2`` (digits in [-128, 128)) exact in BF16 and FP32.  ``special``:
    some entries score +Inf, -Inf or 0 (scores -0.0/+0.0)."""
    v = low + torch.randperm(high - low, generator=g)[:n_keys]
    keys = torch.zeros(bsz, n_keys, HEAD_DIM)
    rest = v
    for d in range(3):
        digit = (rest + 128) % 256 - 128
        keys[:, :, d] = digit.float()
        rest = torch.div(rest - digit, 256, rounding_mode="floor")
    if special and n_keys >= 6:
        pick = torch.randperm(n_keys, generator=g)[:6]
        keys[:, pick[:2], 0] = float("inf")
        keys[:, pick[2:4], 0] = float("-inf")
        keys[:, pick[4:], :3] = 0.0
    qi = torch.zeros(bsz, seq, 2, HEAD_DIM)
    qi[:, :, 0, :3] = torch.tensor([1.0, 256.0, 65536.0])
    qi[:, :, 1] = -qi[:, :, 0]
    w = torch.tensor([1.0, -1.0]).expand(bsz, seq, 2).contiguous()
    return qi.to(torch.bfloat16), w, keys.to(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@given(bsz=st.integers(1, 2), seq=st.integers(1, 2), n_keys=st.integers(1, 700), k=st.integers(1, 80),
       spread=st.sampled_from([(-3000000, 3000000), (1000, 1800), (-2000, 2000), (2**20, 2**20 + 3000)]),
       special=st.booleans(),
       parts=st.sampled_from([("parts", 2), ("parts", 7), ("parts", 16), ("parts", 4)]),
       block=st.sampled_from([kernels.ROW_PARALLEL_BLOCK, 64]), seed=st.integers(0, 2**31))
def test_row_parallel_exact_on_distinct_scores(device, bsz, seq, n_keys, k, spread, special, parts, block, seed):
    """Distinct scores over many octaves, or packed into a few top-level digits (near 2^20
    consecutive integers differ in the key's low bits: every radix level), with +-Inf and
    +-0 among them: the selection equals the oracle's exactly, with chunks of one block or
    (64-score blocks) of several.  The interpreter warns of Inf * 0 in the padding heads'
    products; the kernel masks those rows."""
    g = torch.Generator().manual_seed(seed)
    low, high = spread
    n_keys = min(n_keys, high - low)
    qi, w, keys = distinct_score_inputs(g, bsz, seq, n_keys, low, high, special)
    n_valid = random_n_valid(g, bsz, seq, n_keys)
    expected = ref.indexer_topk(qi, w, keys, n_valid, k)
    with mock.patch.object(kernels, "ROW_PARALLEL_BLOCK", block):
        got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), k, parts)
    assert torch.equal(got.cpu(), expected)


def _workspace_counts():
    """Sum of every stream's level 0-2 histograms (zero between calls; level 3's and the
    published chunk counts are zeroed by each call's first level launch)."""
    return sum(int(zeroed[:, :3 * kernels.LEVEL_WORDS.value].abs().sum()) for zeroed, _ in kernels._workspaces.values())


@given(n_keys=st.integers(2, 400), k=st.integers(1, 60), parts=st.integers(2, 9), seed=st.integers(0, 2**31))
def test_row_parallel_writes_only_its_rows_k_slots(device, n_keys, k, parts, seed):
    """Each chunk writes its selection at its offset and the last chunk pads: the output is the
    oracle's (ascending indices, ties to the lowest) and nothing lands past a row's k slots."""
    g = torch.Generator().manual_seed(seed)
    qi, w, keys = make_inputs(g, 1, 2, 3, n_keys, integer=True)
    n_valid = random_n_valid(g, 1, 2, n_keys)
    args = [t.to(device) for t in (qi, w, keys, n_valid)]
    scores = kernels.indexer_scores(*args)
    # A guard row after the output: no write lands past the last row's k slots.
    out_buf = torch.full((3, k), -7, dtype=torch.int32, device=device)
    kernels.select_parts(scores, args[3], out_buf[:2], 2, k, -(-n_keys // parts))
    assert torch.equal(out_buf[:2].view(1, 2, k).cpu(), ref.indexer_topk(qi, w, keys, n_valid, k))
    assert torch.all(out_buf[2] == -7)
    assert _workspace_counts() == 0


@pytest.mark.parametrize("chunk", [64, 300])
@pytest.mark.parametrize("case", ["many digits", "few keys", "one digit"])
def test_row_parallel_level_count_paths(device, case, chunk):
    """Below the first level a chunk adds its counts by the histogram (more than
    SPARSE_MATCHES matching keys over several digits), one atomic a key (a few), or one
    atomic in all (every match in one digit): each path, exact, in chunks of one block."""
    n_keys = 300
    if case == "many digits":  # 300 distinct values in one binade: level 1 spreads them
        scores = 1024.0 + torch.randperm(n_keys, generator=torch.Generator().manual_seed(3)).float() * 3.0
    elif case == "few keys":  # 5 values per binade: a handful of keys in the k-th's digit
        pos = torch.arange(n_keys)
        scores = torch.ldexp(1.0 + (pos % 5).float() / 8, pos // 5 - 30).flip(0)
    else:  # ties of one value below the cut, and distinct values above it
        scores = torch.where(torch.arange(n_keys) % 3 == 0, 7.0, torch.arange(n_keys).float() + 100.0)
    scores = scores[None].contiguous()
    n_valid = torch.tensor([[n_keys]], dtype=torch.int32)
    for k in (40, 150, 205):
        out = torch.empty(1, k, dtype=torch.int32, device=device)
        kernels.select_parts(scores.to(device), n_valid.to(device), out, 1, k, chunk)
        assert torch.equal(out.cpu(), ref.select_topk(scores[:, None], n_valid, k)[:, 0])
    assert _workspace_counts() == 0


@pytest.mark.parametrize("chunk", [1300, 2048])
def test_row_parallel_chunks_of_several_blocks(device, chunk):
    """Chunks longer than one block (the loop form of every launch: B = 32 at 1M tokens):
    exact on tied integer scores, take-all and short rows included."""
    g = torch.Generator().manual_seed(chunk)
    n_keys = 3000
    scores = torch.randint(-40, 40, (2, n_keys), generator=g).float()
    n_valid = torch.tensor([[n_keys], [1700]], dtype=torch.int32)
    for k in (1, 100, 2999, 4000):
        out = torch.empty(2, k, dtype=torch.int32, device=device)
        kernels.select_parts(scores.to(device), n_valid.to(device), out, 1, k, chunk)
        assert torch.equal(out.cpu(), ref.select_topk(scores[:, None], n_valid, k)[:, 0]), k
    assert _workspace_counts() == 0


def test_row_parallel_chunk_count_bounded():
    """More chunks than the published-count workspace holds are refused, naming the argument."""
    scores = torch.zeros(1, kernels.MAX_PARTS.value + 1)
    out = torch.empty(1, 4, dtype=torch.int32)
    n_valid = torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="chunk"):
        kernels.select_parts(scores, n_valid, out, 1, 4, 1)
    with pytest.raises(ValueError, match="chunk"):
        kernels.select_parts(scores, n_valid, out, 1, 4, 0)


def test_row_parallel_calls_in_a_row_keep_the_workspace_invariant(device):
    """The level 0-2 histograms are zero between calls, and what a call leaves in the rest
    (level 3's histogram, published counts, states) does not reach the next one: a sequence
    of calls with different rows, lengths, k and paths (take-all, levels stopped early, tied
    cuts, n_valid = 0) stays exact."""
    g = torch.Generator().manual_seed(11)
    calls = [(2, 3, 4, 200, 17), (1, 1, 3, 90, 120), (1, 2, 16, 300, 9), (2, 2, 2, 150, 30), (1, 3, 5, 64, 64)]
    for bsz, seq, heads, n_keys, k in calls:
        qi, w, keys = make_inputs(g, bsz, seq, heads, n_keys, integer=True)
        n_valid = random_n_valid(g, bsz, seq, n_keys)
        n_valid[0, 0] = 0
        args = [t.to(device) for t in (qi, w, keys, n_valid)]
        for _ in range(2):
            got = kernels.indexer_topk_parts(*args, k, 5)
            assert torch.equal(got.cpu(), ref.indexer_topk(qi, w, keys, n_valid, k))
            assert _workspace_counts() == 0


_KERNEL_TYPES = dict(qi_ptr="*bf16", w_ptr="*fp32", keys_ptr="*u8", nv_ptr="*i32", scores_ptr="*fp32",
                     zeroed_ptr="*i32", offsets_ptr="*i32", out_ptr="*i32")


_ROW_BLOCK = dict(BLOCK=kernels.ROW_PARALLEL_BLOCK)
_SCORES_CONSTS = dict(KEYS_FP4=True, HEADS_P=64, HEAD_BITS=6, QROWS=1, BLOCK_N=128, TILES=2, PADDED=False)


# A check of the Triton the CPU CI installs (triton 3.6's compile of the row-parallel kernels
# has no stack either); on a GPU machine the GPU tests compile and run the kernels instead.
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("kernel, consts, warps", [
    ("_scores_kernel", dict(_SCORES_CONSTS, KEYS_AS_A=False), 8),
    ("_scores_kernel", dict(_SCORES_CONSTS, KEYS_AS_A=True), 8),
    ("_scores_kernel", dict(_SCORES_CONSTS, KEYS_AS_A=True, BLOCK_N=256, PADDED=True), 8),
    ("_row_level_kernel", dict(_ROW_BLOCK, LEVEL=0, ONE_BLOCK=True, COPIES=8), kernels.ROW_PARALLEL_WARPS),
    ("_row_level_kernel", dict(_ROW_BLOCK, LEVEL=3, ONE_BLOCK=True, COPIES=8), kernels.ROW_PARALLEL_WARPS),
    ("_row_level_kernel", dict(_ROW_BLOCK, LEVEL=2, ONE_BLOCK=False, COPIES=8), kernels.ROW_PARALLEL_WARPS),
    ("_row_level_kernel", dict(_ROW_BLOCK, LEVEL=3, ONE_BLOCK=False, COPIES=1), kernels.ROW_PARALLEL_WARPS),
    ("_row_write_kernel", dict(_ROW_BLOCK, PARTS_P=256, ONE_BLOCK=True, COPIES=8), kernels.ROW_PARALLEL_WARPS),
    ("_row_write_kernel", dict(_ROW_BLOCK, PARTS_P=64, ONE_BLOCK=False, COPIES=8), kernels.ROW_PARALLEL_WARPS),
])
def test_row_parallel_kernels_compile_for_sm90_without_spills(kernel, consts, warps):
    """The interpreter accepts code the GPU compiler rejects (a loop variable changing shape):
    the decode kernels compile for sm_90, FP4 decode included, with no register spills."""
    usage = compile_for_sm90("dsv4_triton.kernels.indexer", kernel, _KERNEL_TYPES, consts, [], warps)
    assert usage["stack"] == 0, usage
    if consts.get("KEYS_AS_A"):
        # The decoded FP4 tile is the MMA's A operand straight from registers: no shared-memory
        # tile is loaded back (only q^T, the B operand, sits in shared memory).
        assert usage["tensor_core_dot"] and usage["tile_reloads"] == 0, usage


# --- FP4 key rows -------------------------------------------------------------------------

@given(rows=st.integers(0, 40), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       scale=st.sampled_from([2.0 ** -100, 1e-3, 1.0, 1e4]), special=st.booleans(), seed=st.integers(0, 2**31))
def test_pack_indexer_keys_bit_exact(device, rows, dtype, scale, special, seed):
    """The packer's bytes equal the oracle's (fp4_quant codes, then the E8M0 scale bytes),
    including NaN/Inf blocks (scale byte 0xFF), and decode back to qat4 of the input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 128, generator=g) * scale
    if special and rows:
        x[0, 5] = float("nan")
        x[-1, 100] = float("inf")
        x[rows // 2, 32:64] = 0.0
    x = x.to(dtype)
    expected = ref.pack_indexer_keys(x)
    with use_backend("triton"):
        got = ops.pack_indexer_keys(x.to(device))
    assert got.dtype == torch.uint8 and got.shape == (rows, 68)
    assert torch.equal(got.cpu(), expected)
    values = ref.key_values(expected)
    qat = ref_quant.qat4(x, 32).float()
    assert torch.equal(torch.isnan(values), torch.isnan(qat))
    assert torch.equal(values.nan_to_num(), qat.nan_to_num())


@given(seq=st.integers(1, 3), heads=st.sampled_from([2, 4]), n_keys=st.integers(1, 150), k=st.integers(1, 40),
       splits=st.sampled_from([1, 3, ("parts", 4)]), seed=st.integers(0, 2**31))
def test_fp4_keys_select_exactly_like_bf16_keys(device, seq, heads, n_keys, k, splits, seed):
    """QAT'd keys: the FP4 rows decode to the same BF16 values, so the kernel's scores and
    selection are identical for both layouts (and so are the oracle's)."""
    g = torch.Generator().manual_seed(seed)
    qi, w, keys = make_inputs(g, 1, seq, heads, n_keys)
    keys = ref_quant.qat4(keys, 32)
    packed = ref.pack_indexer_keys(keys)
    n_valid = random_n_valid(g, 1, seq, n_keys)
    assert torch.equal(ref.indexer_topk(qi, w, packed, n_valid, k), ref.indexer_topk(qi, w, keys, n_valid, k))
    args = [t.to(device) for t in (qi, w, keys, n_valid)]
    bf16 = _run_triton(*args, k, splits)
    fp4 = _run_triton(args[0], args[1], packed.to(device), args[3], k, splits)
    assert torch.equal(fp4, bf16)


def fp4_rows_every_code_and_scale(g, n_rows):
    """uint8 ``[n_rows, 68]`` FP4 key rows: random codes (all 16 in row 0) under E8M0 scales
    from 2^-127 to 2^127 and the NaN byte, four different ones a row (a window of the list, so
    each block reads its own scale)."""
    scale_bytes = torch.tensor([0, 1, 2, 60, 126, 127, 128, 200, 252, 253, 254, 255], dtype=torch.uint8)
    codes = torch.randint(0, 256, (n_rows, 64), generator=g, dtype=torch.uint8)
    codes[0, :8] = torch.arange(0, 8, dtype=torch.uint8) * 0x11 + 0x80
    scales = torch.stack([scale_bytes.roll(-r)[:4] for r in range(n_rows)])
    return torch.cat((codes, scales), dim=1)


def check_fp4_decode(device, n_rows, heads, seed):
    """FP4 rows with random codes (all 16 in row 0) under E8M0 scales from 2^-127 to 2^127 and
    the NaN byte score exactly as the BF16 keys they decode to (both through the same
    tensor-core product; NaN scores included)."""
    g = torch.Generator().manual_seed(seed)
    packed = fp4_rows_every_code_and_scale(g, n_rows)[None]
    decoded = ref.key_values(packed).to(torch.bfloat16)
    qi = (torch.randn(1, 2, heads, HEAD_DIM, generator=g) * 2.0 ** -40).to(torch.bfloat16)
    w = torch.randn(1, 2, heads, generator=g)
    n_valid = torch.full((1, 2), n_rows, dtype=torch.int32)
    args = [t.to(device) for t in (qi, w)]
    fp4 = kernels.indexer_scores(*args, packed.to(device), n_valid.to(device)).cpu()
    bf16 = kernels.indexer_scores(*args, decoded.to(device), n_valid.to(device)).cpu()
    torch.testing.assert_close(fp4, bf16, rtol=0, atol=0, equal_nan=True)
    assert fp4.isnan().any() and (fp4.isfinite() & (fp4 != 0)).any()


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_fp4_key_decode_every_code_and_scale(device):
    """``check_fp4_decode`` on a few rows.  The interpreter warns of the 4 * 2^127 and 6 * 2^127
    overflows (Inf keys in both layouts) and of the NaN products they make."""
    check_fp4_decode(device, 96, 3, 9)


@pytest.mark.gpu
def test_fp4_key_decode_every_code_and_scale_gpu(device):
    """The GPU's FP4 decode (integer ops, subnormal intermediates, exact multiplies) against
    the BF16 keys it decodes to, over many rows and 64 heads."""
    check_fp4_decode(device, 5000, 64, 10)


def _score_configs(heads, seq):
    """Every tuned scoring config the launcher's pruning keeps for these heads and queries, as
    ``indexer_scores(config=...)`` dicts."""
    rows = kernels._query_rows(heads, seq) * (1 << (heads - 1).bit_length())
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kernels.SCORE_CONFIGS
            if rows * c.kwargs["BLOCK_N"] <= 16384]


def check_forms_agree(device, heads, seq, n_keys, configs, seed):
    """QAT'd Gaussian keys, BF16 and as FP4 rows, through every config: all configs of one
    product form give the same FP32 scores bit for bit (the head sums are a fixed tree, the MMA
    sums the same products in the same order whatever the tile), and every config's scores are
    the oracle's up to FP32 summation order.  The two forms may differ in the last bits on the
    GPU (the tensor cores' summation differs by operand role; the tuner uses one form only)."""
    g = torch.Generator().manual_seed(seed)
    qi, w, keys = make_inputs(g, 1, seq, heads, n_keys)
    keys = ref_quant.qat4(keys, 32)
    n_valid = torch.full((1, seq), n_keys, dtype=torch.int32)
    args = [t.to(device) for t in (qi, w, keys, n_valid)]
    packed = ops.pack_indexer_keys(args[2])
    expected = ref.indexer_scores(qi, w, keys).reshape(seq, n_keys)
    # Kernel and oracle each round at most 128 + heads FP32 additions per score (the products
    # are exact): each differs from the exact sum by at most that many units of 2^-24 times the
    # sum of the terms' magnitudes.
    magnitude = torch.einsum("bshd,bnd->bshn", qi.float().abs(), keys.float().abs())
    bound = (2 * (HEAD_DIM + heads) * 2.0 ** -24 * (w.abs()[..., None] * magnitude).sum(2)).reshape(seq, n_keys)
    first = {}
    for config in configs:
        for rows in (args[2], packed):
            got = kernels.indexer_scores(args[0], args[1], rows, args[3], config=config).cpu()
            assert torch.all((got - expected).abs() <= bound), ("oracle", config)
            same_form = first.setdefault(config["KEYS_AS_A"], got)
            assert torch.equal(got, same_form), config


@given(heads=st.sampled_from([1, 2, 3, 5, 8]), seq=st.integers(1, 3), n_keys=st.integers(1, 150),
       seed=st.integers(0, 2**31))
def test_scoring_forms_and_key_layouts_agree(device, heads, seq, n_keys, seed):
    """The tuned form (keys as the MMA's A operand) over two tile shapes and both key layouts:
    the oracle's scores, identical bit for bit.  (The keys-as-B form is a benchmark row only: on
    the H100 its scores differ from the A form's, and between the key layouts, in the last bits.)"""
    configs = [dict(BLOCK_N=64, TILES=t, KEYS_AS_A=True, num_warps=4, num_stages=2) for t in (1, 2)]
    check_forms_agree(device, heads, seq, n_keys, configs, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, seq, n_keys", [(64, 1, 5000), (64, 3, 3000), (7, 2, 1000)])
def test_scoring_every_config_gives_the_same_scores_gpu(device, heads, seq, n_keys):
    """Every config the tuner may pick (one form), both layouts: the same scores bit for bit,
    so the tuned choice never changes a result."""
    check_forms_agree(device, heads, seq, n_keys, _score_configs(heads, seq), n_keys)


def check_fp4_decode_per_element(device, n_rows, configs, seed):
    """Every element of FP4 rows read out alone: query t's two heads are +e_t and -e_t with
    weights 1 and -1, so its score for key n is relu(x) - relu(-x) = x = element t of key n.
    Random code bytes (all 16 codes in row 0) under E8M0 scales 2^-127 .. 2^127 and NaN:
    the kernel's scores equal the BF16 keys' through the same product and the oracle's
    exactly (a key with an infinite or NaN element scores NaN everywhere: 0 * Inf), except
    where the value is an FP32 subnormal (the oracle keeps it; the tensor cores need not)."""
    g = torch.Generator().manual_seed(seed)
    scale_bytes = torch.tensor([0, 1, 2, 60, 126, 127, 128, 200, 252, 253, 254, 255], dtype=torch.uint8)
    codes = torch.randint(0, 256, (n_rows, 64), generator=g, dtype=torch.uint8)
    codes[0, :8] = torch.arange(0, 8, dtype=torch.uint8) * 0x11 + 0x80
    scales = scale_bytes[torch.randint(0, len(scale_bytes), (n_rows, 4), generator=g)]
    packed = torch.cat((codes, scales), dim=1)[None]
    qi = torch.zeros(1, HEAD_DIM, 2, HEAD_DIM)
    qi[0, torch.arange(HEAD_DIM), 0, torch.arange(HEAD_DIM)] = 1.0
    qi[0, :, 1] = -qi[0, :, 0]
    w = torch.tensor([1.0, -1.0]).expand(1, HEAD_DIM, 2).contiguous()
    n_valid = torch.full((1, HEAD_DIM), n_rows, dtype=torch.int32)
    args = [t.to(device) for t in (qi.to(torch.bfloat16), w, n_valid)]
    decoded = ref.key_values(packed).to(torch.bfloat16).to(device)
    expected = ref.indexer_scores(qi.to(torch.bfloat16), w, packed)[0]
    normal = (expected.abs() >= 2.0 ** -126) | (expected == 0) | ~expected.isfinite()
    assert (expected[normal] != 0).any() and expected.isnan().any() and (~normal).any()
    for config in configs:
        got = kernels.indexer_scores(args[0], args[1], packed.to(device), args[2], config=config).cpu()
        bf16 = kernels.indexer_scores(args[0], args[1], decoded, args[2], config=config).cpu()
        torch.testing.assert_close(got, bf16, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[normal], expected[normal], rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_fp4_decode_every_element_exact(device):
    """``check_fp4_decode_per_element`` on a few rows, both product forms (the GPU runs the
    A-operand form's asm decode here)."""
    configs = [dict(BLOCK_N=64, TILES=1, KEYS_AS_A=a, num_warps=4, num_stages=2) for a in (True, False)]
    check_fp4_decode_per_element(device, 70, configs, 21)


@pytest.mark.gpu
def test_fp4_decode_every_element_exact_gpu(device):
    """The GPU's decodes (the A-operand form's PRMT/IMAD/packed-BF16 one, the B-operand form's
    FP32 one) over many rows and every tuned config."""
    check_fp4_decode_per_element(device, 3000, _score_configs(2, HEAD_DIM), 22)


@pytest.mark.gpu
@pytest.mark.parametrize("bsz, n_keys", [(1, 262144), (3, 50000)])
def test_fp4_keys_decode_sizes_select_like_bf16_keys(device, bsz, n_keys):
    """Decode sizes through the op's plan (the row-parallel selection): QAT'd Gaussian keys as
    FP4 rows select exactly what the same keys as BF16 select."""
    g = torch.Generator().manual_seed(n_keys)
    qi, w, keys = make_inputs(g, bsz, 1, 64, n_keys)
    keys = ref_quant.qat4(keys, 32)
    n_valid = torch.randint(n_keys // 2, n_keys + 1, (bsz, 1), generator=g, dtype=torch.int32)
    args = [t.to(device) for t in (qi, w, keys, n_valid)]
    bf16 = _run_triton(*args, 1024)
    fp4 = _run_triton(args[0], args[1], ops.pack_indexer_keys(args[2]), args[3], 1024)
    assert torch.equal(fp4, bf16)


def test_fp4_keys_exact_on_integer_scores(device):
    g = torch.Generator().manual_seed(8)
    qi, w, keys = make_inputs(g, 2, 2, 3, 90, integer=True)  # integers in [-2, 2] are on the FP4 grid
    packed = ref.pack_indexer_keys(keys)
    n_valid = torch.tensor([[90, 17], [0, 64]], dtype=torch.int32)
    expected = ref.indexer_topk(qi, w, keys, n_valid, 12)
    # Rows 69 bytes apart and 1 byte off alignment: the kernel reads 32-bit code words, so the
    # launcher copies such rows to an aligned buffer first.
    wide = torch.zeros(2, 90, 70, dtype=torch.uint8)
    wide[:, :, 1:69] = packed
    for rows in (packed.to(device), wide.to(device)[:, :, 1:69]):
        for splits in (None, 2, ("parts", 3)):
            got = _run_triton(qi.to(device), w.to(device), rows, n_valid.to(device), 12, splits)
            assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 16])
@pytest.mark.parametrize("bsz, n_keys, k", [(1, 262144, 1024), (4, 65536, 1024), (2, 40000, 512)])
def test_kernel_decode_sizes(device, bsz, n_keys, k, splits):
    """Decode: 64 heads, one query, long rows (the op's plan: the row-parallel selection;
    16: segments and a merge)."""
    g = torch.Generator().manual_seed(n_keys)
    qi, w, keys = make_inputs(g, bsz, 1, 64, n_keys, integer=True)
    n_valid = torch.randint(n_keys // 2, n_keys + 1, (bsz, 1), generator=g, dtype=torch.int32)
    got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), k, splits)
    assert torch.equal(got.cpu(), ref.indexer_topk(qi, w, keys, n_valid, k))


def test_selection_plan(monkeypatch):
    """Few long rows take the row-parallel selection (one block per chunk, up to about 8
    programs per SM, at most MAX_PARTS chunks); many rows or rows under 8k, one program per
    segment (and a merge when a row is split)."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert kernels.plan_parts(1, 262144, 1024, cuda) == 256
    assert kernels.plan_parts(32, 32768, 1024, cuda) == 32
    assert kernels.plan_parts(64, 262144, 1024, cuda) == 17
    assert kernels.plan_parts(16384, 4096, 1024, cuda) == 0
    assert kernels.plan_parts(1, 4096, 1024, cuda) == 0


@pytest.mark.gpu
def test_row_parallel_decode_equal_scores(device):
    """Every score equal (zero keys): every level's digit holds the whole row, the cut is
    that score with k ties, taken lowest index first across the chunks: indices 0..k-1."""
    g = torch.Generator().manual_seed(12)
    qi, w, _ = make_inputs(g, 1, 1, 64, 1, integer=True)
    keys = torch.zeros(1, 262144, HEAD_DIM, dtype=torch.bfloat16)
    n_valid = torch.tensor([[262144]], dtype=torch.int32)
    got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), 1024)
    assert got.cpu().flatten().tolist() == list(range(1024))
    assert _workspace_counts() == 0


@pytest.mark.gpu
def test_row_parallel_cuda_graph_replays(device):
    """Captured once, replayed on new inputs: every replay exact, and the capture stream's
    workspace left zeroed by each replay."""
    g = torch.Generator().manual_seed(13)
    bsz, n_keys, k = 2, 65536, 1024
    qi, w, keys = (t.to(device) for t in make_inputs(g, bsz, 1, 64, n_keys, integer=True))
    n_valid = torch.full((bsz, 1), n_keys, dtype=torch.int32, device=device)
    with use_backend("triton"):
        ops.indexer_topk(qi, w, keys, n_valid, k)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.indexer_topk(qi, w, keys, n_valid, k)
    for step in range(3):
        new_qi, new_w, new_keys = make_inputs(g, bsz, 1, 64, n_keys, integer=True)
        new_nv = torch.randint(0, n_keys + 1, (bsz, 1), generator=g, dtype=torch.int32)
        for dst, src in ((qi, new_qi), (w, new_w), (keys, new_keys), (n_valid, new_nv)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), ref.indexer_topk(new_qi, new_w, new_keys, new_nv, k)), step
        assert _workspace_counts() == 0


@pytest.mark.gpu
def test_kernel_prefill_causal(device):
    """Prefill: 2048 queries, entry s valid for query t when s < (t + 1) // 4."""
    g = torch.Generator().manual_seed(7)
    seq = 2048
    qi, w, keys = make_inputs(g, 1, seq, 64, seq // 4, integer=True)
    n_valid = ((torch.arange(seq) + 1) // 4).to(torch.int32)[None]
    got = _run_triton(*(t.to(device) for t in (qi, w, keys, n_valid)), 128)
    assert torch.equal(got.cpu(), ref.indexer_topk(qi, w, keys, n_valid, 128))


def _args(bsz=1, seq=2, heads=4, n_keys=16, k=4, **over):
    g = torch.Generator().manual_seed(0)
    qi, w, keys = make_inputs(g, bsz, seq, heads, n_keys)
    args = dict(qi=qi, w=w, keys=keys, n_valid=torch.full((bsz, seq), n_keys, dtype=torch.int32), k=k)
    args.update(over)
    return args


@pytest.mark.parametrize("over, err, name", [
    (dict(qi=torch.zeros(1, 2, 4, 128)), TypeError, "qi"),
    (dict(qi=torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16)), ValueError, "qi"),
    (dict(qi=torch.zeros(1, 2, 0, 128, dtype=torch.bfloat16), w=torch.zeros(1, 2, 0)), ValueError, "qi"),
    (dict(w=torch.zeros(1, 2, 4, dtype=torch.bfloat16)), TypeError, "w"),
    (dict(w=torch.zeros(1, 2, 5)), ValueError, "w"),
    (dict(keys=torch.zeros(1, 16, 128)), TypeError, "keys"),
    (dict(keys=torch.zeros(2, 16, 128, dtype=torch.bfloat16)), ValueError, "keys"),
    (dict(keys=torch.zeros(1, 16, 64, dtype=torch.bfloat16)), ValueError, "keys"),
    (dict(keys=torch.zeros(1, 16, 128, dtype=torch.uint8)), ValueError, "keys"),
    (dict(n_valid=torch.zeros(1, 2, dtype=torch.int64)), TypeError, "n_valid"),
    (dict(n_valid=torch.zeros(1, 3, dtype=torch.int32)), ValueError, "n_valid"),
    (dict(k=0), ValueError, "k"),
    (dict(k=2.0), TypeError, "k"),
])
def test_bad_input(over, err, name):
    with pytest.raises(err, match=name):
        ops.indexer_topk(**_args(**over))


@pytest.mark.parametrize("bad", [-1, 17])
def test_checked_mode_rejects_n_valid_out_of_range(bad):
    args = _args(n_valid=torch.tensor([[3, bad]], dtype=torch.int32))
    set_checks(True)
    try:
        with pytest.raises(ValueError, match="n_valid"):
            ops.indexer_topk(**args)
    finally:
        set_checks(False)


@pytest.mark.parametrize("keys, err", [
    (torch.zeros(3, 128, dtype=torch.uint8), TypeError),
    (torch.zeros(3, 64), ValueError),
    (torch.zeros(()), ValueError),
])
def test_pack_bad_input(keys, err):
    with pytest.raises(err, match="keys"):
        ops.pack_indexer_keys(keys)


@pytest.mark.parametrize("rows, n_keys, places_16, cluster", [
    (1, 32768, True, 8), (1, 262144, True, 16), (1, 262144, False, 8), (8, 262144, True, 8),
    (16, 4096, True, 1), (16, 16384, True, 8), (32, 32768, True, 1), (32, 32769, True, 8),
    (256, 2048, True, 1), (31, 4097, True, 8)])
def test_cuda_selection_ctas_a_row_follow_the_measured_rule(rows, n_keys, places_16, cluster):
    # cuda_fallback.indexer's rule (its constants say what was measured): one CTA a row for
    # many rows of up to 32768 keys, 16 for a few very long rows where the GPU places them.
    assert cuda_indexer.default_cluster(rows, n_keys, lambda: places_16) == cluster
