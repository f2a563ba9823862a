"""Triton compressor: pooling, rmsnorm, RoPE and the encode step of each entry in one launch.

A program owns ``ROWS`` whole entries (the rmsnorm needs the whole row): it streams the
entries' slots in blocks of ``SLOT_BLOCK`` with an online softmax per channel (running max,
sum of weights and weighted sum, FP32), so each slot's ``a`` and ``z`` are read once, then
finishes the rows in registers and writes them once as BF16:

* rmsnorm with ``norm_w``;
* RoPE on the last 64 dims at position ``ratio * i`` (``rotate_interleaved`` of the rope
  family, applied to the row viewed as 64-wide blocks, kept on the last block only);
* kind "kv": qat8 (block 64, power-of-two scales) on the other blocks, ``fp8_quantise``
  of the quant family; kind "indexer": the Hadamard rotation (``hadamard_rows``: +-1
  products on tensor cores, exact) and qat4 (``fp4_quantise``).  The Hadamard product
  needs at least 16 rows per program, so indexer entries go 16 per program.

The result matches the oracle to FP32 rounding before the encode step; the quantised
channels then agree except where a value lies within that rounding of a quantisation
boundary (one code step apart there).
"""

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..registry import register
from .formats import cast_rne
from .quant import fp4_qat_values, fp4_quantise, fp8_quantise, hadamard_rows, hadamard_scale, kron_split, sylvester
from .rope import clamp_position, rotate_interleaved

ROPE_DIM = 64
HADAMARD_ROWS = 16  # tl.dot needs 16 rows
OVERLAP_RATIO = 4
# The same numbers as constants the kernel can read.
_ROPE: tl.constexpr = tl.constexpr(ROPE_DIM)
_OVERLAP: tl.constexpr = tl.constexpr(OVERLAP_RATIO)

# Elements of one [SLOT_BLOCK, ROWS, BLOCK_D] tile; larger tiles spill registers.
MAX_TILE = 8192
# Shared memory for the pipelined slot loads (a, z and ape tiles, STAGES deep).
MAX_STAGED_BYTES = 200 * 1024


def _prune(configs, nargs, **kw):
    """Indexer entries need 16 rows per program (the Hadamard product); tiles must fit
    registers and their pipeline stages shared memory."""
    keep = []
    for c in configs:
        rows, slot_block, stages = c.kwargs["ROWS"], c.kwargs["SLOT_BLOCK"], c.kwargs["STAGES"]
        tile = slot_block * rows * kw["BLOCK_D"]
        staged = (2 * tile + slot_block * kw["BLOCK_D"]) * 4 * stages
        if ((kw["KIND_KV"] or rows == HADAMARD_ROWS) and slot_block <= kw["SLOTS"] and tile <= MAX_TILE
                and staged <= MAX_STAGED_BYTES):
            keep.append(c)
    return keep or configs[:1]


# The first config is the one the interpreter runs: valid for both kinds.  STAGES: depth of
# the software pipeline over the slot blocks (the loads are not matmul operands, so the
# loop asks for it explicitly; 1 = no pipelining).
@autotune(
    configs=[triton.Config({"ROWS": r, "SLOT_BLOCK": s, "STAGES": st}, num_warps=w) for r, s, w, st in
             ((16, 4, 4, 1), (16, 1, 4, 3), (16, 2, 4, 2), (16, 2, 8, 2), (16, 4, 8, 1), (16, 8, 8, 1),
              (1, 4, 4, 3), (1, 8, 4, 3), (1, 8, 8, 3), (1, 16, 8, 2), (1, 16, 16, 2), (1, 8, 4, 1),
              (2, 4, 4, 2), (2, 4, 8, 1), (2, 8, 8, 1), (4, 4, 8, 1))],
    key=["D", "SLOTS", "KIND_KV"],
    name="compress_entries",
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _compress_kernel(a_ptr, z_ptr, ape_ptr, w_ptr, table_ptr, idx_ptr, out_ptr, n_entries, max_pos, eps, h_scale,
                     stride_an, stride_al, stride_zn, stride_zl, stride_ape, stride_idx,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, RATIO: tl.constexpr, SLOTS: tl.constexpr,
                     KIND_KV: tl.constexpr, KRON_A: tl.constexpr, ROWS: tl.constexpr, SLOT_BLOCK: tl.constexpr,
                     STAGES: tl.constexpr):
    OVERLAP: tl.constexpr = RATIO == _OVERLAP
    NB: tl.constexpr = BLOCK_D // _ROPE  # 64-wide blocks of a row
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < n_entries
    entry = tl.load(idx_ptr + row * stride_idx, mask=row_ok, other=0).to(tl.int64)
    col = tl.arange(0, BLOCK_D)
    col_ok = col < D

    # --- pooling: online softmax over the slots, per channel ---
    m = tl.full([ROWS, BLOCK_D], float("-inf"), tl.float32)
    den = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for s0 in tl.range(0, SLOTS, SLOT_BLOCK, num_stages=STAGES):
        slot = s0 + tl.arange(0, SLOT_BLOCK)
        if OVERLAP:
            # Slots 0..3: the previous window through the lo half (absent for entry 0);
            # slots 4..7: the window through the hi half.
            hi = slot >= RATIO
            half = tl.where(hi, D, 0)
            ape_row = tl.where(hi, slot - RATIO, slot)
            present = hi[:, None] | (entry != 0)[None, :]
        else:
            half = tl.zeros([SLOT_BLOCK], dtype=tl.int32)
            ape_row = slot
            present = tl.full([SLOT_BLOCK, ROWS], 1, tl.int1)
        mask = (present & row_ok[None, :])[:, :, None] & col_ok[None, None, :]
        chan = (half[:, None, None] + col[None, None, :])
        a = tl.load(a_ptr + row[None, :, None] * stride_an + slot[:, None, None] * stride_al + chan,
                    mask=mask, other=0.0)
        z = tl.load(z_ptr + row[None, :, None] * stride_zn + slot[:, None, None] * stride_zl + chan,
                    mask=mask, other=float("-inf"))
        ape = tl.load(ape_ptr + ape_row[:, None, None] * stride_ape + chan,
                      mask=col_ok[None, None, :], other=0.0)
        score = z + ape  # absent slots: -inf
        m_new = tl.maximum(m, tl.max(score, axis=0))
        # While every slot so far is absent (m_new = -inf), subtract 0 instead: exp(-inf) = 0
        # rather than exp(-inf - -inf) = NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(score - m_ref[None, :, :])
        den = den * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p * a, axis=0)
        m = m_new
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.where(ok, acc / den, 0.0)

    # --- rmsnorm ---
    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    x = w[None, :] * (x * r[:, None])

    # --- RoPE on the last 64 dims (the block D/64 - 1 of each row) ---
    pos = clamp_position(entry * RATIO, max_pos)
    xb = tl.reshape(x, [ROWS * NB, _ROPE])
    block_pos = tl.reshape(tl.broadcast_to(pos[:, None], [ROWS, NB]), [ROWS * NB])
    is_rope = tl.reshape(tl.broadcast_to((tl.arange(0, NB) == D // _ROPE - 1)[None, :], [ROWS, NB]), [ROWS * NB])
    xb = tl.where(is_rope[:, None], rotate_interleaved(xb, table_ptr, block_pos, _ROPE, False), xb)

    # --- encode ---
    if KIND_KV:
        q, s = fp8_quantise(xb, True)
        y = tl.where(is_rope[:, None], xb, q.to(tl.float32) * s[:, None])
        y = tl.reshape(y, [ROWS, BLOCK_D])
    else:
        if KRON_A == 0:
            h_n = sylvester(D, tl.bfloat16)
            h_a = h_n
            h_16 = h_n
        else:
            h_a = sylvester(KRON_A, tl.bfloat16)
            h_16 = sylvester(16, tl.bfloat16)
            h_n = h_a
        xh = hadamard_rows(tl.reshape(xb, [ROWS, BLOCK_D]), h_scale, ROWS, D, KRON_A, h_a, h_16, h_n)
        codes, e, invalid = fp4_quantise(tl.reshape(xh, [ROWS * BLOCK_D // 32, 32]))
        y = tl.reshape(fp4_qat_values(codes, e, invalid), [ROWS, BLOCK_D])
    tl.store(out_ptr + row[:, None] * D + col[None, :], cast_rne(y, tl.bfloat16), mask=ok)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@register("compress_entries", "triton")
def compress_entries(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                     freqs: torch.Tensor, entry_idx: torch.Tensor, ratio: int, kind: str,
                     eps: float) -> torch.Tensor:
    n_entries, slots, width = a.shape
    d = width // 2 if ratio == OVERLAP_RATIO else width
    out = torch.empty(n_entries, d, dtype=torch.bfloat16, device=a.device)
    if n_entries == 0:
        return out
    a, z, ape = _last_dim_unit(a), _last_dim_unit(z), _last_dim_unit(ape)
    table = freqs.contiguous()
    norm_w = norm_w.contiguous()
    kind_kv = kind == "kv"
    grid = lambda meta: (triton.cdiv(n_entries, meta["ROWS"]),)
    _compress_kernel[grid](
        a, z, ape, norm_w, table, entry_idx, out, n_entries, table.shape[0], eps,
        hadamard_scale(d), a.stride(0), a.stride(1), z.stride(0), z.stride(1), ape.stride(0), entry_idx.stride(0),
        D=d, BLOCK_D=triton.next_power_of_2(d), RATIO=ratio, SLOTS=slots, KIND_KV=kind_kv,
        KRON_A=0 if kind_kv else kron_split(d))
    return out
