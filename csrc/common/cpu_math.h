// CPU helpers: a branch-free expf the compiler vectorises, and row reductions written as SIMD loops.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/hd.h"

// Compile the hot row loops for AVX2+FMA as well as the baseline and pick at load time (GCC/clang
// ifunc), so one wheel is fast on current x86 CPUs and still runs on old ones.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define KDK_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define KDK_CPU_CLONES
#endif

namespace kdk {

// exp(x) for float: Cody-Waite range reduction and a degree-6 polynomial (about 1 ulp), clamped to
// the normal range (exp(-inf) gives FLT_MIN ~ 1e-38, harmless in sums and gradients). Only
// arithmetic and bit moves, so loops over it vectorise.
inline float fast_expf(float x) {
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.72283f ? 88.72283f : x;
  const float big = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float n = (x * 1.44269504088896341f + big) - big;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }
inline float fast_exp(float x) { return fast_expf(x); }

template <class T> KDK_CPU_CLONES T row_max(const T* x, int64_t n) {
  T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// logsumexp(x * scale) over a row, one exp per element.
template <class T> KDK_CPU_CLONES T row_lse(const T* x, int64_t n, T scale) {
  const T m = row_max(x, n) * scale;
  if (m == neg_inf<T>()) return m;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += fast_exp(x[i] * scale - m);
  return m + std::log(s);
}

// out[i] = c * exp(x[i] * scale - shift)
template <class T> KDK_CPU_CLONES void row_scaled_exp(const T* x, int64_t n, T scale, T shift, T c, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = c * fast_exp(x[i] * scale - shift);
}

}  // namespace kdk
