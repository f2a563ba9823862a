"""Public op of the indexer family: indexer_topk (SPEC 7)."""


import torch

from cuda_fallback import indexer as _cuda  # noqa: F401  (registers the cuda backend: FP4 keys at decode)

from .. import validate as V
from ..kernels import indexer as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import indexer as _reference  # noqa: F401  (registers the reference backend)
from ..reference.indexer import FP4_KEY_BYTES
from ..registry import call, define_op

__all__ = ["indexer_topk", "pack_indexer_keys"]

INDEXER_HEAD_DIM = 128
KEY_DTYPES = (torch.bfloat16, torch.uint8)


def _stub(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor, k: int) -> torch.Tensor:
    raise NotImplementedError


define_op("indexer_topk", _stub, fake=lambda qi, w, keys, n_valid, k: torch.empty(
    qi.shape[0], qi.shape[1], k, dtype=torch.int32, device=qi.device))


def indexer_topk(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                 k: int) -> torch.Tensor:
    """The lightning indexer's selection (SPEC 7): int32 ``[B, S, k]``.

    qi: bf16 ``[B, S, Hi, 128]`` (already QAT'd).  w: fp32 ``[B, S, Hi]`` (already scaled).
    keys: bf16 ``[B, Nk, 128]`` (the compressed indexer entries), or the same entries as
    FP4 rows uint8 ``[B, Nk, 68]`` from ``pack_indexer_keys`` (identical scores, 68 B per key).  n_valid: int32 ``[B, S]``,
    entry s is a candidate of query (b, t) when ``s < n_valid[b, t]``.
    Score ``I = sum_h w_h * relu(qi_h . K_s)`` (FP32); returns the indices of the
    ``min(k, n_valid)`` largest scores in ascending order, then -1 padding.  Ties at the
    k-th score go to the lower indices; NaN ranks above every number.
    ``n_valid`` outside ``[0, Nk]`` raises ``ValueError`` in checked mode (``DSV4_CHECKS=1``)
    and is clamped into range otherwise.
    """
    V.tensor("qi", qi, (torch.bfloat16,), ndim=4)
    bsz, seq, heads, head_dim = qi.shape
    if head_dim != INDEXER_HEAD_DIM:
        raise ValueError(f"qi: expected head dim {INDEXER_HEAD_DIM} (last dim), got shape {tuple(qi.shape)}")
    if heads < 1:
        raise ValueError(f"qi: expected at least one head (dim 2), got shape {tuple(qi.shape)}")
    V.tensor("w", w, (torch.float32,), ndim=3)
    V.shape("w", w, (bsz, seq, heads))
    V.same_device("w", w, "qi", qi)
    V.tensor("keys", keys, KEY_DTYPES, ndim=3)
    row = INDEXER_HEAD_DIM if keys.dtype == torch.bfloat16 else FP4_KEY_BYTES
    if keys.shape[0] != bsz or keys.shape[2] != row:
        raise ValueError(f"keys: expected shape ({bsz}, Nk, {row}) for {str(keys.dtype).replace('torch.', '')} "
                         f"keys, got {tuple(keys.shape)}")
    V.same_device("keys", keys, "qi", qi)
    V.tensor("n_valid", n_valid, (torch.int32,), ndim=2)
    V.shape("n_valid", n_valid, (bsz, seq))
    V.same_device("n_valid", n_valid, "qi", qi)
    V.positive_int("k", k)
    if V.checks_enabled() and n_valid.numel():
        lo, hi = int(n_valid.min()), int(n_valid.max())
        if lo < 0 or hi > keys.shape[1]:
            raise ValueError(f"n_valid: expected values in [0, {keys.shape[1]}] (Nk), got values in [{lo}, {hi}]")
    return call("indexer_topk", qi.device, qi, w, keys, n_valid, k)


def _pack_stub(keys: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


define_op("pack_indexer_keys", _pack_stub, fake=lambda keys: torch.empty(
    (*keys.shape[:-1], FP4_KEY_BYTES), dtype=torch.uint8, device=keys.device))


def pack_indexer_keys(keys: torch.Tensor) -> torch.Tensor:
    """Indexer keys as FP4 rows: uint8 ``[..., 68]``, per key 64 bytes of E2M1 codes (element 2k
    in the low nibble) then 4 E8M0 scales, one per 32 values (MXFP4, SPEC 2 and 7).

    keys: bf16/fp16/fp32 ``[..., 128]``, any strides.  Lossless for QAT'd keys (qat4, as the
    indexer compressor makes them); other values are rounded to FP4 like ``fp4_quant``.
    """
    V.tensor("keys", keys, V.FLOAT_DTYPES, min_ndim=1)
    if keys.shape[-1] != INDEXER_HEAD_DIM:
        raise ValueError(f"keys: expected last dim {INDEXER_HEAD_DIM}, got shape {tuple(keys.shape)}")
    return call("pack_indexer_keys", keys.device, keys)
