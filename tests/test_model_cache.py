"""model.cache: candidate indices and cache bookkeeping against a brute-force oracle built
per token from SPEC 5 (window of the last W positions, every causal HCA entry, the
indexer's CSA top-k) and SPEC 6 (when entries exist, which tokens a window pools).

The cache is driven with values that encode what they are (a KV vector carries its
position, an entry its index), so gathering through the produced indices must give back
exactly the oracle's candidate set; no model ops are involved."""

import pytest
import torch
from hypothesis import given, strategies as st

from model.cache import INDEX, MAIN, KVCache, state_rows
from model.config import get_config

RATIO_OF_LAYER = {0: 0, 1: 4, 2: 128}  # the tiny schedule (0, 4, 128, 4)


def oracle_positions(p, window):
    return set(range(max(0, p - window + 1), p + 1))


def oracle_hca_entries(p, ratio=128):
    return set(range((p + 1) // ratio))


def random_topk(g, n_valid, k):
    """The indexer's answer for one token: min(k, n_valid) distinct valid entries, -1 padded."""
    n = min(k, n_valid)
    chosen = torch.randperm(n_valid, generator=g)[:n] if n_valid else torch.empty(0, dtype=torch.int64)
    return torch.cat([chosen, torch.full((k - n,), -1, dtype=torch.int64)])


def check_row(row, expected_targets, what):
    row = row.tolist()
    valid = [i for i in row if i >= 0]
    assert len(valid) == len(set(valid)), f"{what}: duplicate candidates {row}"
    assert all(i == -1 or i >= 0 for i in row)
    assert set(valid) == expected_targets, f"{what}: got {sorted(valid)}, expected {sorted(expected_targets)}"


@given(seq_len=st.integers(1, 300), window=st.integers(1, 20), ratio=st.sampled_from([0, 4, 128]),
       batch=st.integers(1, 3), topk=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_prefill_candidates_match_oracle(seq_len, window, ratio, batch, topk, seed):
    g = torch.Generator().manual_seed(seed)
    n_entries = seq_len // ratio if ratio else 0
    tk = None
    if ratio == 4:
        tk = torch.stack([torch.stack([random_topk(g, (s + 1) // 4, topk) for s in range(seq_len)])
                          for _ in range(batch)])
    idx = KVCache.prefill_candidates(seq_len, window, ratio, n_entries, tk)
    assert idx.dtype == torch.int32 and idx.shape[1] == seq_len
    assert int(idx.max()) < seq_len + n_entries
    for b in range(idx.shape[0]):
        for s in range(seq_len):
            expected = oracle_positions(s, window)
            if ratio == 128:
                expected |= {seq_len + j for j in oracle_hca_entries(s)}
            elif ratio == 4:
                expected |= {seq_len + int(j) for j in tk[b, s] if j >= 0}
                assert all(j < (s + 1) // 4 for j in tk[b, s].tolist() if j >= 0)
            check_row(idx[b, s], expected, f"b={b} s={s}")


def _encode_tokens(batch, positions, d):
    """KV / projection vectors that carry (request, position) exactly (small integers)."""
    v = torch.zeros(*positions.shape, d)
    v[..., 0] = (positions % 128).float()
    v[..., 1] = (positions // 128).float()
    v[..., 2] = torch.arange(batch).view(-1, *([1] * (positions.dim() - 1))).float()
    return v


def _decode(v):
    return (v[..., 1].long() * 128 + v[..., 0].long()).tolist(), v[..., 2].long().tolist()


@given(window=st.integers(1, 20), max_extra=st.integers(1, 40), lengths=st.lists(st.integers(1, 200), min_size=1,
       max_size=3), seed=st.integers(0, 2**31))
def test_cache_through_prefill_and_decode_matches_oracle(window, max_extra, lengths, seed):
    """Prefill rows of different lengths (right padded), then decode in lockstep with
    per-request positions, crossing window and compression boundaries.  At every step the
    gathered candidates must be exactly the oracle's, and a window that completes must hold
    exactly its tokens (plus, for CSA, the previous window's) in the state rows."""
    g = torch.Generator().manual_seed(seed)
    cfg = get_config("tiny").replace(sliding_window=window)
    max_seq = max(lengths) + max_extra
    cache = KVCache(cfg, max_batch=4, max_seq_len=max_seq, device="cpu", dtype=torch.float32)
    B, S = len(lengths), max(lengths)
    lens = torch.tensor(lengths)
    pos = torch.arange(S).expand(B, S)
    d, di = cfg.head_dim, cfg.index_head_dim
    for layer, ratio in RATIO_OF_LAYER.items():
        cache.fill_window(layer, _encode_tokens(B, pos, d), lens)
        if ratio:
            n = S // ratio
            ent = _encode_tokens(B, torch.arange(n).expand(B, n), d)
            cache.write_entries(layer, MAIN, ent)
            width = 2 * d if ratio == 4 else d
            proj = _encode_tokens(B, pos, width)
            cache.fill_state(layer, MAIN, proj, proj.clone(), lens)
        if ratio == 4:
            cache.write_entries(layer, INDEX, _encode_tokens(B, torch.arange(S // 4).expand(B, S // 4), di))
            cache.fill_state(layer, INDEX, _encode_tokens(B, pos, 2 * di), _encode_tokens(B, pos, 2 * di), lens)

    p = lens.clone()
    for _ in range(max_extra):
        for layer, ratio in RATIO_OF_LAYER.items():
            cache.write_token(layer, _encode_tokens(B, p, d), p)
            topk = None
            if ratio:
                width = 2 * d if ratio == 4 else d
                which_list = [MAIN, INDEX] if ratio == 4 else [MAIN]
                for which in which_list:
                    w = 2 * di if which == INDEX else width
                    proj = _encode_tokens(B, p, w)
                    cache.push_state(layer, which, proj, proj.clone(), p)
                    a, z = cache.state(layer, which, B)
                    assert torch.equal(a, z)
                    for b in range(B):
                        pb = int(p[b])
                        if (pb + 1) % ratio:
                            continue
                        got, req = _decode(a[b])
                        first = pb + 1 - ratio
                        if ratio == 128:
                            assert got == list(range(first, pb + 1)) and set(req) == {b}
                        else:
                            assert got[4:] == list(range(first, pb + 1)), (got, pb)
                            if first >= 4:  # entry 0 has no previous window: rows 0..3 unused
                                assert got[:4] == list(range(first - 4, first)), (got, pb)
                    out_d = di if which == INDEX else d
                    entry = _encode_tokens(B, p // ratio, out_d)
                    cache.emit_entry(layer, which, entry, p)
                if ratio == 4:
                    topk = torch.stack([random_topk(g, (int(p[b]) + 1) // 4, cfg.index_topk) for b in range(B)])
                    topk = topk[:, None, :]
                    keys = cache.index_keys(layer, B)
                    for b in range(B):  # every valid indexer key is the entry it should be
                        nv = (int(p[b]) + 1) // 4
                        got, req = _decode(keys[b, :nv])
                        assert got == list(range(nv)) and set(req) <= {b}
            idx = cache.decode_candidates(layer, p, topk)
            assert idx.shape[:2] == (B, 1) and idx.dtype == torch.int32
            kv = cache.kv(layer, B)
            W = window
            for b in range(B):
                pb = int(p[b])
                row = idx[b, 0]
                check_row(row, set(row[row >= 0].tolist()), f"layer {layer} b={b} p={pb}")
                slots = row[row >= 0].long()
                win = slots[slots < W]
                ent = slots[slots >= W]
                got_pos, got_req = _decode(kv[b, win])
                assert sorted(got_pos) == sorted(oracle_positions(pb, W)) and set(got_req) <= {b}, \
                    f"layer {layer} b={b} p={pb}: window holds {sorted(got_pos)}"
                got_ent, got_req = _decode(kv[b, ent])
                if ratio == 128:
                    expected = oracle_hca_entries(pb)
                elif ratio == 4:
                    expected = {int(j) for j in topk[b, 0] if j >= 0}
                else:
                    expected = set()
                assert sorted(got_ent) == sorted(expected) and set(got_req) <= {b}, \
                    f"layer {layer} b={b} p={pb}: entries {sorted(got_ent)} != {sorted(expected)}"
        p = p + 1
        if int(p.max()) >= max_seq:
            break


def test_state_rows_and_sizes():
    cfg = get_config("tiny")
    cache = KVCache(cfg, max_batch=2, max_seq_len=300, device="cpu")
    assert state_rows(4) == 8 and state_rows(128) == 128
    assert cache.kv(0, 2).shape == (2, 16, 128)  # window only
    assert cache.kv(1, 2).shape == (2, 16 + 75, 128)  # CSA: 300 // 4 entries
    assert cache.kv(2, 1).shape == (1, 16 + 2, 128)  # HCA: 300 // 128 entries
    assert cache.index_keys(1, 2).shape == (2, 75, 128)
    assert cache.state(1, INDEX, 2)[0].shape == (2, 8, 256) and cache.state(2, MAIN, 2)[0].shape == (2, 128, 128)
    with pytest.raises(ValueError, match="indexer"):
        cache.index_keys(2, 1)
    with pytest.raises(ValueError, match="topk"):
        cache.decode_candidates(1, torch.tensor([5]))


def test_emit_is_a_no_op_when_no_window_can_complete():
    cache = KVCache(get_config("tiny"), max_batch=1, max_seq_len=100, device="cpu")
    before = cache.kv(2, 1).clone()
    cache.emit_entry(2, MAIN, torch.ones(1, 128, dtype=torch.bfloat16), torch.tensor([99]))
    assert torch.equal(cache.kv(2, 1), before)


def test_reset_zeroes_everything():
    cache = KVCache(get_config("tiny"), max_batch=1, max_seq_len=64, device="cpu")
    cache.write_token(1, torch.ones(1, 128, dtype=torch.bfloat16), torch.tensor([3]))
    cache.push_state(1, MAIN, torch.ones(1, 256), torch.ones(1, 256), torch.tensor([3]))
    cache.set_positions(torch.tensor([4]))
    cache.reset()
    assert not cache.kv(1, 1).any() and not cache.state(1, MAIN, 1)[0].any() and not cache.next_pos.any()
