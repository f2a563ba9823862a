// FP4 weight GEMM (MXFP4 or NVFP4) for up to 16 activation rows (decode): y = x_q @ dequant(w)^T.
// targets: sm90a sm100a
//
// Why CUDA: at decode sizes the GEMM is a weight stream (each weight byte meets a handful of
// activation rows), so what matters is how few instructions a weight byte costs and how many
// bytes are in flight.  The Triton kernel expands FP4 to FP8 through shared memory for a
// warp-group MMA and waits for it every K step; here the codes go from global memory straight
// into the registers of mma.sync's A fragment (fp4_mma.cuh), with no shared memory and no
// barrier in the loop.
//
// A CTA owns 16 weight rows and its warps split K in 128-wide blocks (block kb goes to warp
// kb % WARPS); the partial sums meet once, in shared memory, in warp order.  The activation
// rows are the MMA's 8 columns, one or two groups of them.  Every CTA reads all activation rows
// of its K blocks from L2, which is why the backend stops at 8 rows, or 16 on long K
// (cuda_fallback/gemm.py).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <ATen/ops/empty.h>

#include <optional>

#include "fp4_mma.cuh"

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

}  // namespace

// x_codes: fp16 [M, 128 * n_kb], the FP8 E4M3 activation codes' values in pair order
// (act_quant_rows(fp16_pairs=True)), x_scales: fp32 [M, n_kb] (act_quant with 1x128
// power-of-two scales); w: uint8 [N, K/2] FP4 codes.  MXFP4 (no global_scale): w_scale uint8
// [N, K/32] E8M0.  NVFP4: w_scale uint8 [N, K/16] E4M3 and global_scale fp32 of one element.
// K = 128 * n_kb.  stream: the raw cudaStream_t to launch on (the caller's current stream).
// Returns bf16 [M, N].
at::Tensor fp4_decode_gemm(at::Tensor x_codes, at::Tensor x_scales, at::Tensor w, at::Tensor w_scale,
                           std::optional<at::Tensor> global_scale, int64_t stream_handle) {
  DSV4_CHECK(x_codes.is_cuda() && x_codes.scalar_type() == at::kHalf && x_codes.dim() == 2,
              "x_codes: expected a CUDA fp16 [M, K] tensor");
  DSV4_CHECK(x_scales.scalar_type() == at::kFloat && x_scales.dim() == 2, "x_scales: expected fp32 [M, K/128]");
  const bool nvfp4 = global_scale.has_value();
  DSV4_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "w: expected uint8 [N, K/2]");
  DSV4_CHECK(w_scale.scalar_type() == at::kByte && w_scale.dim() == 2,
              nvfp4 ? "w_scale: expected uint8 [N, K/16]" : "w_scale: expected uint8 [N, K/32]");
  const int64_t m = x_codes.size(0), n = w.size(0), k = 2 * w.size(1);
  DSV4_CHECK(m >= 1 && m <= 2 * kGroup, "x_codes: expected 1 to ", 2 * kGroup, " rows, got ", m);
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
  const dim3 grid(unsigned((n + kTileRows - 1) / kTileRows));
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  auto* out = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
  const auto* xq = reinterpret_cast<const uint16_t*>(x_codes.data_ptr());
  const auto launch = [&](auto kernel, int warps) {
    kernel<<<grid, warps * 32, 0, stream>>>(xq, x_scales.data_ptr<float>(), w.data_ptr<uint8_t>(),
                                            w_scale.data_ptr<uint8_t>(), gs, out, int(m), int(n), int(n_kb),
                                            x_codes.stride(0), x_scales.stride(0), w.stride(0), w_scale.stride(0), n);
  };
  // Few row tiles: eight warps split K, so enough bytes are in flight on every multiprocessor.
  const bool few_tiles = int(grid.x) < 4 * multiprocessors(x_codes.get_device());
  if (nvfp4)
    launch_variant<Nvfp4Rows, Nvfp4Operand>(m > kGroup, few_tiles, launch);
  else
    launch_variant<WeightRows, WeightOperand>(m > kGroup, few_tiles, launch);
  check_launch("fp4_decode_gemm");
  return y;
}
