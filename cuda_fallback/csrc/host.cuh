// Host-side helpers of the extension's entry points.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <string>
#include <type_traits>

// ATen's tensor and c10's errors only: the kernel sources' host entries need no more, and
// <torch/extension.h> (the binding file's) takes ~10x as long in each of nvcc's passes.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// Raises c10::Error (RuntimeError in Python) with the message of `...` (C strings, integers,
// sizes, dtypes) when `cond` fails.  On a GPU machine (torch 2.11 wheels, these sources
// compiled by nvcc with gcc 13) any number written through an iostream in these sources
// crashed the process, TORCH_CHECK's own messages with values among them, while a message
// handed over as a C string raised as it should: the text is built with std::to_string.
#define DSV4_CHECK(cond, ...)                      \
  do {                                             \
    if (!(cond)) ::dsv4::fail(#cond, __VA_ARGS__); \
  } while (false)

namespace dsv4 {

inline std::string text_of(const char* text) { return text; }
inline std::string text_of(at::ScalarType dtype) { return c10::toString(dtype); }
inline std::string text_of(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string text_of(T value) {
  return std::to_string(value);
}

template <typename... Parts>
[[noreturn]] inline void fail(const char* condition, const Parts&... parts) {
  std::string message;
  ((message += text_of(parts)), ...);
  message += std::string(" (failed: ") + condition + ")";
  TORCH_CHECK(false, message.c_str());
  __builtin_unreachable();
}

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
  DSV4_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
              "cudaDeviceGetAttribute failed");
  return sms;
}

// The wgmma kernels are built for sm_90a alone: say so rather than fail at launch elsewhere.
inline void require_sm90(int device, const char* what) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  DSV4_CHECK(major == 9 && minor == 0, what, ": needs an sm_90 device, got sm_", major, minor);
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  DSV4_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

// The launch configuration of `grid` in thread-block clusters of `cluster` CTAs (for
// cudaLaunchKernelEx and the cluster occupancy query); `attr` holds its one attribute and
// must outlive the configuration.
inline cudaLaunchConfig_t cluster_config(dim3 grid, dim3 cluster, int threads, int smem, cudaStream_t stream,
                                         cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster.x;
  attr[0].val.clusterDim.y = cluster.y;
  attr[0].val.clusterDim.z = cluster.z;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

inline bool aligned(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

}  // namespace dsv4
