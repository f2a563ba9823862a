// The frame shared by the TMA + wgmma GEMMs (sm90_fp8_gemm.cu, sm90_bf16_gemm.cu): persistent
// CTAs of a producer warp and two consumer warpgroups walking output tiles of 128 * HALVES rows
// x 128 columns; a ring of stages, each one A tile and one W tile of 128-byte rows, filled by
// TMA; and the epilogue that writes a finished tile through shared memory by TMA stores.  The
// kernels differ in what a stage holds (FP8 K blocks of 128, BF16 of 64), in their tensor maps'
// rank and in what the consumers do between a stage's arrival and its release.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "host.cuh"
#include "sm90_tma.cuh"
#include "sm90_wgmma.cuh"

namespace dsv4 {
namespace sm90_gemm {

constexpr int kThreads = 384;                // producer warpgroup + 2 consumer warpgroups
constexpr int kCols = 128;                   // tile columns
constexpr int kGroupRows = 8;                // row tiles that sweep the columns together
// A consumer warpgroup's output buffer: 64 rows x 128 bf16 columns as two 128-byte swizzled
// panels of 64 columns, written by the threads and stored by TMA while the next tile runs.
constexpr int kOutPanelBytes = 64 * 128;
constexpr int kOutBytes = 2 * kOutPanelBytes;
constexpr int kBarOut = 1;                   // named barriers 1, 2: a consumer warpgroup's buffer

// A tile of 128 * HALVES rows: each consumer warpgroup owns 64 * HALVES of them, as HALVES
// m64 accumulators.  Two halves (256-row tiles) read 48 KB a stage for twice the MMAs of one
// half's 32 KB (a quarter less L2 traffic per MMA); 128-row tiles split a matrix into twice
// as many, for shapes whose 256-row tiles leave SMs idle in the last round.
template <int HALVES>
struct Tiling {
  static constexpr int kRows = 128 * HALVES;
  static constexpr int kATileBytes = kRows * 128;
  static constexpr int kStageBytes = kATileBytes + kCols * 128;  // A tile, then W tile
  static constexpr int kStages = HALVES == 1 ? 6 : 4;
  static constexpr int kOutOffset = kStages * kStageBytes;
  static constexpr int kSmemBytes = kOutOffset + 2 * kOutBytes + 2 * kStages * 8 + 1024;
};

// Where a tile is: its group (the grouped GEMM's matrix), row tile and column tile.
struct TileAt {
  int grp, tm, tn;
};

// Tile t of one matrix (GROUPED false) or of several (true) of tiles_m x tiles_n tiles each:
// the matrices one after the other, in each bands of 8 row tiles sweeping the columns
// together, so a weight tile is read from L2 by all 8.
template <bool GROUPED>
__device__ __forceinline__ TileAt tile_at(int t, int tiles_m, int tiles_n) {
  int grp = 0;
  if constexpr (GROUPED) {
    grp = t / (tiles_m * tiles_n);
    t %= tiles_m * tiles_n;
  }
  const int per_band = kGroupRows * tiles_n;
  const int first_m = (t / per_band) * kGroupRows;
  const int rows = min(tiles_m - first_m, kGroupRows);
  return {grp, first_m + (t % per_band) % rows, (t % per_band) / rows};
}

// The CTA's dynamic shared memory: the stages from a 1024-byte aligned base (128-byte swizzled
// tiles need it), the two consumer warpgroups' output buffers, then the stages' barriers.
template <int HALVES>
struct Smem {
  using T = Tiling<HALVES>;
  uint8_t* base;
  uint64_t* full;
  uint64_t* empty;

  __device__ __forceinline__ explicit Smem(uint8_t* raw)
      : base(raw + ((1024 - (smem_addr(raw) & 1023)) & 1023)),
        full(reinterpret_cast<uint64_t*>(base + T::kOutOffset + 2 * kOutBytes)),
        empty(full + T::kStages) {}
  __device__ __forceinline__ uint8_t* stage(int s) const { return base + s * T::kStageBytes; }
  __device__ __forceinline__ uint32_t a_tile(int s) const { return smem_addr(stage(s)); }
  __device__ __forceinline__ uint32_t w_tile(int s) const { return smem_addr(stage(s) + T::kATileBytes); }
  __device__ __forceinline__ uint8_t* out(int c) const { return base + T::kOutOffset + c * kOutBytes; }
};

// The producer: for every tile of this CTA (tile_at<GROUPED>) and K block, wait for a free
// stage and ask for its bytes (load(the tile's TileAt, kb, stage pointer, its barrier)).  It runs ahead across tile
// boundaries, so a tile's first stages load under the last one's epilogue.
template <bool GROUPED, int HALVES, class Load>
__device__ __forceinline__ void produce(const Smem<HALVES>& s, int tiles_m, int tiles_n, int n_tiles, int n_kb,
                                        Load&& load) {
  using T = Tiling<HALVES>;
  Ring ring{0, 0};
  for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const TileAt at = tile_at<GROUPED>(tile, tiles_m, tiles_n);
    for (int kb = 0; kb < n_kb; ++kb) {
      mbar_wait(&s.empty[ring.stage], ring.phase ^ 1);
      mbar_expect_bytes(&s.full[ring.stage], T::kStageBytes);
      load(at, kb, s.stage(ring.stage), &s.full[ring.stage]);
      ring.next(T::kStages);
    }
  }
}

// The CTA's start: thread 0 sets up the stages' barriers (each released by the 8 consumer warps);
// warpgroup 0 gives its registers up, its thread 0 runs the producer (produce) and the rest of
// it leaves; warpgroups 1 and 2 take the registers.  Returns true for the consumer threads,
// which go on with the tiles.  The producer's branch returns from inside itself: ptxas
// allocates the code after each setmaxnreg for its count, so no consumer code may be reachable
// from after the producer's (a role returned and branched on after a join made ptxas spill
// 616 bytes in the FP8 kernel).  168 registers a thread at launch; 40 for the producer leaves
// 232 for each consumer.
template <bool GROUPED, int HALVES, class Load>
__device__ __forceinline__ bool start_roles(const Smem<HALVES>& s, const CUtensorMap* map_a, const CUtensorMap* map_w,
                                            int tiles_m, int tiles_n, int n_tiles, int n_kb, Load&& load) {
  if (threadIdx.x == 0) init_stage_barriers(s.full, s.empty, Tiling<HALVES>::kStages, 8);
  __syncthreads();
  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map_w)) : "memory");
      produce<GROUPED>(s, tiles_m, tiles_n, n_tiles, n_kb, load);
    }
    return false;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  return true;
}

// The epilogue of consumer warpgroup c (ct: the thread's index in it): each 64-row half of its
// accumulators, times `scale`, through its buffer and out by TMA (store(panel 0, panel 1, h),
// called by thread 0 of the warpgroup).  The buffer is reused once the previous store has read
// it, so a tile's stores drain under the next tile's MMAs.
template <int HALVES, class Store>
__device__ __forceinline__ void store_tile(const Smem<HALVES>& s, int c, int ct, const float (&acc)[HALVES][64],
                                           float scale, Store&& store) {
  uint8_t* out = s.out(c);
  const int lane = ct & 31;
  const int wr = (ct >> 5) * 16 + (lane >> 2);  // this thread's rows in a half: wr, wr + 8
  const int cq = 2 * (lane & 3);                // its columns in each 8-column group: cq, cq + 1
#pragma unroll
  for (int h = 0; h < HALVES; ++h) {
    if (ct == 0) bulk_wait_read();
    bar_sync(kBarOut + c, 128);
    stage_bf16_fragment(out, acc[h], scale, wr, cq);
    fence_async_shared();
    bar_sync(kBarOut + c, 128);
    if (ct == 0) {
      store(out, out + kOutPanelBytes, h);
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
  }
}

// The last stores have read the buffers (and written) before the CTA's shared memory goes.
__device__ __forceinline__ void drain_stores(int ct) {
  if (ct == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// One CTA an SM (at most `tiles`), with the kernel's shared memory.
template <class Kernel, class... Args>
void launch(Kernel kernel, int smem_bytes, int64_t tiles, int device, cudaStream_t stream, const char* name,
            const Args&... args) {
  DSV4_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) == cudaSuccess,
             name, ": cannot raise the shared-memory limit");
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, multiprocessors(device)));
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args...);
  check_launch(name);
}

}  // namespace sm90_gemm
}  // namespace dsv4
