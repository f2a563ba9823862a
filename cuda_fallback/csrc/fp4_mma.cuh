// Device pieces shared by the FP4 decode GEMMs (fp4_decode_gemm.cu, moe_decode.cu): FP4 weight
// rows decoded straight into mma.sync's A fragment; the FP8 activation codes' values, as fp16,
// its B.
//
// One step multiplies a 16-row weight tile (the MMA's M) by groups of 8 activation rows (its
// N) over one 128-wide K block: one activation scale block, four MXFP4 (eight NVFP4) weight
// scale blocks.  Lane (g, q) of a warp holds weight rows g and g + 8 and activation row g of
// each group, all in 32-block q of the 128: the k slots of the MMAs are a fixed permutation of
// physical k, the same for both operands, so no byte moves between lanes and no shared memory
// is involved.
//
// Exactness, MXFP4.  Inside a row's 128-block the four exponents e_j are folded relative to
// their maximum: the A operand is fp16(lut[code] * 2^(e_j - e_max)), the promotion multiplies
// the block's FP32 sums by the activation scale and then by 2^(e_max - 127).  lut values have
// two significant bits, so the folded value is exact in fp16 (normal or subnormal) while
// e_max - e_j <= 23; a wider span rounds to nearest-even in fp16, an error of at most
// 2^(e_max - 127 - 25) per element.
// Exactness, NVFP4.  The A operand is lut[code] * 2^-6 * s, s the 16-block's E4M3 scale: at
// most 2 x 4 significant bits, magnitudes from 2^-16 (2^-7 * the smallest subnormal scale
// 2^-9) to 42 (1.5 * 2^-4 * 448), so every value is exact in fp16 with no fold; the promotion
// multiplies by 2^6 and the kernel's sum by the FP32 global scale once, at the end.
// FP8 E4M3 activation codes are exact in fp16, every product is exact, and the MMA sums in
// FP32: results equal the oracle's up to FP32 summation order (and, NVFP4, the one rounding
// of the global scale's product, taken on the sum rather than on each weight).
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "e8m0.cuh"
#include "host.cuh"

namespace dsv4 {

constexpr int kTileRows = 16;  // weight rows of an MMA tile
constexpr int kBlockK = 128;   // K of one step
constexpr int kGroup = 8;      // activation rows of an MMA

// 16 bytes of weight codes, read once: no L1 allocation.
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// D += A (16x16, fp16) * B (16x8, fp16), FP32 accumulation.
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two E4M3 codes (low, high byte) -> fp16x2 (low, high half), exact.
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t two_codes) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_codes & 0xFFFFu), __NV_E4M3);
  return uint32_t(h.x) | (uint32_t(h.y) << 16);
}

// A 16-row tile's codes and scale words for one 128-block, as loaded: rows g and g + 8.
struct WeightBlock {
  uint4 lo, hi;
  uint32_t s_lo, s_hi;
};

// Where lane (g, q) reads its rows: codes of 32-block q, scale words (one per 128-block), and
// how far apart two K blocks are.
struct WeightRows {
  const uint8_t* lo;
  const uint8_t* hi;
  const uint32_t* s_lo;
  const uint32_t* s_hi;
  int code_step, scale_step;  // bytes / words from one K block to the next

  // Row-major: rows r_lo, r_hi of a weight [rows, K/2] with E8M0 scales [rows, K/32] (both in
  // bounds).  A block is 64 bytes of each row, rows a row stride apart.
  static __device__ __forceinline__ WeightRows row_major(const uint8_t* w, const uint8_t* ws, int64_t r_lo,
                                                         int64_t r_hi, int64_t stride_w, int64_t stride_ws, int q) {
    return {w + r_lo * stride_w + q * 16, w + r_hi * stride_w + q * 16,
            reinterpret_cast<const uint32_t*>(ws + r_lo * stride_ws),
            reinterpret_cast<const uint32_t*>(ws + r_hi * stride_ws), kBlockK / 2, 1};
  }

  // moe_pack_experts' tiled layout: 16-row tile `tile` of a matrix of n_kb K blocks, codes
  // [tiles, n_kb, 16, 64] and scales [tiles, n_kb, 16, 4].  A block is the tile's 1 KB: lane
  // (g, q) reads bytes 16 * lane (row g) and 512 + 16 * lane (row g + 8), one contiguous 512 B
  // per load instruction of the warp.
  static __device__ __forceinline__ WeightRows tiled(const uint8_t* w, const uint8_t* ws, int64_t tile, int n_kb,
                                                     int g, int q) {
    const int64_t unit = tile * n_kb * kTileRows + g;  // (row g, block 0): 64 code bytes, one scale word
    const uint8_t* codes = w + unit * (kBlockK / 2) + q * 16;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(ws) + unit;
    return {codes, codes + 8 * (kBlockK / 2), words, words + 8, kTileRows * (kBlockK / 2), kTileRows};
  }

  __device__ __forceinline__ WeightBlock load(int kb) const {
    return {load_stream(lo + kb * code_step), load_stream(hi + kb * code_step), __ldg(s_lo + kb * scale_step),
            __ldg(s_hi + kb * scale_step)};
  }
};

// Runs body(block, kb) for kb = first, first + step, ... < n_kb, with each weight block
// requested one step before its use (at decode a warp has little else to hide the memory
// latency behind; two ahead, or three in shared-memory stages, measured slower: the registers
// or the copies cost more warps or issue than the latency they hide).
// Rows: anything with load(kb) (one tile's WeightBlock, or several tiles' together).
template <class Rows, class Body>
__device__ __forceinline__ void stream_blocks(const Rows& rows, int first, int step, int n_kb, Body&& body) {
  using Block = decltype(rows.load(0));
  Block ahead;
  if (first < n_kb) ahead = rows.load(first);
  for (int kb = first; kb < n_kb; kb += step) {
    const Block cur = ahead;
    if (kb + step < n_kb) ahead = rows.load(kb + step);
    body(cur, kb);
  }
}

// A row's four E8M0 bytes of one 128-block (byte j: 32-block j) -> the fp16x2 factor that
// folds block q relative to the largest exponent, 2^(6 - (e_max - e_q)) in both halves (the
// decoded codes carry 2^-6), and the row's FP32 scale 2^(e_max - 127) (NaN for the E8M0 NaN).
__device__ __forceinline__ void fold_scales(uint32_t word, int q, uint32_t& fold, float& row_scale) {
  const int e_max = max(max(int(word & 0xFFu), int((word >> 8) & 0xFFu)),
                        max(int((word >> 16) & 0xFFu), int(word >> 24)));
  const int d = e_max - int((word >> (8 * q)) & 0xFFu);
  // fp16 2^(6 - d): normal while d <= 20, subnormal down to 2^-24 (d = 30); below that every
  // folded value rounds to zero anyway (|lut| <= 6 < 2^3).
  const uint32_t h = d <= 20 ? uint32_t(21 - d) << 10 : (d <= 30 ? 1u << (30 - d) : 0u);
  fold = h * 0x10001u;
  row_scale = e8m0_value(e_max);
}

// Eight E2M1 codes of one word (byte b: element 2b in the low nibble, 2b + 1 in the high one)
// -> four fp16x2 registers: (0, 2), (4, 6), (1, 3), (5, 7), each lut[code] * 2^-6 * factor
// (MXFP4: the fold 2^(6 - (e_max - e_q)) of fold_scales; NVFP4: the 16-block's scale).
// A code's bits moved into an FP8 E4M3 byte are lut[code] * 2^-6 exactly (code 1 is the E4M3
// subnormal 2^-7), four bytes a word in three integer instructions, then one conversion per
// pair (exact) and the multiply by the factor.  Integer instructions are what bind at decode:
// this form needs 9 a word where shifting each pair into fp16 bits needed 16.
__device__ __forceinline__ void decode_word(uint32_t word, uint32_t fold, uint32_t* out) {
  const uint32_t even = ((word << 2) & 0x1C1C1C1Cu) | ((word << 4) & 0x80808080u);
  const uint32_t odd = ((word >> 2) & 0x1C1C1C1Cu) | (word & 0x80808080u);
  out[0] = hmul2(e4m3x2_to_f16x2(even), fold);
  out[1] = hmul2(e4m3x2_to_f16x2(even >> 16), fold);
  out[2] = hmul2(e4m3x2_to_f16x2(odd), fold);
  out[3] = hmul2(e4m3x2_to_f16x2(odd >> 16), fold);
}

// One block's codes of rows g and g + 8 with the fp16x2 factors that decode them (words 0-1:
// elements 0-15 of 32-block q, words 2-3: 16-31) and the rows' scales for the promotion.
// word(i) decodes word i of both rows: what DecodedOperand holds at lo[4i .. 4i + 3] and
// hi[4i .. 4i + 3], and what the warp-group MMA kernel (sm90_nvfp4_decode_gemm.cu) places in
// the A fragments of k steps 2i and 2i + 1.
struct BlockWords {
  uint4 lo, hi;
  uint32_t first_lo, second_lo, first_hi, second_hi;
  float scale_lo, scale_hi;

  // MXFP4: one fold for the whole 32-block, relative to the row's largest exponent.
  static __device__ __forceinline__ BlockWords mxfp4(const WeightBlock& b, int q) {
    BlockWords w;
    w.lo = b.lo;
    w.hi = b.hi;
    fold_scales(b.s_lo, q, w.first_lo, w.scale_lo);
    fold_scales(b.s_hi, q, w.first_hi, w.scale_hi);
    w.second_lo = w.first_lo;
    w.second_hi = w.first_hi;
    return w;
  }

  // NVFP4: each 16-block's E4M3 scale (converted to fp16 exactly, one conversion for both);
  // the 2^-6 the decoded codes carry comes back in the promotion.
  static __device__ __forceinline__ BlockWords nvfp4(const WeightBlock& b) {
    BlockWords w;
    w.lo = b.lo;
    w.hi = b.hi;
    const uint32_t s_lo = e4m3x2_to_f16x2(b.s_lo), s_hi = e4m3x2_to_f16x2(b.s_hi);
    w.first_lo = __byte_perm(s_lo, 0, 0x1010);
    w.second_lo = __byte_perm(s_lo, 0, 0x3232);
    w.first_hi = __byte_perm(s_hi, 0, 0x1010);
    w.second_hi = __byte_perm(s_hi, 0, 0x3232);
    w.scale_lo = w.scale_hi = 64.f;
    return w;
  }

  __device__ __forceinline__ void word(int i, uint32_t (&lo4)[4], uint32_t (&hi4)[4]) const {
    const uint32_t c_lo = i == 0 ? lo.x : i == 1 ? lo.y : i == 2 ? lo.z : lo.w;
    const uint32_t c_hi = i == 0 ? hi.x : i == 1 ? hi.y : i == 2 ? hi.z : hi.w;
    decode_word(c_lo, i < 2 ? first_lo : second_lo, lo4);
    decode_word(c_hi, i < 2 ? first_hi : second_hi, hi4);
  }
};

// The A operand of one block decoded whole: lo[4i .. 4i + 3] word i of row g (elements
// 8i + (0, 2), (4, 6), (1, 3), (5, 7) of 32-block q, see decode_word); hi the same for row
// g + 8; the rows' scales.  Words: BlockWords::mxfp4 or nvfp4 of the block.
struct DecodedOperand {
  uint32_t lo[16], hi[16];
  float scale_lo, scale_hi;

  __device__ __forceinline__ explicit DecodedOperand(const BlockWords& w) : scale_lo(w.scale_lo), scale_hi(w.scale_hi) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t l[4], h[4];
      w.word(i, l, h);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        lo[4 * i + r] = l[r];
        hi[4 * i + r] = h[r];
      }
    }
  }
};

// MXFP4 operand of one block.
struct WeightOperand : DecodedOperand {
  static __device__ __forceinline__ BlockWords words(const WeightBlock& b, int q) { return BlockWords::mxfp4(b, q); }
  __device__ __forceinline__ WeightOperand(const WeightBlock& b, int q) : DecodedOperand(words(b, q)) {}
};

// NVFP4 rows, row-major (one E4M3 scale per 16 elements, scales [rows, K/16]): lane q's
// 32-block q of a 128-block is 16-blocks 2q and 2q + 1, whose scale bytes are 16-bit word q of
// the row's 8 scale bytes of the block (WeightBlock::s_lo, s_hi hold that word).
struct Nvfp4Rows {
  const uint8_t* lo;
  const uint8_t* hi;
  const uint16_t* s_lo;
  const uint16_t* s_hi;

  static __device__ __forceinline__ Nvfp4Rows row_major(const uint8_t* w, const uint8_t* ws, int64_t r_lo,
                                                        int64_t r_hi, int64_t stride_w, int64_t stride_ws, int q) {
    return {w + r_lo * stride_w + q * 16, w + r_hi * stride_w + q * 16,
            reinterpret_cast<const uint16_t*>(ws + r_lo * stride_ws) + q,
            reinterpret_cast<const uint16_t*>(ws + r_hi * stride_ws) + q};
  }

  __device__ __forceinline__ WeightBlock load(int kb) const {
    return {load_stream(lo + kb * (kBlockK / 2)), load_stream(hi + kb * (kBlockK / 2)), __ldg(s_lo + kb * 4),
            __ldg(s_hi + kb * 4)};
  }
};

// NVFP4 operand of one block, laid out as WeightOperand's.
struct Nvfp4Operand : DecodedOperand {
  static __device__ __forceinline__ BlockWords words(const WeightBlock& b, int) { return BlockWords::nvfp4(b); }
  __device__ __forceinline__ Nvfp4Operand(const WeightBlock& b, int q) : DecodedOperand(words(b, q)) {}
};

// The B operand of one block: the 32 activation values of 32-block q of the lane's activation
// row, as fp16 in pair order (act_quant_rows(fp16_pairs=True): elements (0, 2) then (1, 3) of
// every four), 16 registers; zeros for no row.
__device__ __forceinline__ void load_activation(const uint16_t* row_block, bool valid, uint32_t (&b)[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) b[i] = 0;
  if (valid) {
    const uint4* p = reinterpret_cast<const uint4*>(row_block);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 v = __ldg(p + i);
      b[4 * i] = v.x;
      b[4 * i + 1] = v.y;
      b[4 * i + 2] = v.z;
      b[4 * i + 3] = v.w;
    }
  }
}

// d = the block's products of one group, before promotion: d[0], d[1] weight row g and
// activation rows 2q, 2q + 1 of the group; d[2], d[3] weight row g + 8.
template <class Operand>
__device__ __forceinline__ void block_products(const Operand& a, const uint32_t (&b)[16], float (&d)[4]) {
  d[0] = d[1] = d[2] = d[3] = 0.f;
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    // MMA s takes half p = s % 2 of word i = s / 2, i.e. elements 4s .. 4s + 3 of the block: k
    // slots (2q, 2q + 1) hold its elements (0, 2), slots (2q + 8, 2q + 9) its (1, 3), A and B alike.
    const int i = s >> 1, p = s & 1;
    mma_16816(d, a.lo[4 * i + p], a.hi[4 * i + p], a.lo[4 * i + 2 + p], a.hi[4 * i + 2 + p], b[2 * s], b[2 * s + 1]);
  }
}

// acc += (d * activation scale) * weight row scale, as the Triton GEMMs promote.
template <class Operand>
__device__ __forceinline__ void promote(float (&acc)[4], const float (&d)[4], float sx0, float sx1,
                                        const Operand& a) {
  acc[0] += (d[0] * sx0) * a.scale_lo;
  acc[1] += (d[1] * sx1) * a.scale_lo;
  acc[2] += (d[2] * sx0) * a.scale_hi;
  acc[3] += (d[3] * sx1) * a.scale_hi;
}

// --- host side --------------------------------------------------------------------------

// FP4 weight rows [..., N, K/2] (uint8) and their scales [..., N, K/scale_block] (uint8: E8M0
// per 32 for MXFP4, E4M3 per 16 for NVFP4) as the kernels read them: contiguous rows, codes
// 16-byte aligned, scale rows 4-byte (MXFP4: one word a block) or 2-byte (NVFP4: one 16-bit
// word a lane) aligned.
inline void check_weight_rows(const char* name, const at::Tensor& w, const char* scale_name, const at::Tensor& ws,
                              int scale_block = 32) {
  const int64_t d = w.dim();
  const int align = scale_block == 32 ? 4 : 2;
  DSV4_CHECK(w.scalar_type() == at::kByte && d >= 2, name, ": expected uint8 [..., N, K/2]");
  DSV4_CHECK(ws.scalar_type() == at::kByte && ws.dim() == d, scale_name, ": expected uint8 [..., N, K/",
              scale_block, "]");
  const int64_t k = 2 * w.size(d - 1);
  DSV4_CHECK(k % kBlockK == 0 && k >= kBlockK, name, ": K must be a positive multiple of 128, got ", k);
  DSV4_CHECK(ws.size(d - 2) == w.size(d - 2) && ws.size(d - 1) == k / scale_block, scale_name, ": expected [..., ",
              w.size(d - 2), ", ", k / scale_block, "], got ", ws.sizes());
  DSV4_CHECK(w.stride(d - 1) == 1 && aligned(w, 16), name, ": expected contiguous 16-byte aligned rows");
  DSV4_CHECK(ws.stride(d - 1) == 1 && aligned(ws, align), scale_name, ": expected contiguous ", align,
              "-byte aligned rows");
  for (int64_t i = 0; i < d - 1; ++i) {
    DSV4_CHECK(w.stride(i) % 16 == 0, name, ": expected 16-byte aligned rows");
    DSV4_CHECK(ws.stride(i) % align == 0, scale_name, ": expected ", align, "-byte aligned rows");
  }
  DSV4_CHECK(ws.device() == w.device(), scale_name, ": expected the device of ", name);
}

// An expert stack in moe_pack_experts' tiled layout as WeightRows::tiled reads it: codes uint8
// [E, rows/16, K/128, 16, 64] and E8M0 scales uint8 [E, rows/16, K/128, 16, 4], both
// contiguous, codes 16-byte and scales 4-byte aligned.
inline void check_tiled_weight(const char* name, const at::Tensor& w, const char* scale_name,
                               const at::Tensor& ws) {
  DSV4_CHECK(w.scalar_type() == at::kByte && w.dim() == 5 && w.size(3) == kTileRows && w.size(4) == kBlockK / 2,
              name, ": expected uint8 [E, rows/16, K/128, 16, 64], got ", w.sizes());
  DSV4_CHECK(ws.scalar_type() == at::kByte && ws.dim() == 5 && ws.size(0) == w.size(0) &&
                  ws.size(1) == w.size(1) && ws.size(2) == w.size(2) && ws.size(3) == kTileRows &&
                  ws.size(4) == kBlockK / 32,
              scale_name, ": expected uint8 [", w.size(0), ", ", w.size(1), ", ", w.size(2), ", 16, 4], got ",
              ws.sizes());
  DSV4_CHECK(w.is_contiguous() && aligned(w, 16), name, ": expected a contiguous 16-byte aligned tensor");
  DSV4_CHECK(ws.is_contiguous() && aligned(ws, 4), scale_name, ": expected a contiguous 4-byte aligned tensor");
  DSV4_CHECK(ws.device() == w.device(), scale_name, ": expected the device of ", name);
}

}  // namespace dsv4
