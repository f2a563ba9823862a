// The dsv4_triton CUDA extension module: hand-written kernels register their entry points
// here. It also reports the machine-code architecture it was built for, so the loader can
// refuse a build that does not match the device instead of failing at the first launch.
// targets: sm90a sm100a

#include <cuda_runtime.h>
#include <torch/extension.h>

namespace {

__global__ void arch_marker_kernel() {}

// binaryVersion of the kernel image the runtime would launch on the current device
// (e.g. 90 for sm_90a); raises if the module holds no image for it.
int64_t built_arch() {
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, arch_marker_kernel);
  TORCH_CHECK(err == cudaSuccess, "dsv4 CUDA extension has no kernel image for this device: ",
              cudaGetErrorString(err));
  return attr.binaryVersion;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_arch", &built_arch, "SM version of the kernel image used on the current device");
}
