// Per-row top-k KL math shared by the CPU and CUDA backends: divergences per bucket and the K-element epilogue.
#pragma once
#include "common/hd.h"

namespace kdk {

enum TopkMode : int { kRenorm = 0, kTail = 1, kSupport = 2, kDense = 3 };
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4, kTVD = 5 };

// Both tail buckets of mode 'tail' are floored here (TRL's convention): 1 - sum(p_S) and 1 - sum(q_S)
// below it are float32 rounding noise, and a zero tail on one side only would make reverse divergences
// infinite (docs/topk_kl.md).
constexpr double kTailFloor = 1e-7;

// Columns of the per-row `stat` the forward saves for the backward (docs/topk_kl.md): G, the low part of
// the student's log-sum-exp (its high part is the `lse` output), the dense teacher's log-sum-exp (hi, lo).
constexpr int kTopkStat = 4;

// The student's final-logit map as the model applies it before the loss's temperature (Cohere's
// logit_scale, Gemma's final_logit_softcapping): x -> s x, then c tanh(s x / c) when c > 0; and its
// derivative, which the backward multiplies into every gradient entry.
template <class T> struct LogitMap {
  T scale, cap, inv_cap;
  bool active;  // anything but the identity
  KDK_HD LogitMap(double s, double c)
      : scale(T(s)), cap(T(c)), inv_cap(c > 0 ? T(1.0 / c) : T(0)), active(s != 1.0 || c > 0) {}
  KDK_HD T operator()(T x) const {
    x *= scale;
    return cap > T(0) ? cap * ktanh(x * inv_cap) : x;
  }
  KDK_HD T deriv(T x) const {  // s sech^2(u) = s 4 e^{-2|u|} / (1 + e^{-2|u|})^2: exact where tanh(u) rounds to 1
    if (!(cap > T(0))) return scale;
    const T e = kexp(T(-2) * kabs(x * scale * inv_cap)), d = T(1) + e;
    return scale * T(4) * e / (d * d);
  }
};

// log(w + (1 - w) e^d), w in (0, 1): accurate near d = 0 (P close to Q, where log(M / P) is tiny and a
// logaddexp of two values near log w would cancel) and for any |d|.
template <class T> KDK_HD T log_mix(T w, T d) {
  return d <= T(0) ? klog1p((T(1) - w) * kexpm1(d)) : d + klog1p(w * kexpm1(-d));
}

// One bucket of a divergence D(P, Q) given log P, log Q and d = log Q - log P: its loss term and
// h = dD/dlog Q. Every term is written in d (log(M / P) = log_mix(beta, d), ...), which the dense
// kernels form from the raw logits without the eps * |log P| cancellation of lq - lp; the terms then
// stay as exact as d is. A factor P (or Q) that is exactly 0 zeroes its terms, so 0 log 0 = 0 and -inf
// never makes NaN (those buckets take the plain log-space formulas).
template <class T>
KDK_HD void bucket(int div, T param, T lp, T lq, T d, T& loss, T& h) {
  const T P = kexp(lp), Q = kexp(lq);
  if (div == kJSD && param == T(0)) div = kForwardKL;        // Liger / TRL GKD convention
  else if (div == kJSD && param == T(1)) div = kReverseKL;
  else if (div == kSkewReverseKL && param == T(0)) div = kReverseKL;
  loss = T(0);
  h = T(0);
  const bool both = P > T(0) && Q > T(0);
  switch (div) {
    case kForwardKL:
      if (P > T(0)) loss = both ? -P * d : P * (lp - lq);
      h = -P;
      break;
    case kReverseKL:
      if (Q > T(0)) { const T r = both ? d : lq - lp; loss = Q * r; h = Q * (r + T(1)); }
      break;
    case kJSD: {  // beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
      if (both) {
        const T L = log_mix(param, d);  // log(M / P)
        loss = -param * P * L + (T(1) - param) * Q * (d - L);
        h = (T(1) - param) * Q * (d - L);
      } else if (P > T(0)) {
        loss = -param * P * klog(param);
      } else if (Q > T(0)) {
        loss = -(T(1) - param) * Q * klog(T(1) - param);
        h = loss;
      }
      break;
    }
    case kSkewForwardKL: {  // KL(P || s P + (1 - s) Q)
      if (param == T(1) || !(P > T(0))) break;
      if (both) {
        const T L = log_mix(param, d);  // log(M / P)
        loss = -P * L;
        h = -P * (T(1) - param) * kexp(d - L);
      } else {
        loss = -P * klog(param);
      }
      break;
    }
    case kSkewReverseKL: {  // KL(Q || (1 - s) P + s Q)
      if (!(Q > T(0))) break;
      if (both) {
        const T L = log_mix(param, -d);  // log(M / Q)
        loss = -Q * L;
        h = -Q * L + Q * (T(1) - param) * kexp(-d - L);
      } else {  // P = 0: M = s Q
        loss = -Q * klog(param);
        h = loss;
      }
      break;
    }
    default: {  // kTVD: |P - Q| = max(P, Q) (1 - exp(-|d|)), no cancellation; the sign from d
      if (!(P > T(0)) && !(Q > T(0))) break;
      const T r = both ? d : lq - lp;
      loss = T(0.5) * kmax(P, Q) * -kexpm1(-kabs(r));
      h = r < T(0) ? T(-0.5) * Q : (r > T(0) ? T(0.5) * Q : T(0));
    }
  }
}

// A dense bucket from the raw scaled values xs = z / T (student) and ys (teacher) and both log-sum-exps as
// hi + lo: d = (xs - ys) - (lse_q - lse_p) differences close values first instead of subtracting two
// log-probabilities of size |lse|, so d carries eps * |d|, not eps * |log p|.
template <class T>
KDK_HD void dense_bucket(int div, T param, T xs, T ys, T hi, T lo, T thi, T tlo, T& lq, T& loss, T& h) {
  lq = (xs - hi) - lo;
  bucket(div, param, (ys - thi) - tlo, lq, (xs - ys) - ((hi - thi) + (lo - tlo)), loss, h);
}

// The same with d formed from the two log-probabilities.
template <class T> KDK_HD void bucket(int div, T param, T lp, T lq, T& loss, T& h) {
  bucket(div, param, lp, lq, lq - lp, loss, h);
}

// The sparse epilogue of one row. Inputs in scratch: lq[k] = log q at S_k (-inf for a dropped id),
// tv[k] = teacher value (-inf for a dropped id). Writes a[k] (= coef) and returns the loss and G with
//     dL/dz_v = (1/T) (a_k [v == S_k] - q_v G).
// R runs the K-loops: sequentially on CPU, across a thread block on CUDA (R::sum/max reduce and
// broadcast; R::each is followed by a barrier). Every k is owned by one thread in every loop.
template <class T, class R>
KDK_HD void topk_epilogue(R& r, int K, int mode, int div, T param, T inv_t, bool logprobs,
                          T* lq, T* tv, T* a, T& loss_out, T& G_out) {
  const T ninf = neg_inf<T>();
  // Teacher log-probs over the buckets, written over tv.
  T lp_tail = ninf;
  if (mode == kTail) {  // tv already holds full-vocab log-probs; the rest of the mass is the tail
    const T m = r.sum(K, [&](int k) { return kexp(tv[k]); });
    lp_tail = klog(kmax(T(1) - m, T(kTailFloor)));
  } else {
    if (!logprobs) r.each(K, [&](int k) { tv[k] *= inv_t; });
    const T mx = r.max(K, [&](int k) { return tv[k]; });
    if (mx == ninf) {  // no teacher mass on the support: nothing to match
      r.each(K, [&](int k) { a[k] = T(0); });
      loss_out = T(0); G_out = T(0);
      return;
    }
    const T ls = klog(r.sum(K, [&](int k) { return kexp(tv[k] - mx); }));
    r.each(K, [&](int k) { tv[k] = (tv[k] - mx) - ls; });
  }

  if (mode == kRenorm) {  // forward KL of p̂ against the full-vocab q at S
    T loss = r.sum(K, [&](int k) { T l, h; bucket(kForwardKL, param, tv[k], lq[k], l, h); a[k] = h; return l; });
    loss_out = loss;
    G_out = r.sum(K, [&](int k) { return a[k]; });
  } else if (mode == kSupport) {  // q renormalised over S: log q̂ = log q - LSE_S(log q)
    const T mx = r.max(K, [&](int k) { return lq[k]; });
    const T ls = klog(r.sum(K, [&](int k) { return kexp(lq[k] - mx); }));
    r.each(K, [&](int k) { lq[k] = (lq[k] - mx) - ls; });  // not lq - (mx + ls): that rounds eps * |mx|
    loss_out = r.sum(K, [&](int k) { T l, h; bucket(div, param, tv[k], lq[k], l, h); a[k] = h; return l; });
    const T H = r.sum(K, [&](int k) { return a[k]; });
    r.each(K, [&](int k) { a[k] -= kexp(lq[k]) * H; });
    G_out = T(0);  // the full-vocab normaliser cancels exactly
  } else {  // kTail: K + 1 buckets, both tails floored
    const T s = r.sum(K, [&](int k) { return kexp(lq[k]); });
    const bool floored = !(T(1) - s > T(kTailFloor));
    const T q_tail = floored ? T(kTailFloor) : T(1) - s;
    T l_tail, h_tail;
    bucket(div, param, lp_tail, klog(q_tail), l_tail, h_tail);
    // log Q_tail = log(1 - s) moves with every q_k: d/dlog q_k = -q_k / Q_tail (0 when floored).
    const T c = floored ? T(0) : h_tail / q_tail;
    const T loss = r.sum(K, [&](int k) {
      T l, h; bucket(div, param, tv[k], lq[k], l, h); a[k] = h - c * kexp(lq[k]); return l; });
    loss_out = loss + l_tail;
    G_out = r.sum(K, [&](int k) { return a[k]; });
  }
}

// Sequential K-loops for the CPU backend. Sums run in double: a sequential float sum of K terms would be
// K times less accurate than the CUDA block's tree (and than eager's pairwise sums).
struct SeqReducer {
  template <class F> auto sum(int K, F f) -> decltype(f(0)) {
    double s = 0;
    for (int k = 0; k < K; ++k) s += f(k);
    return static_cast<decltype(f(0))>(s);
  }
  template <class F> auto max(int K, F f) -> decltype(f(0)) {
    auto m = neg_inf<decltype(f(0))>();
    for (int k = 0; k < K; ++k) m = kmax(m, f(k));
    return m;
  }
  template <class F> void each(int K, F f) { for (int k = 0; k < K; ++k) f(k); }
};

}  // namespace kdk
