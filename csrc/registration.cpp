// The one TORCH_LIBRARY of kdkernels (every op schema) and the pybind11 module with build information.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef KDK_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(kdkernels, m) {
  // Fused top-k KL (docs/topk_kl.md): per-row losses and the statistics the backward needs.
  m.def("topk_kl_fwd(Tensor logits, Tensor values, Tensor? indices, Tensor? row_mask, str mode, str divergence, "
        "float param, float temperature, bool values_are_logprobs, bool drop_out_of_range, bool validate) "
        "-> (Tensor loss, Tensor lse, Tensor coef, Tensor stat)");
  m.def("topk_kl_bwd(Tensor grad_loss, Tensor logits, Tensor values, Tensor? indices, Tensor lse, Tensor coef, "
        "Tensor stat, str mode, str divergence, float param, float temperature, bool values_are_logprobs) -> Tensor");
}

static bool compiled_with_cuda() {
#ifdef KDK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static std::string cuda_version() {
#ifdef KDK_WITH_CUDA
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  return "";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdkernels native extension: the ops live in torch.ops.kdkernels; this module reports how it was built";
  m.def("compiled_with_cuda", &compiled_with_cuda, "Whether the CUDA kernels were compiled in");
  m.def("cuda_version", &cuda_version, "CUDA runtime version the kernels were compiled against ('' without CUDA)");
  m.def("cuda_arch_list", [] { return std::string(KDK_ARCH_LIST); }, "TORCH_CUDA_ARCH_LIST at build time");
  m.def("torch_version", [] { return std::string(KDK_TORCH_VERSION); }, "torch version the extension was built against");
}
