// moe_experts at prefill sizes on Hopper: the two grouped MXFP4 GEMMs (w13 with the SwiGLU,
// w2 into per-pair rows) on FP8 warpgroup MMAs, the weights expanded from FP4 in registers.
// targets: sm90a
//
// The Triton GEMMs expand every FP4 weight tile into shared memory and then multiply, one
// after the other (kernels/moe.py; benchmarks/NOTES.md, twelfth round): at 128-row expert
// blocks that holds them near a quarter of the FP8 rate.  Here the expansion overlaps the
// MMAs by taking the weight as the MMA's A operand, from registers (the RS form of wgmma):
//
// * A tile is 128 weight rows (the MMA's M, 64 for each of the two consumer warpgroups) by
//   one 128-row expert block of sorted pairs (the MMA's N): the transposed product.
// * Per K block of 128, lane (g, q) of warp w loads the 16 code bytes of 32-block q of its two
//   rows (16 w + g and 16 w + g + 8 of its warpgroup's 64) straight from the packed tiles of
//   moe_pack_experts (each warp reads 512 contiguous bytes a row half), and expands them to
//   FP8 with the table of kernels/gemm.py (fp4_table_row, FP4_EXPAND_ASM: the same bytes as
//   the Triton path).  The expanded bytes of 32-block q sit in k slots 4q..4q+3 and
//   16+4q..16+4q+3 of the four k32 steps, so the activation's columns are stored in the same
//   order (sorted_act_quant in kernels/moe.py): slot 32 s + 16 h + 4 q + b holds element
//   32 q + 8 s + 4 h + b of the block.  No byte crosses a lane and no shared memory is used
//   for the weights.  The next block's expansion runs while this block's MMAs do.
// * The activation tile (FP8 codes of the block's 128 sorted rows, zeros for padding rows,
//   and their 128 scales) comes by TMA and one bulk copy from warp 0 of the first warpgroup,
//   six stages deep, as in sm90_fp8_gemm.cu.
// * Promotion per K block (SPEC 3): acc += (d * a_scale) * (2^(e_max - 127) * 2^-6) (2^-6: the
//   table's factor), the products of scaled_dot_t in kernels/gemm.py in another order: the
//   same values unless a product leaves the FP32 range.
//
// Measured on the H100 (benchmarks/NOTES.md, twenty-fifth round), Pro prefill (T = 8192, 384
// experts): w13 11.0 ms, w2 5.1 ms, ~390-430 TFLOP/s (the Triton GEMMs: 15.1, 8.7 ms).  What
// binds is the consumers' own instruction stream (expansion and promotion, ~390 PTX instructions
// a warp a K block at two warps a scheduler), not the copies or the MMAs (NOTES has the
// variants and the measurements that say so).
//
// Epilogues.  w13: the 128 weight rows of a tile are 64 gate rows and the 64 matching up rows
// (columns hb .. hb + 63 of the SwiGLU output), arranged so that warp w's rows 16 w + g and
// 16 w + g + 8 are the gate and up rows of one output column: the thread applies the clamped
// SwiGLU and the routing weight in registers and writes the FP32 result, which
// sorted_act_quant then quantises for w2 exactly as the Triton w13 epilogue does.  w2: the
// FP32 rows of each pair, as the Triton w2 writes them, for the same combine.
//
// wgmma exists on sm_90a only: the file is built for that target alone (its line above).

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <optional>

#include "e8m0.cuh"
#include "host.cuh"
#include "sm90_tma.cuh"
#include "sm90_wgmma.cuh"

using namespace dsv4;

namespace {

constexpr int kThreads = 384;     // one producer warpgroup, two consumer warpgroups
constexpr int kBlockRows = 128;   // sorted rows of an expert block: the MMA's N
constexpr int kTileW = 128;       // weight rows of a tile: 64 a consumer warpgroup (the MMA's M)
constexpr int kBlockK = 128;      // K block: one activation scale, four MXFP4 scales a row
constexpr int kTileRows = 16;     // rows of a packed weight tile (moe_pack_experts)
constexpr int kUnitBytes = kTileRows * kBlockK / 2;  // one packed tile's K block: 1 KB of codes
constexpr int kStages = 6;
constexpr int kATileBytes = kBlockRows * kBlockK;  // FP8 codes, 128-byte swizzled
constexpr int kScaleOffset = kATileBytes;          // then the rows' 128 FP32 scales
constexpr int kStageBytes = kATileBytes + 1024;    // 1024-byte aligned stages
constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;

struct Params {
  const uint8_t* w;           // packed codes [E, tiles, n_kb, 16, 64]
  const uint32_t* w_scale;    // packed E8M0 words [E, tiles, n_kb, 16]
  const float* a_scale;       // [n_kb, rows]: the sorted rows' activation scales, K block major
  const int* sorted_pair;     // [rows]
  const int* block_expert;    // [blocks]
  const float* route_w;       // [pairs] (w13)
  float* out;                 // w13: [rows, inter]; w2: [pairs, dim]
  int64_t expert_tiles;       // packed 16-row tiles an expert
  int64_t out_cols;           // inter (w13) or dim (w2)
  int n_experts, n_kb, rows, blocks, tiles_n;
  float limit;
};

// D[64 x 128] (+)= A[64 x 32] (registers, FP8 E4M3) B[32 x 128] (K-major FP8 in shared memory).
__device__ __forceinline__ void wgmma_m64n128k32_rs_e4m3(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                         int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " DSV4_WGMMA_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
      : DSV4_WGMMA_D64_OUT(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}


// The FP8 table row of a scale gap (FP4_TABLE_ROW_ASM in kernels/gemm.py): the E4M3 bytes of
// lut[m] * 2^(6 - gap) for m = 0..3 (lo) and 4..7 (hi), every entry 0 from gap 19 on.
__device__ __forceinline__ uint2 fp4_table_row(uint32_t gap) {
  uint32_t lo, hi;
  asm("{\n.reg .b32 d, s, p;\n.reg .b16 c0, c1, c2, c3;\n"
      "min.u32 d, %2, 19;\n"
      "shl.b32 s, d, 26;\n"
      "sub.u32 p, 0x50000000, s;\n"
      "cvt.rn.satfinite.e4m3x2.f16x2 c0, p;\n"
      "mul.lo.u32 s, d, 0x04000400;\n"
      "sub.u32 p, 0x56005400, s;\n"
      "cvt.rn.satfinite.e4m3x2.f16x2 c1, p;\n"
      "sub.u32 p, 0x5A005800, s;\n"
      "cvt.rn.satfinite.e4m3x2.f16x2 c2, p;\n"
      "sub.u32 p, 0x5E005C00, s;\n"
      "cvt.rn.satfinite.e4m3x2.f16x2 c3, p;\n"
      "mov.b32 %0, {c0, c1};\n"
      "mov.b32 %1, {c2, c3};\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(gap));
  return make_uint2(lo, hi);
}

// Eight E2M1 codes (element 2i in the low nibble) -> eight FP8 bytes from the table row
// (FP4_EXPAND_ASM in kernels/gemm.py): elements 0..3 in lo, 4..7 in hi.
__device__ __forceinline__ void fp4_expand(uint32_t w, uint2 lut, uint32_t& lo, uint32_t& hi) {
  asm("{\n.reg .b32 m, t, g, s4;\n"
      "and.b32 m, %2, 0x77777777;\n"
      "shl.b32 s4, %2, 4;\n"
      "prmt.b32 g, %3, %4, m;\n"
      "prmt.b32 t, %2, s4, 0x1504;\n"
      "lop3.b32 %0, g, t, 0x80808080, 0xF8;\n"
      "shr.b32 m, m, 16;\n"
      "prmt.b32 g, %3, %4, m;\n"
      "prmt.b32 t, %2, s4, 0x3726;\n"
      "lop3.b32 %1, g, t, 0x80808080, 0xF8;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(w), "r"(lut.x), "r"(lut.y));
}

// 16 bytes of weight codes, read once: no L1 allocation.
__device__ __forceinline__ uint4 load_codes(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// A thread's two weight rows for one K block, as loaded: 32-block q's codes and the rows'
// scale words.
struct Raw {
  uint4 lo, hi;
  uint32_t s_lo, s_hi;
};

// The same rows as the four k32 steps' A fragments, and the rows' FP32 scales times 2^-6.
struct Frag {
  uint32_t a[4][4];
  float f_lo, f_hi;
};

__device__ __forceinline__ void expand_row(const uint4& codes, uint32_t word, int q, uint32_t (&a)[4][4], int slot,
                                           float& scale) {
  const uint32_t e_max = max(max(word & 0xFFu, (word >> 8) & 0xFFu), max((word >> 16) & 0xFFu, word >> 24));
  const uint2 lut = fp4_table_row(e_max - ((word >> (8 * q)) & 0xFFu));
  fp4_expand(codes.x, lut, a[0][slot], a[0][slot + 2]);
  fp4_expand(codes.y, lut, a[1][slot], a[1][slot + 2]);
  fp4_expand(codes.z, lut, a[2][slot], a[2][slot + 2]);
  fp4_expand(codes.w, lut, a[3][slot], a[3][slot + 2]);
  scale = e8m0_value(e_max) * 0.015625f;  // exact (2^-133 is a subnormal); 2^-6 is the table's factor
}

// Fragment registers a0..a3 of a k32 step: (row g, k 4q..), (row g + 8, k 4q..),
// (row g, k 16 + 4q..), (row g + 8, k 16 + 4q..); word s of a row's 16 bytes is its codes
// 8s..8s+7, which feed step s.
__device__ __forceinline__ void expand(const Raw& r, int q, Frag& f) {
  expand_row(r.lo, r.s_lo, q, f.a, 0, f.f_lo);
  expand_row(r.hi, r.s_hi, q, f.a, 1, f.f_hi);
}

struct WeightRows {
  const uint8_t* lo;
  const uint8_t* hi;
  const uint32_t* s_lo;
  const uint32_t* s_hi;
  __device__ __forceinline__ Raw load(int kb) const {
    return {load_codes(lo + kb * kUnitBytes), load_codes(hi + kb * kUnitBytes), __ldg(s_lo + kb * kTileRows),
            __ldg(s_hi + kb * kTileRows)};
  }
};

// Packed row `row` of expert e's matrix: its codes of 32-block q in K block 0, and its scale word.
__device__ __forceinline__ void packed_row(const Params& p, int64_t e, int row, int q, const uint8_t*& codes,
                                           const uint32_t*& scale) {
  const int64_t unit = ((e * p.expert_tiles + (row >> 4)) * p.n_kb) * kTileRows + (row & 15);
  codes = p.w + unit * (kBlockK / 2) + 16 * q;
  scale = p.w_scale + unit;
}

// Tile t -> (expert block, weight tile): bands of 8 blocks sweep the weight tiles together, so
// a weight tile is read from L2 by the blocks of its expert in the band.
__device__ __forceinline__ void tile_at(int t, int blocks, int tiles_n, int& blk, int& wt) {
  const int per_band = 8 * tiles_n;
  const int first = (t / per_band) * 8;
  const int n = min(blocks - first, 8);
  blk = first + (t % per_band) % n;
  wt = (t % per_band) / n;
}

__device__ __forceinline__ float clamp_keep_nan(float x, float lo, float hi) {
  return x != x ? x : fminf(fmaxf(x, lo), hi);
}

template <bool W13>
__global__ void __launch_bounds__(kThreads, 1)
    moe_prefill_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(base + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int n_tiles = p.blocks * p.tiles_n;
  if (threadIdx.x == 0) init_stage_barriers(full, empty, kStages, 8);
  __syncthreads();

  if (threadIdx.x < 128) {  // the producer: thread 0 alone; ptxas sizes this branch for 40 registers
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      Ring ring{0, 0};
      for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        int blk, wt;
        tile_at(tile, p.blocks, p.tiles_n, blk, wt);
        if (__ldg(p.block_expert + blk) >= p.n_experts) continue;
        for (int kb = 0; kb < p.n_kb; ++kb) {
          mbar_wait(&empty[ring.stage], ring.phase ^ 1);
          uint8_t* st = base + ring.stage * kStageBytes;
          mbar_expect_bytes(&full[ring.stage], kATileBytes + kBlockRows * 4);
          tma_load(st, &map_a, kb * kBlockK, blk * kBlockRows, &full[ring.stage]);
          bulk_load(st + kScaleOffset, p.a_scale + static_cast<int64_t>(kb) * p.rows + blk * kBlockRows,
                    kBlockRows * 4, &full[ring.stage]);
          ring.next(kStages);
        }
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");

  const int c = (threadIdx.x >> 7) - 1;  // consumer warpgroup
  const int ct = threadIdx.x & 127;
  const int warp = ct >> 5, lane = ct & 31;
  const int g = lane >> 2, q = lane & 3;
  Ring ring{0, 0};
  for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    int blk, wt;
    tile_at(tile, p.blocks, p.tiles_n, blk, wt);
    const int expert = __ldg(p.block_expert + blk);
    if (expert >= p.n_experts) continue;
    // This thread's weight rows (MMA rows 16 warp + g and + 8) in the expert's packed matrix.
    int row_lo, row_hi, col = 0;
    if constexpr (W13) {
      // Output column `col`; its gate row is packed row 256 (col / 128) + col % 128, its up
      // row 128 rows further (w1 and w3 interleave in blocks of 128 rows).
      col = wt * 64 + c * 32 + warp * 8 + g;
      row_lo = 256 * (col >> 7) + (col & 127);
      row_hi = row_lo + 128;
    } else {
      row_lo = wt * kTileW + c * 64 + warp * 16 + g;
      row_hi = row_lo + 8;
    }
    WeightRows rows;
    packed_row(p, expert, row_lo, q, rows.lo, rows.s_lo);
    packed_row(p, expert, row_hi, q, rows.hi, rows.s_hi);

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    Frag cur, nxt;
    Raw raw = rows.load(0);
    expand(raw, q, cur);
    if (p.n_kb > 1) raw = rows.load(1);
#pragma unroll 2  // cur and nxt trade places without moves
    for (int kb = 0; kb < p.n_kb; ++kb) {
      mbar_wait(&full[ring.stage], ring.phase);
      const uint8_t* st = base + ring.stage * kStageBytes;
      const uint32_t a_tile = smem_addr(st);
      float t[64];
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < 4; ++s) wgmma_m64n128k32_rs_e4m3(t, cur.a[s], smem_desc(a_tile + 32 * s, 16, 1024), s != 0);
      wgmma_commit();
      if (kb + 1 < p.n_kb) {
        expand(raw, q, nxt);
        if (kb + 2 < p.n_kb) raw = rows.load(kb + 2);
      }
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 64; ++i) pin(t[i]);
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int i = 0; i < 4; ++i) pin(cur.a[s][i]);
      // The block's activation scales of this thread's columns 8j + 2q and 8j + 2q + 1.
      const float* a_scale = reinterpret_cast<const float*>(st + kScaleOffset) + 2 * q;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const float2 fa = *reinterpret_cast<const float2*>(a_scale + 8 * j);
        acc[4 * j] = fmaf(t[4 * j] * fa.x, cur.f_lo, acc[4 * j]);
        acc[4 * j + 1] = fmaf(t[4 * j + 1] * fa.y, cur.f_lo, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(t[4 * j + 2] * fa.x, cur.f_hi, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(t[4 * j + 3] * fa.y, cur.f_hi, acc[4 * j + 3]);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[ring.stage]);
      ring.next(kStages);
      cur = nxt;
    }

    // Epilogue: this thread's columns of the block are sorted rows blk * 128 + 8j + 2q + e.
    const int row0 = blk * kBlockRows + 2 * q;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int2 pair = __ldg(reinterpret_cast<const int2*>(p.sorted_pair + row0 + 8 * j));
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int pr = e ? pair.y : pair.x;
        if (pr < 0) continue;  // a padding row
        if constexpr (W13) {
          // The clamped SwiGLU of kernels/moe.py (_moe_w13_kernel): fast exp, rounded division.
          const float gate = clamp_keep_nan(acc[4 * j + e], -INFINITY, p.limit);
          const float up = clamp_keep_nan(acc[4 * j + 2 + e], -p.limit, p.limit);
          const float h = __fdiv_rn(gate, 1.f + __expf(-gate)) * up * __ldg(p.route_w + pr);
          p.out[static_cast<int64_t>(row0 + 8 * j + e) * p.out_cols + col] = h;
        } else {
          float* out = p.out + static_cast<int64_t>(pr) * p.out_cols + row_lo;
          out[0] = acc[4 * j + e];
          out[8] = acc[4 * j + 2 + e];
        }
      }
    }
  }
}

}  // namespace

// One of the two GEMMs of moe_experts at prefill sizes.
// a_codes: uint8 [rows, K], the sorted rows' FP8 codes in MMA slot order (sorted_act_quant);
// a_scale: fp32 [K / 128, rows]; w / w_scale: one packed matrix of moe_pack_experts (uint8
// [E, tiles, K / 128, 16, 64] and E8M0 bytes [E, tiles, K / 128, 16, 4]); sorted_pair,
// block_expert: the align of 128-row blocks, whose pair ids must lie below the pair count
// (route_w's length, out's rows for w2), as align writes them.  With route_w (fp32 [pairs]):
// w13, out fp32 [rows, inter] (the routed SwiGLU of each real row); without: w2, out fp32
// [pairs, N].
void moe_prefill_gemm(at::Tensor a_codes, at::Tensor a_scale, at::Tensor w, at::Tensor w_scale,
                      at::Tensor sorted_pair, at::Tensor block_expert, std::optional<at::Tensor> route_w,
                      at::Tensor out, double limit, int64_t stream_handle) {
  require_sm90(a_codes.get_device(), "moe_prefill_gemm");
  DSV4_CHECK(a_codes.scalar_type() == at::kByte && a_codes.dim() == 2 && a_codes.is_contiguous(),
             "a_codes: expected contiguous uint8 [rows, K], got ", a_codes.scalar_type(), " ", a_codes.sizes());
  const int64_t rows = a_codes.size(0), k = a_codes.size(1);
  DSV4_CHECK(k % kBlockK == 0 && k > 0, "a_codes: K must be a positive multiple of 128, got ", k);
  DSV4_CHECK(rows % kBlockRows == 0 && rows < (int64_t{1} << 31), "a_codes: rows must be a multiple of 128, got ",
             rows);
  const int64_t n_kb = k / kBlockK;
  DSV4_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.dim() == 2 && a_scale.size(0) == n_kb &&
                 a_scale.size(1) == rows && a_scale.is_contiguous(),
             "a_scale: expected contiguous fp32 [", n_kb, ", ", rows, "], got ", a_scale.sizes());
  DSV4_CHECK(w.scalar_type() == at::kByte && w.dim() == 5 && w.size(2) == n_kb && w.size(3) == kTileRows &&
                 w.size(4) == kBlockK / 2 && w.is_contiguous(),
             "w: expected contiguous uint8 [E, tiles, ", n_kb, ", 16, 64], got ", w.sizes());
  const int64_t n_experts = w.size(0), w_rows = w.size(1) * kTileRows;
  DSV4_CHECK(w_scale.scalar_type() == at::kByte && w_scale.dim() == 5 && w_scale.size(0) == n_experts &&
                 w_scale.size(1) == w.size(1) && w_scale.size(2) == n_kb && w_scale.size(3) == kTileRows &&
                 w_scale.size(4) == 4 && w_scale.is_contiguous(),
             "w_scale: expected contiguous E8M0 bytes [", n_experts, ", ", w.size(1), ", ", n_kb, ", 16, 4], got ",
             w_scale.sizes());
  DSV4_CHECK(sorted_pair.scalar_type() == at::kInt && sorted_pair.dim() == 1 && sorted_pair.size(0) == rows &&
                 sorted_pair.is_contiguous(),
             "sorted_pair: expected contiguous int32 [", rows, "], got ", sorted_pair.sizes());
  DSV4_CHECK(block_expert.scalar_type() == at::kInt && block_expert.dim() == 1 &&
                 block_expert.size(0) == rows / kBlockRows && block_expert.is_contiguous(),
             "block_expert: expected contiguous int32 [", rows / kBlockRows, "], got ", block_expert.sizes());
  const bool w13 = route_w.has_value();
  const int64_t out_cols = w13 ? w_rows / 2 : w_rows;
  DSV4_CHECK(w13 ? w.size(1) % 16 == 0 : out_cols % kTileW == 0,
             w13 ? "w: a w13 matrix needs whole 256-row blocks of gate and up rows (inter a multiple of 128), got "
                 : "w: rows must be a multiple of 128, got ",
             w_rows, " rows");
  DSV4_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(1) == out_cols && out.is_contiguous() &&
                 (!w13 || out.size(0) == rows),
             "out: expected contiguous fp32 [", w13 ? rows : -1, ", ", out_cols, "], got ", out.sizes());
  if (w13)
    DSV4_CHECK(route_w->scalar_type() == at::kFloat && route_w->dim() == 1 && route_w->is_contiguous(),
               "route_w: expected contiguous fp32 [pairs], got ", route_w->sizes());
  DSV4_CHECK(aligned(a_codes, 16) && aligned(a_scale, 16) && aligned(w, 16) && aligned(w_scale, 4) &&
                 aligned(sorted_pair, 8),
             "moe_prefill_gemm: a_codes, a_scale and w need 16-byte, w_scale 4-byte and sorted_pair 8-byte aligned "
             "data (the copies' and vector loads' rule)");
  for (const at::Tensor* t : {&a_scale, &w, &w_scale, &sorted_pair, &block_expert, &out})
    DSV4_CHECK(t->device() == a_codes.device(), "moe_prefill_gemm: every tensor on a_codes' device");
  if (w13) DSV4_CHECK(route_w->device() == a_codes.device(), "moe_prefill_gemm: every tensor on a_codes' device");
  DSV4_CHECK(n_experts * w.size(1) * n_kb * kUnitBytes < (int64_t{1} << 62), "w: too large");
  Params p{};
  p.w = w.data_ptr<uint8_t>();
  p.w_scale = reinterpret_cast<const uint32_t*>(w_scale.data_ptr<uint8_t>());
  p.a_scale = a_scale.data_ptr<float>();
  p.sorted_pair = sorted_pair.data_ptr<int>();
  p.block_expert = block_expert.data_ptr<int>();
  p.route_w = w13 ? route_w->data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.expert_tiles = w.size(1);
  p.out_cols = out_cols;
  p.n_experts = static_cast<int>(n_experts);
  p.n_kb = static_cast<int>(n_kb);
  p.rows = static_cast<int>(rows);
  p.blocks = static_cast<int>(rows / kBlockRows);
  p.tiles_n = static_cast<int>(w13 ? out_cols / 64 : out_cols / kTileW);
  p.limit = static_cast<float>(limit);
  if (rows == 0) return;
  const int device = a_codes.get_device();
  const DeviceScope scope(device);
  const CUtensorMap map_a = tile_map(a_codes, CU_TENSOR_MAP_DATA_TYPE_UINT8, kBlockK, kBlockRows, "a_codes");
  const auto kernel = w13 ? moe_prefill_kernel<true> : moe_prefill_kernel<false>;
  DSV4_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes) == cudaSuccess,
             "moe_prefill_gemm: cannot raise the shared-memory limit");
  const int64_t tiles = static_cast<int64_t>(p.blocks) * p.tiles_n;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, multiprocessors(device)));
  kernel<<<grid, kThreads, kSmemBytes, reinterpret_cast<cudaStream_t>(stream_handle)>>>(map_a, p);
  check_launch("moe_prefill_gemm");
}
