"""Public ops of the moe family: the routed experts of an MoE layer (SPEC section 8).

``moe_pack_experts`` repacks a layer's checkpoint expert weights once at load;
``moe_experts`` runs every token through its ``k`` routed experts and sums the results.
The router (``ops.route``) and the shared expert (an ``fp8_linear`` MLP) are separate ops.
"""


from typing import List, Tuple

import torch

from cuda_fallback import moe as _cuda  # noqa: F401  (registers the cuda backend at decode sizes)

from .. import validate as V
from ..kernels import moe as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import moe as _reference  # noqa: F401  (registers the reference backend)
from ..reference.moe import CODE_BYTES, PACK_ROWS, SCALE_BYTES, TILE_K, TILE_ROWS, pack_experts
from ..registry import call, define_op
from .gemm import check_fp4_weight

__all__ = ["moe_pack_experts", "moe_experts"]

MOE_FORMATS = ("mxfp4",)


def _check_list(name: str, items, n_experts: int) -> None:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tensors (one per expert), got {type(items).__name__}")
    if len(items) != n_experts:
        raise ValueError(f"{name}: expected {n_experts} tensors (one per expert), got {len(items)}")


def moe_pack_experts(w1: List[torch.Tensor], w1_scale: List[torch.Tensor], w3: List[torch.Tensor],
                     w3_scale: List[torch.Tensor], w2: List[torch.Tensor], w2_scale: List[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-time repack of a layer's MXFP4 expert weights into the layout ``moe_experts`` reads.

    Lists with one tensor per expert, as in the checkpoint: w1/w3 packed FP4 ``[inter, dim/2]``
    (uint8/int8/float4_e2m1fn_x2) with float8_e8m0fnu scales ``[inter, dim/32]``; w2
    ``[dim, inter/2]`` with scales ``[dim, inter/32]``.  ``inter`` and ``dim`` must be multiples
    of 128.  Returns ``(w13, w13_scale, w2, w2_scale)`` in 16-row x 128-K tiles: uint8
    ``[E, 2*inter/16, dim/128, 16, 64]``, e8m0 ``[E, 2*inter/16, dim/128, 16, 4]``, uint8
    ``[E, dim/16, inter/128, 16, 64]``, e8m0 ``[E, dim/16, inter/128, 16, 4]``, contiguous (w1 and
    w3 interleaved in blocks of 128 rows; see ``reference/moe.py``).
    """
    _check_list("w1", w1, len(w1))
    n_experts = len(w1)
    if n_experts == 0:
        raise ValueError("w1: expected at least one expert, got an empty list")
    for name, items in (("w1_scale", w1_scale), ("w3", w3), ("w3_scale", w3_scale), ("w2", w2),
                        ("w2_scale", w2_scale)):
        _check_list(name, items, n_experts)
    V.tensor("w1[0]", w1[0], None, ndim=2)
    inter, dim = w1[0].shape[0], 2 * w1[0].shape[1]
    V.divisible("w1[0]", inter, PACK_ROWS, what="inter (the number of rows)")
    V.divisible("w1[0]", dim, 128, what="dim (twice the last dim)")
    for e in range(n_experts):
        check_fp4_weight(f"w1[{e}]", w1[e], f"w1_scale[{e}]", w1_scale[e], "mxfp4", k=dim)
        check_fp4_weight(f"w3[{e}]", w3[e], f"w3_scale[{e}]", w3_scale[e], "mxfp4", k=dim)
        check_fp4_weight(f"w2[{e}]", w2[e], f"w2_scale[{e}]", w2_scale[e], "mxfp4", k=inter)
        V.shape(f"w1[{e}]", w1[e], (inter, dim // 2))
        V.shape(f"w3[{e}]", w3[e], (inter, dim // 2))
        V.shape(f"w2[{e}]", w2[e], (dim, inter // 2))
        for name, t in ((f"w1[{e}]", w1[e]), (f"w1_scale[{e}]", w1_scale[e]), (f"w3[{e}]", w3[e]),
                        (f"w3_scale[{e}]", w3_scale[e]), (f"w2[{e}]", w2[e]), (f"w2_scale[{e}]", w2_scale[e])):
            V.same_device(name, t, "w1[0]", w1[0])
    return pack_experts(list(w1), list(w1_scale), list(w3), list(w3_scale), list(w2), list(w2_scale))


def _moe_experts_stub(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                      w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, limit: float,
                      fmt: str) -> torch.Tensor:
    raise NotImplementedError


define_op("moe_experts", _moe_experts_stub,
          fake=lambda x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, limit, fmt: torch.empty(
              x.shape, dtype=torch.bfloat16, device=x.device))


def _check_ids(topk_ids: torch.Tensor, n_experts: int) -> None:
    """Checked mode only (reads values): ids in [0, E) and no expert twice in a row."""
    if topk_ids.numel() == 0:
        return
    bad = (topk_ids < 0) | (topk_ids >= n_experts)
    if bool(bad.any()):
        t, s = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"topk_ids: expected expert ids in [0, {n_experts}), got {int(topk_ids[t, s])} "
                         f"at token {t}, slot {s}")
    srt = topk_ids.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
    if bool(dup.any()):
        t = int(dup.nonzero()[0, 0])
        raise ValueError(f"topk_ids: expected distinct experts in each token's row, got "
                         f"{topk_ids[t].tolist()} at token {t}")


def _check_tiled(name: str, w: torch.Tensor, scale_name: str, w_scale: torch.Tensor, lead, k: int,
                 row_multiple: int = TILE_ROWS):
    """A packed expert matrix (``moe_pack_experts``'s tiled layout, contiguous) with K = ``k``,
    rows a multiple of ``row_multiple`` and, if given, ``lead = (E, rows)``; returns
    ``(E, rows)``."""
    V.tensor(name, w, (torch.uint8,), ndim=5)
    e, tiles, blocks = w.shape[:3]
    rows = tiles * TILE_ROWS
    if lead is not None and (e, rows) != tuple(lead):
        raise ValueError(f"{name}: expected {lead[0]} experts of {lead[1]} rows (shape [{lead[0]}, {lead[1]} / "
                         f"{TILE_ROWS}, K / {TILE_K}, {TILE_ROWS}, {CODE_BYTES}]), got {tuple(w.shape)}")
    if blocks * TILE_K != k:
        raise ValueError(f"{name}: expected K = {k} ([E, rows / {TILE_ROWS}, {k / TILE_K:g}, {TILE_ROWS}, "
                         f"{CODE_BYTES}]), got {blocks} blocks of {TILE_K} (shape {tuple(w.shape)})")
    V.shape(name, w, (e, tiles, blocks, TILE_ROWS, CODE_BYTES))
    if rows * k // 2 >= 2 ** 31:
        raise ValueError(f"{name}: expected under 2**31 bytes an expert (the kernels address one expert's tiles "
                         f"with int32), got {rows} rows x K = {k}")
    if rows % row_multiple:
        raise ValueError(f"{name}: expected rows a multiple of {row_multiple}, got {rows} rows "
                         f"(shape {tuple(w.shape)})")
    V.tensor(scale_name, w_scale, (torch.float8_e8m0fnu,), ndim=5)
    V.shape(scale_name, w_scale, (e, tiles, k // TILE_K, TILE_ROWS, SCALE_BYTES))
    for n, t in ((name, w), (scale_name, w_scale)):
        if not t.is_contiguous():
            raise ValueError(f"{n}: expected a contiguous tensor (as moe_pack_experts returns), got strides "
                             f"{t.stride()}")
    return e, rows


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, limit: float = 10.0,
                fmt: str = "mxfp4") -> torch.Tensor:
    """Routed experts: ``y[t] = sum_j w2_e (act_quant(w_tj * swiglu(w1_e a, w3_e a)))`` with
    ``e = topk_ids[t, j]``, ``w_tj = topk_weights[t, j]``, ``a = act_quant(x[t])``; every GEMM
    accumulates in FP32 and the k expert outputs are summed in FP32; bf16 out (SPEC 8).

    x: bf16 ``[T, dim]``; topk_weights: fp32 ``[T, k]``; topk_ids: int32 ``[T, k]``;
    w13, w13_scale, w2, w2_scale: as ``moe_pack_experts`` returns (tiled, contiguous); limit:
    the SwiGLU clamp.
    Expert ids must lie in ``[0, E)`` and be distinct within a row: checked (ValueError) only
    in checked mode (``DSV4_CHECKS=1``), because it reads values.  Unchecked, an id outside
    ``[0, E)`` contributes nothing and never causes an out-of-bounds access, and an expert
    listed twice in a row contributes twice.
    """
    V.tensor("x", x, (torch.bfloat16,), ndim=2)
    t, dim = x.shape
    V.tensor("topk_ids", topk_ids, (torch.int32,), ndim=2)
    if topk_ids.shape[0] != t or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids: expected [T={t}, k >= 1], got {tuple(topk_ids.shape)}")
    V.tensor("topk_weights", topk_weights, (torch.float32,))
    V.shape("topk_weights", topk_weights, topk_ids.shape)
    if fmt not in MOE_FORMATS:
        raise ValueError(f"fmt: expected one of {MOE_FORMATS}, got {fmt!r}")
    # 2*inter rows, inter a multiple of PACK_ROWS (w1/w3 interleave in whole blocks)
    n_experts, two_inter = _check_tiled("w13", w13, "w13_scale", w13_scale, None, dim, row_multiple=2 * PACK_ROWS)
    _check_tiled("w2", w2, "w2_scale", w2_scale, (n_experts, dim), two_inter // 2)
    for name, tensor in (("topk_weights", topk_weights), ("topk_ids", topk_ids), ("w13", w13),
                         ("w13_scale", w13_scale), ("w2", w2), ("w2_scale", w2_scale)):
        V.same_device(name, tensor, "x", x)
    limit = V.number("limit", limit, positive=True)
    if V.checks_enabled():
        _check_ids(topk_ids, n_experts)
    return call("moe_experts", x.device, x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, limit, fmt)
