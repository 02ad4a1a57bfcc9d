// Batched log-domain Sinkhorn and the SinKD cost: element math shared by the CPU and CUDA backends.
//
// One problem (docs/sinkhorn.md): cost C (n, m), Z0 = -C / eps, log-marginals la (n), lb (m), where
// -inf marks an absent point (a zero weight, a padded token). With g_0 = 0, for l = 1..L:
//     f_l = la - lse_j(Z0 + g_{l-1})        (row step)
//     g_l = lb - lse_i(Z0 + f_l)            (column step)
// P = exp(Z0 + f_L + g_L), value = sum_ij P C (a forbidden pair, C = +inf, has P = 0 and adds 0).
// The exact backward of that unrolled loop from the stored (f_l, g_l), with A_l = Z0 + f_l + g_{l-1},
// Z_l = Z0 + f_l + g_l, f'_l = f_l - la, g'_l = g_l - lb:
//     dZ = gout C P + gplan P
//     for l = L..1:  cs = colsum(dZ);  dA = dZ - exp(Z0 + f_l + g'_l) cs          (d lb += cs)
//                    rs = rowsum(dA);  dZ = dA - exp(Z0 + f'_l + g_{l-1}) rs       (d la += rs)
//     dC = gout P - dZ / eps
// Absent rows / columns keep dZ = 0; forbidden pairs get dC = 0.
#pragma once
#include "common/hd.h"

namespace kdk {

enum SinkhornCostKind : int { kCostL1 = 0, kCostSqEuclidean = 1 };
enum SinkhornGrad : int { kGradUnrolled = 0, kGradEnvelope = 1 };

// Distance term of one class c between a student and a teacher probability, d = p_s - p_t, and its
// derivative in p_s. L1: |d|, sign(d) with sign(0) = 0 (as torch.cdist); squared L2: d^2, 2 d.
template <class T> KDK_HD T cost_term(int kind, T d) { return kind == kCostL1 ? kabs(d) : d * d; }
template <class T> KDK_HD T cost_term_grad(int kind, T d) {
  if (kind == kCostL1) return d > T(0) ? T(1) : (d < T(0) ? T(-1) : T(0));
  return T(2) * d;
}

template <class T> KDK_HD bool is_neg_inf(T x) { return x == neg_inf<T>(); }

// log-sum-exp from a (max, sum of exp(x - max)) pair; -inf when nothing was summed.
template <class T> KDK_HD T lse_finish(T mx, T s) { return is_neg_inf(mx) ? mx : mx + klog(s); }

// A potential from a log-marginal and a log-sum-exp: absent points (la = -inf) stay -inf. A present
// point with lse = -inf (no finite cost entry) is refused before the solve (or flagged on CPU).
template <class T> KDK_HD T potential(T la, T lse) { return is_neg_inf(la) ? la : la - lse; }

// The row marginal error of one row after a column step, from the old and new row potentials:
// rowsum(P_l)_i = a_i exp(f_l - f_{l+1}), so |rowsum - a_i| = a_i |exp(f_l - f_{l+1}) - 1|.
template <class T> KDK_HD T row_error(T la, T f_old, T f_new) {
  if (is_neg_inf(la)) return T(0);
  return kexp(la) * kabs(kexp(f_old - f_new) - T(1));
}

}  // namespace kdk
