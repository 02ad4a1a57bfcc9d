// Per-row top-k KL math shared by the CPU and CUDA backends: divergences per bucket and the K-element epilogue.
#pragma once
#include "common/hd.h"

namespace kdk {

enum TopkMode : int { kRenorm = 0, kTail = 1, kSupport = 2, kDense = 3 };
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4, kTVD = 5 };

// Below this the student's tail mass 1 - sum(q_S) is float32 rounding noise; flooring it keeps the
// tail loss and its gradient finite (docs/topk_kl.md).
constexpr double kTailFloor = 1e-7;

// One bucket of a divergence D(P, Q) given log P and log Q: its loss term and h = dD/dlog Q.
// A factor P (or Q) that is exactly 0 zeroes its terms, so 0 log 0 = 0 and -inf never makes NaN.
template <class T>
KDK_HD void bucket(int div, T param, T lp, T lq, T& loss, T& h) {
  const T P = kexp(lp), Q = kexp(lq);
  if (div == kJSD && param == T(0)) div = kForwardKL;        // Liger / TRL GKD convention
  else if (div == kJSD && param == T(1)) div = kReverseKL;
  else if (div == kSkewReverseKL && param == T(0)) div = kReverseKL;
  loss = T(0);
  h = T(0);
  switch (div) {
    case kForwardKL:
      if (P > T(0)) loss = P * (lp - lq);
      h = -P;
      break;
    case kReverseKL:
      if (Q > T(0)) { loss = Q * (lq - lp); h = Q * (lq - lp + T(1)); }
      break;
    case kJSD: {
      const T lm = logaddexp(klog(param) + lp, klog(T(1) - param) + lq);
      if (P > T(0)) loss += param * P * (lp - lm);
      if (Q > T(0)) { loss += (T(1) - param) * Q * (lq - lm); h = (T(1) - param) * Q * (lq - lm); }
      break;
    }
    case kSkewForwardKL: {  // KL(P || s P + (1 - s) Q)
      if (param == T(1) || !(P > T(0))) break;
      const T lm = logaddexp(klog(param) + lp, klog(T(1) - param) + lq);
      loss = P * (lp - lm);
      h = -P * (T(1) - param) * kexp(lq - lm);
      break;
    }
    case kSkewReverseKL: {  // KL(Q || (1 - s) P + s Q)
      if (!(Q > T(0))) break;
      const T lm = logaddexp(klog(T(1) - param) + lp, klog(param) + lq);
      loss = Q * (lq - lm);
      h = Q * (lq - lm) + Q * (T(1) - param) * kexp(lp - lm);
      break;
    }
    default: {  // kTVD
      const T d = P - Q;
      loss = T(0.5) * kabs(d);
      h = d > T(0) ? T(-0.5) * Q : (d < T(0) ? T(0.5) * Q : T(0));
    }
  }
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
    lp_tail = m < T(1) ? klog1p(-m) : ninf;
  } else {
    if (!logprobs) r.each(K, [&](int k) { tv[k] *= inv_t; });
    const T mx = r.max(K, [&](int k) { return tv[k]; });
    if (mx == ninf) {  // no teacher mass on the support: nothing to match
      r.each(K, [&](int k) { a[k] = T(0); });
      loss_out = T(0); G_out = T(0);
      return;
    }
    const T lse = mx + klog(r.sum(K, [&](int k) { return kexp(tv[k] - mx); }));
    r.each(K, [&](int k) { tv[k] -= lse; });
  }

  if (mode == kRenorm) {  // forward KL of p̂ against the full-vocab q at S
    T loss = r.sum(K, [&](int k) { T l, h; bucket(kForwardKL, param, tv[k], lq[k], l, h); a[k] = h; return l; });
    loss_out = loss;
    G_out = r.sum(K, [&](int k) { return a[k]; });
  } else if (mode == kSupport) {  // q renormalised over S: log q̂ = log q - LSE_S(log q)
    const T mx = r.max(K, [&](int k) { return lq[k]; });
    const T lse = mx + klog(r.sum(K, [&](int k) { return kexp(lq[k] - mx); }));
    r.each(K, [&](int k) { lq[k] -= lse; });
    loss_out = r.sum(K, [&](int k) { T l, h; bucket(div, param, tv[k], lq[k], l, h); a[k] = h; return l; });
    const T H = r.sum(K, [&](int k) { return a[k]; });
    r.each(K, [&](int k) { a[k] -= kexp(lq[k]) * H; });
    G_out = T(0);  // the full-vocab normaliser cancels exactly
  } else {  // kTail: K + 1 buckets, the student's tail 1 - s floored
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

// Sequential K-loops for the CPU backend.
struct SeqReducer {
  template <class F> auto sum(int K, F f) -> decltype(f(0)) {
    decltype(f(0)) s = 0;
    for (int k = 0; k < K; ++k) s += f(k);
    return s;
  }
  template <class F> auto max(int K, F f) -> decltype(f(0)) {
    auto m = neg_inf<decltype(f(0))>();
    for (int k = 0; k < K; ++k) m = kmax(m, f(k));
    return m;
  }
  template <class F> void each(int K, F f) { for (int k = 0; k < K; ++k) f(k); }
};

}  // namespace kdk
