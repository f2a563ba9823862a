"""Public ops of the attention family: sparse_attention, pack_kv_fp8."""


from typing import Optional

import torch

from cuda_fallback import attention as _cuda  # noqa: F401  (registers the cuda backend: FP8 cache, D = 512)

from .. import validate as V
from ..kernels import attention as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import attention as _reference  # noqa: F401  (registers the reference backend)
from ..reference.attention import fp8_row_bytes
from ..registry import call, define_op

__all__ = ["sparse_attention", "pack_kv_fp8"]

HEAD_DIMS = (128, 512)
INDEX_DTYPES = (torch.int32, torch.int64)


def _attention_stub(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                    freqs: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> torch.Tensor:
    raise NotImplementedError


def _pack_stub(kv: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


define_op("sparse_attention", _attention_stub,
          fake=lambda q, kv, sink, idx, scale, freqs, positions: torch.empty(q.shape, dtype=torch.bfloat16,
                                                                             device=q.device))
define_op("pack_kv_fp8", _pack_stub,
          fake=lambda kv: torch.empty(*kv.shape[:-1], fp8_row_bytes(kv.shape[-1]), dtype=torch.uint8,
                                      device=kv.device))


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                     freqs: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sparse MQA attention with a per-head sink (SPEC 5.4), optionally followed by the
    inverse RoPE of the output's last R dims (SPEC 5.5). Returns bf16 ``[B, S, H, D]``.

    q: bf16 ``[B, S, H, D]``, D in (128, 512).
    kv: the shared key/value vectors, bf16 ``[B, N, D]``, or the FP8 cache rows
        ``pack_kv_fp8`` makes, uint8 ``[B, N, row_bytes]`` (584 bytes for D = 512).  Any
        view whose strides and offset are multiples of 8 (elements / bytes) is read in
        place; any other is first copied contiguous (the whole cache: avoid).
    sink: fp32 ``[H]`` (not multiplied by ``scale``, no value vector).
    idx: int32 ``[B, S, K]``, row b of kv; -1 = empty slot.  A duplicated index counts twice.
        Indices outside [-1, N) raise ``ValueError`` in checked mode (``DSV4_CHECKS=1``);
        otherwise they are treated as -1 (masked, never read).
    scale: the softmax scale (D ** -0.5 in the model), a positive number.
    freqs: fp32 ``[max_pos, R/2, 2]`` (cos, sin) as ``rope_freqs`` makes, and positions int
        ``[B, S]``: both or neither.  Positions outside [0, max_pos) raise in checked mode and
        are clamped otherwise.
    A query whose candidates are all empty gets output 0 (only the sink in the denominator).
    """
    V.tensor("q", q, (torch.bfloat16,), ndim=4)
    bsz, seq, heads, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q: expected head dim in {HEAD_DIMS}, got {d} (shape {tuple(q.shape)})")
    V.tensor("kv", kv, (torch.bfloat16, torch.uint8), ndim=3)
    V.same_device("kv", kv, "q", q)
    row = d if kv.dtype == torch.bfloat16 else fp8_row_bytes(d)
    if kv.shape[0] != bsz or kv.shape[2] != row:
        what = "bf16 [B, N, D]" if kv.dtype == torch.bfloat16 else "uint8 FP8 rows [B, N, row_bytes]"
        raise ValueError(f"kv: expected {what} = ({bsz}, N, {row}), got {tuple(kv.shape)}")
    V.tensor("sink", sink, (torch.float32,), ndim=1)
    V.shape("sink", sink, (heads,))
    V.same_device("sink", sink, "q", q)
    V.tensor("idx", idx, (torch.int32,), ndim=3)
    if idx.shape[:2] != (bsz, seq):
        raise ValueError(f"idx: expected shape ({bsz}, {seq}, K), got {tuple(idx.shape)}")
    V.same_device("idx", idx, "q", q)
    scale = V.number("scale", scale, positive=True)
    if (freqs is None) != (positions is None):
        raise ValueError("freqs/positions: give both (inverse RoPE on the output) or neither, "
                         f"got freqs {'None' if freqs is None else 'a tensor'} and positions "
                         f"{'None' if positions is None else 'a tensor'}")
    if freqs is not None:
        V.tensor("freqs", freqs, (torch.float32,), ndim=3)
        if freqs.shape[0] < 1 or freqs.shape[1] < 1 or freqs.shape[2] != 2 or 2 * freqs.shape[1] > d:
            raise ValueError(f"freqs: expected [max_pos >= 1, R/2 >= 1, 2] with R <= {d}, got {tuple(freqs.shape)}")
        V.same_device("freqs", freqs, "q", q)
        V.tensor("positions", positions, INDEX_DTYPES, ndim=2)
        V.shape("positions", positions, (bsz, seq))
        V.same_device("positions", positions, "q", q)
    if V.checks_enabled():
        n = kv.shape[1]
        bad = (idx < -1) | (idx >= n)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"idx: expected values in [-1, {n}) (N = kv.shape[1]), got {int(idx[tuple(where)])} "
                             f"at {tuple(where)}")
        if positions is not None:
            bad = (positions < 0) | (positions >= freqs.shape[0])
            if bool(bad.any()):
                where = bad.nonzero()[0].tolist()
                raise ValueError(f"positions: expected values in [0, {freqs.shape[0]}) (freqs.shape[0]), "
                                 f"got {int(positions[tuple(where)])} at {tuple(where)}")
    return call("sparse_attention", q.device, q, kv, sink, idx, scale, freqs, positions)


def pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    """KV vectors ``[..., D]`` -> FP8 cache rows, uint8 ``[..., row_bytes]`` (SPEC 11): per row
    the D-64 nope values as FP8-E4M3 with one E8M0 scale per 64 (act_quant, pow2 scales),
    the 64 rope values as BF16, the scales, zero pad to a multiple of 8 bytes (584 for D = 512).
    Exact for KV vectors the model has qat8-ed; a quantisation otherwise.  The layout is
    documented in ``dsv4_triton/reference/attention.py``.

    kv: bf16/fp16/fp32, any leading shape, D in (128, 512).
    """
    V.tensor("kv", kv, V.FLOAT_DTYPES, min_ndim=1)
    if kv.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"kv: expected last dim in {HEAD_DIMS}, got {kv.shape[-1]} (shape {tuple(kv.shape)})")
    return call("pack_kv_fp8", kv.device, kv)
