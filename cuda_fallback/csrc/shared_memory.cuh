// Shared-memory addressing for inline PTX, any sm_90+ architecture: the 32-bit address of a
// shared-memory object, as `shared::cta` instructions (wgmma descriptors, mbarriers, copies)
// take it; and the asynchronous global -> shared copies of a multi-stage loop (cp.async).
#pragma once

#include <stdint.h>

namespace dsv4 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 4 bytes, zero-filled where !ok (src is then not read).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(ok ? 4 : 0) : "memory");
}
// 16 bytes, both ends 16-byte aligned; not cached in L1.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Until at most the N most recent groups' copies are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

}  // namespace dsv4
