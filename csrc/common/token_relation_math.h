// Per-element and per-row math of the token-relation losses, shared by the CPU and CUDA backends
// (docs/token_relation.md). Everything here works on *scaled* logits: a = beta_t <yt_i, yt_j> (teacher),
// b = beta_s <ys_i, ys_j> (student), beta = 1 / (sqrt(d_h) * temperature) for dot similarity and
// 1 / (tau * temperature) for cosine; c = beta <s_i, t_j> for the contrastive loss.
#pragma once
#include "common/hd.h"

namespace kdk {

enum RelationLoss : int { kRelKL = 0, kRelMSE = 1 };

// Columns of the saved per-row statistics (P, H, n, kRelStats) of token_relation_fwd.
enum RelationStat : int { kStatLseT = 0, kStatLseS = 1, kStatCS = 2, kStatCT = 3, kRelStats = 4 };

// ---------------------------------------------------------------------------------------------
// Forward, one pass (KL) or the first pass (MSE): online row statistics over key tiles.
// State of a row: teacher (ma, sa = sum exp(a - ma)), student (mb, sb), and for KL
// acc = sum exp(a - ma) * ((a - ma) - (b - mb)): shifted by the running maxima so that the final
// KL = acc / sa - log sa + log sb never subtracts two large log-sum-exps.
// ---------------------------------------------------------------------------------------------

// Moves the state to the new maxima na >= ma, nb >= mb (ma and mb are -inf together: the first tile).
template <class T> KDK_HD void rel_rescale(T& ma, T& mb, T& sa, T& sb, T& acc, T na, T nb) {
  if (ma != neg_inf<T>()) {
    const T fa = kexp(ma - na), fb = kexp(mb - nb);
    acc = fa * (acc + sa * ((ma - na) - (mb - nb)));
    sa *= fa;
    sb *= fb;
  }
  ma = na;
  mb = nb;
}

// The KL row term from the final state: sum_j P_t (log P_t - log P_s).
template <class T> KDK_HD T rel_kl_final(T sa, T sb, T acc) { return acc / sa - klog(sa) + klog(sb); }

// Second MSE pass, one key: accumulates (P_t - P_s)^2 and the two row constants the backward needs,
// cs = -2 sum (P_t - P_s) P_s (student) and ct = 2 sum (P_t - P_s) P_t (teacher).
template <class T> KDK_HD void rel_mse_terms(T pt, T ps, T& l, T& cs, T& ct) {
  const T d = pt - ps;
  l += d * d;
  cs += d * ps * -2.0f;
  ct += d * pt * 2.0f;
}

// ---------------------------------------------------------------------------------------------
// Backward: d loss_i / d b_ij (student) and d loss_i / d a_ij (teacher) of one row i at key j, from
// pt = P_t[i, j], ps = P_s[i, j], lpt = log pt, lps = log ps and the row's saved constants:
//   KL:  student ps - pt;                 teacher pt (lpt - lps - KL_i)      (ct = KL_i)
//   MSE: student ps (-2 (pt - ps) - cs);  teacher pt (2 (pt - ps) - ct)
// The gradient of the features is then dY = (M + M^T) Y with M_ij = beta w_i coef_ij (w_i: upstream).
// ---------------------------------------------------------------------------------------------

template <int kLoss, class T> KDK_HD T rel_coef_student(T pt, T ps, T cs) {
  if constexpr (kLoss == kRelKL) {
    (void)cs;
    return ps - pt;
  } else {
    return ps * ((pt - ps) * -2.0f - cs);
  }
}

template <int kLoss, class T> KDK_HD T rel_coef_teacher(T pt, T ps, T lpt, T lps, T ct) {
  if constexpr (kLoss == kRelKL) {
    (void)ps;
    return pt * ((lpt - lps) - ct);
  } else {
    (void)lpt;
    (void)lps;
    return pt * ((pt - ps) * 2.0f - ct);
  }
}

}  // namespace kdk
