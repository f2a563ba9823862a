// mHC pre-mix (hc_pre, SPEC 9) at prefill sizes: one launch that reads X from HBM once.
// targets: sm90a
//
// Per token the 24 mixes fn @ flatten(X) need the whole row of 4 * dim values before pre is
// known, and y = sum_i pre_i X_i needs the row again.  The Triton kernels read X twice: a
// block of tokens cannot stay on chip while enough tokens share one read of fn (2.75 MB at
// dim 7168), so fn would be re-read from L2 per block.  Here fn stays on chip instead: a
// cluster of 16 CTAs holds it, each CTA the columns of its 1/16 slice of dim (all four
// streams) in registers, as the B operands of mma.sync (24 mixes = three n8 tiles).  X
// streams through: a batch of 16 tokens (the MMA's M) is copied slice by slice into the 16
// CTAs' shared memory, each multiplies its slice, token j's partial row (24 mixes and the sum
// of squares) goes to CTA j of the cluster (st.async into its shared memory), which sums
// the 16 in rank order, applies rsqrt and the activations, writes post and the comb logits,
// and sends pre back to every CTA; each CTA then writes y for its slice from the copy still
// in its shared memory.  The Sinkhorn iterations run at the end, one thread a token, on the
// logits its CTA wrote (they are off the batch's critical path there).
//
// fn as two BF16 parts, hi + mid: the products with BF16 X are exact and summed in FP32; the
// part left out is below 2^-16 of |fn| per element (three parts, the Triton kernels' 2^-24,
// need 252 registers a thread for the fragments and do not fit).  The mixes then err by at
// most 2^-16 * sum |X fn| plus the FP32 summation, the size of an FP32 dot's rounding over
// 4 * dim terms (tests/test_cuda_mhc.py states the bound).
//
// Batches are pipelined: batch i's MMAs run while batch i + 1's copy is in flight, and
// batch i - 1's y waits on pre values sent while batch i was multiplied, so each exchange's
// latency hides under the next batch's work.  Three copy stages (batch i - 1 awaiting its y,
// i in the MMAs, i + 1 landing).  Every barrier phase is one batch; two of each alternate,
// and no CTA can send a batch's values before its receiver finished waiting on the phase two
// batches earlier (sending needs values that the receiver only sends after that wait).

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "cluster.cuh"
#include "host.cuh"
#include "shared_memory.cuh"

using namespace dsv4;
namespace cg = cooperative_groups;

namespace {

constexpr int kCluster = 16;  // CTAs a cluster, each 1/16 of the columns; also the tokens a batch
constexpr int kTokens = 16;   // tokens a batch: the MMA's M; token j's owner is CTA j
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxSteps = 14;  // 16-column MMA steps a warp: dim / 512, dim <= 7168
constexpr int kMix = 24;
constexpr int kSsq = 24;       // partial-row column of the sum of squares
constexpr int kRow = 28;       // partial-row floats: 24 mixes, the sum of squares, padding to 16 bytes
constexpr int kStages = 3;
constexpr int kSlots = 2;      // alternating barrier phases
constexpr int kMaxIters = 1 << 16;

struct Params {
  const __nv_bfloat16* x;  // [T, 4, dim], contiguous
  const float* fn;         // [24, 4 * dim], contiguous
  const float* scale;      // [3]
  const float* base;       // [24]
  __nv_bfloat16* y;        // [T, dim]
  float* post;             // [T, 4]
  float* comb;             // [T, 4, 4]
  int tokens, dim, iters;
  float eps, norm_eps;
};

struct Exchange {
  float partial[kWarps][kTokens][kRow];               // each warp's partial rows of the batch
  float pre_rows[kSlots][kCluster][kTokens][8];       // from every CTA: the pre mixes and sum of squares
  float owned_rows[kSlots][kCluster][kRow];           // from every CTA: the row of the token owned here
  float pre[kTokens][4];                              // every token's pre
  uint64_t received[kSlots];                          // both kinds of rows of a batch
  uint64_t landed[kStages];                           // a batch's copy of X
};

// Bytes before the first copy stage (128-aligned) and a stage's row of one token (4 streams of
// dim / 16 BF16 values, plus 16 bytes so that ldmatrix's 8 rows fall in different banks).
// Before the first batch the stages hold the CTA's slice of fn, 24 rows of 4 * dim / 16 FP32
// values plus 16 bytes: 24 * (dim + 16) bytes, less than the stages' 48 * (dim / 2 + 16).
constexpr int kStageOffset = (sizeof(Exchange) + 127) / 128 * 128;
__host__ __device__ constexpr int row_bytes(int dim) { return 4 * (dim / kCluster) * 2 + 16; }
int smem_bytes(int dim) { return kStageOffset + kStages * kTokens * row_bytes(dim); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(address));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ float lo_bf16(uint32_t two) { return __uint_as_float(two << 16); }
__device__ __forceinline__ float hi_bf16(uint32_t two) { return __uint_as_float(two & 0xFFFF0000u); }

// Two fn values (consecutive columns) -> their BF16 hi and mid parts, packed as the MMA takes them.
__device__ __forceinline__ void split_pair(float f0, float f1, uint32_t& hi, uint32_t& mid) {
  const __nv_bfloat16 h0 = __float2bfloat16_rn(f0), h1 = __float2bfloat16_rn(f1);
  const __nv_bfloat16 m0 = __float2bfloat16_rn(f0 - __bfloat162float(h0));  // the difference is exact
  const __nv_bfloat16 m1 = __float2bfloat16_rn(f1 - __bfloat162float(h1));
  hi = static_cast<uint32_t>(__bfloat16_as_ushort(h0)) | (static_cast<uint32_t>(__bfloat16_as_ushort(h1)) << 16);
  mid = static_cast<uint32_t>(__bfloat16_as_ushort(m0)) | (static_cast<uint32_t>(__bfloat16_as_ushort(m1)) << 16);
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// SPEC 9's Sinkhorn on one token's 4 x 4 logits, by 4 consecutive lanes (a group of 4,
// lane q of it holding row q), in the oracle's order of operations except the column sums
// ((r0 + r1) + (r2 + r3), the same in every lane of the group).  One row a lane: each IEEE
// division is a branch of its own, so a lane holding the whole matrix ran its 32 divisions
// a round one after another (~20 us for 20 rounds).
__device__ __forceinline__ void sinkhorn_row(float (&m)[4], int iters, float eps) {
  const float top = fmaxf(fmaxf(m[0], m[1]), fmaxf(m[2], m[3]));
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    m[j] = expf(m[j] - top);
    sum += m[j];
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) m[j] = m[j] / sum + eps;
  for (int it = 0; it < iters; ++it) {
    if (it > 0) {
      const float den = m[0] + m[1] + m[2] + m[3] + eps;
#pragma unroll
      for (int j = 0; j < 4; ++j) m[j] = m[j] / den;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float col = m[j] + __shfl_xor_sync(~0u, m[j], 1);
      col += __shfl_xor_sync(~0u, col, 2);
      m[j] = m[j] / (col + eps);
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) hc_pre_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Exchange& ex = *reinterpret_cast<Exchange*>(smem);
  unsigned char* stages = smem + kStageOffset;
  const int rank = static_cast<int>(cg::this_cluster().block_rank());
  const int cluster_id = blockIdx.x / kCluster, clusters = gridDim.x / kCluster;
  const int n_batches = (p.tokens + kTokens - 1) / kTokens;
  // This cluster's batches: cluster_id, cluster_id + clusters, ... (the same count in every CTA).
  const int mine = cluster_id < n_batches ? (n_batches - 1 - cluster_id) / clusters + 1 : 0;
  if (mine == 0) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slice = p.dim / kCluster;  // columns of one stream in this CTA
  const int steps = slice / 32;        // MMA steps a warp: 4 * slice / 16 columns over 8 warps
  const int rb = row_bytes(p.dim);
  const int stage_bytes = kTokens * rb;
  auto first_token = [&](int i) { return (cluster_id + i * clusters) * kTokens; };

  if (tid == 0) {
    for (int s = 0; s < kSlots; ++s) mbar_init(&ex.received[s], 1);
    for (int s = 0; s < kStages; ++s) mbar_init(&ex.landed[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // The first send waits for this: every CTA of the cluster has set up its barriers.
  cluster_arrive_relaxed();

  // fn's slice of this CTA (24 rows of 4 * slice columns), staged through the copy stages'
  // memory by 16-byte copies (loading the fragments straight from global memory issued ~170
  // scattered loads a thread).  Rows padded by 16 bytes: the fragment loads below (8 rows x 4
  // column pairs a warp) then fall in different banks.
  const int fn_row = 4 * slice + 4;  // floats
  {
    const uint32_t dst0 = smem_addr(stages);
    const int runs16 = slice / 4;  // 16-byte pieces a run of one stream
    for (int c = tid; c < kMix * 4 * runs16; c += kThreads) {
      const int m = c / (4 * runs16), rest = c % (4 * runs16), s = rest / runs16, q = rest % runs16;
      cp_async16(dst0 + (m * fn_row + s * slice + q * 4) * 4,
                 p.fn + static_cast<int64_t>(m) * 4 * p.dim + s * p.dim + rank * slice + q * 4);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }
  // fn's columns of this warp as B fragments: step k covers the CTA's flattened columns
  // 16 * (warp * steps + k) + [0, 16) (stream-major, as X's copy in shared memory).
  const int g = lane >> 2, t4 = lane & 3;
  uint32_t b_hi[kMaxSteps][3][2], b_mid[kMaxSteps][3][2];
  const float* fn_stage = reinterpret_cast<const float*>(stages);
#pragma unroll
  for (int k = 0; k < kMaxSteps; ++k) {
    if (k < steps) {
#pragma unroll
      for (int n = 0; n < 3; ++n) {
        const float* f = fn_stage + (8 * n + g) * fn_row + 16 * (warp * steps + k) + 2 * t4;
        const float2 f01 = *reinterpret_cast<const float2*>(f), f89 = *reinterpret_cast<const float2*>(f + 8);
        split_pair(f01.x, f01.y, b_hi[k][n][0], b_mid[k][n][0]);
        split_pair(f89.x, f89.y, b_hi[k][n][1], b_mid[k][n][1]);
      }
    }
  }
  __syncthreads();  // the stages' memory is X's from here

  // Batch i's slice of X into its stage by the copy engine: per token and stream one run of
  // `slice` values, counted on the stage's barrier.  Warp 0 issues (after a __syncthreads that
  // ends every read of the stage's previous batch).
  auto load_batch = [&](int i) {
    if (i >= mine || warp != 0) return;
    const int token0 = first_token(i);
    const int valid = min(kTokens, p.tokens - token0);
    uint64_t* landed = &ex.landed[i % kStages];
    // The stage's last reads were generic-proxy ones; the copy engine writes through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    if (lane == 0) mbar_expect_bytes(landed, valid * 4 * slice * 2);
    unsigned char* dst0 = stages + (i % kStages) * stage_bytes;
    for (int r = lane; r < valid * 4; r += 32) {
      const int t = r / 4, s = r % 4;
      bulk_load(dst0 + t * rb + s * slice * 2, p.x + (static_cast<int64_t>(token0 + t) * 4 + s) * p.dim + rank * slice,
                slice * 2, landed);
    }
  };
  load_batch(0);
  load_batch(1);
  const float my_base = lane < kMix ? p.base[lane] : 0.0f;
  const float my_scale = p.scale[lane < 4 ? 0 : lane < 8 ? 1 : 2];
  const float inv_n = 1.0f / static_cast<float>(4 * p.dim);

  // Batch i's sums over the cluster, from the rows every CTA sent: pre of every token (for y)
  // and, for the token this CTA owns, post and the comb logits.
  auto finish_sums = [&](int i) {
    const int slot = i % kSlots;
    if (tid == 0) mbar_expect_bytes(&ex.received[slot], kCluster * (kTokens * 8 + kRow) * 4);
    mbar_wait_cluster(&ex.received[slot], (i / kSlots) & 1);
    if (tid < kTokens) {  // pre of token tid
      float v[5] = {};
      for (int r = 0; r < kCluster; ++r) {
        const float4 a = *reinterpret_cast<const float4*>(ex.pre_rows[slot][r][tid]);
        v[0] += a.x;
        v[1] += a.y;
        v[2] += a.z;
        v[3] += a.w;
        v[4] += ex.pre_rows[slot][r][tid][4];
      }
      const float rs = 1.0f / sqrtf(v[4] * inv_n + p.norm_eps);
      float4 pre;
      pre.x = sigmoid(__fadd_rn(__fmul_rn(v[0] * rs, p.scale[0]), p.base[0])) + p.eps;
      pre.y = sigmoid(__fadd_rn(__fmul_rn(v[1] * rs, p.scale[0]), p.base[1])) + p.eps;
      pre.z = sigmoid(__fadd_rn(__fmul_rn(v[2] * rs, p.scale[0]), p.base[2])) + p.eps;
      pre.w = sigmoid(__fadd_rn(__fmul_rn(v[3] * rs, p.scale[0]), p.base[3])) + p.eps;
      *reinterpret_cast<float4*>(ex.pre[tid]) = pre;
    } else if (warp == 1) {  // the owned token's post and comb logits, lane m for mix m
      float v = 0.0f;
      if (lane <= kSsq) {
        for (int r = 0; r < kCluster; ++r) v += ex.owned_rows[slot][r][lane];
      }
      const float ssq = __shfl_sync(~0u, v, kSsq);
      const float rs = 1.0f / sqrtf(ssq * inv_n + p.norm_eps);
      const float z = __fadd_rn(__fmul_rn(v * rs, my_scale), my_base);
      const int token = first_token(i) + rank;
      if (token < p.tokens) {
        if (lane >= 4 && lane < 8) p.post[static_cast<int64_t>(token) * 4 + lane - 4] = 2.0f * sigmoid(z);
        if (lane >= 8 && lane < kMix) p.comb[static_cast<int64_t>(token) * 16 + lane - 8] = z;
      }
    }
  };

  // y of batch i for this CTA's columns, from the copy still in shared memory.
  auto write_y = [&](int i) {
    const int token0 = first_token(i);
    const unsigned char* stage = stages + (i % kStages) * stage_bytes;
    const int groups = slice / 8;
    for (int c = tid; c < kTokens * groups; c += kThreads) {
      const int t = c / groups, q = c % groups;
      const int token = token0 + t;
      if (token >= p.tokens) continue;
      const float4 pre = *reinterpret_cast<const float4*>(ex.pre[t]);
      const unsigned char* row = stage + t * rb + q * 16;
      const uint4 x0 = *reinterpret_cast<const uint4*>(row);
      const uint4 x1 = *reinterpret_cast<const uint4*>(row + slice * 2);
      const uint4 x2 = *reinterpret_cast<const uint4*>(row + slice * 4);
      const uint4 x3 = *reinterpret_cast<const uint4*>(row + slice * 6);
      const uint32_t w0[4] = {x0.x, x0.y, x0.z, x0.w}, w1[4] = {x1.x, x1.y, x1.z, x1.w};
      const uint32_t w2[4] = {x2.x, x2.y, x2.z, x2.w}, w3[4] = {x3.x, x3.y, x3.z, x3.w};
      uint32_t out[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float lo = fmaf(pre.w, lo_bf16(w3[e]), fmaf(pre.z, lo_bf16(w2[e]),
                              fmaf(pre.y, lo_bf16(w1[e]), pre.x * lo_bf16(w0[e]))));
        const float hi = fmaf(pre.w, hi_bf16(w3[e]), fmaf(pre.z, hi_bf16(w2[e]),
                              fmaf(pre.y, hi_bf16(w1[e]), pre.x * hi_bf16(w0[e]))));
        const __nv_bfloat162 two = __floats2bfloat162_rn(lo, hi);
        out[e] = *reinterpret_cast<const uint32_t*>(&two);
      }
      *reinterpret_cast<uint4*>(p.y + static_cast<int64_t>(token) * p.dim + rank * slice + q * 8) =
          make_uint4(out[0], out[1], out[2], out[3]);
    }
  };

  for (int i = 0; i < mine; ++i) {
    const int slot = i % kSlots;
    mbar_wait(&ex.landed[i % kStages], (i / kStages) & 1);

    // This warp's columns of the batch: 16 tokens x 24 mixes, and the sum of squares.
    float acc[3][4] = {};
    float ssq_lo = 0.0f, ssq_hi = 0.0f;  // rows g and g + 8
    const uint32_t a_row = smem_addr(stages + (i % kStages) * stage_bytes) + (lane & 15) * rb + (lane >> 4) * 16;
#pragma unroll
    for (int k = 0; k < kMaxSteps; ++k) {
      if (k < steps) {
        uint32_t a[4];
        ldmatrix_x4(a, a_row + 32 * (warp * steps + k));
#pragma unroll
        for (int n = 0; n < 3; ++n) {
          mma_bf16(acc[n], a, b_hi[k][n]);
          mma_bf16(acc[n], a, b_mid[k][n]);
        }
        ssq_lo = fmaf(lo_bf16(a[0]), lo_bf16(a[0]), ssq_lo);
        ssq_lo = fmaf(hi_bf16(a[0]), hi_bf16(a[0]), ssq_lo);
        ssq_lo = fmaf(lo_bf16(a[2]), lo_bf16(a[2]), ssq_lo);
        ssq_lo = fmaf(hi_bf16(a[2]), hi_bf16(a[2]), ssq_lo);
        ssq_hi = fmaf(lo_bf16(a[1]), lo_bf16(a[1]), ssq_hi);
        ssq_hi = fmaf(hi_bf16(a[1]), hi_bf16(a[1]), ssq_hi);
        ssq_hi = fmaf(lo_bf16(a[3]), lo_bf16(a[3]), ssq_hi);
        ssq_hi = fmaf(hi_bf16(a[3]), hi_bf16(a[3]), ssq_hi);
      }
    }
    ssq_lo += __shfl_xor_sync(~0u, ssq_lo, 1);
    ssq_lo += __shfl_xor_sync(~0u, ssq_lo, 2);
    ssq_hi += __shfl_xor_sync(~0u, ssq_hi, 1);
    ssq_hi += __shfl_xor_sync(~0u, ssq_hi, 2);
    float(&part)[kTokens][kRow] = ex.partial[warp];
#pragma unroll
    for (int n = 0; n < 3; ++n) {
      part[g][8 * n + 2 * t4] = acc[n][0];
      part[g][8 * n + 2 * t4 + 1] = acc[n][1];
      part[g + 8][8 * n + 2 * t4] = acc[n][2];
      part[g + 8][8 * n + 2 * t4 + 1] = acc[n][3];
    }
    if (t4 == 0) {
      part[g][kSsq] = ssq_lo;
      part[g + 8][kSsq] = ssq_hi;
    }
    __syncthreads();

    // Every CTA has read what it was sent two batches ago (its arrival at the end of the last
    // batch): this batch's rows may go into the same slot.
    cluster_wait();
    // The CTA's partial rows (summed over the warps in order): token t's pre mixes and sum of
    // squares to every CTA (thread (t, r)), and its whole row to its owner, CTA t.
    {
      const int t = tid / kCluster, r = tid % kCluster;
      float v[5] = {};
      for (int w = 0; w < kWarps; ++w) {
        const float4 a = *reinterpret_cast<const float4*>(&ex.partial[w][t][0]);
        v[0] += a.x;
        v[1] += a.y;
        v[2] += a.z;
        v[3] += a.w;
        v[4] += ex.partial[w][t][kSsq];
      }
      const uint32_t barrier = in_rank(smem_addr(&ex.received[slot]), r);
      const uint32_t dst = in_rank(smem_addr(&ex.pre_rows[slot][rank][t][0]), r);
      send(dst, make_float4(v[0], v[1], v[2], v[3]), barrier);
      send(dst + 16, make_float4(v[4], 0.0f, 0.0f, 0.0f), barrier);
    }
    if (tid < kTokens * kRow / 4) {
      const int t = tid / (kRow / 4), q = tid % (kRow / 4);
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int w = 0; w < kWarps; ++w) {
        const float4 a = *reinterpret_cast<const float4*>(&ex.partial[w][t][4 * q]);
        v.x += a.x;
        v.y += a.y;
        v.z += a.z;
        v.w += a.w;
      }
      if (4 * q + 4 > kSsq + 1) v.y = v.z = v.w = 0.0f;  // padding past the sum of squares
      send(in_rank(smem_addr(&ex.owned_rows[slot][rank][4 * q]), t), v, in_rank(smem_addr(&ex.received[slot]), t));
    }

    if (i > 0) {  // the previous batch's rows arrived while this one was multiplied
      finish_sums(i - 1);
      __syncthreads();  // pre of every token
      write_y(i - 1);
    }
    cluster_arrive();  // the previous batch's received rows are read
    __syncthreads();   // its stage and this batch's partial rows are read
    load_batch(i + 2);
  }
  finish_sums(mine - 1);
  __syncthreads();
  write_y(mine - 1);
  cluster_wait();  // the arrival above had no wait yet

  // Sinkhorn of the tokens this CTA owned (their logits written above by warp 1 of this CTA),
  // a row a thread.
  __syncthreads();
  for (int base_row = 0; base_row < 4 * mine; base_row += kThreads) {
    const int i = (base_row + tid) / 4, row = tid % 4;
    const int token = first_token(i) + rank;
    const bool live = i < mine && token < p.tokens;  // whole groups of 4 lanes agree
    if (!__any_sync(~0u, live)) continue;
    float m[4] = {};
    float4* logits = reinterpret_cast<float4*>(p.comb + static_cast<int64_t>(live ? token : 0) * 16 + 4 * row);
    if (live) {
      const float4 z = *logits;
      m[0] = z.x, m[1] = z.y, m[2] = z.z, m[3] = z.w;
    }
    sinkhorn_row(m, p.iters, p.eps);
    if (live) *logits = make_float4(m[0], m[1], m[2], m[3]);
  }
}

// The kernel's attributes and a launch of `clusters` clusters for rows of `dim` values.
cudaLaunchConfig_t configure(int dim, int64_t clusters, cudaStream_t stream, cudaLaunchAttribute* attr) {
  const int smem = smem_bytes(dim);
  DSV4_CHECK(cudaFuncSetAttribute(hc_pre_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess,
             "hc_pre: cannot raise the shared-memory limit to ", smem, " bytes");
  DSV4_CHECK(cudaFuncSetAttribute(hc_pre_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess,
             "hc_pre: clusters of ", kCluster, " CTAs are not supported here");
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(clusters * kCluster));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

void check_dim(int64_t dim) {
  DSV4_CHECK(dim % 512 == 0 && dim >= 512 && dim <= 7168, "dim: expected a multiple of 512 in [512, 7168], got ",
             dim);
}

}  // namespace

// Clusters of 16 hc_pre CTAs for rows of `dim` values that the current device runs at once (0:
// it places none; an sm_90 part needs a GPC with 16 free SMs).
int64_t hc_pre_max_clusters(int64_t dim) {
  check_dim(dim);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config = configure(static_cast<int>(dim), 1, nullptr, attr);
  int clusters = 0;
  const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, hc_pre_kernel, &config);
  DSV4_CHECK(err == cudaSuccess, "hc_pre: cluster occupancy query failed: ", cudaGetErrorString(err));
  return clusters;
}

// X: bf16 [T, 4, dim] contiguous, 16-byte aligned; fn fp32 [24, 4 dim] contiguous; scale [3],
// base [24] fp32; y bf16 [T, dim], post fp32 [T, 4], comb fp32 [T, 4, 4], all contiguous.
// clusters: how many to launch (each loops over batches of 16 tokens).
void hc_pre_cluster(at::Tensor x, at::Tensor fn, at::Tensor scale, at::Tensor base, at::Tensor y, at::Tensor post,
                    at::Tensor comb, int64_t iters, double eps, double norm_eps, int64_t clusters,
                    int64_t stream_handle) {
  DSV4_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.size(1) == 4 && x.is_contiguous(),
             "x: expected contiguous bf16 [T, 4, dim], got ", x.scalar_type(), " ", x.sizes());
  const int64_t tokens = x.size(0), dim = x.size(2);
  check_dim(dim);
  DSV4_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x: expected a 16-byte aligned pointer");
  DSV4_CHECK(tokens > 0 && tokens < (int64_t{1} << 30), "x: expected 1 to 2^30 tokens, got ", tokens);
  DSV4_CHECK(fn.scalar_type() == at::kFloat && fn.is_contiguous() && fn.dim() == 2 && fn.size(0) == kMix &&
                 fn.size(1) == 4 * dim,
             "fn: expected contiguous fp32 [24, 4 dim], got ", fn.scalar_type(), " ", fn.sizes());
  DSV4_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 3 && scale.is_contiguous(),
             "scale: expected contiguous fp32 [3]");
  DSV4_CHECK(base.scalar_type() == at::kFloat && base.numel() == kMix && base.is_contiguous(),
             "base: expected contiguous fp32 [24]");
  DSV4_CHECK(y.scalar_type() == at::kBFloat16 && y.is_contiguous() && y.numel() == tokens * dim,
             "y: expected contiguous bf16 [T, dim]");
  DSV4_CHECK(reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0, "y: expected a 16-byte aligned pointer");
  DSV4_CHECK(post.scalar_type() == at::kFloat && post.is_contiguous() && post.numel() == tokens * 4,
             "post: expected contiguous fp32 [T, 4]");
  DSV4_CHECK(comb.scalar_type() == at::kFloat && comb.is_contiguous() && comb.numel() == tokens * 16,
             "comb: expected contiguous fp32 [T, 4, 4]");
  DSV4_CHECK(iters >= 1 && iters <= kMaxIters, "iters: expected 1 to ", kMaxIters, ", got ", iters);
  const int64_t batches = (tokens + kTokens - 1) / kTokens;
  DSV4_CHECK(clusters >= 1, "clusters: expected at least 1, got ", clusters);
  clusters = std::min(clusters, batches);

  Params p{};
  p.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  p.fn = fn.data_ptr<float>();
  p.scale = scale.data_ptr<float>();
  p.base = base.data_ptr<float>();
  p.y = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
  p.post = post.data_ptr<float>();
  p.comb = comb.data_ptr<float>();
  p.tokens = static_cast<int>(tokens);
  p.dim = static_cast<int>(dim);
  p.iters = static_cast<int>(iters);
  p.eps = static_cast<float>(eps);
  p.norm_eps = static_cast<float>(norm_eps);

  DeviceScope scope(x.get_device());
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config = configure(p.dim, clusters, reinterpret_cast<cudaStream_t>(stream_handle), attr);
  const cudaError_t err = cudaLaunchKernelEx(&config, hc_pre_kernel, p);
  DSV4_CHECK(err == cudaSuccess, "hc_pre launch failed: ", cudaGetErrorString(err));
}
