// act_quant's scale arithmetic (SPEC 2: amax = max(max|x|, 1e-4), s = 2^ceil(log2(amax / 448)))
// for kernels that quantise activation rows themselves (moe_decode.cu, sm90_fp8_decode_gemm.cu),
// bit for bit as the Triton pre-pass (quantise_act_tile in dsv4_triton/kernels/gemm.py).
#pragma once

#include <cuda_runtime.h>

namespace dsv4 {

__device__ __forceinline__ float exp2i(int e) { return __int_as_float((e + 127) << 23); }

// ceil(log2(v)) for a positive normal float, exactly.
__device__ __forceinline__ int ceil_log2(float v) {
  const int bits = __float_as_int(v);
  return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0);
}

// |v| for the amax, NaN taken as +inf: either makes the block's scale NaN (act_quant's rule).
__device__ __forceinline__ float magnitude(float v) { return v != v ? __int_as_float(0x7F800000) : fabsf(v); }

// A block's amax (magnitudes, before the 1e-4 floor) -> its scale's exponent e and the factor
// 2^-e that takes values to codes; a NaN/Inf amax gives factor 0 and scale NaN (the codes are
// then those of 0 * x, irrelevant to a product with a NaN scale).
struct ActScale {
  float inv, scale;
  __device__ __forceinline__ explicit ActScale(float amax) {
    const float m = fmaxf(amax, 1e-4f);
    const bool finite = m < __int_as_float(0x7F800000);
    const int e = finite ? ceil_log2(__fdiv_rn(m, 448.f)) : 0;
    inv = finite ? exp2i(-e) : 0.f;
    scale = finite ? exp2i(e) : __int_as_float(0x7FC00000);
  }
};

}  // namespace dsv4
