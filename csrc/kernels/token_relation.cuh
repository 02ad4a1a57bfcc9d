// Torch-free CUDA kernels of the token-relation ops, flash-style: a thread block owns BM tokens of one
// problem (instance x head) and streams over the problem's tokens in tiles of BM, never storing more
// than a BM x BM tile of any similarity matrix.
//
//   relation_fwd_kernel     rows O: tiles A = Yt_O Yt_X^T, B = Ys_O Ys_X^T; online (max, sum) of both row
//                           softmaxes and the shifted KL accumulator (one pass); MSE makes a second pass
//                           with the row log-sum-exps known.
//   relation_bwd_kernel     rows O: recompute A, B; M[o][x] = beta (w_o g_ox + w_x g_xo) from the saved
//                           statistics of o and x (the graphs are symmetric: g_xo reads the same tile);
//                           dY_O += M Y_X. Each block owns its output rows: no atomics.
//   contrastive_fwd_kernel  rows O (queries): tile C = S_O T_X^T; online log-sum-exp; the diagonal.
//   contrastive_bwd_kernel  student side: rows O are queries, dS_O += G T_X; teacher side: rows O are
//                           keys (tile T_O S_X^T), dT_O += G^T-tile S_X.
//
// Products (common/tile_mma.cuh, sm_80+): similarity tiles by mma.sync, bf16 / fp16 operands as m16n8k16 and
// float32 operands as 3xTF32 m16n8k8 (float32-accurate); the gradient products G @ F as TF32 m16n8k8 with G
// split hi + lo (G stays float: its entries can be far below the 16-bit range). Every operand chunk is
// double-buffered with cp.async. The backward sums each block's gradient rows in shared memory when the
// launcher gives the room (one store per element at the end), else in the global buffer. float64 inputs
// use a register-tiled FMA loop.
// Token rows past the problem's length (masked tokens sit there, see token_order) read as zeros.
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_utils.cuh"
#include "common/tile_mma.cuh"
#include "common/token_relation_math.h"

namespace kdk {
namespace trk {

// 4 warps per block; __launch_bounds__(kThreads, 2) lets ptxas use up to 255 registers (the shared memory of
// the tensor-core paths allows two or three blocks per SM anyway) instead of spilling at its 128 default.
constexpr int kThreads = 128;
constexpr int kKC = 32;        // feature chunk of a similarity product; output chunk of a gradient product

template <class T> struct Is16 {
  static constexpr bool value = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
};

// Tile geometry: BM tokens per side (32 for float64 to keep shared memory in bounds), float tiles with
// a row stride of BM + 4 (conflict-free TF32 A-fragment reads: rows 4 banks apart).
template <class acc_t> struct Geo {
  static constexpr int BM = sizeof(acc_t) == 8 ? 32 : 64;
  static constexpr int LD = BM + 4;
  static constexpr int TM = BM / 16;  // FMA loops: rows per thread (16 x 8 thread grid)
  static constexpr int TN = BM / 8;   // ... columns per thread of a BM x BM tile
};

__host__ __device__ constexpr size_t round128(size_t b) { return (b + 127) / 128 * 128; }
__host__ __device__ constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// Dynamic shared memory of every kernel: two float tiles, two 8 x BM statistics blocks, one staging area
// large enough for whichever product variant runs (the same number on the host and on every arch).
template <class scalar_t, class acc_t> struct Smem {
  static constexpr int BM = Geo<acc_t>::BM, LD = Geo<acc_t>::LD;
  static constexpr size_t tile = round128(sizeof(acc_t) * BM * LD);
  static constexpr size_t stats = round128(sizeof(acc_t) * 8 * BM);
  // tensor-core staging (sim_tile_mma, accum_tile_mma: two stages each) and the FMA loops' (float64)
  static constexpr size_t sim_mma = 4 * sizeof(scalar_t) * BM * (Is16<scalar_t>::value ? kKC + 8 : kKC / 2 + 4);
  static constexpr size_t acc_mma = 2 * sizeof(scalar_t) * BM * (kKC + 8);
  static constexpr size_t sim_fma = 2 * sizeof(acc_t) * kKC * (BM + 1);
  static constexpr size_t acc_fma = sizeof(acc_t) * BM * (kKC + 1);
  static constexpr size_t stage = round128(cmax(cmax(sim_mma, sim_fma), cmax(acc_mma, acc_fma)));
  static constexpr size_t total = 2 * tile + 2 * stats + stage;
  // The backward's gradient accumulators of the block's rows, after `total` when the launcher gives the room:
  // BM rows of d + 4 values (0: the rows are summed in the global buffer).
  static constexpr int acc_ld(int d) { return d + 4; }
  static constexpr size_t acc_bytes(int d) { return round128(sizeof(acc_t) * BM * size_t(acc_ld(d))); }
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// ---------------------------------------------------------------------------------------------
// S[r][c] = <X[a0 + r], Y[b0 + c]> for r, c < BM (rows >= L read as 0). X, Y: (n, d) row-major.
// Starts with writes to `stage` only and ends with __syncthreads(), so the caller may read S at once
// and may have been reading the previous S until it called this.
// ---------------------------------------------------------------------------------------------

template <class scalar_t, class acc_t>
__device__ void sim_tile_fma(const scalar_t* X, const scalar_t* Y, int d, int64_t a0, int64_t b0, int64_t L, acc_t* S,
                             unsigned char* stage) {
  using G = Geo<acc_t>;
  constexpr int BM = G::BM, LD = G::LD, SL = BM + 1;
  acc_t* sx = reinterpret_cast<acc_t*>(stage);  // [kKC][SL], transposed: sx[k][r]
  acc_t* sy = sx + kKC * SL;
  const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
  acc_t acc[G::TM][G::TN];
#pragma unroll
  for (int m = 0; m < G::TM; ++m)
#pragma unroll
    for (int n = 0; n < G::TN; ++n) acc[m][n] = acc_t(0);
  for (int k0 = 0; k0 < d; k0 += kKC) {
    for (int idx = threadIdx.x; idx < BM * kKC; idx += kThreads) {
      const int r = idx / kKC, k = idx % kKC;
      const bool kin = k0 + k < d;
      sx[k * SL + r] = (kin && a0 + r < L) ? to_acc(X[(a0 + r) * d + k0 + k]) : acc_t(0);
      sy[k * SL + r] = (kin && b0 + r < L) ? to_acc(Y[(b0 + r) * d + k0 + k]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kKC; ++k) {
      acc_t xv[G::TM], yv[G::TN];
#pragma unroll
      for (int m = 0; m < G::TM; ++m) xv[m] = sx[k * SL + ty + 16 * m];
#pragma unroll
      for (int n = 0; n < G::TN; ++n) yv[n] = sy[k * SL + tx + 8 * n];
#pragma unroll
      for (int m = 0; m < G::TM; ++m)
#pragma unroll
        for (int n = 0; n < G::TN; ++n) acc[m][n] += xv[m] * yv[n];
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < G::TM; ++m)
#pragma unroll
    for (int n = 0; n < G::TN; ++n) S[(ty + 16 * m) * LD + tx + 8 * n] = acc[m][n];
  __syncthreads();
}

#if KDK_TENSOR_CORES
// Issues the cp.async copies of features [k0, k0 + KC) of rows [a0, a0 + BM) of X and [b0, b0 + BM) of Y into
// sx, sy ([BM][SK] elements of T), zeros past L or d, and commits them as one group. vec: d is a multiple of
// the 16-byte vector and X, Y are 16-byte aligned; otherwise plain loads and stores (visible after the
// caller's barrier like the copies).
template <int KC, int SK, class T>
__device__ __forceinline__ void stage_pair(const T* X, const T* Y, int d, int64_t a0, int64_t b0, int64_t L, int k0,
                                           bool vec, T* sx, T* sy) {
  constexpr int BM = Geo<float>::BM, V = 16 / sizeof(T), CV = KC / V;
  if (vec) {
    for (int idx = threadIdx.x; idx < 2 * BM * CV; idx += kThreads) {
      const int side = idx / (BM * CV), r = (idx / CV) % BM, c = (idx % CV) * V;
      const int64_t row = (side ? b0 : a0) + r;
      const bool ok = row < L && k0 + c < d;
      tile::cp_async16((side ? sy : sx) + r * SK + c, (side ? Y : X) + (ok ? row * d + k0 + c : 0), ok);
    }
  } else {
    for (int idx = threadIdx.x; idx < 2 * BM * KC; idx += kThreads) {
      const int side = idx / (BM * KC), r = (idx / KC) % BM, c = idx % KC;
      const int64_t row = (side ? b0 : a0) + r;
      (side ? sy : sx)[r * SK + c] = (row < L && k0 + c < d) ? (side ? Y : X)[row * d + k0 + c] : T(0.0f);
    }
  }
  tile::cp_async_commit();
}

// S = X_a Y_b^T on tensor cores: bf16 / fp16 operands with mma.sync m16n8k16 (exact products, float32 sums),
// float32 operands as 3xTF32 (x = hi + lo, both TF32; hi hi + hi lo + lo hi with m16n8k8: the float32 product
// to about 2^-21, where plain TF32 would keep 2^-11). Feature chunks of KC are double-buffered with cp.async:
// chunk c + 1 lands while chunk c is multiplied. Warp w computes rows 16 w .. 16 w + 15 of the 64 x 64 tile.
template <class scalar_t>
__device__ void sim_tile_mma(const scalar_t* X, const scalar_t* Y, int d, int64_t a0, int64_t b0, int64_t L, float* S,
                             unsigned char* stage) {
  constexpr bool k16 = Is16<scalar_t>::value;
  constexpr int BM = Geo<float>::BM, LD = Geo<float>::LD, NT = BM / 8;
  constexpr int KC = k16 ? 32 : 16, SK = KC + (k16 ? 8 : 4);  // conflict-free fragment reads (see docs)
  scalar_t* buf = reinterpret_cast<scalar_t*>(stage);          // [2 stages][X, Y][BM][SK]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3, w16 = warp * 16;
  const bool vec = d % (16 / int(sizeof(scalar_t))) == 0 && aligned16(X) && aligned16(Y);
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
  const int nk = (d + KC - 1) / KC;
  stage_pair<KC, SK>(X, Y, d, a0, b0, L, 0, vec, buf, buf + BM * SK);
  for (int kc = 0; kc < nk; ++kc) {
    if (kc + 1 < nk) {  // the other buffer's readers passed the barrier closing the previous iteration
      scalar_t* nb = buf + ((kc + 1) & 1) * 2 * BM * SK;
      stage_pair<KC, SK>(X, Y, d, a0, b0, L, (kc + 1) * KC, vec, nb, nb + BM * SK);
      tile::cp_async_wait<1>();
    } else {
      tile::cp_async_wait<0>();
    }
    __syncthreads();
    const scalar_t* sx = buf + (kc & 1) * 2 * BM * SK;
    const scalar_t* sy = sx + BM * SK;
    if constexpr (k16) {
      constexpr bool kBF16 = std::is_same<scalar_t, __nv_bfloat16>::value;
#pragma unroll
      for (int kk = 0; kk < KC / 16; ++kk) {
        uint32_t a[4];
        tile::ldmatrix<4>(a, sx + (w16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * SK + kk * 16 + 8 * (lane >> 4));
#pragma unroll
        for (int j = 0; j < NT; j += 2) {  // Y rows [n][k] are the col-major B
          uint32_t f[4];
          tile::ldmatrix<4>(f, sy + (8 * j + (lane & 7) + 8 * (lane >> 4)) * SK + kk * 16 + 8 * ((lane >> 3) & 1));
          const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
          tile::mma16816<kBF16>(acc[j], a, b0, acc[j]);
          tile::mma16816<kBF16>(acc[j + 1], a, b1, acc[j + 1]);
        }
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < KC / 8; ++kk) {
        uint32_t ah[4], al[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float x = sx[(w16 + g + 8 * (i & 1)) * SK + kk * 8 + t + 4 * (i >> 1)];
          tile::split_tf32(x, ah[i], al[i]);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t bh[2], bl[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) tile::split_tf32(sy[(8 * j + g) * SK + kk * 8 + t + 4 * i], bh[i], bl[i]);
          tile::mma1688_tf32(acc[j], al, bh, acc[j]);
          tile::mma1688_tf32(acc[j], ah, bl, acc[j]);
          tile::mma1688_tf32(acc[j], ah, bh, acc[j]);
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) S[(w16 + g + 8 * (i >> 1)) * LD + 8 * j + 2 * t + (i & 1)] = acc[j][i];
  __syncthreads();
}
#endif

template <class scalar_t, class acc_t>
__device__ __forceinline__ void sim_tile(const scalar_t* X, const scalar_t* Y, int d, int64_t a0, int64_t b0, int64_t L,
                                         acc_t* S, unsigned char* stage) {
#if KDK_TENSOR_CORES
  if constexpr (!std::is_same<acc_t, double>::value) {
    sim_tile_mma<scalar_t>(X, Y, d, a0, b0, L, S, stage);
    return;
  }
#endif
  sim_tile_fma<scalar_t, acc_t>(X, Y, d, a0, b0, L, S, stage);
}

// ---------------------------------------------------------------------------------------------
// out[r][:] += sum_x Gt[r][x] F[x0 + x][:] for the rows o0 + r < L; Gt: BM x BM float tile in shared memory
// (zero wherever o0 + r or x0 + x is past L), F: (n, d) rows, out: this block's rows o0 .. with row stride
// ld, either the block's accumulator in shared memory or its rows of the global (n, d) buffer (no other
// block writes them). Ends with __syncthreads().
// ---------------------------------------------------------------------------------------------

template <class scalar_t, class acc_t>
__device__ void accum_tile_fma(const acc_t* Gt, const scalar_t* F, int d, int64_t o0, int64_t x0, int64_t L, acc_t* out,
                               int ld, unsigned char* stage) {
  using G = Geo<acc_t>;
  constexpr int BM = G::BM, LD = G::LD, SF = kKC + 1, TN = kKC / 8;
  acc_t* sf = reinterpret_cast<acc_t*>(stage);  // [BM][SF]
  const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
  for (int c0 = 0; c0 < d; c0 += kKC) {
    for (int idx = threadIdx.x; idx < BM * kKC; idx += kThreads) {
      const int x = idx / kKC, c = idx % kKC;
      sf[x * SF + c] = (x0 + x < L && c0 + c < d) ? to_acc(F[(x0 + x) * d + c0 + c]) : acc_t(0);
    }
    __syncthreads();
    acc_t acc[G::TM][TN];
#pragma unroll
    for (int m = 0; m < G::TM; ++m)
#pragma unroll
      for (int n = 0; n < TN; ++n) acc[m][n] = acc_t(0);
#pragma unroll 4
    for (int x = 0; x < BM; ++x) {
      acc_t gv[G::TM], fv[TN];
#pragma unroll
      for (int m = 0; m < G::TM; ++m) gv[m] = Gt[(ty + 16 * m) * LD + x];
#pragma unroll
      for (int n = 0; n < TN; ++n) fv[n] = sf[x * SF + tx + 8 * n];
#pragma unroll
      for (int m = 0; m < G::TM; ++m)
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[m][n] += gv[m] * fv[n];
    }
#pragma unroll
    for (int m = 0; m < G::TM; ++m)
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        const int r = ty + 16 * m, col = c0 + tx + 8 * n;
        if (o0 + r < L && col < d) out[r * ld + col] += acc[m][n];
      }
    __syncthreads();
  }
}

#if KDK_TENSOR_CORES
// The same product on tensor cores with m16n8k8 TF32: G is split hi + lo (its entries can be far below the
// 16-bit range and need float32 precision); 16-bit F is exact in TF32 (two products per tile), float32 F is
// split too (3xTF32). F chunks of 32 features are double-buffered with cp.async; warp w owns rows 16 w ..
template <class scalar_t>
__device__ void accum_tile_mma(const float* Gt, const scalar_t* F, int d, int64_t o0, int64_t x0, int64_t L, float* out,
                               int ld, unsigned char* stage) {
  constexpr bool k16 = Is16<scalar_t>::value;
  constexpr int BM = Geo<float>::BM, LD = Geo<float>::LD, KC = kKC, SF = KC + 8, V = 16 / sizeof(scalar_t);
  constexpr int CV = KC / V;
  scalar_t* buf = reinterpret_cast<scalar_t*>(stage);  // [2 stages][BM rows x][SF]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3, w16 = warp * 16;
  const bool vec = d % V == 0 && aligned16(F);
  auto load = [&](int c0, scalar_t* dst) {
    if (vec) {
      for (int idx = threadIdx.x; idx < BM * CV; idx += kThreads) {
        const int x = idx / CV, c = (idx % CV) * V;
        const bool ok = x0 + x < L && c0 + c < d;
        tile::cp_async16(dst + x * SF + c, F + (ok ? (x0 + x) * d + c0 + c : 0), ok);
      }
    } else {
      for (int idx = threadIdx.x; idx < BM * KC; idx += kThreads) {
        const int x = idx / KC, c = idx % KC;
        dst[x * SF + c] = (x0 + x < L && c0 + c < d) ? F[(x0 + x) * d + c0 + c] : scalar_t(0.0f);
      }
    }
    tile::cp_async_commit();
  };
  const int nc = (d + KC - 1) / KC;
  load(0, buf);
  for (int ci = 0; ci < nc; ++ci) {
    if (ci + 1 < nc) {
      load((ci + 1) * KC, buf + ((ci + 1) & 1) * BM * SF);
      tile::cp_async_wait<1>();
    } else {
      tile::cp_async_wait<0>();
    }
    __syncthreads();
    const scalar_t* sf = buf + (ci & 1) * BM * SF;
    float acc[KC / 8][4];
#pragma unroll
    for (int j = 0; j < KC / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
#pragma unroll 2
    for (int kk = 0; kk < BM / 8; ++kk) {
      uint32_t gh[4], gl[4];  // G's A fragment (hi, lo) at k-step kk over the 64 partner rows
#pragma unroll
      for (int i = 0; i < 4; ++i)
        tile::split_tf32(Gt[(w16 + g + 8 * (i & 1)) * LD + kk * 8 + t + 4 * (i >> 1)], gh[i], gl[i]);
#pragma unroll
      for (int j = 0; j < KC / 8; ++j) {
        uint32_t bh[2], bl[2];  // B[x][c] = F[x0 + 8 kk + t (+4)][c0 + 8 j + g]
#pragma unroll
        for (int i = 0; i < 2; ++i) tile::split_tf32(to_acc(sf[(kk * 8 + t + 4 * i) * SF + 8 * j + g]), bh[i], bl[i]);
        if constexpr (!k16) tile::mma1688_tf32(acc[j], gh, bl, acc[j]);
        tile::mma1688_tf32(acc[j], gl, bh, acc[j]);
        tile::mma1688_tf32(acc[j], gh, bh, acc[j]);
      }
    }
    const int c0 = ci * KC;
#pragma unroll
    for (int j = 0; j < KC / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = w16 + g + 8 * (i >> 1), col = c0 + 8 * j + 2 * t + (i & 1);
        if (o0 + r < L && col < d) out[r * ld + col] += acc[j][i];  // this thread's element alone
      }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
}
#endif

template <class scalar_t, class acc_t>
__device__ __forceinline__ void accum_tile(const acc_t* Gt, const scalar_t* F, int d, int64_t o0, int64_t x0, int64_t L,
                                           acc_t* out, int ld, unsigned char* stage) {
#if KDK_TENSOR_CORES
  if constexpr (!std::is_same<acc_t, double>::value) {
    accum_tile_mma<scalar_t>(Gt, F, d, o0, x0, L, out, ld, stage);
    return;
  }
#endif
  accum_tile_fma<scalar_t, acc_t>(Gt, F, d, o0, x0, L, out, ld, stage);
}

// Where a backward block sums its gradient rows o0 .. o0 + BM - 1: shared memory after the fixed carve-up
// (zeroed here; acc_flush writes it out once at the end) or, without the room, the global rows themselves.
template <class scalar_t, class acc_t> struct RowAcc {
  acc_t* rows;  // row o0
  int ld;
  bool shared;
  __device__ RowAcc(unsigned char* smem_base, size_t offset, bool in_smem, acc_t* global, int64_t o0, int d)
      : shared(in_smem) {
    using M = Smem<scalar_t, acc_t>;
    if (shared) {
      rows = reinterpret_cast<acc_t*>(smem_base + M::total + offset);
      ld = M::acc_ld(d);
      for (int i = threadIdx.x; i < M::BM * ld; i += kThreads) rows[i] = acc_t(0);
    } else {
      rows = global + o0 * d;
      ld = d;
    }
  }
  // After the last accum_tile (which ends with a barrier): the block's valid rows to the global buffer.
  __device__ void flush(acc_t* global, int64_t o0, int64_t L, int d) const {
    if (!shared) return;
    for (int i = threadIdx.x; i < Geo<acc_t>::BM * d; i += kThreads) {
      const int r = i / d, c = i % d;
      if (o0 + r < L) global[(o0 + r) * d + c] = rows[r * ld + c];
    }
  }
};

// The shared-memory carve-up every kernel uses.
template <class scalar_t, class acc_t> struct Shared {
  acc_t* tA;  // BM x LD
  acc_t* tB;  // BM x LD
  acc_t* so;  // 8 x BM statistics of the block's own rows (column k at so + k * BM)
  acc_t* sx;  // 8 x BM statistics of the partner rows
  unsigned char* stage;
  __device__ explicit Shared(unsigned char* base) {
    using M = Smem<scalar_t, acc_t>;
    tA = reinterpret_cast<acc_t*>(base);
    tB = reinterpret_cast<acc_t*>(base + M::tile);
    so = reinterpret_cast<acc_t*>(base + 2 * M::tile);
    sx = reinterpret_cast<acc_t*>(base + 2 * M::tile + M::stats);
    stage = base + 2 * M::tile + 2 * M::stats;
  }
};

// ---------------------------------------------------------------------------------------------
// Relation losses
// ---------------------------------------------------------------------------------------------

template <class scalar_t, class acc_t> struct RelParams {
  const scalar_t* ys;  // (Q, n, ds), Q = P * H problems, valid tokens first
  const scalar_t* yt;  // (Q, n, dt)
  const int* lens;     // (P,) valid tokens per instance, or null (all n)
  acc_t* loss;         // forward: (Q, n) per-head row losses (zero-initialised)
  acc_t* stat;         // (Q, n, kRelStats): forward writes, backward reads
  const acc_t* w;      // backward: (P, n) upstream gradient per token
  acc_t* gs;           // backward: (Q, n, ds) float accumulator (zero-initialised)
  acc_t* gt;           // backward: (Q, n, dt) or null
  int64_t n, nblocks;  // tokens per problem, row blocks per problem
  int H, ds, dt;
  int acc_smem;        // backward: 1 = gradient rows accumulated in shared memory (Smem::acc_bytes per side)
  acc_t beta_s, beta_t, inv_h;
};

template <class scalar_t, class acc_t, int kLoss>
__global__ void __launch_bounds__(kThreads, 2) relation_fwd_kernel(RelParams<scalar_t, acc_t> p) {
  constexpr int BM = Geo<acc_t>::BM, LD = Geo<acc_t>::LD, CPL = BM / 32;
  KDK_DYNAMIC_SMEM(smem_raw, 128);
  Shared<scalar_t, acc_t> sh(smem_raw);
  const int64_t q = blockIdx.x / p.nblocks, o0 = (blockIdx.x % p.nblocks) * BM;
  const int64_t L = p.lens ? static_cast<int64_t>(p.lens[q / p.H]) : p.n;
  if (o0 >= L) return;  // the whole block: before any barrier
  const scalar_t* ys = p.ys + q * p.n * p.ds;
  const scalar_t* yt = p.yt + q * p.n * p.dt;
  // Row state, column-major in sh.so: 0 ma, 1 sa, 2 mb, 3 sb, 4 acc (pass 2 of MSE: 0 lse_t, 2 lse_s,
  // 1 loss, 3 cs, 4 ct).
  acc_t* st = sh.so;
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    st[0 * BM + r] = neg_inf<acc_t>();
    st[1 * BM + r] = acc_t(0);
    st[2 * BM + r] = neg_inf<acc_t>();
    st[3 * BM + r] = acc_t(0);
    st[4 * BM + r] = acc_t(0);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kPasses = kLoss == kRelKL ? 1 : 2;
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int64_t x0 = 0; x0 < L; x0 += BM) {
      sim_tile<scalar_t, acc_t>(yt, yt, p.dt, o0, x0, L, sh.tA, sh.stage);
      sim_tile<scalar_t, acc_t>(ys, ys, p.ds, o0, x0, L, sh.tB, sh.stage);
      for (int r = warp; r < BM; r += kThreads / 32) {
        if (o0 + r >= L) continue;  // warp-uniform
        acc_t av[CPL], bv[CPL];
        bool ok[CPL];
#pragma unroll
        for (int u = 0; u < CPL; ++u) {
          const int c = lane + 32 * u;
          ok[u] = x0 + c < L;
          av[u] = ok[u] ? p.beta_t * sh.tA[r * LD + c] : neg_inf<acc_t>();
          bv[u] = ok[u] ? p.beta_s * sh.tB[r * LD + c] : neg_inf<acc_t>();
        }
        if (pass == 0) {
          acc_t ma = st[0 * BM + r], sa = st[1 * BM + r], mb = st[2 * BM + r], sb = st[3 * BM + r],
                ac = st[4 * BM + r];
          __syncwarp();  // every lane has read the state before lane 0 rewrites it
          acc_t tma = neg_inf<acc_t>(), tmb = neg_inf<acc_t>();
#pragma unroll
          for (int u = 0; u < CPL; ++u) {
            tma = kmax(tma, av[u]);
            tmb = kmax(tmb, bv[u]);
          }
          tma = warp_max(tma);
          tmb = warp_max(tmb);
          rel_rescale(ma, mb, sa, sb, ac, kmax(ma, tma), kmax(mb, tmb));
          acc_t e1 = 0, e2 = 0, e3 = 0;
#pragma unroll
          for (int u = 0; u < CPL; ++u) {
            if (!ok[u]) continue;
            const acc_t xa = av[u] - ma, xb = bv[u] - mb, ea = kexp(xa);
            e1 += ea;
            e2 += kexp(xb);
            if (kLoss == kRelKL) e3 += ea * (xa - xb);
          }
          e1 = warp_sum(e1);
          e2 = warp_sum(e2);
          e3 = warp_sum(e3);
          if (lane == 0) {
            st[0 * BM + r] = ma;
            st[1 * BM + r] = sa + e1;
            st[2 * BM + r] = mb;
            st[3 * BM + r] = sb + e2;
            st[4 * BM + r] = ac + e3;
          }
        } else {
          const acc_t lt = st[0 * BM + r], ls = st[2 * BM + r];
          acc_t l = 0, cs = 0, ct = 0;
#pragma unroll
          for (int u = 0; u < CPL; ++u)
            if (ok[u]) rel_mse_terms(kexp(av[u] - lt), kexp(bv[u] - ls), l, cs, ct);
          l = warp_sum(l);
          cs = warp_sum(cs);
          ct = warp_sum(ct);
          if (lane == 0) {
            st[1 * BM + r] += l;
            st[3 * BM + r] += cs;
            st[4 * BM + r] += ct;
          }
        }
      }
      __syncthreads();
    }
    if (pass == 0) {
      for (int r = threadIdx.x; r < BM; r += kThreads) {
        const int64_t i = o0 + r;
        if (i >= L) continue;
        const acc_t sa = st[1 * BM + r], sb = st[3 * BM + r];
        const acc_t lse_t = st[0 * BM + r] + klog(sa), lse_s = st[2 * BM + r] + klog(sb);
        acc_t* out = p.stat + (q * p.n + i) * kRelStats;
        out[kStatLseT] = lse_t;
        out[kStatLseS] = lse_s;
        if (kLoss == kRelKL) {
          const acc_t kl = rel_kl_final(sa, sb, st[4 * BM + r]);
          out[kStatCS] = acc_t(0);
          out[kStatCT] = kl;
          p.loss[q * p.n + i] = kl;
        } else {
          st[0 * BM + r] = lse_t;
          st[2 * BM + r] = lse_s;
          st[1 * BM + r] = st[3 * BM + r] = st[4 * BM + r] = acc_t(0);
        }
      }
      __syncthreads();
    }
  }
  if (kLoss == kRelMSE) {
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const int64_t i = o0 + r;
      if (i >= L) continue;
      acc_t* out = p.stat + (q * p.n + i) * kRelStats;
      out[kStatCS] = st[3 * BM + r];
      out[kStatCT] = st[4 * BM + r];
      p.loss[q * p.n + i] = st[1 * BM + r];
    }
  }
}

// Loads the saved statistics (and w / H) of rows r0 .. r0 + BM - 1 into s (column k at s + k * BM);
// rows past L get w = 0 and zero statistics.
template <class acc_t>
__device__ __forceinline__ void load_row_stats(const acc_t* stat, const acc_t* w, acc_t inv_h, int64_t r0, int64_t L,
                                               acc_t* s) {
  constexpr int BM = Geo<acc_t>::BM;
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t i = r0 + r;
    const bool ok = i < L;
#pragma unroll
    for (int k = 0; k < kRelStats; ++k) s[k * BM + r] = ok ? stat[i * kRelStats + k] : acc_t(0);
    s[4 * BM + r] = ok ? w[i] * inv_h : acc_t(0);
  }
}

template <class scalar_t, class acc_t, int kLoss, bool kTeacher>
__global__ void __launch_bounds__(kThreads, 2) relation_bwd_kernel(RelParams<scalar_t, acc_t> p) {
  constexpr int BM = Geo<acc_t>::BM, LD = Geo<acc_t>::LD;
  KDK_DYNAMIC_SMEM(smem_raw, 128);
  Shared<scalar_t, acc_t> sh(smem_raw);
  const int64_t q = blockIdx.x / p.nblocks, o0 = (blockIdx.x % p.nblocks) * BM;
  const int64_t pi = q / p.H;
  const int64_t L = p.lens ? static_cast<int64_t>(p.lens[pi]) : p.n;
  if (o0 >= L) return;
  const scalar_t* ys = p.ys + q * p.n * p.ds;
  const scalar_t* yt = p.yt + q * p.n * p.dt;
  const acc_t* stat = p.stat + q * p.n * kRelStats;
  const acc_t* w = p.w + pi * p.n;
  acc_t* gs = p.gs + q * p.n * p.ds;
  acc_t* gt = kTeacher ? p.gt + q * p.n * p.dt : nullptr;
  load_row_stats(stat, w, p.inv_h, o0, L, sh.so);
  using M = Smem<scalar_t, acc_t>;
  const RowAcc<scalar_t, acc_t> as(smem_raw, 0, p.acc_smem, gs, o0, p.ds);
  const RowAcc<scalar_t, acc_t> at(smem_raw, M::acc_bytes(p.ds), p.acc_smem && kTeacher, gt, o0, p.dt);
  for (int64_t x0 = 0; x0 < L; x0 += BM) {
    load_row_stats(stat, w, p.inv_h, x0, L, sh.sx);  // read after sim_tile's barriers
    sim_tile<scalar_t, acc_t>(yt, yt, p.dt, o0, x0, L, sh.tA, sh.stage);
    sim_tile<scalar_t, acc_t>(ys, ys, p.ds, o0, x0, L, sh.tB, sh.stage);
    for (int idx = threadIdx.x; idx < BM * BM; idx += kThreads) {
      const int r = idx / BM, c = idx % BM;
      acc_t ms = 0, mt = 0;
      if (o0 + r < L && x0 + c < L) {
        const acc_t a = p.beta_t * sh.tA[r * LD + c], b = p.beta_s * sh.tB[r * LD + c];
        const acc_t wi = sh.so[4 * BM + r], wj = sh.sx[4 * BM + c];
        const acc_t lpti = a - sh.so[kStatLseT * BM + r], lpsi = b - sh.so[kStatLseS * BM + r];
        const acc_t lptj = a - sh.sx[kStatLseT * BM + c], lpsj = b - sh.sx[kStatLseS * BM + c];
        const acc_t pti = kexp(lpti), psi = kexp(lpsi), ptj = kexp(lptj), psj = kexp(lpsj);
        ms = p.beta_s * (wi * rel_coef_student<kLoss>(pti, psi, sh.so[kStatCS * BM + r]) +
                         wj * rel_coef_student<kLoss>(ptj, psj, sh.sx[kStatCS * BM + c]));
        if (kTeacher)
          mt = p.beta_t * (wi * rel_coef_teacher<kLoss>(pti, psi, lpti, lpsi, sh.so[kStatCT * BM + r]) +
                           wj * rel_coef_teacher<kLoss>(ptj, psj, lptj, lpsj, sh.sx[kStatCT * BM + c]));
      }
      sh.tB[r * LD + c] = ms;
      if (kTeacher) sh.tA[r * LD + c] = mt;
    }
    __syncthreads();
    accum_tile<scalar_t, acc_t>(sh.tB, ys, p.ds, o0, x0, L, as.rows, as.ld, sh.stage);
    if (kTeacher) accum_tile<scalar_t, acc_t>(sh.tA, yt, p.dt, o0, x0, L, at.rows, at.ld, sh.stage);
  }
  as.flush(gs, o0, L, p.ds);
  if (kTeacher) at.flush(gt, o0, L, p.dt);
}

// ---------------------------------------------------------------------------------------------
// Contrastive loss
// ---------------------------------------------------------------------------------------------

template <class scalar_t, class acc_t> struct ConParams {
  const scalar_t* s;  // (P, n, D) student, valid tokens first
  const scalar_t* t;  // (P, n, D) teacher
  const int* lens;    // (P,) or null
  acc_t* loss;        // forward: (P, n)
  acc_t* lse;         // (P, n): forward writes, backward reads
  const acc_t* w;     // backward: (P, n)
  acc_t* grad;        // backward: (P, n, D) accumulator of the side being computed
  int64_t n, nblocks;
  int D;
  int acc_smem;       // backward: 1 = gradient rows accumulated in shared memory (Smem::acc_bytes(D))
  acc_t beta;
};

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads, 2) contrastive_fwd_kernel(ConParams<scalar_t, acc_t> p) {
  constexpr int BM = Geo<acc_t>::BM, LD = Geo<acc_t>::LD, CPL = BM / 32;
  KDK_DYNAMIC_SMEM(smem_raw, 128);
  Shared<scalar_t, acc_t> sh(smem_raw);
  const int64_t q = blockIdx.x / p.nblocks, o0 = (blockIdx.x % p.nblocks) * BM;
  const int64_t L = p.lens ? static_cast<int64_t>(p.lens[q]) : p.n;
  if (o0 >= L) return;
  const scalar_t* s = p.s + q * p.n * p.D;
  const scalar_t* t = p.t + q * p.n * p.D;
  acc_t* st = sh.so;  // 0 m, 1 sum, 2 diagonal logit
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    st[0 * BM + r] = neg_inf<acc_t>();
    st[1 * BM + r] = acc_t(0);
    st[2 * BM + r] = acc_t(0);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t x0 = 0; x0 < L; x0 += BM) {
    sim_tile<scalar_t, acc_t>(s, t, p.D, o0, x0, L, sh.tA, sh.stage);
    for (int r = warp; r < BM; r += kThreads / 32) {
      if (o0 + r >= L) continue;
      acc_t v[CPL];
      bool ok[CPL];
      acc_t tm = neg_inf<acc_t>();
#pragma unroll
      for (int u = 0; u < CPL; ++u) {
        const int c = lane + 32 * u;
        ok[u] = x0 + c < L;
        v[u] = ok[u] ? p.beta * sh.tA[r * LD + c] : neg_inf<acc_t>();
        tm = kmax(tm, v[u]);
        if (ok[u] && x0 + c == o0 + r) st[2 * BM + r] = v[u];  // one lane, one tile: the positive pair
      }
      const acc_t m = st[0 * BM + r], sum = st[1 * BM + r];
      __syncwarp();
      const acc_t nm = kmax(m, warp_max(tm));
      acc_t e = 0;
#pragma unroll
      for (int u = 0; u < CPL; ++u)
        if (ok[u]) e += kexp(v[u] - nm);
      e = warp_sum(e);
      if (lane == 0) {
        st[0 * BM + r] = nm;
        st[1 * BM + r] = (m == neg_inf<acc_t>() ? acc_t(0) : sum * kexp(m - nm)) + e;
      }
    }
    __syncthreads();
  }
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t i = o0 + r;
    if (i >= L) continue;
    const acc_t lse = st[0 * BM + r] + klog(st[1 * BM + r]);
    p.lse[q * p.n + i] = lse;
    p.loss[q * p.n + i] = lse - st[2 * BM + r];
  }
}

// kTeacherSide = false: rows O are queries, G[r][c] = beta w_r (softmax - [r == c]) of C = S_O T_X^T,
// dS_O += G T_X. true: rows O are keys, the tile is T_O S_X^T (= C^T), G[r][c] = beta w_c (softmax_c - ...),
// dT_O += G S_X.
template <class scalar_t, class acc_t, bool kTeacherSide>
__global__ void __launch_bounds__(kThreads, 2) contrastive_bwd_kernel(ConParams<scalar_t, acc_t> p) {
  constexpr int BM = Geo<acc_t>::BM, LD = Geo<acc_t>::LD;
  KDK_DYNAMIC_SMEM(smem_raw, 128);
  Shared<scalar_t, acc_t> sh(smem_raw);
  const int64_t q = blockIdx.x / p.nblocks, o0 = (blockIdx.x % p.nblocks) * BM;
  const int64_t L = p.lens ? static_cast<int64_t>(p.lens[q]) : p.n;
  if (o0 >= L) return;
  const scalar_t* s = p.s + q * p.n * p.D;
  const scalar_t* t = p.t + q * p.n * p.D;
  const acc_t* lse = p.lse + q * p.n;
  const acc_t* w = p.w + q * p.n;
  acc_t* grad = p.grad + q * p.n * p.D;
  const scalar_t* own = kTeacherSide ? t : s;
  const scalar_t* other = kTeacherSide ? s : t;
  // The query rows' (lse, w): the block's own rows (student side) or the partner rows (teacher side).
  if (!kTeacherSide)
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const bool ok = o0 + r < L;
      sh.so[r] = ok ? lse[o0 + r] : acc_t(0);
      sh.so[BM + r] = ok ? w[o0 + r] : acc_t(0);
    }
  const RowAcc<scalar_t, acc_t> acc(smem_raw, 0, p.acc_smem, grad, o0, p.D);
  for (int64_t x0 = 0; x0 < L; x0 += BM) {
    if (kTeacherSide)
      for (int c = threadIdx.x; c < BM; c += kThreads) {
        const bool ok = x0 + c < L;
        sh.sx[c] = ok ? lse[x0 + c] : acc_t(0);
        sh.sx[BM + c] = ok ? w[x0 + c] : acc_t(0);
      }
    sim_tile<scalar_t, acc_t>(own, other, p.D, o0, x0, L, sh.tA, sh.stage);
    for (int idx = threadIdx.x; idx < BM * BM; idx += kThreads) {
      const int r = idx / BM, c = idx % BM;
      acc_t g = 0;
      if (o0 + r < L && x0 + c < L) {
        const acc_t m = kTeacherSide ? sh.sx[c] : sh.so[r];
        const acc_t wq = kTeacherSide ? sh.sx[BM + c] : sh.so[BM + r];
        g = p.beta * wq * (kexp(p.beta * sh.tA[r * LD + c] - m) - (o0 + r == x0 + c ? acc_t(1) : acc_t(0)));
      }
      sh.tA[r * LD + c] = g;
    }
    __syncthreads();
    accum_tile<scalar_t, acc_t>(sh.tA, other, p.D, o0, x0, L, acc.rows, acc.ld, sh.stage);
  }
  acc.flush(grad, o0, L, p.D);
}

}  // namespace trk
}  // namespace kdk
