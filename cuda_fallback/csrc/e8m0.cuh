// The E8M0 scale byte (SPEC 2) as a float, for every kernel that reads one: 2^(b - 127), the
// subnormal 2^-127 for b = 0 and NaN for b = 0xFF, the values of the oracle and of the Triton
// kernels' e8m0_value.  Host-callable too, so the CPU tests check it against the oracle.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

namespace dsv4 {

__host__ __device__ __forceinline__ float e8m0_value(uint32_t b) {
  const uint32_t bits = (b << 23) | (((b + 1) & 0xFE) == 0 ? 0x400000u : 0u);  // 0 and 0xFF: mantissa MSB
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

}  // namespace dsv4
