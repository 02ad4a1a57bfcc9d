// The TORCH_LIBRARY of kdkernels (schemas in schemas.h) and the pybind11 module with build information.
#include <torch/extension.h>
#include <torch/library.h>

#include "schemas.h"

#ifdef KDK_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(kdkernels, m) { kdk::define_ops(m); }

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
