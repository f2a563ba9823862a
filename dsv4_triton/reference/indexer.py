"""FP32 oracle: the lightning indexer's scores and top-k selection (SPEC 7).

Selection conventions (SPEC leaves the order and ties free; these are the ones the
Triton kernels produce, so results can be compared element for element):

* The selected indices are returned in ascending order, -1 padding after them.
* Among scores equal to the k-th largest, the lowest indices are taken.
* NaN ranks above every number (as ``torch.topk`` ranks it); -0.0 equals +0.0.
* ``n_valid`` is clamped into ``[0, Nk]`` (the kernels do the same in unchecked mode).

Keys come as BF16 ``[B, Nk, 128]`` or as FP4 rows ``uint8 [B, Nk, 68]``: 64 bytes of E2M1
codes (element 2k in the low nibble) then 4 E8M0 scales, one per 32 elements (MXFP4, SPEC 2),
the layout ``ops.pack_indexer_keys`` writes.  Both decode to the same FP32 values when the
keys are QAT'd (qat4), as the indexer compressor's are.
"""

from __future__ import annotations

import torch

from ..formats import e8m0_to_float, fp4_decode, fp4_unpack
from ..registry import register
from .quant import fp4_quant

HEAD_DIM = 128
FP4_BLOCK = 32
FP4_CODE_BYTES = HEAD_DIM // 2
FP4_KEY_BYTES = FP4_CODE_BYTES + HEAD_DIM // FP4_BLOCK  # 68

# Rows of queries scored at once, so the [rows, heads, keys] logits stay under ~1 GiB.
_MAX_LOGITS = 1 << 28


def key_values(keys: torch.Tensor) -> torch.Tensor:
    """FP32 ``[..., 128]`` values of BF16 keys or of FP4 key rows (``uint8 [..., 68]``)."""
    if keys.dtype != torch.uint8:
        return keys.float()
    codes = fp4_decode(fp4_unpack(keys[..., :FP4_CODE_BYTES]))
    scales = e8m0_to_float(keys[..., FP4_CODE_BYTES:].contiguous())
    return (codes.unflatten(-1, (-1, FP4_BLOCK)) * scales[..., None]).flatten(-2)


def indexer_scores(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``I[b, s, n] = sum_h w[b, s, h] * relu(qi[b, s, h] . keys[b, n])`` in FP32: ``[B, S, Nk]``."""
    bsz, seq, heads, _ = qi.shape
    n_keys = keys.shape[1]
    keys_f = key_values(keys)
    out = torch.empty(bsz, seq, n_keys, dtype=torch.float32, device=qi.device)
    step = max(1, _MAX_LOGITS // max(1, heads * n_keys))
    for s0 in range(0, seq, step):
        q = qi[:, s0:s0 + step].float()
        logits = torch.einsum("bshd,bnd->bshn", q, keys_f)
        out[:, s0:s0 + step] = (w[:, s0:s0 + step].float()[..., None] * logits.relu()).sum(2)
    return out


def select_topk(scores: torch.Tensor, n_valid: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``min(k, n_valid)`` largest of ``scores[..., :n_valid]``, ascending,
    -1 padded to ``k`` (int32)."""
    n_keys = scores.shape[-1]
    valid_len = n_valid.long().clamp(0, n_keys)[..., None]
    pos = torch.arange(n_keys, device=scores.device)
    valid = pos < valid_len
    # -0.0 + 0.0 is +0.0, so the two zeros compare equal in the stable sorts below.
    keyed = scores.float() + 0.0
    # Stable sorts: by score (descending, NaN first, ties keep ascending index order),
    # then valid entries before invalid ones, keeping that order.
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    order = torch.gather(order, -1, torch.sort((~torch.gather(valid, -1, order)).to(torch.uint8),
                                               dim=-1, stable=True).indices)
    take = min(k, n_keys)
    chosen = order[..., :take]
    slot = torch.arange(take, device=scores.device)
    chosen = torch.where(slot < valid_len, chosen, torch.full_like(chosen, n_keys))
    chosen = torch.sort(chosen, dim=-1).values  # ascending; the n_keys markers go last
    out = torch.full((*scores.shape[:-1], k), -1, dtype=torch.int32, device=scores.device)
    out[..., :take] = torch.where(chosen < n_keys, chosen, torch.full_like(chosen, -1)).to(torch.int32)
    return out


@register("pack_indexer_keys", "reference")
def pack_indexer_keys(keys: torch.Tensor) -> torch.Tensor:
    codes, scales = fp4_quant(keys, FP4_BLOCK)
    return torch.cat((codes, scales.view(torch.uint8)), dim=-1)


@register("indexer_topk", "reference")
def indexer_topk(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                 k: int) -> torch.Tensor:
    return select_topk(indexer_scores(qi, w, keys), n_valid, k)
