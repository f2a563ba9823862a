// FP8 weight GEMM for 1 to 16 activation rows (decode): y = act_quant(x) @ dequant(w)^T, one launch.
// targets: sm90a
//
// At decode the GEMM is a stream of the weight's bytes, and on the narrow projections (11 MB at
// N x K = 7168 x 1536 and 1536 x 7168) the Triton GEMM's K loop, a few stages of a few KB in
// flight a program, spends ~8.6-9.2 us on what the copy rate moves in ~3.7 (benchmarks/NOTES.md,
// thirteenth and twenty-fourth rounds).  Here every CTA asks for all of its weight bytes at
// once, before anything else: one bulk copy a weight row (its slice of K) into shared memory,
// completing on an mbarrier per 16-row group, so a launch has the whole weight in flight.
// The CTA's slice of the activation rows comes the same way (first: a load issued after the
// weight copies waits behind them), and the warps quantise it into shared memory while the
// weight bytes come (act_quant exactly: act_quant.cuh), so no pre-pass launch is needed.
//
// * A CTA owns R = 16 GROUPS weight rows and a slice of KS K blocks; a cluster of `split` CTAs
//   (blockIdx.y, the cluster rank) covers K, and the slices' sums meet by distributed shared
//   memory in rank order (deterministic, no workspace, no atomics).
// * Warp w takes row group w % GROUPS and every (8 / GROUPS)-th K block of the slice, and the
//   warps' sums meet in shared memory in warp order.
// * Products by mma.sync m16n8k16 in fp16 (E4M3 values are exact in fp16, products exact, FP32
//   sums): weight rows as M, activation rows as N (one or two groups of 8).  Lane (g, q) reads
//   16 bytes of rows g and g + 8 at 16 q and 64 + 16 q of a 128-byte K block, and the same
//   bytes of activation row g: word s of them holds k slots (2q, 2q + 1, 2q + 8, 2q + 9) of step
//   s, the same permutation of k for both operands.  Shared-memory rows are padded by 64
//   bytes, so rows g and g + 1 fall in opposite halves of the banks (no conflicts).
// * Promotion per K block (SPEC 3): acc += (d * x_scale) * w_scale, the scales never multiplied
//   with each other (their product could leave the FP32 range where the result does not).
//
// Measured on the H100 (benchmarks/NOTES.md, twenty-sixth round): 1.0-1.25x the Triton GEMM at
// one to four rows of the narrow projections, still under half the copy rate at 11 MB: the
// weight bytes alone land in ~5.5 us there, and the products and the sums after the last byte
// add ~2.  From 8 rows it is slower (each CTA quantises its slice of every row), so the
// registry sends it 1-4 rows (cuda_fallback/gemm.py).
//
// Bulk copies, clusters and mbarrier transaction counts are sm_90 features: built for sm_90a
// only (the registry keeps other GPUs on the Triton GEMM).

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "act_quant.cuh"
#include "e8m0.cuh"
#include "fp4_mma.cuh"
#include "sm90_tma.cuh"

using namespace dsv4;
namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowPad = 64;  // bytes after each shared-memory row (bank halves alternate)

struct Params {
  const __nv_bfloat16* x;
  const uint8_t* w;
  const uint8_t* w_scale;  // E8M0 bytes or FP32 values [ceil(N / 128), n_kb]
  __nv_bfloat16* y;
  int64_t stride_x, stride_w, stride_ws, stride_y;  // elements
  int m, n_kb, ks;                                   // activation rows, K blocks, K blocks a CTA
  bool fp32_scale;
};

__device__ __forceinline__ uint4 lds128(const uint8_t* p) { return *reinterpret_cast<const uint4*>(p); }

__device__ __forceinline__ float weight_scale(const Params& p, int64_t block_row, int kb) {
  const int64_t at = block_row * p.stride_ws + kb;
  if (p.fp32_scale) return __ldg(reinterpret_cast<const float*>(p.w_scale) + at);
  return e8m0_value(__ldg(p.w_scale + at));
}

// One K block of an activation row (128 BF16 values in shared memory, lane l holding elements
// 4l .. 4l + 3) quantised to FP8 codes at `codes`; the block's scale to *scale (lane 0).
__device__ __forceinline__ void quantise_block(const uint8_t* src, uint8_t* codes, float* scale, int lane) {
  const uint2 raw = reinterpret_cast<const uint2*>(src)[lane];
  float v[4];
  v[0] = __uint_as_float(raw.x << 16);
  v[1] = __uint_as_float(raw.x & 0xFFFF0000u);
  v[2] = __uint_as_float(raw.y << 16);
  v[3] = __uint_as_float(raw.y & 0xFFFF0000u);
  float amax = fmaxf(fmaxf(magnitude(v[0]), magnitude(v[1])), fmaxf(magnitude(v[2]), magnitude(v[3])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  const ActScale s(amax);
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(v[0] * s.inv, v[1] * s.inv), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(v[2] * s.inv, v[3] * s.inv), __NV_SATFINITE, __NV_E4M3);
  reinterpret_cast<uint32_t*>(codes)[lane] = lo | (hi << 16);
  if (lane == 0) *scale = s.scale;
}

// GROUPS: 16-row weight groups a CTA (R = 16 GROUPS); NT: groups of 8 activation rows.
template <int GROUPS, int NT>
__global__ void __launch_bounds__(kThreads) fp8_decode_kernel(const __grid_constant__ Params p) {
  constexpr int kRows = 16 * GROUPS;
  constexpr int kSlots = kWarps / GROUPS;  // warps sharing a row group, each every kSlots-th K block
  extern __shared__ __align__(128) uint8_t smem[];
  const int row_bytes = p.ks * kBlockK + kRowPad;
  // Byte regions first (16-byte multiples: the copies' destinations), then the barriers, then FP32.
  uint8_t* w_rows = smem;                                   // [kRows][row_bytes]
  uint8_t* x_rows = w_rows + kRows * row_bytes;             // [m][row_bytes]: FP8 codes
  uint8_t* x_bf16 = x_rows + p.m * row_bytes;               // [m][ks * 128] BF16, as loaded
  uint64_t* bar = reinterpret_cast<uint64_t*>(x_bf16 + p.m * p.ks * kBlockK * 2);  // [GROUPS + 1]
  uint64_t* x_bar = bar + GROUPS;
  float* x_scale = reinterpret_cast<float*>(bar + GROUPS + 1);  // [m][ks]
  float* part = x_scale + p.m * p.ks;                       // [kWarps][NT * 4][32]
  float* tile = part + kWarps * NT * 4 * 32;                // [kRows][8 NT]: the CTA's sums

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, q = lane & 3;
  const int rank = blockIdx.y;  // the cluster spans gridDim.y: rank = K slice
  const int kb0 = rank * p.ks;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;

  if (tid == 0) {
    for (int i = 0; i <= GROUPS; ++i) mbar_init(&bar[i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == 0) {
    // The activation slice first (a few KB, needed first), then every weight byte of the CTA:
    // loads issued after the weight copies would queue behind them.
    const uint32_t x_bytes = p.ks * kBlockK * 2, w_bytes = p.ks * kBlockK;
    if (lane == 0) mbar_expect_bytes(x_bar, p.m * x_bytes);
    if (lane < GROUPS) mbar_expect_bytes(&bar[lane], 16 * w_bytes);
    __syncwarp();
    if (lane < p.m) bulk_load(x_bf16 + lane * x_bytes, p.x + lane * p.stride_x + int64_t(kb0) * kBlockK, x_bytes, x_bar);
    for (int r = lane; r < kRows; r += 32)
      bulk_load(w_rows + r * row_bytes, p.w + (row0 + r) * p.stride_w + int64_t(kb0) * kBlockK, w_bytes, &bar[r / 16]);
  }
  mbar_wait(x_bar, 0);
  for (int task = warp; task < p.m * p.ks; task += kWarps) {
    const int r = task / p.ks, j = task - r * p.ks;
    quantise_block(x_bf16 + (r * p.ks + j) * kBlockK * 2, x_rows + r * row_bytes + j * kBlockK,
                   x_scale + r * p.ks + j, lane);
  }
  __syncthreads();

  const int group = warp % GROUPS, slot = warp / GROUPS;
  const uint8_t* wa = w_rows + (16 * group + g) * row_bytes + 16 * q;
  const uint8_t* wb = wa + 8 * row_bytes;
  const int64_t block_row = (row0 + 16 * group) / kBlockK;
  float acc[NT][4] = {};
  mbar_wait(&bar[group], 0);
#pragma unroll 2  // two K blocks' loads and MMA chains interleaved
  for (int j = slot; j < p.ks; j += kSlots) {
    const float sw = weight_scale(p, block_row, kb0 + j);
    uint32_t a[2][8];  // rows g (0) and g + 8 (1): the words of steps 0-7
    {
      const uint4 w0 = lds128(wa + j * kBlockK), w1 = lds128(wa + j * kBlockK + 64);
      const uint4 w2 = lds128(wb + j * kBlockK), w3 = lds128(wb + j * kBlockK + 64);
      const uint32_t lo[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
      const uint32_t hi[8] = {w2.x, w2.y, w2.z, w2.w, w3.x, w3.y, w3.z, w3.w};
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        a[0][s] = lo[s];
        a[1][s] = hi[s];
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int xr = 8 * t + g;
      uint4 b0 = make_uint4(0, 0, 0, 0), b1 = b0;
      if (xr < p.m) {
        b0 = lds128(x_rows + xr * row_bytes + j * kBlockK + 16 * q);
        b1 = lds128(x_rows + xr * row_bytes + j * kBlockK + 64 + 16 * q);
      }
      const uint32_t b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
      float dd[2][4] = {};  // two chains of four MMAs, not one of eight
#pragma unroll
      for (int s = 0; s < 8; ++s)
        mma_16816(dd[s & 1], e4m3x2_to_f16x2(a[0][s]), e4m3x2_to_f16x2(a[1][s]), e4m3x2_to_f16x2(a[0][s] >> 16),
                  e4m3x2_to_f16x2(a[1][s] >> 16), e4m3x2_to_f16x2(b[s]), e4m3x2_to_f16x2(b[s] >> 16));
      const float d[4] = {dd[0][0] + dd[1][0], dd[0][1] + dd[1][1], dd[0][2] + dd[1][2], dd[0][3] + dd[1][3]};
      // D columns 2q, 2q + 1: activation rows 8t + 2q, + 1 (past m: never stored).
      const int c0 = 8 * t + 2 * q;
      const float sx0 = c0 < p.m ? x_scale[c0 * p.ks + j] : 0.f;
      const float sx1 = c0 + 1 < p.m ? x_scale[(c0 + 1) * p.ks + j] : 0.f;
      acc[t][0] += (d[0] * sx0) * sw;
      acc[t][1] += (d[1] * sx1) * sw;
      acc[t][2] += (d[2] * sx0) * sw;
      acc[t][3] += (d[3] * sx1) * sw;
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int r = 0; r < 4; ++r) part[(warp * NT * 4 + t * 4 + r) * 32 + lane] = acc[t][r];
  __syncthreads();
  // The warps of a row group in warp order -> tile[row][activation row].
  for (int idx = tid; idx < GROUPS * NT * 4 * 32; idx += kThreads) {
    const int l = idx & 31, r = (idx >> 5) & 3, t = (idx >> 7) % NT, grp = idx / (NT * 128);
    float sum = 0.f;
    for (int v = 0; v < kSlots; ++v) sum += part[((grp + v * GROUPS) * NT * 4 + t * 4 + r) * 32 + l];
    const int row = 16 * grp + (l >> 2) + (r >= 2 ? 8 : 0);
    tile[row * 8 * NT + 8 * t + 2 * (l & 3) + (r & 1)] = sum;
  }

  const int split = gridDim.y;
  if (split == 1) {
    __syncthreads();
  } else {
    cg::this_cluster().sync();  // every slice's tile complete and visible to the cluster
  }
  // This CTA writes rows [rank, rank + 1) * kRows / split of the output, the slices summed in
  // rank order (all slices' values loaded first: a remote load's latency is paid once).
  const int rows_here = kRows / split;
  for (int idx = tid; idx < rows_here * p.m; idx += kThreads) {
    const int r = rank * rows_here + idx % rows_here, c = idx / rows_here;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
      v[i] = i < split ? cg::this_cluster().map_shared_rank(tile, i)[r * 8 * NT + c] : 0.f;
    float sum = v[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) sum += v[i];
    p.y[c * p.stride_y + row0 + r] = __float2bfloat16_rn(sum);
  }
  if (split > 1) cg::this_cluster().sync();  // no CTA leaves while another reads its tile
}

// Mirrored by decode_shared_bytes in cuda_fallback/gemm.py, which plans the tiles.
int shared_bytes(int rows, int m, int ks) {
  const int row_bytes = ks * kBlockK + kRowPad, nt = m > 8 ? 2 : 1;
  return (rows + m) * row_bytes + 4 * (m * ks + kWarps * nt * 4 * 32 + rows * 8 * nt) + m * ks * kBlockK * 2 +
         8 * (rows / 16 + 1);
}

template <int GROUPS, int NT>
void launch(const Params& p, int n_rows, int split, cudaStream_t stream) {
  const auto kernel = fp8_decode_kernel<GROUPS, NT>;
  const int smem = shared_bytes(16 * GROUPS, p.m, p.ks);
  DSV4_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess,
             "fp8_decode_gemm: cannot raise the shared-memory limit to ", smem, " bytes");
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config =
      cluster_config(dim3(n_rows / (16 * GROUPS), split, 1), dim3(1, split, 1), kThreads, smem, stream, attr);
  DSV4_CHECK(cudaLaunchKernelEx(&config, kernel, p) == cudaSuccess, "fp8_decode_gemm: launch failed: ",
             cudaGetErrorString(cudaGetLastError()));
}

}  // namespace

// x: bf16 [M, K], 1 <= M <= 16, unit last stride, rows 16-byte aligned; w: FP8 bytes [N, K], unit
// last stride, rows 16-byte aligned; w_scale: E8M0 bytes or fp32 [ceil(N / 128), K / 128];
// y: bf16 [M, N].  rows: weight rows a CTA (16, 32 or 64, dividing N); split: CTAs of a cluster
// along K (1, 2, 4 or 8, dividing K / 128 and rows).
void fp8_decode_gemm(at::Tensor x, at::Tensor w, at::Tensor w_scale, at::Tensor y, int64_t rows, int64_t split,
                     int64_t stream_handle) {
  require_sm90(x.get_device(), "fp8_decode_gemm");
  DSV4_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0 &&
                 aligned(x, 16),
             "x: expected bf16 [M, K] with unit last stride and 16-byte aligned rows, got ", x.scalar_type(), " ",
             x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  DSV4_CHECK(m >= 1 && m <= 16, "x: expected 1 to 16 rows, got ", m);
  DSV4_CHECK(k % kBlockK == 0 && k > 0, "x: K must be a positive multiple of 128, got ", k);
  DSV4_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.size(1) == k && w.stride(1) == 1 &&
                 w.stride(0) % 16 == 0 && aligned(w, 16),
             "w: expected FP8 bytes [N, ", k, "] with unit last stride and 16-byte aligned rows, got ", w.sizes());
  const int64_t n = w.size(0), n_kb = k / kBlockK;
  DSV4_CHECK(rows == 16 || rows == 32 || rows == 64, "rows: expected 16, 32 or 64, got ", rows);
  DSV4_CHECK(n % rows == 0 && n > 0, "w: N must be a positive multiple of rows (", rows, "), got ", n);
  DSV4_CHECK((split == 1 || split == 2 || split == 4 || split == 8) && n_kb % split == 0,
             "split: expected 1, 2, 4 or 8 dividing K / 128 = ", n_kb, ", got ", split);
  const bool fp32 = w_scale.scalar_type() == at::kFloat;
  DSV4_CHECK((fp32 || w_scale.scalar_type() == at::kByte) && w_scale.dim() == 2 &&
                 w_scale.size(0) == (n + kBlockK - 1) / kBlockK && w_scale.size(1) == n_kb && w_scale.stride(1) == 1,
             "w_scale: expected fp32 or E8M0 bytes [", (n + kBlockK - 1) / kBlockK, ", ", n_kb, "], got ",
             w_scale.sizes());
  DSV4_CHECK(y.scalar_type() == at::kBFloat16 && y.dim() == 2 && y.size(0) == m && y.size(1) == n && y.stride(1) == 1,
             "y: expected bf16 [", m, ", ", n, "] with unit last stride, got ", y.sizes());
  for (const at::Tensor* t : {&w, &w_scale, &y})
    DSV4_CHECK(t->device() == x.device(), "fp8_decode_gemm: every tensor on x's device");
  Params p{};
  p.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  p.w = w.data_ptr<uint8_t>();
  p.w_scale = reinterpret_cast<const uint8_t*>(w_scale.data_ptr());
  p.y = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
  p.stride_x = x.stride(0);
  p.stride_w = w.stride(0);
  p.stride_ws = w_scale.stride(0);
  p.stride_y = y.stride(0);
  p.m = static_cast<int>(m);
  p.n_kb = static_cast<int>(n_kb);
  p.ks = static_cast<int>(n_kb / split);
  p.fp32_scale = fp32;
  const int device = x.get_device();
  int limit = 0;
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int smem = shared_bytes(static_cast<int>(rows), p.m, p.ks);
  DSV4_CHECK(smem <= limit, "fp8_decode_gemm: ", rows, " rows of ", p.ks, " K blocks take ", smem,
             " bytes of shared memory, more than the ", limit, " a CTA may have");
  const DeviceScope scope(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int nr = static_cast<int>(n), sp = static_cast<int>(split);
  if (m > 8) {
    if (rows == 16) launch<1, 2>(p, nr, sp, stream);
    else if (rows == 32) launch<2, 2>(p, nr, sp, stream);
    else launch<4, 2>(p, nr, sp, stream);
  } else {
    if (rows == 16) launch<1, 1>(p, nr, sp, stream);
    else if (rows == 32) launch<2, 1>(p, nr, sp, stream);
    else launch<4, 1>(p, nr, sp, stream);
  }
}
