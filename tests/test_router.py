"""route: Triton against the FP32 oracle, and the oracle against SPEC 8."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from dsv4_triton import ops, set_checks, use_backend
from dsv4_triton.reference import router as ref
from helpers import assert_close, compile_for_sm90

FP32_EPS = 2.0 ** -24


def _inputs(T, E, dim, seed, device, logit_std=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, dim, generator=g).to(torch.bfloat16)
    weight = (torch.randn(E, dim, generator=g) * logit_std / math.sqrt(dim)).to(torch.bfloat16)
    bias = torch.randn(E, generator=g) * 0.1
    return x.to(device), weight.to(device), bias.to(device)


# ---------------------------------------------------------------- the oracle against SPEC 8

def test_oracle_is_spec_8():
    x, weight, bias = _inputs(9, 16, 64, 0, "cpu")
    w, ids = ref.route(x, weight, bias, None, None, 3, 2.5)
    s = torch.sqrt(F.softplus(x.float() @ weight.float().T))
    for t in range(9):
        order = sorted(range(16), key=lambda e: (-(s[t, e] + bias[e]).item(), e))[:3]
        assert ids[t].tolist() == order
        sel = s[t, order]
        assert_close(w[t], sel / sel.sum() * 2.5, rtol=1e-6, atol=0, what="weights")


def test_oracle_ties_go_to_the_lower_id_and_nan_ranks_first():
    key = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, float("nan"), 5.0, float("nan"), float("inf")]])
    assert ref.topk_lowest_id_ties(key, 3).tolist() == [[1, 2, 4], [1, 3, 4]]


# ---------------------------------------------------------------- Triton against the oracle

def _triton(*args, **kw):
    with use_backend("triton"):
        return ops.route(*args, **kw)


def _score_tolerance(x, weight):
    """Bound on |s_kernel - s_oracle| per token and expert (FP64 [T, E]).

    The kernel's BF16 products are exact and summed in FP32 (the oracle: FP64, rounded once):
    in practice far below sqrt(dim) * 2^-24 * sum|terms|, of which we allow 8x.  Then
    |d sqrt(softplus(z)) / dz| = sigmoid(z) / (2 sqrt(softplus(z))) < 0.5, plus 8 FP32 ulps of
    s for exp/log/sqrt.
    """
    mag = x.double().abs().cpu() @ weight.double().abs().cpu().T
    dz = 8 * math.sqrt(x.shape[1]) * FP32_EPS * mag
    s = ref.router_scores(x.cpu(), weight.cpu()).double()
    return 0.5 * dz + 8 * FP32_EPS * s


def _check_route(x, weight, bias, topk, route_scale, out):
    w, ids = out
    T, E = x.shape[0], weight.shape[0]
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == (T, topk) and ids.shape == (T, topk)
    w, ids = w.cpu().double(), ids.cpu().long()
    s = ref.router_scores(x.cpu(), weight.cpu()).double()
    tol_s = _score_tolerance(x, weight)
    key = s + (bias.cpu().double() if bias is not None else 0)
    tol_key = tol_s + 4 * FP32_EPS * key.abs()
    w_ref, ids_ref = ref.route(x.cpu(), weight.cpu(), bias.cpu() if bias is not None else None, None, None, topk,
                               route_scale)
    # Valid, distinct expert ids.
    assert bool(((ids >= 0) & (ids < E)).all())
    assert all(len(set(r)) == topk for r in ids.tolist())
    # The j-th pick has the j-th best key, up to the score tolerance of both keys.
    sorted_key = key.gather(1, ids_ref.long())
    picked_key = key.gather(1, ids)
    slack = tol_key.gather(1, ids) + tol_key.gather(1, ids_ref.long())
    assert bool(((picked_key - sorted_key).abs() <= 2 * slack).all()), "a pick is not among the best keys"
    # Where the top topk+1 keys are separated by more than the tolerance, the ids are the oracle's.
    ranked = torch.sort(key, dim=1, descending=True, stable=True)
    head = ranked.values[:, : min(topk + 1, E)]
    head_tol = tol_key.gather(1, ranked.indices[:, : min(topk + 1, E)])
    gaps_ok = ((head[:, :-1] - head[:, 1:]) > 2 * (head_tol[:, :-1] + head_tol[:, 1:])).all(1) if E > 1 else \
        torch.ones(T, dtype=torch.bool)
    assert torch.equal(ids[gaps_ok], ids_ref.long()[gaps_ok]), "ids differ from the oracle's at a clear gap"
    # Where only the k-th and (k+1)-th keys are clearly apart, the chosen set is the oracle's.
    if E > topk:
        edge = (head[:, topk - 1] - head[:, topk]) > 2 * (head_tol[:, topk - 1] + head_tol[:, topk])
        assert torch.equal(ids[edge].sort(1).values, ids_ref.long()[edge].sort(1).values), "expert set differs"
    _check_weights(w, s.gather(1, ids), tol_s.gather(1, ids), route_scale)
    return w_ref


def _check_weights(w, sel, t, route_scale):
    """Routing weights against the oracle's scores ``sel`` at the kernel's ids (FP64 [T, k]),
    each erring by at most ``t`` in the kernel.

    w_j = s_j / S changes by at most route_scale * (t_j + w_j * sum t) / S, plus 8 FP32 ulps
    for the division and the scaling.  Where S <= sum t the kernel's sum may be 0 where the
    oracle's is not (or the reverse), so such a row is checked only for what holds either way:
    all NaN (0 / 0), or weights in [0, route_scale] that sum to it.
    """
    w = w.cpu().double()
    topk = w.shape[1]
    total = sel.sum(1, keepdim=True)
    expected = sel / total * route_scale
    bound = abs(route_scale) * (t + expected.abs() / abs(route_scale) * t.sum(1, keepdim=True)) / total \
        + 8 * FP32_EPS * expected.abs()
    vague = (total <= t.sum(1, keepdim=True)).squeeze(1)
    sure = ~vague
    fin = torch.isfinite(expected) & sure[:, None]
    assert bool(((w - expected).abs()[fin] <= bound[fin]).all()), f"weights: err {(w - expected).abs()[fin].max()}"
    assert torch.equal(torch.isnan(w[sure]), torch.isnan(expected[sure])), "weights: NaN mismatch"
    nan_rows = torch.isnan(w).all(1)
    assert bool((torch.isnan(w).any(1) == nan_rows)[vague].all()), "weights: a row partly NaN where S ~ 0"
    in_range = ((w >= min(0.0, route_scale)) & (w <= max(0.0, route_scale))).all(1)
    assert bool((nan_rows | in_range)[vague].all()), "weights: out of [0, route_scale] where S ~ 0"
    # Rows sum to route_scale (topk rounded terms).
    rows = torch.isfinite(w).all(1)
    assert bool(((w[rows].sum(1) - route_scale).abs() <= 4 * topk * FP32_EPS * abs(route_scale)).all())


def _check_hash_weights(x, weight, ids, w, route_scale):
    """Weights of the table's ids: the oracle's scores there, normalised."""
    ids = ids.cpu().long()
    s = ref.router_scores(x.cpu(), weight.cpu()).double()
    _check_weights(w, s.gather(1, ids), _score_tolerance(x, weight).gather(1, ids), route_scale)


@given(T=st.sampled_from([1, 2, 5, 17, 40]), E=st.sampled_from([8, 16, 24, 64, 100]),
       dim=st.sampled_from([64, 100, 256]), k=st.integers(1, 8), biased=st.booleans(),
       route_scale=st.sampled_from([1.0, 1.5, 2.5]), logit_std=st.sampled_from([1.0, 30.0]),
       seed=st.integers(0, 2**31))
def test_route_matches_oracle(device, T, E, dim, k, biased, route_scale, logit_std, seed):
    from dsv4_triton.kernels import router as kern

    k = min(k, E)
    x, weight, bias = _inputs(T, E, dim, seed, device, logit_std)
    bias = bias if biased else None
    # The public op (the split path at these T) and the tiled path forced.
    _check_route(x, weight, bias, k, route_scale, _triton(x, weight, bias, topk=k, route_scale=route_scale))
    _check_route(x, weight, bias, k, route_scale, kern.route_tiled(x, weight, bias, None, None, k, route_scale))


def test_route_exact_ties_go_to_the_lower_id(device):
    # Experts 3, 5 and 9 have identical weight rows (the largest scores, for positive x) and
    # the same bias: their scores are equal bit for bit, so they come in id order.
    x, weight, _ = _inputs(6, 12, 64, 31, device)
    x = x.abs()
    weight[[3, 5, 9]] = 0.5
    w, ids = _triton(x, weight, torch.zeros(12, device=device), topk=4, route_scale=1.0)
    assert ids[:, :3].tolist() == [[3, 5, 9]] * 6
    w_ref, ids_ref = ref.route(x, weight, torch.zeros(12, device=device), None, None, 4, 1.0)
    assert torch.equal(ids.cpu(), ids_ref.cpu())
    # A bias that lifts a lower id into the tie also goes first; one that drops it does not.
    bias = torch.zeros(12, device=device)
    bias[9] = 1.0
    _, ids = _triton(x, weight, bias, topk=3)
    assert ids[:, :3].tolist() == [[9, 3, 5]] * 6


def test_route_nan_token_ranks_nan_first_and_has_nan_weights(device):
    x, weight, bias = _inputs(4, 16, 64, 37, device)
    x[2, 5] = float("nan")
    w, ids = _triton(x, weight, bias, topk=3)
    assert ids[2].tolist() == [0, 1, 2]  # every key is NaN: ties -> lowest ids
    assert bool(torch.isnan(w[2]).all()) and not bool(torch.isnan(w[[0, 1, 3]]).any())
    w_ref, ids_ref = ref.route(x, weight, bias, None, None, 3, 1.0)
    assert torch.equal(ids.cpu(), ids_ref.cpu())


def test_route_extreme_logits(device):
    # Logits of +-hundreds: softplus(z) = z above, exp(z) (about 1e-40, subnormal) below;
    # the weights stay finite and exact to the tolerance as long as one selected score is normal.
    x, weight, bias = _inputs(8, 32, 128, 41, device, logit_std=300.0)
    _check_route(x, weight, bias, 6, 2.5, _triton(x, weight, bias, topk=6, route_scale=2.5))


def test_route_far_negative_logits(device):
    # Every logit in [-90, -20]: softplus(z) = log1p(exp(z)) ~ exp(z) must keep its relative
    # precision (log(1 + exp(z)) would round to 0 and the weights to 0/0).
    g = torch.Generator().manual_seed(67)
    x = torch.ones(5, 64, dtype=torch.bfloat16, device=device)
    weight = (-(20 + 70 * torch.rand(24, 1, generator=g)) / 64).expand(24, 64).to(torch.bfloat16).to(device)
    _check_route(x, weight, None, 4, 2.5, _triton(x, weight, topk=4, route_scale=2.5))


@given(T=st.sampled_from([1, 3, 17, 40]), E=st.sampled_from([8, 20, 64]), dim=st.sampled_from([64, 256]),
       k=st.integers(1, 6), vocab=st.sampled_from([1, 50, 1000]), seed=st.integers(0, 2**31))
def test_route_hash_mode(device, T, E, dim, k, vocab, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    x, weight, _ = _inputs(T, E, dim, seed, device)
    table = torch.randint(0, E, (vocab, k), generator=g, dtype=torch.int32).to(device)
    token_ids = torch.randint(0, vocab, (T,), generator=g).to(device)
    w, ids = _triton(x, weight, tid2eid=table, token_ids=token_ids, topk=k, route_scale=1.5)
    assert torch.equal(ids.cpu(), table[token_ids].cpu())
    _check_hash_weights(x, weight, ids, w, 1.5)


@pytest.mark.parametrize("kernel", ["tiled", "split"])
def test_route_hash_scores_that_underflow_give_nan_weights(device, kernel):
    # A token whose selected logits are all below about -104: softplus underflows to 0 in FP32,
    # so w = s / sum(s) is 0 / 0 = NaN, as SPEC 8 computes it; a row with one normal score
    # beside an underflowed one gets route_scale (to the division's rounding: the GPU's FP32
    # division is not correctly rounded) and exactly 0.
    x = torch.ones(3, 64, dtype=torch.bfloat16, device=device)
    weight = torch.full((4, 64), -200 / 64, dtype=torch.bfloat16, device=device)
    weight[2] = 1 / 64
    table = torch.tensor([[0, 1], [2, 3], [3, 0]], dtype=torch.int32, device=device)
    token_ids = torch.tensor([0, 1, 2], device=device)
    if kernel == "tiled":  # (3 tokens would take the split path through the op)
        from dsv4_triton.kernels import router as kern

        w, ids = kern.route_tiled(x, weight, None, table, token_ids, 2, 2.5)
    else:
        w, ids = _split(x, weight, None, table, token_ids, 2, 2.5, _SMALL_SPLIT_CONFIGS[0])
    w_ref, _ = ref.route(x.cpu(), weight.cpu(), None, table.cpu(), token_ids.cpu(), 2, 2.5)
    assert torch.isnan(w_ref[[0, 2]]).all() and w_ref[1].tolist() == [2.5, 0.0]
    assert torch.equal(w.cpu().isnan(), w_ref.isnan())
    assert w[1, 1].item() == 0.0
    _check_hash_weights(x, weight, ids, w, 2.5)


def test_route_hash_out_of_range_ids(device):
    x, weight, _ = _inputs(4, 8, 64, 43, device)
    table = torch.tensor([[0, 1], [2, 9], [-3, 4]], dtype=torch.int32, device=device)
    token_ids = torch.tensor([0, 7, -1, 2], device=device)
    # Unchecked: clamped into range, as the oracle does; never a wild read.
    w, ids = _triton(x, weight, tid2eid=table, token_ids=token_ids, topk=2)
    w_ref, ids_ref = ref.route(x, weight, None, table, token_ids, 2, 1.0)
    assert torch.equal(ids.cpu(), ids_ref.cpu())
    assert_close(w, w_ref, rtol=1e-5, atol=0, what="weights")
    # Checked mode: an error naming the argument.
    set_checks(True)
    try:
        with pytest.raises(ValueError, match="token_ids"):
            ops.route(x, weight, tid2eid=table[:1], token_ids=token_ids, topk=2)
        with pytest.raises(ValueError, match="tid2eid"):
            ops.route(x, weight, tid2eid=table, token_ids=torch.tensor([0, 1, 2, 1], device=device), topk=2)
    finally:
        set_checks(False)


@pytest.mark.parametrize("config", [(16, 16, 64, 4, 3), (32, 64, 64, 4, 3)])
def test_route_tiled_explicit_configs(device, config):
    from dsv4_triton.kernels import router as kern

    # E = 100 in chunks of 16 or 64 (a partial last chunk); T = 40 in tiles of 16 or 32.
    x, weight, bias = _inputs(40, 100, 96, 47, device)
    _check_route(x, weight, bias, 6, 2.5, kern.route_tiled(x, weight, bias, None, None, 6, 2.5, config=config))
    table = torch.randint(0, 100, (30, 6), dtype=torch.int32, device=device)
    token_ids = torch.arange(40, device=device) % 30
    w, ids = kern.route_tiled(x, weight, None, table, token_ids, 6, 2.5, config=config)
    assert torch.equal(ids.cpu(), table[token_ids].cpu())


# ---------------------------------------------------------------- the split (decode) path

# Small explicit split configs, so that CPU shapes have several token tiles, expert chunks
# (a partial last one) and dim splits (a partial last one): (BLOCK_T, BLOCK_E, BLOCK_K, SPLIT_K, warps, stages).
_SMALL_SPLIT_CONFIGS = [(16, 16, 32, 64, 4, 2), (32, 16, 16, 32, 4, 2), (16, 32, 16, 16, 4, 2)]


def _split(x, weight, bias, table, token_ids, topk, route_scale, config):
    from dsv4_triton.kernels import router as kern

    return kern.route_split(x, weight, bias, table, token_ids, topk, route_scale, config=config)


def _split_counters_are_zero(device):
    from dsv4_triton.kernels import router as kern

    for ws in kern._split_workspaces.values():
        if ws.partial.device.type == torch.device(device).type:
            assert not bool(ws.sync.any()), "arrival counters left set"


@given(T=st.sampled_from([1, 2, 5, 17, 33, 64]), E=st.sampled_from([6, 16, 40, 100]),
       dim=st.sampled_from([16, 100, 200]), k=st.integers(1, 8), biased=st.booleans(),
       config=st.sampled_from(_SMALL_SPLIT_CONFIGS), logit_std=st.sampled_from([1.0, 30.0]),
       seed=st.integers(0, 2**31))
def test_route_split_matches_oracle(device, T, E, dim, k, biased, config, logit_std, seed):
    k = min(k, E)
    x, weight, bias = _inputs(T, E, dim, seed, device, logit_std)
    bias = bias if biased else None
    _check_route(x, weight, bias, k, 2.5, _split(x, weight, bias, None, None, k, 2.5, config))
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, E, (37, k), generator=g, dtype=torch.int32).to(device)
    token_ids = torch.randint(0, 37, (T,), generator=g).to(device)
    w, ids = _split(x, weight, None, table, token_ids, k, 2.5, config)
    assert torch.equal(ids.cpu(), table[token_ids].cpu())
    _check_hash_weights(x, weight, ids, w, 2.5)
    _split_counters_are_zero(device)


@pytest.mark.parametrize("config", _SMALL_SPLIT_CONFIGS)
def test_route_split_is_deterministic_and_resets_its_counters(device, config):
    # Several dim splits per expert chunk: each token's program adds the partial sums in one
    # order whichever programs finish first, so repeated calls give the same bits; each call
    # leaves the counters zero (a stale count would let the next call's token programs start
    # before the partials are written).
    x, weight, bias = _inputs(33, 40, 200, 73, device)
    first = _split(x, weight, bias, None, None, 6, 2.5, config)
    _split_counters_are_zero(device)
    for _ in range(2):
        again = _split(x, weight, bias, None, None, 6, 2.5, config)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    _split_counters_are_zero(device)
    _check_route(x, weight, bias, 6, 2.5, first)


def test_route_split_infinite_and_tied_keys(device):
    # Biases of +-inf: +inf keys rank first (ties among them to the lower id), -inf keys last;
    # identical weight rows tie exactly across expert chunks and dim splits.
    x, weight, _ = _inputs(5, 40, 200, 79, device)
    x = x.abs()
    weight[[2, 17, 35]] = 0.25
    bias = torch.zeros(40, device=device)
    bias[[30, 7]] = float("inf")
    bias[[2]] = float("-inf")
    for config in _SMALL_SPLIT_CONFIGS:
        w, ids = _split(x, weight, bias, None, None, 5, 1.0, config)
        w_ref, ids_ref = ref.route(x, weight, bias, None, None, 5, 1.0)
        assert ids[:, :4].tolist() == [[7, 30, 17, 35]] * 5
        assert torch.equal(ids.cpu(), ids_ref.cpu())
        # The scores of these ids (logits of |x| sums up to ~100, FP32 dots of 200 exact
        # products) err by under 1e-6 relative; _check_route's key bounds cannot take inf keys.
        assert_close(w, w_ref, rtol=1e-5, atol=0, what="weights")


def test_route_split_nan_in_a_later_split(device):
    # A NaN in the last dim split of one token: its logits are NaN after the fixed-order sum,
    # every key ranks first (ties -> lowest ids) and its weights are NaN; other tokens are clean.
    x, weight, bias = _inputs(4, 40, 200, 97, device)
    x[2, 190] = float("nan")
    w_ref, ids_ref = ref.route(x, weight, bias, None, None, 3, 1.0)
    for config in _SMALL_SPLIT_CONFIGS:
        w, ids = _split(x, weight, bias, None, None, 3, 1.0, config)
        assert ids[2].tolist() == [0, 1, 2] and torch.equal(ids.cpu(), ids_ref.cpu())
        assert bool(torch.isnan(w[2]).all()) and not bool(torch.isnan(w[[0, 1, 3]]).any())


@pytest.mark.parametrize("topk", [4, 8])
def test_route_split_picks_from_one_chunk_or_alternating(device, topk):
    # Biases of 33..40 (scores are ~1) fix every token's order: first all picks from the
    # first expert chunk (experts 0..7), then picks alternating between two chunks (experts 0,
    # 32, 1, 33, ...: chunks 0 and 2 of 16 experts, 0 and 1 of 32), whose logits come from
    # different GEMM programs.
    x, weight, _ = _inputs(3, 40, 64, 109, device)
    for config in [(16, 16, 32, 64, 4, 2), (16, 32, 16, 16, 4, 2)]:
        for rows in ([0, 1, 2, 3, 4, 5, 6, 7], [0, 32, 1, 33, 2, 34, 3, 35]):
            bias = torch.zeros(40, device=device)
            bias[rows] = torch.linspace(40.0, 33.0, 8, device=device)
            w, ids = _split(x, weight, bias, None, None, topk, 2.5, config)
            assert ids.tolist() == [rows[:topk]] * 3
            _check_route(x, weight, bias, topk, 2.5, (w, ids))


@pytest.mark.parametrize("T, topk, config", [(33, 8, (32, 16, 16, 32, 4, 2)), (5, 5, (16, 32, 16, 16, 4, 2))])
def test_route_split_ties_nan_and_infinite_keys(device, T, topk, config):
    # Ties across chunks (identical weight rows), a NaN token, +-inf biases, and a chunk with
    # fewer live experts than topk (E = 40 in chunks of 16 or 32): the oracle's ids, and
    # the expected ones: the NaN token's keys all rank first (ids 0, 1, ...), every other
    # token's first two are the +inf keys, the lower id first.
    x, weight, bias = _inputs(T, 40, 48, 113 + T, device)
    weight[[3, 19, 36]] = weight[5].clone()
    bias[[3, 19, 36]] = bias[5] + 1.0  # tied keys, high enough to be picked
    bias[5] += 1.0
    x[T // 2, 7] = float("nan")
    bias[[4, 37]] = float("inf")
    bias[[0]] = float("-inf")
    w, ids = _split(x, weight, bias, None, None, topk, 2.5, config)
    w_ref, ids_ref = ref.route(x, weight, bias, None, None, topk, 2.5)
    assert torch.equal(ids.cpu(), ids_ref.cpu())
    ids = ids.cpu()
    assert ids[T // 2].tolist() == list(range(topk)) and bool(torch.isnan(w[T // 2]).all())
    assert all(row[:2] == [4, 37] for t, row in enumerate(ids.tolist()) if t != T // 2)
    _split_counters_are_zero(device)


@pytest.mark.parametrize("T", [1, 3, 5, 31, 32, 33])
def test_route_split_partial_tiles(device, T):
    # 32-row tiles: T = 1, 3, 5 leave most rows of the tile dead (never stored, never waited
    # for), T = 31, 32 one tile, T = 33 a full tile and a tile with one live row (the token
    # program of token 32 waits on the second tile's counter).
    config = (32, 16, 16, 32, 4, 2)
    x, weight, bias = _inputs(T, 40, 64, 101 + T, device)
    _check_route(x, weight, bias, 6, 2.5, _split(x, weight, bias, None, None, 6, 2.5, config))
    g = torch.Generator().manual_seed(T)
    table = torch.randint(0, 40, (50, 6), generator=g, dtype=torch.int32).to(device)
    token_ids = torch.randint(0, 50, (T,), generator=g).to(device)
    w, ids = _split(x, weight, None, table, token_ids, 6, 2.5, config)
    assert torch.equal(ids.cpu(), table[token_ids].cpu())
    _check_hash_weights(x, weight, ids, w, 2.5)
    _split_counters_are_zero(device)


@pytest.mark.parametrize("T", [1, 64, 256, 257])
def test_route_dispatch_by_token_count(device, monkeypatch, T):
    from dsv4_triton.kernels import router as kern

    taken = []
    for name in ("route_split", "route_tiled"):
        monkeypatch.setattr(kern, name, lambda *a, _f=getattr(kern, name), _n=name: taken.append(_n) or _f(*a))
    x, weight, bias = _inputs(T, 24, 64, 83 + T, device)
    _check_route(x, weight, bias, 6, 2.5, _triton(x, weight, bias, topk=6, route_scale=2.5))
    assert taken == ["route_split" if T <= kern.DECODE_MAX_T else "route_tiled"]


def test_route_split_bad_config(device):
    x, weight, bias = _inputs(3, 8, 64, 0, device)
    # SPLIT_K < BLOCK_K; BLOCK_E not a power of two; a missing field; a field below 16; a
    # seventh field.
    for config in [(16, 16, 64, 32, 4, 2), (16, 24, 32, 64, 4, 2), (16, 16, 32, 64, 4), (8, 16, 32, 64, 4, 2),
                   (16, 16, 32, 64, 4, 2, True)]:
        with pytest.raises(ValueError, match="config"):
            _split(x, weight, bias, None, None, 2, 1.0, config)


def test_route_many_tokens(device):
    # 300 tokens: a token bucket where tuning keeps only wide expert chunks, while the first
    # config (the only one without tuning) has narrow ones: the candidate lists must fit.
    x, weight, bias = _inputs(300, 40, 32, 71, device)
    _check_route(x, weight, bias, 6, 2.5, _triton(x, weight, bias, topk=6, route_scale=2.5))


def test_route_zero_tokens_and_strided(device):
    x, weight, bias = _inputs(0, 8, 64, 0, device)
    w, ids = _triton(x, weight, bias, topk=2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    x, weight, bias = _inputs(5, 8, 64, 53, device)
    wide = torch.zeros(5, 128, dtype=torch.bfloat16, device=device)
    wide[:, :64] = x
    _check_route(x, weight, bias, 2, 1.0, _triton(wide[:, :64], weight, bias, topk=2))
    _check_route(x, weight, bias, 2, 1.0, _triton(x, weight.t().contiguous().t(), bias, topk=2))


def test_route_custom_op_schema_and_fake():
    x, weight, bias = _inputs(3, 8, 64, 59, "cpu")
    torch.library.opcheck(torch.ops.dsv4.route.default, (x, weight, bias, None, None, 2, 1.5))
    table = torch.randint(0, 8, (10, 2), dtype=torch.int32)
    torch.library.opcheck(torch.ops.dsv4.route.default, (x, weight, None, table, torch.tensor([1, 2, 3]), 2, 1.5))


_x = torch.zeros(3, 16, dtype=torch.bfloat16)
_w = torch.zeros(8, 16, dtype=torch.bfloat16)
_tab = torch.zeros(10, 2, dtype=torch.int32)


@pytest.mark.parametrize("kw, err, name", [
    (dict(x=_x.float()), TypeError, "x"),
    (dict(x=torch.zeros(3, 17, dtype=torch.bfloat16)), ValueError, "x"),
    (dict(weight=_w.float()), TypeError, "weight"),
    (dict(topk=9), ValueError, "topk"),
    (dict(topk=0), ValueError, "topk"),
    (dict(bias=torch.zeros(7)), ValueError, "bias"),
    (dict(bias=torch.zeros(8, dtype=torch.bfloat16)), TypeError, "bias"),
    (dict(bias=torch.zeros(8), tid2eid=_tab, token_ids=torch.zeros(3, dtype=torch.int64)), ValueError, "bias"),
    (dict(tid2eid=_tab), ValueError, "token_ids"),
    (dict(token_ids=torch.zeros(3, dtype=torch.int64)), ValueError, "token_ids"),
    (dict(tid2eid=_tab.long(), token_ids=torch.zeros(3, dtype=torch.int64)), TypeError, "tid2eid"),
    (dict(tid2eid=torch.zeros(10, 3, dtype=torch.int32), token_ids=torch.zeros(3, dtype=torch.int64)), ValueError,
     "tid2eid"),
    (dict(tid2eid=_tab, token_ids=torch.zeros(4, dtype=torch.int64)), ValueError, "token_ids"),
    (dict(tid2eid=_tab, token_ids=torch.zeros(3)), TypeError, "token_ids"),
    (dict(route_scale="2"), TypeError, "route_scale"),
])
def test_route_bad_input(kw, err, name):
    args = dict(x=_x, weight=_w, topk=2)
    args.update(kw)
    with pytest.raises(err, match=name):
        ops.route(**args)


# ---------------------------------------------------------------- sm_90 compilation (no GPU needed)



@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("hash_mode, config", [(False, (64, 128, 64, 8, 3)), (True, (16, 16, 64, 4, 3))])
def test_route_kernel_compiles_for_sm90_without_spills(hash_mode, config):
    from dsv4_triton.kernels import router as kern

    bt, be, bk, warps, _ = config
    assert config in kern._CONFIGS
    consts = dict(HASH=hash_mode, HAS_BIAS=not hash_mode, K_PAD=8, E_PAD=512, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk)
    types = dict(x_ptr="*bf16", w_ptr="*bf16", table_ptr="*i32", tok_ids_ptr="*i64", ids_ptr="*i32",
                 cand_id_ptr="*i32", counter_ptr="*i32", route_scale="fp32")
    usage = compile_for_sm90("dsv4_triton.kernels.router", "_route_kernel", types, consts,
                             ["dim", "stride_x", "stride_w"], warps)
    assert usage["stack"] == 0 and usage["pipelined"], usage


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("hash_mode, config", [
    (False, (64, 32, 128, 512, 8, 3)), (True, (16, 32, 128, 256, 4, 3)), (False, (16, 32, 128, 512, 4, 3)),
    (False, (32, 64, 128, 256, 4, 3)),
])
def test_route_split_kernel_compiles_for_sm90_without_spills(hash_mode, config):
    from dsv4_triton.kernels import router as kern

    bt, be, bk, sk, warps, stages = config
    assert config in kern._SPLIT_CONFIGS
    consts = dict(HASH=hash_mode, HAS_BIAS=not hash_mode, K_PAD=8, TOPK=6, E_PAD=512, BLOCK_T=bt, BLOCK_E=be,
                  BLOCK_K=bk, SPLIT_K=sk)
    types = dict(x_ptr="*bf16", w_ptr="*bf16", table_ptr="*i32", tok_ids_ptr="*i64", ids_ptr="*i32",
                 sync_ptr="*i32", route_scale="fp32")
    usage = compile_for_sm90("dsv4_triton.kernels.router", "_route_split_kernel", types, consts,
                             ["dim", "stride_x", "stride_w"], warps, stages)
    assert usage["stack"] == 0 and usage["pipelined"], usage


# ---------------------------------------------------------------- GPU: model sizes, every config

@pytest.mark.gpu
@given(T=st.sampled_from([1, 8, 64, 65, 200, 256, 257, 1000, 4096, 16384]), E=st.sampled_from([256, 384]),
       dim=st.sampled_from([4096, 7168]), seed=st.integers(0, 2**31))
def test_route_model_sizes_gpu(T, E, dim, seed):
    x, weight, bias = _inputs(T, E, dim, seed, "cuda")
    _check_route(x, weight, bias, 6, 2.5, _triton(x, weight, bias, topk=6, route_scale=2.5))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 333, 4096])
def test_route_every_config_gpu(T):
    from dsv4_triton.kernels import router as kern

    x, weight, bias = _inputs(T, 384, 7168, T, "cuda")
    table = torch.randint(0, 384, (129280, 6), dtype=torch.int32, device="cuda")
    token_ids = torch.randint(0, 129280, (T,), device="cuda")
    for config in kern._CONFIGS:
        _check_route(x, weight, bias, 6, 2.5, kern.route_tiled(x, weight, bias, None, None, 6, 2.5, config=config))
        w, ids = kern.route_tiled(x, weight, None, table, token_ids, 6, 2.5, config=config)
        assert torch.equal(ids, table[token_ids])


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 200, 4096])
def test_route_deterministic_gpu(T):
    x, weight, bias = _inputs(T, 384, 7168, 61, "cuda")
    first = _triton(x, weight, bias, topk=6, route_scale=2.5)
    for _ in range(3):
        again = _triton(x, weight, bias, topk=6, route_scale=2.5)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])



@pytest.mark.gpu
@pytest.mark.parametrize("E, dim", [(384, 7168), (256, 4096)])
@pytest.mark.parametrize("T", [1, 63, 200])
def test_route_split_every_config_gpu(T, E, dim):
    from dsv4_triton.kernels import router as kern

    x, weight, bias = _inputs(T, E, dim, T + E, "cuda")
    table = torch.randint(0, E, (129280, 6), dtype=torch.int32, device="cuda")
    token_ids = torch.randint(0, 129280, (T,), device="cuda")
    for config in kern._SPLIT_CONFIGS:
        first = kern.route_split(x, weight, bias, None, None, 6, 2.5, config=config)
        _check_route(x, weight, bias, 6, 2.5, first)
        again = kern.route_split(x, weight, bias, None, None, 6, 2.5, config=config)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1]), config
        w, ids = kern.route_split(x, weight, None, table, token_ids, 6, 2.5, config=config)
        assert torch.equal(ids, table[token_ids])
        _check_hash_weights(x, weight, ids, w, 2.5)
    _split_counters_are_zero("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 200])
def test_route_split_cuda_graph_replay_gpu(T):
    # Captured once, replayed: the workspace and its counters persist across replays, and
    # every replay gives the eager call's bits (T = 200: a workspace grown past its first
    # 64-token room).
    x, weight, bias = _inputs(T, 384, 7168, 89, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        eager = _triton(x, weight, bias, topk=6, route_scale=2.5)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = _triton(x, weight, bias, topk=6, route_scale=2.5)
    for _ in range(3):
        captured[0].zero_()
        captured[1].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    _split_counters_are_zero("cuda")
