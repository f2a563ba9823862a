// fp8_linear at prefill sizes on Hopper: FP8 x FP8 warpgroup MMAs fed by TMA, with the
// 128 x 128 block scales applied once a K block (the promotion of SPEC 3).
// targets: sm90a
//
// y[M, N] = sum over K blocks kb of (A_kb W_kb^T) * a_scale[m, kb] * w_scale[n / 128, kb], where
// A holds the activation's FP8 codes and power-of-two scales from the act_quant pre-pass and
// W the FP8 weight with one scale per 128 x 128 block.  The Triton GEMM does the same sum; what
// Triton cannot express here is the structure (its frame is sm90_gemm_tiles.cuh, shared with
// the BF16 GEMM):
//
// * Persistent CTAs (one an SM) walk the output tiles (128 or 256 rows x 128 columns, chosen
//   by the caller) in a grouped order: 8 row tiles sweep the columns together, so a weight
//   tile is read from L2 by all 8.
// * Warp 0 is the producer: for every K block it asks the tensor-memory accelerator for the
//   A tile and the 128 x 128 W tile (128-byte swizzled by the copy itself, rows past M filled
//   with zeros) into one of 6 (4) stages and moves on; a stage is handed over by an mbarrier
//   that completes when its bytes have landed.  It runs ahead across tile boundaries, so the
//   next tile's first stages load while the consumers write the last tile's output.
// * Warpgroups 1 and 2 each own half of the tile's rows: per K block and 64 rows 4 wgmma
//   m64n128k32 (FP8 x FP8, FP32 result) into a temporary accumulator, then one FMA per
//   element adds it to the running accumulator times the block's scale product (exact with
//   E8M0 weight scales: two powers of two; see fp8_tile_step in dsv4_triton/kernels/gemm.py).
//   While one warpgroup promotes, the other's MMAs keep the tensor cores busy; with 128-row
//   tiles a warpgroup also issues the next block's MMAs before promoting (two temporaries).
//   A finished tile goes through a shared-memory buffer a warpgroup and out by TMA stores,
//   which drain while the next tile's MMAs run.
//
// Measured on the H100 (benchmarks/NOTES.md, eighteenth round): ~900-1070 TFLOP/s at the Pro
// projections' shapes (cuBLAS's per-tensor FP8 GEMM: ~1200-1400), 1.14-1.42x the Triton GEMM
// with the same activation pre-pass.
//
// wgmma exists on sm_90a only: the file is built for that target alone (its line above).

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "e8m0.cuh"
#include "host.cuh"
#include "sm90_gemm_tiles.cuh"

using namespace dsv4;
using namespace dsv4::sm90_gemm;

namespace {

constexpr int kBlock = 128;  // K block (the scale block); also the tile's columns (kCols)

struct Params {
  const float* a_scale;     // [M, n_kb] fp32 powers of two
  const void* w_scale;      // [N / 128, n_kb] fp32 or E8M0 bytes
  int64_t stride_as, stride_ws;
  int m, n_kb, tiles_m, tiles_n;
  bool w_scale_fp32;
};

// D[64 x 128] (+)= A[64 x 32] B[32 x 128]: FP8 E4M3 operands, K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " DSV4_WGMMA_D64 ", %64, %65, p, 1, 1;\n}\n"
      : DSV4_WGMMA_D64_OUT(d)
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}


// d = A[64 x 128] W[128 x 128]^T over one K block: 4 wgmma m64n128k32, committed as one group.
__device__ __forceinline__ void mma_block(float (&d)[64], uint32_t a_base, uint32_t w_base) {
  wgmma_fence();
#pragma unroll
  for (int k32 = 0; k32 < 4; ++k32)
    wgmma_m64n128k32_e4m3(d, smem_desc(a_base + 32 * k32, 16, 1024), smem_desc(w_base + 32 * k32, 16, 1024),
                          k32 != 0);
  wgmma_commit();
}

// acc += d * (the block's scale product) for rows row0 (f0) and row0 + 8 (f1).
__device__ __forceinline__ void promote(float (&acc)[64], const float (&d)[64], float f0, float f1) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    acc[4 * j] = fmaf(d[4 * j], f0, acc[4 * j]);
    acc[4 * j + 1] = fmaf(d[4 * j + 1], f0, acc[4 * j + 1]);
    acc[4 * j + 2] = fmaf(d[4 * j + 2], f1, acc[4 * j + 2]);
    acc[4 * j + 3] = fmaf(d[4 * j + 3], f1, acc[4 * j + 3]);
  }
}

template <int HALVES>
__global__ void __launch_bounds__(kThreads, 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w,
                    const __grid_constant__ CUtensorMap map_y, const __grid_constant__ Params p) {
  using T = Tiling<HALVES>;
  extern __shared__ uint8_t smem_raw[];
  const Smem<HALVES> s(smem_raw);
  const int n_tiles = p.tiles_m * p.tiles_n;
  const auto load = [&](const TileAt& at, int kb, uint8_t* dst, uint64_t* bar) {
    tma_load(dst, &map_a, kb * kBlock, at.tm * T::kRows, bar);
    tma_load(dst + T::kATileBytes, &map_w, kb * kBlock, at.tn * kCols, bar);
  };
  if (!start_roles<false>(s, &map_a, &map_w, p.tiles_m, p.tiles_n, n_tiles, p.n_kb, load)) return;

  // ---- consumers: warpgroup c owns rows 64 HALVES c .. 64 HALVES (c + 1) - 1 of every tile ----
  const int c = (threadIdx.x >> 7) - 1;
  const int ct = threadIdx.x & 127;
  const int lane = ct & 31;
  // This thread's rows: row0 + 64 h and row0 + 64 h + 8 for each half h.
  const int row0 = 64 * HALVES * c + (ct >> 5) * 16 + (lane >> 2);
  const float* w_scale_f = static_cast<const float*>(p.w_scale);
  const uint8_t* w_scale_b = static_cast<const uint8_t*>(p.w_scale);
  Ring ring{0, 0};
  for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const TileAt at = tile_at<false>(tile, p.tiles_m, p.tiles_n);
    const int gm0 = at.tm * T::kRows + row0;
    const float* as[2 * HALVES];  // rows gm0 + 64 h (+ 8): past M, the last row (its codes are zeros)
#pragma unroll
    for (int r = 0; r < 2 * HALVES; ++r)
      as[r] = p.a_scale + static_cast<int64_t>(min(gm0 + 64 * (r >> 1) + 8 * (r & 1), p.m - 1)) * p.stride_as;
    const int64_t ws_row = static_cast<int64_t>(at.tn) * p.stride_ws;
    auto w_scale_at = [&](int kb) {
      return p.w_scale_fp32 ? __ldg(w_scale_f + ws_row + kb) : e8m0_value(__ldg(w_scale_b + ws_row + kb));
    };
    auto a_base = [&](int st) { return s.a_tile(st) + 64 * HALVES * c * 128; };
    float acc[HALVES][64];
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[h][i] = 0.f;
    }
    if constexpr (HALVES == 1) {
      // K blocks in pairs, both groups issued before the first is promoted: the tensor cores
      // run this warpgroup's second group under its first promotion.  (Carrying a group in
      // flight across the loop's back edge instead makes ptxas serialize every wgmma.)  A
      // block's scales are loaded when its MMAs are issued, used when it is promoted.
      Ring issue = ring, release = ring;
      float t0[64], t1[64];
      float f0[3], f1[3];  // (row0 scale, row0 + 8 scale, weight scale) of the block in t0 / t1
      auto start = [&](float(&t)[64], float(&f)[3], int kb) {
        mbar_wait(&s.full[issue.stage], issue.phase);
        mma_block(t, a_base(issue.stage), s.w_tile(issue.stage));
        f[0] = __ldg(as[0] + kb);
        f[1] = __ldg(as[1] + kb);
        f[2] = w_scale_at(kb);
        issue.next(T::kStages);
      };
      auto finish = [&](float(&t)[64], const float(&f)[3]) {
#pragma unroll
        for (int i = 0; i < 64; ++i) pin(t[i]);
        if (lane == 0) mbar_arrive(&s.empty[release.stage]);
        release.next(T::kStages);
        promote(acc[0], t, f[0] * f[2], f[1] * f[2]);
      };
      for (int kb = 0; kb < p.n_kb; kb += 2) {
        start(t0, f0, kb);
        if (kb + 1 < p.n_kb) {
          start(t1, f1, kb + 1);
          wgmma_wait<1>();
          finish(t0, f0);
          wgmma_wait<0>();
          finish(t1, f1);
        } else {
          wgmma_wait<0>();
          finish(t0, f0);
        }
      }
      ring = release;
    } else {
      // 256-row tiles: two m64 accumulators leave registers for one MMA result, so each
      // half's group is waited for before it is promoted; the other warpgroup's MMAs fill
      // the tensor cores meanwhile.
      float sa[2 * HALVES], sw = w_scale_at(0);
#pragma unroll
      for (int r = 0; r < 2 * HALVES; ++r) sa[r] = __ldg(as[r]);
      for (int kb = 0; kb < p.n_kb; ++kb) {
        mbar_wait(&s.full[ring.stage], ring.phase);
        // The next block's scales, in flight under the MMAs.
        const int kn = min(kb + 1, p.n_kb - 1);
        float na[2 * HALVES];
#pragma unroll
        for (int r = 0; r < 2 * HALVES; ++r) na[r] = __ldg(as[r] + kn);
        const float nw = w_scale_at(kn);
#pragma unroll
        for (int h = 0; h < HALVES; ++h) {
          float d[64];
          mma_block(d, a_base(ring.stage) + h * 64 * 128, s.w_tile(ring.stage));
          wgmma_wait<0>();
#pragma unroll
          for (int i = 0; i < 64; ++i) pin(d[i]);
          if (h == HALVES - 1 && lane == 0) mbar_arrive(&s.empty[ring.stage]);
          promote(acc[h], d, sa[2 * h] * sw, sa[2 * h + 1] * sw);
        }
        ring.next(T::kStages);
#pragma unroll
        for (int r = 0; r < 2 * HALVES; ++r) sa[r] = na[r];
        sw = nw;
      }
    }
    // Rows past M are clipped by the stores.
    store_tile(s, c, ct, acc, 1.f, [&](const uint8_t* panel0, const uint8_t* panel1, int h) {
      const int y_row = at.tm * T::kRows + 64 * HALVES * c + 64 * h;
      tma_store(&map_y, panel0, at.tn * kCols, y_row);
      tma_store(&map_y, panel1, at.tn * kCols + 64, y_row);
    });
  }
  drain_stores(ct);
}

}  // namespace

// a_codes: uint8 [M, K] FP8 codes (the act_quant pre-pass), a_scale: fp32 [M, K / 128];
// w: float8_e4m3fn or uint8 [N, K]; w_scale: fp32 or uint8 (E8M0) [N / 128, K / 128];
// y: bf16 [M, N], rows contiguous.  N and K multiples of 128; every operand's rows 16-byte
// aligned (the tensor maps' rule).  tile_rows: 128 or 256 rows an output tile.
void fp8_gemm(at::Tensor a_codes, at::Tensor a_scale, at::Tensor w, at::Tensor w_scale, at::Tensor y,
              int64_t tile_rows, int64_t stream_handle) {
  require_sm90(a_codes.get_device(), "fp8_gemm");
  DSV4_CHECK(a_codes.scalar_type() == at::kByte && a_codes.dim() == 2 && a_codes.stride(1) == 1,
             "a_codes: expected uint8 [M, K] with a contiguous last dim, got ", a_codes.scalar_type(), " ",
             a_codes.sizes());
  const int64_t m = a_codes.size(0), k = a_codes.size(1);
  DSV4_CHECK(w.dim() == 2 && w.size(1) == k && w.stride(1) == 1 && w.element_size() == 1,
             "w: expected FP8 [N, ", k, "] with a contiguous last dim, got ", w.sizes());
  const int64_t n = w.size(0);
  DSV4_CHECK(k % kBlock == 0 && n % kBlock == 0, "fp8_gemm: N and K must be multiples of 128, got N = ", n, ", K = ", k);
  const int64_t n_kb = k / kBlock;
  DSV4_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.dim() == 2 && a_scale.size(0) == m &&
                 a_scale.size(1) == n_kb && a_scale.stride(1) == 1,
             "a_scale: expected fp32 [", m, ", ", n_kb, "], got ", a_scale.sizes());
  DSV4_CHECK((w_scale.scalar_type() == at::kFloat || w_scale.scalar_type() == at::kByte) && w_scale.dim() == 2 &&
                 w_scale.size(0) == n / kBlock && w_scale.size(1) == n_kb && w_scale.stride(1) == 1,
             "w_scale: expected fp32 or E8M0 bytes [", n / kBlock, ", ", n_kb, "], got ", w_scale.sizes());
  DSV4_CHECK(y.scalar_type() == at::kBFloat16 && y.dim() == 2 && y.size(0) == m && y.size(1) == n && y.stride(1) == 1 &&
                 aligned(y, 16) && y.stride(0) % 8 == 0,
             "y: expected bf16 [", m, ", ", n, "] with 16-byte aligned rows, got ", y.sizes());
  DSV4_CHECK(aligned(a_codes, 16) && a_codes.stride(0) % 16 == 0 && aligned(w, 16) && w.stride(0) % 16 == 0,
             "fp8_gemm: a_codes and w need 16-byte aligned rows");
  DSV4_CHECK(m < (int64_t{1} << 31) && n < (int64_t{1} << 31), "fp8_gemm: too many rows");
  DSV4_CHECK(tile_rows == 128 || tile_rows == 256, "tile_rows: expected 128 or 256, got ", tile_rows);
  if (m == 0) return;
  Params p{};
  p.a_scale = a_scale.data_ptr<float>();
  p.w_scale = w_scale.data_ptr();
  p.stride_as = a_scale.stride(0);
  p.stride_ws = w_scale.stride(0);
  p.m = static_cast<int>(m);
  p.n_kb = static_cast<int>(n_kb);
  p.tiles_m = static_cast<int>((m + tile_rows - 1) / tile_rows);
  p.tiles_n = static_cast<int>(n / kBlock);
  p.w_scale_fp32 = w_scale.scalar_type() == at::kFloat;
  const int device = a_codes.get_device();
  const DeviceScope scope(device);
  const CUtensorMap map_a =
      tile_map(a_codes, CU_TENSOR_MAP_DATA_TYPE_UINT8, kBlock, static_cast<int>(tile_rows), "a_codes");
  const CUtensorMap map_w = tile_map(w, CU_TENSOR_MAP_DATA_TYPE_UINT8, kBlock, kBlock, "w");
  const CUtensorMap map_y = tile_map(y, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 64, 64, "y");
  const int64_t tiles = static_cast<int64_t>(p.tiles_m) * p.tiles_n;
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (tile_rows == 256)
    launch(fp8_gemm_kernel<2>, Tiling<2>::kSmemBytes, tiles, device, stream, "fp8_gemm", map_a, map_w, map_y, p);
  else
    launch(fp8_gemm_kernel<1>, Tiling<1>::kSmemBytes, tiles, device, stream, "fp8_gemm", map_a, map_w, map_y, p);
}
