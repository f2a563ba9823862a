"""The ``cuda`` backend of ``sparse_attention``: ``csrc/sm90_sparse_attention.cu`` (wgmma, sm_90a).

It covers the FP8 cache (``pack_kv_fp8`` rows of 584 bytes) at head dim 512 with the heads in
whole blocks of 64 (the wgmma's M: Flash's 64 and Pro's 128, and tensor-parallel slices of
them), with or without the inverse RoPE of up to the last 256 output columns. With the heads in
pairs of 64-head blocks (Pro's 128) the two CTAs of a pair form a cluster and share every
decoded tile (crossover: each decodes half the rows), which makes it faster than the Triton
kernel at every batch size measured (H100, Pro decode: benchmarks/NOTES.md, "attention,
twenty-seventh round"). Without crossover (an odd number of head blocks, e.g. Flash's 64 heads)
it takes calls of at most ``MAX_HEAD_BLOCKS`` (query token, 64-head block) pairs: small-batch
decode, where it splits the candidates over the machine and beats the Triton kernel (H100,
Flash: 19.1 against 20.0 us at one token, 23.8 against 27.3 at 16); with more pairs each CTA
decodes every row of many tiles and the Triton kernel is about as fast (64 pairs: 44.8 against
46.2 and 45.0 against 46.5 in probes, 46.8 against 45.9 in a bench run: a tie). Those calls,
the BF16 cache, head dim 128 and other head counts go to the next backend in the registry's
order, the Triton kernel; forcing ``cuda`` on them raises ``BackendUnavailableError``. Only
sm_90a runs it (wgmma does not exist on sm_100).

Same math as the Triton kernel: exponents in base 2 against a lazily moved running max, the
sink in the final denominator, P rounded to BF16 for P @ KV, the FP8 rows decoded exactly to
BF16. The scores are summed in another order (two column halves, each a chain of wgmma), so
results differ from the Triton kernel's within the FP32 summation tolerance of the tests. The K
split (few CTAs for the machine) is the Triton kernel's rule and workspace; the slices are
merged by a second launch, in split order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from dsv4_triton.kernels.attention import LOG2E, _choose_splits, _split_workspace, new_output
from dsv4_triton.kernels.device import sm_count
from dsv4_triton.registry import register

from .layout import rows_aligned
from .loader import extension_at

HEAD_DIM = 512
HEADS_PER_CTA = 64
TILE = 64  # candidates a tile: split slices are whole tiles
MAX_ROPE_COLUMNS = 256  # the inverse RoPE is applied by the warpgroup that owns the upper half
MAX_HEAD_BLOCKS = 16  # pairs without crossover: measured faster than Triton at 2 and 16, not at 64
CROSSOVER = True  # head-block pairs share their decoded tiles (a cluster of two CTAs)


def peers(heads: int) -> int:
    """CTAs that share each decoded KV tile: 2 (crossover) when the heads come in pairs of
    64-head blocks, else 1."""
    return 2 if CROSSOVER and heads % (2 * HEADS_PER_CTA) == 0 else 1


def sparse_attention_covers(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                            freqs: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> str:
    """``""`` when the sm_90a kernel handles these ``sparse_attention`` arguments, else why not."""
    if kv.dtype != torch.uint8:
        return "a BF16 cache (the kernel reads FP8 cache rows)"
    if q.shape[-1] != HEAD_DIM:
        return f"head dim {q.shape[-1]} (the kernel takes {HEAD_DIM})"
    if q.shape[2] % HEADS_PER_CTA:
        return f"{q.shape[2]} heads (the kernel takes multiples of {HEADS_PER_CTA})"
    pairs = q.shape[0] * q.shape[1] * (q.shape[2] // HEADS_PER_CTA)
    if pairs > MAX_HEAD_BLOCKS and peers(q.shape[2]) == 1:
        return (f"{pairs} (token, 64-head block) pairs of an odd number of head blocks (without crossover it "
                f"takes up to {MAX_HEAD_BLOCKS}: with more, each CTA decodes every row of many tiles and the "
                "Triton kernel is as fast)")
    if freqs is not None and 2 * freqs.shape[1] > MAX_ROPE_COLUMNS:
        return f"inverse RoPE on {2 * freqs.shape[1]} columns (the kernel rotates up to {MAX_ROPE_COLUMNS})"
    return ""


@register("sparse_attention", "cuda", archs=("sm90a",), covers=sparse_attention_covers)
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                     freqs: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> torch.Tensor:
    bsz, seq, heads, d = q.shape
    tokens, k = bsz * seq, idx.shape[2]
    out, done = new_output(q, idx)
    if done:
        return out
    if not rows_aligned(q, 16):
        q = q.contiguous()
    if not rows_aligned(kv, 8):
        kv = kv.contiguous()  # 8-byte loads of the 584-byte rows
    if idx.stride(2) != 1:
        idx = idx.contiguous()
    sink = sink.contiguous()
    half_r = 0
    if freqs is not None:
        freqs, half_r = freqs.contiguous(), freqs.shape[1]
    else:
        freqs = positions = sink  # unused by the kernel
    n_hblk = heads // HEADS_PER_CTA
    splits = _choose_splits(tokens * n_hblk, k, sm_count(q.device))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), TILE) * TILE
    splits = triton.cdiv(k, k_per_split)
    if splits > 1:
        part_o, part_ml, _ = _split_workspace(q.device, tokens * heads * splits * d, tokens * n_hblk)
    else:
        part_o = part_ml = sink  # unused by the kernel
    extension_at(q.device.index).sparse_attention_fp8(
        q, kv, sink, idx, out, freqs, positions, half_r, part_o, part_ml, scale * LOG2E, splits, k_per_split,
        peers(heads), torch._C._cuda_getCurrentRawStream(q.device.index))
    return out
