// kdkernels._emu: the emulated CUDA library (every op of schemas.h under torch.ops.kdkernels_emu, on CPU
// tensors, run by the real launchers and kernels on the host emulator) and the emulator's controls.
#include <torch/extension.h>
#include <torch/library.h>

#include "emu/cuda_emu.h"
#include "emu/runtime.h"
#include "schemas.h"

TORCH_LIBRARY(kdkernels_emu, m) { kdk::define_ops(m); }

namespace kdk {
std::vector<std::tuple<std::string, int64_t, int64_t>> attention_smem_table();       // emu/attention.cpp
std::vector<std::tuple<std::string, int64_t, int64_t>> token_relation_smem_table();  // emu/token_relation.cpp
}  // namespace kdk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdkernels' CUDA launchers and kernels on a host emulation of the CUDA execution model";
  m.def("set_device", [](int arch, int64_t max_smem_optin, int num_sms) {
    TORCH_CHECK(arch == 80 || arch == 90, "kdkernels._emu.set_device: arch must be 80 or 90: got ", arch);
    auto& d = kdk_emu::device();
    d.arch = arch;
    d.max_smem_optin = max_smem_optin > 0 ? size_t(max_smem_optin) : (arch == 90 ? 232448 : 166912);
    d.num_sms = num_sms;
  }, "Emulate sm_<arch> limits; max_smem_optin <= 0 takes the architecture's, smaller values force the "
     "launchers' fallbacks", py::arg("arch") = 80, py::arg("max_smem_optin") = 0, py::arg("num_sms") = 4);
  m.def("device", [] {
    const auto& d = kdk_emu::device();
    return py::dict(py::arg("arch") = d.arch, py::arg("max_smem_optin") = d.max_smem_optin,
                    py::arg("num_sms") = d.num_sms);
  }, "The emulated device's limits");
  m.def("launch_counts", &kdk_emu::launch_counts, "Emulated launches per kernel since the last reset");
  m.def("smem_table", [] {
    auto t = kdk::attention_smem_table();
    for (auto& row : kdk::token_relation_smem_table()) t.push_back(row);
    return t;
  }, "(kernel, head size, dynamic shared memory bytes per block) of the tensor-core launchers, from their own "
     "size functions");
  m.def("reset_launch_counts", &kdk_emu::reset_launch_counts);
}
