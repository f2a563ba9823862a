// Exact top-k of FP32 score rows at decode sizes: one thread-block cluster a row, one launch.
// targets: sm90a sm100a
//
// The selection of indexer_topk's cuda backend, with the conventions of the oracle
// (dsv4_triton/reference/indexer.py): the indices of the min(k, n_valid) largest scores below
// n_valid, ascending, then -1; ties at the k-th score go to the lower indices; NaN ranks above
// every number; -0.0 equals +0.0.
//
// A row is split into CLUSTER (1, 8 or 16) contiguous slices, one a CTA, held in registers
// (ITEMS keys a thread, key j of thread t at slice offset j * kThreads + t, so a warp's loads
// are 128 contiguous bytes).  Scores become order keys (unsigned, same order; 0 marks a key
// past n_valid, which no score maps to) and a radix select picks the k-th key's digits, 8 bits
// a level from the top: each CTA counts its slice per digit in shared memory and sends the
// counts to every CTA of the cluster (st.async into their shared memory, each receiver waiting
// on its own mbarrier for the bytes: one way, no cluster-wide barrier), and every CTA sums the
// CLUSTER histograms and makes the same pick.  A level ends the search early when all the
// keys left in the picked digit are taken.  The compaction ranks the selected keys in index
// order: per item and warp a ballot's count, one block scan over those counts, and the totals
// of the slices before this one, sent by their CTAs.
//
// Why a cluster: the row-parallel Triton selection pays five launches of a few microseconds
// each; one CTA a row does all the counting on one SM (one row of 32768 keys: 20.6 us, against
// 8.3 with 8 CTAs).  With many rows one CTA a row wins instead (32 or more rows: no exchange,
// and the rows fill the machine).  H100 (graph replays, selection alone): see
// benchmarks/NOTES.md, "indexer, seventeenth round" and "indexer, twenty-fourth round".

#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cluster.cuh"
#include "host.cuh"
#include "shared_memory.cuh"
#include "sm90_tma.cuh"  // the mbarrier helpers (sm_90 and later)

using namespace dsv4;
namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxItems = 32;  // keys a thread: 64 registers a thread at most with 1024 threads
constexpr int kBins = 256;
constexpr int kLevels = 4;
// Copies of a level's histogram, lane l counting into copy l % kCopies: lanes of one atomic
// instruction that share a digit then mostly hit different addresses (a row's scores crowd a
// few digits of the top levels, and same-address atomics of one instruction are serialised).
// Rows of kBins + 1 words put a digit's copies in different banks.
constexpr int kCopies = 16;

struct Params {
  const float* scores;  // [rows, n_keys], contiguous
  const int32_t* n_valid;
  int32_t* out;  // [rows, k], contiguous
  int64_t stride_nb, stride_ns;
  int seq, n_keys, k;
};

template <int CLUSTER>
struct Shared {
  int hist[kCopies][kBins + 1];  // this slice's counts of the current level
  int cluster_hist[kLevels][CLUSTER][kBins];  // every slice's counts, sent by the slice's CTA
  // Completed when every CTA's counts of a level (kLevels of them), and the totals of the
  // slices before this one (the last), have landed here.
  uint64_t arrived[kLevels + 1];
  // Per (item, warp) the counts of selected keys above the threshold (low 16 bits) and tied
  // with it (high 16 bits); after the scan, the counts before that (item, warp) in the slice.
  uint32_t counts[kMaxItems * kWarps];
  uint32_t warp_sums[kWarps];
  uint32_t slice_totals[CLUSTER];  // the counts of the slices before this one, sent by their CTAs
  int pick[3];                     // digit, keys above it, keys in it
};

__device__ __forceinline__ uint32_t order_key(float v) {
  int32_t bits = v == 0.0f ? 0 : __float_as_int(v);  // -0.0 as +0.0
  bits = bits < 0 ? bits ^ 0x7FFFFFFF : bits;
  if (v != v) bits = 0x7FFFFFFF;  // NaN of either sign above +Inf
  return static_cast<uint32_t>(bits) ^ 0x80000000u;  // -Inf is 0x007FFFFF: 0 is free for "not a key"
}

__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t v, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const uint32_t up = __shfl_up_sync(~0u, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Threads 0..255 only: the digit (of the level's summed histograms) that holds the
// `remaining`-th largest key among those matching the prefix, into sh.pick.
template <int CLUSTER>
__device__ __forceinline__ void pick_digit(Shared<CLUSTER>& sh, int level, int remaining, int tid, int lane,
                                           int warp) {
  const int bin = kBins - 1 - tid;  // thread 0 holds the highest digit
  int in_bin = 0;
#pragma unroll
  for (int r = 0; r < CLUSTER; ++r) in_bin += sh.cluster_hist[level][r][bin];
  uint32_t at_or_above = warp_inclusive_sum(static_cast<uint32_t>(in_bin), lane);
  if (lane == 31) sh.warp_sums[warp] = at_or_above;
  asm volatile("bar.sync 1, %0;" ::"n"(kBins));  // the 8 warps of the pick only
  for (int w = 0; w < warp; ++w) at_or_above += sh.warp_sums[w];
  const int above = static_cast<int>(at_or_above) - in_bin;
  if (above < remaining && static_cast<int>(at_or_above) >= remaining) {
    sh.pick[0] = bin;
    sh.pick[1] = above;
    sh.pick[2] = in_bin;
  }
}

// One barrier phase that completes when `bytes` have been sent to it (one arrival: this call's).
__device__ __forceinline__ void expect_bytes(uint64_t* barrier, uint32_t bytes) {
  mbar_init(barrier, 1);
  mbar_expect_bytes(barrier, bytes);
}

template <int CLUSTER, int ITEMS>
__global__ void __launch_bounds__(kThreads, 1) row_topk_kernel(Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  Shared<CLUSTER>& sh = *reinterpret_cast<Shared<CLUSTER>*>(smem);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t row = blockIdx.x / CLUSTER;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = row / p.seq, s = row % p.seq;
  const int n = min(max(p.n_valid[b * p.stride_nb + s * p.stride_ns], 0), p.n_keys);
  const int take = min(p.k, n);
  int32_t* out = p.out + row * p.k;
  for (int pos = take + rank * kThreads + tid; pos < p.k; pos += CLUSTER * kThreads) out[pos] = -1;
  constexpr int kSlice = ITEMS * kThreads;
  const int first = rank * kSlice;
  if (take == n) {  // every valid key is selected (uniform over the cluster: no barrier passed yet)
    for (int i = first + tid; i < min(n, first + kSlice); i += kThreads) out[i] = i;
    return;
  }
  if (tid == 0) {
    for (int level = 0; level < kLevels; ++level) expect_bytes(&sh.arrived[level], CLUSTER * kBins * 4);
    expect_bytes(&sh.arrived[kLevels], rank * 4);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // the barriers, to the cluster
  }
  // Arrived here, waited for before the first send to another CTA: by then every CTA of the
  // cluster has started and set up its barriers (the rule for distributed shared memory),
  // without a round trip now.
  cluster_arrive_relaxed();

  uint32_t key[ITEMS];
  const float* src = p.scores + row * p.n_keys;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int i = first + j * kThreads + tid;
    key[j] = i < n ? order_key(src[i]) : 0u;
  }
  for (int i = tid; i < kCopies * (kBins + 1); i += kThreads) (&sh.hist[0][0])[i] = 0;

  // The radix select: after it, the selected keys are those whose top bits (key >> shift) are
  // above `prefix`, and the first `remaining` (in index order) of those equal to it.
  uint32_t prefix = 0;
  int remaining = take;
  int shift = 0;
  int* my_copy = sh.hist[lane % kCopies];
  for (int level = 0; level < kLevels; ++level) {
    const int level_shift = 24 - 8 * level;
    __syncthreads();  // the histogram zeroed, the last pick read
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      if (key[j] != 0 && (level == 0 || (key[j] >> (level_shift + 8)) == prefix)) {
        atomicAdd(&my_copy[(key[j] >> level_shift) & (kBins - 1)], 1);
      }
    }
    __syncthreads();
    if (level == 0) cluster_wait();
    if (tid < kBins) {
      int in_bin = 0;
#pragma unroll
      for (int c = 0; c < kCopies; ++c) {
        in_bin += sh.hist[c][tid];
        sh.hist[c][tid] = 0;  // for the next level
      }
      const uint32_t slot = smem_addr(&sh.cluster_hist[level][rank][tid]);
      const uint32_t barrier = smem_addr(&sh.arrived[level]);
#pragma unroll
      for (int r = 0; r < CLUSTER; ++r) send(in_rank(slot, r), static_cast<uint32_t>(in_bin), in_rank(barrier, r));
      mbar_wait_cluster(smem_addr(&sh.arrived[level]), 0);  // every slice's histogram of this level
      pick_digit(sh, level, remaining, tid, lane, warp);
    }
    __syncthreads();
    remaining -= sh.pick[1];
    prefix = (prefix << 8) | static_cast<uint32_t>(sh.pick[0]);
    if (sh.pick[2] == remaining) {  // the digit's keys are all taken
      shift = level_shift;
      break;
    }
  }

  // Counts per (item, warp), then their exclusive scan in index order (item-major).  Most
  // (item, warp) pairs hold no selected key: one ballot tells.
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const uint32_t top = key[j] >> shift;
    const unsigned selected = __ballot_sync(~0u, key[j] != 0 && top >= prefix);
    uint32_t count = 0;
    if (selected != 0) {
      const unsigned above = __ballot_sync(~0u, key[j] != 0 && top > prefix);
      count = __popc(above) | (__popc(selected & ~above) << 16);
    }
    if (lane == 0) sh.counts[j * kWarps + warp] = count;
  }
  __syncthreads();
  // Each field stays below 2^16: at most kSlice = 32768 keys a slice.
  const uint32_t mine = tid < ITEMS * kWarps ? sh.counts[tid] : 0u;
  const uint32_t inclusive = warp_inclusive_sum(mine, lane);
  if (lane == 31) sh.warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) sh.warp_sums[lane] = warp_inclusive_sum(sh.warp_sums[lane], lane);
  __syncthreads();
  if (tid < ITEMS * kWarps) sh.counts[tid] = inclusive - mine + (warp > 0 ? sh.warp_sums[warp - 1] : 0u);
  if (tid > rank && tid < CLUSTER) {
    send(in_rank(smem_addr(&sh.slice_totals[rank]), tid), sh.warp_sums[kWarps - 1],
         in_rank(smem_addr(&sh.arrived[kLevels]), tid));
  }
  if (rank > 0) mbar_wait_cluster(smem_addr(&sh.arrived[kLevels]), 0);  // the totals of the slices before this one
  __syncthreads();  // the counts
  int above_before = 0, tied_before = 0;
  for (int r = 0; r < rank; ++r) {
    above_before += static_cast<int>(sh.slice_totals[r] & 0xFFFFu);
    tied_before += static_cast<int>(sh.slice_totals[r] >> 16);
  }
  const unsigned lanes_below = (1u << lane) - 1u;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const uint32_t top = key[j] >> shift;
    const bool is_selected = key[j] != 0 && top >= prefix;
    const unsigned selected = __ballot_sync(~0u, is_selected);
    if (selected == 0) continue;
    const bool is_above = is_selected && top > prefix;
    const unsigned above = __ballot_sync(~0u, is_above);
    const uint32_t before = sh.counts[j * kWarps + warp];
    const int a = above_before + static_cast<int>(before & 0xFFFFu) + __popc(above & lanes_below);
    const int t = tied_before + static_cast<int>(before >> 16) + __popc(selected & ~above & lanes_below);
    if (is_above) {
      out[a + min(t, remaining)] = first + j * kThreads + tid;
    } else if (is_selected && t < remaining) {
      out[a + t] = first + j * kThreads + tid;
    }
  }
  // Free to leave: every send to this CTA has landed (each was waited for), and this CTA's
  // sends land before their receivers' waits end.
}

// The kernel's attributes and its launch configuration (a cluster of CLUSTER CTAs a row).
template <int CLUSTER, int ITEMS>
cudaLaunchConfig_t configure(int64_t rows, cudaStream_t stream, cudaLaunchAttribute* attr) {
  const auto kernel = row_topk_kernel<CLUSTER, ITEMS>;
  const int smem = static_cast<int>(sizeof(Shared<CLUSTER>));
  DSV4_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess,
              "row_topk: cannot raise the shared-memory limit");
  if (CLUSTER > 8) {  // past the portable cluster size: sm_90 takes 16 where a GPC holds them
    DSV4_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess,
                "row_topk: clusters of ", CLUSTER, " CTAs are not supported here");
  }
  return cluster_config(dim3(static_cast<unsigned>(rows * CLUSTER)), dim3(CLUSTER), kThreads, smem, stream, attr);
}

template <int CLUSTER, int ITEMS>
void launch(const Params& p, int64_t rows, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t config = configure<CLUSTER, ITEMS>(rows, stream, attr);
  const cudaError_t err = cudaLaunchKernelEx(&config, row_topk_kernel<CLUSTER, ITEMS>, p);
  DSV4_CHECK(err == cudaSuccess, "row_topk launch failed: ", cudaGetErrorString(err));
}

template <int CLUSTER>
void launch_items(const Params& p, int64_t rows, cudaStream_t stream) {
  const int64_t per_thread = (int64_t{p.n_keys} + CLUSTER * kThreads - 1) / (CLUSTER * kThreads);
  if (per_thread <= 1) launch<CLUSTER, 1>(p, rows, stream);
  else if (per_thread <= 2) launch<CLUSTER, 2>(p, rows, stream);
  else if (per_thread <= 4) launch<CLUSTER, 4>(p, rows, stream);
  else if (per_thread <= 8) launch<CLUSTER, 8>(p, rows, stream);
  else if (per_thread <= 16) launch<CLUSTER, 16>(p, rows, stream);
  else launch<CLUSTER, 32>(p, rows, stream);
}

}  // namespace

// scores: fp32 [rows, Nk] contiguous, Nk <= cluster * 1024 * 32; n_valid: int32 [B, S] with
// B * S = rows (row r is query (r / S, r % S)); out: int32, rows * k contiguous; cluster: CTAs a
// row, 1, 8 or 16.
void row_topk(at::Tensor scores, at::Tensor n_valid, at::Tensor out, int64_t k, int64_t cluster,
              int64_t stream_handle) {
  DSV4_CHECK(cluster == 1 || cluster == 8 || cluster == 16, "cluster: expected 1, 8 or 16 CTAs a row, got ", cluster);
  DSV4_CHECK(scores.scalar_type() == at::kFloat && scores.dim() == 2 && scores.is_contiguous(),
              "scores: expected contiguous fp32 [rows, Nk], got ", scores.scalar_type(), " ", scores.sizes());
  const int64_t rows = scores.size(0), n_keys = scores.size(1);
  const int64_t max_keys = cluster * kThreads * kMaxItems;
  DSV4_CHECK(n_keys <= max_keys, "scores: expected at most ", max_keys, " keys a row, got ", n_keys);
  DSV4_CHECK(n_valid.scalar_type() == at::kInt && n_valid.dim() == 2 && n_valid.numel() == rows,
              "n_valid: expected int32 [B, S] with B * S = ", rows, " rows, got ", n_valid.scalar_type(), " ",
              n_valid.sizes());
  DSV4_CHECK(k >= 1 && k < (int64_t{1} << 31), "k: expected a positive int32, got ", k);
  DSV4_CHECK(out.scalar_type() == at::kInt && out.is_contiguous() && out.numel() == rows * k,
              "out: expected contiguous int32 with rows * k = ", rows * k, " elements, got ", out.sizes());
  DSV4_CHECK(rows * cluster < (int64_t{1} << 31), "row_topk: too many rows (", rows, ")");
  if (rows == 0) return;
  Params p{};
  p.scores = scores.data_ptr<float>();
  p.n_valid = n_valid.data_ptr<int32_t>();
  p.out = out.data_ptr<int32_t>();
  p.stride_nb = n_valid.stride(0);
  p.stride_ns = n_valid.stride(1);
  p.seq = static_cast<int>(n_valid.size(1));
  p.n_keys = static_cast<int>(n_keys);
  p.k = static_cast<int>(k);
  const DeviceScope scope(scores.get_device());
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (cluster == 16) {
    launch_items<16>(p, rows, stream);
  } else if (cluster == 8) {
    launch_items<8>(p, rows, stream);
  } else {
    launch_items<1>(p, rows, stream);
  }
}

// How many clusters of `cluster` CTAs (8 or 16) of the selection kernel the current device runs
// at once: 0 where it cannot place one (clusters of 16 need a GPC with 16 free SMs; parts with
// smaller GPCs have none).  Every keys-a-thread variant has the same shared memory and at most
// the registers of the largest, which is asked.
int64_t row_topk_max_clusters(int64_t cluster, int64_t device) {
  DSV4_CHECK(cluster == 8 || cluster == 16, "cluster: expected 8 or 16 CTAs a row, got ", cluster);
  const DeviceScope scope(static_cast<int>(device));
  cudaLaunchAttribute attr[1];
  int clusters = 0;
  cudaError_t err;
  if (cluster == 16) {
    const cudaLaunchConfig_t config = configure<16, kMaxItems>(1, nullptr, attr);
    err = cudaOccupancyMaxActiveClusters(&clusters, row_topk_kernel<16, kMaxItems>, &config);
  } else {
    const cudaLaunchConfig_t config = configure<8, kMaxItems>(1, nullptr, attr);
    err = cudaOccupancyMaxActiveClusters(&clusters, row_topk_kernel<8, kMaxItems>, &config);
  }
  DSV4_CHECK(err == cudaSuccess, "row_topk: cluster occupancy query failed: ", cudaGetErrorString(err));
  return clusters;
}

