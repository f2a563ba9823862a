// The dsv4_triton CUDA extension module: hand-written kernels register their entry points
// here; a source that targets only some architectures is bound under its DSV4_WITH_<STEM>
// macro, which the loader defines in the builds that include it.  It also reports the
// machine-code architecture it was built for, so the loader can refuse a build that does not
// match the device instead of failing at the first launch.
// targets: sm90a sm100a

#include <cuda_runtime.h>
#include <torch/extension.h>

#include <optional>

#include "host.cuh"

namespace {

__global__ void arch_marker_kernel() {}

// binaryVersion of the kernel image the runtime would launch on the current device
// (e.g. 90 for sm_90a); raises if the module holds no image for it.
int64_t built_arch() {
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, arch_marker_kernel);
  DSV4_CHECK(err == cudaSuccess, "dsv4 CUDA extension has no kernel image for this device: ",
              cudaGetErrorString(err));
  return attr.binaryVersion;
}

}  // namespace

// fp4_decode_gemm.cu
torch::Tensor fp4_decode_gemm(torch::Tensor x_codes, torch::Tensor x_scales, torch::Tensor w, torch::Tensor w_scale,
                              std::optional<torch::Tensor> global_scale, int64_t stream_handle);
// moe_decode.cu
void moe_decode_w13(torch::Tensor x_codes, torch::Tensor x_scales, torch::Tensor w13, torch::Tensor w13_scale,
                    torch::Tensor sorted_pair, torch::Tensor block_expert, torch::Tensor route_w, torch::Tensor hq,
                    torch::Tensor hs, int64_t topk, double limit, int64_t stream_handle);
void moe_decode_w2(torch::Tensor hq, torch::Tensor hs, torch::Tensor w2, torch::Tensor w2_scale,
                   torch::Tensor sorted_pair, torch::Tensor block_expert, torch::Tensor part, int64_t stream_handle);
// row_topk.cu
void row_topk(torch::Tensor scores, torch::Tensor n_valid, torch::Tensor out, int64_t k, int64_t cluster,
              int64_t stream_handle);
int64_t row_topk_max_clusters(int64_t cluster, int64_t device);
#ifdef DSV4_WITH_SM90_BF16_GEMM  // sm_90a only
void bf16_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor y, std::optional<torch::Tensor> scale,
               int64_t tile_rows, int64_t stream_handle);
#endif
#ifdef DSV4_WITH_SM90_NVFP4_DECODE_GEMM  // sm_90a only
torch::Tensor nvfp4_wgmma_gemm(torch::Tensor x_codes, torch::Tensor x_scales, torch::Tensor w, torch::Tensor w_scale,
                               torch::Tensor global_scale, int64_t stream_handle);
#endif
#ifdef DSV4_WITH_SM90_FP8_GEMM  // sm_90a only
void fp8_gemm(torch::Tensor a_codes, torch::Tensor a_scale, torch::Tensor w, torch::Tensor w_scale, torch::Tensor y,
              int64_t tile_rows, int64_t stream_handle);
#endif
#ifdef DSV4_WITH_SM90_FP8_DECODE_GEMM  // sm_90a only
void fp8_decode_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor w_scale, torch::Tensor y, int64_t rows,
                     int64_t split, int64_t stream_handle);
#endif
#ifdef DSV4_WITH_SM90_MOE_PREFILL  // sm_90a only
void moe_prefill_gemm(torch::Tensor a_codes, torch::Tensor a_scale, torch::Tensor w, torch::Tensor w_scale,
                      torch::Tensor sorted_pair, torch::Tensor block_expert, std::optional<torch::Tensor> route_w,
                      torch::Tensor out, double limit, int64_t stream_handle);
#endif
#ifdef DSV4_WITH_SM90_INDEXER_SCORES  // sm_90a only
void indexer_scores_fp4(torch::Tensor qi, torch::Tensor w, torch::Tensor keys, torch::Tensor n_valid,
                        torch::Tensor scores, int64_t tiles_per_cta, int64_t stream_handle);
#endif
#ifdef DSV4_WITH_SM90_SPARSE_ATTENTION  // sm_90a only
void sparse_attention_fp8(torch::Tensor q, torch::Tensor kv, torch::Tensor sink, torch::Tensor idx, torch::Tensor out,
                          torch::Tensor freqs, torch::Tensor positions, int64_t half_r, torch::Tensor part_o,
                          torch::Tensor part_ml, double qk_scale, int64_t n_splits, int64_t k_per_split,
                          int64_t peers, int64_t stream_handle);
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_arch", &built_arch, "SM version of the kernel image used on the current device");
  m.def("fp4_decode_gemm", &fp4_decode_gemm,
        "MXFP4 or NVFP4 weight GEMM for up to 16 activation rows (FP8 codes + scales in, bf16 out)");
  m.def("moe_decode_w13", &moe_decode_w13, "routed experts at decode: w13 GEMM, SwiGLU, routing weight, act_quant");
#ifdef DSV4_WITH_SM90_BF16_GEMM
  m.def("bf16_gemm", &bf16_gemm, "grouped BF16 GEMM with an optional FP32 scale, TMA + wgmma, sm_90a");
#endif
#ifdef DSV4_WITH_SM90_NVFP4_DECODE_GEMM
  m.def("nvfp4_wgmma_gemm", &nvfp4_wgmma_gemm,
        "NVFP4 weight GEMM for up to 64 activation rows on the warp-group MMA (FP8 codes + scales in, bf16 out), sm_90a");
#endif
#ifdef DSV4_WITH_SM90_FP8_GEMM
  m.def("fp8_gemm", &fp8_gemm, "FP8 x FP8 block-scaled GEMM (act_quant codes + scales in, bf16 out), TMA + wgmma, sm_90a");
#endif
#ifdef DSV4_WITH_SM90_FP8_DECODE_GEMM
  m.def("fp8_decode_gemm", &fp8_decode_gemm,
        "FP8 weight GEMM for 1 to 16 bf16 activation rows, act_quant inside, one launch (bulk copies + mma.sync), sm_90a");
#endif
#ifdef DSV4_WITH_SM90_MOE_PREFILL
  m.def("moe_prefill_gemm", &moe_prefill_gemm,
        "routed experts at prefill: a grouped MXFP4 GEMM (w13 with SwiGLU, or w2) on the warp-group MMA, sm_90a");
#endif
#ifdef DSV4_WITH_SM90_INDEXER_SCORES
  m.def("indexer_scores_fp4", &indexer_scores_fp4, "lightning-indexer scores over FP4 key rows, 64 heads, sm_90a");
#endif
#ifdef DSV4_WITH_SM90_SPARSE_ATTENTION
  m.def("sparse_attention_fp8", &sparse_attention_fp8,
        "sparse MQA attention with sink over FP8 cache rows, head dim 512, sm_90a (+ slice merge when split)");
#endif
  m.def("moe_decode_w2", &moe_decode_w2, "routed experts at decode: w2 GEMM into per-pair FP32 rows");
  m.def("row_topk", &row_topk, "exact top-k of FP32 score rows (indexer conventions), one CTA cluster a row");
  m.def("row_topk_max_clusters", &row_topk_max_clusters, "clusters of the row_topk kernel the device runs at once");
}
