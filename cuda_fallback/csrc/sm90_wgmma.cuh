// Hopper (sm_90a) warpgroup-MMA helpers shared by the sm90_* kernels: matrix descriptors,
// the proxy fence, the wgmma fence / commit / wait, and the named barriers that hand work
// between warpgroups.
#pragma once

#include <stdint.h>

#include "shared_memory.cuh"

namespace dsv4 {

// Generic-proxy stores to shared memory that wgmma (the async proxy) reads next.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Until at most the N most recent committed groups of this warpgroup are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Named barrier `id` (1-15; 0 is __syncthreads) over `count` threads: wait, or only arrive.
__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// Pins a register between the wgmma that uses it and the code after its wait: an accumulator
// read after the wait, an A fragment the MMA still reads until then.
__device__ __forceinline__ void pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void pin(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }

// Byte offset of the 16-byte chunk `chunk` (0..7) of row `row` in a 128-byte-swizzled panel
// (rows of 128 bytes): the layout `smem_desc` describes.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return row * 128 + ((chunk ^ (row & 7)) << 4);
}

// Shared-memory matrix descriptor, 128-byte swizzle.  K-major operands: rows of 128 bytes,
// 8-row groups 1024 bytes apart (SBO), LBO unused.  MN-major (columns contiguous): 64-column
// panels LBO apart, 8-row groups SBO apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}

}  // namespace dsv4
