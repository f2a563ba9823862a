// Sparse MQA attention with sink over the FP8 KV cache, head dim 512, on Hopper (wgmma).
// targets: sm90a
//
// The math is the Triton kernel's (dsv4_triton/kernels/attention.py); what changes is the
// structure, which Triton cannot express: three warpgroups with fixed roles.
//
// * Warpgroup 0 (the producer) gathers a tile of 64 candidate rows (584-byte FP8 cache rows,
//   prefetched into L2 two tiles ahead, then 8-byte loads into registers, one batch of rows
//   in flight while the previous batch is decoded), decodes them to BF16 (code * E8M0 scale,
//   exact) and stores them into a 128-byte-swizzled shared-memory tile, two tiles deep, while
//   the two math warpgroups run their MMAs on the other tile.
// * Warpgroups 1 and 2 (the consumers) each own half of the 512 columns, for both products:
//   S_c = Q[:, half c] KV[:, half c]^T (a partial score, 16 wgmma m64n64k16) and
//   O[:, half c] += P KV[:, half c] (4 wgmma m64n256k16, P from registers).  The two partial
//   scores meet in shared memory once a tile (S = S_0 + S_1, the same bits in both), so both
//   run the same softmax and need no other exchange: a consumer reads only its own columns of
//   every KV tile, and its 64 x 256 FP32 accumulator is 128 registers a thread.
//
// One CTA = one query token x 64 heads (x one slice of the candidates when split: the
// partial (O, m, l) go to a workspace and a second small kernel merges the slices in split
// order).  The sink, the final normalisation and the inverse RoPE of the last R columns are
// applied where the output is written.  Empty or out-of-range candidates (-1, >= N) are not
// read: their tile rows are zero and their scores -inf.
//
// Crossover (PEERS = 2, heads in pairs of 64-head blocks, e.g. Pro's 128): the two CTAs of a
// token's head-block pair form a cluster and share every decoded tile.  Each producer gathers
// and decodes half of the tile's rows and stores them into its own tile and, by st.async, into
// the partner's, whose full barrier counts those bytes; a stage is free again once the
// consumers of both CTAs are done with it.  So each SM decodes half the rows it multiplies.
// The same trick is FlashMLA's ("crossover", its FP8 sparse decode kernel on Hopper).
//
// Measured on the H100 (benchmarks/NOTES.md, fourteenth, twenty-seventh and twenty-eighth
// rounds): the producer sets the pace, with crossover too: ~3.3 us a tile for its 32 decoded
// rows even with idle consumers (loads, then per row shuffles, byte extraction, conversions
// and swizzle arithmetic); the consumers' MMAs and score exchange add ~13 us at Pro's 64
// tokens.  Overlapping each batch's loads with the previous batch's decode took Pro B = 64
// from 80.4 to 76.9 us, and the lazy softmax reference (kMaxLead) to 74.7.
//
// wgmma exists on sm_90a only: the file is built for that target alone (its line above).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "cluster.cuh"
#include "e8m0.cuh"
#include "host.cuh"
#include "sm90_tma.cuh"
#include "sm90_wgmma.cuh"

using namespace dsv4;

namespace {

constexpr int kDim = 512;
constexpr int kRowBytes = 584;     // FP8 cache row: 448 codes, 64 BF16 rope values, 7 scales, pad
constexpr int kHeads = 64;         // query heads of a CTA: the M of every wgmma
constexpr int kTile = 64;          // candidates a tile
constexpr int kStages = 2;
constexpr int kBatch = 4;          // rows of a producer warp's batch: two batches' words in its registers
constexpr int kThreads = 384;
constexpr int kPanelBytes = 64 * 128;               // 64 rows of one 128-byte swizzled panel (64 columns)
constexpr int kQBytes = 8 * kPanelBytes;            // Q [64, 512] bf16
constexpr int kStageBytes = 8 * kPanelBytes;        // KV tile [64, 512] bf16
constexpr int kExchFloats = kHeads * kTile;         // one consumer's partial scores
constexpr int kBarrierBytes = 2 * kStages * 8;
constexpr int kSmemBytes =
    kQBytes + kStages * kStageBytes + 2 * kExchFloats * 4 + kStages * kTile * 4 + kBarrierBytes + 1024;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMaxLead = 8.f;  // how far (base 2) a score may pass the softmax reference: P <= 256
constexpr int kMaxSplits = 128;    // slices the merge takes: one (m, l) pair a merging thread
constexpr int kMergeBatch = 8;     // partial rows a merging thread has in flight
constexpr int kConsumerWarps = 8;

// Named barriers (0 is __syncthreads): the score exchange (written, free again) and each
// consumer's Q tile.  The stages are handed over by mbarriers (full: the producers' rows are
// in; empty: every consumer, of this CTA and of the partner, is done with them).
constexpr int kBarExchFree = 1, kBarExch = 5, kBarQ = 6;

// S[64 x 64] (+)= A[64 x 16] B[16 x 64]: A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// O[64 x 256] += A[64 x 16] B[16 x 256]: A in registers, B MN-major in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));
}



__device__ __forceinline__ uint32_t fp8x2_to_bf16x2(uint32_t codes2, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes2), __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  const __nv_bfloat162 v = __floats2bfloat162_rn(f.x * scale, f.y * scale);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Where a decoded row goes: this CTA's tile and, with crossover, the partner's copy of it (a
// shared::cluster address) whose full barrier counts the bytes.
template <int PEERS>
struct TileSink {
  uint8_t* tile;
  uint32_t peer_tile, peer_full;
  __device__ __forceinline__ void put(uint32_t off, uint4 v) const {
    *reinterpret_cast<uint4*>(tile + off) = v;
    if (PEERS == 2) send(peer_tile + off, v, peer_full);
  }
  __device__ __forceinline__ void put(uint32_t off, uint2 v) const {
    *reinterpret_cast<uint2*>(tile + off) = v;
    if (PEERS == 2) send(peer_tile + off, v, peer_full);
  }
};

// 8 FP8 codes (word w of the row: columns 8w .. 8w + 7) -> BF16 into the tile.
template <int PEERS>
__device__ __forceinline__ void store_codes(const TileSink<PEERS>& out, int row, int w, uint2 codes, float scale) {
  uint4 v;
  v.x = fp8x2_to_bf16x2(codes.x & 0xFFFF, scale);
  v.y = fp8x2_to_bf16x2(codes.x >> 16, scale);
  v.z = fp8x2_to_bf16x2(codes.y & 0xFFFF, scale);
  v.w = fp8x2_to_bf16x2(codes.y >> 16, scale);
  out.put((w >> 3) * kPanelBytes + swizzled(row, w & 7), v);
}

// 4 BF16 rope values (word m of the rope part: columns 448 + 4m .. 448 + 4m + 3) into panel 7.
template <int PEERS>
__device__ __forceinline__ void store_rope(const TileSink<PEERS>& out, int row, int m, uint2 v) {
  out.put(7 * kPanelBytes + swizzled(row, m >> 1) + ((m & 1) << 3), v);
}

__device__ __forceinline__ uint2 load_word(const uint8_t* p, bool ok) {
  return ok ? __ldg(reinterpret_cast<const uint2*>(p)) : make_uint2(0u, 0u);
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int64_t query_position(const void* pos, bool pos64, int64_t off, int max_pos) {
  const int64_t p = pos64 ? static_cast<const int64_t*>(pos)[off] : static_cast<const int32_t*>(pos)[off];
  return p < 0 ? 0 : (p >= max_pos ? max_pos - 1 : p);
}

// Columns (col, col + 1) of a head's output, rotated back when they fall in the last 2 * half_r.
__device__ __forceinline__ void store_pair(__nv_bfloat16* out, int col, float x0, float x1, const float* freqs,
                                           int64_t pos, int half_r) {
  const int first = kDim - 2 * half_r;
  if (col >= first) {
    const float2 cs = reinterpret_cast<const float2*>(freqs)[pos * half_r + ((col - first) >> 1)];
    const float y0 = x0 * cs.x + x1 * cs.y;
    const float y1 = x1 * cs.x - x0 * cs.y;
    x0 = y0;
    x1 = y1;
  }
  *reinterpret_cast<__nv_bfloat162*>(out + col) = __floats2bfloat162_rn(x0, x1);
}

struct Params {
  const __nv_bfloat16* q;
  const uint8_t* kv;
  const float* sink;
  const int32_t* idx;
  __nv_bfloat16* out;
  const float* freqs;
  const void* pos;
  float* part_o;
  float* part_ml;
  int64_t stride_qb, stride_qs, stride_qh;  // elements
  int64_t stride_kvb, stride_kvn;           // bytes
  int64_t stride_ib, stride_is;
  int64_t stride_pb, stride_ps;
  int seq, heads, n_rows, k, k_per_split, n_splits, max_pos, half_r;
  bool pos64;
  float qk_scale;  // softmax scale * log2(e)
};

template <int PEERS>
__global__ void __launch_bounds__(kThreads, 1) sparse_attention_fp8_kernel(const __grid_constant__ Params p) {
  extern __shared__ uint8_t smem_raw[];
  // 128-byte swizzled panels need 1024-byte aligned bases.  Offsetting the array (not a
  // rebuilt integer address) keeps the accesses in the shared window (STS/LDS, not generic).
  // The offset is the same in both CTAs of a cluster (same kernel, same dynamic layout), so a
  // tile's offset names the partner's copy too.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* q_tile = smem;
  uint8_t* kv_tiles = smem + kQBytes;
  float* exch = reinterpret_cast<float*>(kv_tiles + kStages * kStageBytes);
  float* bias = exch + 2 * kExchFloats;
  uint64_t* full = reinterpret_cast<uint64_t*>(bias + kStages * kTile);
  uint64_t* empty = full + kStages;

  const int n_hblk = p.heads / kHeads;
  const int tok = blockIdx.x / n_hblk;
  const int h0 = (blockIdx.x % n_hblk) * kHeads;
  const int rank = PEERS == 2 ? static_cast<int>(blockIdx.x & 1) : 0;  // the cluster spans x in pairs
  const int b = tok / p.seq, s = tok % p.seq;
  const int split = blockIdx.y;
  const int k_lo = split * p.k_per_split;
  const int k_hi = min(p.k, k_lo + p.k_per_split);
  const int n_tiles = (k_hi - k_lo + kTile - 1) / kTile;
  const int wg = threadIdx.x >> 7;
  const int lane = threadIdx.x & 31;

  if (threadIdx.x == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(&full[st], 128);                       // this CTA's producer threads (+ the partner's bytes)
      mbar_init(&empty[st], PEERS * kConsumerWarps);  // every consumer warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // Both CTAs have started and set up their barriers before either signals the other.
  if (PEERS == 2) cluster_sync();
  else __syncthreads();

  if (wg == 0) {
    // ---- producer: gather + decode, one tile ahead of the consumers ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 120;\n");
    // Warp w decodes tile rows first .. first + kRows - 1 of every tile: with crossover this
    // CTA takes half of the 64 rows and the partner the other half.
    constexpr int kRows = 16 / PEERS;
    const int warp = threadIdx.x >> 5;
    const int first = rank * (kTile / PEERS) + warp * kRows;
    const int32_t* idx_row = p.idx + b * p.stride_ib + s * p.stride_is;
    const uint8_t* kv_b = p.kv + b * p.stride_kvb;
    const uint32_t peer = PEERS == 2 ? rank ^ 1 : 0;
    // Lane l holds the cache row of tile row first + l % kRows.  Indices are loaded two tiles
    // ahead and their rows prefetched into L2 then, so the gathers of a tile wait for L2, not
    // for device memory, and the index load is off the chain.
    auto tile_row = [&](int t) {
      const int kk = k_lo + t * kTile + first + lane % kRows;
      return t < n_tiles && kk < k_hi ? __ldg(idx_row + kk) : -1;
    };
    auto prefetch_rows = [&](int row) {
      if (static_cast<unsigned>(row) < static_cast<unsigned>(p.n_rows)) {
        // 5 lines of 128 bytes start inside the 584-byte row, spread over the lanes of a row.
        constexpr int kLanesARow = 32 / kRows;
        const uint8_t* src = kv_b + static_cast<int64_t>(row) * p.stride_kvn + (lane / kRows) * 128;
        for (int line = lane / kRows; line < 5; line += kLanesARow, src += kLanesARow * 128)
          asm volatile("prefetch.global.L2 [%0];" ::"l"(src));
      }
    };
    // Rows a batch: their three 8-byte words a lane (codes, codes or rope, rope or scales).
    struct Words {
      uint2 w0[kBatch], w1[kBatch], w2[kBatch];
    };
    constexpr int kBatches = kRows / kBatch;
    static_assert(kBatches % 2 == 0, "the two word buffers alternate within a tile and restart with it");
    auto load_batch = [&](Words& w, int rows, int batch) {
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int row = __shfl_sync(0xffffffffu, rows, batch * kBatch + i);
        const bool ok = static_cast<unsigned>(row) < static_cast<unsigned>(p.n_rows);
        const uint8_t* src = kv_b + static_cast<int64_t>(ok ? row : 0) * p.stride_kvn;
        w.w0[i] = load_word(src + 8 * lane, ok);                     // codes, columns 8 lane ..
        w.w1[i] = load_word(src + 8 * (lane + 32), ok);              // codes (lane < 24) or rope words 0..7
        w.w2[i] = load_word(src + 8 * (lane + 64), ok && lane < 9);  // rope words 8..15, the scales (lane 8)
      }
    };
    auto decode_batch = [&](const Words& w, const TileSink<PEERS>& sink, int batch) {
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int r = first + batch * kBatch + i;
        const uint32_t sc_lo = __shfl_sync(0xffffffffu, w.w2[i].x, 8);
        const uint32_t sc_hi = __shfl_sync(0xffffffffu, w.w2[i].y, 8);
        const int b0 = lane >> 3, b1 = (lane + 32) >> 3;
        const uint32_t byte0 = (sc_lo >> (8 * b0)) & 0xFF;
        const uint32_t byte1 = (b1 < 4 ? sc_lo >> (8 * b1) : sc_hi >> (8 * (b1 - 4))) & 0xFF;
        store_codes(sink, r, lane, w.w0[i], e8m0_value(byte0));
        if (lane < 24) store_codes(sink, r, lane + 32, w.w1[i], e8m0_value(byte1));
        else store_rope(sink, r, lane - 24, w.w1[i]);
        if (lane < 8) store_rope(sink, r, lane + 8, w.w2[i]);
      }
    };
    int rows_now = tile_row(0), rows_next = tile_row(1);
    prefetch_rows(rows_now);
    prefetch_rows(rows_next);
    Words words[2];
    load_batch(words[0], rows_now, 0);
    for (int t = 0; t < n_tiles; ++t) {
      const int st = t % kStages;
      const int rows_later = tile_row(t + 2);
      // Free once both CTAs' consumers are done with tile t - kStages (a fresh barrier's
      // parity-1 phase counts as done: the first kStages tiles do not wait).
      mbar_wait_cluster(smem_addr(&empty[st]), ((t / kStages) & 1) ^ 1);
      TileSink<PEERS> sink{kv_tiles + st * kStageBytes, 0u, 0u};
      if (PEERS == 2) {
        sink.peer_tile = in_rank(smem_addr(sink.tile), peer);
        sink.peer_full = in_rank(smem_addr(&full[st]), peer);
      }
      if (lane < kRows) {
        const float v = static_cast<unsigned>(rows_now) < static_cast<unsigned>(p.n_rows) ? 0.f : -INFINITY;
        float* slot = bias + st * kTile + first + lane;
        *slot = v;
        if (PEERS == 2) send(in_rank(smem_addr(slot), peer), __float_as_uint(v), sink.peer_full);
      }
      // Batch j + 1's loads (the next tile's first batch after the last) are in flight
      // while batch j is decoded: the gathers wait on L2 beside the decode, not before it.
#pragma unroll 1
      for (int batch = 0; batch < kBatches; batch += 2) {
        load_batch(words[1], rows_now, batch + 1);
        decode_batch(words[0], sink, batch);
        if (batch + 2 < kBatches) load_batch(words[0], rows_now, batch + 2);
        else load_batch(words[0], rows_next, 0);
        decode_batch(words[1], sink, batch + 1);
      }
      fence_async_shared();
      // The partner's half: its rows' 1024 bytes and bias word each.
      if (PEERS == 2 && threadIdx.x == 0) mbar_expect_bytes(&full[st], (kTile / PEERS) * (2 * kDim + 4));
      else mbar_arrive(&full[st]);
      prefetch_rows(rows_later);
      rows_now = rows_next;
      rows_next = rows_later;
    }
    return;
  }

  // ---- consumers: warpgroup c owns columns 256 c .. 256 c + 255 ----
  // Registers: 168 a thread at launch (__launch_bounds__), so 120 for the producer (two
  // batches' words) leaves 192 for each consumer (128 * 120 + 256 * 192 = 384 * 168): asking
  // more would wait forever.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 192;\n");
  const int c = wg - 1;
  const int ct = threadIdx.x - 128 * wg;
  const int warp = ct >> 5;
  const int r0 = warp * 16 + (lane >> 2);  // this thread's rows: r0, r0 + 8
  const int cq = 2 * (lane & 3);           // its columns in each 8-column chunk: cq, cq + 1
  {
    const __nv_bfloat16* q_tok = p.q + b * p.stride_qb + s * p.stride_qs + static_cast<int64_t>(h0) * p.stride_qh;
#pragma unroll 4
    for (int i = 0; i < 16; ++i) {
      const int chunk = ct + 128 * i;  // 32 chunks of 8 columns a row
      const int row = chunk >> 5, col = c * 256 + 8 * (chunk & 31);
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(q_tok + row * p.stride_qh + col));
      *reinterpret_cast<uint4*>(q_tile + (col >> 6) * kPanelBytes + swizzled(row, (col >> 3) & 7)) = v;
    }
    fence_async_shared();
    bar_sync(kBarQ + c, 128);
  }
  const uint32_t q_base = smem_addr(q_tile) + 4 * c * kPanelBytes;
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float* exch_mine = exch + c * kExchFloats;
  const float* exch_other = exch + (1 - c) * kExchFloats;

  for (int t = 0; t < n_tiles; ++t) {
    const int st = t % kStages;
    mbar_wait_cluster(smem_addr(&full[st]), (t / kStages) & 1);
    if (PEERS == 2) fence_async_shared();  // the partner's rows came by st.async, read next by wgmma
    const uint32_t kv_base = smem_addr(kv_tiles + st * kStageBytes) + 4 * c * kPanelBytes;
    float sc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) sc[i] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int pnl = 0; pnl < 4; ++pnl) {
#pragma unroll
      for (int k16 = 0; k16 < 4; ++k16) {
        const uint32_t off = pnl * kPanelBytes + k16 * 32;
        wgmma_m64n64k16_ss(sc, smem_desc(q_base + off, 16, 1024), smem_desc(kv_base + off, 16, 1024),
                           (pnl | k16) != 0);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 32; ++i) pin(sc[i]);

    // S = S_0 + S_1 (the same sum in both warpgroups).  exch_mine is free again once the
    // partner has read the last tile's: both pass kBarExchFree first (the full barrier no
    // longer syncs the two consumers).
    if (t > 0) bar_sync(kBarExchFree, 256);
#pragma unroll
    for (int i = 0; i < 32; ++i) exch_mine[i * 128 + ct] = sc[i];
    bar_sync(kBarExch, 256);
#pragma unroll
    for (int i = 0; i < 32; ++i) sc[i] += exch_other[i * 128 + ct];

    const float* tile_bias = bias + st * kTile;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 bb = *reinterpret_cast<const float2*>(tile_bias + 8 * j + cq);
      sc[4 * j] += bb.x;
      sc[4 * j + 1] += bb.y;
      sc[4 * j + 2] += bb.x;
      sc[4 * j + 3] += bb.y;
    }
    float alpha[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(sc[4 * j + 2 * hr], sc[4 * j + 2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // The reference moves only when a score passes it by more than kMaxLead (base-2
      // exponent; the Triton kernel's lazy rescale): the exponents stay below 2^kMaxLead, and
      // most tiles keep alpha = 1 and skip the accumulator rescale.  O and l share the
      // reference, so the quotient is unchanged.
      const float m_tile = mx * p.qk_scale;
      const bool move = m_tile > m_run[hr] + kMaxLead;
      const float m_new = move ? m_tile : m_run[hr];
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // no candidate yet: keep exp2 finite
      alpha[hr] = move ? fast_exp2(m_run[hr] - m_ref) : 1.f;
      m_run[hr] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = sc[4 * j + 2 * hr + e];
          x = fast_exp2(fmaf(x, p.qk_scale, -m_ref));
          sum += x;
        }
      }
      l_run[hr] = l_run[hr] * alpha[hr] + sum;
    }
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        o[4 * j] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
    }
    uint32_t pa[4][4];  // P as the A operand: k-step kk = candidates 16 kk .. 16 kk + 15
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) pa[kk][r] = pack_bf16(sc[8 * kk + 2 * r], sc[8 * kk + 2 * r + 1]);
    }
#pragma unroll
    for (int i = 0; i < 128; ++i) pin(o[i]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_m64n256k16_rs(o, pa[kk], smem_desc(kv_base + kk * 16 * 128, kPanelBytes, 1024));
    }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 128; ++i) pin(o[i]);
    if (t + kStages < n_tiles) {
      // Every warp's reads of the stage are done (its wgmma wait): one arrival a warp, on this
      // CTA's barrier and, with crossover, on the partner's.  No arrival for the last tiles:
      // nobody waits for them, and the partner may have left.
      __syncwarp();
      if (lane == 0) {
        mbar_arrive(&empty[st]);
        if (PEERS == 2) mbar_arrive_remote(in_rank(smem_addr(&empty[st]), rank ^ 1));
      }
    }
  }

  // ---- epilogue ----
  int64_t pos = 0;
  if (p.half_r > 0) pos = query_position(p.pos, p.pos64, b * p.stride_pb + s * p.stride_ps, p.max_pos);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = l_run[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int h = h0 + r0 + 8 * hr;
    const int64_t head_row = static_cast<int64_t>(tok) * p.heads + h;
    if (p.n_splits > 1) {
      const int64_t slot = head_row * p.n_splits + split;
      float* dst = p.part_o + slot * kDim + 256 * c;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<float2*>(dst + 8 * j + cq) = make_float2(o[4 * j + 2 * hr], o[4 * j + 2 * hr + 1]);
      if (c == 0 && (lane & 3) == 0) {
        p.part_ml[2 * slot] = m_run[hr];
        p.part_ml[2 * slot + 1] = l;
      }
    } else {
      const float sink = p.sink[h] * kLog2e;
      const float m_fin = fmaxf(m_run[hr], sink);
      const float a = fast_exp2(m_run[hr] - m_fin);
      const float f = a / (l * a + fast_exp2(sink - m_fin));
      __nv_bfloat16* dst = p.out + head_row * kDim;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        store_pair(dst, 256 * c + 8 * j + cq, o[4 * j + 2 * hr] * f, o[4 * j + 2 * hr + 1] * f, p.freqs, pos,
                   p.half_r);
    }
  }
}

// The slices of one (token, head) in split order: one CTA of 128 threads, 4 columns each.
// Every slice's (m, l) is loaded at once into shared memory and the partial rows kMergeBatch
// at a time, so the merge waits on ~1 + n_splits / kMergeBatch round trips, not 3 n_splits;
// the arithmetic and its order are those of a plain loop over the slices.
__global__ void __launch_bounds__(128) merge_slices_kernel(const __grid_constant__ Params p) {
  __shared__ float2 ml[kMaxSplits];
  const int64_t head_row = blockIdx.x;
  const int h = static_cast<int>(head_row % p.heads);
  const int tok = static_cast<int>(head_row / p.heads);
  const int b = tok / p.seq, s = tok % p.seq;
  const int64_t slot0 = head_row * p.n_splits;
  if (threadIdx.x < p.n_splits) ml[threadIdx.x] = reinterpret_cast<const float2*>(p.part_ml)[slot0 + threadIdx.x];
  __syncthreads();
  const float sink = p.sink[h] * kLog2e;
  float m_fin = sink;
  for (int i = 0; i < p.n_splits; ++i) m_fin = fmaxf(m_fin, ml[i].x);
  float den = fast_exp2(sink - m_fin);
  for (int i = 0; i < p.n_splits; ++i) den += ml[i].y * fast_exp2(ml[i].x - m_fin);
  const int col = 4 * threadIdx.x;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int i0 = 0; i0 < p.n_splits; i0 += kMergeBatch) {
    float4 v[kMergeBatch];
#pragma unroll
    for (int j = 0; j < kMergeBatch; ++j)
      if (i0 + j < p.n_splits) v[j] = *reinterpret_cast<const float4*>(p.part_o + (slot0 + i0 + j) * kDim + col);
#pragma unroll
    for (int j = 0; j < kMergeBatch; ++j) {
      if (i0 + j < p.n_splits) {
        const float w = fast_exp2(ml[i0 + j].x - m_fin) / den;
        acc.x += w * v[j].x;
        acc.y += w * v[j].y;
        acc.z += w * v[j].z;
        acc.w += w * v[j].w;
      }
    }
  }
  int64_t pos = 0;
  if (p.half_r > 0) pos = query_position(p.pos, p.pos64, b * p.stride_pb + s * p.stride_ps, p.max_pos);
  __nv_bfloat16* dst = p.out + head_row * kDim;
  store_pair(dst, col, acc.x, acc.y, p.freqs, pos, p.half_r);
  store_pair(dst, col + 2, acc.z, acc.w, p.freqs, pos, p.half_r);
}

// The attention kernel over `grid`, in clusters of PEERS CTAs along x.  The dynamic
// shared-memory limit is a per-device attribute of the kernel: set on every call (a host-side
// call, no device work).
template <int PEERS>
void launch(const Params& p, dim3 grid, cudaStream_t stream) {
  const auto kernel = sparse_attention_fp8_kernel<PEERS>;
  DSV4_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes) == cudaSuccess,
             "sparse_attention_fp8: cannot raise the shared-memory limit");
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config = cluster_config(grid, dim3(PEERS), kThreads, kSmemBytes, stream, attr);
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, p);
  DSV4_CHECK(err == cudaSuccess, "sparse_attention_fp8 launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// q: bf16 [B, S, H, 512] (rows 16-byte aligned, last dim contiguous), H a multiple of 64;
// kv: uint8 [B, N, 584] FP8 cache rows (8-byte aligned); sink: fp32 [H]; idx: int32 [B, S, K]
// (last dim contiguous); out: bf16 [B, S, H, 512] contiguous; freqs: fp32 [max_pos, half_r, 2]
// and positions int32/int64 [B, S] when half_r > 0 (any tensors otherwise); part_o / part_ml:
// the split workspace (>= tokens * H * n_splits * 512 / * 2 floats) when n_splits > 1; peers:
// 2 for crossover (the two CTAs of a head-block pair share the decoded tiles; H a multiple of
// 128), else 1.
void sparse_attention_fp8(at::Tensor q, at::Tensor kv, at::Tensor sink, at::Tensor idx, at::Tensor out,
                          at::Tensor freqs, at::Tensor positions, int64_t half_r, at::Tensor part_o,
                          at::Tensor part_ml, double qk_scale, int64_t n_splits, int64_t k_per_split, int64_t peers,
                          int64_t stream_handle) {
  require_sm90(q.get_device(), "sparse_attention_fp8");
  DSV4_CHECK(q.scalar_type() == at::kBFloat16 && q.dim() == 4 && q.size(3) == kDim && q.stride(3) == 1,
              "q: expected bf16 [B, S, H, 512] with a contiguous last dim");
  DSV4_CHECK(q.size(2) % kHeads == 0, "q: expected a multiple of 64 heads, got ", q.size(2));
  DSV4_CHECK(kv.scalar_type() == at::kByte && kv.dim() == 3 && kv.size(2) == kRowBytes && kv.stride(2) == 1,
              "kv: expected uint8 [B, N, 584] FP8 cache rows");
  DSV4_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 3 && idx.stride(2) == 1,
              "idx: expected int32 [B, S, K] with a contiguous last dim");
  DSV4_CHECK(out.is_contiguous() && out.sizes() == q.sizes(), "out: expected a contiguous tensor shaped like q");
  // The kernel reads q rows as 16-byte vectors and cache rows as 8-byte words.
  DSV4_CHECK(aligned(q, 16) && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && q.stride(2) % 8 == 0,
              "q: expected 16-byte aligned rows");
  DSV4_CHECK(aligned(kv, 8) && kv.stride(0) % 8 == 0 && kv.stride(1) % 8 == 0, "kv: expected 8-byte aligned rows");
  DSV4_CHECK(sink.scalar_type() == at::kFloat && sink.is_contiguous() && sink.numel() == q.size(2),
              "sink: expected contiguous fp32 [H]");
  DSV4_CHECK(peers == 1 || (peers == 2 && q.size(2) % (2 * kHeads) == 0),
              "peers: expected 1, or 2 with a multiple of 128 heads; got ", peers, " with ", q.size(2), " heads");
  DSV4_CHECK(n_splits >= 1 && n_splits <= kMaxSplits && k_per_split >= 1 && n_splits * k_per_split >= idx.size(2),
              "n_splits / k_per_split: expected at most ", kMaxSplits, " slices that cover the K candidates");
  if (n_splits > 1) {
    const int64_t slots = q.size(0) * q.size(1) * q.size(2) * n_splits;
    DSV4_CHECK(part_o.scalar_type() == at::kFloat && part_o.numel() >= slots * kDim &&
                    part_ml.scalar_type() == at::kFloat && part_ml.numel() >= 2 * slots,
                "part_o / part_ml: expected fp32 workspaces of tokens * H * n_splits * (512 | 2) floats");
  }
  Params p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.kv = kv.data_ptr<uint8_t>();
  p.sink = sink.data_ptr<float>();
  p.idx = idx.data_ptr<int32_t>();
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  p.freqs = freqs.data_ptr<float>();
  p.pos = positions.data_ptr();
  p.pos64 = positions.scalar_type() == at::kLong;
  p.part_o = part_o.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.stride_qb = q.stride(0);
  p.stride_qs = q.stride(1);
  p.stride_qh = q.stride(2);
  p.stride_kvb = kv.stride(0);
  p.stride_kvn = kv.stride(1);
  p.stride_ib = idx.stride(0);
  p.stride_is = idx.stride(1);
  p.stride_pb = positions.dim() == 2 ? positions.stride(0) : 0;
  p.stride_ps = positions.dim() == 2 ? positions.stride(1) : 0;
  p.seq = static_cast<int>(q.size(1));
  p.heads = static_cast<int>(q.size(2));
  p.n_rows = static_cast<int>(kv.size(1));
  p.k = static_cast<int>(idx.size(2));
  p.k_per_split = static_cast<int>(k_per_split);
  p.n_splits = static_cast<int>(n_splits);
  p.max_pos = half_r > 0 ? static_cast<int>(freqs.size(0)) : 1;
  p.half_r = static_cast<int>(half_r);
  p.qk_scale = static_cast<float>(qk_scale);
  const int64_t tokens = q.size(0) * q.size(1);
  if (tokens == 0) return;
  const DeviceScope scope(q.get_device());
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>(tokens * (p.heads / kHeads)), static_cast<unsigned>(n_splits));
  if (peers == 2) launch<2>(p, grid, stream);
  else launch<1>(p, grid, stream);
  if (n_splits > 1) {
    merge_slices_kernel<<<static_cast<unsigned>(tokens * p.heads), 128, 0, stream>>>(p);
    check_launch("sparse_attention_fp8 merge");
  }
}
