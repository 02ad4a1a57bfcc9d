// Torch-free CUDA kernels of attention with its log-sum-exp, shared (EchoAtt) attention and the layer
// similarity. Flash-attention-style tiling on CUDA cores (SIMT, float32 accumulation: no tensor cores):
//
//  forward   one block per (BM query rows, batch*head); K/V tiles of BN keys staged in shared memory; the
//            score tile S = Q K^T and the output O += P V are register-blocked micro-tiles (16 x 16 threads);
//            an online (max, sum) per row, or, for shared attention, the anchor's saved LSE (one pass,
//            P = exp(s - lse), no rescaling).
//  backward  one block per (BN keys, batch*kv_head): loops over the query heads of the group and the query
//            blocks, recomputes P from the LSE, accumulates dK, dV in registers (no atomics) and adds its dQ
//            contribution with float atomics into a float32 (float64) buffer.
//  probs     materialised P = exp(scale S - lse) from a GEMM's S, and the softmax backward of a row.
//  similarity one block per batch*head*(R query rows) group (grid-stride): every layer's probability tile of
//            the same rows, the pair terms summed over key tiles (no T x T map), the per-row similarity.
//
// Shared memory is dynamic; callers opt in above 48 KB (attention_smem_* give the sizes).
#pragma once
#include <cstdint>

#include "common/cuda_utils.cuh"

namespace kdk {

constexpr int kAttnThreads = 256;  // 16 x 16: every kernel below assumes this block size

template <class acc_t, class scalar_t> __device__ __forceinline__ acc_t attn_load(scalar_t x) {
  return static_cast<acc_t>(static_cast<float>(x));
}
template <> __device__ __forceinline__ double attn_load<double, double>(double x) { return x; }

__device__ __forceinline__ float attn_sqrt(float x) { return ::sqrtf(x); }
__device__ __forceinline__ double attn_sqrt(double x) { return ::sqrt(x); }
__device__ __forceinline__ int64_t attn_min(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t attn_clamp(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <class scalar_t, class acc_t> struct AttnParams {
  const scalar_t* q;     // (B, H, Tq, D), strides q_s*
  const scalar_t* k;     // (B, Hk, Tk, D), strides k_s*
  const scalar_t* v;     // (B, Hk, Tk, Dv), strides v_s*
  const scalar_t* dout;  // backward: (B, H, Tq, Dv) contiguous
  const bool* mask;      // (B, H, Tq, Tk), strides m_s*, or null
  const acc_t* lse_in;   // shared forward / backward: (B, H, Tq)
  const acc_t* delta;    // backward: rowsum(dO * O) (B, H, Tq)
  scalar_t* o;           // forward: (B, H, Tq, Dv) contiguous
  acc_t* lse_out;        // attention forward: (B, H, Tq)
  acc_t* dq;             // backward: (B, H, Tq, D) contiguous, zero-initialised (atomics)
  scalar_t* dk;          // backward: (B, Hk, Tk, D) contiguous
  scalar_t* dv;          // backward: (B, Hk, Tk, Dv) contiguous; null in a group backward (no dV)
  acc_t* dk_acc;         // group backward: (B, Hk, Tk, D) float, dK is added here instead of written to dk
  int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  int64_t m_sb, m_sh, m_sq, m_sk;
  int64_t B, H, Hk, Tq, Tk, group, off;
  int64_t v_sl, do_sl;   // group backward: strides between the layers of v and dout (tensor-core kernels)
  int D, Dv, causal, grad_qk;
  int layers;            // group backward: sharing layers whose dP add up (tensor-core kernels); else 1
  acc_t scale;
};

// Tile sizes: float32 accumulation (fp32/fp16/bf16 inputs) and float64.
template <class acc_t> struct AttnFwdTile { static constexpr int BM = 64, BN = 64; };
template <> struct AttnFwdTile<double> { static constexpr int BM = 32, BN = 32; };
template <class acc_t> struct AttnBwdTile { static constexpr int BM = 32, BN = 64; };
template <> struct AttnBwdTile<double> { static constexpr int BM = 16, BN = 32; };

// Dynamic shared memory in bytes.
template <class acc_t> inline size_t attention_smem_fwd(int D, int Dv) {
  constexpr int BM = AttnFwdTile<acc_t>::BM, BN = AttnFwdTile<acc_t>::BN;
  return sizeof(acc_t) * (size_t(BM) * (D + 1) + size_t(BN) * (D + 1) + size_t(BN) * (Dv + 1) +
                          size_t(BM) * (BN + 1) + 3 * size_t(BM));
}
template <class acc_t> inline size_t attention_smem_bwd(int D, int Dv) {
  constexpr int BM = AttnBwdTile<acc_t>::BM, BN = AttnBwdTile<acc_t>::BN;
  return sizeof(acc_t) * (size_t(BN) * (D + 1) + size_t(BN) * (Dv + 1) + size_t(BM) * (D + 1) +
                          size_t(BM) * (Dv + 1) + 2 * size_t(BM) * (BN + 1) + 2 * size_t(BM));
}

// Whether query row gi may attend key gj (gj < Tk): causal (bottom-right aligned) and the mask.
template <class scalar_t, class acc_t>
__device__ __forceinline__ bool attn_visible(const AttnParams<scalar_t, acc_t>& p, const bool* mp, int64_t gi,
                                             int64_t gj) {
  if (p.causal && gj > gi + p.off) return false;
  return mp == nullptr || mp[gi * p.m_sq + gj * p.m_sk];
}

// ---------------------------------------------------------------------------------------------
// Forward. kFromLse: shared attention (P = exp(s - lse_in), one pass); else attention with an
// online softmax, writing the LSE. DVMAX: the largest Dv of this instantiation (64 or 128).
// grid: (ceil(Tq / BM), B * H), block: kAttnThreads.
// ---------------------------------------------------------------------------------------------
template <class scalar_t, class acc_t, int DVMAX, bool kFromLse>
__global__ void __launch_bounds__(kAttnThreads) attention_fwd_kernel(AttnParams<scalar_t, acc_t> p) {
  constexpr int BM = AttnFwdTile<acc_t>::BM, BN = AttnFwdTile<acc_t>::BN;
  constexpr int MI = BM / 16, NJ = BN / 16, VJ = DVMAX / 16;
  constexpr int TPR = kAttnThreads / BM, CPT = BN / TPR;  // threads per row, columns per thread (row update)
  KDK_DYNAMIC_SMEM(kdk_attn_smem, 16);
  const int D = p.D, Dv = p.Dv, ldq = D + 1, ldk = D + 1, ldv = Dv + 1, lds = BN + 1;
  acc_t* Qs = reinterpret_cast<acc_t*>(kdk_attn_smem);
  acc_t* Ks = Qs + BM * ldq;
  acc_t* Vs = Ks + BN * ldk;
  acc_t* Ss = Vs + BN * ldv;
  acc_t* row_m = Ss + BM * lds;  // running max (attention) or the given lse (shared)
  acc_t* row_l = row_m + BM;     // running sum of exp(s - max)
  acc_t* row_a = row_l + BM;     // this tile's rescale factor

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int64_t r0 = int64_t(blockIdx.x) * BM;
  const int rows = static_cast<int>(attn_min(BM, p.Tq - r0));
  const scalar_t* qp = p.q + b * p.q_sb + h * p.q_sh;
  const scalar_t* kp = p.k + b * p.k_sb + hk * p.k_sh;
  const scalar_t* vp = p.v + b * p.v_sb + hk * p.v_sh;
  const bool* mp = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;

  for (int idx = tid; idx < BM * D; idx += kAttnThreads) {  // the query tile, pre-scaled
    const int r = idx / D, c = idx % D;
    Qs[r * ldq + c] = r < rows ? attn_load<acc_t>(qp[(r0 + r) * p.q_st + c]) * p.scale : acc_t(0);
  }
  if (tid < BM) {
    if constexpr (kFromLse) row_m[tid] = tid < rows ? p.lse_in[bh * p.Tq + r0 + tid] : neg_inf<acc_t>();
    else row_m[tid] = neg_inf<acc_t>();
    row_l[tid] = 0;
    row_a[tid] = 1;
  }
  acc_t acc[MI][VJ];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < VJ; ++j) acc[i][j] = 0;

  // Keys past kend are invisible to every row of the block (causal).
  const int64_t kend = p.causal ? attn_clamp(r0 + rows + p.off, 0, p.Tk) : p.Tk;
  for (int64_t n0 = 0; n0 < kend; n0 += BN) {
    __syncthreads();  // the previous tile's readers are done (and the query tile is written)
    for (int idx = tid; idx < BN * D; idx += kAttnThreads) {
      const int j = idx / D, c = idx % D;
      Ks[j * ldk + c] = n0 + j < p.Tk ? attn_load<acc_t>(kp[(n0 + j) * p.k_st + c]) : acc_t(0);
    }
    for (int idx = tid; idx < BN * Dv; idx += kAttnThreads) {
      const int j = idx / Dv, c = idx % Dv;
      Vs[j * ldv + c] = n0 + j < p.Tk ? attn_load<acc_t>(vp[(n0 + j) * p.v_st + c]) : acc_t(0);
    }
    __syncthreads();
    {  // S = (scale Q) K^T, masked entries -inf
      acc_t s[MI][NJ];
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) s[i][j] = 0;
      for (int c = 0; c < D; ++c) {
        acc_t a[MI], kb[NJ];
#pragma unroll
        for (int i = 0; i < MI; ++i) a[i] = Qs[(ty + 16 * i) * ldq + c];
#pragma unroll
        for (int j = 0; j < NJ; ++j) kb[j] = Ks[(tx + 16 * j) * ldk + c];
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
          for (int j = 0; j < NJ; ++j) s[i][j] += a[i] * kb[j];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int r = ty + 16 * i, col = tx + 16 * j;
          const int64_t gj = n0 + col;
          const bool ok = r < rows && gj < p.Tk && attn_visible(p, mp, r0 + r, gj);
          Ss[r * lds + col] = ok ? s[i][j] : neg_inf<acc_t>();
        }
    }
    __syncthreads();
    {  // S -> P in place; per-row statistics (TPR consecutive lanes per row)
      const int r = tid / TPR, part = tid % TPR;
      acc_t* srow = Ss + r * lds + part * CPT;
      if constexpr (kFromLse) {
        const acc_t L = row_m[r];
#pragma unroll
        for (int c = 0; c < CPT; ++c) srow[c] = L == neg_inf<acc_t>() ? acc_t(0) : kexp(srow[c] - L);
      } else {
        acc_t mx = neg_inf<acc_t>();
#pragma unroll
        for (int c = 0; c < CPT; ++c) mx = kmax(mx, srow[c]);
#pragma unroll
        for (int o = TPR / 2; o > 0; o >>= 1) mx = kmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const acc_t m_old = row_m[r], m_new = kmax(m_old, mx);
        acc_t sum = 0;
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const acc_t e = m_new == neg_inf<acc_t>() ? acc_t(0) : kexp(srow[c] - m_new);
          srow[c] = e;
          sum += e;
        }
#pragma unroll
        for (int o = TPR / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        __syncwarp();  // every lane of the row has read row_m before lane 0 rewrites it
        if (part == 0) {
          const acc_t alpha = m_old == neg_inf<acc_t>() ? acc_t(0) : kexp(m_old - m_new);
          row_a[r] = alpha;
          row_l[r] = row_l[r] * alpha + sum;
          row_m[r] = m_new;
        }
      }
    }
    __syncthreads();
    // O = alpha O + P V
    if constexpr (!kFromLse) {
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const acc_t alpha = row_a[ty + 16 * i];
#pragma unroll
        for (int j = 0; j < VJ; ++j) acc[i][j] *= alpha;
      }
    }
    const int nn = static_cast<int>(attn_min(BN, kend - n0));  // columns past it hold P = 0
    for (int n = 0; n < nn; ++n) {
      acc_t pv[MI];
#pragma unroll
      for (int i = 0; i < MI; ++i) pv[i] = Ss[(ty + 16 * i) * lds + n];
#pragma unroll
      for (int j = 0; j < VJ; ++j) {
        const int c = tx + 16 * j < Dv ? tx + 16 * j : Dv - 1;  // columns past Dv: computed, never stored
        const acc_t vv = Vs[n * ldv + c];
#pragma unroll
        for (int i = 0; i < MI; ++i) acc[i][j] += pv[i] * vv;
      }
    }
  }
  __syncthreads();  // the row statistics are final (also when no key tile ran)
#pragma unroll
  for (int i = 0; i < MI; ++i) {
    const int r = ty + 16 * i;
    if (r >= rows) continue;
    acc_t inv = 1;
    if constexpr (!kFromLse) inv = row_l[r] > acc_t(0) ? acc_t(1) / row_l[r] : acc_t(0);
    scalar_t* orow = p.o + (bh * p.Tq + r0 + r) * Dv;
#pragma unroll
    for (int j = 0; j < VJ; ++j) {
      const int c = tx + 16 * j;
      if (c < Dv) orow[c] = static_cast<scalar_t>(acc[i][j] * inv);
    }
  }
  if constexpr (!kFromLse) {
    if (tid < rows) {
      const acc_t l = row_l[tid];
      p.lse_out[bh * p.Tq + r0 + tid] = l > acc_t(0) ? row_m[tid] + klog(l) : neg_inf<acc_t>();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward (attention and shared attention alike: P from the LSE). DMAX: the largest of D and Dv
// of this instantiation (64 or 128). grid: (ceil(Tk / BN), B * Hk), block: kAttnThreads.
// ---------------------------------------------------------------------------------------------
template <class scalar_t, class acc_t, int DMAX>
__global__ void __launch_bounds__(kAttnThreads) attention_bwd_kernel(AttnParams<scalar_t, acc_t> p) {
  constexpr int BM = AttnBwdTile<acc_t>::BM, BN = AttnBwdTile<acc_t>::BN;
  constexpr int MI = BM / 16, NJ = BN / 16, KI = BN / 16, DJ = DMAX / 16;
  KDK_DYNAMIC_SMEM(kdk_attn_smem, 16);
  const int D = p.D, Dv = p.Dv, ldk = D + 1, ldv = Dv + 1, ldq = D + 1, lds = BN + 1;
  acc_t* Ks = reinterpret_cast<acc_t*>(kdk_attn_smem);
  acc_t* Vs = Ks + BN * ldk;
  acc_t* Qs = Vs + BN * ldv;
  acc_t* dOs = Qs + BM * ldq;
  acc_t* Ps = dOs + BM * ldv;
  acc_t* dSs = Ps + BM * lds;
  acc_t* lse_s = dSs + BM * lds;
  acc_t* dl_s = lse_s + BM;

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t bhk = blockIdx.y, b = bhk / p.Hk, hk = bhk % p.Hk;
  const int64_t n0 = int64_t(blockIdx.x) * BN;
  const scalar_t* kp = p.k + b * p.k_sb + hk * p.k_sh;
  const scalar_t* vp = p.v + b * p.v_sb + hk * p.v_sh;
  for (int idx = tid; idx < BN * D; idx += kAttnThreads) {
    const int j = idx / D, c = idx % D;
    Ks[j * ldk + c] = n0 + j < p.Tk ? attn_load<acc_t>(kp[(n0 + j) * p.k_st + c]) : acc_t(0);
  }
  for (int idx = tid; idx < BN * Dv; idx += kAttnThreads) {
    const int j = idx / Dv, c = idx % Dv;
    Vs[j * ldv + c] = n0 + j < p.Tk ? attn_load<acc_t>(vp[(n0 + j) * p.v_st + c]) : acc_t(0);
  }
  acc_t dk_acc[KI][DJ], dv_acc[KI][DJ];
#pragma unroll
  for (int i = 0; i < KI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) dk_acc[i][j] = dv_acc[i][j] = 0;

  // The first query row that sees one of these keys (causal: gi + off >= n0), rounded down to a block.
  int64_t qstart = p.causal ? attn_clamp(n0 - p.off, 0, p.Tq) : 0;
  qstart = (qstart / BM) * BM;
  for (int64_t t = 0; t < p.group; ++t) {
    const int64_t h = hk * p.group + t, bh = b * p.H + h;
    const scalar_t* qp = p.q + b * p.q_sb + h * p.q_sh;
    const scalar_t* dop = p.dout + bh * p.Tq * Dv;
    const bool* mp = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;
    for (int64_t m0 = qstart; m0 < p.Tq; m0 += BM) {
      const int rows = static_cast<int>(attn_min(BM, p.Tq - m0));
      __syncthreads();  // the previous block's readers are done (and K/V are staged, first time)
      for (int idx = tid; idx < BM * D; idx += kAttnThreads) {
        const int r = idx / D, c = idx % D;
        Qs[r * ldq + c] = r < rows ? attn_load<acc_t>(qp[(m0 + r) * p.q_st + c]) : acc_t(0);
      }
      for (int idx = tid; idx < BM * Dv; idx += kAttnThreads) {
        const int r = idx / Dv, c = idx % Dv;
        dOs[r * ldv + c] = r < rows ? attn_load<acc_t>(dop[(m0 + r) * Dv + c]) : acc_t(0);
      }
      if (tid < BM) {
        lse_s[tid] = tid < rows ? p.lse_in[bh * p.Tq + m0 + tid] : neg_inf<acc_t>();
        dl_s[tid] = tid < rows ? p.delta[bh * p.Tq + m0 + tid] : acc_t(0);
      }
      __syncthreads();
      {  // P = exp(scale q k - lse) and dS = P (dO v - delta), both BM x BN
        acc_t s[MI][NJ], dp[MI][NJ];
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
          for (int j = 0; j < NJ; ++j) s[i][j] = dp[i][j] = 0;
        for (int c = 0; c < D; ++c) {
          acc_t a[MI], kb[NJ];
#pragma unroll
          for (int i = 0; i < MI; ++i) a[i] = Qs[(ty + 16 * i) * ldq + c];
#pragma unroll
          for (int j = 0; j < NJ; ++j) kb[j] = Ks[(tx + 16 * j) * ldk + c];
#pragma unroll
          for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NJ; ++j) s[i][j] += a[i] * kb[j];
        }
        for (int c = 0; c < Dv; ++c) {
          acc_t a[MI], vb[NJ];
#pragma unroll
          for (int i = 0; i < MI; ++i) a[i] = dOs[(ty + 16 * i) * ldv + c];
#pragma unroll
          for (int j = 0; j < NJ; ++j) vb[j] = Vs[(tx + 16 * j) * ldv + c];
#pragma unroll
          for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NJ; ++j) dp[i][j] += a[i] * vb[j];
        }
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            const int r = ty + 16 * i, col = tx + 16 * j;
            const int64_t gj = n0 + col;
            const acc_t L = lse_s[r];
            const bool ok = r < rows && gj < p.Tk && L != neg_inf<acc_t>() && attn_visible(p, mp, m0 + r, gj);
            const acc_t P = ok ? kexp(s[i][j] * p.scale - L) : acc_t(0);
            Ps[r * lds + col] = P;
            dSs[r * lds + col] = P * (dp[i][j] - dl_s[r]);
          }
      }
      __syncthreads();
      // dV += P^T dO, dK += dS^T Q (scaled at the end); thread: keys ty + 16 i, columns tx + 16 j
      for (int r = 0; r < rows; ++r) {
        acc_t pr[KI], dsr[KI];
#pragma unroll
        for (int i = 0; i < KI; ++i) {
          pr[i] = Ps[r * lds + ty + 16 * i];
          dsr[i] = dSs[r * lds + ty + 16 * i];
        }
#pragma unroll
        for (int j = 0; j < DJ; ++j) {
          const int cv = tx + 16 * j < Dv ? tx + 16 * j : Dv - 1;
          const acc_t d = dOs[r * ldv + cv];
#pragma unroll
          for (int i = 0; i < KI; ++i) dv_acc[i][j] += pr[i] * d;
        }
        if (p.grad_qk) {
#pragma unroll
          for (int j = 0; j < DJ; ++j) {
            const int cq = tx + 16 * j < D ? tx + 16 * j : D - 1;
            const acc_t qv = Qs[r * ldq + cq];
#pragma unroll
            for (int i = 0; i < KI; ++i) dk_acc[i][j] += dsr[i] * qv;
          }
        }
      }
      if (p.grad_qk) {  // dQ += scale dS K: this key block's share, added atomically
        acc_t dqt[MI][DJ];
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
          for (int j = 0; j < DJ; ++j) dqt[i][j] = 0;
        const int nn = static_cast<int>(attn_min(BN, p.Tk - n0));
        for (int n = 0; n < nn; ++n) {
          acc_t ds[MI];
#pragma unroll
          for (int i = 0; i < MI; ++i) ds[i] = dSs[(ty + 16 * i) * lds + n];
#pragma unroll
          for (int j = 0; j < DJ; ++j) {
            const int c = tx + 16 * j < D ? tx + 16 * j : D - 1;
            const acc_t kv = Ks[n * ldk + c];
#pragma unroll
            for (int i = 0; i < MI; ++i) dqt[i][j] += ds[i] * kv;
          }
        }
#pragma unroll
        for (int i = 0; i < MI; ++i) {
          const int r = ty + 16 * i;
          if (r >= rows) continue;
          acc_t* dqrow = p.dq + (bh * p.Tq + m0 + r) * D;
#pragma unroll
          for (int j = 0; j < DJ; ++j) {
            const int c = tx + 16 * j;
            if (c < D) atomicAdd(dqrow + c, dqt[i][j] * p.scale);
          }
        }
      }
    }
  }
  // This block alone owns these keys' dK, dV.
#pragma unroll
  for (int i = 0; i < KI; ++i) {
    const int64_t gj = n0 + ty + 16 * i;
    if (gj >= p.Tk) continue;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int c = tx + 16 * j;
      if (c < Dv) p.dv[(bhk * p.Tk + gj) * Dv + c] = static_cast<scalar_t>(dv_acc[i][j]);
      if (p.grad_qk && c < D) p.dk[(bhk * p.Tk + gj) * D + c] = static_cast<scalar_t>(dk_acc[i][j] * p.scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Materialised probabilities (shared_attention mode='materialize').
// ---------------------------------------------------------------------------------------------
template <class scalar_t, class acc_t> struct ProbsParams {
  const acc_t* s;     // (B, H, Tq, Tk) contiguous: q k^T (unscaled)
  const acc_t* lse;   // (B, H, Tq)
  const bool* mask;   // strides m_s*, or null
  scalar_t* probs;    // (B, H, Tq, Tk) contiguous
  const scalar_t* g;  // backward: grad of probs (B, H, Tq, Tk) contiguous
  const scalar_t* pr; // backward: probs
  acc_t* ds;          // backward: (B, H, Tq, Tk) contiguous
  int64_t m_sb, m_sh, m_sq, m_sk;
  int64_t H, Tq, Tk, rows, off;
  int causal;
  acc_t scale;
};

// One warp per row of P: probs = visible ? exp(scale s - lse) : 0.
template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kAttnThreads) attention_probs_fwd_kernel(ProbsParams<scalar_t, acc_t> p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = kAttnThreads / 32;
  for (int64_t row = int64_t(blockIdx.x) * nw + warp; row < p.rows; row += int64_t(gridDim.x) * nw) {
    const int64_t bh = row / p.Tq, i = row % p.Tq, b = bh / p.H, h = bh % p.H;
    const acc_t L = p.lse[row];
    const acc_t* srow = p.s + row * p.Tk;
    scalar_t* prow = p.probs + row * p.Tk;
    const bool* mr = p.mask ? p.mask + b * p.m_sb + h * p.m_sh + i * p.m_sq : nullptr;
    for (int64_t j = lane; j < p.Tk; j += 32) {
      const bool ok = L != neg_inf<acc_t>() && !(p.causal && j > i + p.off) && (mr == nullptr || mr[j * p.m_sk]);
      prow[j] = static_cast<scalar_t>(ok ? kexp(srow[j] * p.scale - L) : acc_t(0));
    }
  }
}

// One warp per row: ds = P (G - sum_j G P), the softmax backward.
template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kAttnThreads) attention_probs_bwd_kernel(ProbsParams<scalar_t, acc_t> p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = kAttnThreads / 32;
  for (int64_t row = int64_t(blockIdx.x) * nw + warp; row < p.rows; row += int64_t(gridDim.x) * nw) {
    const scalar_t* g = p.g + row * p.Tk;
    const scalar_t* pr = p.pr + row * p.Tk;
    acc_t d = 0;
    for (int64_t j = lane; j < p.Tk; j += 32) d += attn_load<acc_t>(g[j]) * attn_load<acc_t>(pr[j]);
    d = warp_sum(d);
    acc_t* ds = p.ds + row * p.Tk;
    for (int64_t j = lane; j < p.Tk; j += 32) {
      const acc_t P = attn_load<acc_t>(pr[j]);
      ds[j] = P * (attn_load<acc_t>(g[j]) - d);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Layer similarity. grid-stride over groups of kSimRows query rows of one (batch, head); per group:
// pass 1 every layer's LSE of those rows, pass 2 key tiles of BN: every layer's probability tile, then
// each (row, layer pair) term summed over the tile into the block's workspace (owned per thread, so no
// atomics), and at the end the per-row similarity summed into the block's partial sums.
// ---------------------------------------------------------------------------------------------
constexpr int kSimRows = 4;

template <class scalar_t, class acc_t> struct SimParams {
  const scalar_t* q;  // (L, B, H, Tq, D) contiguous
  const scalar_t* k;  // (L, B, Hk, Tk, D) contiguous
  const bool* mask;   // strides m_s*, or null
  acc_t* work;        // (gridDim.x, kSimRows * npairs): per-row pair terms of the current group
  acc_t* partial;     // (gridDim.x, npairs + 1): sum over valid rows of the similarity, then the row count
  int64_t m_sb, m_sh, m_sq, m_sk;
  int64_t L, B, H, Hk, Tq, Tk, group, off, npairs, ngroups;
  int D, BN, causal, cosine;
  acc_t scale;
};

template <class acc_t> inline size_t attention_smem_sim(int64_t L, int D, int BN) {
  return sizeof(acc_t) * (size_t(kSimRows) * D + size_t(L) * kSimRows + size_t(L) * kSimRows * BN + 33);
}

// Pair index p (lower triangle, row by row) -> (a, b) with b <= a.
__device__ __forceinline__ void sim_pair(int64_t p, int64_t& a, int64_t& b) {
  int64_t x = static_cast<int64_t>((attn_sqrt(8.0 * double(p) + 1.0) - 1.0) * 0.5);
  while (x * (x + 1) / 2 > p) --x;
  while ((x + 1) * (x + 2) / 2 <= p) ++x;
  a = x;
  b = p - x * (x + 1) / 2;
}

// One key's term of the pair (a, b) of a row: u w (cosine), or u log(u / m) + w log(w / m), m = (u + w) / 2
// (2 JSD; 0 log 0 = 0).
template <class acc_t> __device__ __forceinline__ acc_t sim_term(acc_t u, acc_t w, int cosine) {
  if (cosine) return u * w;
  if (!(u + w > acc_t(0))) return acc_t(0);
  const acc_t lm = klog((u + w) * acc_t(0.5));
  return (u > acc_t(0) ? u * (klog(u) - lm) : acc_t(0)) + (w > acc_t(0) ? w * (klog(w) - lm) : acc_t(0));
}

// A row's similarity of the pair pi = (a, b) from its summed terms wr[npairs]: the cosine, or 1 - JSD / ln 2
// clamped to [0, 1].
template <class acc_t>
__device__ __forceinline__ acc_t sim_row(const acc_t* wr, int64_t pi, int64_t a, int64_t c, int cosine) {
  if (cosine) {
    const acc_t na = wr[a * (a + 1) / 2 + a], nb = wr[c * (c + 1) / 2 + c];
    return (na > acc_t(0) && nb > acc_t(0)) ? wr[pi] / attn_sqrt(na * nb) : acc_t(0);
  }
  const acc_t sim = acc_t(1) - acc_t(0.5) * wr[pi] / acc_t(0.69314718055994530942);
  return sim < acc_t(0) ? acc_t(0) : (sim > acc_t(1) ? acc_t(1) : sim);
}

// work[r * np + pair] += the pair's terms over the tile's n keys for every row r < rows: P holds each layer's
// R x BN probability tile ([layer][row][key]); item it is always the same thread's, so no atomics.
template <class acc_t>
__device__ __forceinline__ void sim_tile_terms(const acc_t* P, int R, int BN, int n, int rows, int64_t np,
                                               int cosine, acc_t* work, int tid, int nthreads) {
  for (int64_t it = tid; it < R * np; it += nthreads) {
    const int r = static_cast<int>(it / np);
    if (r >= rows) continue;
    int64_t a, c;
    sim_pair(it % np, a, c);
    const acc_t* pa = P + (a * R + r) * BN;
    const acc_t* pb = P + (c * R + r) * BN;
    acc_t t = 0;
    for (int jj = 0; jj < n; ++jj) t += sim_term(pa[jj], pb[jj], cosine);
    work[it] += t;
  }
}

// After a group's last tile (and a barrier): each pair's similarity summed over the rows whose layer-0 LSE
// (lse0[r]) is finite into partial[pair], and the count of those rows into partial[np].
template <class acc_t>
__device__ __forceinline__ void sim_group_finish(const acc_t* work, const acc_t* lse0, int rows, int64_t np,
                                                 int cosine, acc_t* partial, int tid, int nthreads) {
  for (int64_t pi = tid; pi < np; pi += nthreads) {
    int64_t a, c;
    sim_pair(pi, a, c);
    acc_t total = 0;
    for (int r = 0; r < rows; ++r)  // a row without a visible key in layer 0 has none in any layer
      if (lse0[r] != neg_inf<acc_t>()) total += sim_row(work + int64_t(r) * np, pi, a, c, cosine);
    partial[pi] += total;
  }
  if (tid == 0) {
    int valid = 0;
    for (int r = 0; r < rows; ++r) valid += lse0[r] != neg_inf<acc_t>();
    partial[np] += acc_t(valid);
  }
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kAttnThreads) attention_similarity_kernel(SimParams<scalar_t, acc_t> p) {
  KDK_DYNAMIC_SMEM(kdk_attn_smem, 16);
  constexpr int R = kSimRows;
  const int D = p.D, BN = p.BN, tid = threadIdx.x;
  const int64_t L = p.L, np = p.npairs;
  acc_t* qs = reinterpret_cast<acc_t*>(kdk_attn_smem);  // R x D: one layer's rows, pre-scaled
  acc_t* lse = qs + R * D;                               // L x R
  acc_t* P = lse + L * R;                                // L x R x BN
  acc_t* red = P + L * R * BN;                           // 33
  acc_t* work = p.work + int64_t(blockIdx.x) * R * np;
  acc_t* partial = p.partial + int64_t(blockIdx.x) * (np + 1);
  const int64_t nrg = (p.Tq + R - 1) / R;

  for (int64_t grp = blockIdx.x; grp < p.ngroups; grp += gridDim.x) {
    const int64_t bh = grp / nrg, r0 = (grp % nrg) * R, b = bh / p.H, h = bh % p.H, hk = h / p.group;
    const int rows = static_cast<int>(attn_min(R, p.Tq - r0));
    const int64_t kend = p.causal ? attn_clamp(r0 + rows + p.off, 0, p.Tk) : p.Tk;
    const bool* mp = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;
    for (int64_t it = tid; it < R * np; it += kAttnThreads) work[it] = 0;

    auto stage_q = [&](int64_t l) {  // callers synchronise around it
      const scalar_t* qp = p.q + (((l * p.B + b) * p.H + h) * p.Tq + r0) * D;
      for (int idx = tid; idx < R * D; idx += kAttnThreads)
        qs[idx] = idx / D < rows ? attn_load<acc_t>(qp[idx]) * p.scale : acc_t(0);
    };
    auto score = [&](const scalar_t* kl, int r, int64_t j) {  // -inf where invisible
      const int64_t gi = r0 + r;
      if (r >= rows || (p.causal && j > gi + p.off) || (mp && !mp[gi * p.m_sq + j * p.m_sk])) return neg_inf<acc_t>();
      const scalar_t* kr = kl + j * D;
      acc_t s = 0;
      for (int c = 0; c < D; ++c) s += qs[r * D + c] * attn_load<acc_t>(kr[c]);
      return s;
    };

    // pass 1: LSE of every layer's rows
    for (int64_t l = 0; l < L; ++l) {
      __syncthreads();
      stage_q(l);
      __syncthreads();
      const scalar_t* kl = p.k + ((l * p.B + b) * p.Hk + hk) * p.Tk * D;
      acc_t m[R], s[R];
#pragma unroll
      for (int r = 0; r < R; ++r) { m[r] = neg_inf<acc_t>(); s[r] = 0; }
      for (int64_t j = tid; j < kend; j += kAttnThreads) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const acc_t x = score(kl, r, j);
          if (x == neg_inf<acc_t>()) continue;
          if (x > m[r]) { s[r] = s[r] * (m[r] == neg_inf<acc_t>() ? acc_t(0) : kexp(m[r] - x)) + acc_t(1); m[r] = x; }
          else s[r] += kexp(x - m[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        block_lse_merge(m[r], s[r], red);
        if (tid == 0) lse[l * R + r] = (m[r] == neg_inf<acc_t>() || s[r] <= acc_t(0)) ? neg_inf<acc_t>() : m[r] + klog(s[r]);
      }
    }
    // pass 2: probability tiles and the pair terms
    for (int64_t n0 = 0; n0 < kend; n0 += BN) {
      const int nn = static_cast<int>(attn_min(BN, kend - n0));
      for (int64_t l = 0; l < L; ++l) {
        __syncthreads();
        stage_q(l);
        __syncthreads();
        const scalar_t* kl = p.k + ((l * p.B + b) * p.Hk + hk) * p.Tk * D;
        for (int it = tid; it < R * BN; it += kAttnThreads) {
          const int r = it / BN, jj = it % BN;
          const acc_t Lr = lse[l * R + r];
          acc_t pv = 0;
          if (jj < nn && Lr != neg_inf<acc_t>()) {
            const acc_t x = score(kl, r, n0 + jj);
            pv = x == neg_inf<acc_t>() ? acc_t(0) : kexp(x - Lr);
          }
          P[(l * R + r) * BN + jj] = pv;
        }
      }
      __syncthreads();
      sim_tile_terms(P, R, BN, nn, rows, np, p.cosine, work, tid, kAttnThreads);
    }
    __syncthreads();  // every row's terms are complete (global writes of this block are visible)
    sim_group_finish(work, lse, rows, np, p.cosine, partial, tid, kAttnThreads);
    __syncthreads();  // the workspace is read before the next group clears it
  }
}

}  // namespace kdk
