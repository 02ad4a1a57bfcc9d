// CPU implementation of the batched log-domain Sinkhorn ops and the SinKD cost: problems in parallel,
// every inner loop a unit-stride SIMD loop over a row of the n x m matrix (column reductions are
// accumulated row by row into m-vectors), no n x m iterate stored across iterations.
#include <algorithm>
#include <atomic>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/sinkhorn_args.h"
#include "common/sinkhorn_math.h"
#include "ops.h"

namespace kdk {
namespace {

template <class T> using acc_of_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// exp that is exactly 0 at -inf (absent points, forbidden pairs), vectorisable.
template <class T> inline T exp0(T x) {
  const T e = fast_exp(x);
  return x == neg_inf<T>() ? T(0) : e;
}

// A data error found inside the parallel solve: the smallest problem index wins, so the message does
// not depend on the scheduling.
struct FirstError {
  std::atomic<int64_t> problem{std::numeric_limits<int64_t>::max()};
  std::string msg;
  std::mutex mu;
  void set(int64_t b, std::string m) {
    std::lock_guard<std::mutex> g(mu);
    if (b < problem.load()) { problem.store(b); msg = std::move(m); }
  }
  void raise(const char* op) {
    if (problem.load() != std::numeric_limits<int64_t>::max()) KDK_CHECK(op, false, msg);
  }
};

// ----------------------------------------------------------------------------------------------
// Row kernels: every loop below walks one row of an n x m matrix with unit stride, eight floats at a
// time (cpu_math.h's f8 / exp8; the auto-vectoriser leaves these loops scalar without -ffast-math),
// then a scalar tail. float64 runs the scalar loops.
// ----------------------------------------------------------------------------------------------

template <class T> constexpr bool kF8 = std::is_same_v<T, float>;

KDK_ALWAYS_INLINE f8 exp8_0(f8 x) {  // exp8, exactly 0 at -inf
  const f8 e = exp8(x);
  return x == splat8(neg_inf<float>()) ? splat8(0.f) : e;
}

// max_j (r_j + v_j)
template <class T> KDK_CPU_CLONES T max_of_sum(const T* r, const T* v, int64_t m) {
  T mx = neg_inf<T>();
  int64_t j = 0;
  if constexpr (kF8<T>) {
    f8 acc = splat8(neg_inf<float>());
    for (; j + 8 <= m; j += 8) {
      const f8 x = load8(r + j) + load8(v + j);
      acc = x > acc ? x : acc;
    }
    mx = hmax8(acc);
  }
  for (; j < m; ++j) mx = std::max(mx, r[j] + v[j]);
  return mx;
}

// sum_j exp(r_j + v_j - shift)
template <class T> KDK_CPU_CLONES T sum_exp_of_sum(const T* r, const T* v, int64_t m, T shift) {
  T s = 0;
  int64_t j = 0;
  if constexpr (kF8<T>) {
    f8 acc = splat8(0.f);
    for (; j + 8 <= m; j += 8) acc += exp8(load8(r + j) + load8(v + j) - shift);
    s = hsum8(acc);
  }
  for (; j < m; ++j) s += fast_exp(r[j] + v[j] - shift);
  return s;
}

// cmax_j = max(cmax_j, r_j + c)
template <class T> KDK_CPU_CLONES void max_update(T* cmax, const T* r, T c, int64_t m) {
  int64_t j = 0;
  if constexpr (kF8<T>) {
    for (; j + 8 <= m; j += 8) {
      const f8 x = load8(r + j) + c, a = load8(cmax + j);
      store8(cmax + j, x > a ? x : a);
    }
  }
  for (; j < m; ++j) cmax[j] = std::max(cmax[j], r[j] + c);
}

// csum_j += exp(r_j + c - cmax_j)
template <class T> KDK_CPU_CLONES void exp_accumulate(T* csum, const T* r, T c, const T* cmax, int64_t m) {
  int64_t j = 0;
  if constexpr (kF8<T>) {
    for (; j + 8 <= m; j += 8) store8(csum + j, load8(csum + j) + exp8(load8(r + j) + c - load8(cmax + j)));
  }
  for (; j < m; ++j) csum[j] += fast_exp(r[j] + c - cmax[j]);
}

// sum_j P_j C_j with P_j = exp(r_j + fi + g_j) (0 at -inf, and P C = 0 where P = 0); writes P when pr.
template <class T> KDK_CPU_CLONES T value_row(const T* r, const T* c, int64_t m, T fi, const T* g, T* pr) {
  T s = 0;
  int64_t j = 0;
  if constexpr (kF8<T>) {
    f8 acc = splat8(0.f);
    for (; j + 8 <= m; j += 8) {
      const f8 p = exp8_0(load8(r + j) + fi + load8(g + j));
      if (pr) store8(pr + j, p);
      const f8 pc = p * load8(c + j);
      acc += p == splat8(0.f) ? splat8(0.f) : pc;
    }
    s = hsum8(acc);
  }
  for (; j < m; ++j) {
    const T p = exp0(r[j] + fi + g[j]);
    if (pr) pr[j] = p;
    s += p == T(0) ? T(0) : p * c[j];
  }
  return s;
}

// out_j = exp(r_j + fi + g_j), 0 at -inf
template <class T> KDK_CPU_CLONES void exp_row(const T* r, int64_t m, T fi, const T* g, T* out) {
  int64_t j = 0;
  if constexpr (kF8<T>)
    for (; j + 8 <= m; j += 8) store8(out + j, exp8_0(load8(r + j) + fi + load8(g + j)));
  for (; j < m; ++j) out[j] = exp0(r[j] + fi + g[j]);
}

// Backward, first half of a row: dA = dZ - exp(r + fi + gp) cs (in place); returns rowsum(dA).
template <class T> KDK_CPU_CLONES T bwd_col_part(const T* r, int64_t m, T fi, const T* gp, const T* cs, T* d) {
  T rs = 0;
  int64_t j = 0;
  if constexpr (kF8<T>) {
    f8 acc = splat8(0.f);
    for (; j + 8 <= m; j += 8) {
      const f8 v = load8(d + j) - exp8_0(load8(r + j) + fi + load8(gp + j)) * load8(cs + j);
      store8(d + j, v);
      acc += v;
    }
    rs = hsum8(acc);
  }
  for (; j < m; ++j) {
    const T v = d[j] - exp0(r[j] + fi + gp[j]) * cs[j];
    d[j] = v;
    rs += v;
  }
  return rs;
}

// Backward, second half: dZ = dA - exp(r + fp + gprev) rs (in place); accumulates the new column sums.
template <class T>
KDK_CPU_CLONES void bwd_row_part(const T* r, int64_t m, T fp, const T* gprev, T rs, T* d, T* cs_next) {
  int64_t j = 0;
  if constexpr (kF8<T>) {
    for (; j + 8 <= m; j += 8) {
      const f8 v = load8(d + j) - exp8_0(load8(r + j) + fp + load8(gprev + j)) * rs;
      store8(d + j, v);
      store8(cs_next + j, load8(cs_next + j) + v);
    }
  }
  for (; j < m; ++j) {
    const T v = d[j] - exp0(r[j] + fp + gprev[j]) * rs;
    d[j] = v;
    cs_next[j] += v;
  }
}

// ----------------------------------------------------------------------------------------------
// One problem's row and column steps over z0 (n x m, row-major).
// ----------------------------------------------------------------------------------------------

// fnew_i = la_i - lse_j(z0_ij + g_j); returns the first present row without a finite entry, or -1.
template <class T> int64_t row_step(const T* z0, int64_t n, int64_t m, const T* la, const T* g, T* fnew) {
  for (int64_t i = 0; i < n; ++i) {
    const T lai = la ? la[i] : T(0);
    if (is_neg_inf(lai)) { fnew[i] = lai; continue; }
    const T* r = z0 + i * m;
    const T mx = max_of_sum(r, g, m);
    if (is_neg_inf(mx)) return i;
    fnew[i] = lai - (mx + std::log(sum_exp_of_sum(r, g, m, mx)));
  }
  return -1;
}

// g_j = lb_j - lse_i(z0_ij + f_i), columns accumulated row by row; returns the first present column
// without a finite entry, or -1. cmax, csum: m scratch values each.
template <class T>
int64_t col_step(const T* z0, int64_t n, int64_t m, const T* lb, const T* f, T* g, T* cmax, T* csum) {
  std::fill(cmax, cmax + m, neg_inf<T>());
  std::fill(csum, csum + m, T(0));
  for (int64_t i = 0; i < n; ++i)
    if (!is_neg_inf(f[i])) max_update(cmax, z0 + i * m, f[i], m);
  for (int64_t i = 0; i < n; ++i)
    if (!is_neg_inf(f[i])) exp_accumulate(csum, z0 + i * m, f[i], cmax, m);
  int64_t bad = -1;
  for (int64_t j = 0; j < m; ++j) {
    const T lbj = lb ? lb[j] : T(0);
    if (is_neg_inf(lbj)) { g[j] = lbj; continue; }
    if (is_neg_inf(cmax[j])) { if (bad < 0) bad = j; g[j] = lbj; continue; }
    g[j] = lbj - (cmax[j] + std::log(csum[j]));
  }
  return bad;
}

// z0 = -C / eps for one problem; returns whether C holds a NaN or -inf.
template <class scalar_t, class T>
KDK_CPU_CLONES bool build_z0(const scalar_t* c, int64_t nm, T inv_eps, T* z0) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t k = 0; k < nm; ++k) {
    const T x = static_cast<T>(c[k]);
    bad |= (x != x) | (x == neg_inf<T>());
    z0[k] = -x * inv_eps;
  }
  return bad != 0;
}

// A row of the cost in the accumulation type: the row itself when the types agree, else a copy.
template <class scalar_t, class T> const T* acc_row(const scalar_t* c, int64_t m, std::vector<T>& buf) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return c;
  } else {
    buf.resize(m);
    for (int64_t j = 0; j < m; ++j) buf[j] = static_cast<T>(c[j]);
    return buf.data();
  }
}

template <class T> int64_t count_present(const T* l, int64_t k) {
  if (!l) return k;
  int64_t c = 0;
  for (int64_t i = 0; i < k; ++i) c += !is_neg_inf(l[i]);
  return c;
}

template <class T> bool marginal_bad(const T* l, int64_t k) {
  if (!l) return false;
  for (int64_t i = 0; i < k; ++i)
    if (l[i] != l[i] || l[i] == std::numeric_limits<T>::infinity()) return true;
  return false;
}

// Initial column potentials: 0 for present columns, -inf for absent ones.
template <class T> void init_g0(const T* lb, int64_t m, T* g0) {
  for (int64_t j = 0; j < m; ++j) g0[j] = (lb && is_neg_inf(lb[j])) ? neg_inf<T>() : T(0);
}

// ----------------------------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------------------------

template <class scalar_t>
void sinkhorn_fwd_impl(const SinkhornArgs& a, const scalar_t* cost, const acc_of_t<scalar_t>* log_a,
                       const acc_of_t<scalar_t>* log_b, acc_of_t<scalar_t>* value, acc_of_t<scalar_t>* F,
                       acc_of_t<scalar_t>* G, int32_t* iters, acc_of_t<scalar_t>* plan) {
  using T = acc_of_t<scalar_t>;
  const int64_t n = a.n, m = a.m, L = a.L, nm = n * m;
  const T inv_eps = T(1) / T(a.eps), tol = T(a.tol);
  FirstError err;
  at::parallel_for(0, a.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> z0(nm), f(n), fnew(n), g(m), g0(m), cmax(m), csum(m), crow;
    for (int64_t b = b0; b < b1; ++b) {
      const T* la = log_a ? log_a + b * n : nullptr;
      const T* lb = log_b ? log_b + b * m : nullptr;
      T* Fb = F + b * L * n;
      T* Gb = G + b * L * m;
      T* Pb = plan ? plan + b * nm : nullptr;
      auto empty = [&] {
        value[b] = 0;
        iters[b] = 0;
        std::fill(Fb, Fb + L * n, T(0));
        std::fill(Gb, Gb + L * m, T(0));
        if (Pb) std::fill(Pb, Pb + nm, T(0));
      };
      if (build_z0(cost + b * nm, nm, inv_eps, z0.data())) { err.set(b, sinkhorn_msg_cost_nan(b)); empty(); continue; }
      if (marginal_bad(la, n)) { err.set(b, sinkhorn_msg_marginal("log_a", b)); empty(); continue; }
      if (marginal_bad(lb, m)) { err.set(b, sinkhorn_msg_marginal("log_b", b)); empty(); continue; }
      if (count_present(la, n) == 0 || count_present(lb, m) == 0) { empty(); continue; }
      init_g0(lb, m, g0.data());
      int64_t bad = row_step(z0.data(), n, m, la, g0.data(), f.data());
      if (bad >= 0) { err.set(b, sinkhorn_msg_row(b, bad)); empty(); continue; }
      bad = col_step(z0.data(), n, m, lb, f.data(), g.data(), cmax.data(), csum.data());
      if (bad >= 0) { err.set(b, sinkhorn_msg_col(b, bad)); empty(); continue; }
      std::copy(f.begin(), f.end(), Fb);
      std::copy(g.begin(), g.end(), Gb);
      int64_t l = 1;
      for (; l < L; ++l) {
        row_step(z0.data(), n, m, la, g.data(), fnew.data());
        if (tol > T(0)) {
          T e = 0;
          for (int64_t i = 0; i < n; ++i) e += row_error(la ? la[i] : T(0), f[i], fnew[i]);
          if (e <= tol) break;  // keep (f_l, g_l): the plan of iteration l meets the tolerance
        }
        std::swap(f, fnew);
        col_step(z0.data(), n, m, lb, f.data(), g.data(), cmax.data(), csum.data());
        std::copy(f.begin(), f.end(), Fb + l * n);
        std::copy(g.begin(), g.end(), Gb + l * m);
      }
      iters[b] = static_cast<int32_t>(l);
      if (l < L) {  // early stop: the unused levels are zero, never garbage
        std::fill(Fb + l * n, Fb + L * n, T(0));
        std::fill(Gb + l * m, Gb + L * m, T(0));
      }
      // value = sum P C, P = exp(z0 + f + g) (0 for absent points and forbidden pairs)
      const scalar_t* cb = cost + b * nm;
      T total = 0;
      for (int64_t i = 0; i < n; ++i) {
        const T* r = z0.data() + i * m;
        T* pr = Pb ? Pb + i * m : nullptr;
        total += value_row(r, acc_row(cb + i * m, m, crow), m, f[i], g.data(), pr);
      }
      value[b] = total;
    }
  });
  err.raise("sinkhorn");
}

// ----------------------------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------------------------

template <class scalar_t>
void sinkhorn_bwd_impl(const SinkhornArgs& a, const acc_of_t<scalar_t>* gval, const acc_of_t<scalar_t>* gplan,
                       const scalar_t* cost, const acc_of_t<scalar_t>* log_a, const acc_of_t<scalar_t>* log_b,
                       const acc_of_t<scalar_t>* F, const acc_of_t<scalar_t>* G, const int32_t* iters,
                       scalar_t* dcost, acc_of_t<scalar_t>* dla, acc_of_t<scalar_t>* dlb) {
  using T = acc_of_t<scalar_t>;
  const int64_t n = a.n, m = a.m, L = a.L, nm = n * m;
  const T eps = T(a.eps), inv_eps = T(1) / eps;
  const bool unrolled = a.grad == kGradUnrolled;
  at::parallel_for(0, a.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> z0(nm), dz, gpb(m), g0(m), fp(n), cs(m), cs_next(m), pbuf(nm);
    if (unrolled) dz.resize(nm);
    for (int64_t b = b0; b < b1; ++b) {
      const T* la = log_a ? log_a + b * n : nullptr;
      const T* lb = log_b ? log_b + b * m : nullptr;
      scalar_t* out = dcost + b * nm;
      T* dla_b = dla ? dla + b * n : nullptr;
      T* dlb_b = dlb ? dlb + b * m : nullptr;
      if (dla_b) std::fill(dla_b, dla_b + n, T(0));
      if (dlb_b) std::fill(dlb_b, dlb_b + m, T(0));
      const int64_t Tn = iters[b];
      const T gout = gval[b];
      const T* gp_b = gplan ? gplan + b * nm : nullptr;
      if (Tn <= 0 || (gout == T(0) && !gp_b)) {  // empty problem, or nothing flows back
        std::fill(out, out + nm, scalar_t(0));
        continue;
      }
      build_z0(cost + b * nm, nm, inv_eps, z0.data());
      const T* fL = F + (b * L + Tn - 1) * n;
      const T* gL = G + (b * L + Tn - 1) * m;
      // P, and the seed dZ_L = (gout C + gplan) P
      std::fill(cs.begin(), cs.end(), T(0));
      for (int64_t i = 0; i < n; ++i) {
        const T* r = z0.data() + i * m;
        T* p = pbuf.data() + i * m;
        const T fi = fL[i];
        exp_row(r, m, fi, gL, p);
        if (!unrolled) continue;
        T* d = dz.data() + i * m;
        const T* gpr = gp_b ? gp_b + i * m : nullptr;
        const scalar_t* cr = cost + b * nm + i * m;
        for (int64_t j = 0; j < m; ++j) {
          const T pc = p[j] == T(0) ? T(0) : p[j] * static_cast<T>(cr[j]);  // P C, 0 at forbidden pairs
          d[j] = gout * pc + (gpr ? gpr[j] * p[j] : T(0));
          cs[j] += d[j];
        }
      }
      if (unrolled) {
        init_g0(lb, m, g0.data());
        for (int64_t l = Tn; l >= 1; --l) {
          const T* fl = F + (b * L + l - 1) * n;
          const T* gl = G + (b * L + l - 1) * m;
          const T* gprev = l > 1 ? G + (b * L + l - 2) * m : g0.data();
          for (int64_t j = 0; j < m; ++j) {
            const T lbj = lb ? lb[j] : T(0);
            gpb[j] = is_neg_inf(lbj) ? neg_inf<T>() : gl[j] - lbj;
            if (dlb_b) dlb_b[j] += cs[j];
          }
          std::fill(cs_next.begin(), cs_next.end(), T(0));
          for (int64_t i = 0; i < n; ++i) {
            const T lai = la ? la[i] : T(0);
            if (is_neg_inf(lai)) continue;  // an absent row keeps dZ = 0
            const T* r = z0.data() + i * m;
            T* d = dz.data() + i * m;
            const T rs = bwd_col_part(r, m, fl[i], gpb.data(), cs.data(), d);
            if (dla_b) dla_b[i] += rs;
            bwd_row_part(r, m, fl[i] - lai, gprev, rs, d, cs_next.data());
          }
          std::swap(cs, cs_next);
        }
      }
      // dC = gout P - dZ0 / eps; forbidden pairs (z0 = -inf) get exactly 0
      for (int64_t k = 0; k < nm; ++k) {
        T v = gout * pbuf[k];
        if (unrolled) v -= dz[k] * inv_eps;
        out[k] = static_cast<scalar_t>(is_neg_inf(z0[k]) ? T(0) : v);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// SinKD cost: softmax at temperature, then sum_c term(p_s - p_t) for every (student, teacher) pair
// ----------------------------------------------------------------------------------------------

// Softmax of rows (R, C) at temperature into out (acc); returns the first row with a non-finite
// logit, or -1. Rows in parallel.
template <class scalar_t>
int64_t softmax_rows(const scalar_t* x, int64_t R, int64_t C, acc_of_t<scalar_t> inv_t, acc_of_t<scalar_t>* out) {
  using T = acc_of_t<scalar_t>;
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* o = out + r * C;
      const scalar_t* xr = x + r * C;
      T chk = 0;
      for (int64_t c = 0; c < C; ++c) {
        o[c] = static_cast<T>(xr[c]);
        chk += o[c] * T(0);  // NaN for any inf or NaN
      }
      if (chk != chk) {
        int64_t cur = bad.load();
        while (r < cur && !bad.compare_exchange_weak(cur, r)) {}
        std::fill(o, o + C, T(0));
        continue;
      }
      const T lse = row_lse(o, C, inv_t);
      row_scaled_exp(o, C, inv_t, lse, T(1), o);
    }
  });
  return bad.load() == std::numeric_limits<int64_t>::max() ? -1 : bad.load();
}

template <class T> KDK_CPU_CLONES T pair_cost(const T* p, const T* q, int64_t C, int kind) {
  T s = 0;
  if (kind == kCostL1) {
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += std::abs(p[c] - q[c]);
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += (p[c] - q[c]) * (p[c] - q[c]);
  }
  return s;
}

// acc[c] += w * term'(p[c] - q[c])
template <class T> KDK_CPU_CLONES void pair_grad(const T* p, const T* q, int64_t C, int kind, T w, T* acc) {
  if (kind == kCostL1) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T d = p[c] - q[c];
      acc[c] += w * (T(d > T(0)) - T(d < T(0)));
    }
  } else {
    const T w2 = T(2) * w;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += w2 * (p[c] - q[c]);
  }
}

// The teacher in the student's dtype when it already is, else in the accumulation dtype (never
// rounded down to a lower precision than it came in).
at::Tensor teacher_like(const at::Tensor& t, c10::ScalarType student, c10::ScalarType acc) {
  return t.scalar_type() == student ? t.contiguous() : t.to(acc).contiguous();
}

template <class scalar_t>
int64_t teacher_softmax(const at::Tensor& t, int64_t R, int64_t C, acc_of_t<scalar_t> inv_t, acc_of_t<scalar_t>* out) {
  using T = acc_of_t<scalar_t>;
  if (t.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) return softmax_rows(t.data_ptr<scalar_t>(), R, C, inv_t, out);
  return softmax_rows(t.data_ptr<T>(), R, C, inv_t, out);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cpu(KDK_SINKHORN_FWD_ARGS) {
  const SinkhornArgs a = sinkhorn_parse(cost, log_a, log_b, eps, n_iters, tol);
  (void)validate;  // the CPU solve detects every data error itself, at no cost
  const at::Tensor c = cost.contiguous();
  const auto acc = c.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = c.options().dtype(acc);
  at::Tensor value = at::empty({a.B}, opts), F = at::empty({a.B, a.L, a.n}, opts), G = at::empty({a.B, a.L, a.m}, opts);
  at::Tensor iters = at::empty({a.B}, c.options().dtype(at::kInt));
  at::Tensor plan = return_plan ? at::empty({a.B, a.n, a.m}, opts) : at::empty({0}, opts);
  const at::Tensor la = log_a.has_value() ? log_a->contiguous() : at::Tensor();
  const at::Tensor lb = log_b.has_value() ? log_b->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "sinkhorn_fwd_cpu", [&] {
    using T = acc_of_t<scalar_t>;
    sinkhorn_fwd_impl<scalar_t>(a, c.data_ptr<scalar_t>(), la.defined() ? la.data_ptr<T>() : nullptr,
                                lb.defined() ? lb.data_ptr<T>() : nullptr, value.data_ptr<T>(), F.data_ptr<T>(),
                                G.data_ptr<T>(), iters.data_ptr<int32_t>(), return_plan ? plan.data_ptr<T>() : nullptr);
  });
  return {value, F, G, iters, plan};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cpu(KDK_SINKHORN_BWD_ARGS) {
  const SinkhornArgs a = sinkhorn_parse_bwd(grad_value, grad_plan, cost, log_a, log_b, f, g, iters, eps,
                                            std::string(grad));
  const at::Tensor c = cost.contiguous();
  const auto acc = c.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = c.options().dtype(acc);
  at::Tensor dcost = at::empty(c.sizes(), c.options());
  at::Tensor dla = at::zeros(log_a.has_value() ? at::IntArrayRef({a.B, a.n}) : at::IntArrayRef({0}), opts);
  at::Tensor dlb = at::zeros(log_b.has_value() ? at::IntArrayRef({a.B, a.m}) : at::IntArrayRef({0}), opts);
  const at::Tensor gv = grad_value.to(acc).contiguous();
  const at::Tensor gp = grad_plan.has_value() && a.grad == kGradUnrolled ? grad_plan->to(acc).contiguous() : at::Tensor();
  const at::Tensor la = log_a.has_value() ? log_a->contiguous() : at::Tensor();
  const at::Tensor lb = log_b.has_value() ? log_b->contiguous() : at::Tensor();
  const at::Tensor Fc = f.contiguous(), Gc = g.contiguous(), it = iters.contiguous();
  const bool want_marg = grad_marginals && a.grad == kGradUnrolled;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "sinkhorn_bwd_cpu", [&] {
    using T = acc_of_t<scalar_t>;
    sinkhorn_bwd_impl<scalar_t>(a, gv.data_ptr<T>(), gp.defined() ? gp.data_ptr<T>() : nullptr, c.data_ptr<scalar_t>(),
                                la.defined() ? la.data_ptr<T>() : nullptr, lb.defined() ? lb.data_ptr<T>() : nullptr,
                                Fc.data_ptr<T>(), Gc.data_ptr<T>(), it.data_ptr<int32_t>(), dcost.data_ptr<scalar_t>(),
                                want_marg && la.defined() ? dla.data_ptr<T>() : nullptr,
                                want_marg && lb.defined() ? dlb.data_ptr<T>() : nullptr);
  });
  return {dcost, dla, dlb};
}

at::Tensor sinkhorn_cost_fwd_cpu(KDK_SINKHORN_COST_FWD_ARGS) {
  const SinkhornCostArgs a = sinkhorn_cost_parse(student_logits, teacher_logits, temperature, std::string(cost));
  (void)validate;  // the CPU softmax checks finiteness itself
  const at::Tensor s = student_logits.contiguous();
  const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t = teacher_like(teacher_logits, s.scalar_type(), acc);
  at::Tensor out = at::empty({a.B, a.n, a.m}, s.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_cost_fwd_cpu", [&] {
    using T = acc_of_t<scalar_t>;
    const int64_t n = a.n, m = a.m, C = a.C;
    std::vector<T> ps(a.B * n * C), pt(a.B * m * C);
    const T inv_t = T(1) / T(a.temperature);
    int64_t bad = softmax_rows(s.data_ptr<scalar_t>(), a.B * n, C, inv_t, ps.data());
    KDK_CHECK("sinkhorn_kd_loss", bad < 0, sinkhorn_msg_logits("student_logits", bad / n, bad % n));
    bad = teacher_softmax<scalar_t>(t, a.B * m, C, inv_t, pt.data());
    KDK_CHECK("sinkhorn_kd_loss", bad < 0, sinkhorn_msg_logits("teacher_logits", bad / m, bad % m));
    T* o = out.data_ptr<T>();
    at::parallel_for(0, a.B * n, std::max<int64_t>(1, 8192 / std::max<int64_t>(m * C, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / n;
        const T* p = ps.data() + r * C;
        for (int64_t j = 0; j < m; ++j) o[r * m + j] = pair_cost(p, pt.data() + (b * m + j) * C, C, a.kind);
      }
    });
  });
  return out;
}

at::Tensor sinkhorn_cost_bwd_cpu(KDK_SINKHORN_COST_BWD_ARGS) {
  const SinkhornCostArgs a = sinkhorn_cost_parse(student_logits, teacher_logits, temperature, std::string(cost));
  const at::Tensor s = student_logits.contiguous();
  const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t = teacher_like(teacher_logits, s.scalar_type(), acc);
  KDK_CHECK("sinkhorn_kd_loss", grad_cost.sizes() == at::IntArrayRef({a.B, a.n, a.m}),
            "grad_cost must have shape ", shape_str({a.B, a.n, a.m}), ": got ", shape_str(grad_cost.sizes()));
  const at::Tensor dw = grad_cost.to(acc).contiguous();
  at::Tensor out = at::empty(s.sizes(), s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_cost_bwd_cpu", [&] {
    using T = acc_of_t<scalar_t>;
    const int64_t n = a.n, m = a.m, C = a.C;
    std::vector<T> ps(a.B * n * C), pt(a.B * m * C);
    const T inv_t = T(1) / T(a.temperature);
    softmax_rows(s.data_ptr<scalar_t>(), a.B * n, C, inv_t, ps.data());
    teacher_softmax<scalar_t>(t, a.B * m, C, inv_t, pt.data());
    const T* w = dw.data_ptr<T>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, a.B * n, std::max<int64_t>(1, 8192 / std::max<int64_t>(m * C, 1)), [&](int64_t r0, int64_t r1) {
      std::vector<T> dp(C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / n;
        const T* p = ps.data() + r * C;
        std::fill(dp.begin(), dp.end(), T(0));
        for (int64_t j = 0; j < m; ++j) {
          const T wj = w[r * m + j];
          if (wj != T(0)) pair_grad(p, pt.data() + (b * m + j) * C, C, a.kind, wj, dp.data());
        }
        // through the softmax at T: dy = (1/T) p (dp - <dp, p>)
        T dot = 0;
        for (int64_t c = 0; c < C; ++c) dot += dp[c] * p[c];
        for (int64_t c = 0; c < C; ++c) o[r * C + c] = static_cast<scalar_t>(inv_t * p[c] * (dp[c] - dot));
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("sinkhorn_fwd", &sinkhorn_fwd_cpu);
  m.impl("sinkhorn_bwd", &sinkhorn_bwd_cpu);
  m.impl("sinkhorn_cost_fwd", &sinkhorn_cost_fwd_cpu);
  m.impl("sinkhorn_cost_bwd", &sinkhorn_cost_bwd_cpu);
}

}  // namespace kdk
