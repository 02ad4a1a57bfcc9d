// Tensor-core tile primitives: mma.sync (m16n8k16 bf16 / fp16, m16n8k8 tf32, float32 accumulation),
// ldmatrix (.x1 / .x2 / .x4, plain and .trans), cp.async (16-byte global -> shared, commit / wait groups) and
// an XOR swizzle of shared-memory rows. Inline PTX on sm_80+; in the emulator, warp-collective models that
// follow the PTX ISA's fragment layouts lane by lane (which lane holds which element), so a layout mistake in
// a kernel gives wrong numbers in CI rather than on the first GPU. Tested by tests/test_tile_mma.py.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16" and "mma.m16n8k8"), lane = 4 g + t:
//   m16n8k16 A (16 x 16, row): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9],
//                              a[3] = A[g+8][2t+8, 2t+9]   (two 16-bit values per register, low half first)
//            B (16 x 8, col):  b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//            C, D (16 x 8):    c[0, 1] = C[g][2t, 2t+1], c[2, 3] = C[g+8][2t, 2t+1]
//   m16n8k8 tf32 A (16 x 8):   a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
//            B (8 x 8):        b[0] = B[t][g], b[1] = B[t+4][g];  C, D as above.
//   ldmatrix .m8n8 .b16: lanes 8i..8i+7 give the row addresses of matrix i (16-byte aligned rows of eight
//   16-bit values); every lane receives r[i] = M_i[g][2t, 2t+1], or with .trans M_i[2t, 2t+1][g].
#pragma once
#include <cstdint>

#include "common/cuda_utils.cuh"

#ifdef KDK_EMU
#include "emu/tile_emu.h"
#define KDK_TILE_REGS __attribute__((no_sanitize_address))  // register arithmetic: not memory traffic
#endif

namespace kdk {
namespace tile {

// ---- swizzle ----------------------------------------------------------------------------------------
// A tile row of kChunks 16-byte chunks (kChunks a power of two): logical chunk c of row r is stored at
// chunk swizzle<kChunks>(r, c). The eight rows one ldmatrix phase reads at the same logical chunk then
// fall in eight different 16-byte bank groups (checked at compile time below), for rows of 32 B and more.
template <int kChunks> __host__ __device__ constexpr int swizzle(int row, int chunk) {
  static_assert(kChunks >= 2 && (kChunks & (kChunks - 1)) == 0, "kChunks must be a power of two >= 2");
  return kChunks >= 8 ? chunk ^ (row & 7) : kChunks == 4 ? chunk ^ ((row >> 1) & 3) : chunk ^ ((row >> 2) & 1);
}

template <int kChunks> constexpr bool swizzle_conflict_free() {
  for (int r0 = 0; r0 < 64; r0 += 8)
    for (int c = 0; c < kChunks; ++c) {
      unsigned seen = 0;  // bank groups (16 bytes = 4 banks each, 8 groups in 128 bytes) of the 8 rows
      for (int r = r0; r < r0 + 8; ++r) seen |= 1u << ((r * kChunks + swizzle<kChunks>(r, c)) & 7);
      if (seen != 0xffu) return false;
    }
  return true;
}
static_assert(swizzle_conflict_free<2>() && swizzle_conflict_free<4>() && swizzle_conflict_free<8>() &&
                  swizzle_conflict_free<16>(),
              "swizzle: the eight rows of an ldmatrix phase must hit eight different bank groups");

// ---- conversions --------------------------------------------------------------------------------------
// Two 16-bit values (bits) in one 32-bit register, lo in the low half: the operand format of mma.sync.
__host__ __device__ __forceinline__ uint32_t pack(uint16_t lo, uint16_t hi) {
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// float -> TF32 (10 mantissa bits), round to nearest, ties away from zero (cvt.rna.tf32.f32), in a
// float32 container: the operand format of the tf32 mma.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#ifdef KDK_EMU
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // inf / nan pass through
  return u;
#elif KDK_TENSOR_CORES
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  return __float_as_uint(x);
#endif
}

// x = hi + lo with both TF32 (lo is hi's rounding remainder, itself rounded): the operands of a 3xTF32
// product, hi hi + hi lo + lo hi, which keeps a float32 product to about 2^-21 relative.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  float h;
#ifdef KDK_EMU
  std::memcpy(&h, &hi, 4);
#else
  h = __uint_as_float(hi);
#endif
  lo = to_tf32(x - h);
}

#ifdef KDK_EMU
namespace model {
inline int lane() { return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31; }
inline KDK_TILE_REGS float bf16(uint32_t r, int hi) {
  const uint32_t u = (hi ? r >> 16 : r & 0xffffu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline KDK_TILE_REGS float f16(uint32_t r, int hi) {
  return static_cast<float>(c10::Half(static_cast<uint16_t>(hi ? r >> 16 : r & 0xffffu), c10::Half::from_bits()));
}
inline KDK_TILE_REGS float tf32(uint32_t r) {  // the tensor core reads the upper 19 bits
  const uint32_t u = r & 0xffffe000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// D = A B + C for one m16n8kK tile: gather every lane's fragments, then each lane forms its own four outputs
// (C layout) from the elements the layouts above place in the other lanes' registers; term(A, B, row, col, k)
// is the product A[row][k] B[k][col] read from the gathered registers.
template <int K, class Term>
KDK_TILE_REGS void mma_tile(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                            Term term) {
  uint32_t A[32][4], B[32][2];
  kdk_emu::warp_gather(0xffffffffu, a, A, sizeof(a));
  kdk_emu::warp_gather(0xffffffffu, b, B, sizeof(b));
  const int ln = lane(), g = ln >> 2, t = ln & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float s = c[i];
    for (int k = 0; k < K; ++k) s += term(A, B, row, col, k);
    out[i] = s;
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
template <bool kBF16>
KDK_TILE_REGS void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  mma_tile<16>(d, a, b, c, [](const uint32_t (*A)[4], const uint32_t (*B)[2], int row, int col, int k) {
    const uint32_t ra = A[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)];
    const uint32_t rb = B[col * 4 + ((k & 7) >> 1)][k >> 3];
    return kBF16 ? bf16(ra, k & 1) * bf16(rb, k & 1) : f16(ra, k & 1) * f16(rb, k & 1);  // exact products
  });
}
inline KDK_TILE_REGS void mma1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                       const float (&c)[4]) {
  mma_tile<8>(d, a, b, c, [](const uint32_t (*A)[4], const uint32_t (*B)[2], int row, int col, int k) {
    return tf32(A[(row & 7) * 4 + (k & 3)][(row >> 3) + 2 * (k >> 2)]) * tf32(B[col * 4 + (k & 3)][k >> 2]);
  });
}
// ldmatrix: the row addresses are gathered, then each lane reads its elements from the rows of the lanes
// that gave them. The reads are this lane's, in checked code: races, unwritten bytes and bounds are caught.
template <int N, bool kTrans> void ldmatrix(uint32_t (&r)[N], const void* row) {
  if (lane() < 8 * N) {
    if (reinterpret_cast<uintptr_t>(row) & 15) kdk_emu::device_fail("ldmatrix: a row address is not 16-byte aligned");
    if (!kdk_emu::in_shared(row, 16)) kdk_emu::device_fail("ldmatrix: a row address is not in shared memory");
  }
  const void* rows[32];
  kdk_emu::warp_gather(0xffffffffu, &row, rows, sizeof(row));
  const int ln = lane(), g = ln >> 2, t = ln & 3;
  for (int i = 0; i < N; ++i) {
    uint16_t lo, hi;
    if (kTrans) {
      lo = static_cast<const uint16_t*>(rows[8 * i + 2 * t])[g];
      hi = static_cast<const uint16_t*>(rows[8 * i + 2 * t + 1])[g];
    } else {
      const auto* p = static_cast<const uint16_t*>(rows[8 * i + g]);
      lo = p[2 * t];
      hi = p[2 * t + 1];
    }
    r[i] = pack(lo, hi);
  }
}
inline void copy_async(void* dst, const void* src, int bytes, int src_bytes) {
  auto* d = static_cast<uint32_t*>(dst);
  const auto* s = static_cast<const uint32_t*>(src);
  for (int i = 0; i < bytes / 4; ++i) d[i] = 4 * i < src_bytes ? s[i] : 0u;
}
}  // namespace model
#endif

// ---- mma.sync -----------------------------------------------------------------------------------------
// d = a b + c on one 16 x 8 x 16 tile (d may alias c). kBF16: bfloat16 operands, else float16.
template <bool kBF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                         const float (&c)[4]) {
#ifdef KDK_EMU
  model::mma16816<kBF16>(d, a, b, c);
#elif KDK_TENSOR_CORES
  if constexpr (kBF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
#else
  __trap();  // callers guard tensor-core paths with KDK_TENSOR_CORES
#endif
}

// d = a b + c on one 16 x 8 x 8 tile of TF32 operands (to_tf32) with float32 accumulation.
__device__ __forceinline__ void mma1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
#ifdef KDK_EMU
  model::mma1688_tf32(d, a, b, c);
#elif KDK_TENSOR_CORES
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%10, %11, %12, %13};\n"
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                 "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
  __trap();
#endif
}

// ---- ldmatrix -----------------------------------------------------------------------------------------
// N = 1, 2 or 4 8x8 matrices of 16-bit values from shared memory; `row` is this lane's row address (lanes
// 8i..8i+7 address matrix i; the other lanes' addresses are not read). kTrans: each matrix transposed.
template <int N, bool kTrans = false> __device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef KDK_EMU
  model::ldmatrix<N, kTrans>(r, row);
#elif KDK_TENSOR_CORES
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (N == 1 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  } else if constexpr (N == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  } else if constexpr (!kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  }
#else
  __trap();
#endif
}

// ---- cp.async -----------------------------------------------------------------------------------------
// Copies 16 bytes global -> shared without passing through registers (both 16-byte aligned); valid = false
// fills the 16 bytes with zeros instead (a tile's rows past the end). The data may be read only after
// cp_async_wait retired its group and a barrier made it visible to the other threads.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid = true) {
#ifdef KDK_EMU
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) & 15)
    kdk_emu::device_fail("cp.async: an address is not 16-byte aligned");
  if (!kdk_emu::in_shared(smem, 16)) kdk_emu::device_fail("cp.async: the destination is not in shared memory");
  kdk_emu::cp_async_push(smem, gmem, 16, valid ? 16 : 0);
#elif KDK_TENSOR_CORES
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
#else
  __trap();
#endif
}

// Closes the group of the cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef KDK_EMU
  kdk_emu::cp_async_commit();
#elif KDK_TENSOR_CORES
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
#ifdef KDK_EMU
  void* dst;
  const void* src;
  int bytes, src_bytes;
  while (kdk_emu::cp_async_take(kPending, &dst, &src, &bytes, &src_bytes)) model::copy_async(dst, src, bytes, src_bytes);
#elif KDK_TENSOR_CORES
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace tile
}  // namespace kdk
