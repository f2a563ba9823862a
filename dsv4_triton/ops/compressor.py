"""Public ops of the compressor family (SPEC 6): compress_entries (BF16 entries, optionally
also written encoded into cache rows), compress_entries_to_cache (only the cache rows), and
store_window_kv (the sliding-window KV of new tokens into their FP8 ring rows, SPEC 5.2)."""


from typing import Optional

import torch

from .. import validate as V
from ..kernels import compressor as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import compressor as _reference  # noqa: F401  (registers the reference backend)
from ..reference.attention import fp8_row_bytes
from ..reference.indexer import FP4_KEY_BYTES
from ..registry import call, define_op

__all__ = ["compress_entries", "compress_entries_to_cache", "store_window_kv"]

RATIOS = (4, 128)
KINDS = ("kv", "indexer")
INDEX_DTYPES = (torch.int32, torch.int64)
HADAMARD_SIZES = (64, 128, 256, 512)
ROPE_DIM = 64  # SPEC 1: every configuration rotates the last 64 dims
# A kernel program holds one whole entry row (the rmsnorm needs it): rows up to this long.
MAX_HEAD_DIM = 1024
# Entry lengths whose encoded rows have a reader: FP8 KV rows (sparse_attention), FP4 keys (indexer_topk).
KV_ROW_HEAD_DIMS = (128, 512)
INDEXER_ROW_HEAD_DIM = 128
ROW_INDEX_DTYPES = (torch.int32, torch.int64)


def _slots(ratio: int) -> int:
    return 2 * ratio if ratio == 4 else ratio


def _halves(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def _stub(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor, freqs: torch.Tensor,
          entry_idx: torch.Tensor, ratio: int, kind: str, eps: float) -> torch.Tensor:
    raise NotImplementedError


def _cached_stub(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor, freqs: torch.Tensor,
                 entry_idx: torch.Tensor, ratio: int, kind: str, eps: float, cache: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


def _to_cache_stub(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor, freqs: torch.Tensor,
                   entry_idx: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, ratio: int, kind: str,
                   eps: float) -> None:
    raise NotImplementedError


def _window_stub(kv: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, window: int,
                 lengths: Optional[torch.Tensor]) -> None:
    raise NotImplementedError


define_op("compress_entries_cached", _cached_stub,
          fake=lambda a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps, cache, rows: torch.empty(
              a.shape[0], a.shape[-1] // _halves(ratio), dtype=torch.bfloat16, device=a.device),
          mutates_args=("cache",))
define_op("compress_entries_to_cache", _to_cache_stub,
          fake=lambda a, z, ape, norm_w, freqs, entry_idx, cache, rows, ratio, kind, eps: None,
          mutates_args=("cache",))
define_op("store_window_kv", _window_stub, fake=lambda kv, freqs, positions, cache, window, lengths: None,
          mutates_args=("cache",))
define_op("compress_entries", _stub, fake=lambda a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps: torch.empty(
    a.shape[0], a.shape[-1] // _halves(ratio), dtype=torch.bfloat16, device=a.device))


def _check_entries(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps):
    """Validates ``compress_entries``' arguments; returns (ratio, kind, eps, d)."""
    ratio = V.positive_int("ratio", ratio, allowed=RATIOS)
    if not isinstance(kind, str):
        raise TypeError(f"kind: expected a str, got {type(kind).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    V.number("eps", eps, positive=True)
    V.tensor("a", a, (torch.float32,), ndim=3)
    V.tensor("z", z, (torch.float32,), ndim=3)
    n_entries, slots, width = a.shape
    if slots != _slots(ratio):
        raise ValueError(f"a: expected {_slots(ratio)} slots (dim 1) for ratio {ratio}, got shape {tuple(a.shape)}")
    V.divisible("a", width, _halves(ratio))
    d = width // _halves(ratio)
    V.shape("z", z, a.shape)
    V.same_device("z", z, "a", a)
    V.tensor("ape", ape, (torch.float32,), ndim=2)
    V.shape("ape", ape, (ratio, width))
    V.same_device("ape", ape, "a", a)
    V.tensor("norm_w", norm_w, V.FLOAT_DTYPES, ndim=1)
    V.shape("norm_w", norm_w, (d,))
    V.same_device("norm_w", norm_w, "a", a)
    V.tensor("freqs", freqs, (torch.float32,), ndim=3)
    if freqs.shape[0] < 1 or freqs.shape[1] < 1 or freqs.shape[2] != 2:
        raise ValueError(f"freqs: expected shape [max_pos >= 1, rope_dim/2 >= 1, 2], got {tuple(freqs.shape)}")
    V.same_device("freqs", freqs, "a", a)
    V.tensor("entry_idx", entry_idx, INDEX_DTYPES, ndim=1)
    V.shape("entry_idx", entry_idx, (n_entries,))
    V.same_device("entry_idx", entry_idx, "a", a)
    rope_dim = 2 * freqs.shape[1]
    if rope_dim != ROPE_DIM:
        raise ValueError(f"freqs: expected a rope_dim {ROPE_DIM} table (shape [max_pos, {ROPE_DIM // 2}, 2]), "
                         f"got shape {tuple(freqs.shape)}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"a: expected an entry length d <= {MAX_HEAD_DIM}, got d = {d}")
    if kind == "kv":
        if d <= rope_dim or (d - rope_dim) % 64:
            raise ValueError(f"a: kind 'kv' needs d - rope_dim to be a positive multiple of 64 (the qat8 block), "
                             f"got d = {d}, rope_dim = {rope_dim}")
    elif d not in HADAMARD_SIZES or rope_dim > d:
        raise ValueError(f"a: kind 'indexer' needs d in {HADAMARD_SIZES} (Hadamard) and >= rope_dim = {rope_dim}, "
                         f"got d = {d}")
    if V.checks_enabled() and n_entries:
        lo, hi = int(entry_idx.min()), int(entry_idx.max())
        if lo < 0 or ratio * hi >= freqs.shape[0]:
            raise ValueError(f"entry_idx: expected values in [0, {-(-freqs.shape[0] // ratio)}) "
                             f"(positions ratio * i < freqs.shape[0] = {freqs.shape[0]}), got values in [{lo}, {hi}]")
    return ratio, kind, float(eps), d


def _check_rows(cache, rows, n_entries, d, kind, device):
    """The cache and destination rows of the encoded form (see ``compress_entries``)."""
    V.tensor("cache", cache, (torch.uint8,), min_ndim=2)
    V.same_device("cache", cache, "a", device)
    if kind == "kv":
        if d not in KV_ROW_HEAD_DIMS:
            raise ValueError(f"cache: FP8 KV rows exist for entry lengths d in {KV_ROW_HEAD_DIMS}, got d = {d}")
        row_bytes = fp8_row_bytes(d)
    else:
        if d != INDEXER_ROW_HEAD_DIM:
            raise ValueError(f"cache: FP4 key rows exist for entry length d = {INDEXER_ROW_HEAD_DIM}, got d = {d}")
        row_bytes = FP4_KEY_BYTES
    if cache.shape[-1] != row_bytes:
        raise ValueError(f"cache: expected rows of {row_bytes} bytes (last dim) for kind {kind!r}, d = {d}, "
                         f"got shape {tuple(cache.shape)}")
    if not cache.is_contiguous():
        raise ValueError(f"cache: expected a contiguous tensor (rows are flat indices into it), "
                         f"got strides {cache.stride()} for shape {tuple(cache.shape)}")
    V.tensor("rows", rows, ROW_INDEX_DTYPES, ndim=1)
    V.shape("rows", rows, (n_entries,))
    V.same_device("rows", rows, "a", device)
    if V.checks_enabled() and n_entries:
        n_rows = cache.numel() // row_bytes
        lo, hi = int(rows.min()), int(rows.max())
        if lo < -1 or hi >= n_rows:
            raise ValueError(f"rows: expected values in [-1, {n_rows}) (-1: skip; cache rows "
                             f"{tuple(cache.shape[:-1])} flattened), got values in [{lo}, {hi}]")


def compress_entries(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                     freqs: torch.Tensor, entry_idx: torch.Tensor, ratio: int, kind: str = "kv",
                     eps: float = 1e-6, cache: Optional[torch.Tensor] = None,
                     rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Compressed KV (or indexer) entries from their windows' projected tokens (SPEC 6): bf16 ``[N, d]``.

    a, z: fp32 ``[N, L, c*d]`` (``wkv x`` and ``wgate x`` of each slot; any strides, e.g. a
    strided view of the token-major projections).  ratio 128: ``c = 1``, ``L = 128``, the
    window's tokens.  ratio 4: ``c = 2``, ``L = 8``: rows 0..3 the previous window's tokens
    (their lo half ``[:d]`` is used), rows 4..7 the window's tokens (hi half ``[d:]``).
    ape: fp32 ``[ratio, c*d]``.  norm_w: ``[d]``.  freqs: the ``rope_freqs`` table
    ``[max_pos, 32, 2]`` (R = 64).  entry_idx: int32/int64 ``[N]``, entry i is rotated at position
    ``ratio * i``; for ``i == 0`` at ratio 4 rows 0..3 are absent and never read.

    Per entry: softmax pooling over the L slots per channel, rmsnorm(norm_w, eps), RoPE on
    the last R dims, then kind ``"kv"``: qat8 (block 64, power-of-two scales) on ``[:d-R]``;
    kind ``"indexer"``: Hadamard over all d, then qat4 (block 32).  Positions outside
    ``[0, freqs.shape[0])`` raise ``ValueError`` in checked mode (``DSV4_CHECKS=1``) and
    are clamped into range otherwise.

    cache, rows (both or neither): also write each entry's encoded row, in the same launch,
    into ``cache`` (uint8, contiguous, ``[..., row_bytes]``, viewed as ``[n_rows, row_bytes]``)
    at the flat row ``rows[n]`` (int32/int64 ``[N]``; -1 writes nothing).  kind ``"kv"``
    (d in (128, 512)): the FP8 row of ``pack_kv_fp8`` (584 bytes for d = 512); kind
    ``"indexer"`` (d = 128): the 68-byte FP4 row of ``pack_indexer_keys``.  The bytes are
    exactly ``pack_*`` of the returned BF16 entries.  Rows outside ``[-1, n_rows)`` raise
    ``ValueError`` in checked mode and are skipped otherwise; two entries with the same row
    leave either one's bytes.
    """
    ratio, kind, eps, d = _check_entries(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps)
    if (cache is None) != (rows is None):
        raise ValueError("cache/rows: give both (write encoded rows too) or neither, got "
                         f"cache {'None' if cache is None else 'a tensor'} and rows "
                         f"{'None' if rows is None else 'a tensor'}")
    if cache is None:
        return call("compress_entries", a.device, a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps)
    _check_rows(cache, rows, a.shape[0], d, kind, a)
    return call("compress_entries_cached", a.device, a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps,
                cache, rows)


def compress_entries_to_cache(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                              freqs: torch.Tensor, entry_idx: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor,
                              ratio: int, kind: str = "kv", eps: float = 1e-6) -> None:
    """``compress_entries(..., cache=cache, rows=rows)`` without the BF16 entries: one launch
    that writes only the encoded rows (the decode step's form: a request whose window did
    not close this step has row -1 and writes nothing).  Arguments as ``compress_entries``."""
    ratio, kind, eps, d = _check_entries(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps)
    _check_rows(cache, rows, a.shape[0], d, kind, a)
    call("compress_entries_to_cache", a.device, a, z, ape, norm_w, freqs, entry_idx, cache, rows, ratio, kind, eps)


def store_window_kv(kv: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                    window: int, lengths: Optional[torch.Tensor] = None) -> None:
    """New tokens' KV into their sliding-window ring rows of an FP8 KV cache, one launch:
    per token, RoPE on the last 64 dims at its position and qat8 (block 64, pow2 scales) on
    the rest (SPEC 5.2, ``rope_qat8``), encoded as ``pack_kv_fp8`` rows; request b's token
    at position p goes to ``cache[b, p % window]``.  The bytes are exactly
    ``pack_kv_fp8(rope_qat8(kv, freqs, positions))``.

    kv: bf16/fp16/fp32 ``[B, S, D]`` (or ``[B, D]``, one token per request), D in (128, 512),
    the kv_norm output.  positions: int32/int64 ``[B, S]`` (or ``[B]``); a negative position
    writes nothing.  freqs: the ``rope_freqs`` table ``[max_pos, 32, 2]``; positions past it
    rotate at its last row (checked mode raises).  cache: uint8 ``[B' >= B, N >= window,
    row_bytes]`` (584 bytes for D = 512), bytes of a row contiguous, strides multiples of 8.
    window: ring length W.  lengths: optional int ``[B]``: then only the tokens at positions
    ``lengths[b] - W <= p < lengths[b]`` are written (a right-padded prefill keeps the last W
    real tokens); without it every token is written, so give at most W per request.
    """
    V.tensor("kv", kv, V.FLOAT_DTYPES)
    if kv.dim() not in (2, 3):
        raise ValueError(f"kv: expected [B, S, D] or [B, D], got shape {tuple(kv.shape)}")
    d = kv.shape[-1]
    if d not in KV_ROW_HEAD_DIMS:
        raise ValueError(f"kv: expected last dim in {KV_ROW_HEAD_DIMS}, got shape {tuple(kv.shape)}")
    V.tensor("positions", positions, INDEX_DTYPES, ndim=kv.dim() - 1)
    V.shape("positions", positions, kv.shape[:-1])
    V.same_device("positions", positions, "kv", kv)
    V.tensor("freqs", freqs, (torch.float32,), ndim=3)
    if freqs.shape[0] < 1 or tuple(freqs.shape[1:]) != (ROPE_DIM // 2, 2):
        raise ValueError(f"freqs: expected shape [max_pos >= 1, {ROPE_DIM // 2}, 2], got {tuple(freqs.shape)}")
    V.same_device("freqs", freqs, "kv", kv)
    window = V.positive_int("window", window)
    V.tensor("cache", cache, (torch.uint8,), ndim=3)
    V.same_device("cache", cache, "kv", kv)
    row_bytes = fp8_row_bytes(d)
    if cache.shape[0] < kv.shape[0] or cache.shape[1] < window or cache.shape[2] != row_bytes:
        raise ValueError(f"cache: expected shape [>= {kv.shape[0]}, >= {window} (window), {row_bytes}], "
                         f"got {tuple(cache.shape)}")
    if cache.stride(2) != 1 or cache.stride(0) % 8 or cache.stride(1) % 8:
        raise ValueError(f"cache: expected contiguous rows and strides that are multiples of 8, "
                         f"got strides {cache.stride()}")
    if lengths is not None:
        V.tensor("lengths", lengths, INDEX_DTYPES, ndim=1)
        V.shape("lengths", lengths, kv.shape[:1])
        V.same_device("lengths", lengths, "kv", kv)
    if V.checks_enabled() and positions.numel():
        hi = int(positions.max())
        if hi >= freqs.shape[0]:
            raise ValueError(f"positions: expected values < {freqs.shape[0]} (freqs.shape[0]), got {hi}")
    call("store_window_kv", kv.device, kv, freqs, positions, cache, window, lengths)
