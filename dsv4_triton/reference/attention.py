"""FP32 oracles: sparse MQA attention with sink (SPEC 5.4, 5.5) and the FP8 KV cache row (SPEC 11).

FP8 cache row of a KV vector of length D (nope part ``DN = D - ROPE_DIM``, rope part
``ROPE_DIM = 64``), all little-endian bytes:

    [0, DN)                     FP8-E4M3 codes of kv[:DN], block b = kv[64b : 64b + 64]
    [DN, DN + 2*ROPE_DIM)       kv[DN:] as BF16
    [DN + 2*ROPE_DIM, +DN/64)   one E8M0 scale byte per block of 64 nope values
    zero pad up to a multiple of 8 bytes (584 bytes for D = 512, 200 for D = 128)

Each block's scale is ``act_quant(kv[:DN], 64, pow2=True)``'s (SPEC 2).  The model has
already ``qat8``-ed these values with power-of-two scales, so every value is an FP8 code
times a power of two no smaller than the recomputed scale: packing is exact (decode(pack(kv))
== kv bit for bit).  For other inputs packing is a quantisation.  NaN/Inf policy (as in
``dsv4_triton/formats.py``): a block whose amax is NaN or Inf gets the NaN scale byte 0xFF and
NaN codes (0x7F), so it decodes to NaN.

Attention (per query token, head h, candidate row idx[b, s, :] into kv[b]):
``z_c = scale * q_h . kv_c``; ``o_h = sum_c exp(z_c - m) kv_c / (sum_c exp(z_c - m) + exp(sink_h - m))``.
``m = max(max_c z_c, sink_h)``: SPEC takes the max over candidates only; including the sink
changes nothing mathematically and keeps a row whose candidates are all empty finite
(its output is 0: only the sink is in the denominator).  Index -1 is an empty slot; an index
outside [-1, N) is treated as empty too (the public op raises on it in checked mode).
A duplicated index counts twice (the oracle gathers).  With ``freqs``/``positions`` the
output's last R = 2 * freqs.shape[1] dims are rotated by the inverse RoPE at the query's
position (SPEC 5.5, the rope family's ``apply_rope``; positions clamped into [0, max_pos)),
in FP32 before the single rounding to BF16 (the release rotates the BF16 output, one
rounding more).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats import FP8_MAX, ceil_log2, div_rn, e8m0_encode, e8m0_to_float, exp2_int, fp8_encode
from ..registry import register
from .rope import apply_rope

ROPE_DIM = 64
QUANT_BLOCK = 64
AMAX_FLOOR = 1e-4  # SPEC 2, act_quant
FP8_NAN_CODE = 0x7F


def fp8_row_bytes(head_dim: int) -> int:
    """Bytes of one FP8 cache row for a KV vector of ``head_dim`` values (see module doc)."""
    nope = head_dim - ROPE_DIM
    raw = nope + 2 * ROPE_DIM + nope // QUANT_BLOCK
    return (raw + 7) // 8 * 8


def head_dim_of_row_bytes(row_bytes: int, candidates=(128, 512)) -> Optional[int]:
    """The head dim whose FP8 cache rows are ``row_bytes`` long (None if no candidate's are)."""
    for d in candidates:
        if fp8_row_bytes(d) == row_bytes:
            return d
    return None


@register("pack_kv_fp8", "reference")
def pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    d = kv.shape[-1]
    nope = d - ROPE_DIM
    lead = kv.shape[:-1]
    x = kv[..., :nope].float().reshape(*lead, nope // QUANT_BLOCK, QUANT_BLOCK)
    amax = x.abs().amax(-1)
    invalid = ~torch.isfinite(amax)
    e = ceil_log2(div_rn(torch.clamp(amax, min=AMAX_FLOOR), FP8_MAX))
    e = torch.where(invalid, torch.zeros_like(e), e)
    codes = fp8_encode(torch.clamp(x * exp2_int(-e)[..., None], -FP8_MAX, FP8_MAX)).view(torch.uint8)
    codes = torch.where(invalid[..., None], torch.full_like(codes, FP8_NAN_CODE), codes)
    scales = e8m0_encode(e, invalid).view(torch.uint8)
    rope = kv[..., nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    row = torch.zeros(*lead, fp8_row_bytes(d), dtype=torch.uint8, device=kv.device)
    row[..., :nope] = codes.reshape(*lead, nope)
    row[..., nope:nope + 2 * ROPE_DIM] = rope
    row[..., nope + 2 * ROPE_DIM:nope + 2 * ROPE_DIM + nope // QUANT_BLOCK] = scales
    return row


def unpack_kv_fp8(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """FP8 cache rows ``[..., row_bytes]`` -> the KV vectors, FP32 ``[..., head_dim]``."""
    nope = head_dim - ROPE_DIM
    lead = rows.shape[:-1]
    codes = rows[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    scales = e8m0_to_float(rows[..., nope + 2 * ROPE_DIM:nope + 2 * ROPE_DIM + nope // QUANT_BLOCK])
    values = codes.reshape(*lead, nope // QUANT_BLOCK, QUANT_BLOCK) * scales[..., None]
    rope = rows[..., nope:nope + 2 * ROPE_DIM].contiguous().view(torch.bfloat16).float()
    return torch.cat((values.reshape(*lead, nope), rope), dim=-1)


def _gather_budget_tokens(b: int, k: int, d: int, limit_elems: int = 1 << 26) -> int:
    """Query tokens per chunk so that one gathered [B, chunk, K, D] FP32 block stays bounded."""
    return max(1, limit_elems // max(1, b * k * d))


@register("sparse_attention", "reference")
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                     freqs: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> torch.Tensor:
    bsz, seq, heads, d = q.shape
    kvf = unpack_kv_fp8(kv, d) if kv.dtype == torch.uint8 else kv.float()
    n = kvf.shape[1]
    if n == 0:  # every index is empty; give the gather a row to read
        kvf = kvf.new_zeros(bsz, 1, d)
    out = torch.empty(bsz, seq, heads, d, dtype=torch.float32, device=q.device)
    sink_f = sink.float().view(1, 1, heads, 1)
    batch = torch.arange(bsz, device=q.device).view(bsz, 1, 1)
    step = _gather_budget_tokens(bsz, idx.shape[-1], d)
    for s0 in range(0, seq, step):
        rows = idx[:, s0:s0 + step].long()
        valid = (rows >= 0) & (rows < n)
        cand = kvf[batch, torch.where(valid, rows, 0)]  # [B, s, K, D]
        cand = cand.masked_fill(~valid.unsqueeze(-1), 0.0)  # an empty slot reads no value, not row 0
        z = scale * torch.einsum("bshd,bskd->bshk", q[:, s0:s0 + step].float(), cand)
        z = z.masked_fill(~valid.unsqueeze(2), float("-inf"))
        m = torch.maximum(z.amax(-1, keepdim=True), sink_f) if z.shape[-1] else sink_f.expand(*z.shape[:3], 1)
        p = torch.exp(z - m)
        den = p.sum(-1, keepdim=True) + torch.exp(sink_f - m)
        out[:, s0:s0 + step] = torch.einsum("bshk,bskd->bshd", p, cand) / den
    if freqs is not None:
        out = apply_rope(out, freqs, positions, True)
    return out.to(torch.bfloat16)
