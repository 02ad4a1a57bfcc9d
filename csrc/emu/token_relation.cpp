// The CUDA launchers and kernels of csrc/cuda/token_relation.cu, compiled for the host emulator (kdkernels._emu),
// and the dynamic shared memory their launchers ask for (kdkernels._emu.smem_table).
#include "cuda/token_relation.cu"

namespace kdk {

// (kernel, head size d, bytes per block) from the kernels' own Smem layout, for tools/kernel_report.py.
std::vector<std::tuple<std::string, int64_t, int64_t>> token_relation_smem_table() {
  std::vector<std::tuple<std::string, int64_t, int64_t>> t;
  using M16 = trk::Smem<__half, float>;
  using M32 = trk::Smem<float, float>;
  for (int d : {64, 128, 256}) {
    t.emplace_back("trk::relation_fwd_kernel / contrastive_fwd_kernel (16-bit)", d, M16::total);
    t.emplace_back("trk::relation_bwd_kernel / contrastive_bwd_kernel (16-bit, one gradient)", d,
                   M16::total + M16::acc_bytes(d));
    t.emplace_back("trk::relation_bwd_kernel (16-bit, student and teacher gradients)", d,
                   M16::total + 2 * M16::acc_bytes(d));
    t.emplace_back("trk::relation_fwd_kernel / contrastive_fwd_kernel (float32)", d, M32::total);
    t.emplace_back("trk::relation_bwd_kernel / contrastive_bwd_kernel (float32, one gradient)", d,
                   M32::total + M32::acc_bytes(d));
  }
  return t;
}

}  // namespace kdk
