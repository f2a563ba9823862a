// Thread-block cluster helpers (sm_90+): addresses in another CTA's shared memory, stores
// into it that count on its mbarrier (st.async), arrivals on its mbarriers, and the cluster
// barrier.  Kernels that use them launch with a cluster dimension.
#pragma once

#include <stdint.h>

namespace dsv4 {

__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }
// Every thread of the cluster: what each wrote before is visible to all after.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The address of the same shared-memory word in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t in_rank(uint32_t address, int rank) {
  uint32_t mapped;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(mapped) : "r"(address), "r"(rank));
  return mapped;
}

// Stores into another CTA's shared memory (`address`, mapped) and counts the bytes on that
// CTA's `barrier` (mapped): the receiver waits on its own barrier, no round trip through the
// sender.
__device__ __forceinline__ void send(uint32_t address, uint32_t value, uint32_t barrier) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.u32 [%0], %1, [%2];" ::"r"(address), "r"(value),
               "r"(barrier)
               : "memory");
}
__device__ __forceinline__ void send(uint32_t address, uint2 v, uint32_t barrier) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];" ::"r"(address),
               "r"(v.x), "r"(v.y), "r"(barrier)
               : "memory");
}
__device__ __forceinline__ void send(uint32_t address, uint4 v, uint32_t barrier) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                   address),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(barrier)
               : "memory");
}

// One arrival on an mbarrier of another CTA (`barrier`, mapped), releasing this thread's
// earlier accesses to the cluster.
__device__ __forceinline__ void mbar_arrive_remote(uint32_t barrier) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(barrier) : "memory");
}

// Until the phase of parity `parity` of this CTA's `barrier` has completed, acquiring what the
// cluster's arrivals and byte counts released.
__device__ __forceinline__ void mbar_wait_cluster(uint32_t barrier, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}" ::"r"(barrier),
      "r"(parity)
      : "memory");
}

}  // namespace dsv4
