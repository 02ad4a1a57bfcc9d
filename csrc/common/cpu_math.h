// CPU helpers: a branch-free expf the compiler vectorises, and row reductions written as SIMD loops.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/hd.h"

// Compile the hot row loops for x86-64-v3 (AVX2+FMA) as well as the baseline and pick at load time by
// CPU features (GCC ifunc; "arch=haswell" would test the CPU model and miss AMD). One wheel is fast on
// current x86 CPUs and still runs on old ones.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define KDK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KDK_CPU_CLONES
#endif
// Forced inlining: a call inside the SIMD loops below would keep them scalar.
#if defined(__GNUC__)
#define KDK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define KDK_ALWAYS_INLINE inline
#endif

namespace kdk {

// exp(x) for float: Cody-Waite range reduction and a degree-6 polynomial (about 1 ulp), clamped to
// the normal range (exp(-inf) gives FLT_MIN ~ 1e-38, harmless in sums and gradients). Only
// arithmetic and bit moves, so loops over it vectorise.
KDK_ALWAYS_INLINE float fast_expf(float x) {
  x = std::min(std::max(x, -87.33654f), 88.72283f);  // std::min/max (not ?:) so GCC emits vminps/vmaxps
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
  return p * __builtin_bit_cast(float, bits);
}
KDK_ALWAYS_INLINE double fast_exp(double x) { return std::exp(x); }
KDK_ALWAYS_INLINE float fast_exp(float x) { return fast_expf(x); }

// Eight floats in one GCC/clang vector: AVX registers in the haswell clone, SSE pairs in the default.
// Written out explicitly because the auto-vectoriser will not reorder a float sum (no -ffast-math here).
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

KDK_ALWAYS_INLINE f8 load8(const float* p) { f8 v; std::memcpy(&v, p, sizeof(v)); return v; }
KDK_ALWAYS_INLINE void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
KDK_ALWAYS_INLINE f8 splat8(float x) { return f8{x, x, x, x, x, x, x, x}; }
KDK_ALWAYS_INLINE float hsum8(f8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
KDK_ALWAYS_INLINE float hmax8(f8 v) {
  float m = v[0];
  for (int j = 1; j < 8; ++j) m = std::max(m, v[j]);
  return m;
}

// fast_expf on eight lanes (same constants, same result bit for bit).
KDK_ALWAYS_INLINE f8 exp8(f8 x) {
  const f8 lo = splat8(-87.33654f), hi = splat8(88.72283f), big = splat8(12582912.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f8 n = (x * 1.44269504088896341f + big) - big;
  f8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f8 p = splat8(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  return p * __builtin_bit_cast(f8, bits);
}

template <class T> KDK_CPU_CLONES T row_max(const T* x, int64_t n) {
  T m = neg_inf<T>();
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    f8 acc = splat8(neg_inf<float>());
    for (; i + 8 <= n; i += 8) { const f8 v = load8(x + i); acc = v > acc ? v : acc; }
    m = hmax8(acc);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// logsumexp(x * scale) over a row, one exp per element.
template <class T> KDK_CPU_CLONES T row_lse(const T* x, int64_t n, T scale) {
  const T m = row_max(x, n) * scale;
  if (m == neg_inf<T>()) return m;
  T s = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    f8 acc = splat8(0.f);
    for (; i + 8 <= n; i += 8) acc += exp8(load8(x + i) * scale - m);
    s = hsum8(acc);
  }
  for (; i < n; ++i) s += fast_exp(x[i] * scale - m);
  return m + std::log(s);
}

// logsumexp(x * scale) over a row as hi + lo (common/hd.h, lse_split): float exps summed in float within
// blocks of 64 and in double across blocks, so the sum is as accurate as a pairwise one at any V.
template <class T> KDK_CPU_CLONES void row_lse_split(const T* x, int64_t n, T scale, T& hi, T& lo) {
  const T m = row_max(x, n) * scale;
  hi = m; lo = 0;
  if (m == neg_inf<T>()) return;
  double s = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 64 <= n; i += 64) {
      f8 acc = splat8(0.f);
      for (int j = 0; j < 64; j += 8) acc += exp8(load8(x + i + j) * scale - m);
      s += hsum8(acc);
    }
    for (; i + 8 <= n; i += 8) s += hsum8(exp8(load8(x + i) * scale - m));
  }
  for (; i < n; ++i) s += fast_exp(x[i] * scale - m);
  const double lse = double(m) + std::log(s);
  hi = static_cast<T>(lse);
  lo = static_cast<T>(lse - double(hi));
}

// out[i] = c * exp(x[i] * scale - shift)
template <class T> KDK_CPU_CLONES void row_scaled_exp(const T* x, int64_t n, T scale, T shift, T c, T* out) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>)
    for (; i + 8 <= n; i += 8) store8(out + i, c * exp8(load8(x + i) * scale - shift));
  for (; i < n; ++i) out[i] = c * fast_exp(x[i] * scale - shift);
}

}  // namespace kdk
