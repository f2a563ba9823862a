"""FP32 oracle: the compressor's pooled entries and their finishing steps (SPEC 6).

Numerics: everything stays FP32 from the projections to the last step (SPEC 6 names no
intermediate rounding); the one rounding is the final cast to BF16, which is exact for
the quantised channels (FP8 or FP4 codes times a power of two fit BF16), so a cache that
stores their quantised form holds exactly what the model uses.

The encoded forms are defined through the BF16 values: a cache row is ``pack_kv_fp8`` (kind
"kv") or ``pack_indexer_keys`` (kind "indexer") of the entry, and a window row is
``pack_kv_fp8(rope_qat8(kv))``.
"""

from __future__ import annotations

import torch

from ..registry import register
from .attention import pack_kv_fp8
from .indexer import pack_indexer_keys
from .norm import rms_norm
from .quant import hadamard, qat4, qat8, rope_qat8
from .rope import apply_rope

OVERLAP_RATIO = 4  # CSA: entries pool the previous window too (SPEC 6)
KV_QAT_BLOCK = 64
INDEXER_QAT_BLOCK = 32


def pool_windows(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, entry_idx: torch.Tensor,
                 ratio: int) -> torch.Tensor:
    """Softmax pooling over each entry's slots, per channel (SPEC 6): FP32 ``[N, d]``.

    ratio 128: slot j is the window's token j, all channels.  ratio 4: slots 0..3 are the
    previous window's tokens through their lo half ``[:d]``, slots 4..7 the window's tokens
    through their hi half ``[d:]``; for entry 0 the first four slots are absent (score -inf,
    and their values never enter the sum, whatever the buffer holds there).
    """
    a, z, ape = a.float(), z.float(), ape.float()
    if ratio != OVERLAP_RATIO:
        return (torch.softmax(z + ape, dim=1) * a).sum(1)
    d = a.shape[-1] // 2
    half = OVERLAP_RATIO
    values = torch.cat((a[:, :half, :d], a[:, half:, d:]), dim=1)
    scores = torch.cat((z[:, :half, :d] + ape[:, :d], z[:, half:, d:] + ape[:, d:]), dim=1)
    absent = (entry_idx == 0)[:, None, None] & (torch.arange(2 * half, device=a.device) < half)[None, :, None]
    scores = scores.masked_fill(absent, float("-inf"))
    values = values.masked_fill(absent, 0.0)
    return (torch.softmax(scores, dim=1) * values).sum(1)


def finish_entries(pooled: torch.Tensor, norm_w: torch.Tensor, freqs: torch.Tensor, entry_idx: torch.Tensor,
                   ratio: int, kind: str, eps: float) -> torch.Tensor:
    """rmsnorm -> RoPE on the last R dims at ``ratio * i`` -> encode (SPEC 6), FP32 in and out."""
    c = rms_norm(pooled.float(), norm_w.float(), eps)
    c = apply_rope(c, freqs, entry_idx.long() * ratio, False)
    if kind == "kv":
        rope_dim = 2 * freqs.shape[1]
        return torch.cat((qat8(c[:, :-rope_dim], KV_QAT_BLOCK, True), c[:, -rope_dim:]), dim=-1)
    return qat4(hadamard(c), INDEXER_QAT_BLOCK)


@register("compress_entries", "reference")
def compress_entries(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                     freqs: torch.Tensor, entry_idx: torch.Tensor, ratio: int, kind: str,
                     eps: float) -> torch.Tensor:
    if a.shape[0] == 0:
        return torch.empty(0, a.shape[-1] // (2 if ratio == OVERLAP_RATIO else 1), dtype=torch.bfloat16,
                           device=a.device)
    pooled = pool_windows(a, z, ape, entry_idx, ratio)
    return finish_entries(pooled, norm_w, freqs, entry_idx, ratio, kind, eps).to(torch.bfloat16)


def encode_rows(values: torch.Tensor, kind: str) -> torch.Tensor:
    """The cache rows of BF16 entries: ``pack_kv_fp8`` (kind "kv") or ``pack_indexer_keys``."""
    return pack_kv_fp8(values) if kind == "kv" else pack_indexer_keys(values)


def scatter_rows(cache: torch.Tensor, rows: torch.Tensor, encoded: torch.Tensor) -> None:
    """``encoded[i]`` into flat row ``rows[i]`` of ``cache``; rows outside ``[0, cache rows)``
    (-1: skip) are not written."""
    flat = cache.view(-1, cache.shape[-1])
    rows = rows.long()
    keep = (rows >= 0) & (rows < flat.shape[0])
    flat[rows[keep]] = encoded[keep]


@register("compress_entries_cached", "reference")
def compress_entries_cached(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                            freqs: torch.Tensor, entry_idx: torch.Tensor, ratio: int, kind: str, eps: float,
                            cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    values = compress_entries(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps)
    if values.shape[0] and cache.numel():
        scatter_rows(cache, rows, encode_rows(values, kind))
    return values


@register("compress_entries_to_cache", "reference")
def compress_entries_to_cache(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                              freqs: torch.Tensor, entry_idx: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor,
                              ratio: int, kind: str, eps: float) -> None:
    compress_entries_cached(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps, cache, rows)


@register("store_window_kv", "reference")
def store_window_kv(kv: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                    window: int, lengths) -> None:
    """``pack_kv_fp8(rope_qat8(kv))`` of each token into ring slot ``p % window`` of its
    request's cache row; only positions ``p >= 0`` (and ``lengths[b] - window <= p <
    lengths[b]`` when ``lengths`` is given) are written."""
    if kv.dim() == 2:
        kv, positions = kv[:, None], positions[:, None]
    bsz, seq, _ = kv.shape
    if bsz * seq == 0:
        return
    encoded = pack_kv_fp8(rope_qat8(kv, freqs, positions, KV_QAT_BLOCK))
    p = positions.long()
    write = p >= 0
    if lengths is not None:
        length = lengths.long()[:, None]
        write &= (p < length) & (p >= length - window)
    batch = torch.arange(bsz, device=kv.device)[:, None].expand(bsz, seq)
    cache[batch[write], torch.remainder(p[write], window)] = encoded[write]
