// Host stand-in for <cuda_fp16.h> (tests/cuda_emu): __half as GCC's _Float16, and CUDA's uint4.
#pragma once
#include <cstdint>
struct __half {
  _Float16 v;
  __half() = default;
  explicit __half(float f) : v(static_cast<_Float16>(f)) {}
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
