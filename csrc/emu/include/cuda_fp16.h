// Emulator stand-in for <cuda_fp16.h>: __half is c10::Half (IEEE binary16, round-to-nearest-even from
// float, as the hardware's __float2half_rn; sums and products of two halves are exact in float, so each
// operation rounds once, as native half arithmetic does).
#pragma once
#include <c10/util/Half.h>

using __half = c10::Half;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
