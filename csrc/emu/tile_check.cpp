// The tile-primitive checks of csrc/cuda/tile_check.cu, compiled for the host emulator (kdkernels._emu).
#include "cuda/tile_check.cu"
