// The CUDA launchers and kernels of csrc/cuda/attention.cu, compiled for the host emulator (kdkernels._emu).
#include "cuda/attention.cu"
