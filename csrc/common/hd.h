// Portable math for code compiled both by the host compiler and by nvcc (__host__ __device__).
#pragma once
#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define KDK_HD __host__ __device__ __forceinline__
#else
#define KDK_HD inline
#endif

namespace kdk {

template <class T> KDK_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// exp/log/log1p that resolve to the float or double device/host function by argument type.
KDK_HD float kexp(float x) { return ::expf(x); }
KDK_HD double kexp(double x) { return ::exp(x); }
KDK_HD float klog(float x) { return ::logf(x); }
KDK_HD double klog(double x) { return ::log(x); }
KDK_HD float klog1p(float x) { return ::log1pf(x); }
KDK_HD double klog1p(double x) { return ::log1p(x); }
KDK_HD float ktanh(float x) { return ::tanhf(x); }
KDK_HD double ktanh(double x) { return ::tanh(x); }
KDK_HD float kexpm1(float x) { return ::expm1f(x); }
KDK_HD double kexpm1(double x) { return ::expm1(x); }

template <class T> KDK_HD T kmax(T a, T b) { return a > b ? a : b; }
template <class T> KDK_HD T kabs(T a) { return a < T(0) ? -a : a; }

// log(exp(a) + exp(b)) without overflow, -inf when both are -inf.
template <class T> KDK_HD T logaddexp(T a, T b) {
  T m = kmax(a, b);
  if (m == neg_inf<T>()) return m;
  return m + klog1p(kexp(-kabs(a - b)));
}

// hi + lo = a + b exactly, hi = fl(a + b) (Knuth's TwoSum; additions only, so contraction cannot break it).
template <class T> KDK_HD void two_sum(T a, T b, T& hi, T& lo) {
  hi = a + b;
  const T bb = hi - a;
  lo = (a - (hi - bb)) + (b - bb);
}

// A log-sum-exp kept as hi + lo (hi = the rounded value): log-probs formed as (x - hi) - lo lose only
// what eager's x - max - log(sum) loses, where x - lse with one rounded lse would lose eps * |lse|.
template <class T> KDK_HD void lse_split(T m, T s, T& hi, T& lo) {
  if (m == neg_inf<T>() || !(s > T(0))) { hi = neg_inf<T>(); lo = T(0); return; }
  two_sum(m, klog(s), hi, lo);
}

// Merge two (max, sum of exp(x - max)) pairs of an online log-sum-exp.
template <class T> KDK_HD void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 == neg_inf<T>()) return;
  if (m == neg_inf<T>()) { m = m2; s = s2; return; }
  if (m2 > m) { s = s * kexp(m - m2) + s2; m = m2; }
  else { s = s + s2 * kexp(m2 - m); }
}

}  // namespace kdk
