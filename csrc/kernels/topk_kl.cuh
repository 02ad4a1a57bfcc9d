// Torch-free CUDA kernels of the fused top-k KL: one block per row; forward = one pass over V for the
// row's log-sum-exp, a gather of K logits and the shared epilogue (dense: a second pass summing the terms);
// backward = one pass writing the gradient.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/cuda_utils.cuh"
#include "common/topk_kl_math.h"

namespace kdk {

// index_t: the sparse kernels' id type; teacher_t: the dense kernels' teacher type (the logits' own, or
// acc_t when the teacher came in another dtype: never rounded to the logits' precision).
template <class scalar_t, class acc_t, class index_t, class teacher_t> struct TopkParams {
  using teacher_type = teacher_t;
  const scalar_t* logits;  // (N, V), row stride ld
  const teacher_t* tdense; // dense mode: teacher (N, V), row stride ld_t
  const acc_t* tv;         // sparse modes: teacher values (N, K)
  const index_t* idx;      // sparse modes: teacher ids (N, K)
  const scalar_t* zs;      // backward in place: the logits at the ids (N, K), gathered before the row is overwritten
  const bool* mask;        // (N,) or null
  const acc_t* grad_loss;  // backward: (N,)
  acc_t* loss;             // (N,)
  acc_t* lse;              // (N,)
  acc_t* coef;             // (N, K)
  acc_t* stat;             // (N, kTopkStat): G, student lse low part, dense teacher lse (hi, lo)
  acc_t* workspace;        // (N, 2K) when the epilogue scratch does not fit in shared memory, else null
  scalar_t* grad;          // backward: (N, V) contiguous
  int64_t N, V, ld, ld_t;
  int K, mode, div, logprobs;
  acc_t param, inv_t;
  double logit_scale, softcap;  // the student's final-logit map (LogitMap)
};

// Streams one row, calling f(v, x) for every element; 16-byte loads when the row is aligned.
template <class scalar_t, class F> __device__ __forceinline__ void for_row(const scalar_t* z, int64_t V, F f) {
  constexpr int W = Vec16<scalar_t>::n;
  int64_t start = 0;
  if (aligned16(z)) {
    const int64_t nv = V / W;
    const uint4* zv = reinterpret_cast<const uint4*>(z);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      const uint4 raw = zv[i];
      scalar_t x[W];
      memcpy(x, &raw, 16);
#pragma unroll
      for (int j = 0; j < W; ++j) f(i * W + j, x[j]);
    }
    start = nv * W;
  }
  for (int64_t v = start + threadIdx.x; v < V; v += blockDim.x) f(v, z[v]);
}

// Online (max, sum exp) of x * scale over a row, per thread then over the block; the log-sum-exp as
// hi + lo (common/hd.h, lse_split) so that log-probs (x - hi) - lo are as exact as eager's.
// f maps a raw element to the value whose log-sum-exp is taken (x / T, through the logit map).
template <class T, class acc_t, class F>
__device__ void row_lse(const T* z, int64_t V, F f, acc_t* red, acc_t& hi, acc_t& lo) {
  acc_t m = neg_inf<acc_t>(), s = 0;
  for_row(z, V, [&](int64_t, T raw) {
    const acc_t x = f(static_cast<acc_t>(raw));
    // -inf elements add nothing; skipping them also keeps exp(-inf - -inf) = NaN out of a thread whose
    // first elements are -inf (masked logits, teacher log-probs of masked ids).
    if (x > m) { s = s * kexp(m - x) + acc_t(1); m = x; }  // rare after the first few elements
    else if (x != neg_inf<acc_t>()) s += kexp(x - m);
  });
  block_lse_merge(m, s, red);
  lse_split(m, s, hi, lo);
}

// A masked row: loss, lse, stat and coef 0. Returns whether row n is masked.
template <class P> __device__ bool masked_row(const P& p, int64_t n) {
  if (!p.mask || p.mask[n]) return false;
  for (int k = threadIdx.x; k < p.K; k += blockDim.x) p.coef[n * p.K + k] = 0;
  if (threadIdx.x == 0) {
    p.loss[n] = 0; p.lse[n] = 0;
    for (int j = 0; j < kTopkStat; ++j) p.stat[n * kTopkStat + j] = 0;
  }
  return true;
}

// Sparse modes (renorm, tail, support): the row's lse, a gather of K logits, the shared epilogue.
template <class scalar_t, class acc_t, class index_t>
__global__ void topk_kl_fwd_kernel(TopkParams<scalar_t, acc_t, index_t, scalar_t> p) {
  KDK_DYNAMIC_SMEM(smem_raw, 16);
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);  // 33 for reductions, then the epilogue scratch
  const LogitMap<acc_t> map(p.logit_scale, p.softcap);
  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    if (masked_row(p, n)) continue;
    const scalar_t* z = p.logits + n * p.ld;
    acc_t hi, lo;
    row_lse<scalar_t, acc_t>(z, p.V, [&](acc_t x) { return map(x) * p.inv_t; }, red, hi, lo);
    acc_t* lq = p.workspace ? p.workspace + n * 2 * p.K : red + 33;
    acc_t* tv = lq + p.K;
    for (int k = threadIdx.x; k < p.K; k += blockDim.x) {
      const int64_t id = static_cast<int64_t>(p.idx[n * p.K + k]);
      const bool ok = id >= 0 && id < p.V;  // out-of-range ids are dropped, never read
      lq[k] = ok ? (map(static_cast<acc_t>(z[id])) * p.inv_t - hi) - lo : neg_inf<acc_t>();
      tv[k] = ok ? p.tv[n * p.K + k] : neg_inf<acc_t>();
    }
    __syncthreads();
    BlockReducer<acc_t> r{red};
    acc_t l, G;
    topk_epilogue<acc_t>(r, p.K, p.mode, p.div, p.param, p.inv_t, p.logprobs != 0, lq, tv, p.coef + n * p.K, l, G);
    if (threadIdx.x == 0) {
      acc_t* st = p.stat + n * kTopkStat;
      p.loss[n] = l; p.lse[n] = hi; st[0] = G; st[1] = lo; st[2] = 0; st[3] = 0;
    }
    __syncthreads();  // the scratch is reused by the next row of this block
  }
}

// Dense mode: the student's and the teacher's lse, then one pass over V summing the divergence's terms.
template <class scalar_t, class acc_t, class teacher_t>
__global__ void topk_kl_dense_fwd_kernel(TopkParams<scalar_t, acc_t, int64_t, teacher_t> p) {
  KDK_DYNAMIC_SMEM(smem_raw, 16);
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);  // 33 for reductions (room for 33 doubles)
  const acc_t t_scale = p.logprobs ? acc_t(1) : p.inv_t;
  const LogitMap<acc_t> map(p.logit_scale, p.softcap);
  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    if (masked_row(p, n)) continue;
    const scalar_t* z = p.logits + n * p.ld;
    const teacher_t* y = p.tdense + n * p.ld_t;
    acc_t hi, lo, thi, tlo;
    row_lse<scalar_t, acc_t>(z, p.V, [&](acc_t x) { return map(x) * p.inv_t; }, red, hi, lo);
    row_lse<teacher_t, acc_t>(y, p.V, [&](acc_t x) { return x * t_scale; }, red, thi, tlo);
    // The terms have both signs and their sum can be far smaller than they are: double accumulators
    // (one add per element, nothing next to the exps) keep the loss as exact as eager's pairwise sum.
    double total = 0, H = 0;
    const int64_t V = thi == neg_inf<acc_t>() ? 0 : p.V;  // no teacher mass: loss 0
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      acc_t lq, l, h;
      dense_bucket<acc_t>(p.div, p.param, map(static_cast<acc_t>(z[v])) * p.inv_t,
                          static_cast<acc_t>(y[v]) * t_scale, hi, lo, thi, tlo, lq, l, h);
      total += l;
      H += h;
    }
    double* wide = reinterpret_cast<double*>(smem_raw);
    total = block_reduce<double, false>(total, wide);
    H = block_reduce<double, false>(H, wide);
    if (threadIdx.x == 0) {
      acc_t* st = p.stat + n * kTopkStat;
      p.loss[n] = static_cast<acc_t>(total); p.lse[n] = hi;
      st[0] = static_cast<acc_t>(H); st[1] = lo; st[2] = thi; st[3] = tlo;
    }
  }
}

// Writes out[v] = f(v, z[v]) over a row; 16-byte loads and stores when both rows are aligned.
template <class scalar_t, class F>
__device__ __forceinline__ void map_row(const scalar_t* z, scalar_t* out, int64_t V, F f) {
  constexpr int W = Vec16<scalar_t>::n;
  int64_t start = 0;
  if (aligned16(z) && aligned16(out)) {
    const int64_t nv = V / W;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      const uint4 raw = reinterpret_cast<const uint4*>(z)[i];
      scalar_t x[W], o[W];
      memcpy(x, &raw, 16);
#pragma unroll
      for (int j = 0; j < W; ++j) o[j] = f(i * W + j, x[j]);
      uint4 packed;
      memcpy(&packed, o, 16);
      reinterpret_cast<uint4*>(out)[i] = packed;
    }
    start = nv * W;
  }
  for (int64_t v = start + threadIdx.x; v < V; v += blockDim.x) out[v] = f(v, z[v]);
}

// Sparse modes: grad_v = c (coef_k [v == S_k] - q_v G), q_v = exp(x_v / T - hi) exp(-lo).
template <class scalar_t, class acc_t, class index_t>
__global__ void topk_kl_bwd_kernel(TopkParams<scalar_t, acc_t, index_t, scalar_t> p) {
  const LogitMap<acc_t> map(p.logit_scale, p.softcap);
  // d/dz through the logit map: 1 without one (the branch is uniform over the grid)
  auto chain = [&](acc_t x) { return map.active ? map.deriv(x) : acc_t(1); };
  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const scalar_t* z = p.logits + n * p.ld;
    scalar_t* o = p.grad + n * p.V;
    const acc_t* st = p.stat + n * kTopkStat;
    const acc_t c = p.grad_loss[n] * p.inv_t, G = st[0], hi = p.lse[n], lo = st[1];
    // Masked rows and zero upstream gradients: exactly zero; support mode (G = 0): only S moves.
    if (c == acc_t(0) || G == acc_t(0)) {
      map_row(z, o, p.V, [&](int64_t, scalar_t) { return scalar_t(0); });
      if (c == acc_t(0)) continue;
    } else {
      const acc_t cg = -c * G * kexp(-lo);  // the low part folds into the row's constant
      map_row(z, o, p.V, [&](int64_t, scalar_t raw) {
        const acc_t x = static_cast<acc_t>(raw);
        return static_cast<scalar_t>(cg * kexp(map(x) * p.inv_t - hi) * chain(x));
      });
    }
    __syncthreads();  // the dense part is written; now overwrite the K support entries
    const acc_t* a = p.coef + n * p.K;
    for (int k = threadIdx.x; k < p.K; k += blockDim.x) {
      const int64_t id = static_cast<int64_t>(p.idx[n * p.K + k]);
      if (id < 0 || id >= p.V) continue;  // dropped ids
      const acc_t x = static_cast<acc_t>(p.zs ? p.zs[n * p.K + k] : z[id]);
      const acc_t q = kexp((map(x) * p.inv_t - hi) - lo);
      o[id] = static_cast<scalar_t>(c * (a[k] - q * G) * chain(x));
    }
    __syncthreads();
  }
}

// Dense mode: the gradient recomputed elementwise from both saved log-sum-exps.
template <class scalar_t, class acc_t, class teacher_t>
__global__ void topk_kl_dense_bwd_kernel(TopkParams<scalar_t, acc_t, int64_t, teacher_t> p) {
  const acc_t t_scale = p.logprobs ? acc_t(1) : p.inv_t;
  const LogitMap<acc_t> map(p.logit_scale, p.softcap);
  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const scalar_t* z = p.logits + n * p.ld;
    scalar_t* o = p.grad + n * p.V;
    const acc_t* st = p.stat + n * kTopkStat;
    const acc_t c = p.grad_loss[n] * p.inv_t, G = st[0], hi = p.lse[n], lo = st[1], thi = st[2], tlo = st[3];
    // Masked rows, zero upstream gradients and rows without teacher mass: exactly zero.
    if (c == acc_t(0) || thi == neg_inf<acc_t>()) {
      map_row(z, o, p.V, [&](int64_t, scalar_t) { return scalar_t(0); });
      continue;
    }
    const teacher_t* y = p.tdense + n * p.ld_t;
    map_row(z, o, p.V, [&](int64_t v, scalar_t raw) {
      const acc_t x = static_cast<acc_t>(raw);
      acc_t lq, l, h;
      dense_bucket<acc_t>(p.div, p.param, map(x) * p.inv_t, static_cast<acc_t>(y[v]) * t_scale, hi, lo, thi, tlo,
                          lq, l, h);
      return static_cast<scalar_t>(c * (h - kexp(lq) * G) * (map.active ? map.deriv(x) : acc_t(1)));
    });
  }
}

}  // namespace kdk
