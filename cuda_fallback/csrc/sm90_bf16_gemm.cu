// BF16 GEMMs at prefill sizes on Hopper: grouped_linear (y[:, g] = x[:, g] @ w[g]^T) and the
// BF16 route of fp4_linear's NVFP4 weights (G = 1, an FP32 scale on the sums), by BF16 x BF16
// warpgroup MMAs fed by TMA.
// targets: sm90a
//
// The structure of sm90_fp8_gemm.cu without its per-block promotion: the sums stay in the
// MMAs' own accumulators for the whole K, so the consumers only issue MMAs.
//
// * Persistent CTAs (one an SM) walk the output tiles (256 or 128 rows, chosen by the
//   caller, x 128 columns of one group) group by group, in each the grouped order of the FP8
//   kernel (8 row tiles sweep the columns together).
// * Warp 0 is the producer: per K block of 64 (128 bytes of a row, 128-byte swizzled by the
//   copy) it asks the tensor-memory accelerator for the [rows, 64] activation tile and the
//   [128, 64] weight tile of the group (3-D tensor maps, so any row strides and the group's
//   offset are the copy's business, and rows, columns or K past the edge arrive as zeros)
//   into one of 4 (6) stages; an mbarrier hands a stage over when its bytes have landed.
// * Warpgroups 1 and 2 each own half of the tile's rows as m64 accumulators: per K block
//   4 wgmma m64n128k16 an accumulator (FP32 sums), committed as one group; a stage is
//   released once the next block's group has been issued and the previous one has finished
//   (one group in flight under the wait).  A finished tile goes through a shared-memory buffer and out by
//   TMA stores (clipped at the edges), which drain under the next tile's MMAs.
//
// wgmma exists on sm_90a only: the file is built for that target alone (its line above).

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <optional>

#include "host.cuh"
#include "sm90_tma.cuh"
#include "sm90_wgmma.cuh"

using namespace dsv4;

namespace {

constexpr int kBlockK = 64;                       // K elements a stage: one 128-byte row
constexpr int kCols = 128;                        // tile columns
constexpr int kThreads = 384;                     // producer warpgroup + 2 consumer warpgroups
constexpr int kGroupRows = 8;                     // row tiles that sweep the columns together
// A consumer warpgroup's output buffer: 64 rows x 128 bf16 columns as two 128-byte swizzled
// panels of 64 columns.
constexpr int kOutPanelBytes = 64 * 128;
constexpr int kOutBytes = 2 * kOutPanelBytes;
constexpr int kBarOut = 1;                        // named barriers 1, 2: a consumer warpgroup's buffer

// A tile of 128 * HALVES rows: each consumer warpgroup owns 64 * HALVES of them, as HALVES
// m64 accumulators.  256-row tiles read a quarter less per MMA; 128-row tiles split a matrix
// into twice as many, for shapes whose 256-row tiles leave SMs idle in the last round.
template <int HALVES>
struct Tiling {
  static constexpr int kRows = 128 * HALVES;
  static constexpr int kATileBytes = kRows * 128;
  static constexpr int kStageBytes = kATileBytes + kCols * 128;  // A tile, then W tile
  static constexpr int kStages = HALVES == 1 ? 6 : 4;
  static constexpr int kOutOffset = kStages * kStageBytes;
  static constexpr int kSmemBytes = kOutOffset + 2 * kOutBytes + 2 * kStages * 8 + 1024;
};

struct Params {
  const float* scale;  // one FP32 factor on every sum, or null
  int groups, n_kb, tiles_m, tiles_n;
};

// D[64 x 128] += A[64 x 16] B[16 x 128]: BF16 operands, K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " DSV4_WGMMA_D64 ", %64, %65, 1, 1, 1, 0, 0;\n"
      : DSV4_WGMMA_D64_OUT(d)
      : "l"(desc_a), "l"(desc_b));
}

// Tile index -> (group, row tile, column tile): groups one after the other, in each 8 row
// tiles sweeping the columns together.
__device__ __forceinline__ void tile_coords(int tile, const Params& p, int& grp, int& tm, int& tn) {
  const int per_matrix = p.tiles_m * p.tiles_n;
  grp = tile / per_matrix;
  const int t = tile % per_matrix;
  const int per_band = kGroupRows * p.tiles_n;
  const int first_m = (t / per_band) * kGroupRows;
  const int rows = min(p.tiles_m - first_m, kGroupRows);
  tm = first_m + (t % per_band) % rows;
  tn = (t % per_band) / rows;
}

template <int HALVES>
__global__ void __launch_bounds__(kThreads, 1)
    bf16_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w,
                     const __grid_constant__ CUtensorMap map_y, const __grid_constant__ Params p) {
  using T = Tiling<HALVES>;
  extern __shared__ uint8_t smem_raw[];
  // 128-byte swizzled tiles need 1024-byte aligned bases.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::kOutOffset + 2 * kOutBytes);
  uint64_t* empty = full + T::kStages;
  const int wg = threadIdx.x >> 7;
  const int n_tiles = p.groups * p.tiles_m * p.tiles_n;

  if (threadIdx.x == 0) init_stage_barriers(full, empty, T::kStages, 8);
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x != 0) return;
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_w)) : "memory");
    Ring ring{0, 0};
    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
      int grp, tm, tn;
      tile_coords(tile, p, grp, tm, tn);
      for (int kb = 0; kb < p.n_kb; ++kb) {
        mbar_wait(&empty[ring.stage], ring.phase ^ 1);
        uint8_t* dst = smem + ring.stage * T::kStageBytes;
        mbar_expect_bytes(&full[ring.stage], T::kStageBytes);
        tma_load(dst, &map_a, kb * kBlockK, grp, tm * T::kRows, &full[ring.stage]);
        tma_load(dst + T::kATileBytes, &map_w, kb * kBlockK, tn * kCols, grp, &full[ring.stage]);
        ring.next(T::kStages);
      }
    }
    return;
  }

  // ---- consumers: warpgroup c owns rows 128 c .. 128 c + 127 of every tile ----
  // 168 registers a thread at launch; 40 for the producer leaves 232 for each consumer.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int c = wg - 1;
  const int ct = threadIdx.x - 128 * wg;
  const int lane = ct & 31;
  const int cq = 2 * (lane & 3);                 // its columns in each 8-column group: cq, cq + 1
  const int wr = (ct >> 5) * 16 + (lane >> 2);   // its rows in a 64-row half: wr, wr + 8
  const float scale = p.scale != nullptr ? __ldg(p.scale) : 1.f;
  Ring ring{0, 0};
  for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    int grp, tm, tn;
    tile_coords(tile, p, grp, tm, tn);
    float acc[HALVES][64];
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[h][i] = 0.f;
    }
    Ring release = ring;
    for (int kb = 0; kb < p.n_kb; ++kb) {
      mbar_wait(&full[ring.stage], ring.phase);
      const uint32_t a_base = smem_addr(smem + ring.stage * T::kStageBytes) + 64 * HALVES * c * 128;
      const uint32_t w_base = smem_addr(smem + ring.stage * T::kStageBytes + T::kATileBytes);
      wgmma_fence();
#pragma unroll
      for (int h = 0; h < HALVES; ++h) {
#pragma unroll
        for (int k16 = 0; k16 < 4; ++k16)
          wgmma_m64n128k16_bf16(acc[h], smem_desc(a_base + h * 64 * 128 + 32 * k16, 16, 1024),
                                smem_desc(w_base + 32 * k16, 16, 1024));
      }
      wgmma_commit();
      ring.next(T::kStages);
      // The previous block's group has read its stage: hand that stage back.
      wgmma_wait<1>();
      if (kb > 0) {
        if (lane == 0) mbar_arrive(&empty[release.stage]);
        release.next(T::kStages);
      }
    }
    wgmma_wait<0>();
    if (p.n_kb > 0) {
      if (lane == 0) mbar_arrive(&empty[release.stage]);
    }
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
#pragma unroll
      for (int i = 0; i < 64; ++i) pin(acc[h][i]);
    }
    // Epilogue: each 64-row half through this warpgroup's buffer and out by TMA.  The buffer
    // is reused once the previous store has read it.
    uint8_t* out = smem + T::kOutOffset + c * kOutBytes;
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
      if (ct == 0) bulk_wait_read();
      bar_sync(kBarOut + c, 128);
      stage_bf16_fragment(out, acc[h], scale, wr, cq);
      fence_async_shared();
      bar_sync(kBarOut + c, 128);
      if (ct == 0) {
        const int y_row = tm * T::kRows + 64 * HALVES * c + 64 * h;
        tma_store(&map_y, out, tn * kCols, grp, y_row);
        tma_store(&map_y, out + kOutPanelBytes, tn * kCols + 64, grp, y_row);
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
    }
  }
  // The last stores have read the buffers (and written) before the CTA's shared memory goes.
  if (ct == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// A 3-D BF16 tensor [d2, d1, d0] (unit innermost stride) as a tensor map with [b2, b1, b0] boxes.
CUtensorMap map_3d(const at::Tensor& t, int b0, int b1, int b2, const char* what) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(t.size(2)), static_cast<cuuint64_t>(t.size(1)),
                              static_cast<cuuint64_t>(t.size(0))};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(t.stride(1) * 2), static_cast<cuuint64_t>(t.stride(0) * 2)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(b0), static_cast<cuuint32_t>(b1), static_cast<cuuint32_t>(b2)};
  return tensor_map(t.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, dims, strides, box, what);
}

void check_operand(const at::Tensor& t, const char* what) {
  DSV4_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 3 && t.stride(2) == 1 && aligned(t, 16) &&
                 t.stride(1) % 8 == 0 && t.stride(0) % 8 == 0,
             what, ": expected bf16 3-D with a unit last stride and 16-byte aligned rows, got ", t.scalar_type(), " ",
             t.sizes());
}

}  // namespace

// y[t, g, :] = scale * x[t, g, :] @ w[g]^T: x bf16 [T, G, K], w bf16 [G, N, K], y bf16 [T, G, N],
// each with a unit last stride and 16-byte aligned rows; scale: one fp32 element or None;
// tile_rows: 128 or 256 rows an output tile.
void bf16_gemm(at::Tensor x, at::Tensor w, at::Tensor y, std::optional<at::Tensor> scale, int64_t tile_rows,
               int64_t stream_handle) {
  require_sm90(x.get_device(), "bf16_gemm");
  check_operand(x, "x");
  check_operand(w, "w");
  check_operand(y, "y");
  const int64_t t = x.size(0), g = x.size(1), k = x.size(2), n = w.size(1);
  DSV4_CHECK(w.size(0) == g && w.size(2) == k, "w: expected [", g, ", N, ", k, "], got ", w.sizes());
  DSV4_CHECK(y.size(0) == t && y.size(1) == g && y.size(2) == n, "y: expected [", t, ", ", g, ", ", n, "], got ",
             y.sizes());
  DSV4_CHECK(t < (int64_t{1} << 31) && n < (int64_t{1} << 31) && k < (int64_t{1} << 31), "bf16_gemm: too large");
  if (scale.has_value())
    DSV4_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == 1 && scale->get_device() == x.get_device(),
               "scale: expected one fp32 element on the device of x");
  DSV4_CHECK(tile_rows == 128 || tile_rows == 256, "tile_rows: expected 128 or 256, got ", tile_rows);
  if (t == 0 || g == 0 || n == 0) return;
  if (k == 0) {  // empty sums (a tensor map cannot have an empty dimension)
    y.zero_();
    return;
  }
  Params p{};
  p.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  p.groups = static_cast<int>(g);
  p.n_kb = static_cast<int>((k + kBlockK - 1) / kBlockK);
  p.tiles_m = static_cast<int>((t + tile_rows - 1) / tile_rows);
  p.tiles_n = static_cast<int>((n + kCols - 1) / kCols);
  const int device = x.get_device();
  const DeviceScope device_scope(device);
  const CUtensorMap map_a = map_3d(x, kBlockK, 1, static_cast<int>(tile_rows), "x");
  const CUtensorMap map_w = map_3d(w, kBlockK, kCols, 1, "w");
  const CUtensorMap map_y = map_3d(y, 64, 1, 64, "y");
  const int64_t tiles = static_cast<int64_t>(p.groups) * p.tiles_m * p.tiles_n;
  DSV4_CHECK(tiles < (int64_t{1} << 31), "bf16_gemm: too many tiles");
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, multiprocessors(device)));
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  auto launch = [&](auto kernel, int smem_bytes) {
    DSV4_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) == cudaSuccess,
               "bf16_gemm: cannot raise the shared-memory limit");
    kernel<<<grid, kThreads, smem_bytes, stream>>>(map_a, map_w, map_y, p);
  };
  if (tile_rows == 256)
    launch(bf16_gemm_kernel<2>, Tiling<2>::kSmemBytes);
  else
    launch(bf16_gemm_kernel<1>, Tiling<1>::kSmemBytes);
  check_launch("bf16_gemm");
}
