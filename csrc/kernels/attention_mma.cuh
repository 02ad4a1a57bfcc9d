// FlashAttention-2-style forward on tensor cores for float16 / bfloat16, head_dim D = Dv in {64, 96, 128}:
// attention with its log-sum-exp, and shared (EchoAtt) attention from the anchor's LSE (kFromLse).
//
// One block of 4 warps per (64 query rows, batch*head); each warp owns 16 query rows end to end, so the
// online softmax lives in registers (no shared-memory row statistics, no block barrier per row update).
// K and V tiles of 64 keys are double-buffered in shared memory with cp.async (tile n+1 lands while tile n
// is multiplied); rows are padded to D + 8 elements, which makes every ldmatrix phase (8 rows at one column)
// hit 8 different bank groups for D = 64, 96 and 128 alike. S = Q K^T and O += P V are mma.sync m16n8k16
// with float32 accumulation; P is rounded to the input dtype for the second product, as FlashAttention does.
// The register layouts are those of common/tile_mma.cuh: S's accumulator fragment (rows g, g+8; columns
// 2t, 2t+1 of each 8-key tile) is exactly the A fragment P needs, so P never leaves the registers.
#pragma once
#include <cstdint>

#include "common/tile_mma.cuh"
#include "kernels/attention.cuh"

namespace kdk {

constexpr int kAttnMmaThreads = 128;  // 4 warps x 16 query rows
constexpr int kAttnMmaBM = 64, kAttnMmaBN = 64;

// kRows rows x D 16-bit values from src (row stride st, rows row0 ..) into dst (rows of D + 8) by cp.async, every
// thread of the block a share; rows at or past `valid` are zero-filled. The caller commits the group.
template <int D, int kRows = 64, class scalar_t>
__device__ __forceinline__ void attn_mma_load(uint16_t* dst, const scalar_t* src, int64_t st, int64_t row0,
                                              int64_t valid, int tid) {
  constexpr int CH = D / 8, LD = D + 8;
  for (int idx = tid; idx < kRows * CH; idx += kAttnMmaThreads) {
    const int r = idx / CH, c = idx % CH;
    const bool ok = row0 + r < valid;
    tile::cp_async16(dst + r * LD + c * 8, src + (ok ? row0 + r : 0) * st + c * 8, ok);
  }
}

// The A fragment of this warp's 16 rows (query or dO rows, from Aw, rows of LD) at head columns kk*16 .. +15.
__device__ __forceinline__ void attn_a_frag(uint32_t (&a)[4], const uint16_t* Aw, int LD, int kk, int lane) {
  tile::ldmatrix<4>(a, Aw + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LD + kk * 16 + 8 * (lane >> 4));
}

// S[j] += A B_j^T over NT 8-key tiles at head columns kk*16 .. +15 (S = Q K^T, dP = dO V^T): the key rows
// [key][d] of K or V (rows of LD) are the col-major B, two key tiles per ldmatrix.x4.
template <bool kBF16, int NT>
__device__ __forceinline__ void attn_abt_step(float (&s)[NT][4], const uint32_t (&a)[4], const uint16_t* Ks, int LD,
                                             int kk, int lane) {
  for (int j = 0; j < NT; j += 2) {
    uint32_t f[4];
    tile::ldmatrix<4>(f, Ks + (8 * j + (lane & 7) + 8 * (lane >> 4)) * LD + kk * 16 + 8 * ((lane >> 3) & 1));
    const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
    tile::mma16816<kBF16>(s[j], a, b0, s[j]);
    tile::mma16816<kBF16>(s[j + 1], a, b1, s[j + 1]);
  }
}

// S = Q K^T for this warp's 16 query rows (Qw) against NT 8-key tiles (Ks), over KS 16-column steps of the head.
template <bool kBF16, int NT, int KS>
__device__ __forceinline__ void attn_qk(float (&s)[NT][4], const uint16_t* Qw, const uint16_t* Ks, int LD, int lane) {
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < 4; ++i) s[j][i] = 0.f;
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[4];
    attn_a_frag(a, Qw, LD, kk, lane);
    attn_abt_step<kBF16, NT>(s, a, Ks, LD, kk, lane);
  }
}

// Dynamic shared memory: the query tile and two stages of K and V, rows of D + 8 16-bit values.
inline size_t attention_mma_smem(int D) { return sizeof(uint16_t) * size_t(kAttnMmaBM + 4 * kAttnMmaBN) * (D + 8); }

// grid: (ceil(Tq / 64), B * H), block: kAttnMmaThreads. p.D == p.Dv == D; q/k/v rows 16-byte aligned.
template <class scalar_t, bool kBF16, int D, bool kFromLse>
__global__ void __launch_bounds__(kAttnMmaThreads) attention_fwd_mma_kernel(AttnParams<scalar_t, float> p) {
#if KDK_TENSOR_CORES
  constexpr int BM = kAttnMmaBM, BN = kAttnMmaBN, LD = D + 8, KS = D / 16, NT = BN / 8, DT = D / 8;
  KDK_DYNAMIC_SMEM(kdk_attn_mma_smem, 16);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(kdk_attn_mma_smem);
  uint16_t* Ks = Qs + BM * LD;      // two stages of BN rows
  uint16_t* Vs = Ks + 2 * BN * LD;  // two stages of BN rows

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int64_t r0 = int64_t(blockIdx.x) * BM;
  const int rows = static_cast<int>(attn_min(BM, p.Tq - r0));
  const scalar_t* qp = p.q + b * p.q_sb + h * p.q_sh;
  const scalar_t* kp = p.k + b * p.k_sb + hk * p.k_sh;
  const scalar_t* vp = p.v + b * p.v_sb + hk * p.v_sh;
  const bool* mp = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;
  const int64_t kend = p.causal ? attn_clamp(r0 + rows + p.off, 0, p.Tk) : p.Tk;  // later keys: invisible
  const int ntiles = static_cast<int>((kend + BN - 1) / BN);

  attn_mma_load<D>(Qs, qp, p.q_st, r0, p.Tq, tid);
  if (ntiles > 0) {
    attn_mma_load<D>(Ks, kp, p.k_st, 0, p.Tk, tid);
    attn_mma_load<D>(Vs, vp, p.v_st, 0, p.Tk, tid);
  }
  tile::cp_async_commit();

  // This thread's two rows (g and g + 8 of the warp's 16) and their running statistics.
  const int lrow[2] = {warp * 16 + g, warp * 16 + g + 8};
  float m_run[2], l_run[2] = {0.f, 0.f};
  for (int r = 0; r < 2; ++r) {
    const bool in = lrow[r] < rows;
    if constexpr (kFromLse) m_run[r] = in ? static_cast<float>(p.lse_in[bh * p.Tq + r0 + lrow[r]]) : neg_inf<float>();
    else m_run[r] = neg_inf<float>();
  }
  float o[DT][4];
  for (int j = 0; j < DT; ++j)
    for (int i = 0; i < 4; ++i) o[j][i] = 0.f;
  uint32_t qf[KS][4];

  for (int it = 0; it < ntiles; ++it) {
    const int stage = it & 1;
    const int64_t n0 = int64_t(it) * BN;
    if (it + 1 < ntiles) {  // the next tile streams in while this one is multiplied
      attn_mma_load<D>(Ks + (stage ^ 1) * BN * LD, kp, p.k_st, n0 + BN, p.Tk, tid);
      attn_mma_load<D>(Vs + (stage ^ 1) * BN * LD, vp, p.v_st, n0 + BN, p.Tk, tid);
    }
    tile::cp_async_commit();
    tile::cp_async_wait<1>();  // all but the newest group: the query tile and tile `it` have landed
    __syncthreads();
    if (it == 0) {  // the warp's 16 query rows as A fragments, kept in registers for every key tile
      for (int kk = 0; kk < KS; ++kk) attn_a_frag(qf[kk], Qs + warp * 16 * LD, LD, kk, lane);
    }
    const uint16_t* Kt = Ks + stage * BN * LD;
    const uint16_t* Vt = Vs + stage * BN * LD;

    // S = Q K^T: 16 x 64 per warp, eight 8-key accumulator tiles; K rows [key][d] are the col-major B.
    float s[NT][4];
    for (int j = 0; j < NT; ++j)
      for (int i = 0; i < 4; ++i) s[j][i] = 0.f;
    for (int kk = 0; kk < KS; ++kk) attn_abt_step<kBF16, NT>(s, qf[kk], Kt, LD, kk, lane);

    // scale, mask (causal, boolean mask, keys past Tk, rows past Tq), softmax numerators
    for (int j = 0; j < NT; ++j)
      for (int i = 0; i < 4; ++i) {
        const int r = lrow[i >> 1];
        const int64_t gj = n0 + 8 * j + 2 * t + (i & 1);
        const bool ok = r < rows && gj < p.Tk && attn_visible(p, mp, r0 + r, gj);
        s[j][i] = ok ? s[j][i] * p.scale : neg_inf<float>();
      }
    for (int r = 0; r < 2; ++r) {
      float m_new = m_run[r];
      if constexpr (!kFromLse) {
        float mx = neg_inf<float>();
        for (int j = 0; j < NT; ++j) mx = kmax(mx, kmax(s[j][2 * r], s[j][2 * r + 1]));
        mx = kmax(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share the row
        mx = kmax(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        m_new = kmax(m_run[r], mx);
      }
      float sum = 0.f;
      for (int j = 0; j < NT; ++j)
        for (int c = 0; c < 2; ++c) {
          const float e = m_new == neg_inf<float>() ? 0.f : kexp(s[j][2 * r + c] - m_new);
          s[j][2 * r + c] = e;
          sum += e;
        }
      if constexpr (!kFromLse) {
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float alpha = m_run[r] == neg_inf<float>() ? 0.f : kexp(m_run[r] - m_new);
        l_run[r] = l_run[r] * alpha + sum;
        m_run[r] = m_new;
        for (int j = 0; j < DT; ++j) {
          o[j][2 * r] *= alpha;
          o[j][2 * r + 1] *= alpha;
        }
      }
    }

    // O += P V: P's accumulator tiles 2kk, 2kk+1 are the A fragment of keys kk*16 .. +15; V rows [key][dv]
    // are the row-major B, read transposed.
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      for (int q = 0; q < 4; ++q) {
        const float* src = s[2 * kk + (q >> 1)] + 2 * (q & 1);
        a[q] = tile::pack(static_cast<uint16_t>(scalar_t(src[0]).x), static_cast<uint16_t>(scalar_t(src[1]).x));
      }
      for (int j = 0; j < DT; j += 2) {
        uint32_t vb[4];  // keys kk*16 .. +7 and +8 .. +15 of dv tiles j and j + 1
        tile::ldmatrix<4, true>(vb, Vt + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 8 * j + 8 * (lane >> 4));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        tile::mma16816<kBF16>(o[j], a, b0, o[j]);
        tile::mma16816<kBF16>(o[j + 1], a, b1, o[j + 1]);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }
  tile::cp_async_wait<0>();

  for (int r = 0; r < 2; ++r) {
    if (lrow[r] >= rows) continue;
    float inv = 1.f;
    if constexpr (!kFromLse) inv = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
    scalar_t* orow = p.o + (bh * p.Tq + r0 + lrow[r]) * D;
    for (int j = 0; j < DT; ++j) {
      orow[8 * j + 2 * t] = scalar_t(o[j][2 * r] * inv);
      orow[8 * j + 2 * t + 1] = scalar_t(o[j][2 * r + 1] * inv);
    }
    if constexpr (!kFromLse) {
      if (t == 0)
        p.lse_out[bh * p.Tq + r0 + lrow[r]] = l_run[r] > 0.f ? m_run[r] + klog(l_run[r]) : neg_inf<float>();
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward on tensor cores (attention and shared attention alike: P from the saved LSE), float16 / bfloat16,
// D = Dv in {64, 96, 128}. One block of 4 warps per (64 keys, batch*kv_head); each warp owns 16 keys and
// keeps their dK, dV accumulators in registers across every query head of its group and every 64-row
// query tile. Per query tile, in the transposed orientation (keys as rows):
//   S^T = K Q^T -> P^T = exp(scale S^T - lse) -> dV += P^T dO -> dP^T = V dO^T -> dS^T = P^T (dP^T - delta)
//   -> dK += dS^T Q; dQ += scale dS K is this block's share: dS^T goes through shared memory (16-bit, the
//   transposed ldmatrix gives dS's A fragment back) and each warp adds 16 query rows with float atomics.
// Q and dO tiles arrive by cp.async (one stage: the tile is consumed by four products in turn).
//
// A group backward (p.layers = L sharing layers of one anchor, p.dv null): dP^T = sum_l V_l dO_l^T with the
// L value tiles resident in shared memory and dO_l streamed through one buffer, delta summed over these
// layers, no dV; dK is added to a float buffer (p.dk_acc) so that chunks of layers can follow each other.
// dS, and with it dQ and dK, is then formed once for the whole group.
// ---------------------------------------------------------------------------------------------
inline size_t attention_mma_bwd_smem(int D, int layers = 1) {
  return sizeof(uint16_t) * (size_t(3 + layers) * 64 * (D + 8) + size_t(64) * (64 + 8)) + 2 * 64 * sizeof(float);
}

// kDq: also add this block's dQ share with float atomics (the fast, run-to-run nondeterministic sum); without
// it, attention_bwd_dq_mma_kernel computes dQ deterministically. kGroup: the group backward (p.layers, no dV:
// its registers go to the layer loop).
template <class scalar_t, bool kBF16, int D, bool kDq, bool kGroup>
__global__ void __launch_bounds__(kAttnMmaThreads) attention_bwd_mma_kernel(AttnParams<scalar_t, float> p) {
#if KDK_TENSOR_CORES
  constexpr int BM = 64, BN = 64, LD = D + 8, LDS = BM + 8, KS = D / 16, NT = BM / 8, DT = D / 8;
  KDK_DYNAMIC_SMEM(kdk_attn_mma_smem, 16);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(kdk_attn_mma_smem);
  const int layers = kGroup ? p.layers : 1;
  uint16_t* Vs = Ks + BN * LD;  // `layers` tiles
  uint16_t* Qs = Vs + layers * BN * LD;
  uint16_t* dOs = Qs + BM * LD;
  uint16_t* dSs = dOs + BM * LD;  // dS^T: [key][query]
  float* lse_s = reinterpret_cast<float*>(dSs + BN * LDS);
  float* dl_s = lse_s + BM;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t bhk = blockIdx.y, b = bhk / p.Hk, hk = bhk % p.Hk;
  const int64_t n0 = int64_t(blockIdx.x) * BN;
  attn_mma_load<D>(Ks, p.k + b * p.k_sb + hk * p.k_sh, p.k_st, n0, p.Tk, tid);
  for (int l = 0; l < layers; ++l)
    attn_mma_load<D>(Vs + l * BN * LD, p.v + l * p.v_sl + b * p.v_sb + hk * p.v_sh, p.v_st, n0, p.Tk, tid);
  tile::cp_async_commit();

  // A fragments of rows r0w .. r0w + 15 of a [row][col] tile, k-step kk (cols kk*16 .. +15).
  auto a_frag = [&](uint32_t (&f)[4], const uint16_t* base, int ld, int r0w, int kk) {
    tile::ldmatrix<4>(f, base + (r0w + (lane & 7) + 8 * ((lane >> 3) & 1)) * ld + kk * 16 + 8 * (lane >> 4));
  };
  // B fragments of n-tiles j, j+1 (rows 8j .. 8j+15 of a [n][k] tile), k-step kk: the col-major B.
  auto bt_frag = [&](uint32_t (&f)[4], const uint16_t* base, int ld, int j, int kk) {
    tile::ldmatrix<4>(f, base + (8 * j + (lane & 7) + 8 * (lane >> 4)) * ld + kk * 16 + 8 * ((lane >> 3) & 1));
  };
  // B fragments of n-tiles j, j+1 (cols 8j .. 8j+15 of a [k][n] tile), k-step kk: the row-major B, transposed.
  auto b_frag = [&](uint32_t (&f)[4], const uint16_t* base, int ld, int j, int kk) {
    tile::ldmatrix<4, true>(f, base + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * ld + 8 * j + 8 * (lane >> 4));
  };
  // Two accumulator tiles (keys x 8 queries each) as the A fragment of k-step kk over the queries.
  auto acc_to_a = [](uint32_t (&a)[4], float (*x)[4], int kk) {
    for (int q = 0; q < 4; ++q) {
      const float* src = x[2 * kk + (q >> 1)] + 2 * (q & 1);
      a[q] = tile::pack(static_cast<uint16_t>(scalar_t(src[0]).x), static_cast<uint16_t>(scalar_t(src[1]).x));
    }
  };
  auto mma2 = [](float (*acc)[4], int j, const uint32_t (&a)[4], const uint32_t (&f)[4]) {
    const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
    tile::mma16816<kBF16>(acc[j], a, b0, acc[j]);
    tile::mma16816<kBF16>(acc[j + 1], a, b1, acc[j + 1]);
  };

  const int kw = warp * 16;  // this warp's keys within the block (and, for dQ, its query rows)
  // acc (16 x 64 queries) += this warp's 16 rows of A (a [row][D] tile) times Bt^T (Bt a [query][D] tile)
  auto rows_x_bt = [&](float (*acc)[4], const uint16_t* A, const uint16_t* Bt) {
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t a[4];
      a_frag(a, A, LD, kw, kk);
      for (int j = 0; j < NT; j += 2) {
        uint32_t f[4];
        bt_frag(f, Bt, LD, j, kk);
        mma2(acc, j, a, f);
      }
    }
  };
  // acc (16 x D) += x (16 x 64 queries, accumulator tiles) times B (a [query][D] tile)
  auto acc_x_b = [&](float (*acc)[4], float (*x)[4], const uint16_t* B) {
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t a[4];
      acc_to_a(a, x, kk);
      for (int j = 0; j < DT; j += 2) {
        uint32_t f[4];
        b_frag(f, B, LD, j, kk);
        mma2(acc, j, a, f);
      }
    }
  };

  float dk[DT][4], dv[kGroup ? 1 : DT][4];
  for (int j = 0; j < DT; ++j)
    for (int i = 0; i < 4; ++i) dk[j][i] = 0.f;
  for (int j = 0; j < (kGroup ? 1 : DT); ++j)
    for (int i = 0; i < 4; ++i) dv[j][i] = 0.f;

  int64_t qstart = p.causal ? attn_clamp(n0 - p.off, 0, p.Tq) : 0;  // first query row that sees a key here
  qstart = (qstart / BM) * BM;
  for (int64_t hg = 0; hg < p.group; ++hg) {
    const int64_t h = hk * p.group + hg, bh = b * p.H + h;
    const scalar_t* qp = p.q + b * p.q_sb + h * p.q_sh;
    const scalar_t* dop = p.dout + bh * p.Tq * D;
    const bool* mp = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;
    for (int64_t m0 = qstart; m0 < p.Tq; m0 += BM) {
      const int rows = static_cast<int>(attn_min(BM, p.Tq - m0));
      __syncthreads();  // the previous tile's readers are done
      attn_mma_load<D>(Qs, qp, p.q_st, m0, p.Tq, tid);
      attn_mma_load<D>(dOs, dop, D, m0, p.Tq, tid);
      tile::cp_async_commit();
      if (tid < BM) {
        lse_s[tid] = tid < rows ? static_cast<float>(p.lse_in[bh * p.Tq + m0 + tid]) : neg_inf<float>();
        dl_s[tid] = tid < rows ? static_cast<float>(p.delta[bh * p.Tq + m0 + tid]) : 0.f;
      }
      tile::cp_async_wait<0>();
      __syncthreads();

      float s[NT][4], dp[NT][4];
      for (int j = 0; j < NT; ++j)
        for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.f;
      rows_x_bt(s, Ks, Qs);  // S^T = K Q^T
      for (int j = 0; j < NT; ++j)  // P^T
        for (int i = 0; i < 4; ++i) {
          const int qc = 8 * j + 2 * t + (i & 1);
          const int64_t gj = n0 + kw + g + 8 * (i >> 1);
          const float L = lse_s[qc];
          const bool ok = qc < rows && gj < p.Tk && L != neg_inf<float>() && attn_visible(p, mp, m0 + qc, gj);
          s[j][i] = ok ? kexp(s[j][i] * p.scale - L) : 0.f;
        }
      if constexpr (!kGroup) acc_x_b(dv, s, dOs);  // dV += P^T dO
      if (!p.grad_qk) continue;
      for (int l = 0; l < layers; ++l) {  // dP^T = V dO^T; a group: the sum over its layers of V_l dO_l^T
        if (l > 0) {
          __syncthreads();  // every warp is done with dO_{l-1}
          attn_mma_load<D>(dOs, dop + l * p.do_sl, D, m0, p.Tq, tid);
          tile::cp_async_commit();
          tile::cp_async_wait<0>();
          __syncthreads();
        }
        rows_x_bt(dp, Vs + l * BN * LD, dOs);
      }
      for (int j = 0; j < NT; ++j)  // dS^T = P^T (dP^T - delta), also staged 16-bit for dQ
        for (int i = 0; i < 4; ++i) dp[j][i] = s[j][i] * (dp[j][i] - dl_s[8 * j + 2 * t + (i & 1)]);
      if constexpr (kDq) {
        for (int j = 0; j < NT; ++j)
          for (int r = 0; r < 2; ++r)
            *reinterpret_cast<uint32_t*>(dSs + (kw + g + 8 * r) * LDS + 8 * j + 2 * t) =
                tile::pack(static_cast<uint16_t>(scalar_t(dp[j][2 * r]).x),
                           static_cast<uint16_t>(scalar_t(dp[j][2 * r + 1]).x));
      }
      acc_x_b(dk, dp, Qs);  // dK += dS^T Q
      if constexpr (!kDq) continue;
      __syncthreads();  // dS^T of every warp is staged
      // dQ rows kw .. kw + 15 of this query tile += scale dS K, two 8-column tiles at a time
      for (int j = 0; j < DT; j += 2) {
        float dq[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[4], f[4];  // dS rows (queries) from dS^T [key][query], transposed by ldmatrix
          tile::ldmatrix<4, true>(a, dSs + (kk * 16 + 8 * (lane >> 4) + (lane & 7)) * LDS + kw + 8 * ((lane >> 3) & 1));
          b_frag(f, Ks, LD, j, kk);
          const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
          tile::mma16816<kBF16>(dq[0], a, b0, dq[0]);
          tile::mma16816<kBF16>(dq[1], a, b1, dq[1]);
        }
        for (int r = 0; r < 2; ++r) {
          const int qr = kw + g + 8 * r;
          if (qr >= rows) continue;
          float* dqrow = p.dq + (bh * p.Tq + m0 + qr) * D;
          for (int u = 0; u < 2; ++u) {
            atomicAdd(dqrow + 8 * (j + u) + 2 * t, dq[u][2 * r] * p.scale);
            atomicAdd(dqrow + 8 * (j + u) + 2 * t + 1, dq[u][2 * r + 1] * p.scale);
          }
        }
      }
    }
  }
  tile::cp_async_wait<0>();
  for (int r = 0; r < 2; ++r) {  // this block alone owns these keys' dK, dV
    const int64_t gj = n0 + kw + g + 8 * r;
    if (gj >= p.Tk) continue;
    for (int j = 0; j < DT; ++j)
      for (int c = 0; c < 2; ++c) {
        const int64_t at = (bhk * p.Tk + gj) * D + 8 * j + 2 * t + c;
        if constexpr (kGroup) {
          p.dk_acc[at] += dk[j][2 * r + c] * p.scale;
        } else {
          p.dv[at] = scalar_t(dv[j][2 * r + c]);
          if (p.grad_qk) p.dk[at] = scalar_t(dk[j][2 * r + c] * p.scale);
        }
      }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Deterministic dQ (torch.use_deterministic_algorithms): one block per (64 query rows, batch*head), each
// warp 16 rows with dQ in registers over every key tile, in the forward orientation:
//   S = Q K^T -> P = exp(scale S - lse) -> dP = dO V^T -> dS = P (dP - delta) -> dQ += dS K.
// No atomics: every dQ element is summed by one thread in a fixed order. Costs a second pass over
// S and dP (the key-block kernel, without kDq, then computes only dK and dV). A group (p.layers = L): the L
// dO tiles stay resident, V_l is streamed per key tile, dP sums over the layers; dQ is added to p.dq (zeroed
// by the launcher) so that chunks of layers can follow each other, still in a fixed order.
// ---------------------------------------------------------------------------------------------
inline size_t attention_mma_dq_smem(int D, int layers = 1) {
  return sizeof(uint16_t) * size_t(3 + layers) * 64 * (D + 8);
}

template <class scalar_t, bool kBF16, int D>
__global__ void __launch_bounds__(kAttnMmaThreads) attention_bwd_dq_mma_kernel(AttnParams<scalar_t, float> p) {
#if KDK_TENSOR_CORES
  constexpr int BM = 64, BN = 64, LD = D + 8, KS = D / 16, NT = BN / 8, DT = D / 8;
  KDK_DYNAMIC_SMEM(kdk_attn_mma_smem, 16);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(kdk_attn_mma_smem);
  uint16_t* dOs = Qs + BM * LD;  // p.layers tiles
  uint16_t* Ks = dOs + p.layers * BM * LD;
  uint16_t* Vs = Ks + BN * LD;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3, qw = warp * 16;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int rows = static_cast<int>(attn_min(BM, p.Tq - m0));
  const scalar_t* kp = p.k + b * p.k_sb + hk * p.k_sh;
  const scalar_t* vp = p.v + b * p.v_sb + hk * p.v_sh;
  const bool* mp = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;
  attn_mma_load<D>(Qs, p.q + b * p.q_sb + h * p.q_sh, p.q_st, m0, p.Tq, tid);
  for (int l = 0; l < p.layers; ++l)
    attn_mma_load<D>(dOs + l * BM * LD, p.dout + l * p.do_sl + bh * p.Tq * D, D, m0, p.Tq, tid);
  const int lrow[2] = {qw + g, qw + g + 8};
  float L[2], dl[2];
  for (int r = 0; r < 2; ++r) {
    const bool in = lrow[r] < rows;
    L[r] = in ? static_cast<float>(p.lse_in[bh * p.Tq + m0 + lrow[r]]) : neg_inf<float>();
    dl[r] = in ? static_cast<float>(p.delta[bh * p.Tq + m0 + lrow[r]]) : 0.f;
  }
  float dq[DT][4];
  for (int j = 0; j < DT; ++j)
    for (int i = 0; i < 4; ++i) dq[j][i] = 0.f;
  const int64_t kend = p.causal ? attn_clamp(m0 + rows + p.off, 0, p.Tk) : p.Tk;
  for (int64_t n0 = 0; n0 < kend; n0 += BN) {
    __syncthreads();  // the previous key tile's readers are done
    attn_mma_load<D>(Ks, kp, p.k_st, n0, p.Tk, tid);
    attn_mma_load<D>(Vs, vp, p.v_st, n0, p.Tk, tid);
    tile::cp_async_commit();
    tile::cp_async_wait<0>();
    __syncthreads();
    float s[NT][4], dp[NT][4];
    for (int j = 0; j < NT; ++j)
      for (int i = 0; i < 4; ++i) dp[j][i] = 0.f;
    attn_qk<kBF16, NT, KS>(s, Qs + qw * LD, Ks, LD, lane);
    for (int l = 0; l < p.layers; ++l) {  // dP = dO V^T; a group: the sum over its layers of dO_l V_l^T
      if (l > 0) {
        __syncthreads();  // every warp is done with V_{l-1}
        attn_mma_load<D>(Vs, vp + l * p.v_sl, p.v_st, n0, p.Tk, tid);
        tile::cp_async_commit();
        tile::cp_async_wait<0>();
        __syncthreads();
      }
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t ad[4];
        attn_a_frag(ad, dOs + (l * BM + qw) * LD, LD, kk, lane);
        attn_abt_step<kBF16, NT>(dp, ad, Vs, LD, kk, lane);
      }
    }
    for (int j = 0; j < NT; ++j)  // dS = P (dP - delta)
      for (int i = 0; i < 4; ++i) {
        const int r = i >> 1;
        const int64_t gj = n0 + 8 * j + 2 * t + (i & 1);
        const bool ok = lrow[r] < rows && gj < p.Tk && L[r] != neg_inf<float>() &&
                        attn_visible(p, mp, m0 + lrow[r], gj);
        const float P = ok ? kexp(s[j][i] * p.scale - L[r]) : 0.f;
        dp[j][i] = P * (dp[j][i] - dl[r]);
      }
    for (int kk = 0; kk < BN / 16; ++kk) {  // dQ += dS K, K rows [key][d] as the row-major B
      uint32_t a[4];
      for (int q = 0; q < 4; ++q) {
        const float* src = dp[2 * kk + (q >> 1)] + 2 * (q & 1);
        a[q] = tile::pack(static_cast<uint16_t>(scalar_t(src[0]).x), static_cast<uint16_t>(scalar_t(src[1]).x));
      }
      for (int j = 0; j < DT; j += 2) {
        uint32_t f[4];
        tile::ldmatrix<4, true>(f, Ks + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 8 * j + 8 * (lane >> 4));
        const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
        tile::mma16816<kBF16>(dq[j], a, b0, dq[j]);
        tile::mma16816<kBF16>(dq[j + 1], a, b1, dq[j + 1]);
      }
    }
  }
  tile::cp_async_wait<0>();
  for (int r = 0; r < 2; ++r) {
    if (lrow[r] >= rows) continue;
    float* dqrow = p.dq + (bh * p.Tq + m0 + lrow[r]) * D;
    for (int j = 0; j < DT; ++j) {
      dqrow[8 * j + 2 * t] += dq[j][2 * r] * p.scale;  // zeroed by the launcher; one owner per element
      dqrow[8 * j + 2 * t + 1] += dq[j][2 * r + 1] * p.scale;
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// The materialised probabilities of shared attention, P = exp(scale Q K^T - lse) (0 where invisible), on
// tensor cores: one block per (64 query rows, 64 keys, batch*head); Q and K tiles by cp.async, S by mma.sync
// in float32, P written in the inputs' dtype. Replaces a float32 GEMM into a float32 (B, H, Tq, Tk) buffer
// and a pass over it. p.o is the output here: (B, H, Tq, Tk) contiguous.
// ---------------------------------------------------------------------------------------------
inline size_t attention_mma_probs_smem(int D) { return sizeof(uint16_t) * size_t(2) * 64 * (D + 8); }

template <class scalar_t, bool kBF16, int D>
__global__ void __launch_bounds__(kAttnMmaThreads) attention_probs_mma_kernel(AttnParams<scalar_t, float> p) {
#if KDK_TENSOR_CORES
  constexpr int BM = 64, BN = 64, LD = D + 8, KS = D / 16, NT = BN / 8;
  KDK_DYNAMIC_SMEM(kdk_attn_mma_smem, 16);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(kdk_attn_mma_smem);
  uint16_t* Ks = Qs + BM * LD;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3, qw = warp * 16;
  const int64_t bh = blockIdx.z, b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int64_t n0 = int64_t(blockIdx.x) * BN, m0 = int64_t(blockIdx.y) * BM;
  const bool* mp = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;
  // a tile wholly after the causal diagonal is all zeros: no products
  const bool any = !p.causal || n0 <= attn_min(m0 + BM - 1, p.Tq - 1) + p.off;
  float s[NT][4];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < 4; ++i) s[j][i] = 0.f;
  if (any) {
    attn_mma_load<D>(Qs, p.q + b * p.q_sb + h * p.q_sh, p.q_st, m0, p.Tq, tid);
    attn_mma_load<D>(Ks, p.k + b * p.k_sb + hk * p.k_sh, p.k_st, n0, p.Tk, tid);
    tile::cp_async_commit();
    tile::cp_async_wait<0>();
    __syncthreads();
    attn_qk<kBF16, NT, KS>(s, Qs + qw * LD, Ks, LD, lane);
  }
  for (int r = 0; r < 2; ++r) {
    const int64_t gi = m0 + qw + g + 8 * r;
    if (gi >= p.Tq) continue;
    const float L = static_cast<float>(p.lse_in[bh * p.Tq + gi]);
    scalar_t* prow = p.o + (bh * p.Tq + gi) * p.Tk;
    for (int j = 0; j < NT; ++j)
      for (int c = 0; c < 2; ++c) {
        const int64_t gj = n0 + 8 * j + 2 * t + c;
        if (gj >= p.Tk) continue;
        const bool ok = any && L != neg_inf<float>() && attn_visible(p, mp, gi, gj);
        prow[gj] = scalar_t(ok ? kexp(s[j][2 * r + c] * p.scale - L) : 0.f);
      }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Layer similarity on tensor cores (float16 / bfloat16, D in {64, 96, 128}): grid-stride over groups of 64
// query rows of one (batch, head), 4 warps of 16 rows. Pass 1, per layer: Q_l's tile, K_l in tiles of 16
// keys, S by mma.sync, the online (max, sum) of each row in registers -> the layer's LSE. Pass 2, per key
// tile of 16: every layer's probability tile P_l = exp(scale S_l - lse_l) (S_l by mma.sync, Q_l re-read
// from L2) into shared memory as float, then each (row, layer pair) term summed over the tile into the
// block's workspace (one thread per term, so no atomics), the per-row similarity at the end. The pair terms,
// L (L + 1) / 2 per element (a log each for JS), are the bound; the products no longer are.
// ---------------------------------------------------------------------------------------------
// __launch_bounds__(128, 1): ptxas's default caps this kernel at 128 registers on sm_80 and spills; its shared
// memory allows one or two blocks per SM anyway.
constexpr int kSimMmaRows = 64, kSimMmaBN = 16;

inline size_t attention_mma_sim_smem(int64_t L, int D) {
  return sizeof(uint16_t) * size_t(kSimMmaRows + kSimMmaBN) * (D + 8) +
         sizeof(float) * size_t(L) * kSimMmaRows * (1 + kSimMmaBN);
}

template <class scalar_t, bool kBF16, int D>
__global__ void __launch_bounds__(kAttnMmaThreads, 1) attention_similarity_mma_kernel(SimParams<scalar_t, float> p) {
#if KDK_TENSOR_CORES
  constexpr int BM = kSimMmaRows, BN = kSimMmaBN, LD = D + 8, KS = D / 16, NT = BN / 8;
  KDK_DYNAMIC_SMEM(kdk_attn_mma_smem, 16);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(kdk_attn_mma_smem);
  uint16_t* Ks = Qs + BM * LD;
  float* lse = reinterpret_cast<float*>(Ks + BN * LD);  // [L][BM]
  float* P = lse + p.L * BM;                             // [L][BM][BN]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3, qw = warp * 16;
  const int64_t L = p.L, np = p.npairs, nrg = (p.Tq + BM - 1) / BM;
  float* work = p.work + int64_t(blockIdx.x) * BM * np;
  float* partial = p.partial + int64_t(blockIdx.x) * (np + 1);
  const float ninf = neg_inf<float>();

  for (int64_t grp = blockIdx.x; grp < p.ngroups; grp += gridDim.x) {
    const int64_t bh = grp / nrg, r0 = (grp % nrg) * BM, b = bh / p.H, h = bh % p.H, hk = h / p.group;
    const int rows = static_cast<int>(attn_min(BM, p.Tq - r0));
    const int64_t kend = p.causal ? attn_clamp(r0 + rows + p.off, 0, p.Tk) : p.Tk;
    const bool* mp = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;
    for (int64_t it = tid; it < BM * np; it += kAttnMmaThreads) work[it] = 0.f;
    auto load = [&](int64_t l, int64_t n0, bool q) {  // Q_l's rows (q) and K_l's 16 keys from n0, one group
      if (q) attn_mma_load<D>(Qs, p.q + ((l * p.B + b) * p.H + h) * p.Tq * D, D, r0, p.Tq, tid);
      attn_mma_load<D, BN>(Ks, p.k + ((l * p.B + b) * p.Hk + hk) * p.Tk * D, D, n0, p.Tk, tid);
      tile::cp_async_commit();
      tile::cp_async_wait<0>();
      __syncthreads();
    };
    auto scores = [&](float (&s)[NT][4]) {  // this warp's 16 rows x the 16 keys, unscaled
      attn_qk<kBF16, NT, KS>(s, Qs + qw * LD, Ks, LD, lane);
    };
    auto visible = [&](int64_t gi, int64_t gj) {
      return gi < p.Tq && gj < kend && !(p.causal && gj > gi + p.off) && (mp == nullptr || mp[gi * p.m_sq + gj * p.m_sk]);
    };
    // pass 1: every layer's LSE of the group's rows
    for (int64_t l = 0; l < L; ++l) {
      float m[2] = {ninf, ninf}, sum[2] = {0.f, 0.f};
      for (int64_t n0 = 0; n0 < kend; n0 += BN) {
        __syncthreads();  // the previous tile's readers are done
        load(l, n0, n0 == 0);
        float s[NT][4];
        scores(s);
        for (int r = 0; r < 2; ++r) {
          const int64_t gi = r0 + qw + g + 8 * r;
          float x[NT * 2], tm = ninf;
          for (int j = 0; j < NT; ++j)
            for (int c = 0; c < 2; ++c) {
              const float v = visible(gi, n0 + 8 * j + 2 * t + c) ? s[j][2 * r + c] * p.scale : ninf;
              x[2 * j + c] = v;
              tm = kmax(tm, v);
            }
          tm = kmax(tm, __shfl_xor_sync(0xffffffffu, tm, 1));  // the 4 lanes of a quad share the row
          tm = kmax(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
          const float nm = kmax(m[r], tm);
          if (nm == ninf) continue;
          float e = 0.f;
          for (int u = 0; u < 2 * NT; ++u) e += x[u] == ninf ? 0.f : kexp(x[u] - nm);
          sum[r] = (m[r] == ninf ? 0.f : sum[r] * kexp(m[r] - nm)) + e;
          m[r] = nm;
        }
      }
      for (int r = 0; r < 2; ++r) {
        float tot = sum[r];
        tot += __shfl_xor_sync(0xffffffffu, tot, 1);
        tot += __shfl_xor_sync(0xffffffffu, tot, 2);
        if (t == 0) lse[l * BM + qw + g + 8 * r] = (m[r] == ninf || tot <= 0.f) ? ninf : m[r] + klog(tot);
      }
    }
    // pass 2: probability tiles of every layer, then the pair terms over the tile
    for (int64_t n0 = 0; n0 < kend; n0 += BN) {
      for (int64_t l = 0; l < L; ++l) {
        __syncthreads();  // the previous layer's (or tile's) readers of Qs, Ks and P are done
        load(l, n0, true);
        float s[NT][4];
        scores(s);
        for (int r = 0; r < 2; ++r) {
          const int row = qw + g + 8 * r;
          const float Lr = lse[l * BM + row];
          for (int j = 0; j < NT; ++j)
            for (int c = 0; c < 2; ++c) {
              const int col = 8 * j + 2 * t + c;
              const bool ok = Lr != ninf && visible(r0 + row, n0 + col);
              P[(l * BM + row) * BN + col] = ok ? kexp(s[j][2 * r + c] * p.scale - Lr) : 0.f;
            }
        }
      }
      __syncthreads();
      sim_tile_terms(P, BM, BN, BN, rows, np, p.cosine, work, tid, kAttnMmaThreads);
    }
    __syncthreads();  // every row's terms are complete (this block's global writes are visible to it)
    sim_group_finish(work, lse, rows, np, p.cosine, partial, tid, kAttnMmaThreads);
    __syncthreads();  // the workspace and the LSEs are read before the next group rewrites them
  }
#endif
}

}  // namespace kdk
