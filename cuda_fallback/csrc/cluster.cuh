// Thread-block clusters (sm_90+): the cluster barrier, addresses in another CTA's shared
// memory, and one-way sends into it that the receiver counts on its own mbarrier (no round
// trip through the sender, no cluster-wide barrier per exchange; mbar_wait_cluster waits).
#pragma once

#include <stdint.h>

#include "mbarrier.cuh"
#include "shared_memory.cuh"

namespace dsv4 {

__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}

// Arrival with release semantics: this CTA's accesses before it are ordered before whatever
// another CTA does after the matching wait.
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.aligned;" ::: "memory"); }

__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

// The address of the same shared-memory word in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t in_rank(uint32_t address, int rank) {
  uint32_t mapped;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(mapped) : "r"(address), "r"(rank));
  return mapped;
}

// Stores at `address` of another CTA (mapped) and counts the bytes on that CTA's mbarrier
// `barrier` (mapped).
__device__ __forceinline__ void send(uint32_t address, uint32_t value, uint32_t barrier) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.u32 [%0], %1, [%2];" ::"r"(address), "r"(value),
               "r"(barrier)
               : "memory");
}

__device__ __forceinline__ void send(uint32_t address, float4 v, uint32_t barrier) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                   address),
               "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(barrier)
               : "memory");
}

}  // namespace dsv4
