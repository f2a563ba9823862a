// Host-side helpers of the extension's entry points.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

// ATen's tensor and TORCH_CHECK only: the kernel sources' host entries need no more, and
// <torch/extension.h> (the binding file's) takes ~10x as long in each of nvcc's passes.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace dsv4 {

// Makes a device current for a launch (torch's CUDA headers are not part of a CPU build of
// torch, where these sources are still compiled as a check, so no c10 guard).
struct DeviceScope {
  int saved = -1;
  explicit DeviceScope(int device) {
    cudaGetDevice(&saved);
    if (saved != device) cudaSetDevice(device);
  }
  ~DeviceScope() {
    int now = -1;
    cudaGetDevice(&now);
    if (now != saved) cudaSetDevice(saved);
  }
};

inline int multiprocessors(int device) {
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
              "cudaDeviceGetAttribute failed");
  return sms;
}

// The wgmma kernels are built for sm_90a alone: say so rather than fail at launch elsewhere.
inline void require_sm90(int device, const char* what) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major == 9 && minor == 0, what, ": needs an sm_90 device, got sm_", major, minor);
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

inline bool aligned(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

}  // namespace dsv4
