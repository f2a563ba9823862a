// FP4 weight GEMM (MXFP4 or NVFP4) for up to 64 activation rows (decode): y = x_q @ dequant(w)^T.
// targets: sm90a sm100a
//
// Why CUDA: at decode sizes the GEMM is a weight stream (each weight byte meets a handful of
// activation rows), so what matters is how few instructions a weight byte costs and how many
// bytes are in flight.  The Triton kernel expands FP4 to FP8 through shared memory for a
// warp-group MMA and waits for it every K step; here the codes go from global memory straight
// into the registers of mma.sync's A fragment (fp4_mma.cuh), with no barrier between a weight
// load and its MMAs.  The activation rows are the MMA's 8 columns, in groups of 8.
//
// Two kernels, by how the activation rows reach the warps:
// - fp4_decode_gemm_kernel (1 to 16 rows): a CTA owns 16 weight rows and its warps split K in
//   128-wide blocks (block kb goes to warp kb % WARPS); the partial sums meet once, in shared
//   memory, in warp order.  Each warp reads its blocks' activation rows from L2 itself: no
//   shared memory or barrier in the loop, but every 16-row tile reads every activation row,
//   ~350 MB of L2 reads at 16 rows for N = 24576, K = 7168, which is what binds it there.
// - fp4_staged_gemm_kernel (NVFP4, 1 to 64 rows): a CTA owns TILES 16-row tiles and walks K with
//   them in step, KSPLIT blocks at a time; the activation rows of those blocks are copied once
//   a CTA into shared memory (cp.async, three stages) and read from there by all its warps,
//   TILES times fewer L2 reads, for one barrier a step.  On the H100 it beats the Triton GEMM
//   for NVFP4 weights at 17-64 rows on wide N only (1.2-1.5x at N = 24576, K = 7168; slower at
//   N <= 7168, and for MXFP4, whose Triton GEMM runs FP8 warp-group MMAs): the barrier holds
//   every warp to the slowest weight load of its step, and mma.sync runs at a fraction of the
//   warp-group MMA's rate (benchmarks/NOTES.md).
// Which kernel and which TILES a call takes is chosen in cuda_fallback/gemm.py, by measurement.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <ATen/ops/empty.h>

#include <optional>

#include "fp4_mma.cuh"
#include "shared_memory.cuh"

using namespace dsv4;

namespace {

// Rows, Operand: WeightRows, WeightOperand (MXFP4) or Nvfp4Rows, Nvfp4Operand; GROUPS: groups
// of 8 activation rows, each block's decoded A operand serving all of them; global_scale:
// NVFP4's one FP32 value (read on the device: no host sync), nullptr for MXFP4.
// 32 resident warps a multiprocessor (64 registers a thread) with one group; 24 with two, whose
// second B operand and accumulators spill at 64.
template <int WARPS, int GROUPS, class Rows, class Operand>
__global__ void __launch_bounds__(WARPS * 32, (GROUPS == 1 ? 32 : 24) / WARPS) fp4_decode_gemm_kernel(
    const uint16_t* __restrict__ xq, const float* __restrict__ xs, const uint8_t* __restrict__ w,
    const uint8_t* __restrict__ ws, const float* __restrict__ global_scale, __nv_bfloat16* __restrict__ y,
    int m_rows, int n_rows, int n_kb, int64_t stride_xq, int64_t stride_xs, int64_t stride_w, int64_t stride_ws,
    int64_t stride_y) {
  __shared__ float partial[WARPS][GROUPS * 4][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int n0 = blockIdx.x * kTileRows;
  // Rows past N read row N - 1 (in bounds) and are never stored.
  const Rows rows =
      Rows::row_major(w, ws, min(n0 + g, n_rows - 1), min(n0 + g + 8, n_rows - 1), stride_w, stride_ws, q);
  const int col = 2 * q;  // the D columns of this lane: activation rows col, col + 1 of each group
  float acc[GROUPS][4] = {};
  // One block ahead: two ahead measured slower on the H100 (51.4 against 48.4 us at N = 24576,
  // K = 7168): it takes 80 registers a thread, 24 resident warps a multiprocessor instead of 32.
  stream_blocks(rows, warp, WARPS, n_kb, [&](const WeightBlock& block, int kb) {
    const Operand a(block, q);
#pragma unroll
    for (int t = 0; t < GROUPS; ++t) {
      const int row = 8 * t + g, c0 = 8 * t + col;
      uint32_t b[16];
      load_activation(xq + row * stride_xq + q * 32 + kb * kBlockK, row < m_rows, b);
      float d[4];
      block_products(a, b, d);
      const float sx0 = c0 < m_rows ? __ldg(xs + c0 * stride_xs + kb) : 0.f;
      const float sx1 = c0 + 1 < m_rows ? __ldg(xs + (c0 + 1) * stride_xs + kb) : 0.f;
      promote(acc[t], d, sx0, sx1, a);
    }
  });
#pragma unroll
  for (int t = 0; t < GROUPS; ++t) {
#pragma unroll
    for (int r = 0; r < 4; ++r) partial[warp][4 * t + r][lane] = acc[t][r];
  }
  __syncthreads();
  const float scale = global_scale == nullptr ? 1.f : __ldg(global_scale);
  for (int idx = threadIdx.x; idx < GROUPS * 4 * 32; idx += WARPS * 32) {
    const int l = idx & 31, r = (idx >> 5) & 3, t = idx >> 7;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) sum += partial[v][4 * t + r][l];
    const int n = n0 + (l >> 2) + (r >= 2 ? 8 : 0);
    const int m = 8 * t + 2 * (l & 3) + (r & 1);
    if (n < n_rows && m < m_rows) y[m * stride_y + n] = __float2bfloat16_rn(sum * scale);
  }
}

// launch(kernel, warps) with the kernel of these rows and operand, one or two row groups, 8 warps
// for few row tiles or 4.
template <class Rows, class Operand, class Launch>
void launch_variant(bool two_groups, bool few_tiles, Launch&& launch) {
  if (two_groups)
    few_tiles ? launch(fp4_decode_gemm_kernel<8, 2, Rows, Operand>, 8)
              : launch(fp4_decode_gemm_kernel<4, 2, Rows, Operand>, 4);
  else
    few_tiles ? launch(fp4_decode_gemm_kernel<8, 1, Rows, Operand>, 8)
              : launch(fp4_decode_gemm_kernel<4, 1, Rows, Operand>, 4);
}

// --- activation rows staged in shared memory ----------------------------------------------

constexpr int kStagedMaxRows = 64;  // 8 groups of the MMA's 8 columns
constexpr int kStages = 3;
constexpr int kStagedWarps = 8;
constexpr int kRowChunks = kBlockK * 2 / 16;  // 16-byte chunks of one row's fp16 block (16)

// Where chunk c (0..15) of a staged activation row goes: lane (g, q) of a warp reads chunks
// 4q + i of row 8t + g, eight lanes a 16-byte load phase (g in {2p, 2p + 1}, q in 0..3); the
// swizzle spreads those eight over the eight 16-byte bank slots (bits 0-1 take q >> 1 and the
// row's parity, bit 2 is already q & 1).
__device__ __forceinline__ int staged_chunk(int row, int c) { return c ^ (((c >> 3) & 1) | ((row & 1) << 1)); }

// One stage, in bytes: for each of KSPLIT K blocks `rows` activation rows of 256 bytes (fp16
// pair order, chunks swizzled), then their `rows` FP32 scales.
struct StageLayout {
  int rows;  // 8 * groups
  __device__ __host__ __forceinline__ int act_codes(int split) const { return split * rows * (kBlockK * 2 + 4); }
  __device__ __host__ __forceinline__ int act_scales(int split) const {
    return act_codes(split) + rows * kBlockK * 2;
  }
  __device__ __host__ __forceinline__ int bytes(int ksplit) const { return act_codes(ksplit); }
};

// TILES 16-row weight tiles a CTA (TILES * 16 rows), KSPLIT warps a tile splitting K (warp w:
// tile w % TILES, blocks kb = KSPLIT * j + w / TILES).  Each step's activation rows arrive by
// cp.async, kStages - 1 steps ahead; a warp's weight blocks come straight into its registers,
// as in fp4_decode_gemm_kernel (staged in shared memory too, four stages, they measured
// slower: 1.1-1.5x the time at 1-64 rows).  A warp decodes its block a word at a time and runs
// that word's MMAs for every group before the next, each group with its own accumulators.
// Rows past m_rows are neither copied nor stored: their MMA columns hold whatever the stage
// held, and no column mixes into another.  Dynamic shared memory: staged_smem_bytes.
template <int TILES, int KSPLIT, int GROUPS, class Rows, class Operand>
__global__ void __launch_bounds__(kStagedWarps * 32, 2) fp4_staged_gemm_kernel(
    const uint16_t* __restrict__ xq, const float* __restrict__ xs, const uint8_t* __restrict__ w,
    const uint8_t* __restrict__ ws, const float* __restrict__ global_scale, __nv_bfloat16* __restrict__ y,
    int m_rows, int n_rows, int n_kb, int64_t stride_xq, int64_t stride_xs, int64_t stride_w, int64_t stride_ws,
    int64_t stride_y) {
  static_assert(TILES * KSPLIT == kStagedWarps, "eight warps a CTA");
  constexpr int kThreads = kStagedWarps * 32, kGroups = GROUPS;
  constexpr int kCtaRows = TILES * kTileRows;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int split = warp / TILES;
  const int g = lane >> 2, q = lane & 3;
  const int groups = (m_rows + kGroup - 1) / kGroup;
  const StageLayout layout{kGroup * groups};
  const int stage_bytes = layout.bytes(KSPLIT);
  const int steps = (n_kb + KSPLIT - 1) / KSPLIT;
  const int cta_row0 = blockIdx.x * kCtaRows;
  const int n0 = cta_row0 + (warp % TILES) * kTileRows;
  // Rows past N read row N - 1 (in bounds) and are never stored.
  const Rows rows =
      Rows::row_major(w, ws, min(n0 + g, n_rows - 1), min(n0 + g + 8, n_rows - 1), stride_w, stride_ws, q);

  const uint32_t smem_base = smem_addr(smem);
  const auto copy_step = [&](int j) {
    if (j < steps) {
      const uint32_t stage = smem_base + (j % kStages) * stage_bytes;
      const int chunks = m_rows * kRowChunks;
      for (int idx = threadIdx.x; idx < KSPLIT * chunks; idx += kThreads) {
        const int s = idx / chunks, r = (idx - s * chunks) / kRowChunks, c = idx % kRowChunks;
        const int kb = KSPLIT * j + s;
        if (kb < n_kb)
          cp_async16(stage + layout.act_codes(s) + r * (kBlockK * 2) + staged_chunk(r, c) * 16,
                     xq + r * stride_xq + kb * kBlockK + c * 8);
      }
      for (int idx = threadIdx.x; idx < KSPLIT * m_rows; idx += kThreads) {
        const int s = idx / m_rows, r = idx - s * m_rows;
        const int kb = KSPLIT * j + s;
        cp_async4(stage + layout.act_scales(s) + r * 4, xs + r * stride_xs + kb, kb < n_kb);
      }
    }
    cp_async_commit();  // an empty group past the last step keeps the wait counts uniform
  };

  float acc[kGroups][4] = {};
  for (int j = 0; j < kStages - 1; ++j) copy_step(j);
  // Weight blocks in flight a warp: every warp waits at each step's barrier, so with one a step
  // is a whole memory round trip; two measured faster up to four groups (1.1-1.2x at 17-32
  // rows), slower with eight, whose accumulators leave no room for them (spills).
  constexpr int kAhead = GROUPS <= 4 ? 2 : 1;
  WeightBlock ahead[kAhead];
#pragma unroll
  for (int a = 0; a < kAhead; ++a)
    if (split + a * KSPLIT < n_kb) ahead[a] = rows.load(split + a * KSPLIT);
  for (int j = 0; j < steps; ++j) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step j's copies visible to all; step j - 1's stage free to refill
    copy_step(j + kStages - 1);
    const int kb = KSPLIT * j + split;
    if (kb < n_kb) {
      const WeightBlock block = ahead[0];
#pragma unroll
      for (int a = 0; a + 1 < kAhead; ++a) ahead[a] = ahead[a + 1];
      if (kb + kAhead * KSPLIT < n_kb) ahead[kAhead - 1] = rows.load(kb + kAhead * KSPLIT);
      const uint8_t* stage = smem + (j % kStages) * stage_bytes;
      const BlockWords a = Operand::words(block, q);
      const uint8_t* codes = stage + layout.act_codes(split);
      float d[kGroups][4] = {};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t lo[4], hi[4];
        a.word(i, lo, hi);
#pragma unroll
        for (int t = 0; t < kGroups; ++t) {
          if (t < groups) {
            // MMAs 2i and 2i + 1 of the block (block_products' order): chunk 4q + i of the
            // lane's activation row holds both k steps' B registers.
            const int row = kGroup * t + g;
            const uint4 v =
                *reinterpret_cast<const uint4*>(codes + row * (kBlockK * 2) + staged_chunk(row, 4 * q + i) * 16);
            mma_16816(d[t], lo[0], hi[0], lo[2], hi[2], v.x, v.y);
            mma_16816(d[t], lo[1], hi[1], lo[3], hi[3], v.z, v.w);
          }
        }
      }
      const float* scales = reinterpret_cast<const float*>(stage + layout.act_scales(split));
#pragma unroll
      for (int t = 0; t < kGroups; ++t) {
        if (t < groups) {
          const float2 sx = *reinterpret_cast<const float2*>(scales + kGroup * t + 2 * q);
          promote(acc[t], d[t], sx.x, sx.y, a);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every stage read: the partial sums reuse the space

  // partial[warp][4t + r][lane] = acc[t][r]; then each output (m, n) sums its tile's KSPLIT
  // warps in split order, threads in n order so the bf16 stores of a warp are contiguous.
  float* partial = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int t = 0; t < kGroups; ++t) {
    if (t < groups) {
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[(warp * 4 * groups + 4 * t + r) * 32 + lane] = acc[t][r];
    }
  }
  __syncthreads();
  const float scale = global_scale == nullptr ? 1.f : __ldg(global_scale);
  for (int idx = threadIdx.x; idx < m_rows * kCtaRows; idx += kThreads) {
    const int m = idx / kCtaRows, nl = idx - m * kCtaRows;
    const int tl = nl / kTileRows, rho = nl % kTileRows;
    const int src_lane = 4 * (rho & 7) + ((m & 7) >> 1), r = 2 * (rho >> 3) + (m & 1);
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < KSPLIT; ++s)
      sum += partial[((s * TILES + tl) * 4 * groups + 4 * (m >> 3) + r) * 32 + src_lane];
    const int n = cta_row0 + nl;
    if (n < n_rows) y[m * stride_y + n] = __float2bfloat16_rn(sum * scale);
  }
}

// Dynamic shared memory of the staged kernel for m rows: the stages, or the epilogue's partial
// sums if larger.
int staged_smem_bytes(int ksplit, int64_t m) {
  const StageLayout layout{int(kGroup * ((m + kGroup - 1) / kGroup))};
  const int stages = kStages * layout.bytes(ksplit);
  const int partials = kStagedWarps * 4 * int((m + kGroup - 1) / kGroup) * 32 * int(sizeof(float));
  return stages > partials ? stages : partials;
}

// launch(kernel, smem bytes) with the staged kernel (NVFP4) for m rows: four groups'
// accumulators up to 32 rows, eight beyond.
template <class Launch>
void launch_staged(int64_t tiles, int64_t m, Launch&& launch) {
  using R = Nvfp4Rows;
  using O = Nvfp4Operand;
  const bool four = m <= 4 * kGroup;
  if (tiles == 8)
    four ? launch(fp4_staged_gemm_kernel<8, 1, 4, R, O>, staged_smem_bytes(1, m))
         : launch(fp4_staged_gemm_kernel<8, 1, 8, R, O>, staged_smem_bytes(1, m));
  else
    four ? launch(fp4_staged_gemm_kernel<4, 2, 4, R, O>, staged_smem_bytes(2, m))
         : launch(fp4_staged_gemm_kernel<4, 2, 8, R, O>, staged_smem_bytes(2, m));
}

}  // namespace

// x_codes: fp16 [M, 128 * n_kb], the FP8 E4M3 activation codes' values in pair order
// (act_quant_rows(fp16_pairs=True)), x_scales: fp32 [M, n_kb] (act_quant with 1x128
// power-of-two scales); w: uint8 [N, K/2] FP4 codes.  MXFP4 (no global_scale): w_scale uint8
// [N, K/32] E8M0.  NVFP4: w_scale uint8 [N, K/16] E4M3 and global_scale fp32 of one element.
// K = 128 * n_kb.  tiles: 0 for fp4_decode_gemm_kernel (M <= 16), or the staged kernel's 16-row
// tiles a CTA, 4 or 8 (NVFP4, M <= 64).  stream: the raw cudaStream_t to launch on (the caller's
// current stream).  Returns bf16 [M, N].
at::Tensor fp4_decode_gemm(at::Tensor x_codes, at::Tensor x_scales, at::Tensor w, at::Tensor w_scale,
                           std::optional<at::Tensor> global_scale, int64_t tiles, int64_t stream_handle) {
  DSV4_CHECK(x_codes.is_cuda() && x_codes.scalar_type() == at::kHalf && x_codes.dim() == 2,
              "x_codes: expected a CUDA fp16 [M, K] tensor");
  DSV4_CHECK(x_scales.scalar_type() == at::kFloat && x_scales.dim() == 2, "x_scales: expected fp32 [M, K/128]");
  const bool nvfp4 = global_scale.has_value();
  DSV4_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "w: expected uint8 [N, K/2]");
  DSV4_CHECK(w_scale.scalar_type() == at::kByte && w_scale.dim() == 2,
              nvfp4 ? "w_scale: expected uint8 [N, K/16]" : "w_scale: expected uint8 [N, K/32]");
  DSV4_CHECK(tiles == 0 || tiles == 4 || tiles == 8, "tiles: expected 0, 4 or 8, got ", tiles);
  DSV4_CHECK(tiles == 0 || nvfp4, "tiles: the staged kernel takes NVFP4 weights only (MXFP4: tiles = 0), got ", tiles);
  const int64_t m = x_codes.size(0), n = w.size(0), k = 2 * w.size(1);
  const int64_t max_rows = tiles == 0 ? 2 * kGroup : kStagedMaxRows;
  DSV4_CHECK(m >= 1 && m <= max_rows, "x_codes: expected 1 to ", max_rows, " rows with tiles = ", tiles, ", got ", m);
  DSV4_CHECK(n >= 1 && n < (int64_t(1) << 31), "w: expected 1 to 2^31 - 1 rows, got ", n);
  DSV4_CHECK(k % kBlockK == 0 && k >= kBlockK, "w: K must be a positive multiple of 128, got ", k);
  const int64_t n_kb = k / kBlockK;
  DSV4_CHECK(x_codes.size(1) == k && x_codes.stride(1) == 1 && x_codes.stride(0) % 8 == 0,
              "x_codes: expected [M, ", k, "] with 16-byte aligned contiguous rows");
  DSV4_CHECK(x_scales.size(0) == m && x_scales.size(1) == n_kb && x_scales.stride(1) == 1,
              "x_scales: expected [M, ", n_kb, "] with contiguous rows");
  check_weight_rows("w", w, "w_scale", w_scale, nvfp4 ? 16 : 32);
  DSV4_CHECK(reinterpret_cast<uintptr_t>(x_codes.data_ptr()) % 16 == 0, "x_codes: expected 16-byte alignment");
  DSV4_CHECK(x_scales.device() == x_codes.device() && w.device() == x_codes.device() &&
                  w_scale.device() == x_codes.device(),
              "all tensors must be on one CUDA device");
  const float* gs = nullptr;
  if (nvfp4) {
    const at::Tensor& t = *global_scale;
    DSV4_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1 && t.device() == x_codes.device(),
                "global_scale: expected one fp32 element on the device of x_codes");
    gs = t.data_ptr<float>();
  }
  const DeviceScope scope(x_codes.get_device());
  auto y = at::empty({m, n}, x_codes.options().dtype(at::kBFloat16));
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  auto* out = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
  const auto* xq = reinterpret_cast<const uint16_t*>(x_codes.data_ptr());
  const int64_t row_tiles = (n + kTileRows - 1) / kTileRows;
  const auto args = [&](auto kernel, dim3 grid, int threads, int smem) {
    kernel<<<grid, threads, smem, stream>>>(xq, x_scales.data_ptr<float>(), w.data_ptr<uint8_t>(),
                                            w_scale.data_ptr<uint8_t>(), gs, out, int(m), int(n), int(n_kb),
                                            x_codes.stride(0), x_scales.stride(0), w.stride(0), w_scale.stride(0), n);
  };
  if (tiles == 0) {
    const dim3 grid{unsigned(row_tiles)};
    const auto launch = [&](auto kernel, int warps) { args(kernel, grid, warps * 32, 0); };
    // Few row tiles: eight warps split K, so enough bytes are in flight on every multiprocessor.
    const bool few_tiles = int(grid.x) < 4 * multiprocessors(x_codes.get_device());
    if (nvfp4)
      launch_variant<Nvfp4Rows, Nvfp4Operand>(m > kGroup, few_tiles, launch);
    else
      launch_variant<WeightRows, WeightOperand>(m > kGroup, few_tiles, launch);
  } else {
    const dim3 grid{unsigned((row_tiles + tiles - 1) / tiles)};
    const auto launch = [&](auto kernel, int smem) {
      DSV4_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess,
                 "fp4_decode_gemm: cannot raise the shared-memory limit");
      args(kernel, grid, kStagedWarps * 32, smem);
    };
    launch_staged(tiles, m, launch);
  }
  check_launch("fp4_decode_gemm");
  return y;
}
