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
// Products: bf16 / fp16 similarity tiles on tensor cores (WMMA 16x16x16, float accumulation, sm_80+),
// the gradient products G @ F on tensor cores in TF32 (G stays float: its entries can be far below the
// fp16 range); float32 / float64 inputs (and 16-bit inputs on older GPUs) use a register-tiled FMA loop.
// Token rows past the problem's length (masked tokens sit there, see token_order) read as zeros.
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "common/cuda_utils.cuh"
#include "common/token_relation_math.h"

namespace kdk {
namespace trk {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kKC = 32;        // feature chunk of a similarity product; output chunk of a gradient product

template <class T> struct Is16 {
  static constexpr bool value = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
};

// Tile geometry: BM tokens per side (32 for float64 to keep shared memory in bounds), float tiles with
// a row stride of BM + 4 (a multiple of 4 floats, as WMMA loads and stores need).
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
  static constexpr size_t sim_wmma = 2 * sizeof(scalar_t) * BM * (kKC + 8);
  static constexpr size_t sim_fma = 2 * sizeof(acc_t) * kKC * (BM + 1);
  static constexpr size_t acc_tf32 = 2 * sizeof(float) * BM * (kKC + 4);
  static constexpr size_t acc_fma = sizeof(acc_t) * BM * (kKC + 1);
  static constexpr size_t stage = round128(cmax(cmax(sim_wmma, sim_fma), cmax(acc_tf32, acc_fma)));
  static constexpr size_t total = 2 * tile + 2 * stats + stage;
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
// Copies rows [r0, r0 + BM) x features [k0, k0 + kKC) of X into dst[BM][kKC + 8] (16-bit), zeros outside.
template <class scalar_t>
__device__ __forceinline__ void stage_rows16(const scalar_t* X, int d, int64_t r0, int64_t L, int k0, bool vec,
                                             scalar_t* dst) {
  constexpr int BM = Geo<float>::BM, SK = kKC + 8;
  if (vec) {  // 8 elements (16 bytes) per load: d % 8 == 0 and X 16-byte aligned, so every row is
    for (int idx = threadIdx.x; idx < BM * (kKC / 8); idx += kThreads) {
      const int r = idx / (kKC / 8), kv = (idx % (kKC / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r0 + r < L && k0 + kv < d) v = *reinterpret_cast<const uint4*>(X + (r0 + r) * d + k0 + kv);
      *reinterpret_cast<uint4*>(dst + r * SK + kv) = v;
    }
  } else {
    for (int idx = threadIdx.x; idx < BM * kKC; idx += kThreads) {
      const int r = idx / kKC, k = idx % kKC;
      dst[r * SK + k] = (r0 + r < L && k0 + k < d) ? X[(r0 + r) * d + k0 + k] : scalar_t(0.0f);
    }
  }
}

template <class scalar_t>
__device__ void sim_tile_wmma(const scalar_t* X, const scalar_t* Y, int d, int64_t a0, int64_t b0, int64_t L, float* S,
                              unsigned char* stage) {
  using namespace nvcuda;
  constexpr int BM = Geo<float>::BM, LD = Geo<float>::LD, SK = kKC + 8;
  scalar_t* sx = reinterpret_cast<scalar_t*>(stage);  // [BM][SK]
  scalar_t* sy = sx + BM * SK;
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // this warp's 32 x 32 quarter of the tile
  const bool vec = d % 8 == 0 && aligned16(X) && aligned16(Y);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (int k0 = 0; k0 < d; k0 += kKC) {
    stage_rows16(X, d, a0, L, k0, vec, sx);
    stage_rows16(Y, d, b0, L, k0, vec, sy);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kKC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sx + (wr + 16 * i) * SK + kk, SK);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sy + (wc + 16 * j) * SK + kk, SK);  // (k, c) = Y_c[k]
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(S + (wr + 16 * i) * LD + wc + 16 * j, acc[i][j], LD, wmma::mem_row_major);
  __syncthreads();
}
#endif

template <class scalar_t, class acc_t>
__device__ __forceinline__ void sim_tile(const scalar_t* X, const scalar_t* Y, int d, int64_t a0, int64_t b0, int64_t L,
                                         acc_t* S, unsigned char* stage) {
#if KDK_TENSOR_CORES
  if constexpr (Is16<scalar_t>::value) {
    sim_tile_wmma<scalar_t>(X, Y, d, a0, b0, L, S, stage);
    return;
  }
#endif
  sim_tile_fma<scalar_t, acc_t>(X, Y, d, a0, b0, L, S, stage);
}

// ---------------------------------------------------------------------------------------------
// out[o0 + r][:] += sum_x Gt[r][x] F[x0 + x][:] for the rows o0 + r < L; Gt: BM x BM float tile in shared
// memory (zero wherever o0 + r or x0 + x is past L), F: (n, d) rows, out: (n, d) owned by this block.
// Ends with __syncthreads().
// ---------------------------------------------------------------------------------------------

template <class scalar_t, class acc_t>
__device__ void accum_tile_fma(const acc_t* Gt, const scalar_t* F, int d, int64_t o0, int64_t x0, int64_t L, acc_t* out,
                               unsigned char* stage) {
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
        const int64_t row = o0 + ty + 16 * m;
        const int col = c0 + tx + 8 * n;
        if (row < L && col < d) out[row * d + col] += acc[m][n];
      }
    __syncthreads();
  }
}

#if KDK_TENSOR_CORES
template <class scalar_t>
__device__ void accum_tile_tf32(const float* Gt, const scalar_t* F, int d, int64_t o0, int64_t x0, int64_t L, float* out,
                                unsigned char* stage) {
  using namespace nvcuda;
  constexpr int BM = Geo<float>::BM, LD = Geo<float>::LD, SF = kKC + 4;
  float* sf = reinterpret_cast<float*>(stage);  // [BM][SF]: F chunk
  float* so = sf + BM * SF;                     // [BM][SF]: product chunk
  const int warp = threadIdx.x / 32;            // rows 16 warp .. 16 warp + 15
  for (int c0 = 0; c0 < d; c0 += kKC) {
    for (int idx = threadIdx.x; idx < BM * kKC; idx += kThreads) {
      const int x = idx / kKC, c = idx % kKC;
      sf[x * SF + c] = (x0 + x < L && c0 + c < d) ? to_acc(F[(x0 + x) * d + c0 + c]) : 0.0f;
    }
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
#pragma unroll
    for (int x = 0; x < BM; x += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, Gt + (16 * warp) * LD + x, LD);
#pragma unroll
      for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, sf + x * SF + 16 * j, SF);
#pragma unroll
        for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::store_matrix_sync(so + (16 * warp) * SF + 16 * j, acc[j], SF, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * kKC; idx += kThreads) {
      const int r = idx / kKC, c = idx % kKC;
      if (o0 + r < L && c0 + c < d) out[(o0 + r) * d + c0 + c] += so[r * SF + c];
    }
    __syncthreads();
  }
}
#endif

template <class scalar_t, class acc_t>
__device__ __forceinline__ void accum_tile(const acc_t* Gt, const scalar_t* F, int d, int64_t o0, int64_t x0, int64_t L,
                                           acc_t* out, unsigned char* stage) {
#if KDK_TENSOR_CORES
  if constexpr (Is16<scalar_t>::value) {
    accum_tile_tf32<scalar_t>(Gt, F, d, o0, x0, L, out, stage);
    return;
  }
#endif
  accum_tile_fma<scalar_t, acc_t>(Gt, F, d, o0, x0, L, out, stage);
}

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
  acc_t beta_s, beta_t, inv_h;
};

template <class scalar_t, class acc_t, int kLoss>
__global__ void __launch_bounds__(kThreads) relation_fwd_kernel(RelParams<scalar_t, acc_t> p) {
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
__global__ void __launch_bounds__(kThreads) relation_bwd_kernel(RelParams<scalar_t, acc_t> p) {
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
    accum_tile<scalar_t, acc_t>(sh.tB, ys, p.ds, o0, x0, L, gs, sh.stage);
    if (kTeacher) accum_tile<scalar_t, acc_t>(sh.tA, yt, p.dt, o0, x0, L, gt, sh.stage);
  }
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
  acc_t beta;
};

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads) contrastive_fwd_kernel(ConParams<scalar_t, acc_t> p) {
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
__global__ void __launch_bounds__(kThreads) contrastive_bwd_kernel(ConParams<scalar_t, acc_t> p) {
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
    accum_tile<scalar_t, acc_t>(sh.tA, other, p.D, o0, x0, L, grad, sh.stage);
  }
}

}  // namespace trk
}  // namespace kdk
