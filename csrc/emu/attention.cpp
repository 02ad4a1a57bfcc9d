// The CUDA launchers and kernels of csrc/cuda/attention.cu, compiled for the host emulator (kdkernels._emu),
// and the dynamic shared memory the tensor-core launchers ask for (kdkernels._emu.smem_table).
#include "cuda/attention.cu"

namespace kdk {

// (kernel, head_dim, bytes per block) from the launchers' own size functions, for tools/kernel_report.py.
std::vector<std::tuple<std::string, int64_t, int64_t>> attention_smem_table() {
  std::vector<std::tuple<std::string, int64_t, int64_t>> t;
  for (int D : {64, 96, 128}) {
    t.emplace_back("attention_fwd_mma_kernel", D, attention_mma_smem(D));
    t.emplace_back("attention_bwd_mma_kernel", D, attention_mma_bwd_smem(D));
    t.emplace_back("attention_bwd_mma_kernel (group of 4 layers)", D, attention_mma_bwd_smem(D, 4));
    t.emplace_back("attention_bwd_dq_mma_kernel", D, attention_mma_dq_smem(D));
    t.emplace_back("attention_probs_mma_kernel", D, attention_mma_probs_smem(D));
    t.emplace_back("attention_similarity_mma_kernel (22 layers)", D, attention_mma_sim_smem(22, D));
  }
  return t;
}

}  // namespace kdk
