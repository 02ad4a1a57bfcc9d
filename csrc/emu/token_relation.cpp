// The CUDA launchers and kernels of csrc/cuda/token_relation.cu, compiled for the host emulator (kdkernels._emu).
#include "cuda/token_relation.cu"
