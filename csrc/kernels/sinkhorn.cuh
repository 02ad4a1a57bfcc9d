// Torch-free CUDA kernels of the batched log-domain Sinkhorn and of the SinKD cost.
//
// Solver: one problem per "group" of threads, the whole CTA or (for n, m <= 32) one warp. The group
// keeps Z0 = -C / eps in shared memory while it fits (rows padded to an odd stride, so that walking
// a row or a column is free of bank conflicts), else reads C from global memory (L2) every pass.
// Row steps give a row to a "team" (a warp in a CTA, a lane in warp mode) and reduce across it;
// column steps give a column to a team the same way. The backward replays the unrolled loop in the
// same group from the stored potentials, with dZ next to Z0 (shared memory) or in a global workspace.
// The math is that of csrc/common/sinkhorn_math.h, step for step as the CPU backend.
#pragma once
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/sinkhorn_math.h"

namespace kdk {

template <class scalar_t, class acc_t> struct SinkhornParams {
  const scalar_t* cost;     // (B, n, m) contiguous
  const acc_t* log_a;       // (B, n) or null (= 0)
  const acc_t* log_b;       // (B, m) or null (= 0)
  acc_t* value;             // (B,)
  acc_t* F;                 // (B, L, n)
  acc_t* G;                 // (B, L, m)
  int32_t* iters;           // (B,)
  acc_t* plan;              // (B, n, m) or null
  const acc_t* grad_value;  // backward: (B,)
  const acc_t* grad_plan;   // backward: (B, n, m) or null
  scalar_t* grad_cost;      // backward: (B, n, m)
  acc_t* grad_log_a;        // backward: (B, n) or null
  acc_t* grad_log_b;        // backward: (B, m) or null
  acc_t* workspace;         // global path backward: (gridDim.x, n * m) for dZ
  int64_t B;
  int n, m, L, ld;          // ld: row stride of the matrices held in shared memory
  int grad_mode;
  acc_t eps, inv_eps, tol;
};

// exp that is exactly 0 at -inf: the fast hardware exp for float, exp for double.
__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return ::exp(x); }
template <class T> __device__ __forceinline__ T dexp0(T x) { return is_neg_inf(x) ? T(0) : dexp(x); }

// Shared-memory layout of one group, in acc_t elements (the launcher sizes the block with it).
struct SinkhornSmem {
  int red, v0, v1, v2, v3, v4, v5, z, dz, total;
  __host__ __device__ SinkhornSmem(bool bwd, bool mats, int n, int m, int ld) {
    red = 0;
    v0 = 40;            // fwd: f (n)        bwd: fl (n)
    v1 = v0 + n;        // fwd: fnew (n)     bwd: grad la accumulator (n)
    v2 = v1 + n;        // fwd: g (m)        bwd: gp = g_l - lb (m)
    v3 = v2 + m;        // bwd: gprev (m)
    v4 = v3 + (bwd ? m : 0);  // bwd: cs (m)
    v5 = v4 + (bwd ? m : 0);  // bwd: grad lb accumulator (m)
    z = v5 + (bwd ? m : 0);
    z = (z + 3) & ~3;
    dz = z + (mats ? n * ld : 0);
    total = dz + (mats && bwd ? n * ld : 0);
    total = (total + 3) & ~3;
  }
};

// The threads solving one problem: the CTA, or one warp of it.
template <bool kWarp> struct SkGroup {
  int rank, size;
  __device__ SkGroup() : rank(kWarp ? (threadIdx.x & 31) : threadIdx.x), size(kWarp ? 32 : blockDim.x) {}
  __device__ __forceinline__ void sync() const {
    if (kWarp) __syncwarp(); else __syncthreads();
  }
  template <class T> __device__ __forceinline__ T sum(T v, T* red) const {
    if (kWarp) return warp_sum(v);
    return block_reduce<T, false>(v, red);
  }
};

template <int W, class T> __device__ __forceinline__ T team_sum(T v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <int W, class T> __device__ __forceinline__ T team_max(T v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = kmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Z0 of one problem: from shared memory (kSmem) or computed from the cost in global memory.
template <class scalar_t, class acc_t, bool kSmem> struct ZView {
  const acc_t* zs;
  const scalar_t* c;
  int ld, m;
  acc_t inv_eps;
  __device__ __forceinline__ acc_t operator()(int i, int j) const {
    if (kSmem) return zs[i * ld + j];
    return -static_cast<acc_t>(c[int64_t(i) * m + j]) * inv_eps;
  }
};

// out_i = l_i - lse_j(z(i, j) + v_j) over the rows (or, with kCols, out_j = l_j - lse_i(z(i, j) + v_i)
// over the columns); a team of W threads per line. Absent lines (l = -inf) give -inf.
template <int W, bool kCols, class acc_t, class Z>
__device__ void lse_step(int rank, int size, int n, int m, const Z& z, const acc_t* l, const acc_t* v, acc_t* out) {
  const int team = rank / W, lane = rank % W, nteams = size / W;
  const int lines = kCols ? m : n, len = kCols ? n : m;
  for (int r = team; r < lines; r += nteams) {
    const acc_t lr = l ? l[r] : acc_t(0);
    if (is_neg_inf(lr)) {
      if (lane == 0) out[r] = lr;
      continue;
    }
    acc_t mx = neg_inf<acc_t>();
    for (int k = lane; k < len; k += W) mx = kmax(mx, (kCols ? z(k, r) : z(r, k)) + v[k]);
    mx = team_max<W>(mx);
    acc_t s = 0;
    if (!is_neg_inf(mx))
      for (int k = lane; k < len; k += W) s += dexp((kCols ? z(k, r) : z(r, k)) + v[k] - mx);
    s = team_sum<W>(s);
    if (lane == 0) out[r] = lr - lse_finish(mx, s);
  }
}

// Block sizes the launchers use (csrc/cuda/sinkhorn.cu); the kernels are compiled for at most this many.
constexpr int kSinkhornMaxThreads = 512;

template <class scalar_t, class acc_t, bool kWarp, bool kSmem>
__global__ void __launch_bounds__(kSinkhornMaxThreads) sinkhorn_fwd_kernel(SinkhornParams<scalar_t, acc_t> p) {
  KDK_DYNAMIC_SMEM(smem_raw, 16);
  constexpr int RW = kWarp ? 1 : 32;             // row team width
  constexpr int CW = (kWarp || !kSmem) ? 1 : 32;  // column team width (global: a thread per column, coalesced)
  const SkGroup<kWarp> grp;
  const int n = p.n, m = p.m, L = p.L;
  const int groups = kWarp ? blockDim.x / 32 : 1, gid = kWarp ? threadIdx.x / 32 : 0;
  const SinkhornSmem lay(false, kSmem, n, m, p.ld);
  acc_t* base = reinterpret_cast<acc_t*>(smem_raw) + size_t(gid) * lay.total;
  acc_t* red = base + lay.red;
  acc_t* f = base + lay.v0;
  acc_t* fnew = base + lay.v1;
  acc_t* g = base + lay.v2;
  acc_t* zs = base + lay.z;
  for (int64_t b = int64_t(blockIdx.x) * groups + gid; b < p.B; b += int64_t(gridDim.x) * groups) {
    const scalar_t* C = p.cost + b * n * m;
    const acc_t* la = p.log_a ? p.log_a + b * n : nullptr;
    const acc_t* lb = p.log_b ? p.log_b + b * m : nullptr;
    acc_t* Fb = p.F + b * L * n;
    acc_t* Gb = p.G + b * L * m;
    acc_t* Pb = p.plan ? p.plan + b * n * m : nullptr;
    // present points on each side; an empty problem has value 0
    acc_t cnt_a = 0, cnt_b = 0;
    for (int i = grp.rank; i < n; i += grp.size) cnt_a += (la && is_neg_inf(la[i])) ? acc_t(0) : acc_t(1);
    for (int j = grp.rank; j < m; j += grp.size) cnt_b += (lb && is_neg_inf(lb[j])) ? acc_t(0) : acc_t(1);
    cnt_a = grp.sum(cnt_a, red);
    cnt_b = grp.sum(cnt_b, red);
    if (cnt_a == acc_t(0) || cnt_b == acc_t(0)) {
      for (int64_t k = grp.rank; k < int64_t(L) * n; k += grp.size) Fb[k] = 0;
      for (int64_t k = grp.rank; k < int64_t(L) * m; k += grp.size) Gb[k] = 0;
      if (Pb) for (int64_t k = grp.rank; k < int64_t(n) * m; k += grp.size) Pb[k] = 0;
      if (grp.rank == 0) { p.value[b] = 0; p.iters[b] = 0; }
      grp.sync();
      continue;
    }
    if (kSmem) {
      for (int k = grp.rank; k < n * m; k += grp.size) {
        const int i = k / m, j = k - i * m;
        zs[i * p.ld + j] = -static_cast<acc_t>(C[k]) * p.inv_eps;
      }
    }
    for (int j = grp.rank; j < m; j += grp.size) g[j] = (lb && is_neg_inf(lb[j])) ? neg_inf<acc_t>() : acc_t(0);
    grp.sync();
    const ZView<scalar_t, acc_t, kSmem> z{zs, C, p.ld, m, p.inv_eps};
    acc_t* fc = f;   // current f
    acc_t* fn = fnew;
    lse_step<RW, false>(grp.rank, grp.size, n, m, z, la, g, fc);
    grp.sync();
    lse_step<CW, true>(grp.rank, grp.size, n, m, z, lb, fc, g);
    grp.sync();
    for (int i = grp.rank; i < n; i += grp.size) Fb[i] = fc[i];
    for (int j = grp.rank; j < m; j += grp.size) Gb[j] = g[j];
    int l = 1;
    for (; l < L; ++l) {
      lse_step<RW, false>(grp.rank, grp.size, n, m, z, la, g, fn);
      grp.sync();
      if (p.tol > acc_t(0)) {
        acc_t e = 0;
        for (int i = grp.rank; i < n; i += grp.size) e += row_error(la ? la[i] : acc_t(0), fc[i], fn[i]);
        e = grp.sum(e, red);  // the same value in every thread: the group stops together
        if (e <= p.tol) break;
      }
      acc_t* t = fc; fc = fn; fn = t;
      lse_step<CW, true>(grp.rank, grp.size, n, m, z, lb, fc, g);
      grp.sync();
      for (int i = grp.rank; i < n; i += grp.size) Fb[int64_t(l) * n + i] = fc[i];
      for (int j = grp.rank; j < m; j += grp.size) Gb[int64_t(l) * m + j] = g[j];
    }
    for (int64_t k = int64_t(l) * n + grp.rank; k < int64_t(L) * n; k += grp.size) Fb[k] = 0;
    for (int64_t k = int64_t(l) * m + grp.rank; k < int64_t(L) * m; k += grp.size) Gb[k] = 0;
    // value = sum P C (P = 0 at absent points and forbidden pairs)
    acc_t s = 0;
    for (int k = grp.rank; k < n * m; k += grp.size) {
      const int i = k / m, j = k - i * m;
      const acc_t pij = dexp0(z(i, j) + fc[i] + g[j]);
      if (Pb) Pb[k] = pij;
      if (pij != acc_t(0)) s += pij * static_cast<acc_t>(C[k]);
    }
    s = grp.sum(s, red);
    if (grp.rank == 0) { p.value[b] = s; p.iters[b] = l; }
    grp.sync();  // shared memory is reused by the next problem
  }
}

template <class scalar_t, class acc_t, bool kWarp, bool kSmem>
__global__ void __launch_bounds__(kSinkhornMaxThreads) sinkhorn_bwd_kernel(SinkhornParams<scalar_t, acc_t> p) {
  KDK_DYNAMIC_SMEM(smem_raw, 16);
  constexpr int RW = kWarp ? 1 : 32;
  constexpr int CW = (kWarp || !kSmem) ? 1 : 32;
  const SkGroup<kWarp> grp;
  const int n = p.n, m = p.m, L = p.L;
  const int groups = kWarp ? blockDim.x / 32 : 1, gid = kWarp ? threadIdx.x / 32 : 0;
  const SinkhornSmem lay(true, kSmem, n, m, p.ld);
  acc_t* base = reinterpret_cast<acc_t*>(smem_raw) + size_t(gid) * lay.total;
  acc_t* red = base + lay.red;
  acc_t* fl = base + lay.v0;
  acc_t* acc_a = base + lay.v1;
  acc_t* gp = base + lay.v2;
  acc_t* gprev = base + lay.v3;
  acc_t* cs = base + lay.v4;
  acc_t* acc_b = base + lay.v5;
  acc_t* zs = base + lay.z;
  const int ldd = kSmem ? p.ld : m;  // row stride of dZ
  const bool unrolled = p.grad_mode == kGradUnrolled;
  for (int64_t b = int64_t(blockIdx.x) * groups + gid; b < p.B; b += int64_t(gridDim.x) * groups) {
    const scalar_t* C = p.cost + b * n * m;
    const acc_t* la = p.log_a ? p.log_a + b * n : nullptr;
    const acc_t* lb = p.log_b ? p.log_b + b * m : nullptr;
    const acc_t* Fb = p.F + b * L * n;
    const acc_t* Gb = p.G + b * L * m;
    scalar_t* out = p.grad_cost + b * n * m;
    acc_t* dla = p.grad_log_a ? p.grad_log_a + b * n : nullptr;
    acc_t* dlb = p.grad_log_b ? p.grad_log_b + b * m : nullptr;
    acc_t* dz = kSmem ? base + lay.dz : p.workspace + int64_t(blockIdx.x) * n * m;
    const int T = p.iters[b];
    const acc_t gout = p.grad_value[b];
    const acc_t* gpl = p.grad_plan ? p.grad_plan + b * n * m : nullptr;
    for (int i = grp.rank; i < n; i += grp.size) acc_a[i] = 0;
    for (int j = grp.rank; j < m; j += grp.size) acc_b[j] = 0;
    if (T <= 0 || (gout == acc_t(0) && !gpl)) {  // empty problem, or nothing flows back
      for (int k = grp.rank; k < n * m; k += grp.size) out[k] = scalar_t(0);
      if (dla) for (int i = grp.rank; i < n; i += grp.size) dla[i] = 0;
      if (dlb) for (int j = grp.rank; j < m; j += grp.size) dlb[j] = 0;
      grp.sync();
      continue;
    }
    if (kSmem) {
      for (int k = grp.rank; k < n * m; k += grp.size) {
        const int i = k / m, j = k - i * m;
        zs[i * p.ld + j] = -static_cast<acc_t>(C[k]) * p.inv_eps;
      }
    }
    const acc_t* fL = Fb + int64_t(T - 1) * n;
    const acc_t* gL = Gb + int64_t(T - 1) * m;
    for (int i = grp.rank; i < n; i += grp.size) fl[i] = fL[i];
    for (int j = grp.rank; j < m; j += grp.size) gp[j] = gL[j];
    grp.sync();
    const ZView<scalar_t, acc_t, kSmem> z{zs, C, p.ld, m, p.inv_eps};
    if (!unrolled) {  // envelope: dC = gout P
      for (int k = grp.rank; k < n * m; k += grp.size) {
        const int i = k / m, j = k - i * m;
        out[k] = static_cast<scalar_t>(gout * dexp0(z(i, j) + fl[i] + gp[j]));
      }
      grp.sync();
      continue;
    }
    // seed: dZ_L = (gout C + gplan) P
    for (int k = grp.rank; k < n * m; k += grp.size) {
      const int i = k / m, j = k - i * m;
      const acc_t pij = dexp0(z(i, j) + fl[i] + gp[j]);
      acc_t d = 0;
      if (pij != acc_t(0)) d = gout * pij * static_cast<acc_t>(C[k]) + (gpl ? gpl[k] * pij : acc_t(0));
      dz[i * ldd + j] = d;
    }
    grp.sync();
    for (int l = T; l >= 1; --l) {
      const acc_t* fsrc = Fb + int64_t(l - 1) * n;
      const acc_t* gsrc = Gb + int64_t(l - 1) * m;
      for (int i = grp.rank; i < n; i += grp.size) fl[i] = fsrc[i];
      for (int j = grp.rank; j < m; j += grp.size) {
        const acc_t lbj = lb ? lb[j] : acc_t(0);
        const bool off = is_neg_inf(lbj);
        gp[j] = off ? neg_inf<acc_t>() : gsrc[j] - lbj;
        gprev[j] = l > 1 ? Gb[int64_t(l - 2) * m + j] : (off ? neg_inf<acc_t>() : acc_t(0));
      }
      // cs = colsum(dZ), a team per column
      {
        const int team = grp.rank / CW, lane = grp.rank % CW, nteams = grp.size / CW;
        for (int j = team; j < m; j += nteams) {
          acc_t s = 0;
          for (int i = lane; i < n; i += CW) s += dz[i * ldd + j];
          s = team_sum<CW>(s);
          if (lane == 0) { cs[j] = s; acc_b[j] += s; }
        }
      }
      grp.sync();
      // dA = dZ - exp(Z_l - lb) cs; rs = rowsum(dA); dZ = dA - exp(A_l - la) rs, a team per row
      {
        const int team = grp.rank / RW, lane = grp.rank % RW, nteams = grp.size / RW;
        for (int i = team; i < n; i += nteams) {
          const acc_t lai = la ? la[i] : acc_t(0);
          if (is_neg_inf(lai)) continue;  // an absent row keeps dZ = 0
          acc_t* d = dz + i * ldd;
          const acc_t fi = fl[i], fpi = fl[i] - lai;
          acc_t rs = 0;
          for (int j = lane; j < m; j += RW) {
            const acc_t v = d[j] - dexp0(z(i, j) + fi + gp[j]) * cs[j];
            d[j] = v;
            rs += v;
          }
          rs = team_sum<RW>(rs);
          for (int j = lane; j < m; j += RW) d[j] -= dexp0(z(i, j) + fpi + gprev[j]) * rs;
          if (lane == 0) acc_a[i] += rs;
        }
      }
      grp.sync();
    }
    // dC = gout P - dZ0 / eps, 0 at forbidden pairs
    for (int i = grp.rank; i < n; i += grp.size) fl[i] = fL[i];
    for (int j = grp.rank; j < m; j += grp.size) gp[j] = gL[j];
    grp.sync();
    for (int k = grp.rank; k < n * m; k += grp.size) {
      const int i = k / m, j = k - i * m;
      const acc_t zij = z(i, j);
      const acc_t v = gout * dexp0(zij + fl[i] + gp[j]) - dz[i * ldd + j] * p.inv_eps;
      out[k] = static_cast<scalar_t>(is_neg_inf(zij) ? acc_t(0) : v);
    }
    if (dla) for (int i = grp.rank; i < n; i += grp.size) dla[i] = acc_a[i];
    if (dlb) for (int j = grp.rank; j < m; j += grp.size) dlb[j] = acc_b[j];
    grp.sync();
  }
}

// ------------------------------------------------------------------------------------------------
// SinKD cost
// ------------------------------------------------------------------------------------------------

template <class scalar_t, class acc_t> struct SinkCostParams {
  const scalar_t* student;  // (B, n, C)
  const void* teacher;      // (B, m, C), scalar_t or acc_t (teacher_is_acc)
  acc_t* ps;                // (B, n, C) softmax workspace
  acc_t* pt;                // (B, m, C)
  acc_t* cost;              // forward: (B, n, m)
  const acc_t* grad_cost;   // backward: (B, n, m)
  acc_t* dp;                // backward: (B, n, C) workspace
  scalar_t* grad;           // backward: (B, n, C)
  int64_t B;
  int n, m, C, kind, teacher_is_acc;
  acc_t inv_t;
};

// Softmax at temperature of R rows of length C, a warp per row.
template <class in_t, class acc_t>
__global__ void __launch_bounds__(256) sinkhorn_softmax_kernel(const in_t* x, int64_t R, int C, acc_t inv_t, acc_t* out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < R; r += warps) {
    const in_t* xr = x + r * C;
    acc_t mx = neg_inf<acc_t>(), s = 0;
    for (int c = lane; c < C; c += 32) {
      const acc_t v = static_cast<acc_t>(xr[c]) * inv_t;
      // -inf adds nothing, and exp(-inf - -inf) would make the row NaN when a lane starts with it.
      if (v > mx) { s = s * kexp(mx - v) + acc_t(1); mx = v; } else if (!is_neg_inf(v)) s += kexp(v - mx);
    }
    const acc_t M = warp_max(mx);
    s = warp_sum(is_neg_inf(mx) ? acc_t(0) : s * kexp(mx - M));
    const acc_t lse = M + klog(s);
    for (int c = lane; c < C; c += 32) out[r * C + c] = kexp(static_cast<acc_t>(xr[c]) * inv_t - lse);
  }
}

constexpr int kCostTile = 16, kCostChunk = 32;

// cost[b, i, j] = sum_c term(ps[b, i, c] - pt[b, j, c]); a 16 x 16 tile of (i, j) per block of 256
// threads, the classes streamed through shared memory in chunks of 32.
template <class acc_t>
__global__ void __launch_bounds__(kCostTile * kCostTile) sinkhorn_pair_cost_kernel(const acc_t* ps, const acc_t* pt, int64_t B, int n, int m, int C, int kind,
                                          acc_t* cost) {
  KDK_STATIC_SMEM(acc_t, sp, [kCostTile][kCostChunk + 1]);
  KDK_STATIC_SMEM(acc_t, sq, [kCostTile][kCostChunk + 1]);
  const int tn = (n + kCostTile - 1) / kCostTile, tm = (m + kCostTile - 1) / kCostTile;
  const int tx = threadIdx.x % kCostTile, ty = threadIdx.x / kCostTile;
  for (int64_t blk = blockIdx.x; blk < B * tn * tm; blk += gridDim.x) {
    const int64_t b = blk / (int64_t(tn) * tm);
    const int rem = int(blk - b * tn * tm);
    const int i0 = (rem / tm) * kCostTile, j0 = (rem % tm) * kCostTile;
    acc_t s = 0;
    for (int c0 = 0; c0 < C; c0 += kCostChunk) {
      for (int k = threadIdx.x; k < kCostTile * kCostChunk; k += blockDim.x) {
        const int r = k / kCostChunk, c = k % kCostChunk;
        sp[r][c] = (i0 + r < n && c0 + c < C) ? ps[(b * n + i0 + r) * C + c0 + c] : acc_t(0);
        sq[r][c] = (j0 + r < m && c0 + c < C) ? pt[(b * m + j0 + r) * C + c0 + c] : acc_t(0);
      }
      __syncthreads();
      const int cn = min(kCostChunk, C - c0);
      for (int c = 0; c < cn; ++c) s += cost_term(kind, sp[ty][c] - sq[tx][c]);
      __syncthreads();
    }
    if (i0 + ty < n && j0 + tx < m) cost[(b * n + i0 + ty) * m + j0 + tx] = s;
  }
}

// dp[b, i, c] = sum_j w[b, i, j] term'(ps[b, i, c] - pt[b, j, c]); a tile of 16 rows x 32 classes
// per block of 512 threads (x: class, y: row), the teacher rows streamed in chunks of 16.
template <class acc_t>
__global__ void __launch_bounds__(kCostTile * kCostChunk) sinkhorn_pair_cost_bwd_kernel(const acc_t* ps, const acc_t* pt, const acc_t* w, int64_t B, int n,
                                              int m, int C, int kind, acc_t* dp) {
  KDK_STATIC_SMEM(acc_t, sw, [kCostTile][kCostTile + 1]);
  KDK_STATIC_SMEM(acc_t, sq, [kCostTile][kCostChunk + 1]);
  const int tn = (n + kCostTile - 1) / kCostTile, tc = (C + kCostChunk - 1) / kCostChunk;
  const int cx = threadIdx.x, ry = threadIdx.y, tid = ry * blockDim.x + cx, nth = blockDim.x * blockDim.y;
  for (int64_t blk = blockIdx.x; blk < B * tn * tc; blk += gridDim.x) {
    const int64_t b = blk / (int64_t(tn) * tc);
    const int rem = int(blk - b * tn * tc);
    const int i0 = (rem / tc) * kCostTile, c0 = (rem % tc) * kCostChunk;
    const int i = i0 + ry, c = c0 + cx;
    const acc_t pic = (i < n && c < C) ? ps[(b * n + i) * C + c] : acc_t(0);
    acc_t acc = 0;
    for (int j0 = 0; j0 < m; j0 += kCostTile) {
      for (int k = tid; k < kCostTile * kCostTile; k += nth) {
        const int r = k / kCostTile, jj = k % kCostTile;
        sw[r][jj] = (i0 + r < n && j0 + jj < m) ? w[(b * n + i0 + r) * m + j0 + jj] : acc_t(0);
      }
      for (int k = tid; k < kCostTile * kCostChunk; k += nth) {
        const int r = k / kCostChunk, cc = k % kCostChunk;
        sq[r][cc] = (j0 + r < m && c0 + cc < C) ? pt[(b * m + j0 + r) * C + c0 + cc] : acc_t(0);
      }
      __syncthreads();
      const int jn = min(kCostTile, m - j0);
      for (int jj = 0; jj < jn; ++jj) acc += sw[ry][jj] * cost_term_grad(kind, pic - sq[jj][cx]);
      __syncthreads();
    }
    if (i < n && c < C) dp[(b * n + i) * C + c] = acc;
  }
}

// grad[r, c] = inv_t p (dp - <dp, p>) over R rows, a warp per row.
template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(256) sinkhorn_softmax_bwd_kernel(const acc_t* p, const acc_t* dp, int64_t R, int C, acc_t inv_t,
                                            scalar_t* grad) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < R; r += warps) {
    acc_t dot = 0;
    for (int c = lane; c < C; c += 32) dot += dp[r * C + c] * p[r * C + c];
    dot = warp_sum(dot);
    for (int c = lane; c < C; c += 32)
      grad[r * C + c] = static_cast<scalar_t>(inv_t * p[r * C + c] * (dp[r * C + c] - dot));
  }
}

}  // namespace kdk
