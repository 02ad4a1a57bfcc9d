// Emulator stand-in for <mma.h>: a functional model of nvcuda::wmma with the documented
// semantics of load / store (row- and column-major, ldm in elements), mma_sync (D = A B + C, float
// accumulation) and __float_to_tf32 (10 mantissa bits, round to nearest). The register layout of a real
// fragment is unspecified; here every lane holds the whole fragment and lane 0 stores it. Loads go through
// the instrumented kernel code, so they are checked like any other shared-memory read.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

inline float to_f(float x) { return x; }
inline float to_f(const __half& x) { return __half2float(x); }
inline float to_f(const __nv_bfloat16& x) { return __bfloat162float(x); }
template <class T> struct elem { using type = T; };
template <> struct elem<precision::tf32> { using type = float; };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  typename elem<T>::type x[num_elements];  // row-major rows x cols
};

// Fragments are registers: their arithmetic is not memory traffic, so it is not checked (and runs faster).
#define KDK_EMU_REGS __attribute__((no_sanitize_address))

template <class F, class T> KDK_EMU_REGS void fill_fragment(F& f, T v) {
  for (auto& e : f.x) e = v;
}

template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      const P& src = std::is_same<L, row_major>::value ? p[r * ldm + c] : p[r + c * ldm];
      f.x[r * F::cols + c] = static_cast<typename elem<T>::type>(to_f(src));
    }
}

template <int M, int N, int K, class TA, class TB, class LA, class LB>
KDK_EMU_REGS void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += to_f(a.x[i * K + k]) * to_f(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  if (threadIdx.x % 32 != 0) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (l == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * N + j];
}

inline float __float_to_tf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x1000;
  u &= 0xFFFFE000u;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace wmma
}  // namespace nvcuda
