// Host stand-in for <cuda_bf16.h> (tests/cuda_emu): bfloat16 with round-to-nearest-even from float.
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 {
  uint16_t b;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    b = static_cast<uint16_t>(u >> 16);
  }
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
