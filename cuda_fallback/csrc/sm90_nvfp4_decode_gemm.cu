// NVFP4 weight GEMM for 1 to 64 activation rows on the warp-group MMA (sm_90a):
// y = x_q @ dequant(w)^T.
// targets: sm90a
//
// Why: from 17 rows the mma.sync kernel of fp4_decode_gemm.cu reads every activation row from
// L2 once per 16 weight rows and issues 8 MMAs a row group and block, and the Triton GEMM runs
// NVFP4 (unlike MXFP4, whose values fold into FP8) as BF16 mma.sync.  Here a CTA is one
// warpgroup owning 64 weight rows: each thread decodes its two rows' FP4 codes into the A
// fragments of an RS-form wgmma (registers: the same per-warp layout as mma.sync's,
// fp4_mma.cuh), and the activation rows are its B operand, 64 rows x one 128-wide K block a
// stage in shared memory (128-byte swizzle, K-major).  The activation pre-pass writes the
// codes' values as fp16 in the MMA's k-slot order (act_quant_rows(mma_slots=True)): slot
// 2q + e of k step s holds element 32q + 4s + 2e, slot 2q + 8 + e element 32q + 4s + 1 + 2e,
// the order in which fp4_mma.cuh lays the decoded weight out.  Weights and activations arrive
// by cp.async a block ahead; a block's eight MMAs run while the next block is decoded, and
// its FP32 sums are promoted (activation scale per column; the 2^6 the decoded codes carry)
// after their wait, as the other FP4 GEMMs promote; the global scale multiplies each sum once.
// Rows past M are not copied: their MMA columns are never stored.
//
// Occupancy is what binds it (H100, N = 24576, K = 7168): a block's decode, issue and
// promotion are a few hundred dependent instructions a thread, so the time is set by how many
// warps a multiprocessor holds.  With five stages, three blocks ahead and two CTAs a
// multiprocessor it took 132-157 us at 1-64 rows; with three stages, one block ahead and three
// CTAs (136 registers) 84-102 us (benchmarks/NOTES.md).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <ATen/ops/empty.h>

#include "fp4_mma.cuh"
#include "sm90_wgmma.cuh"

using namespace dsv4;

namespace {

constexpr int kThreads = 128;                  // one warpgroup
constexpr int kRows = 64;                      // weight rows a CTA: the wgmma's M
constexpr int kTokens = 64;                    // activation rows: the wgmma's N
constexpr int kPanelBytes = kTokens * 128;     // 64 rows x 64 k slots (4 k steps), 128-byte swizzle
constexpr int kActBytes = 2 * kPanelBytes;     // one 128-wide K block
constexpr int kCodeBytes = kRows * kBlockK / 2;  // the weight block: 64 rows x 64 bytes
constexpr int kScaleBytes = kBlockK / 16;      // E4M3 scales a row and block
constexpr int kStageBytes = 21504;             // act + codes + scales + act scales, a 1 KB multiple
constexpr int kStages = 3;
constexpr int kAhead = 1;       // blocks in flight; the stage of block j - 1 stays intact until j's promotion
constexpr int kCtasPerSm = 3;   // 136 registers a thread (<= 168)
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + realignment to 1024
static_assert(kActBytes + kCodeBytes + kRows * kScaleBytes + kTokens * 4 <= kStageBytes, "stage layout");
static_assert(kAhead + 2 <= kStages, "a stage is refilled only after the promotion that reads it");

struct Params {
  const uint16_t* xq;
  const float* xs;
  const uint8_t* w;
  const uint8_t* ws;
  const float* global_scale;
  __nv_bfloat16* y;
  int m_rows, n_rows, n_kb;
  int64_t stride_xq, stride_xs, stride_w, stride_ws, stride_y;
};

// One stage: the activation block (two 64 x 128-byte swizzled panels), the weight block
// (row r's 64 code bytes at 64 r), the weight scale bytes (8 a row), the activation scales (one
// float a row).
constexpr int kCodes = kActBytes;
constexpr int kScales = kCodes + kCodeBytes;
constexpr int kActScales = kScales + kRows * kScaleBytes;

__global__ void __launch_bounds__(kThreads, kCtasPerSm) nvfp4_wgmma_gemm_kernel(const __grid_constant__ Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t smem0 = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int row0 = blockIdx.x * kRows;
  const int n_kb = p.n_kb, m_rows = p.m_rows;

  const auto copy_block = [&](int kb) {
    if (kb < n_kb) {
      const uint32_t stage = smem0 + (kb % kStages) * kStageBytes;
      for (int idx = tid; idx < m_rows * 16; idx += kThreads) {  // activation rows: 16 chunks each
        const int r = idx >> 4, c = idx & 15;
        cp_async16(stage + (c >> 3) * kPanelBytes + swizzled(r, c & 7), p.xq + r * p.stride_xq + kb * kBlockK + c * 8);
      }
#pragma unroll
      for (int i = 0; i < kCodeBytes / 16 / kThreads; ++i) {  // weight rows: 4 chunks each
        const int idx = tid + kThreads * i, r = idx >> 2, c = idx & 3;
        const int64_t row = min(row0 + r, p.n_rows - 1);  // rows past N read row N - 1, never stored
        cp_async16(stage + kCodes + 64 * r + 16 * c, p.w + row * p.stride_w + kb * (kBlockK / 2) + 16 * c);
      }
      for (int idx = tid; idx < kRows * kScaleBytes / 4; idx += kThreads) {
        const int r = idx / (kScaleBytes / 4), word = idx % (kScaleBytes / 4);
        const int64_t row = min(row0 + r, p.n_rows - 1);
        cp_async4(stage + kScales + kScaleBytes * r + 4 * word,
                  p.ws + row * p.stride_ws + kb * kScaleBytes + 4 * word, true);
      }
      for (int r = tid; r < m_rows; r += kThreads)
        cp_async4(stage + kActScales + 4 * r, p.xs + r * p.stride_xs + kb, true);
    }
    cp_async_commit();  // empty past the last block: the wait counts stay uniform
  };

  // A fragments of block kb's 8 k steps for this thread's rows 16 warp + g and + 8.
  const auto decode = [&](uint32_t (&a)[8][4], float& scale_lo, float& scale_hi, int kb) {
    const uint8_t* stage = smem + (kb % kStages) * kStageBytes;
    const int r = 16 * warp + g;
    const uint8_t* codes = stage + kCodes + 64 * r + 16 * q;
    const uint8_t* scales = stage + kScales + kScaleBytes * r;
    WeightBlock b;
    b.lo = *reinterpret_cast<const uint4*>(codes);
    b.hi = *reinterpret_cast<const uint4*>(codes + 8 * 64);
    b.s_lo = reinterpret_cast<const uint16_t*>(scales)[q];  // the two 16-blocks of 32-block q
    b.s_hi = reinterpret_cast<const uint16_t*>(scales + 8 * kScaleBytes)[q];
    const BlockWords words = BlockWords::nvfp4(b);
    scale_lo = words.scale_lo;
    scale_hi = words.scale_hi;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t lo[4], hi[4];
      words.word(i, lo, hi);
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // k steps 2i + h: block_products' order
        a[2 * i + h][0] = lo[h];
        a[2 * i + h][1] = hi[h];
        a[2 * i + h][2] = lo[2 + h];
        a[2 * i + h][3] = hi[2 + h];
      }
    }
  };

  const auto issue = [&](float (&d)[32], uint32_t (&a)[8][4], int kb) {
    const uint32_t act = smem0 + (kb % kStages) * kStageBytes;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 8; ++s)
      wgmma_m64n64k16_rs_f16(d, a[s], smem_desc(act + (s >> 2) * kPanelBytes + (s & 3) * 32, 16, 1024), s != 0);
    wgmma_commit();
  };

  float acc[32] = {};
  // acc += d * activation scale (column) * weight row scale, block kb's (its stage still holds
  // the activation scales).
  const auto promote = [&](float (&d)[32], uint32_t (&a)[8][4], float scale_lo, float scale_hi, int kb) {
    pin_product(d, a);
    const float* sx = reinterpret_cast<const float*>(smem + (kb % kStages) * kStageBytes + kActScales);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 s2 = *reinterpret_cast<const float2*>(sx + 8 * i + 2 * q);
      acc[4 * i + 0] += (d[4 * i + 0] * s2.x) * scale_lo;
      acc[4 * i + 1] += (d[4 * i + 1] * s2.y) * scale_lo;
      acc[4 * i + 2] += (d[4 * i + 2] * s2.x) * scale_hi;
      acc[4 * i + 3] += (d[4 * i + 3] * s2.y) * scale_hi;
    }
  };

  for (int kb = 0; kb < kAhead; ++kb) copy_block(kb);
  uint32_t a0[8][4], a1[8][4];
  float d0[32], d1[32];
  float s0_lo = 0.f, s0_hi = 0.f, s1_lo = 0.f, s1_hi = 0.f;
  // Block kb: wait for its copies, start block kb + kAhead's, decode, issue its MMAs, then
  // retire block kb - 1's and promote them.  Two blocks a round, one register set each.
  const auto start = [&](uint32_t (&a)[8][4], float (&d)[32], float& s_lo, float& s_hi, int kb) {
    cp_async_wait<kAhead - 1>();
    __syncthreads();
    copy_block(kb + kAhead);
    decode(a, s_lo, s_hi, kb);
    issue(d, a, kb);
  };
  for (int kb = 0; kb < n_kb; kb += 2) {
    start(a0, d0, s0_lo, s0_hi, kb);
    if (kb > 0) {
      wgmma_wait<1>();
      promote(d1, a1, s1_lo, s1_hi, kb - 1);
    }
    if (kb + 1 < n_kb) {
      start(a1, d1, s1_lo, s1_hi, kb + 1);
      wgmma_wait<1>();
      promote(d0, a0, s0_lo, s0_hi, kb);
    } else {
      wgmma_wait<0>();
      promote(d0, a0, s0_lo, s0_hi, kb);
    }
  }
  if (n_kb % 2 == 0) {
    wgmma_wait<0>();
    promote(d1, a1, s1_lo, s1_hi, n_kb - 1);
  }
  cp_async_wait<0>();

  const float scale = __ldg(p.global_scale);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = row0 + 16 * warp + g + 8 * (e >> 1), m = 8 * i + 2 * q + (e & 1);
      if (n < p.n_rows && m < m_rows) p.y[m * p.stride_y + n] = __float2bfloat16_rn(acc[4 * i + e] * scale);
    }
  }
}

}  // namespace

// x_codes: fp16 [M, 128 * n_kb], the FP8 E4M3 activation codes' values in MMA slot order
// (act_quant_rows(mma_slots=True)), 16-byte aligned rows; x_scales: fp32 [M, n_kb]; w: uint8
// [N, K/2] FP4 codes, w_scale: uint8 [N, K/16] E4M3 (rows 4-byte aligned), global_scale: fp32
// of one element (read on the device).  M <= 64.  stream: the raw cudaStream_t to launch on.
// Returns bf16 [M, N].
at::Tensor nvfp4_wgmma_gemm(at::Tensor x_codes, at::Tensor x_scales, at::Tensor w, at::Tensor w_scale,
                            at::Tensor global_scale, int64_t stream_handle) {
  require_sm90(x_codes.get_device(), "nvfp4_wgmma_gemm");
  DSV4_CHECK(x_codes.is_cuda() && x_codes.scalar_type() == at::kHalf && x_codes.dim() == 2,
              "x_codes: expected a CUDA fp16 [M, K] tensor");
  DSV4_CHECK(x_scales.scalar_type() == at::kFloat && x_scales.dim() == 2, "x_scales: expected fp32 [M, K/128]");
  DSV4_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "w: expected uint8 [N, K/2]");
  const int64_t m = x_codes.size(0), n = w.size(0), k = 2 * w.size(1);
  DSV4_CHECK(m >= 1 && m <= kTokens, "x_codes: expected 1 to ", kTokens, " rows, got ", m);
  DSV4_CHECK(n >= 1 && n < (int64_t(1) << 31), "w: expected 1 to 2^31 - 1 rows, got ", n);
  check_weight_rows("w", w, "w_scale", w_scale, 16);
  DSV4_CHECK(aligned(w_scale, 4) && w_scale.stride(0) % 4 == 0, "w_scale: expected 4-byte aligned rows");
  const int64_t n_kb = k / kBlockK;
  DSV4_CHECK(x_codes.size(1) == k && x_codes.stride(1) == 1 && x_codes.stride(0) % 8 == 0 && aligned(x_codes, 16),
              "x_codes: expected [M, ", k, "] with 16-byte aligned contiguous rows");
  DSV4_CHECK(x_scales.size(0) == m && x_scales.size(1) == n_kb && x_scales.stride(1) == 1,
              "x_scales: expected [M, ", n_kb, "] with contiguous rows");
  DSV4_CHECK(global_scale.scalar_type() == at::kFloat && global_scale.numel() == 1,
              "global_scale: expected one fp32 element");
  DSV4_CHECK(x_scales.device() == x_codes.device() && w.device() == x_codes.device() &&
                  global_scale.device() == x_codes.device(),
              "all tensors must be on one CUDA device");
  const DeviceScope scope(x_codes.get_device());
  auto y = at::empty({m, n}, x_codes.options().dtype(at::kBFloat16));
  Params p{};
  p.xq = reinterpret_cast<const uint16_t*>(x_codes.data_ptr());
  p.xs = x_scales.data_ptr<float>();
  p.w = w.data_ptr<uint8_t>();
  p.ws = w_scale.data_ptr<uint8_t>();
  p.global_scale = global_scale.data_ptr<float>();
  p.y = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
  p.m_rows = int(m);
  p.n_rows = int(n);
  p.n_kb = int(n_kb);
  p.stride_xq = x_codes.stride(0);
  p.stride_xs = x_scales.stride(0);
  p.stride_w = w.stride(0);
  p.stride_ws = w_scale.stride(0);
  p.stride_y = n;
  DSV4_CHECK(cudaFuncSetAttribute(nvfp4_wgmma_gemm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  kSmemBytes) == cudaSuccess,
             "nvfp4_wgmma_gemm: cannot raise the shared-memory limit");
  const dim3 grid{unsigned((n + kRows - 1) / kRows)};
  nvfp4_wgmma_gemm_kernel<<<grid, kThreads, kSmemBytes, reinterpret_cast<cudaStream_t>(stream_handle)>>>(p);
  check_launch("nvfp4_wgmma_gemm");
  return y;
}
