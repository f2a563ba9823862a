// Hopper (sm_90a) warpgroup-MMA helpers shared by the sm90_* kernels: matrix descriptors,
// the proxy fence, the wgmma fence / commit / wait, and the named barriers that hand work
// between warpgroups.
#pragma once

#include <cuda_bf16.h>
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

// The same for a whole RS-form m64n64 product over eight k steps, once its wait has retired
// it: its 32 accumulator registers and the A fragments it read.
__device__ __forceinline__ void pin_product(float (&d)[32], uint32_t (&a)[8][4]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) pin(d[i]);
#pragma unroll
  for (int s = 0; s < 8; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) pin(a[s][i]);
}

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

// D[64 x 64] (+)= A[64 x 16] (registers) B[16 x 64] (K-major, shared memory), FP32 D, BF16 or
// FP16 operands; `accumulate` 0 overwrites D.
#define DSV4_WGMMA_M64N64K16_RS(name, type)                                                                      \
  __device__ __forceinline__ void name(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) { \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                             \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " "                                           \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "   \
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),              \
          "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),              \
          "+f"(d[30]), "+f"(d[31])                                                                                \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));                             \
  }
DSV4_WGMMA_M64N64K16_RS(wgmma_m64n64k16_rs_bf16, "bf16")
DSV4_WGMMA_M64N64K16_RS(wgmma_m64n64k16_rs_f16, "f16")
#undef DSV4_WGMMA_M64N64K16_RS

// The accumulator operands of an m64n128 wgmma with FP32 results, `d` a float[64]: the
// register list "{%0, ..., %63}" of the instruction and the matching asm outputs, so that
// operands %64 and up are the instruction's other inputs.
#define DSV4_WGMMA_D64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define DSV4_WGMMA_D64_OUT(d)                                                                                     \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),       \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),       \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),      \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),      \
      "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),      \
      "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),      \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),      \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// A warpgroup's m64n128 accumulator fragment (this thread's rows wr, wr + 8 and columns cq,
// cq + 1 of every 8-column group), times `scale`, as BF16 into `out`: two 128-byte swizzled
// panels of 64 rows x 64 columns, 8 KB apart, the layout a TMA store of 64 x 64 boxes reads.
__device__ __forceinline__ void stage_bf16_fragment(uint8_t* out, const float (&acc)[64], float scale, int wr,
                                                    int cq) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      *reinterpret_cast<__nv_bfloat162*>(out + (j >> 3) * (64 * 128) + swizzled(wr + 8 * e, j & 7) + 2 * cq) =
          __floats2bfloat162_rn(acc[4 * j + 2 * e] * scale, acc[4 * j + 2 * e + 1] * scale);
    }
  }
}

}  // namespace dsv4
