// The two grouped MXFP4 GEMMs of the routed experts at decode sizes (16-row expert blocks).
// targets: sm90a sm100a
//
// Same data flow as the Triton path (dsv4_triton/kernels/moe.py), which also provides the
// align, the activation pre-pass and the combine: the (token, slot) pairs sorted by expert in
// blocks of 16 padded rows, then
//   w13: per block and 128 columns of inter, the block's rows times the expert's gate and up
//        rows, the clamped SwiGLU and the routing weight in registers, and act_quant of the
//        128 outputs per row (exactly one block of the w2 input) to FP8 codes + scale;
//   w2:  per block and 128 rows of dim, the FP32 result of each pair into its own row.
// The weights are streamed with the mma.sync decode of fp4_mma.cuh: at decode a block has
// one or two real rows, so these GEMMs are weight streams, and every warp owns its 16-row
// tiles over the whole of K (no K split, no reduction).  moe_pack_experts stores each 16-row
// tile's K blocks as one contiguous run (WeightRows::tiled), so a warp streams its tile front
// to back: read from row-major rows (64 bytes of 16 rows a K step) the same bytes came from
// HBM at two thirds of the rate.

#include <cuda_runtime.h>

#include "act_quant.cuh"
#include "fp4_mma.cuh"

using namespace dsv4;

namespace {

constexpr int kBlockRows = 16;                   // rows of an expert block
constexpr int kGroups = kBlockRows / kGroup;     // MMA column groups of a block
constexpr int kWarps = 8;                        // w13: a warp per 16 of the CTA's 128 columns
constexpr int kPack = kWarps * kTileRows;        // 128: w13's gate/up interleave
constexpr int kW2Warps = 4;                      // w2: 64 rows of dim per CTA
constexpr int kCodesPerQuant = kBlockK;          // act_quant block of the w2 input
// Registers: w13 streams two tiles a warp (gate and up) within 128 (16 warps a multiprocessor),
// w2 one tile within 80 (24 warps: measured faster than two blocks ahead at 96 registers and
// 20 warps, on the tiled layout).

// w13's gate and up tiles of a warp, streamed together.
struct GateUpBlock {
  WeightBlock gate, up;
};
struct GateUpRows {
  WeightRows gate, up;
  __device__ __forceinline__ GateUpBlock load(int kb) const { return {gate.load(kb), up.load(kb)}; }
};

__device__ __forceinline__ float clamp_keep_nan(float x, float lo, float hi) {
  return x != x ? x : fminf(fmaxf(x, lo), hi);
}

// act_quant's FP8 E4M3 code of v (round to nearest even; v is within +-448 or NaN), as the fp16
// bits of its value (exact).
__device__ __forceinline__ uint16_t fp8_value_as_fp16(float v) {
  return __nv_cvt_fp8_to_halfraw(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3), __NV_E4M3).x;
}

__global__ void __launch_bounds__(kWarps * 32, 2) moe_w13_kernel(
    const uint16_t* __restrict__ xq, const float* __restrict__ xs, int64_t stride_xq, int64_t stride_xs,
    const uint8_t* __restrict__ w13, const uint8_t* __restrict__ w13s, int64_t stride_we, int64_t stride_se,
    const int* __restrict__ sorted_pair, const int* __restrict__ block_expert, const float* __restrict__ route_w,
    uint16_t* __restrict__ hq, float* __restrict__ hs, int n_experts, int n_kb, int inter, int topk, float limit) {
  __shared__ float amax_part[kWarps][kBlockRows];
  const int blk = blockIdx.x, j = blockIdx.y;
  const int expert = block_expert[blk];
  if (expert >= n_experts) return;  // past the last block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const uint8_t* we = w13 + expert * stride_we;
  const uint8_t* wse = w13s + expert * stride_se;
  // Warp w: gate rows 256j + 16w .. and the up rows 128 below them (the packed interleave),
  // i.e. inter columns 128j + 16w + (g, g + 8) of both.
  const int64_t gate_tile = (int64_t(j) * 2 * kPack + warp * kTileRows) / kTileRows;
  const WeightRows gate_rows = WeightRows::tiled(we, wse, gate_tile, n_kb, g, q);
  const WeightRows up_rows = WeightRows::tiled(we, wse, gate_tile + kPack / kTileRows, n_kb, g, q);
  const int row0 = blk * kBlockRows;
  const uint16_t* x_row[kGroups];
  bool has_row[kGroups], live[kGroups];
  int pair_col[kGroups][2];  // the pairs of this lane's D columns (block rows 8t + 2q, + 1)
  // Their tokens' activation scale rows (-1: no pair), divided once here: a division by the
  // run-time topk is ~20 instructions and would sit in front of every K step's scale loads.
  int64_t scale_row[kGroups][2];
#pragma unroll
  for (int t = 0; t < kGroups; ++t) {
    const int p = sorted_pair[row0 + t * kGroup + g];
    has_row[t] = p >= 0;
    live[t] = __any_sync(0xFFFFFFFFu, p >= 0);  // a group of padding rows only is skipped (zeros)
    x_row[t] = xq + (p >= 0 ? p / topk : 0) * stride_xq + q * 32;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      pair_col[t][c] = sorted_pair[row0 + t * kGroup + 2 * q + c];
      scale_row[t][c] = pair_col[t][c] >= 0 ? (pair_col[t][c] / topk) * stride_xs : -1;
    }
  }
  float acc_g[kGroups][4] = {}, acc_u[kGroups][4] = {};
  const GateUpRows tiles{gate_rows, up_rows};
  stream_blocks(tiles, 0, 1, n_kb, [&](const GateUpBlock& block, int kb) {
    float sx[kGroups][2];
#pragma unroll
    for (int t = 0; t < kGroups; ++t) {
#pragma unroll
      for (int c = 0; c < 2; ++c) sx[t][c] = scale_row[t][c] >= 0 ? __ldg(xs + scale_row[t][c] + kb) : 0.f;
    }
    // One group's B operand at a time (read again for the up tile, from L1): both groups' at
    // once would not fit beside the two decoded tiles in 128 registers.
    const auto tile_step = [&](const WeightBlock& tile, float (&acc)[kGroups][4]) {
      const WeightOperand a(tile, q);
#pragma unroll
      for (int t = 0; t < kGroups; ++t) {
        if (!live[t]) continue;
        uint32_t b[16];
        load_activation(x_row[t] + kb * kBlockK, has_row[t], b);
        float d[4];
        block_products(a, b, d);
        promote(acc[t], d, sx[t][0], sx[t][1], a);
      }
    };
    tile_step(block.gate, acc_g);
    tile_step(block.up, acc_u);
  });

  // SwiGLU with the clamp, times the routing weight (0 for padding rows: zeros out).
  float h[kGroups][4];
#pragma unroll
  for (int t = 0; t < kGroups; ++t) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float gv = clamp_keep_nan(acc_g[t][r], -__int_as_float(0x7F800000), limit);
      const float uv = clamp_keep_nan(acc_u[t][r], -limit, limit);
      const int p = pair_col[t][r & 1];
      h[t][r] = __fdiv_rn(gv, 1.f + __expf(-gv)) * uv * (p >= 0 ? __ldg(route_w + p) : 0.f);
    }
  }
  // act_quant per block row over the CTA's 128 columns: the warp's 16 rows by shuffles over g,
  // then the 8 warps through shared memory.
  float amax[kGroups][2];
#pragma unroll
  for (int t = 0; t < kGroups; ++t) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float m = fmaxf(magnitude(h[t][c]), magnitude(h[t][c + 2]));
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
      amax[t][c] = m;
      if (g == 0) amax_part[warp][t * kGroup + 2 * q + c] = m;
    }
  }
  __syncthreads();
  const int64_t n_quant = inter / kCodesPerQuant;
#pragma unroll
  for (int t = 0; t < kGroups; ++t) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = t * kGroup + 2 * q + c;
      float m = amax[t][c];
#pragma unroll
      for (int v = 0; v < kWarps; ++v) m = fmaxf(m, amax_part[v][col]);
      const ActScale sa(m);
      // The codes' fp16 values in pair order (elements 1 and 2 of every four swapped: g and
      // g + 8 move together), as w2 takes its B operand.
      const int at = warp * kTileRows + ((g & ~3) | ((g & 1) << 1) | ((g >> 1) & 1));
      uint16_t* out = hq + int64_t(row0 + col) * inter + int64_t(j) * kPack + at;
      out[0] = fp8_value_as_fp16(h[t][c] * sa.inv);
      out[8] = fp8_value_as_fp16(h[t][c + 2] * sa.inv);
      if (warp == 0 && g == 0) hs[int64_t(row0 + col) * n_quant + j] = sa.scale;
    }
  }
}

__global__ void __launch_bounds__(kW2Warps * 32, 6) moe_w2_kernel(
    const uint16_t* __restrict__ hq, const float* __restrict__ hs, int64_t stride_hq, int64_t stride_hs,
    const uint8_t* __restrict__ w2, const uint8_t* __restrict__ w2s, int64_t stride_we, int64_t stride_se,
    const int* __restrict__ sorted_pair, const int* __restrict__ block_expert, float* __restrict__ part,
    int n_experts, int n_rows, int n_kb) {
  const int blk = blockIdx.x;
  const int expert = block_expert[blk];
  if (expert >= n_experts) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int n0 = (blockIdx.y * kW2Warps + warp) * kTileRows;
  if (n0 >= n_rows) return;  // n_rows is a multiple of 16: a tile is whole or absent
  const WeightRows rows = WeightRows::tiled(w2 + expert * stride_we, w2s + expert * stride_se, n0 / kTileRows, n_kb,
                                            g, q);
  const int row0 = blk * kBlockRows;  // every row of a block holds defined codes (zeros for padding)
  bool live[kGroups];  // a group of padding rows only is skipped: none of its results is stored
#pragma unroll
  for (int t = 0; t < kGroups; ++t) live[t] = __any_sync(0xFFFFFFFFu, sorted_pair[row0 + t * kGroup + g] >= 0);
  float acc[kGroups][4] = {};
  stream_blocks(rows, 0, 1, n_kb, [&](const WeightBlock& block, int kb) {
    const WeightOperand a(block, q);
#pragma unroll
    for (int t = 0; t < kGroups; ++t) {
      if (!live[t]) continue;
      uint32_t b[16];
      load_activation(hq + int64_t(row0 + t * kGroup + g) * stride_hq + kb * kBlockK + q * 32, true, b);
      const int col = row0 + t * kGroup + 2 * q;
      float d[4];
      block_products(a, b, d);
      promote(acc[t], d, __ldg(hs + int64_t(col) * stride_hs + kb), __ldg(hs + int64_t(col + 1) * stride_hs + kb), a);
    }
  });
#pragma unroll
  for (int t = 0; t < kGroups; ++t) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int pair = sorted_pair[row0 + t * kGroup + 2 * q + (r & 1)];
      if (pair >= 0) part[int64_t(pair) * n_rows + n0 + g + (r >= 2 ? 8 : 0)] = acc[t][r];
    }
  }
}

void check_blocks(const at::Tensor& sorted_pair, const at::Tensor& block_expert, const at::Tensor& like) {
  DSV4_CHECK(sorted_pair.scalar_type() == at::kInt && sorted_pair.dim() == 1 && sorted_pair.is_contiguous(),
              "sorted_pair: expected contiguous int32 [blocks * 16]");
  DSV4_CHECK(block_expert.scalar_type() == at::kInt && block_expert.dim() == 1 && block_expert.is_contiguous(),
              "block_expert: expected contiguous int32 [blocks]");
  DSV4_CHECK(sorted_pair.size(0) == block_expert.size(0) * kBlockRows, "sorted_pair: expected ",
              block_expert.size(0) * kBlockRows, " rows (16 per block), got ", sorted_pair.size(0));
  DSV4_CHECK(sorted_pair.device() == like.device() && block_expert.device() == like.device(),
              "sorted_pair, block_expert: expected the weights' device");
}

// The w2 input as moe_decode_w13 writes it: hq fp16 [blocks * 16, inter], hs fp32 [.., inter/128].
void check_w2_input(const at::Tensor& hq, const at::Tensor& hs, int64_t blocks, int64_t inter) {
  DSV4_CHECK(hq.scalar_type() == at::kHalf && hq.is_contiguous() && hq.dim() == 2 &&
                  hq.size(0) == blocks * kBlockRows && hq.size(1) == inter && aligned(hq, 16),
              "hq: expected contiguous fp16 [", blocks * kBlockRows, ", ", inter, "]");
  DSV4_CHECK(hs.scalar_type() == at::kFloat && hs.is_contiguous() && hs.dim() == 2 &&
                  hs.size(0) == blocks * kBlockRows && hs.size(1) == inter / kCodesPerQuant,
              "hs: expected contiguous fp32 [", blocks * kBlockRows, ", ", inter / kCodesPerQuant, "]");
}

}  // namespace

// x_codes fp16 [T, dim] (the FP8 codes' values in pair order, act_quant_rows(fp16_pairs=True))
// and x_scales fp32 [T, dim/128]: act_quant of the tokens; w13 uint8 [E, 2*inter/16, dim/128,
// 16, 64] and w13_scale uint8 [E, 2*inter/16, dim/128, 16, 4] (moe_pack_experts' tiled layout);
// sorted_pair / block_expert: the align's lists for 16-row blocks; route_w fp32 [T * topk].
// Writes hq fp16 [blocks * 16, inter] (the FP8 codes' values, pair order) and hs fp32
// [blocks * 16, inter/128].
void moe_decode_w13(at::Tensor x_codes, at::Tensor x_scales, at::Tensor w13, at::Tensor w13_scale,
                    at::Tensor sorted_pair, at::Tensor block_expert, at::Tensor route_w, at::Tensor hq,
                    at::Tensor hs, int64_t topk, double limit, int64_t stream_handle) {
  check_tiled_weight("w13", w13, "w13_scale", w13_scale);
  DSV4_CHECK(w13.size(1) % (2 * kPack / kTileRows) == 0, "w13: expected 2*inter rows with inter a multiple of 128, "
              "got ", w13.size(1) * kTileRows);
  check_blocks(sorted_pair, block_expert, w13);
  const int64_t dim = w13.size(2) * kBlockK, inter = w13.size(1) * kTileRows / 2, blocks = block_expert.size(0);
  DSV4_CHECK(x_codes.scalar_type() == at::kHalf && x_codes.dim() == 2 && x_codes.size(1) == dim &&
                  x_codes.stride(1) == 1 && x_codes.stride(0) % 8 == 0 && aligned(x_codes, 16),
              "x_codes: expected fp16 [T, ", dim, "] with 16-byte aligned contiguous rows");
  DSV4_CHECK(x_scales.scalar_type() == at::kFloat && x_scales.dim() == 2 && x_scales.size(0) == x_codes.size(0) &&
                  x_scales.size(1) == dim / kBlockK && x_scales.stride(1) == 1,
              "x_scales: expected fp32 [T, ", dim / kBlockK, "]");
  DSV4_CHECK(topk >= 1 && route_w.scalar_type() == at::kFloat && route_w.is_contiguous() &&
                  route_w.numel() == x_codes.size(0) * topk,
              "route_w: expected contiguous fp32 [T * topk]");
  check_w2_input(hq, hs, blocks, inter);
  for (const at::Tensor* t : {&x_codes, &x_scales, &route_w, &hq, &hs}) {
    DSV4_CHECK(t->device() == w13.device(), "moe_decode_w13: every tensor on the weights' device");
  }
  if (blocks == 0) return;
  const DeviceScope scope(w13.get_device());
  const dim3 grid(unsigned(blocks), unsigned(inter / kPack));
  const auto* xq = reinterpret_cast<const uint16_t*>(x_codes.data_ptr());
  auto* hq16 = reinterpret_cast<uint16_t*>(hq.data_ptr());
  moe_w13_kernel<<<grid, kWarps * 32, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      xq, x_scales.data_ptr<float>(), x_codes.stride(0), x_scales.stride(0), w13.data_ptr<uint8_t>(),
      w13_scale.data_ptr<uint8_t>(), w13.stride(0), w13_scale.stride(0),
      sorted_pair.data_ptr<int>(), block_expert.data_ptr<int>(), route_w.data_ptr<float>(), hq16, hs.data_ptr<float>(),
      int(w13.size(0)), int(dim / kBlockK), int(inter), int(topk), float(limit));
  check_launch("moe_decode_w13");
}

// hq / hs as moe_decode_w13 writes them; w2 uint8 [E, dim/16, inter/128, 16, 64], w2_scale uint8
// [E, dim/16, inter/128, 16, 4].  Writes part fp32 [T * topk, dim], row p for pair p (placed
// pairs only).
void moe_decode_w2(at::Tensor hq, at::Tensor hs, at::Tensor w2, at::Tensor w2_scale,
                   at::Tensor sorted_pair, at::Tensor block_expert, at::Tensor part, int64_t stream_handle) {
  check_tiled_weight("w2", w2, "w2_scale", w2_scale);
  check_blocks(sorted_pair, block_expert, w2);
  const int64_t dim = w2.size(1) * kTileRows, inter = w2.size(2) * kBlockK, blocks = block_expert.size(0);
  check_w2_input(hq, hs, blocks, inter);
  DSV4_CHECK(part.scalar_type() == at::kFloat && part.is_contiguous() && part.dim() == 2 && part.size(1) == dim,
              "part: expected contiguous fp32 [pairs, ", dim, "]");
  for (const at::Tensor* t : {&hq, &hs, &part}) {
    DSV4_CHECK(t->device() == w2.device(), "moe_decode_w2: every tensor on the weights' device");
  }
  if (blocks == 0) return;
  const DeviceScope scope(w2.get_device());
  const dim3 grid(unsigned(blocks), unsigned((dim + kW2Warps * kTileRows - 1) / (kW2Warps * kTileRows)));
  const auto* hq16 = reinterpret_cast<const uint16_t*>(hq.data_ptr());
  moe_w2_kernel<<<grid, kW2Warps * 32, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      hq16, hs.data_ptr<float>(), hq.stride(0), hs.stride(0), w2.data_ptr<uint8_t>(),
      w2_scale.data_ptr<uint8_t>(), w2.stride(0), w2_scale.stride(0),
      sorted_pair.data_ptr<int>(), block_expert.data_ptr<int>(), part.data_ptr<float>(), int(w2.size(0)), int(dim),
      int(inter / kBlockK));
  check_launch("moe_decode_w2");
}
