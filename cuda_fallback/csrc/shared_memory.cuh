// Shared-memory addressing for inline PTX, any sm_90+ architecture: the 32-bit address of a
// shared-memory object, as `shared::cta` instructions (wgmma descriptors, mbarriers, copies)
// take it.
#pragma once

#include <stdint.h>

namespace dsv4 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

}  // namespace dsv4
