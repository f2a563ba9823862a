// BF16 GEMMs at prefill sizes on Hopper: grouped_linear (y[:, g] = x[:, g] @ w[g]^T) and the
// BF16 route of fp4_linear's NVFP4 weights (G = 1, an FP32 scale on the sums), by BF16 x BF16
// warpgroup MMAs fed by TMA.
// targets: sm90a
//
// The structure of sm90_fp8_gemm.cu (the frame of sm90_gemm_tiles.cuh) without its per-block
// promotion: the sums stay in the MMAs' own accumulators for the whole K, so the consumers only
// issue MMAs.
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
//   (one group in flight under the wait).  A finished tile goes through a shared-memory buffer
//   and out by TMA stores (clipped at the edges), which drain under the next tile's MMAs.
//
// wgmma exists on sm_90a only: the file is built for that target alone (its line above).

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <optional>

#include "host.cuh"
#include "sm90_gemm_tiles.cuh"

using namespace dsv4;
using namespace dsv4::sm90_gemm;

namespace {

constexpr int kBlockK = 64;  // K elements a stage: one 128-byte row

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

template <int HALVES>
__global__ void __launch_bounds__(kThreads, 1)
    bf16_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w,
                     const __grid_constant__ CUtensorMap map_y, const __grid_constant__ Params p) {
  using T = Tiling<HALVES>;
  extern __shared__ uint8_t smem_raw[];
  const Smem<HALVES> s(smem_raw);
  const int n_tiles = p.groups * p.tiles_m * p.tiles_n;
  const auto load = [&](const TileAt& at, int kb, uint8_t* dst, uint64_t* bar) {
    tma_load(dst, &map_a, kb * kBlockK, at.grp, at.tm * T::kRows, bar);
    tma_load(dst + T::kATileBytes, &map_w, kb * kBlockK, at.tn * kCols, at.grp, bar);
  };
  if (!start_roles<true>(s, &map_a, &map_w, p.tiles_m, p.tiles_n, n_tiles, p.n_kb, load)) return;

  // ---- consumers: warpgroup c owns rows 64 HALVES c .. 64 HALVES (c + 1) - 1 of every tile ----
  const int c = (threadIdx.x >> 7) - 1;
  const int ct = threadIdx.x & 127;
  const int lane = ct & 31;
  const float scale = p.scale != nullptr ? __ldg(p.scale) : 1.f;
  Ring ring{0, 0};
  for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const TileAt at = tile_at<true>(tile, p.tiles_m, p.tiles_n);
    float acc[HALVES][64];
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[h][i] = 0.f;
    }
    Ring release = ring;
    for (int kb = 0; kb < p.n_kb; ++kb) {
      mbar_wait(&s.full[ring.stage], ring.phase);
      const uint32_t a_base = s.a_tile(ring.stage) + 64 * HALVES * c * 128;
      const uint32_t w_base = s.w_tile(ring.stage);
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
        if (lane == 0) mbar_arrive(&s.empty[release.stage]);
        release.next(T::kStages);
      }
    }
    wgmma_wait<0>();
    if (p.n_kb > 0) {
      if (lane == 0) mbar_arrive(&s.empty[release.stage]);
    }
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
#pragma unroll
      for (int i = 0; i < 64; ++i) pin(acc[h][i]);
    }
    store_tile(s, c, ct, acc, scale, [&](const uint8_t* panel0, const uint8_t* panel1, int h) {
      const int y_row = at.tm * T::kRows + 64 * HALVES * c + 64 * h;
      tma_store(&map_y, panel0, at.tn * kCols, at.grp, y_row);
      tma_store(&map_y, panel1, at.tn * kCols + 64, at.grp, y_row);
    });
  }
  drain_stores(ct);
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
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (tile_rows == 256)
    launch(bf16_gemm_kernel<2>, Tiling<2>::kSmemBytes, tiles, device, stream, "bf16_gemm", map_a, map_w, map_y, p);
  else
    launch(bf16_gemm_kernel<1>, Tiling<1>::kSmemBytes, tiles, device, stream, "bf16_gemm", map_a, map_w, map_y, p);
}
