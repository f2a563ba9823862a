"""model.cache: candidate indices and cache bookkeeping against a brute-force oracle built
per token from SPEC 5 (window of the last W positions, every causal HCA entry, the
indexer's CSA top-k) and SPEC 6 (when entries exist, which tokens a window pools); the
encoded storage (FP8 KV rows, FP4 indexer keys) through the model: prefill then decode
leaves the cache rows bit-identical to one longer prefill, and the rows hold exactly the
BF16 values a BF16 cache would (attention over them is bit-identical).

The bookkeeping tests drive the cache with values that encode what they are (a KV vector
carries its position and request in values 0.5 / 1, which FP8 and FP4 rows hold
exactly), so decoding the rows gathered through the produced indices must give back
exactly the oracle's candidate set."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.reference.attention import unpack_kv_fp8
from dsv4_triton.reference.indexer import key_values
from model import DSV4Model
from model.cache import INDEX, MAIN, KVCache, state_rows
from model.config import get_config
from test_model_forward import one_cpu_thread  # noqa: F401  (autouse: one intra-op thread)

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


POSITION_BITS, REQUEST_BITS = 10, 2


def _encode_tokens(batch, positions, d):
    """Vectors ``[..., d]`` that carry (request, position) exactly: bit k of the position in
    value k, bit k of the request in value POSITION_BITS + k, as 1.0 (set) or 0.5 (clear);
    the rest 0.5.  Exact through qat8 / the FP8 row (one scale per 64 values, the block's
    amax 1 or 0.5), and through the FP4 row (grid values 2 and 4 times the scale)."""
    request = torch.arange(batch).view(-1, *([1] * (positions.dim() - 1))).expand_as(positions)
    v = torch.full((*positions.shape, d), 0.5)
    for k in range(POSITION_BITS):
        v[..., k] += 0.5 * ((positions >> k) & 1).float()
    for k in range(REQUEST_BITS):
        v[..., POSITION_BITS + k] += 0.5 * ((request >> k) & 1).float()
    return v


def _decode(v):
    """(positions, requests) of encoded vectors ``[n, >= 12]`` (FP32 values)."""
    bits = (v[..., :POSITION_BITS + REQUEST_BITS] == 1.0).long()
    pos = sum(bits[..., k] << k for k in range(POSITION_BITS))
    req = sum(bits[..., POSITION_BITS + k] << k for k in range(REQUEST_BITS))
    return pos.tolist(), req.tolist()


def _write_rows(store, rows, vectors, which):
    """Test double of the compressor's encoded write: ``vectors [n, d]`` packed into the flat
    rows ``rows`` of ``store`` (-1: skipped), as ``compress_entries`` would write its entries."""
    packed = ops.pack_kv_fp8(vectors) if which == MAIN else ops.pack_indexer_keys(vectors)
    keep = rows >= 0
    store.view(-1, store.shape[-1])[rows[keep]] = packed[keep]


def _kv_values(rows, d):
    return unpack_kv_fp8(rows, d)


@given(window=st.integers(1, 20), max_extra=st.integers(1, 40), lengths=st.lists(st.integers(1, 200), min_size=1,
       max_size=3), seed=st.integers(0, 2**31))
def test_cache_through_prefill_and_decode_matches_oracle(window, max_extra, lengths, seed):
    """Prefill rows of different lengths (right padded), then decode in lockstep with
    per-request positions, crossing window and compression boundaries.  At every step the
    rows gathered through the candidates must decode to exactly the oracle's, and a window
    that completes must hold exactly its tokens (plus, for CSA, the previous window's) in
    the state rows."""
    g = torch.Generator().manual_seed(seed)
    cfg = get_config("tiny").replace(sliding_window=window)
    max_seq = max(lengths) + max_extra
    cache = KVCache(cfg, max_batch=4, max_seq_len=max_seq, device="cpu")
    B, S = len(lengths), max(lengths)
    lens = torch.tensor(lengths)
    pos = torch.arange(S).expand(B, S)
    d, di = cfg.head_dim, cfg.index_head_dim
    freqs = ops.rope_freqs(cfg.qk_rope_head_dim, max_seq, 10000.0)
    for layer, ratio in RATIO_OF_LAYER.items():
        cache.store_window(layer, _encode_tokens(B, pos, d).bfloat16(), freqs, pos, lens)
        if ratio:
            n = S // ratio
            _write_rows(cache.entry_store(layer, MAIN), cache.prefill_entry_rows(layer, MAIN, B, n),
                        _encode_tokens(B, torch.arange(n).expand(B, n), d).flatten(0, 1), MAIN)
            width = 2 * d if ratio == 4 else d
            proj = _encode_tokens(B, pos, width)
            cache.fill_state(layer, MAIN, proj, proj.clone(), lens)
        if ratio == 4:
            _write_rows(cache.entry_store(layer, INDEX), cache.prefill_entry_rows(layer, INDEX, B, S // 4),
                        _encode_tokens(B, torch.arange(S // 4).expand(B, S // 4), di).flatten(0, 1), INDEX)
            cache.fill_state(layer, INDEX, _encode_tokens(B, pos, 2 * di), _encode_tokens(B, pos, 2 * di), lens)

    p = lens.clone()
    for _ in range(max_extra):
        for layer, ratio in RATIO_OF_LAYER.items():
            cache.store_window(layer, _encode_tokens(B, p, d).bfloat16(), freqs, p)
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
                    rows = cache.decode_entry_rows(layer, which, p)
                    assert torch.equal(rows >= 0, (p + 1) % ratio == 0)
                    _write_rows(cache.entry_store(layer, which), rows, _encode_tokens(B, p // ratio, out_d), which)
                    cache.advance_state(layer, which, p)
                if ratio == 4:
                    topk = torch.stack([random_topk(g, (int(p[b]) + 1) // 4, cfg.index_topk) for b in range(B)])
                    topk = topk[:, None, :]
                    keys = key_values(cache.index_keys(layer, B))
                    for b in range(B):  # every valid indexer key is the entry it should be
                        nv = (int(p[b]) + 1) // 4
                        got, req = _decode(keys[b, :nv])
                        assert got == list(range(nv)) and set(req) <= {b}
            idx = cache.decode_candidates(layer, p, topk)
            assert idx.shape[:2] == (B, 1) and idx.dtype == torch.int32
            kv = _kv_values(cache.kv(layer, B), d)
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
    # FP8 rows of D = 128: 64 codes + 64 BF16 rope values + 1 scale, padded to 200 bytes.
    assert cache.kv(0, 2).shape == (2, 16, 200) and cache.kv(0, 2).dtype == torch.uint8  # window only
    assert cache.kv(1, 2).shape == (2, 16 + 75, 200)  # CSA: 300 // 4 entries
    assert cache.kv(2, 1).shape == (1, 16 + 2, 200)  # HCA: 300 // 128 entries
    assert cache.index_keys(1, 2).shape == (2, 75, 68) and cache.index_keys(1, 2).dtype == torch.uint8
    assert cache.state(1, INDEX, 2)[0].shape == (2, 8, 256) and cache.state(2, MAIN, 2)[0].shape == (2, 128, 128)
    # The real footprint: encoded rows (2 requests x (16 + 91 + 18 + 91) rows x 200 B, 2 x 2 x 75
    # keys x 68 B) and the FP32 states (a and z: CSA main and index [8, 256] twice, HCA [128, 128]).
    rows = 2 * (16 + 91 + 18 + 91) * 200 + 2 * 2 * 75 * 68
    states = 2 * 2 * 2 * (2 * 8 * 256 * 4) + 2 * (2 * 128 * 128 * 4)
    assert cache.nbytes() == rows + states
    with pytest.raises(ValueError, match="indexer"):
        cache.index_keys(2, 1)
    with pytest.raises(ValueError, match="topk"):
        cache.decode_candidates(1, torch.tensor([5]))


def test_no_entry_is_written_when_no_window_can_complete():
    cache = KVCache(get_config("tiny"), max_batch=1, max_seq_len=100, device="cpu")
    assert cache.n_entries(2) == 0
    assert torch.equal(cache.decode_entry_rows(2, MAIN, torch.tensor([99])), torch.tensor([-1]))


def test_reset_zeroes_everything():
    cache = KVCache(get_config("tiny"), max_batch=1, max_seq_len=64, device="cpu")
    freqs = ops.rope_freqs(64, 64, 10000.0)
    cache.store_window(1, torch.ones(1, 128, dtype=torch.bfloat16), freqs, torch.tensor([3]))
    cache.push_state(1, MAIN, torch.ones(1, 256), torch.ones(1, 256), torch.tensor([3]))
    cache.set_positions(torch.tensor([4]))
    assert cache.kv(1, 1).any()
    cache.reset()
    assert not cache.kv(1, 1).any() and not cache.state(1, MAIN, 1)[0].any() and not cache.next_pos.any()


# --- the encoded storage through the model -------------------------------------------------

MAX_SEQ = 136
WRITE_OPS = ("compress_entries_cached", "compress_entries_to_cache", "store_window_kv")


@pytest.fixture(scope="module")
def model():
    with use_backend("reference"):
        return DSV4Model.from_pretrained("tiny", device="cpu", max_batch=2, max_seq_len=MAX_SEQ, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 1000, (2, MAX_SEQ), generator=torch.Generator().manual_seed(5))


def _valid_rows(model, b, length):
    """Request b's rows that hold data after ``length`` tokens, per layer: (window slots,
    entry rows, index key rows), as tensors to compare."""
    cache, W = model.cache, model.config.sliding_window
    out = []
    for layer, ratio in enumerate(cache.ratios):
        kv = cache.kv(layer, b + 1)[b]
        parts = [kv[:min(W, length)]]  # slot s holds position s until the ring wraps, then every slot is live
        if ratio:
            parts.append(kv[W:W + length // ratio])
        if ratio == 4:
            parts.append(cache.index_keys(layer, b + 1)[b, :length // 4])
        out.append([t.clone() for t in parts])
    return out


def _prefill_then_decode(model, tokens, lengths, steps):
    """A right-padded batch prefill of ``tokens[b, :lengths[b]]``, then ``steps`` decode steps
    fed the next prompt tokens (teacher-forced) at per-request positions."""
    model.reset()
    lens = torch.tensor(lengths)
    model(tokens[:len(lengths), :max(lengths)], 0, lens)
    rows = torch.arange(len(lengths))
    for k in range(steps):
        pos = lens + k
        model(tokens[rows, pos][:, None], pos)


@pytest.fixture
def shape_invariant_matmuls(monkeypatch):
    """FP32 matmuls and einsums of the reference ops in FP64, rounded once to FP32.  The CPU
    BLAS picks its kernels by row count, so the FP32 product of one row differs in the last
    bit between a decode batch and a prompt; the compressor's FP32 projections carry that
    into its entries.  In FP64 the rounding to FP32 is the same whatever the shape, so
    prefill and decode compute the same values and only the cache is compared."""
    real_matmul, real_einsum = torch.Tensor.__matmul__, torch.einsum

    def matmul(a, b):
        if a.dtype == torch.float32 and b.dtype == torch.float32:
            return real_matmul(a.double(), b.double()).float()
        return real_matmul(a, b)

    def einsum(equation, *operands):
        if all(o.dtype == torch.float32 for o in operands):
            return real_einsum(equation, *[o.double() for o in operands]).float()
        return real_einsum(equation, *operands)

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    monkeypatch.setattr(torch, "einsum", einsum)


# Batches whose first request is the shorter one (the longer one's tokens past the shorter's
# length are right padding); with the later request the shorter, the model's values
# (not its cache) still differ in the last bit between the two paths, as they did with a
# BF16 cache.
@pytest.mark.usefixtures("shape_invariant_matmuls")
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("lengths, steps", [
    ([3], 3), ([7], 2), ([5, 8], 4), ([127], 3), ([129], 2), ([128, 5], 2), ([8, 126], 4),
])
def test_prefill_then_decode_rows_equal_one_longer_prefill(model, tokens, backend, lengths, steps):
    """Prompt lengths around multiples of 4 and 128 (+-1), alone and as a batch of requests
    at different positions: after the prefill and ``steps`` decode steps, every live cache
    row (window, compressed entries, indexer keys) is bit-identical to that of one prefill
    of the longer prompt.  The cache-writing ops run on ``backend``."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the model fixture runs on the CPU, where Triton needs the interpreter (CPU-only runs)")
    if backend == "triton" and max(lengths) > 64:
        pytest.skip("the interpreter is slow: the triton writes are checked on the short prompts")
    names = WRITE_OPS if backend == "triton" else None
    with use_backend("reference"), (use_backend("triton", ops=names) if names else use_backend("reference")):
        _prefill_then_decode(model, tokens, lengths, steps)
        decoded = [_valid_rows(model, b, n + steps) for b, n in enumerate(lengths)]
        for b, n in enumerate(lengths):
            _prefill_then_decode(model, tokens[b:b + 1], [n + steps], 0)
            whole = _valid_rows(model, 0, n + steps)
            for layer, (got, expected) in enumerate(zip(decoded[b], whole)):
                for part, (g, e) in enumerate(zip(got, expected)):
                    assert g.dtype == torch.uint8 and torch.equal(g, e), \
                        f"request {b} (length {n} + {steps}), layer {layer}, part {part}: rows differ"


def test_rows_hold_the_bf16_values_exactly(model, tokens):
    """The model's FP8 rows re-pack to themselves from the BF16 values they decode to (so a
    BF16 cache of those values, packed, is this cache), and decode attention over the rows
    equals attention over those BF16 values bit for bit."""
    with use_backend("reference"):
        _prefill_then_decode(model, tokens, [130, 9], 3)
        cfg, cache = model.config, model.cache
        g = torch.Generator().manual_seed(6)
        for layer in range(cfg.num_hidden_layers):
            rows = cache.kv(layer, 2)
            values = unpack_kv_fp8(rows, cfg.head_dim).bfloat16()
            written = rows.any(-1)  # rows never written are zero bytes, not an encoding
            assert int(written.sum()) > 2 * cfg.sliding_window - 8
            assert torch.equal(ops.pack_kv_fp8(values[written]), rows[written])
            q = torch.randn(2, 1, cfg.num_attention_heads, cfg.head_dim, generator=g).bfloat16()
            idx = torch.randint(-1, rows.shape[1], (2, 1, 24), generator=g, dtype=torch.int32)
            sink = torch.randn(cfg.num_attention_heads, generator=g)
            scale = cfg.head_dim ** -0.5
            assert torch.equal(ops.sparse_attention(q, rows, sink, idx, scale),
                               ops.sparse_attention(q, values, sink, idx, scale))
            if cache.ratios[layer] == 4:
                keys = cache.index_keys(layer, 2)
                written = keys.any(-1)
                assert torch.equal(ops.pack_indexer_keys(key_values(keys[written]).bfloat16()), keys[written])
