"""Triton compressor: pooling, rmsnorm, RoPE and the encode step of each entry in one launch.

A program owns ``ROWS`` whole entries (the rmsnorm needs the whole row): it streams the
entries' slots in blocks of ``SLOT_BLOCK`` with an online softmax per channel (running max,
sum of weights and weighted sum, FP32), so each slot's ``a`` and ``z`` are read once, then
finishes the rows in registers and writes them once as BF16:

* rmsnorm with ``norm_w``;
* RoPE on the last 64 dims at position ``ratio * i`` (``rotate_interleaved`` of the rope
  family, applied to the row viewed as 64-wide blocks, kept on the last block only);
* kind "kv": qat8 (block 64, power-of-two scales) on the other blocks, ``fp8_quantise``
  of the quant family; kind "indexer": the Hadamard rotation (``hadamard_butterfly``: FP32
  butterflies on CUDA cores) and qat4 (``fp4_quantise``).  The butterflies work at any row
  count, so small programs (one entry, one warp) can keep many loads in flight per SM while
  others finish; the tensor-core product would need 16 entries a program, whose finishing
  steps then run with the memory idle (all programs of the one wave finish together).

The result matches the oracle to FP32 rounding before the encode step; the quantised
channels then agree except where a value lies within that rounding of a quantisation
boundary (one code step apart there).

Outputs (constexpr, one launch either way): the BF16 entries, and/or each entry's encoded
cache row at a flat destination row (-1: none): kind "kv" the FP8 row of ``pack_kv_fp8``,
kind "indexer" the FP4 row of ``pack_indexer_keys``.  The row is encoded from the QAT'd
values in registers with the scale ``pack_*`` would compute from them (re-quantising is
exact: same values; only a block whose largest value rounded down to the next power of
two changes scale and codes), so its bytes are ``pack_*`` of the BF16 entries.  All output
modes pass tensors of the same dtypes (a small dummy for an output not written), so the
autotuner, which keys on them, runs one config for prefill's and decode's launches: the
same pooling order, the same bits.

``store_window_kv``: the KV of new tokens (the kv_norm output), RoPE + qat8 with
``rope_qat8``'s arithmetic (launched without FMA contraction, each part rounded to the
input dtype), encoded into the FP8 row of ring slot ``p % W``, one launch.
"""

import torch
import triton
import triton.language as tl

from ..autotune import autotune, launcher, token_bucket
from ..registry import register
from ..reference.attention import fp8_row_bytes
from .formats import amax_nan, cast_rne, exp2i, to_f32, to_fp8
from .quant import (FP8_AMAX_FLOOR, fp4_qat_values, fp4_quantise, fp8_block_codes, fp8_quantise, fp8_scale_exponent,
                    hadamard_butterfly, hadamard_scale)
from .rope import clamp_position, rotate_interleaved

ROPE_DIM = 64
OVERLAP_RATIO = 4
# The same numbers as constants the kernel can read.
_ROPE: tl.constexpr = tl.constexpr(ROPE_DIM)
_OVERLAP: tl.constexpr = tl.constexpr(OVERLAP_RATIO)
_QBLOCK: tl.constexpr = tl.constexpr(64)  # qat8 / FP8 cache row block

# Elements of one [SLOT_BLOCK, ROWS, BLOCK_D] tile; larger tiles spill registers.
MAX_TILE = 8192
# Shared memory for the pipelined slot loads (a, z and ape tiles, STAGES deep).
MAX_STAGED_BYTES = 200 * 1024


def config_fits(config: triton.Config, block_d: int, slots: int, kind_kv: bool) -> bool:
    """Tiles must fit registers and their pipeline stages shared memory; programs of one or
    two warps are for the narrow indexer entries only."""
    rows, slot_block, stages = config.kwargs["ROWS"], config.kwargs["SLOT_BLOCK"], config.kwargs["STAGES"]
    tile = slot_block * rows * block_d
    staged = (2 * tile + slot_block * block_d) * 4 * stages
    return ((not kind_kv or config.num_warps >= 4) and slot_block <= slots and tile <= MAX_TILE
            and staged <= MAX_STAGED_BYTES)


def _prune(configs, nargs, **kw):
    return [c for c in configs if config_fits(c, kw["BLOCK_D"], kw["SLOTS"], kw["KIND_KV"])] or configs[:1]


# The first config is the one the interpreter runs: valid for both kinds.  STAGES: depth of
# the software pipeline over the slot blocks (the loads are not matmul operands, so the
# loop asks for it explicitly; 1 = no pipelining).
CONFIGS = [triton.Config({"ROWS": r, "SLOT_BLOCK": s, "STAGES": st}, num_warps=w) for r, s, w, st in
           ((16, 4, 4, 1), (16, 1, 4, 3), (16, 2, 4, 2), (16, 2, 8, 2), (16, 4, 8, 1), (16, 8, 8, 1),
            (1, 4, 4, 3), (1, 8, 4, 3), (1, 8, 8, 3), (1, 16, 8, 2), (1, 16, 16, 2), (1, 8, 4, 1),
            (2, 4, 4, 2), (2, 4, 8, 1), (2, 8, 8, 1), (4, 4, 8, 1),
            (1, 8, 1, 2), (1, 8, 1, 1), (1, 4, 1, 3), (2, 2, 1, 3), (2, 4, 1, 2), (4, 1, 2, 3), (8, 1, 8, 3))]


@autotune(
    configs=CONFIGS,
    key=["D", "SLOTS", "KIND_KV"],
    name="compress_entries",
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _compress_kernel(a_ptr, z_ptr, ape_ptr, w_ptr, table_ptr, idx_ptr, out_ptr, dest_ptr, cache_ptr,
                     n_entries, n_cache_rows, max_pos, eps, h_scale,
                     stride_an, stride_al, stride_zn, stride_zl, stride_ape, stride_idx, stride_dest,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, RATIO: tl.constexpr, SLOTS: tl.constexpr,
                     KIND_KV: tl.constexpr, LOG_D: tl.constexpr, WRITE_VALUES: tl.constexpr,
                     WRITE_ROWS: tl.constexpr, ROW_BYTES: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr,
                     SLOT_BLOCK: tl.constexpr, STAGES: tl.constexpr):
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
    if WRITE_ROWS:
        # Destination cache row of each entry; -1 (or any row outside the cache) writes nothing.
        dest = tl.load(dest_ptr + row * stride_dest, mask=row_ok, other=-1).to(tl.int64)
        dest_ok = row_ok & (dest >= 0) & (dest < n_cache_rows)
    if KIND_KV:
        q, s = fp8_quantise(xb, True)
        yb = tl.where(is_rope[:, None], xb, q.to(tl.float32) * s[:, None])
        y = tl.reshape(yb, [ROWS, BLOCK_D])
        if WRITE_ROWS:
            blk = tl.reshape(tl.broadcast_to(tl.arange(0, NB)[None, :], [ROWS, NB]), [ROWS * NB])
            blk_dest = tl.reshape(tl.broadcast_to(dest[:, None], [ROWS, NB]), [ROWS * NB])
            blk_ok = tl.reshape(tl.broadcast_to(dest_ok[:, None], [ROWS, NB]), [ROWS * NB]) & (blk < D // _ROPE)
            store_fp8_row_blocks(cache_ptr, blk_dest * ROW_BYTES, blk, blk_ok, is_rope, yb, D, ROW_BYTES, ALIGNED)
    else:
        xh = hadamard_butterfly(tl.reshape(xb, [ROWS, BLOCK_D]), LOG_D) * h_scale
        codes, e, invalid = fp4_quantise(tl.reshape(xh, [ROWS * BLOCK_D // 32, 32]))
        yq = fp4_qat_values(codes, e, invalid)
        y = tl.reshape(yq, [ROWS, BLOCK_D])
        if WRITE_ROWS:
            NQ: tl.constexpr = BLOCK_D // 32
            qblk = tl.arange(0, ROWS * NQ)
            q_dest = tl.reshape(tl.broadcast_to(dest[:, None], [ROWS, NQ]), [ROWS * NQ])
            q_ok = tl.reshape(tl.broadcast_to(dest_ok[:, None], [ROWS, NQ]), [ROWS * NQ])
            store_fp4_row_blocks(cache_ptr, q_dest * ROW_BYTES, qblk % NQ, q_ok, yq, D)
    if WRITE_VALUES:
        tl.store(out_ptr + row[:, None] * D + col[None, :], cast_rne(y, tl.bfloat16), mask=ok)


@triton.jit
def store_rope_and_pad(cache_ptr, row_start, write, rope, D: tl.constexpr, ROW_BYTES: tl.constexpr,
                       ALIGNED: tl.constexpr):
    """A row's 64 rope values (FP32 ``[R, 64]``, stored as BF16) and its zero pad bytes, rows
    starting at byte ``row_start`` ``[R]`` where ``write``; ``ALIGNED``: every ``row_start``
    is a multiple of 8."""
    DN: tl.constexpr = D - _ROPE
    NBLK: tl.constexpr = DN // _QBLOCK
    PAD: tl.constexpr = ROW_BYTES - (DN + 2 * _ROPE + NBLK)
    PAD_P2: tl.constexpr = 8
    e = tl.arange(0, _ROPE)
    bits = cast_rne(rope, tl.bfloat16).to(tl.uint16, bitcast=True)
    if ALIGNED:
        row_start = tl.multiple_of(row_start, 8)
        tl.store((cache_ptr + row_start[:, None] + DN + 2 * e[None, :]).to(tl.pointer_type(tl.uint16)), bits,
                 mask=write[:, None])
    else:  # a 2-byte store at an odd address faults: byte by byte
        at = cache_ptr + row_start[:, None] + DN + 2 * e[None, :]
        tl.store(at, (bits & 0xFF).to(tl.uint8), mask=write[:, None])
        tl.store(at + 1, (bits >> 8).to(tl.uint8), mask=write[:, None])
    pad = tl.arange(0, PAD_P2)
    tl.store(cache_ptr + row_start[:, None] + (DN + 2 * _ROPE + NBLK) + pad[None, :],
             tl.zeros([rope.shape[0], PAD_P2], tl.uint8), mask=write[:, None] & (pad < PAD)[None, :])


@triton.jit
def store_fp8_row_blocks(cache_ptr, row_start, blk, blk_ok, is_rope, yb, D: tl.constexpr, ROW_BYTES: tl.constexpr,
                         ALIGNED: tl.constexpr):
    """Writes blocks of 64 qat8-ed KV values into FP8 cache rows (``pack_kv_fp8``'s layout,
    ``reference/attention.py``): block ``blk`` of the row starting at byte ``row_start``;
    ``is_rope`` marks the row's last block (stored as BF16), the others are re-encoded with
    the scale ``pack_kv_fp8`` computes from them (a block whose largest value rounded down
    may take the next smaller power of two: same values, other codes), so the bytes equal
    ``pack_kv_fp8`` of the BF16 values.  The rope block also writes its row's zero pad
    bytes.  ``yb``: FP32 ``[R, 64]``; ``row_start``, ``blk``, ``blk_ok``, ``is_rope``: ``[R]``;
    ``ALIGNED``: as for ``store_rope_and_pad``."""
    DN: tl.constexpr = D - _ROPE
    e = tl.arange(0, _QBLOCK)
    nope_ok = blk_ok & ~is_rope
    codes, ex, invalid, _ = fp8_block_codes(yb, amax_nan(yb, 1))
    tl.store(cache_ptr + row_start[:, None] + blk[:, None] * _QBLOCK + e[None, :], codes, mask=nope_ok[:, None])
    tl.store(cache_ptr + row_start + DN + 2 * _ROPE + blk, tl.where(invalid, 0xFF, ex + 127).to(tl.uint8),
             mask=nope_ok)
    store_rope_and_pad(cache_ptr, row_start, blk_ok & is_rope, yb, D, ROW_BYTES, ALIGNED)


@triton.jit
def store_fp4_row_blocks(cache_ptr, row_start, blk, blk_ok, yq, D: tl.constexpr):
    """Writes blocks of 32 qat4-ed indexer values into FP4 key rows (``pack_indexer_keys``'s
    layout: ``D / 2`` code bytes, element 2k in the low nibble, then one E8M0 scale per 32):
    block ``blk`` of the row starting at byte ``row_start``.  Re-quantised from the values, so
    a block whose largest value rounded down gets ``pack_indexer_keys``'s scale and codes.
    ``yq``: FP32 ``[R, 32]``; ``row_start``, ``blk``, ``blk_ok``: ``[R]``."""
    codes, e, invalid = fp4_quantise(yq)
    lo, hi = tl.split(tl.reshape(codes, [yq.shape[0], 16, 2]))
    tl.store(cache_ptr + row_start[:, None] + blk[:, None] * 16 + tl.arange(0, 16)[None, :],
             (lo | (hi << 4)).to(tl.uint8), mask=blk_ok[:, None])
    tl.store(cache_ptr + row_start + D // 2 + blk, tl.where(invalid, 255, e + 127).to(tl.uint8), mask=blk_ok)


# Tokens a program and warps: small programs keep more of them in flight per SM (a decode step
# has B tokens, a prefill B x S).
WINDOW_CONFIGS = [triton.Config({"ROWS": r}, num_warps=w) for r, w in
                  ((4, 4), (1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (8, 4), (16, 8))]


@autotune(configs=WINDOW_CONFIGS, key=["D", "TOKEN_BUCKET"], name="store_window_kv")
@triton.jit
def _window_kv_kernel(kv_ptr, table_ptr, pos_ptr, len_ptr, cache_ptr, n_tokens, seq, window, max_pos,
                      stride_kb, stride_ks, stride_pb, stride_ps, stride_cb, stride_cn, TOKEN_BUCKET,
                      D: tl.constexpr, ROW_BYTES: tl.constexpr, HAS_LENGTHS: tl.constexpr, ALIGNED: tl.constexpr,
                      ROWS: tl.constexpr):
    """``ROWS`` tokens per program: RoPE + qat8 of each (``rope_qat8``'s arithmetic, each
    part rounded to kv's dtype), then the FP8 cache row into ring slot ``p % window``.
    ``ALIGNED``: the cache's rows start on 8-byte boundaries; told so, the compiler stores
    codes 8 bytes at a time and rope values 2 (else byte by byte: see ``store_rope_and_pad``)."""
    NB: tl.constexpr = D // _ROPE
    DN: tl.constexpr = D - _ROPE
    dtype: tl.constexpr = kv_ptr.dtype.element_ty
    tok = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tok_ok = tok < n_tokens
    b32 = tok // seq
    b = b32.to(tl.int64)
    s = (tok - b32 * seq).to(tl.int64)
    # Every load that does not need the position comes first, so the position's round trip
    # overlaps the row's.
    p = tl.load(pos_ptr + b * stride_pb + s * stride_ps, mask=tok_ok, other=-1).to(tl.int64)
    blk = tl.arange(0, NB)
    e = tl.arange(0, _ROPE)
    kv_row = kv_ptr + b * stride_kb + s * stride_ks
    x = to_f32(tl.load(kv_row[:, None, None] + blk[None, :, None] * _ROPE + e[None, None, :],
                       mask=tok_ok[:, None, None], other=0.0))
    # The rope block again as [ROWS, 64] (from L1) for the rotation.
    xr = to_f32(tl.load(kv_row[:, None] + DN + e[None, :], mask=tok_ok[:, None], other=0.0))
    if HAS_LENGTHS:
        length = tl.load(len_ptr + b, mask=tok_ok, other=0).to(tl.int64)
    write = tok_ok & (p >= 0)
    if HAS_LENGTHS:
        write = write & (p < length) & (p >= length - window)
    row_start = b * stride_cb + tl.where(write, p % window, 0) * stride_cn
    # The rotation first: its table row is the one load that waits for the position.
    pos = clamp_position(tl.where(write, p, 0), max_pos)
    rope = to_f32(cast_rne(rotate_interleaved(xr, table_ptr, pos, _ROPE, False), dtype))

    xb = tl.reshape(x, [ROWS * NB, _ROPE])
    blk_flat = tl.reshape(tl.broadcast_to(blk[None, :], [ROWS, NB]), [ROWS * NB])
    blk_start = tl.reshape(tl.broadcast_to(row_start[:, None], [ROWS, NB]), [ROWS * NB])
    blk_ok = tl.reshape(tl.broadcast_to(write[:, None], [ROWS, NB]), [ROWS * NB])
    is_rope = blk_flat == NB - 1
    if dtype == tl.float16:
        # qat8's values q 2^e may round in FP16 (up to 65536, down to 2^-31): the two
        # quantisations as the oracle runs them.
        q, sc = fp8_quantise(xb, True)
        nope = to_f32(cast_rne(q.to(tl.float32) * sc[:, None], dtype))
        rope_b = tl.reshape(tl.broadcast_to(rope[:, None, :], [ROWS, NB, _ROPE]), [ROWS * NB, _ROPE])
        yb = tl.where(is_rope[:, None], rope_b, nope)
        store_fp8_row_blocks(cache_ptr, blk_start, blk_flat, blk_ok, is_rope, yb, D, ROW_BYTES, ALIGNED)
    else:
        # qat8 and the row's encoding in one quantisation.  In BF16 and FP32 qat8's values
        # q 2^e are exact (q has four significant bits; e >= -22 from the amax floor), so the
        # encoding sees max|q| 2^e and takes the scale 2^e again, or 2^(e - 1) when max|q| is
        # 224 (then every |q| <= 224 and its code becomes that of 2q).  max|q| is the code of
        # amax 2^-e (rounding is monotonic), so one FP8 conversion an element instead of five.
        amax = amax_nan(xb, 1)
        code, ex, invalid, inv_scale = fp8_block_codes(xb, amax)
        top = to_f32(to_fp8(amax * inv_scale)) * exp2i(ex)
        ex_row = fp8_scale_exponent(tl.maximum(top, FP8_AMAX_FLOOR))
        halve = (ex_row < ex) & ~invalid
        if tl.max(halve.to(tl.int32), 0) > 0:  # ~5% of blocks halve: only their programs pay
            mag = code & 0x7F
            code = tl.where(halve[:, None], (code & 0x80) | (mag + tl.where(mag >= 8, 8, mag)), code)
        if ALIGNED:
            blk_start = tl.multiple_of(blk_start, 8)
        tl.store(cache_ptr + blk_start[:, None] + blk_flat[:, None] * _QBLOCK + e[None, :], code,
                 mask=(blk_ok & ~is_rope)[:, None])
        tl.store(cache_ptr + blk_start + DN + 2 * _ROPE + blk_flat,
                 tl.where(invalid, 0xFF, ex_row + 127).to(tl.uint8), mask=blk_ok & ~is_rope)
        store_rope_and_pad(cache_ptr, row_start, write, rope, D, ROW_BYTES, ALIGNED)


def rows_on_8_bytes(cache: torch.Tensor) -> bool:
    """Whether every row of the byte tensor ``cache`` starts on an 8-byte boundary (all but its
    last dim's strides and its address multiples of 8), as word stores into it need."""
    return cache.data_ptr() % 8 == 0 and all(st % 8 == 0 for st in cache.stride()[:-1])


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


_dummies = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor standing for an output a launch does not write.  Every mode of the
    compressor kernel passes tensors of the same dtypes, so all modes share one tuned config
    (the autotuner keys on them): prefill's and decode's entries are pooled in the same order."""
    key = (device, dtype)
    t = _dummies.get(key)
    if t is None:
        t = _dummies[key] = torch.zeros(8, dtype=dtype, device=device)
    return t


def _compress(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps, out, rows, cache, config=None):
    """One launch: writes ``out`` (BF16 entries) if given, and the encoded rows into the flat
    ``cache`` rows ``rows`` if given.  ``config``: one of ``CONFIGS`` to launch instead of the
    tuned choice (to test each form)."""
    n_entries, slots, width = a.shape
    d = width // 2 if ratio == OVERLAP_RATIO else width
    a, z, ape = _last_dim_unit(a), _last_dim_unit(z), _last_dim_unit(ape)
    table = freqs.contiguous()
    norm_w = norm_w.contiguous()
    kind_kv = kind == "kv"
    write_values, write_rows = out is not None, cache is not None
    if not write_values:
        out = _dummy(a.device, torch.bfloat16)
    if not write_rows:
        rows, cache = _dummy(a.device, torch.int64), _dummy(a.device, torch.uint8)
    row_bytes = cache.shape[-1]
    grid = lambda meta: (triton.cdiv(n_entries, meta["ROWS"]),)
    kernel, meta = launcher(_compress_kernel, config)
    kernel[grid](
        a, z, ape, norm_w, table, entry_idx, out, rows, cache, n_entries, cache.numel() // row_bytes,
        table.shape[0], eps, hadamard_scale(d), a.stride(0), a.stride(1), z.stride(0), z.stride(1),
        ape.stride(0), entry_idx.stride(0), rows.stride(0),
        D=d, BLOCK_D=triton.next_power_of_2(d), RATIO=ratio, SLOTS=slots, KIND_KV=kind_kv,
        LOG_D=0 if kind_kv else d.bit_length() - 1, WRITE_VALUES=write_values, WRITE_ROWS=write_rows,
        ROW_BYTES=row_bytes, ALIGNED=rows_on_8_bytes(cache), **meta)


@register("compress_entries", "triton")
def compress_entries(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                     freqs: torch.Tensor, entry_idx: torch.Tensor, ratio: int, kind: str,
                     eps: float) -> torch.Tensor:
    d = a.shape[-1] // 2 if ratio == OVERLAP_RATIO else a.shape[-1]
    out = torch.empty(a.shape[0], d, dtype=torch.bfloat16, device=a.device)
    if a.shape[0]:
        _compress(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps, out, None, None)
    return out


@register("compress_entries_cached", "triton")
def compress_entries_cached(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                            freqs: torch.Tensor, entry_idx: torch.Tensor, ratio: int, kind: str, eps: float,
                            cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    d = a.shape[-1] // 2 if ratio == OVERLAP_RATIO else a.shape[-1]
    out = torch.empty(a.shape[0], d, dtype=torch.bfloat16, device=a.device)
    if a.shape[0]:
        has_rows = cache.numel() > 0
        _compress(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps, out, rows if has_rows else None,
                  cache if has_rows else None)
    return out


@register("compress_entries_to_cache", "triton")
def compress_entries_to_cache(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                              freqs: torch.Tensor, entry_idx: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor,
                              ratio: int, kind: str, eps: float) -> None:
    if a.shape[0] and cache.numel():
        _compress(a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps, None, rows, cache)


@register("store_window_kv", "triton")
def store_window_kv(kv: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                    window: int, lengths) -> None:
    store_window(kv, freqs, positions, cache, window, lengths)


def store_window(kv, freqs, positions, cache, window, lengths, config=None) -> None:
    """``store_window_kv``'s launch; ``config``: one of ``WINDOW_CONFIGS`` instead of the tuned
    choice (to test each)."""
    if kv.dim() == 2:
        kv, positions = kv[:, None], positions[:, None]
    bsz, seq, d = kv.shape
    if bsz * seq == 0:
        return
    kv = _last_dim_unit(kv)
    table = freqs.contiguous()
    has_lengths = lengths is not None
    kernel, meta = launcher(_window_kv_kernel, config)
    kernel[lambda m: (triton.cdiv(bsz * seq, m["ROWS"]),)](
        kv, table, positions, lengths if has_lengths else positions, cache, bsz * seq, seq, window, table.shape[0],
        kv.stride(0), kv.stride(1), positions.stride(0), positions.stride(1), cache.stride(0), cache.stride(1),
        token_bucket(bsz * seq), D=d, ROW_BYTES=fp8_row_bytes(d), HAS_LENGTHS=has_lengths,
        ALIGNED=rows_on_8_bytes(cache), enable_fp_fusion=False, **meta)
