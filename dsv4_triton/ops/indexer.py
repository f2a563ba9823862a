"""Public op of the indexer family: indexer_topk (SPEC 7)."""


import torch

from .. import validate as V
from ..kernels import indexer as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import indexer as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op

__all__ = ["indexer_topk"]

INDEXER_HEAD_DIM = 128


def _stub(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor, k: int) -> torch.Tensor:
    raise NotImplementedError


define_op("indexer_topk", _stub, fake=lambda qi, w, keys, n_valid, k: torch.empty(
    qi.shape[0], qi.shape[1], k, dtype=torch.int32, device=qi.device))


def indexer_topk(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                 k: int) -> torch.Tensor:
    """The lightning indexer's selection (SPEC 7): int32 ``[B, S, k]``.

    qi: bf16 ``[B, S, Hi, 128]`` (already QAT'd).  w: fp32 ``[B, S, Hi]`` (already scaled).
    keys: bf16 ``[B, Nk, 128]`` (the compressed indexer entries).  n_valid: int32 ``[B, S]``,
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
    V.tensor("keys", keys, (torch.bfloat16,), ndim=3)
    if keys.shape[0] != bsz or keys.shape[2] != INDEXER_HEAD_DIM:
        raise ValueError(f"keys: expected shape ({bsz}, Nk, {INDEXER_HEAD_DIM}), got {tuple(keys.shape)}")
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
