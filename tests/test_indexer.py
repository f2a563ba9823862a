"""indexer_topk: the oracle against SPEC 7 written out by hand, the Triton kernels against the oracle."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, set_checks
from dsv4_triton.reference import indexer as ref

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
