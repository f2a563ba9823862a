// Lightning-indexer scores over FP4 key rows on Hopper (wgmma with the keys in registers).
// targets: sm90a
//
// I[q, s] = sum_h w_h relu(qi_h . K_s) for 64 heads of head dim 128, the keys as the release
// stores them: 64 bytes of E2M1 codes and 4 E8M0 scales (one per 32 values) a 68-byte row.
// The Triton kernel (dsv4_triton/kernels/indexer.py) runs the same product; what this one
// changes is the overlap, which Triton does not generate for this loop: the tensor cores run
// one tile's product while the warps decode the next tile and reduce the previous one.
//
// One CTA = one warpgroup = one query x a run of 64-key tiles, three CTAs an SM.  Per tile,
// logits^T [64 keys, 64 heads] = keys [64, 128] @ qi^T by 8 wgmma m64n64k16 with the key tile
// as the A operand, decoded from the code words straight into the A fragments, and qi^T as the
// B operand in 128-byte-swizzled shared memory, loaded once.  Each key tile reaches shared
// memory by one bulk copy two tiles ahead.  Two register sets for the fragments and
// accumulators: tile i's product is in flight while tile i+1 is decoded and tile i-1 is reduced
// (relu, times w, summed over the heads in a fixed order) and stored.
//
// The product's reduction axis is permuted: lane t of a quad owns the 32 values of scale
// block t of its two key rows, so it reads 16 contiguous bytes a row, applies one scale, and
// its k-slots are filled in the order its code words decode cheapest; qi is stored in shared
// memory in the same order.  Decoding is exact: each code lands on BF16 E2M1 x 2^-126 (codes
// 0 and 1 on 0 and the subnormal 2^-127), then packed BF16 multiplies by 2^126 and the block
// scale (one multiply by their product when it is a BF16 number) are exact, as in the Triton
// kernel.  The FP32 sums over the 128 values run in another order than the Triton kernel's,
// so scores agree with it within FP32 rounding, not bit for bit.
//
// Measured on the H100 (benchmarks/NOTES.md, fifteenth and twenty-ninth rounds): 1.4x the
// Triton kernel at B = 32 (354 against 508 us at 262144 keys), 54% of the copy bandwidth over
// the key bytes, not the 70% aimed at.  The warps' issue slots bind: the decode, the reduction
// and the loads share them (probes leaving parts out: each alone is cheap, together they add
// up), which is why the tile comes by one bulk copy (per-thread 4-byte copies cost ~80
// instructions a thread and tile) and why three CTAs an SM (168 registers) beat two (383 us
// with per-thread copies and two).  A producer warpgroup decoding into shared memory for consumer warpgroups measured
// slower (433 us with two producers), as did staging the decoded tile for an all-smem MMA in
// these warps (529 us).
//
// wgmma exists on sm_90a only: the file is built for that target alone (its line above).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "host.cuh"
#include "sm90_tma.cuh"
#include "sm90_wgmma.cuh"

using namespace dsv4;

namespace {

constexpr int kHeads = 64;      // the N of every wgmma
constexpr int kDim = 128;       // the indexer's head dim: 8 k-steps of 16
constexpr int kRowBytes = 68;   // 64 code bytes + 4 E8M0 scales
constexpr int kTile = 64;       // keys a tile: the M of every wgmma
constexpr int kThreads = 128;
constexpr int kPanelBytes = kHeads * 128;  // qi^T: 64 heads x 64 values of one 128-byte swizzled panel
constexpr int kQBytes = 2 * kPanelBytes;
// A key tile (4352 contiguous bytes) comes into shared memory by one bulk copy, issued by one
// thread: per-thread 4-byte copies cost each thread ~80 instructions a tile, and the warps'
// issue slots are what the decode, the MMAs and the reduction share.  The copy starts at the
// 16-byte boundary at or below the tile (request rows need not be 16-byte aligned), so a
// stage holds up to 12 bytes more at each end.
constexpr int kTileBytes = kTile * kRowBytes;
constexpr int kStageBytes = kTileBytes + 16;
constexpr int kStages = 3;  // two tiles in flight while one is decoded (4: the same, 6: 6% slower)
constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + 12 * kStages + 1024;  // + realignment to 1024
constexpr uint32_t kDirect = 0xFFFFFFFFu;  // a stage's skew word when its tile is read from global memory
constexpr uint32_t kTwoPow126 = 0x7E807E80u;  // BF16 2^126 in both halves

struct Params {
  const __nv_bfloat16* q;
  const float* w;
  const uint8_t* keys;
  const int32_t* n_valid;
  float* scores;
  int64_t stride_qb, stride_qs, stride_qh, stride_wb, stride_ws, stride_wh, stride_kb, stride_nb, stride_ns;
  int64_t keys_extent;  // bytes from `keys` to the end of the last request's last row
  int seq, n_keys, tiles_per_cta;
};

// K-major operand, 128-byte swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t k_major_desc(uint32_t addr) { return smem_desc(addr, 16, 1024); }

// Reduction slot of value e (0..127) of a head: (k-step j, position kk 0..15 within it).
// Lane t of a quad holds positions 2t, 2t+1 (register pair lo) and 8+2t, 9+2t (hi) of each
// k-step for its rows; those are values 32t + 8m + c with m = j / 2 the code word and c the
// nibble: c = 2 (j % 2) + hi + 4u for position 2t + u (+8 hi), so that one register is
// nibble p of both 16-bit halves of a word (see `code_pair`).
__device__ __forceinline__ void slot_of(int e, int& j, int& kk) {
  const int t = e >> 5, m = (e >> 3) & 3, c = e & 7;
  const int u = c >> 2, odd = (c >> 1) & 1, hi = c & 1;
  j = 2 * m + odd;
  kk = 8 * hi + 2 * t + u;
}

// Nibble P of each 16-bit half of `w` -> BF16 E2M1 x 2^-126 in that half: sign to bit 15, the
// three magnitude bits to 8..6 (the exponent's two low bits and the mantissa's top bit, so
// code 1 is the subnormal 2^-127 and code 0 is 0).
template <int P>
__device__ __forceinline__ uint32_t code_pair(uint32_t w) {
  const uint32_t mag = P == 0 ? w << 6 : P == 1 ? w << 2 : P == 2 ? w >> 2 : w >> 6;
  const uint32_t sgn = P == 0 ? w << 12 : P == 1 ? w << 8 : P == 2 ? w << 4 : w;
  return (mag & 0x01C001C0u) | (sgn & 0x80008000u);
}

__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// E8M0 byte -> BF16 2^(b - 127) in both halves; 0 -> 2^-127 (subnormal), 0xFF -> NaN.
__device__ __forceinline__ uint32_t scale_pair(uint32_t b) {
  const uint32_t bits = b == 0 ? 0x0040u : b == 0xFF ? 0x7FC0u : b << 7;
  return bits | (bits << 16);
}

// 2^126 * 2^(b - 127) = 2^(b - 1) in both halves, a BF16 number for b <= 128: one multiply
// takes a code from E2M1 x 2^-126 to its value (exact: a power of two, no overflow).
__device__ __forceinline__ uint32_t folded_scale_pair(uint32_t b) {
  const uint32_t bits = (b + 126) << 7;
  return bits | (bits << 16);
}

__device__ __forceinline__ float relu_keep_nan(float x) {
  float r;
  asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(r) : "f"(x));
  return r;
}

// Where tile `tile` of a request is copied from: `bytes` from the 16-byte boundary `src` at or
// below the tile's first row (`skew` bytes before it) to the boundary at or past its last
// row; `bytes` is 0 where that window leaves the tensor (the first tile of a tensor that
// starts off a 16-byte boundary, the last of one that ends off it): those rows are read
// directly from global memory.
struct Window {
  const uint8_t* src;
  uint32_t bytes, skew;
};

__device__ __forceinline__ Window copy_window(const Params& p, const uint8_t* keys_b, int tile) {
  const uint8_t* first = keys_b + static_cast<int64_t>(tile) * kTileBytes;
  const int rows = min(kTile, p.n_keys - tile * kTile);
  const uintptr_t lo = reinterpret_cast<uintptr_t>(first) & ~uintptr_t{15};
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(first + rows * kRowBytes) + 15) & ~uintptr_t{15};
  const uintptr_t start = reinterpret_cast<uintptr_t>(p.keys);
  const bool inside = lo >= start && hi <= start + static_cast<uintptr_t>(p.keys_extent);
  return {reinterpret_cast<const uint8_t*>(lo), inside ? static_cast<uint32_t>(hi - lo) : 0u,
          static_cast<uint32_t>(reinterpret_cast<uintptr_t>(first) - lo)};
}

// Thread 0: the copy of tile `tile` into a stage, completing `full` (at once, with no bytes,
// for a tile whose rows are read directly), and where the tile's rows start in it (`skew`,
// or kDirect), which every thread reads after the wait: the window is computed once a tile.
__device__ __forceinline__ void issue_tile(uint8_t* stage, uint64_t* full, uint32_t* skew, const Params& p,
                                           const uint8_t* keys_b, int tile) {
  const Window win = copy_window(p, keys_b, tile);
  *skew = win.bytes ? win.skew : kDirect;
  if (win.bytes) {
    mbar_expect_bytes(full, win.bytes);
    bulk_load(stage, win.src, win.bytes, full);
  } else {
    mbar_arrive(full);
  }
}

// A fragments of the 8 k-steps from a thread's two key rows (see `slot_of`): rows `row` and
// `row` + 8 of a tile whose rows start at `rows` (68 bytes apart), scale block `block`.  DIRECT:
// `rows` is global memory and rows from `rows_left` on are zeros, not read.  One packed multiply
// a pair when the warp's scales allow it (E8M0 <= 128, values below 2^2 * 6), else two.
template <bool DIRECT>
__device__ __forceinline__ void decode(uint32_t (&a)[8][4], const uint8_t* rows, int row, int block, int rows_left) {
  uint4 words[2];
  uint32_t scale[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint8_t* src = rows + (row + 8 * h) * kRowBytes;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(src + 16 * block);
    if (DIRECT) {
      const bool ok = row + 8 * h < rows_left;
      words[h] = ok ? make_uint4(__ldg(w), __ldg(w + 1), __ldg(w + 2), __ldg(w + 3)) : make_uint4(0, 0, 0, 0);
      scale[h] = ok ? __ldg(src + 64 + block) : 0u;
    } else {
      words[h] = make_uint4(w[0], w[1], w[2], w[3]);
      scale[h] = src[64 + block];
    }
  }
  const bool one_multiply = __all_sync(0xFFFFFFFFu, max(scale[0], scale[1]) <= 128);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t w4[4] = {words[h].x, words[h].y, words[h].z, words[h].w};
    if (one_multiply) {
      const uint32_t s = folded_scale_pair(scale[h]);
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        a[2 * m][h] = mul_bf16x2(code_pair<0>(w4[m]), s);
        a[2 * m][2 + h] = mul_bf16x2(code_pair<1>(w4[m]), s);
        a[2 * m + 1][h] = mul_bf16x2(code_pair<2>(w4[m]), s);
        a[2 * m + 1][2 + h] = mul_bf16x2(code_pair<3>(w4[m]), s);
      }
    } else {
      const uint32_t s = scale_pair(scale[h]);
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        a[2 * m][h] = mul_bf16x2(mul_bf16x2(code_pair<0>(w4[m]), kTwoPow126), s);
        a[2 * m][2 + h] = mul_bf16x2(mul_bf16x2(code_pair<1>(w4[m]), kTwoPow126), s);
        a[2 * m + 1][h] = mul_bf16x2(mul_bf16x2(code_pair<2>(w4[m]), kTwoPow126), s);
        a[2 * m + 1][2 + h] = mul_bf16x2(mul_bf16x2(code_pair<3>(w4[m]), kTwoPow126), s);
      }
    }
  }
}

__device__ __forceinline__ void issue_mma(float (&d)[32], uint32_t (&a)[8][4], uint32_t q_base) {
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < 8; ++j)
    wgmma_m64n64k16_rs_bf16(d, a[j], k_major_desc(q_base + (j >> 2) * kPanelBytes + (j & 3) * 32), j != 0);
  wgmma_commit();
}

// relu, times w, summed over the 64 heads (a thread's 16 in order, then across the quad),
// stored for the keys below n_valid.
__device__ __forceinline__ void reduce_store(float (&d)[32], uint32_t (&a)[8][4], const float (&wv)[16],
                                             float* out, int tile, int row_in_tile, int lane, int nv) {
  pin_product(d, a);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      s = __fmaf_rn(relu_keep_nan(d[4 * i + 2 * h]), wv[2 * i], s);
      s = __fmaf_rn(relu_keep_nan(d[4 * i + 2 * h + 1]), wv[2 * i + 1], s);
    }
    s += __shfl_xor_sync(0xFFFFFFFFu, s, 1);
    s += __shfl_xor_sync(0xFFFFFFFFu, s, 2);
    const int row = tile * kTile + row_in_tile + 8 * h;
    if ((lane & 3) == h && row < nv) out[row] = s;
  }
}

__global__ void __launch_bounds__(kThreads, 3) indexer_scores_fp4_kernel(const __grid_constant__ Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* q_tile = smem;
  uint8_t* stages = smem + kQBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(stages + kStages * kStageBytes);
  uint32_t* skews = reinterpret_cast<uint32_t*>(full + kStages);
  const int query = blockIdx.y;
  const int b = query / p.seq, t = query % p.seq;
  const int nv = min(max(p.n_valid[b * p.stride_nb + t * p.stride_ns], 0), p.n_keys);
  const int first = blockIdx.x * p.tiles_per_cta;
  const int n_tiles = min(first + p.tiles_per_cta, (nv + kTile - 1) / kTile) - first;
  if (n_tiles <= 0) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row_in_tile = 16 * warp + (lane >> 2);  // rows row_in_tile and row_in_tile + 8
  const int block = lane & 3;                        // the scale block (32 values) this lane decodes
  const uint8_t* keys_b = p.keys + b * p.stride_kb;

  const int end = first + n_tiles;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int s = 0; s + 1 < kStages && first + s < end; ++s)
      issue_tile(stages + s * kStageBytes, &full[s], &skews[s], p, keys_b, first + s);
  }

  // qi^T into shared memory in the permuted reduction order: thread -> (head, half row).
  {
    const int h = tid >> 1;
    const __nv_bfloat16* src = p.q + b * p.stride_qb + t * p.stride_qs + h * p.stride_qh + 64 * (tid & 1);
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      const uint4 vals = __ldg(reinterpret_cast<const uint4*>(src) + v);
      const uint16_t* e16 = reinterpret_cast<const uint16_t*>(&vals);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        int j, kk;
        slot_of(64 * (tid & 1) + 8 * v + i, j, kk);
        *reinterpret_cast<uint16_t*>(q_tile + (j >> 2) * kPanelBytes + swizzled(h, 2 * (j & 3) + (kk >> 3)) +
                                     2 * (kk & 7)) = e16[i];
      }
    }
  }
  float wv[16];  // w of the heads (accumulator columns) 8i + 2 (lane % 4) + u
  {
    const float* wq = p.w + b * p.stride_wb + t * p.stride_ws;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int u = 0; u < 2; ++u) wv[2 * i + u] = __ldg(wq + (8 * i + 2 * block + u) * p.stride_wh);
  }
  fence_async_shared();
  __syncthreads();  // qi^T and the barriers' initialisation, before any thread waits or multiplies

  const uint32_t q_base = smem_addr(q_tile);
  float* out = p.scores + static_cast<int64_t>(query) * p.n_keys;
  uint32_t a0[8][4], a1[8][4];
  float d0[32], d1[32];
  // Tile i: wait for its copy, start the copy of tile i + kStages - 1 into the stage tile i - 1
  // used (every thread is past reading it: the barrier), decode, issue its product, then
  // retire the previous product and reduce its tile.  Two tiles a round, one register set each.
  int stage = 0;
  uint32_t phase = 0;
  auto start = [&](uint32_t(&a)[8][4], float(&d)[32], int tile) {
    mbar_wait(&full[stage], phase);
    __syncthreads();
    const int prev = stage == 0 ? kStages - 1 : stage - 1;
    if (tid == 0 && tile + kStages - 1 < end)
      issue_tile(stages + prev * kStageBytes, &full[prev], &skews[prev], p, keys_b, tile + kStages - 1);
    const uint32_t skew = skews[stage];  // written before a barrier every thread has passed since
    if (skew != kDirect)
      decode<false>(a, stages + stage * kStageBytes + skew, row_in_tile, block, kTile);
    else
      decode<true>(a, keys_b + static_cast<int64_t>(tile) * kTileBytes, row_in_tile, block, p.n_keys - tile * kTile);
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
    issue_mma(d, a, q_base);
  };
  for (int i = 0; i < n_tiles; i += 2) {
    start(a0, d0, first + i);
    if (i > 0) {
      wgmma_wait<1>();
      reduce_store(d1, a1, wv, out, first + i - 1, row_in_tile, lane, nv);
    }
    if (i + 1 < n_tiles) {
      start(a1, d1, first + i + 1);
      wgmma_wait<1>();
      reduce_store(d0, a0, wv, out, first + i, row_in_tile, lane, nv);
    } else {
      wgmma_wait<0>();
      reduce_store(d0, a0, wv, out, first + i, row_in_tile, lane, nv);
      return;
    }
  }
  wgmma_wait<0>();
  reduce_store(d1, a1, wv, out, end - 1, row_in_tile, lane, nv);
}

}  // namespace

// qi: bf16 [B, S, 64, 128] (rows 16-byte aligned, last dim contiguous); w: fp32 [B, S, 64];
// keys: uint8 [B, Nk, 68] FP4 rows (contiguous rows, 4-byte aligned); n_valid: int32
// [B, S]; scores: fp32 [B * S, Nk] contiguous (entries at or past a query's n_valid are not
// written).  The grid: tiles_per_cta 64-key tiles a CTA, one grid row per query.
void indexer_scores_fp4(at::Tensor qi, at::Tensor w, at::Tensor keys, at::Tensor n_valid,
                        at::Tensor scores, int64_t tiles_per_cta, int64_t stream_handle) {
  require_sm90(qi.get_device(), "indexer_scores_fp4");
  DSV4_CHECK(qi.scalar_type() == at::kBFloat16 && qi.dim() == 4 && qi.size(2) == kHeads && qi.size(3) == kDim &&
                  qi.stride(3) == 1,
              "qi: expected bf16 [B, S, 64, 128] with a contiguous last dim");
  DSV4_CHECK(aligned(qi, 16) && qi.stride(0) % 8 == 0 && qi.stride(1) % 8 == 0 && qi.stride(2) % 8 == 0,
              "qi: expected 16-byte aligned rows");
  const int64_t bsz = qi.size(0), seq = qi.size(1);
  DSV4_CHECK(w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(0) == bsz && w.size(1) == seq &&
                  w.size(2) == kHeads,
              "w: expected fp32 [B, S, 64]");
  DSV4_CHECK(keys.scalar_type() == at::kByte && keys.dim() == 3 && keys.size(0) == bsz &&
                  keys.size(2) == kRowBytes && keys.stride(2) == 1,
              "keys: expected uint8 [B, Nk, 68] FP4 rows");
  DSV4_CHECK(aligned(keys, 4) && keys.stride(0) % 4 == 0 && keys.stride(1) == kRowBytes,
              "keys: expected contiguous rows, 4-byte aligned");
  DSV4_CHECK(n_valid.scalar_type() == at::kInt && n_valid.dim() == 2 && n_valid.size(0) == bsz &&
                  n_valid.size(1) == seq,
              "n_valid: expected int32 [B, S]");
  const int64_t n_keys = keys.size(1);
  DSV4_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.dim() == 2 &&
                  scores.size(0) == bsz * seq && scores.size(1) == n_keys,
              "scores: expected contiguous fp32 [B * S, Nk]");
  DSV4_CHECK(tiles_per_cta >= 1, "tiles_per_cta: expected at least 1, got ", tiles_per_cta);
  DSV4_CHECK(n_keys < (int64_t{1} << 31) - kTile && bsz * seq < 65536, "indexer_scores_fp4: too many keys or queries");
  if (bsz * seq == 0 || n_keys == 0) return;
  Params p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(qi.data_ptr());
  p.w = w.data_ptr<float>();
  p.keys = keys.data_ptr<uint8_t>();
  p.n_valid = n_valid.data_ptr<int32_t>();
  p.scores = scores.data_ptr<float>();
  p.stride_qb = qi.stride(0);
  p.stride_qs = qi.stride(1);
  p.stride_qh = qi.stride(2);
  p.stride_wb = w.stride(0);
  p.stride_ws = w.stride(1);
  p.stride_wh = w.stride(2);
  p.stride_kb = keys.stride(0);
  p.keys_extent = (bsz - 1) * keys.stride(0) + n_keys * kRowBytes;
  p.stride_nb = n_valid.stride(0);
  p.stride_ns = n_valid.stride(1);
  p.seq = static_cast<int>(seq);
  p.n_keys = static_cast<int>(n_keys);
  p.tiles_per_cta = static_cast<int>(tiles_per_cta);
  const int64_t tiles = (n_keys + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned>((tiles + tiles_per_cta - 1) / tiles_per_cta), static_cast<unsigned>(bsz * seq));
  const DeviceScope scope(qi.get_device());
  DSV4_CHECK(cudaFuncSetAttribute(indexer_scores_fp4_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   kSmemBytes) == cudaSuccess, "indexer_scores_fp4: cannot raise the shared-memory limit");
  indexer_scores_fp4_kernel<<<grid, kThreads, kSmemBytes, reinterpret_cast<cudaStream_t>(stream_handle)>>>(p);
  check_launch("indexer_scores_fp4");
}
