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

// Dynamic shared memory: the query tile and two stages of K and V, rows of D + 8 16-bit values.
inline size_t attention_mma_smem(int D) { return sizeof(uint16_t) * size_t(kAttnMmaBM + 4 * kAttnMmaBN) * (D + 8); }

// grid: (ceil(Tq / 64), B * H), block: kAttnMmaThreads. p.D == p.Dv == D; q/k/v rows 16-byte aligned.
template <class scalar_t, bool kBF16, int D, bool kFromLse>
__global__ void __launch_bounds__(kAttnMmaThreads) attention_fwd_mma_kernel(AttnParams<scalar_t, float> p) {
#if KDK_TENSOR_CORES
  constexpr int BM = kAttnMmaBM, BN = kAttnMmaBN, LD = D + 8, KS = D / 16, NT = BN / 8, DT = D / 8, CH = D / 8;
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

  // 64 rows x D values from src (row stride st) into dst; rows at or past `valid` are zero-filled.
  auto load_tile = [&](uint16_t* dst, const scalar_t* src, int64_t st, int64_t row0, int64_t valid) {
    for (int idx = tid; idx < 64 * CH; idx += kAttnMmaThreads) {
      const int r = idx / CH, c = idx % CH;
      const bool ok = row0 + r < valid;
      tile::cp_async16(dst + r * LD + c * 8, src + (ok ? row0 + r : 0) * st + c * 8, ok);
    }
  };
  load_tile(Qs, qp, p.q_st, r0, p.Tq);
  if (ntiles > 0) {
    load_tile(Ks, kp, p.k_st, 0, p.Tk);
    load_tile(Vs, vp, p.v_st, 0, p.Tk);
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
      load_tile(Ks + (stage ^ 1) * BN * LD, kp, p.k_st, n0 + BN, p.Tk);
      load_tile(Vs + (stage ^ 1) * BN * LD, vp, p.v_st, n0 + BN, p.Tk);
    }
    tile::cp_async_commit();
    tile::cp_async_wait<1>();  // all but the newest group: the query tile and tile `it` have landed
    __syncthreads();
    if (it == 0) {  // the warp's 16 query rows as A fragments, kept in registers for every key tile
      for (int kk = 0; kk < KS; ++kk)
        tile::ldmatrix<4>(qf[kk], Qs + (warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + kk * 16 + 8 * (lane >> 4));
    }
    const uint16_t* Kt = Ks + stage * BN * LD;
    const uint16_t* Vt = Vs + stage * BN * LD;

    // S = Q K^T: 16 x 64 per warp, eight 8-key accumulator tiles; K rows [key][d] are the col-major B.
    float s[NT][4];
    for (int j = 0; j < NT; ++j)
      for (int i = 0; i < 4; ++i) s[j][i] = 0.f;
    for (int kk = 0; kk < KS; ++kk)
      for (int j = 0; j < NT; j += 2) {
        uint32_t kb[4];  // key tiles j and j + 1, d columns kk*16 .. +7 and +8 .. +15
        tile::ldmatrix<4>(kb, Kt + (8 * j + (lane & 7) + 8 * (lane >> 4)) * LD + kk * 16 + 8 * ((lane >> 3) & 1));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        tile::mma16816<kBF16>(s[j], qf[kk], b0, s[j]);
        tile::mma16816<kBF16>(s[j + 1], qf[kk], b1, s[j + 1]);
      }

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

}  // namespace kdk
