"""Triton lightning indexer: scores on tensor cores, then an exact radix top-k, no host sync.

Scoring (one launch): a program takes ``QROWS`` queries of one sequence (all their heads:
``QROWS * Hi`` rows of ``qi``, at least 16 for the tensor cores) and ``TILES`` tiles of
``BLOCK_N`` keys; per tile ``[rows, 128] @ [128, BLOCK_N]`` in FP32 accumulation, relu,
times ``w``, summed over the heads, stored as FP32 scores ``[B*S, Nk]`` (a workspace of
4 B per query and key: 1/64 of the BF16 key bytes it is made from).  Key tiles at or
past every query's ``n_valid`` are skipped (the causal half in prefill).

Selection: exact top-k by a radix select on an order-preserving 32-bit key of each FP32
score (up to four levels of one byte; a histogram pass per level finds the digit holding
the k-th largest, and the levels stop once that digit is taken whole), then one pass that
writes, in ascending index order, every index above the threshold and the lowest-index
ones equal to it, and pads with -1.  Deterministic either way (integer sums only):
- few long rows (decode): the row-parallel select, 6 launches with every SM busy: the
  scoring pass, then each row cut into chunks, one program each: 4 level launches (the
  chunks' histograms summed by integer atomics into the row's; every program of the next
  launch makes that level's pick from the complete histogram), then one that makes the last
  pick and writes each chunk's selection at the offset the chunks before it give (their
  counts stored by the last level launch).  See "Row-parallel selection" below.
- many rows (prefill): one program per row segment, all levels in one launch; a row cut
  into ``splits`` segments writes each segment's top-k with values and a second launch
  selects among those (exact: an element of the row's top-k is in its segment's top-k).
  2 launches, 3 when a row is split.

FP4 keys (``uint8 [B, Nk, 68]``, see ``reference/indexer.py``) are decoded in registers to
BF16 (exact: an E2M1 value times a power of two) before the same tensor-core product, so both
layouts give identical scores; the FP4 rows move 68 B per key instead of 256 B.  The tuned
product is keys @ q^T with the key tile as the MMA's A operand, which FP4 rows are decoded
straight into (``_fp4_key_tile_a``: no trip through shared memory).  The other form, q @ keys^T
with the key tile as the B operand (``_fp4_key_tile``, through shared memory), is kept for the
benchmarks' comparison only: measured 1.6-2.6x slower on the H100, and its scores may differ
from the tuned form's in the last bits there (the tensor cores' FP32 summation differs by
operand role), so the tuner never picks it and every tuned config gives the same scores.
"""

import math

import torch
import triton
import triton.language as tl

from ..autotune import autotune
from ..reference.indexer import FP4_KEY_BYTES
from ..registry import register
from .device import sm_count
from .formats import INTERPRET, cast_rne, e8m0_value, to_f32
from .rows import as_rows
from .quant import fp4_quantise

HEAD_DIM: tl.constexpr = tl.constexpr(128)
FP4_BLOCK: tl.constexpr = tl.constexpr(32)
RADIX_BITS: tl.constexpr = tl.constexpr(8)
RADIX_BINS: tl.constexpr = tl.constexpr(256)
INT32_MIN: tl.constexpr = tl.constexpr(-2147483648)
RADIX_LEVELS: tl.constexpr = tl.constexpr(4)
TWO_POW_126: tl.constexpr = tl.constexpr(2.0 ** 126)
_KEY_ROW_BYTES: tl.constexpr = tl.constexpr(FP4_KEY_BYTES)
PACK_ROWS = 16
MIN_DOT_ROWS = 16
MAX_TILE_ROWS = 128
MAX_SPLITS = 64


@triton.jit
def _mma(a, b):
    if INTERPRET:
        # The interpreter multiplies BF16 operands as raw integers: use their exact values
        # (``to_f32``: subnormals too), in FP64 (products of BF16 values are exact there and,
        # short of extreme exponent spreads, so are the sums), so that the two product forms'
        # sums agree as they do on a GPU.
        return tl.dot(to_f32(a).to(tl.float64), to_f32(b).to(tl.float64), input_precision="ieee").to(tl.float32)
    else:
        return tl.dot(a, b)


def _prune_scores(configs, nargs, **kw):
    rows = kw["QROWS"] * kw["HEADS_P"]
    return [c for c in configs if rows * c.kwargs["BLOCK_N"] <= 16384] or configs[:1]


# The keys-as-A form only (see the module doc); every config gives the same scores (tested).
SCORE_CONFIGS = [triton.Config({"BLOCK_N": n, "TILES": t, "KEYS_AS_A": True}, num_warps=w, num_stages=s)
                 for n, t, w, s in
                 ((64, 1, 4, 2), (64, 4, 4, 3), (128, 1, 4, 3), (128, 1, 8, 3), (128, 4, 4, 3), (128, 4, 8, 4),
                  (128, 8, 8, 4), (64, 8, 4, 4), (256, 2, 8, 3))]


@autotune(
    configs=SCORE_CONFIGS,
    key=["HEADS_P", "QROWS", "KEYS_BUCKET", "KEYS_FP4", "BLOCKS_BUCKET"],
    name="indexer_scores",
    prune_configs_by={"early_config_prune": _prune_scores},
)
@triton.jit
def _scores_kernel(qi_ptr, w_ptr, keys_ptr, nv_ptr, scores_ptr, seq, heads, n_keys, KEYS_BUCKET, BLOCKS_BUCKET,
                   s_qb, s_qs, s_qh, s_wb, s_ws, s_wh, s_kb, s_kn, s_nb, s_ns,
                   KEYS_FP4: tl.constexpr, HEADS_P: tl.constexpr, HEAD_BITS: tl.constexpr, QROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, PADDED: tl.constexpr, TILES: tl.constexpr, KEYS_AS_A: tl.constexpr):
    """Program (key tiles, query block, batch): the scores of ``QROWS`` queries (``HEADS_P =
    2^HEAD_BITS`` rows each).  ``KEYS_AS_A`` picks the product's form: logits^T = keys @ q^T,
    the key tile the MMA's A operand (registers: FP4 keys are decoded straight into its fragment
    layout; the tuned form), or logits = q @ keys^T, the key tile its B operand (through shared
    memory; benchmarks only, see the module doc).  ``PADDED``: some of the ``QROWS * HEADS_P`` rows are padding (heads not a
    power of two, or past the last query)."""
    M: tl.constexpr = QROWS * HEADS_P
    pid_n = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    t0 = tl.program_id(1) * QROWS
    m = tl.arange(0, M)
    t = t0 + m // HEADS_P
    h = m % HEADS_P
    q_ok = (t < seq) & (h < heads)
    dcol = tl.arange(0, HEAD_DIM)
    q_rows = qi_ptr + b * s_qb + t.to(tl.int64) * s_qs + h * s_qh
    if KEYS_AS_A:
        q = tl.load(q_rows[None, :] + dcol[:, None], mask=q_ok[None, :], other=0.0)
    else:
        q = tl.load(q_rows[:, None] + dcol[None, :], mask=q_ok[:, None], other=0.0)
    wv = tl.load(w_ptr + b * s_wb + t.to(tl.int64) * s_ws + h * s_wh, mask=q_ok, other=0.0)
    tq = t0 + tl.arange(0, QROWS)
    nv = tl.load(nv_ptr + b * s_nb + tq.to(tl.int64) * s_ns, mask=tq < seq, other=0)
    nv = tl.minimum(tl.maximum(nv, 0), n_keys)
    keys_end = tl.max(nv, axis=0)
    row_base = (b * seq + tq) * n_keys
    for tile in range(TILES):
        start = (pid_n * TILES + tile) * BLOCK_N
        if start < keys_end:
            kidx = start + tl.arange(0, BLOCK_N)
            key_row = keys_ptr + b * s_kb + kidx.to(tl.int64)[:, None] * s_kn
            key_ok = (kidx < keys_end)[:, None]
            if KEYS_FP4 and KEYS_AS_A:
                kt = _fp4_key_tile_a(key_row, key_ok, BLOCK_N)
            elif KEYS_FP4:
                kt = _fp4_key_tile(key_row, key_ok, BLOCK_N)
            else:
                kt = tl.load(key_row + dcol[None, :], mask=key_ok, other=0.0)
            if KEYS_AS_A:
                part = _weigh(_mma(kt, q), wv[None, :], q_ok[None, :], PADDED)
                score = _sum_heads(tl.reshape(part, [BLOCK_N, QROWS, HEADS_P]), 2, HEAD_BITS)
                tl.store(scores_ptr + row_base[None, :] + kidx[:, None], score, mask=kidx[:, None] < nv[None, :])
            else:
                part = _weigh(_mma(q, tl.trans(kt)), wv[:, None], q_ok[:, None], PADDED)
                score = _sum_heads(tl.reshape(part, [QROWS, HEADS_P, BLOCK_N]), 1, HEAD_BITS)
                tl.store(scores_ptr + row_base[:, None] + kidx[None, :], score, mask=kidx[None, :] < nv[:, None])


@triton.jit
def _weigh(logits, wv, q_ok, PADDED: tl.constexpr):
    """relu(logits) * w, the relu keeping NaN (as torch's); padding rows (zero q and w) are
    masked so that Inf or NaN keys make nothing there."""
    part = tl.maximum(logits, 0.0, propagate_nan=tl.PropagateNan.ALL) * wv
    if PADDED:
        part = tl.where(q_ok, part, 0.0)
    return part


@triton.jit
def _sum_pairs(part, D: tl.constexpr, AXIS: tl.constexpr):
    """Halve axis ``AXIS`` (1 or 2 of a 3-D tensor) by adding the elements ``D`` apart in
    blocks of ``2 D`` (index bit log2(D) summed out)."""
    if AXIS == 2:
        A: tl.constexpr = part.shape[0]
        Q: tl.constexpr = part.shape[1]
        H: tl.constexpr = part.shape[2]
        return tl.reshape(tl.sum(tl.reshape(part, [A, Q, H // (2 * D), 2, D]), axis=3), [A, Q, H // 2])
    else:
        Q: tl.constexpr = part.shape[0]
        H: tl.constexpr = part.shape[1]
        B: tl.constexpr = part.shape[2]
        return tl.reshape(tl.sum(tl.reshape(part, [Q, H // (2 * D), 2, D, B]), axis=2), [Q, H // 2, B])


@triton.jit
def _sum_heads(part, AXIS: tl.constexpr, BITS: tl.constexpr):
    """Sum over the heads axis ``AXIS`` (1 or 2, 2^BITS long) in a fixed pairwise tree,
    so the FP32 result does not depend on how the heads are spread over registers, lanes and
    warps (each step adds exactly two numbers): every tile shape of a form gives the same scores.  The
    head-index bits are summed out in the order 0, 3, 4, 5, 1, 2: in the keys-as-A form bits 0
    and 3.. are in one thread's registers and 1, 2 across a quad's lanes, so the shuffles come
    last, on two values a thread."""
    if BITS >= 1:
        part = _sum_pairs(part, 1, AXIS)
    for _ in tl.static_range(BITS - 3 if BITS > 3 else 0):
        part = _sum_pairs(part, 4, AXIS)
    for _ in tl.static_range((BITS if BITS < 3 else 3) - 1):
        part = _sum_pairs(part, 1, AXIS)
    if AXIS == 2:
        return tl.reshape(part, [part.shape[0], part.shape[1]])
    else:
        return tl.reshape(part, [part.shape[0], part.shape[2]])


@triton.jit
def _shift_left(x, S: tl.constexpr):
    """``x << S``; a right shift for negative ``S`` (the callers mask the sign-filled bits off)."""
    if S >= 0:
        return x << S
    else:
        return x >> (-S)


@triton.jit
def _e2m1_times_2_126(word, NIBBLE: tl.constexpr):
    """FP32 of nibble ``NIBBLE`` of each 32-bit word, as its E2M1 value times 2^-126: the bits
    (c & 7) << 22 | (c & 8) << 28 put e and m in the exponent's low bits and the mantissa's top
    bit (codes 0 and 1 become the subnormals 0 and 2^-127), the sign on top."""
    bits = (_shift_left(word, 22 - 4 * NIBBLE) & 0x01C00000) | (_shift_left(word, 28 - 4 * NIBBLE) & INT32_MIN)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fp4_key_tile(key_row, key_ok, BLOCK_N: tl.constexpr):
    """BF16 ``[BLOCK_N, 128]`` values of FP4 key rows (64 code bytes, then 4 E8M0 scales).

    Codes are read as 32-bit words (8 per word, element 8j + i in nibble i of word j; the
    launcher makes rows 4-byte aligned).  Per element: 3 integer ops (2 shifts, 1 LOP3) for
    the value times 2^-126, one exact multiply by 2^126, one by the block's scale."""
    NBLK: tl.constexpr = HEAD_DIM // FP4_BLOCK
    WORDS: tl.constexpr = FP4_BLOCK // 8  # code words per scale block
    row = key_row[:, :, None]
    ok = key_ok[:, :, None]
    blk = tl.arange(0, NBLK)[None, :, None]
    word = tl.load(row.to(tl.pointer_type(tl.int32)) + blk * WORDS + tl.arange(0, WORDS)[None, None, :],
                   mask=ok, other=0)
    scale = e8m0_value(tl.load(row + HEAD_DIM // 2 + blk, mask=ok, other=127))
    # Two multiplies, not one by scale * 2^126: that product overflows FP32 for scales > 4.
    v0 = _e2m1_times_2_126(word, 0) * TWO_POW_126 * scale
    v1 = _e2m1_times_2_126(word, 1) * TWO_POW_126 * scale
    v2 = _e2m1_times_2_126(word, 2) * TWO_POW_126 * scale
    v3 = _e2m1_times_2_126(word, 3) * TWO_POW_126 * scale
    v4 = _e2m1_times_2_126(word, 4) * TWO_POW_126 * scale
    v5 = _e2m1_times_2_126(word, 5) * TWO_POW_126 * scale
    v6 = _e2m1_times_2_126(word, 6) * TWO_POW_126 * scale
    v7 = _e2m1_times_2_126(word, 7) * TWO_POW_126 * scale
    # A join's new axis is the last: the outermost join picks the lowest bit of the element index.
    values = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return cast_rne(tl.reshape(values, [BLOCK_N, HEAD_DIM]), tl.bfloat16)


# E2M1 codes to BF16 for the A operand, on a GPU: one asm block per pair of elements (a code
# byte; element 2i in the low nibble).  The byte is picked from its code word (prmt); two
# multiplies spread its two codes into the BF16 bits of their values times 2^-126 (the same
# trick as ``_e2m1_times_2_126``, one BF16 per half: magnitude bits at 6..8 and 22..24, signs
# at 15 and 31; codes 0 and 1 become 0 and the subnormal 2^-127); two packed BF16 multiplies,
# by 2^126 and by the block scale, are exact (a value of at most two significant bits times
# a power of two; products past the range are Inf and NaN scales NaN, as in FP32).
_E2M1_PAIR_ASM: tl.constexpr = tl.constexpr("""
{
.reg .b32 x, a, b, k;
prmt.b32 x, $2, 0, $3;
mul.lo.u32 a, x, 0x40040;
mul.lo.u32 b, x, 0x1001000;
and.b32 a, a, 0x01C001C0;
and.b32 b, b, 0x80008000;
or.b32 a, a, b;
mov.b32 k, 0x7E807E80;
mul.rn.bf16x2 a, a, k;
mul.rn.bf16x2 a, a, $4;
mov.b32 {$0, $1}, a;
}
""")


@triton.jit
def _fp4_key_tile_a(key_row, key_ok, BLOCK_N: tl.constexpr):
    """``_fp4_key_tile`` made in the MMA's A-operand register layout: element k = 8m + 2c + j
    (code word m, byte c, nibble j) is built in a [BLOCK_N, 16, 4, 2] tensor whose c axis runs
    over the four lanes of a quad and whose j pairs share a register, as the A operand's
    fragment holds them; each lane reads the row's 16 code words and decodes its byte of each.
    The decoded tile never goes through shared memory."""
    NBLK: tl.constexpr = HEAD_DIM // FP4_BLOCK
    WORDS: tl.constexpr = HEAD_DIM // 8
    words = tl.load(key_row.to(tl.pointer_type(tl.int32)) + tl.arange(0, WORDS)[None, :], mask=key_ok, other=0)
    # The 4 E8M0 bytes as one word (byte 64 of a 4-byte aligned row), one scale per block.
    scale_word = tl.load(key_row.to(tl.pointer_type(tl.int32)) + HEAD_DIM // 8, mask=key_ok, other=0x7F7F7F7F)
    scale_byte = (scale_word >> (8 * tl.arange(0, NBLK)[None, :])) & 0xFF
    c = tl.arange(0, 4)[None, None, :]
    if INTERPRET:
        scale = _per_word(e8m0_value(scale_byte), BLOCK_N)[:, :, None]
        byte = (words[:, :, None] >> (8 * c)) & 0xFF
        lo = _e2m1_times_2_126(byte, 0) * TWO_POW_126 * scale
        hi = _e2m1_times_2_126(byte, 1) * TWO_POW_126 * scale
        pairs = cast_rne(tl.join(lo, hi), tl.bfloat16)
    else:
        scale_bits = tl.where(scale_byte == 0, 0x40, tl.where(scale_byte == 255, 0x7FC0, scale_byte << 7))
        scale_pair = _per_word(scale_bits | (scale_bits << 16), BLOCK_N)[:, :, None]
        shape: tl.constexpr = [BLOCK_N, WORDS, 4]
        lo, hi = tl.inline_asm_elementwise(
            _E2M1_PAIR_ASM, "=h,=h,r,r,r",
            [tl.broadcast_to(words[:, :, None], shape), tl.broadcast_to(0x4440 + c, shape),
             tl.broadcast_to(scale_pair, shape)],
            dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        pairs = tl.join(lo, hi)
    return tl.reshape(pairs, [BLOCK_N, HEAD_DIM])


@triton.jit
def _per_word(per_block, BLOCK_N: tl.constexpr):
    """[BLOCK_N, 4] per scale block -> [BLOCK_N, 16] per code word (4 words a block)."""
    return tl.reshape(tl.broadcast_to(per_block[:, :, None], [BLOCK_N, 4, 4]), [BLOCK_N, 16])


@triton.jit
def _order_key(v):
    """FP32 -> int32 with the same order: NaN (any sign) above +Inf, -0.0 equal to +0.0."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(v != v, 0x7FFFFFFF, key)


@triton.jit
def _segment_keys(val_ptr, idx_ptr, offs, n, HAS_IDX: tl.constexpr):
    """Keys, values and validity of segment elements ``offs`` (candidates with index -1 are padding)."""
    ok = offs < n
    if HAS_IDX:
        ok = ok & (tl.load(idx_ptr + offs, mask=ok, other=-1) >= 0)
    v = tl.load(val_ptr + offs, mask=ok, other=0.0)
    return _order_key(v), v, ok


@triton.jit
def _level_histogram(val_ptr, idx_ptr, n, prefix, LEVEL: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of radix digit ``LEVEL`` (0 = the top byte, taken signed) over the elements
    whose higher digits equal ``prefix``."""
    hist = tl.zeros([RADIX_BINS], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        key, v, ok = _segment_keys(val_ptr, idx_ptr, start + tl.arange(0, BLOCK), n, HAS_IDX)
        hist += _digit_histogram(key, ok, prefix, LEVEL)
    return hist


@triton.jit
def _digit_histogram(key, ok, prefix, LEVEL: tl.constexpr):
    """Histogram of radix digit ``LEVEL`` of the keys where ``ok`` whose higher digits equal
    ``prefix``."""
    DIGIT_SHIFT: tl.constexpr = 32 - RADIX_BITS * (LEVEL + 1)
    if LEVEL == 0:
        digit = (key >> DIGIT_SHIFT) + RADIX_BINS // 2  # arithmetic shift: signed top digit
        match = ok
    else:
        digit = (key >> DIGIT_SHIFT) & (RADIX_BINS - 1)
        match = ok & ((key >> (DIGIT_SHIFT + RADIX_BITS)) == prefix)
    return tl.histogram(digit, RADIX_BINS, mask=match)


# Below a level's first, a block's matching keys (those in the digit picked above) are few or
# all tied in one digit, as a rule: more than this many in several digits take the histogram.
SPARSE_MATCHES: tl.constexpr = tl.constexpr(16)


@triton.jit
def _digit_sums(digit, match):
    """(n, sum d, whether all n share one digit) over the matching keys of a block of at most
    1024: one int64 sum of n (11 bits) << 45 | sum(d) (18 bits) << 27 | sum(d^2) (27 bits),
    per key d < 256; all in one digit when n * sum(d^2) == sum(d)^2."""
    tl.static_assert(digit.shape[0] <= 1024)  # the packed sums' field widths
    wide = digit.to(tl.int64)
    sums = tl.sum(tl.where(match, (1 << 45) | (wide << 27) | (wide * wide), 0), axis=0)
    n = sums >> 45
    digit_sum = (sums >> 27) & 0x3FFFF
    return n, digit_sum, n * (sums & 0x7FFFFFF) == digit_sum * digit_sum


@triton.jit
def _add_digit_counts(hist_ptr, key, ok, prefix, LEVEL: tl.constexpr):
    """Add the counts of ``_digit_histogram`` of one block (at most 1024 keys) to a row's
    level histogram at ``hist_ptr`` by integer atomics.  Level 0 counts every key: the
    histogram.  Below it (triton 3.6 lowers ``tl.histogram`` to ~600 instructions a thread
    at 8 keys a thread, whatever the mask) one sum first gives the number of matching keys
    and the sums of their digits and squared digits: none, nothing to add; all in one digit
    (n * sum(d^2) == sum(d)^2), one atomic of n; at most ``SPARSE_MATCHES``, one atomic a
    key; more, the histogram."""
    bins = tl.arange(0, RADIX_BINS)
    if LEVEL == 0:
        hist = _digit_histogram(key, ok, prefix, LEVEL)
        tl.atomic_add(hist_ptr + bins, hist, mask=hist > 0, sem="relaxed")
    else:
        DIGIT_SHIFT: tl.constexpr = 32 - RADIX_BITS * (LEVEL + 1)
        digit = (key >> DIGIT_SHIFT) & (RADIX_BINS - 1)
        match = ok & ((key >> (DIGIT_SHIFT + RADIX_BITS)) == prefix)
        n, digit_sum, one_digit = _digit_sums(digit, match)
        if one_digit:
            one = bins == tl.where(n > 0, digit_sum // tl.maximum(n, 1), -1)  # no bin when n = 0
            tl.atomic_add(hist_ptr + bins, tl.full([RADIX_BINS], 1, tl.int32) * n.to(tl.int32), mask=one,
                          sem="relaxed")
        elif n <= SPARSE_MATCHES:
            tl.atomic_add(hist_ptr + digit, tl.full(digit.shape, 1, tl.int32), mask=match, sem="relaxed")
        else:
            hist = tl.histogram(digit, RADIX_BINS, mask=match)
            tl.atomic_add(hist_ptr + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _pick_bin(hist, remaining, BINS: tl.constexpr):
    """The bin (of ``BINS``) holding the ``remaining``-th largest element, how many are still
    needed from it, and how many it holds."""
    bins = tl.arange(0, BINS)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    digit = tl.max(tl.where(at_or_above >= remaining, bins, 0), axis=0)
    above = tl.sum(tl.where(bins > digit, hist, 0), axis=0)
    count = tl.sum(tl.where(bins == digit, hist, 0), axis=0)
    return digit, remaining - above, count


@triton.jit
def _refine(val_ptr, idx_ptr, n, prefix, remaining, done, LEVEL: tl.constexpr, HAS_IDX: tl.constexpr,
            BLOCK: tl.constexpr):
    """One radix level below ``prefix`` (skipped, state kept, once ``done``)."""
    hist = _level_histogram(val_ptr, idx_ptr, tl.where(done, 0, n), prefix, LEVEL, HAS_IDX, BLOCK)
    digit, rest, count = _pick_bin(hist, remaining, RADIX_BINS)
    # Done when the whole digit is taken: no lower level can split it.
    return (tl.where(done, prefix, prefix * RADIX_BINS + digit), tl.where(done, remaining, rest),
            done | (count == rest))


@triton.jit
def _select_segment(val_ptr, idx_ptr, n, k, first_index, out_idx_ptr, out_val_ptr,
                    HAS_IDX: tl.constexpr, WRITE_VALS: tl.constexpr, BLOCK: tl.constexpr):
    """Top ``min(k, valid)`` of a segment of ``n`` scores, in segment order, then -1 up to ``k``.

    Indices are ``first_index + position`` or, with ``HAS_IDX``, loaded (-1 = padding).
    The threshold key is found one byte at a time (4 levels of 256 bins: ``tl.histogram``
    lowers to a ballot per digit bit and a popcount per 32 bins for every 32 elements, so a
    byte needs 8 popcounts where 11 bits needed 64); the levels stop as soon as the digit
    holding the k-th largest is taken whole.
    """
    # Level 0 is skipped when the segment has at most k elements (all are taken); the
    # lower levels also when the valid elements (padding excluded) are at most k.
    h0 = _level_histogram(val_ptr, idx_ptr, tl.where(n > k, n, 0), 0, 0, HAS_IDX, BLOCK)
    take_all = tl.sum(h0, axis=0) <= k
    d0, remaining, count = _pick_bin(h0, k, RADIX_BINS)
    prefix = d0 - RADIX_BINS // 2
    done = take_all | (count == remaining)
    prefix, remaining, done1 = _refine(val_ptr, idx_ptr, n, prefix, remaining, done, 1, HAS_IDX, BLOCK)
    prefix, remaining, done2 = _refine(val_ptr, idx_ptr, n, prefix, remaining, done1, 2, HAS_IDX, BLOCK)
    prefix, remaining, done3 = _refine(val_ptr, idx_ptr, n, prefix, remaining, done2, 3, HAS_IDX, BLOCK)
    # ``prefix`` holds the digits of the levels run: shift it up to a full key.  Stopped
    # early, every key of that digit is taken: threshold = its lowest key - 1, no ties.
    # Every key is > INT32_MIN (that bit pattern is a NaN, mapped to the top), so
    # INT32_MIN with no ties takes every valid element.
    # (Shifts, not products: every branch of a where is evaluated, and may wrap.)
    lowest = tl.where(done, prefix << 24, tl.where(done1, prefix << 16, tl.where(done2, prefix << 8, prefix)))
    threshold = tl.where(take_all, INT32_MIN, tl.where(done2, tl.maximum(lowest, INT32_MIN + 1) - 1, lowest))
    ties = tl.where(done2, 0, remaining)

    none = tl.zeros_like(ties)  # a tensor: literal 0 would reach _compact's loop as a constant
    taken = _compact(val_ptr, idx_ptr, n, first_index, threshold, ties, none, none, out_idx_ptr, out_val_ptr,
                     HAS_IDX, WRITE_VALS, BLOCK)
    _pad(out_idx_ptr, taken, k, BLOCK)


@triton.jit
def _compact(val_ptr, idx_ptr, n, first_index, threshold, ties, taken, ties_seen, out_idx_ptr, out_val_ptr,
             HAS_IDX: tl.constexpr, WRITE_VALS: tl.constexpr, BLOCK: tl.constexpr):
    """Write, in order, the elements above ``threshold`` and the ties ranked ``<= ties``
    (``ties_seen`` of them came before), from output position ``taken``; returns the new count."""
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key, v, ok = _segment_keys(val_ptr, idx_ptr, offs, n, HAS_IDX)
        if HAS_IDX:
            idx = tl.load(idx_ptr + offs, mask=ok, other=-1)
        else:
            idx = first_index + offs
        taken, ties_seen = _compact_block(key, v, ok, idx, threshold, ties, taken, ties_seen, out_idx_ptr,
                                          out_val_ptr, WRITE_VALS)
    return taken


@triton.jit
def _compact_block(key, v, ok, idx, threshold, ties, taken, ties_seen, out_idx_ptr, out_val_ptr,
                   WRITE_VALS: tl.constexpr):
    """``_compact`` of one block of keys held in registers -> (taken, ties_seen) after it."""
    tie = ok & (key == threshold)
    tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0)
    take = (ok & (key > threshold)) | (tie & (tie_rank <= ties))
    pos = taken + tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_idx_ptr + pos, idx, mask=take)
    if WRITE_VALS:
        tl.store(out_val_ptr + pos, v, mask=take)
    return taken + tl.sum(take.to(tl.int32), axis=0), ties_seen + tl.sum(tie.to(tl.int32), axis=0)


@triton.jit
def _pad(out_idx_ptr, taken, k, BLOCK: tl.constexpr):
    """-1 in output positions ``[taken, k)``."""
    for start in range(taken, k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(out_idx_ptr + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < k)


_SELECT_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in
                   ((1024, 4), (1024, 8), (2048, 8), (4096, 8), (4096, 16), (8192, 16))]


@autotune(configs=_SELECT_CONFIGS, key=["N_BUCKET", "K_BUCKET"], name="indexer_select")
@triton.jit
def _select_kernel(scores_ptr, nv_ptr, out_idx_ptr, out_val_ptr, seq, n_keys, k, chunk, N_BUCKET, K_BUCKET,
                   s_nb, s_ns, WRITE_VALS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): top-k of the row's scores ``[split * chunk, ...)`` below ``n_valid``."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = row // seq
    nv = tl.load(nv_ptr + b * s_nb + (row - b * seq) * s_ns)
    nv = tl.minimum(tl.maximum(nv, 0), n_keys)
    first = split * chunk
    n = tl.maximum(tl.minimum(first + chunk, nv) - first, 0)
    out = (row * tl.num_programs(1) + split) * k
    _select_segment(scores_ptr + row * n_keys + first, out_idx_ptr, n, k, first, out_idx_ptr + out,
                    out_val_ptr + out, False, WRITE_VALS, BLOCK)


@autotune(configs=_SELECT_CONFIGS, key=["N_BUCKET", "K_BUCKET"], name="indexer_merge")
@triton.jit
def _merge_kernel(cand_val_ptr, cand_idx_ptr, out_ptr, k, n_cand, N_BUCKET, K_BUCKET, BLOCK: tl.constexpr):
    """Program (row): top-k among the row's segment candidates (ascending index order kept)."""
    row = tl.program_id(0).to(tl.int64)
    _select_segment(cand_val_ptr + row * n_cand, cand_idx_ptr + row * n_cand, n_cand, k, 0, out_ptr + row * k,
                    out_ptr, True, False, BLOCK)


# --- Row-parallel selection (few long rows) -----------------------------------------------
# After the scoring launch each row is cut into ``parts`` chunks, one program each, in every
# launch: the radix levels of ``_select_segment``, but a level's histogram is the sum of the
# chunks' (integer atomics: exact in any order), kept in the row's workspace.  Every program
# of the next launch loads that complete histogram beside its chunk's scores and makes the
# level's pick itself (one 256-bin pick: ~0.15 us), from the state after the level before,
# which program 0 of the previous launch stored; its own program 0 stores the state after
# this pick for the launch after.  No program waits for the others to arrive: a last-arrival
# pick cost each level launch ~1.4 us on the H100 (an acq_rel arrival, then the histogram's
# load and the pick on one program), the replayed pick ~0.15 us.
#
# The write launch needs, for each chunk, how many keys above the threshold and how many
# tied with it the chunks before it hold.  The last level launch, which knows everything
# but the last digit, stores per chunk the count of keys above the prefix (or above the
# threshold itself, when the row is done before the last digit) and, for every last digit d,
# the count of the prefix's keys with last digit d or more; each write program makes the last
# pick and sums the counts of the chunks before it at its digit, then writes its selection at
# that offset (ascending index order, ties to the lowest indices as in one program).  No
# program waits on another: the counts published by the write programs themselves and
# polled by the later ones cost 2.4 of the write launch's 6.6 us on the H100.
#
# Workspace invariant (per row): the histograms of levels 0, 1 and 2 are zero when a call
# starts.  Each histogram is zeroed by program 0 of a launch after the last one that reads
# it (level 0's by the level-2 launch, 1's by level 3's, 2's by the write launch), level 3's
# (read by every write program) by the next call's level-0 launch, before the level-3 launch
# adds to it.  Allocated zeroed.  The state slots and the per-chunk counts are written before
# they are read in every call.  One workspace per stream: calls on one stream run in order,
# so they never overlap on it.

ROW_PARALLEL_BLOCK = 1024
ROW_PARALLEL_WARPS = 4
MAX_PARTS: tl.constexpr = tl.constexpr(1024)
# Level 1's histogram is kept in HIST_COPIES copies, chunk p adding into copy p % HIST_COPIES:
# all chunks adding into one copy serialised on the same L2 addresses (level 1 of the
# benchmark's tied scores: 6.0 us, with 8 copies 3.8, with no atomics at all 3.6).  Its
# readers load and sum every copy (8 KB, in the round trip they make anyway).  The other
# levels keep one: level 0's keys fall in a few top bytes, but copies did not make it faster
# (2.9 us either way), and levels 2 and 3 count only the keys of a 16-bit prefix, too few to
# contend; loading 8 copies cost a pick ~0.4 us.
HIST_COPIES: tl.constexpr = tl.constexpr(8)
COPIED_LEVEL: tl.constexpr = tl.constexpr(1)
LEVEL_WORDS: tl.constexpr = tl.constexpr(HIST_COPIES * RADIX_BINS)
ROW_HIST: tl.constexpr = tl.constexpr(RADIX_LEVELS * LEVEL_WORDS)  # a row's histograms
# Then, per level, the state after its pick: prefix, remaining, done, lowest key of the
# prefix, take_all.
STATE: tl.constexpr = tl.constexpr(ROW_HIST)
STATE_WORDS: tl.constexpr = tl.constexpr(8)
ROW_WORDS = ROW_HIST.value + RADIX_LEVELS.value * STATE_WORDS.value
# Per row and chunk, written by the last level launch: the count above the prefix, then the
# counts at or above each last digit 0..256 (the last all zero).
OFFSET_ROWS: tl.constexpr = tl.constexpr(RADIX_BINS + 2)


@triton.jit
def _level_pick(row_ws, k, LEVEL: tl.constexpr, COPIES: tl.constexpr):
    """The row's state after level ``LEVEL``'s pick (as ``_select_segment`` makes it), from
    that level's complete histogram and the state stored after the level before: (prefix,
    remaining, done, lowest key of the prefix, take_all, threshold key, ties).  The last two
    only after the last level (0 before): stopped before it, every key of the digit is taken
    (threshold its lowest key - 1, no ties); INT32_MIN, no ties, takes all."""
    bins = tl.arange(0, RADIX_BINS)
    copies = tl.arange(0, COPIES if LEVEL == COPIED_LEVEL else 1)
    hist = tl.sum(tl.load(row_ws + LEVEL * LEVEL_WORDS + copies[:, None] * RADIX_BINS + bins[None, :]), axis=0)
    threshold = 0
    ties = 0
    if LEVEL == 0:
        take_all = tl.sum(hist, axis=0) <= k
        d0, remaining, count = _pick_bin(hist, k, RADIX_BINS)
        prefix = d0 - RADIX_BINS // 2
        done = take_all | (count == remaining)
        lowest = prefix << 24
    else:
        before = row_ws + STATE + (LEVEL - 1) * STATE_WORDS
        prefix = tl.load(before)
        remaining = tl.load(before + 1)
        was_done = tl.load(before + 2) != 0
        lowest = tl.load(before + 3)
        take_all = tl.load(before + 4) != 0
        digit, rest, count = _pick_bin(hist, remaining, RADIX_BINS)
        prefix = tl.where(was_done, prefix, prefix * RADIX_BINS + digit)
        remaining = tl.where(was_done, remaining, rest)
        done = was_done | (count == rest)
        lowest = tl.where(was_done, lowest, prefix << (24 - RADIX_BITS * LEVEL))
        if LEVEL == RADIX_LEVELS - 1:
            threshold = tl.where(take_all, INT32_MIN,
                                 tl.where(was_done, tl.maximum(lowest, INT32_MIN + 1) - 1, prefix))
            ties = tl.where(was_done, 0, remaining)
    return prefix, remaining, done, lowest, take_all, threshold, ties


@triton.jit
def _store_state(row_ws, prefix, remaining, done, lowest, take_all, LEVEL: tl.constexpr):
    after = row_ws + STATE + LEVEL * STATE_WORDS
    tl.store(after, prefix)
    tl.store(after + 1, remaining)
    tl.store(after + 2, done.to(tl.int32))
    tl.store(after + 3, lowest)
    tl.store(after + 4, take_all.to(tl.int32))


@triton.jit
def _zero_histogram(row_ws, LEVEL: tl.constexpr):
    tl.store(row_ws + LEVEL * LEVEL_WORDS + tl.arange(0, LEVEL_WORDS), tl.zeros([LEVEL_WORDS], dtype=tl.int32))


@triton.jit
def _row_chunk(nv_ptr, seq, n_keys, chunk, s_nb, s_ns):
    """(row, first index, span, valid) of this program's chunk: ``span`` scores of the row
    from ``first`` on (inside the row whatever n_valid is), the first ``valid`` of them below
    n_valid.  The chunk's loads are bounded by ``span`` and only masked by ``valid`` after
    they are issued, so they do not wait for n_valid's load (one round trip less per launch;
    scores past n_valid are unwritten but inside the tensor, and never counted)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    nv = tl.load(nv_ptr + b * s_nb + (row - b * seq) * s_ns)
    nv = tl.minimum(tl.maximum(nv, 0), n_keys)
    first = tl.program_id(1) * chunk
    span = tl.maximum(tl.minimum(first + chunk, n_keys) - first, 0)
    return row, first, span, tl.maximum(tl.minimum(first + chunk, nv) - first, 0)


@triton.jit
def _chunk_scores(vals, offs, span):
    """Chunk elements ``offs`` (see ``_row_chunk``)."""
    return tl.load(vals + offs, mask=offs < span, other=0.0)


@triton.jit
def _chunk_keys(vals, offs, span, valid):
    """Keys and validity of chunk elements ``offs`` (see ``_row_chunk``)."""
    return _order_key(_chunk_scores(vals, offs, span)), offs < valid


@triton.jit
def _last_level_counts(hist_ptr, key, ok, prefix):
    """``_add_digit_counts`` of the last level, which also returns the chunk's counts of each
    digit and above (``S[d]``: matching keys whose last digit is ``d`` or more), for the write
    launch's offsets.  The none and one-digit paths, else the histogram (the offsets need
    every digit's count, so no atomic-a-key path)."""
    bins = tl.arange(0, RADIX_BINS)
    digit = key & (RADIX_BINS - 1)
    match = ok & ((key >> RADIX_BITS) == prefix)
    n, digit_sum, one_digit = _digit_sums(digit, match)
    if one_digit:  # none, or all in one digit
        one = tl.where(n > 0, digit_sum // tl.maximum(n, 1), -1)
        tl.atomic_add(hist_ptr + bins, tl.full([RADIX_BINS], 1, tl.int32) * n.to(tl.int32), mask=bins == one,
                      sem="relaxed")
        at_or_above = tl.where(bins <= one, n.to(tl.int32), 0)
    else:
        hist = tl.histogram(digit, RADIX_BINS, mask=match)
        tl.atomic_add(hist_ptr + bins, hist, mask=hist > 0, sem="relaxed")
        at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    return at_or_above


@triton.jit
def _above_last_prefix(prefix, done, lowest, take_all):
    """The key every key above which the write launch takes whatever the last digit: the
    threshold itself when the row is done before the last level (see ``_level_pick``), else
    the highest key of the prefix."""
    return tl.where(take_all, INT32_MIN,
                    tl.where(done, tl.maximum(lowest, INT32_MIN + 1) - 1, (prefix << RADIX_BITS) | (RADIX_BINS - 1)))


@triton.jit
def _row_level_kernel(scores_ptr, nv_ptr, zeroed_ptr, offsets_ptr, seq, n_keys, k, chunk, s_zero, s_offsets,
                      s_nb, s_ns, LEVEL: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                      COPIES: tl.constexpr):
    """Program (row, part): the pick of level ``LEVEL - 1`` (see above), then add the chunk's
    level-``LEVEL`` histogram to the row's (into copy ``part % COPIES`` at level 1).  The last level also
    stores the chunk's counts the write launch's offsets are made of.  ``ONE_BLOCK``: chunks
    of at most ``BLOCK`` scores."""
    LAST: tl.constexpr = LEVEL == RADIX_LEVELS - 1
    row, first, span, n = _row_chunk(nv_ptr, seq, n_keys, chunk, s_nb, s_ns)
    part = tl.program_id(1)
    row_ws = zeroed_ptr + row * s_zero
    vals = scores_ptr + row * n_keys + first
    if ONE_BLOCK:  # straight-line code: the block's loads are issued before anything they wait on
        offs = tl.arange(0, BLOCK)
        v = _chunk_scores(vals, offs, span)
    if LEVEL == 0:
        prefix = 0
        counted = n
        if part == 0:
            _zero_histogram(row_ws, RADIX_LEVELS - 1)
    else:  # once the row is done, the chunk counts nothing (its loads still go out: no wait)
        prefix, remaining, done, lowest, take_all, _, _ = _level_pick(row_ws, k, LEVEL - 1, COPIES)
        counted = tl.where(done, 0, n)
        if part == 0:
            _store_state(row_ws, prefix, remaining, done, lowest, take_all, LEVEL - 1)
            if LEVEL >= 2:
                _zero_histogram(row_ws, LEVEL - 2)
    hist_copy = row_ws + LEVEL * LEVEL_WORDS + (part % (COPIES if LEVEL == COPIED_LEVEL else 1)) * RADIX_BINS
    if LAST:
        above_key = _above_last_prefix(prefix, done, lowest, take_all)
    if ONE_BLOCK:
        key = _order_key(v)
        if LAST:
            at_or_above = _last_level_counts(hist_copy, key, offs < counted, prefix)
            above = tl.sum(((offs < n) & (key > above_key)).to(tl.int32), axis=0)
        else:
            _add_digit_counts(hist_copy, key, offs < counted, prefix, LEVEL)
    else:
        hist = tl.zeros([RADIX_BINS], dtype=tl.int32)
        above = tl.zeros_like(n)
        for start in range(0, span, BLOCK):
            key, ok = _chunk_keys(vals, start + tl.arange(0, BLOCK), span, n)
            hist += _digit_histogram(key, ok & (start + tl.arange(0, BLOCK) < counted), prefix, LEVEL)
            if LAST:
                above += tl.sum((ok & (key > above_key)).to(tl.int32), axis=0)
        tl.atomic_add(hist_copy + tl.arange(0, RADIX_BINS), hist, mask=hist > 0, sem="relaxed")
        if LAST:
            at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    if LAST:
        # The chunk's OFFSET_ROWS words: its count above the prefix, then its counts at or
        # above each digit d = 0..256 (the last zero).  One contiguous run a chunk: stored
        # across the chunks, one word a digit, the stores cost the launch 1.2 us on the H100;
        # the write launch's gathers of a few words a chunk cost less.
        chunk_off = offsets_ptr + row * s_offsets + part * OFFSET_ROWS
        tl.store(chunk_off, above)
        tl.store(chunk_off + 1 + tl.arange(0, RADIX_BINS), at_or_above)
        tl.store(chunk_off + 1 + RADIX_BINS, tl.zeros_like(above))


@triton.jit
def _row_write_kernel(scores_ptr, nv_ptr, zeroed_ptr, offsets_ptr, out_ptr, seq, n_keys, k, chunk, s_zero, s_offsets,
                      s_nb, s_ns, PARTS_P: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                      COPIES: tl.constexpr):
    """Program (row, part): the last level's pick, then write the chunk's selection at its
    offset: the keys above the threshold and the ties taken in the chunks before it, summed
    from the counts the last level launch stored (no wait on other programs); the last part
    pads."""
    row, first, span, n = _row_chunk(nv_ptr, seq, n_keys, chunk, s_nb, s_ns)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    row_ws = zeroed_ptr + row * s_zero
    vals = scores_ptr + row * n_keys + first
    if ONE_BLOCK:  # the block stays in registers for the write (see _row_level_kernel)
        offs = tl.arange(0, BLOCK)
        v = _chunk_scores(vals, offs, span)
    prefix, _, _, _, _, threshold, ties = _level_pick(row_ws, k, RADIX_LEVELS - 1, COPIES)
    if part == 0:
        _zero_histogram(row_ws, RADIX_LEVELS - 2)
    # ties > 0: the row was not done before the last digit, which is then the prefix's last
    # byte; keys above the threshold are those above the prefix and those of its higher digits.
    digit = tl.where(ties > 0, prefix & (RADIX_BINS - 1), RADIX_BINS)
    p = tl.arange(0, PARTS_P)
    before = p < part
    chunk_off = offsets_ptr + row * s_offsets + p * OFFSET_ROWS
    above_prefix = tl.load(chunk_off, mask=before, other=0)
    at_or_above = tl.load(chunk_off + digit + 1, mask=before, other=0)
    higher = tl.load(chunk_off + tl.minimum(digit + 2, RADIX_BINS + 1), mask=before, other=0)
    above_before = tl.sum(above_prefix + higher, axis=0)
    ties_before = tl.sum(at_or_above - higher, axis=0)
    out_row = out_ptr + row * k
    taken = above_before + tl.minimum(ties_before, ties)
    if ONE_BLOCK:
        key = _order_key(v)
        taken, _ = _compact_block(key, key, offs < n, first + offs, threshold, ties, taken, ties_before, out_row,
                                  out_row, False)
    else:
        taken = _compact(vals, vals, n, first, threshold, ties, taken, ties_before, out_row, out_row, False, False,
                         BLOCK)
    if part == parts - 1:
        _pad(out_row, taken, k, BLOCK)


_workspaces: dict = {}


def _workspace(device: torch.device, rows: int, parts: int):
    """(zeroed, offsets) for the current stream of ``device``: ``zeroed`` int32
    ``[rows, ROW_WORDS]`` (the histograms, levels 0-2 zero between calls, see the invariant
    above; then the states), ``offsets`` int32, ``OFFSET_ROWS * parts`` a row (the last level
    launch's per-chunk counts, all written by it every call).  Grown to the largest call seen,
    never shrunk, so the decode hot path allocates nothing."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    zeroed, offsets = _workspaces.get(key, (None, None))
    if zeroed is None or zeroed.shape[0] < rows:
        zeroed = torch.zeros(rows, ROW_WORDS, dtype=torch.int32, device=device)
    if offsets is None or offsets.numel() < rows * OFFSET_ROWS.value * parts:
        offsets = torch.empty(rows * OFFSET_ROWS.value * parts, dtype=torch.int32, device=device)
    _workspaces[key] = (zeroed, offsets)
    return zeroed, offsets


def plan_splits(rows: int, n_keys: int, k: int, device: torch.device) -> int:
    """Segments per row: enough programs to fill the GPU, but a segment at least ~sqrt(Nk k)
    long, which balances the segment pass (Nk / splits) against the merge (splits * k)."""
    if n_keys <= 2 * k:
        return 1
    by_balance = int(math.sqrt(n_keys / k))
    by_occupancy = -(-2 * sm_count(device) // rows)
    return max(1, min(by_balance, by_occupancy, MAX_SPLITS))


def _aligned_keys(keys: torch.Tensor) -> torch.Tensor:
    """Keys with a unit last stride; FP4 rows also 4-byte aligned (read as 32-bit code words)."""
    misaligned = keys.dtype == torch.uint8 and (keys.data_ptr() % 4 or keys.stride(0) % 4 or keys.stride(1) % 4)
    if keys.stride(-1) != 1 or misaligned:
        return keys.clone(memory_format=torch.contiguous_format)
    return keys


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _query_rows(heads: int, seq: int) -> int:
    """Queries per scoring program: all heads of each, at least 16 rows, at most 128 when
    the sequence has that many queries to share a key tile."""
    heads_p = triton.next_power_of_2(heads)
    return max(MIN_DOT_ROWS // heads_p, min(triton.next_power_of_2(seq), max(1, MAX_TILE_ROWS // heads_p)))


def indexer_scores(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor, *,
                   config: "dict | None" = None) -> torch.Tensor:
    """The scoring pass alone: FP32 ``[B*S, Nk]``, row ``b*S + t`` holds query (b, t)'s scores of
    entries ``s < n_valid[b, t]`` (the rest of the row is not written).  ``config``: launch with
    these meta-parameters (``BLOCK_N``, ``TILES``, ``KEYS_AS_A``, ``num_warps``, ``num_stages``)
    instead of the tuned choice, to test or time one form."""
    bsz, seq, heads, _ = qi.shape
    n_keys = keys.shape[1]
    scores = torch.empty(bsz * seq, n_keys, dtype=torch.float32, device=qi.device)
    if scores.numel() == 0:
        return scores
    if qi.stride(-1) != 1:
        qi = qi.contiguous()
    keys = _aligned_keys(keys)
    qrows = _query_rows(heads, seq)
    heads_p = triton.next_power_of_2(heads)
    kernel = _scores_kernel if config is None else _scores_kernel.fn
    meta = config or {}
    grid = lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"] * meta["TILES"]), triton.cdiv(seq, qrows), bsz)
    # No FMA contraction: the head sums must round the same in both product forms.
    # The tuning key buckets the (sequence, query block) pairs too: at B = 1 the key tiles
    # alone fill the GPU, at B = 32 the same tile count is 32x the programs (measured at
    # Nk = 32768 FP4: the B = 32 choice took 10.0 us at B = 1, the best 4.2).
    blocks = bsz * triton.cdiv(seq, qrows)
    kernel[grid](qi, w, keys, n_valid, scores, seq, heads, n_keys, _bucket(n_keys), _bucket(min(blocks, 64)),
                 qi.stride(0), qi.stride(1), qi.stride(2), *w.stride(), keys.stride(0), keys.stride(1),
                 *n_valid.stride(), KEYS_FP4=keys.dtype == torch.uint8, HEADS_P=heads_p,
                 HEAD_BITS=heads_p.bit_length() - 1, QROWS=qrows, PADDED=heads != heads_p or seq % qrows != 0,
                 enable_fp_fusion=False, **meta)
    return scores


def output_and_scores(qi, w, keys, n_valid, k: int, scorer=indexer_scores):
    """The [B, S, k] index output and the FP32 scores [B*S, Nk] of ``scorer`` (this module's
    scoring pass, or another backend's with the same contract); scores is None when there is
    nothing to select (no rows: the empty output; no keys: every slot -1)."""
    bsz, seq = qi.shape[:2]
    out = torch.empty(bsz, seq, k, dtype=torch.int32, device=qi.device)
    if bsz * seq == 0:
        return out, None
    if keys.shape[1] == 0:
        return out.fill_(-1), None
    return out, scorer(qi, w, keys, n_valid)


def select_splits(scores: torch.Tensor, n_valid: torch.Tensor, out: torch.Tensor, seq: int, k: int,
                  splits: int) -> None:
    """The top-k of each score row into ``out`` by row segments: ``splits`` per row (1 = no merge launch)."""
    rows, n_keys = scores.shape
    splits = max(1, min(splits, triton.cdiv(n_keys, k)))
    chunk = triton.cdiv(n_keys, splits)
    if splits == 1:
        _select_kernel[(rows, 1)](scores, n_valid, out, out, seq, n_keys, k, chunk, _bucket(chunk), _bucket(k),
                                  *n_valid.stride(), WRITE_VALS=False)
        return
    cand_idx = torch.empty(rows, splits * k, dtype=torch.int32, device=scores.device)
    cand_val = torch.empty(rows, splits * k, dtype=torch.float32, device=scores.device)
    _select_kernel[(rows, splits)](scores, n_valid, cand_idx, cand_val, seq, n_keys, k, chunk, _bucket(chunk),
                                   _bucket(k), *n_valid.stride(), WRITE_VALS=True)
    _merge_kernel[(rows,)](cand_val, cand_idx, out, k, splits * k, _bucket(splits * k), _bucket(k))


def indexer_topk_splits(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                        k: int, splits: int) -> torch.Tensor:
    """``indexer_topk`` with an explicit number of segments per row (1 = no merge launch)."""
    out, scores = output_and_scores(qi, w, keys, n_valid, k)
    if scores is not None:
        select_splits(scores, n_valid, out, qi.shape[1], k, splits)
    return out


def plan_parts(rows: int, n_keys: int, k: int, device: torch.device) -> int:
    """Chunks per row for the row-parallel selection (0: rows are too many or too short for
    it).  Chunks of one block (the kernels' loops are not pipelined: a second block is a
    second round of load latency) up to about eight programs per SM in all (30 registers a
    thread: all resident at once): the five selection launches then cost a few microseconds
    each, where one program per row segment would run a whole segment's levels on one SM."""
    sms = sm_count(device)
    if rows >= sms or n_keys < 8 * k:
        return 0
    return max(2, min(triton.cdiv(n_keys, ROW_PARALLEL_BLOCK), triton.cdiv(8 * sms, rows), MAX_PARTS.value))


def indexer_topk_parts(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                       k: int, parts: int) -> torch.Tensor:
    """``indexer_topk`` by the row-parallel selection with ``parts`` chunks per row (at most
    ``MAX_PARTS``): 6 launches (scores, 4 levels, write)."""
    out, scores = output_and_scores(qi, w, keys, n_valid, k)
    if scores is not None:
        select_parts(scores, n_valid, out, qi.shape[1], k, _chunk(scores.shape[1], parts))
    return out


def _chunk(n_keys: int, parts: int) -> int:
    return triton.cdiv(n_keys, max(1, min(parts, n_keys, MAX_PARTS.value)))


def select_parts(scores: torch.Tensor, n_valid: torch.Tensor, out: torch.Tensor, seq: int, k: int,
                 chunk: int) -> None:
    """The row-parallel selection's 5 launches over FP32 scores ``[rows, Nk]`` in chunks of
    ``chunk`` (at most ``MAX_PARTS`` per row) into ``out`` (``rows * k`` int32)."""
    rows, n_keys = scores.shape
    if chunk < 1 or triton.cdiv(n_keys, chunk) > MAX_PARTS.value:
        raise ValueError(f"chunk: expected at least max(1, Nk / {MAX_PARTS.value}) = "
                         f"{max(1, triton.cdiv(n_keys, MAX_PARTS.value))}, got {chunk}")
    parts = triton.cdiv(n_keys, chunk)
    zeroed, offsets = _workspace(scores.device, rows, parts)
    grid = (rows, parts)
    # Level 1's histogram copies: one per 32 chunks of a row, a power of two, at most
    # HIST_COPIES (a copy's atomics contend only past a few dozen chunks; the level-1 pick loads
    # every copy).
    copies = min(HIST_COPIES.value, 1 << (max(1, parts // 32).bit_length() - 1))
    common = dict(ONE_BLOCK=chunk <= ROW_PARALLEL_BLOCK, BLOCK=ROW_PARALLEL_BLOCK, COPIES=copies,
                  num_warps=ROW_PARALLEL_WARPS)
    row_offsets = OFFSET_ROWS.value * parts
    for level in range(RADIX_LEVELS.value):
        _row_level_kernel[grid](scores, n_valid, zeroed, offsets, seq, n_keys, k, chunk, zeroed.stride(0), row_offsets,
                                *n_valid.stride(), LEVEL=level, **common)
    _row_write_kernel[grid](scores, n_valid, zeroed, offsets, out, seq, n_keys, k, chunk, zeroed.stride(0), row_offsets,
                            *n_valid.stride(), PARTS_P=triton.next_power_of_2(parts), **common)


def select_top_k(scores: torch.Tensor, n_valid: torch.Tensor, out: torch.Tensor, seq: int, k: int) -> None:
    """The selection of every backend's scores: the row-parallel launches for few long rows
    (decode), else row segments."""
    rows, n_keys = scores.shape
    parts = plan_parts(rows, n_keys, k, scores.device)
    if parts:
        select_parts(scores, n_valid, out, seq, k, _chunk(n_keys, parts))
    else:
        select_splits(scores, n_valid, out, seq, k, plan_splits(rows, n_keys, k, scores.device))


@register("indexer_topk", "triton")
def indexer_topk(qi: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor,
                 k: int) -> torch.Tensor:
    out, scores = output_and_scores(qi, w, keys, n_valid, k)
    if scores is not None:
        select_top_k(scores, n_valid, out, qi.shape[1], k)
    return out


@triton.jit
def _pack_keys_kernel(x_ptr, out_ptr, n_rows, stride_x, ROWS: tl.constexpr):
    """FP4 key rows: per row of 128 values, 64 code bytes then 4 E8M0 scale bytes."""
    NBLK: tl.constexpr = HEAD_DIM // FP4_BLOCK
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = row < n_rows
    blk = tl.arange(0, ROWS * NBLK)
    blk_row = tl.program_id(0).to(tl.int64) * ROWS + blk // NBLK
    blk_ok = blk_row < n_rows
    x = tl.load(x_ptr + blk_row[:, None] * stride_x + (blk % NBLK)[:, None] * FP4_BLOCK
                + tl.arange(0, FP4_BLOCK)[None, :], mask=blk_ok[:, None], other=0.0).to(tl.float32)
    codes, e, invalid = fp4_quantise(x)
    lo, hi = tl.split(tl.reshape(codes, [ROWS, HEAD_DIM // 2, 2]))
    tl.store(out_ptr + row[:, None] * _KEY_ROW_BYTES + tl.arange(0, HEAD_DIM // 2)[None, :],
             (lo | (hi << 4)).to(tl.uint8), mask=ok[:, None])
    tl.store(out_ptr + blk_row * _KEY_ROW_BYTES + HEAD_DIM // 2 + blk % NBLK,
             tl.where(invalid, 255, e + 127).to(tl.uint8), mask=blk_ok)


@register("pack_indexer_keys", "triton")
def pack_indexer_keys(keys: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*keys.shape[:-1], FP4_KEY_BYTES, dtype=torch.uint8, device=keys.device)
    rows = out.numel() // FP4_KEY_BYTES
    if rows == 0:
        return out
    x = as_rows(keys)
    _pack_keys_kernel[(triton.cdiv(rows, PACK_ROWS),)](x, out, rows, x.stride(0), ROWS=PACK_ROWS)
    return out
