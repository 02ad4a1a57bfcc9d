// The CUDA launchers and kernels of csrc/cuda/sinkhorn.cu, compiled for the host emulator (kdkernels._emu).
#include "cuda/sinkhorn.cu"
