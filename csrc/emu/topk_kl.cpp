// The CUDA launchers and kernels of csrc/cuda/topk_kl.cu, compiled for the host emulator (kdkernels._emu).
#include "cuda/topk_kl.cu"
