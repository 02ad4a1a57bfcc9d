// CPU implementation of the token-relation ops: blocked over tokens, one optimised GEMM (at::mm) per
// block pair, the softmax statistics streamed over the tiles; never a T x T matrix.
//
// Relation losses: the similarity matrices of the student and the teacher are symmetric, so each
// unordered block pair (I <= J) is multiplied once and serves the rows of I (its tile) and the rows
// of J (the tile's columns). Forward: online (max, sum) statistics of both softmaxes per row (plus the
// shifted KL accumulator), a second pass for MSE. Backward: recompute the pair's tiles, form
// M = beta (w_i g_ij + w_j g_ji) elementwise from the saved row statistics, then dY_I += M Y_J and
// dY_J += M^T Y_I. GEMM work: forward T^2 (Ds + Dt) / 2 (MSE twice), backward T^2 (Ds + Dt) / 2 + T^2 Ds
// (+ T^2 Dt for the teacher), against 2 T^2 (Ds + Dt) of the materialised eager computation.
//
// Contrastive loss (no symmetry: student rows against teacher keys): blocks of query rows against all
// keys, a (rows x T) tile per GEMM; the teacher's gradient (when asked for) by a second sweep over key
// blocks. GEMM work: forward T^2 D, backward 2 T^2 D (+ 2 T^2 D for the teacher).
//
// Threads: GEMMs run single-threaded inside worker tasks (see SequentialBlas), one parallel region per
// pass. Block pairs share rows, so each worker accumulates into its own O(T) row state (forward)
// or its own gradient rows (backward), merged after the region. Extra memory per worker: two to four
// kTile x kTile tiles and O(T) (forward) or O(T D) (backward) accumulators.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/cpu_math.h"
#include "common/token_relation_args.h"
#include "common/token_relation_math.h"
#include "ops.h"

namespace kdk {
namespace {

constexpr int64_t kTile = 256;  // tokens per block of the relation losses

// Loop bodies are generic lambdas; forced inline so they are compiled for the x86-64-v3 clone of the
// function that runs them (a lambda is a function of its own, which target_clones does not clone).
#if defined(__GNUC__)
#define KDK_INLINE_LAMBDA __attribute__((always_inline))
#else
#define KDK_INLINE_LAMBDA
#endif

template <class T> T ninf() { return neg_inf<T>(); }

// A (rows x cols) contiguous view at the start of a flat buffer.
inline at::Tensor tile_view(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// ---------------------------------------------------------------------------------------------
// Lanes: a loop body written once as a generic lambda body(O, j), run on eight floats at a time
// (O = V8, cpu_math.h's explicit vectors: GCC does not vectorise fast_expf on its own) and then on
// the scalar tail (O = V1); double runs the scalar path only.
// ---------------------------------------------------------------------------------------------

struct V8 {
  using V = f8;
  static KDK_ALWAYS_INLINE V load(const float* p) { return load8(p); }
  static KDK_ALWAYS_INLINE void store(float* p, V v) { store8(p, v); }
  static KDK_ALWAYS_INLINE V splat(float x) { return splat8(x); }
  static KDK_ALWAYS_INLINE V exp(V x) { return exp8(x); }
  static KDK_ALWAYS_INLINE V max(V a, V b) { return a > b ? a : b; }
  static KDK_ALWAYS_INLINE float sum(V v) { return hsum8(v); }
};

template <class T> struct V1 {
  using V = T;
  static KDK_ALWAYS_INLINE V load(const T* p) { return *p; }
  static KDK_ALWAYS_INLINE void store(T* p, V v) { *p = v; }
  static KDK_ALWAYS_INLINE V splat(T x) { return x; }
  static KDK_ALWAYS_INLINE V exp(V x) { return fast_exp(x); }
  static KDK_ALWAYS_INLINE V max(V a, V b) { return std::max(a, b); }
  static KDK_ALWAYS_INLINE T sum(V v) { return v; }
};

// body(O, j) for j in [b, e): blocks of 8 through V8 for float, the rest through V1<T>.
template <class T, class F> KDK_ALWAYS_INLINE void lanes(int64_t b, int64_t e, const F& body) {
  int64_t j = b;
  if constexpr (std::is_same_v<T, float>)
    for (; j + 8 <= e; j += 8) body(V8{}, j);
  for (; j < e; ++j) body(V1<T>{}, j);
}

// Sums of up to three quantities over [0, n): body(O, j, s1, s2, s3) adds into the accumulators it is
// given (vectors in the main loop, scalars in the tail).
template <class T, class F> KDK_ALWAYS_INLINE void lane_sums(int64_t n, T& r1, T& r2, T& r3, const F& body) {
  int64_t j = 0;
  T s1 = 0, s2 = 0, s3 = 0;
  if constexpr (std::is_same_v<T, float>) {
    f8 v1 = splat8(0.f), v2 = splat8(0.f), v3 = splat8(0.f);
    for (; j + 8 <= n; j += 8) body(V8{}, j, v1, v2, v3);
    s1 = hsum8(v1);
    s2 = hsum8(v2);
    s3 = hsum8(v3);
  }
  for (; j < n; ++j) body(V1<T>{}, j, s1, s2, s3);
  r1 = s1;
  r2 = s2;
  r3 = s3;
}

// ---------------------------------------------------------------------------------------------
// Tile kernels of the relation losses. A, B: raw (unscaled) teacher / student similarities of a
// (bi x bj) block pair, row-major. "rows": the block's query rows against its bj keys; "cols": the
// keys' own rows (J) against the block's bi rows, read down the columns (vectorised along j).
// State pointers are offset to the first row concerned.
// ---------------------------------------------------------------------------------------------

template <class T, bool kAcc>
KDK_CPU_CLONES void rows_stats(const T* A, const T* B, int64_t bi, int64_t bj, T bt, T bs, T* ma, T* sa, T* mb,
                               T* sb, T* ac) {
  for (int64_t r = 0; r < bi; ++r) {
    const T* ar = A + r * bj;
    const T* br = B + r * bj;
    const T na = std::max(ma[r], row_max(ar, bj) * bt), nb = std::max(mb[r], row_max(br, bj) * bs);
    rel_rescale(ma[r], mb[r], sa[r], sb[r], ac[r], na, nb);
    T s1, s2, s3;
    lane_sums<T>(bj, s1, s2, s3, [&](auto o_, int64_t j, auto& v1, auto& v2, auto& v3) KDK_INLINE_LAMBDA {
      using O = decltype(o_);
      const auto xa = O::load(ar + j) * bt - na, xb = O::load(br + j) * bs - nb;
      const auto ea = O::exp(xa);
      v1 += ea;
      v2 += O::exp(xb);
      if constexpr (kAcc) v3 += ea * (xa - xb);
    });
    sa[r] += s1;
    sb[r] += s2;
    if constexpr (kAcc) ac[r] += s3;
  }
}

template <class T, bool kAcc>
KDK_CPU_CLONES void cols_stats(const T* A, const T* B, int64_t bi, int64_t bj, T bt, T bs, T* ma, T* sa, T* mb,
                               T* sb, T* ac, T* xa, T* xb) {
  std::fill(xa, xa + bj, ninf<T>());
  std::fill(xb, xb + bj, ninf<T>());
  for (int64_t i = 0; i < bi; ++i) {
    const T* ar = A + i * bj;
    const T* br = B + i * bj;
    lanes<T>(0, bj, [&](auto o_, int64_t c) KDK_INLINE_LAMBDA {
      using O = decltype(o_);
      O::store(xa + c, O::max(O::load(xa + c), O::load(ar + c)));
      O::store(xb + c, O::max(O::load(xb + c), O::load(br + c)));
    });
  }
  for (int64_t c = 0; c < bj; ++c)
    rel_rescale(ma[c], mb[c], sa[c], sb[c], ac[c], std::max(ma[c], xa[c] * bt), std::max(mb[c], xb[c] * bs));
  for (int64_t i = 0; i < bi; ++i) {
    const T* ar = A + i * bj;
    const T* br = B + i * bj;
    lanes<T>(0, bj, [&](auto o_, int64_t c) KDK_INLINE_LAMBDA {
      using O = decltype(o_);
      const auto ya = O::load(ar + c) * bt - O::load(ma + c), yb = O::load(br + c) * bs - O::load(mb + c);
      const auto ea = O::exp(ya);
      O::store(sa + c, O::load(sa + c) + ea);
      O::store(sb + c, O::load(sb + c) + O::exp(yb));
      if constexpr (kAcc) O::store(ac + c, O::load(ac + c) + ea * (ya - yb));
    });
  }
}

// Second MSE pass: with the row log-sum-exps known (lt, ls), accumulate the loss and the row constants.
template <class T>
KDK_CPU_CLONES void rows_mse(const T* A, const T* B, int64_t bi, int64_t bj, T bt, T bs, const T* lt, const T* ls,
                             T* l, T* cs, T* ct) {
  for (int64_t r = 0; r < bi; ++r) {
    const T* ar = A + r * bj;
    const T* br = B + r * bj;
    const T mt = lt[r], ms = ls[r];
    T s1, s2, s3;
    lane_sums<T>(bj, s1, s2, s3, [&](auto o_, int64_t j, auto& v1, auto& v2, auto& v3) KDK_INLINE_LAMBDA {
      using O = decltype(o_);
      rel_mse_terms(O::exp(O::load(ar + j) * bt - mt), O::exp(O::load(br + j) * bs - ms), v1, v2, v3);
    });
    l[r] += s1;
    cs[r] += s2;
    ct[r] += s3;
  }
}

template <class T>
KDK_CPU_CLONES void cols_mse(const T* A, const T* B, int64_t bi, int64_t bj, T bt, T bs, const T* lt, const T* ls,
                             T* l, T* cs, T* ct) {
  for (int64_t i = 0; i < bi; ++i) {
    const T* ar = A + i * bj;
    const T* br = B + i * bj;
    lanes<T>(0, bj, [&](auto o_, int64_t c) KDK_INLINE_LAMBDA {
      using O = decltype(o_);
      auto vl = O::load(l + c), vc = O::load(cs + c), vt = O::load(ct + c);
      rel_mse_terms(O::exp(O::load(ar + c) * bt - O::load(lt + c)), O::exp(O::load(br + c) * bs - O::load(ls + c)),
                    vl, vc, vt);
      O::store(l + c, vl);
      O::store(cs + c, vc);
      O::store(ct + c, vt);
    });
  }
}

// Per-row saved statistics of one problem in columns (structure of arrays) and the upstream weights.
template <class T> struct RowStats {
  const T* lt;  // log-sum-exp of the teacher row
  const T* ls;  // ... of the student row
  const T* cs;  // student row constant
  const T* ct;  // teacher row constant
  const T* w;   // upstream gradient / H
};

// M tiles of a block pair: Ms = beta_s (w_i gs_ij + w_j gs_ji), Mt likewise for the teacher (kTeacher).
template <int kLoss, bool kTeacher, class T>
KDK_CPU_CLONES void bwd_tile(const T* A, const T* B, int64_t bi, int64_t bj, T bt, T bs, RowStats<T> si,
                             RowStats<T> sj, T* Ms, T* Mt) {
  for (int64_t r = 0; r < bi; ++r) {
    const T* ar = A + r * bj;
    const T* br = B + r * bj;
    T* ms = Ms + r * bj;
    T* mt = kTeacher ? Mt + r * bj : nullptr;
    const T lti = si.lt[r], lsi = si.ls[r], csi = si.cs[r], cti = si.ct[r], wi = si.w[r];
    lanes<T>(0, bj, [&](auto o_, int64_t c) KDK_INLINE_LAMBDA {
      using O = decltype(o_);
      const auto a = O::load(ar + c) * bt, b = O::load(br + c) * bs;
      const auto lpti = a - lti, lpsi = b - lsi, lptj = a - O::load(sj.lt + c), lpsj = b - O::load(sj.ls + c);
      const auto pti = O::exp(lpti), psi = O::exp(lpsi), ptj = O::exp(lptj), psj = O::exp(lpsj);
      const auto wj = O::load(sj.w + c);
      O::store(ms + c, (rel_coef_student<kLoss>(pti, psi, O::splat(csi)) * wi +
                        rel_coef_student<kLoss>(ptj, psj, O::load(sj.cs + c)) * wj) * bs);
      if constexpr (kTeacher)
        O::store(mt + c, (rel_coef_teacher<kLoss>(pti, psi, lpti, lpsi, O::splat(cti)) * wi +
                          rel_coef_teacher<kLoss>(ptj, psj, lptj, lpsj, O::load(sj.ct + c)) * wj) * bt);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------------------------

}  // namespace
}  // namespace kdk

// MKL's per-thread thread count (its C entry point; the lowercase mkl_set_num_threads_local symbol is
// the Fortran one, taking an int*), where torch links MKL (libtorch_cpu exports it); a null weak symbol
// elsewhere (e.g. OpenBLAS builds, whose OpenMP builds already run sequentially inside a parallel region).
#if defined(__GNUC__) && defined(__linux__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define KDK_HAVE_MKL_LOCAL 1
#endif

namespace kdk {
namespace {

// Single-threaded BLAS for the lifetime of the guard, on this thread. ATen configures MKL with
// mkl_set_dynamic(false), so a GEMM called from a worker of at::parallel_for would start a nested team
// of threads: measured 10-30x slower than sequential GEMMs on a 2-core machine.
struct SequentialBlas {
  int prev = 0;
  SequentialBlas() {
#ifdef KDK_HAVE_MKL_LOCAL
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SequentialBlas() {
#ifdef KDK_HAVE_MKL_LOCAL
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
#endif
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
};

// Tile buffers of one worker.
template <class T> struct Tiles {
  at::Tensor ta, tb, ms, mt;
  std::vector<T> tmp;  // column maxima of a tile
};

// One set of tile buffers per thread, indexed by the worker slot (see Exec).
template <class T> struct Workers {
  std::vector<Tiles<T>> w;
  Workers(const at::TensorOptions& opts, int64_t elems, bool grads) : w(at::get_num_threads()) {
    for (auto& t : w) {
      t.ta = at::empty({elems}, opts);
      t.tb = at::empty({elems}, opts);
      if (grads) {
        t.ms = at::empty({elems}, opts);
        t.mt = at::empty({elems}, opts);
      }
      t.tmp.resize(2 * kTile);
    }
  }
};

// How the items of one problem run: spread over the threads in one parallel region (`parallel`, each
// item gets its worker's slot), or all on the calling worker `slot` (when the problems themselves run in
// parallel). The slot is passed explicitly: at::parallel_for called inside a parallel region runs inline
// and resets at::get_thread_num() to 0, so it cannot tell the outer workers apart.
struct Exec {
  bool parallel;
  int64_t slot;
  int64_t workers(int64_t items) const {
    return parallel ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items)) : 1;
  }
  template <class F> void items(int64_t n, const F& f) const {
    if (!parallel || n <= 1 || at::get_num_threads() == 1) {
      const SequentialBlas blas;
      for (int64_t k = 0; k < n; ++k) f(parallel ? 0 : slot, k);
      return;
    }
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      const SequentialBlas blas;
      const int64_t worker = at::get_thread_num();  // set by at::parallel_for for its own region
      for (int64_t k = b; k < e; ++k) f(worker, k);
    });
  }
};

// Every block pair (I <= J) of nb blocks.
std::vector<std::pair<int64_t, int64_t>> block_pairs(int64_t nb) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = i; j < nb; ++j) pairs.emplace_back(i, j);
  return pairs;
}

// ---------------------------------------------------------------------------------------------
// One relation problem (one instance and head): ys (n, ds), yt (n, dt) in T, the first L rows valid.
// ---------------------------------------------------------------------------------------------

template <class T>
void rel_fwd_problem(const RelationArgs& a, const at::Tensor& ys, const at::Tensor& yt, int64_t L, T* loss_h, T* stat,
                     Workers<T>& ws, const Exec& ex) {
  const T bt = static_cast<T>(a.beta_t), bs = static_cast<T>(a.beta_s);
  const bool kl = a.loss == kRelKL;
  const auto pairs = block_pairs((L + kTile - 1) / kTile);
  const int64_t nw = ex.workers(static_cast<int64_t>(pairs.size()));
  // Row state of each worker: ma, sa, mb, sb, ac (pass 2 of MSE: lse_t, loss, lse_s, cs, ct).
  std::vector<T> states(static_cast<size_t>(nw * 5 * L));
  auto field = [&](int64_t slot, int k) { return states.data() + (slot * 5 + k) * L; };
  for (int64_t w = 0; w < nw; ++w) {
    std::fill(field(w, 0), field(w, 0) + L, ninf<T>());
    std::fill(field(w, 1), field(w, 1) + L, T(0));
    std::fill(field(w, 2), field(w, 2) + L, ninf<T>());
    std::fill(field(w, 3), field(w, 3) + L, T(0));
    std::fill(field(w, 4), field(w, 4) + L, T(0));
  }
  for (int pass = 0; pass < (kl ? 1 : 2); ++pass) {
    ex.items(static_cast<int64_t>(pairs.size()), [&](int64_t slot, int64_t k) {
      Tiles<T>& w = ws.w[slot];
      const int64_t own = ex.parallel ? slot : 0;  // this worker's row state
      T *ma = field(own, 0), *sa = field(own, 1), *mb = field(own, 2), *sb = field(own, 3), *ac = field(own, 4);
      if (pass == 1) {  // the log-sum-exps of every row live in worker 0's state
        ma = field(0, 0);
        mb = field(0, 2);
      }
      const int64_t i0 = pairs[k].first * kTile, j0 = pairs[k].second * kTile;
      const int64_t bi = std::min(kTile, L - i0), bj = std::min(kTile, L - j0);
      at::Tensor At = tile_view(w.ta, bi, bj), Bt = tile_view(w.tb, bi, bj);
      at::mm_out(At, yt.narrow(0, i0, bi), yt.narrow(0, j0, bj).t());
      at::mm_out(Bt, ys.narrow(0, i0, bi), ys.narrow(0, j0, bj).t());
      const T* A = At.data_ptr<T>();
      const T* B = Bt.data_ptr<T>();
      T* xa = w.tmp.data();
      if (pass == 0) {
        if (kl) rows_stats<T, true>(A, B, bi, bj, bt, bs, ma + i0, sa + i0, mb + i0, sb + i0, ac + i0);
        else rows_stats<T, false>(A, B, bi, bj, bt, bs, ma + i0, sa + i0, mb + i0, sb + i0, ac + i0);
        if (j0 != i0) {
          if (kl) cols_stats<T, true>(A, B, bi, bj, bt, bs, ma + j0, sa + j0, mb + j0, sb + j0, ac + j0, xa, xa + kTile);
          else cols_stats<T, false>(A, B, bi, bj, bt, bs, ma + j0, sa + j0, mb + j0, sb + j0, ac + j0, xa, xa + kTile);
        }
      } else {
        rows_mse<T>(A, B, bi, bj, bt, bs, ma + i0, mb + i0, sa + i0, sb + i0, ac + i0);
        if (j0 != i0) cols_mse<T>(A, B, bi, bj, bt, bs, ma + j0, mb + j0, sa + j0, sb + j0, ac + j0);
      }
    });
    // Merge the workers into worker 0 and finish the pass.
    T *ma = field(0, 0), *sa = field(0, 1), *mb = field(0, 2), *sb = field(0, 3), *ac = field(0, 4);
    for (int64_t w = 1; w < nw; ++w) {
      T *ma2 = field(w, 0), *sa2 = field(w, 1), *mb2 = field(w, 2), *sb2 = field(w, 3), *ac2 = field(w, 4);
      for (int64_t i = 0; i < L; ++i) {
        if (pass == 0) {  // bring both states to the common maxima, then add
          const T na = std::max(ma[i], ma2[i]), nb = std::max(mb[i], mb2[i]);
          rel_rescale(ma[i], mb[i], sa[i], sb[i], ac[i], na, nb);
          rel_rescale(ma2[i], mb2[i], sa2[i], sb2[i], ac2[i], na, nb);
        }
        sa[i] += sa2[i];
        sb[i] += sb2[i];
        ac[i] += ac2[i];
      }
    }
    if (pass == 0) {
      for (int64_t i = 0; i < L; ++i) {
        T* st = stat + i * kRelStats;
        st[kStatLseT] = ma[i] + std::log(sa[i]);
        st[kStatLseS] = mb[i] + std::log(sb[i]);
        if (kl) {
          const T l = rel_kl_final(sa[i], sb[i], ac[i]);
          loss_h[i] = l;
          st[kStatCS] = 0;
          st[kStatCT] = l;
        }
      }
      if (!kl) {  // pass 2: lse in worker 0's ma / mb, accumulators zeroed in every worker
        for (int64_t i = 0; i < L; ++i) {
          ma[i] = stat[i * kRelStats + kStatLseT];
          mb[i] = stat[i * kRelStats + kStatLseS];
        }
        for (int64_t w = 0; w < nw; ++w)
          for (int f : {1, 3, 4}) std::fill(field(w, f), field(w, f) + L, T(0));
      }
    } else {
      for (int64_t i = 0; i < L; ++i) {
        loss_h[i] = sa[i];
        stat[i * kRelStats + kStatCS] = sb[i];
        stat[i * kRelStats + kStatCT] = ac[i];
      }
    }
  }
}

template <int kLoss, bool kTeacher, class T>
void rel_bwd_problem(const RelationArgs& a, const at::Tensor& ys, const at::Tensor& yt, int64_t L, const T* stat,
                     const T* wrow, const at::Tensor& gs, const at::Tensor& gt, Workers<T>& ws, const Exec& ex) {
  const T bt = static_cast<T>(a.beta_t), bs = static_cast<T>(a.beta_s);
  // The saved statistics as columns, and the row weights grad_loss / H.
  std::vector<T> cols(static_cast<size_t>(5 * L));
  T* lt = cols.data();
  T* ls = lt + L;
  T* cs = ls + L;
  T* ct = cs + L;
  T* wr = ct + L;
  const T inv_h = T(1) / static_cast<T>(a.H);
  for (int64_t i = 0; i < L; ++i) {
    lt[i] = stat[i * kRelStats + kStatLseT];
    ls[i] = stat[i * kRelStats + kStatLseS];
    cs[i] = stat[i * kRelStats + kStatCS];
    ct[i] = stat[i * kRelStats + kStatCT];
    wr[i] = wrow[i] * inv_h;
  }
  const auto pairs = block_pairs((L + kTile - 1) / kTile);
  const int64_t nw = ex.workers(static_cast<int64_t>(pairs.size()));
  // Worker 0 accumulates into the outputs, the others into their own rows, added at the end.
  std::vector<at::Tensor> gsw(nw), gtw(nw);
  gsw[0] = gs.narrow(0, 0, L);
  if (kTeacher) gtw[0] = gt.narrow(0, 0, L);
  for (int64_t w = 1; w < nw; ++w) {
    gsw[w] = at::zeros({L, gs.size(1)}, gs.options());
    if (kTeacher) gtw[w] = at::zeros({L, gt.size(1)}, gt.options());
  }
  ex.items(static_cast<int64_t>(pairs.size()), [&](int64_t slot, int64_t k) {
    Tiles<T>& w = ws.w[slot];
    const int64_t own = ex.parallel ? slot : 0;  // this worker's gradient rows
    const int64_t i0 = pairs[k].first * kTile, j0 = pairs[k].second * kTile;
    const int64_t bi = std::min(kTile, L - i0), bj = std::min(kTile, L - j0);
    const RowStats<T> si{lt + i0, ls + i0, cs + i0, ct + i0, wr + i0};
    const RowStats<T> sj{lt + j0, ls + j0, cs + j0, ct + j0, wr + j0};
    at::Tensor At = tile_view(w.ta, bi, bj), Bt = tile_view(w.tb, bi, bj);
    at::Tensor Ms = tile_view(w.ms, bi, bj), Mt = tile_view(w.mt, bi, bj);
    at::mm_out(At, yt.narrow(0, i0, bi), yt.narrow(0, j0, bj).t());
    at::mm_out(Bt, ys.narrow(0, i0, bi), ys.narrow(0, j0, bj).t());
    bwd_tile<kLoss, kTeacher, T>(At.data_ptr<T>(), Bt.data_ptr<T>(), bi, bj, bt, bs, si, sj, Ms.data_ptr<T>(),
                                 Mt.data_ptr<T>());
    const at::Tensor& g = gsw[own];
    g.narrow(0, i0, bi).addmm_(Ms, ys.narrow(0, j0, bj));
    if (j0 != i0) g.narrow(0, j0, bj).addmm_(Ms.t(), ys.narrow(0, i0, bi));
    if constexpr (kTeacher) {
      const at::Tensor& h = gtw[own];
      h.narrow(0, i0, bi).addmm_(Mt, yt.narrow(0, j0, bj));
      if (j0 != i0) h.narrow(0, j0, bj).addmm_(Mt.t(), yt.narrow(0, i0, bi));
    }
  });
  for (int64_t w = 1; w < nw; ++w) {
    gsw[0].add_(gsw[w]);
    if (kTeacher) gtw[0].add_(gtw[w]);
  }
}

// Problems in parallel (each on one thread) when there are enough of them to share out evenly or they
// are small; else one after the other, each spreading its block pairs (or row blocks) over the threads.
bool problems_in_parallel(int64_t Q, int64_t n) {
  const int64_t nt = at::get_num_threads();
  return nt > 1 && Q > 1 && (Q % nt == 0 || Q >= 4 * nt || n <= kTile);
}

int64_t problem_len(const TokenOrder& o, int64_t p, int64_t n) {
  return o.lens.defined() ? static_cast<int64_t>(o.lens.data_ptr<int32_t>()[p]) : n;
}

// f(q, exec) for every problem q.
template <class F> void for_problems(int64_t Q, int64_t n, const F& f) {
  if (problems_in_parallel(Q, n)) Exec{true, 0}.items(Q, [&](int64_t slot, int64_t q) { f(q, Exec{false, slot}); });
  else for (int64_t q = 0; q < Q; ++q) f(q, Exec{true, 0});
}

// ---------------------------------------------------------------------------------------------
// Contrastive: blocks of R student rows (queries) against every teacher token (key), in parallel.
// ---------------------------------------------------------------------------------------------

// Rows per block: a (rows x n) tile of about 2^18 elements (1 MiB in float32) per worker, sized for the
// longest problem; at n = 4096 that is 64 x 4096, still a GEMM MKL runs near its peak.
int64_t con_rows(int64_t n) {
  return std::max<int64_t>(8, std::min<int64_t>(256, (int64_t(1) << 18) / std::max<int64_t>(n, 1)));
}

template <class T>
void con_fwd_problem(const at::Tensor& s, const at::Tensor& t, int64_t L, int64_t R, T beta, T* loss, T* lse,
                     Workers<T>& ws, const Exec& ex) {
  const at::Tensor tk = t.narrow(0, 0, L);
  ex.items((L + R - 1) / R, [&](int64_t slot, int64_t b) {
    const int64_t i0 = b * R, bi = std::min(R, L - i0);
    at::Tensor C = tile_view(ws.w[slot].ta, bi, L);
    at::mm_out(C, s.narrow(0, i0, bi), tk.t());
    const T* c = C.data_ptr<T>();
    for (int64_t r = 0; r < bi; ++r) {
      const T l = row_lse(c + r * L, L, beta);
      lse[i0 + r] = l;
      loss[i0 + r] = l - beta * c[r * L + i0 + r];
    }
  });
}

// Query rows i0.. of C = S_I T^T -> G = beta w_i (softmax_j - [j == i]).
template <class T>
KDK_CPU_CLONES void con_grad_rows(T* c, int64_t L, int64_t bi, int64_t i0, T beta, const T* lse, const T* wrow) {
  for (int64_t r = 0; r < bi; ++r) {
    T* cr = c + r * L;
    const T m = lse[i0 + r], k = beta * wrow[i0 + r];
    lanes<T>(0, L, [&](auto o_, int64_t j) KDK_INLINE_LAMBDA {
      using O = decltype(o_); O::store(cr + j, O::exp(O::load(cr + j) * beta - m) * k); });
    cr[i0 + r] -= k;
  }
}

// Key rows j0.. of C^T = T_J S^T -> G^T = beta w_i (softmax_ij - [j == i]), read along the queries i.
template <class T>
KDK_CPU_CLONES void con_grad_keys(T* c, int64_t L, int64_t bj, int64_t j0, T beta, const T* lse, const T* wrow) {
  for (int64_t r = 0; r < bj; ++r) {
    T* cr = c + r * L;
    lanes<T>(0, L, [&](auto o_, int64_t i) KDK_INLINE_LAMBDA {
      using O = decltype(o_);
      O::store(cr + i, O::exp(O::load(cr + i) * beta - O::load(lse + i)) * O::load(wrow + i) * beta);
    });
    cr[j0 + r] -= beta * wrow[j0 + r];
  }
}

// dS (row blocks of queries) and, with gt defined, dT (row blocks of keys: a second sweep, race-free).
template <class T>
void con_bwd_problem(const at::Tensor& s, const at::Tensor& t, int64_t L, int64_t R, T beta, const T* lse,
                     const T* wrow, const at::Tensor& gs, const at::Tensor& gt, Workers<T>& ws, const Exec& ex) {
  const at::Tensor tk = t.narrow(0, 0, L), sk = s.narrow(0, 0, L);
  for (int side = 0; side < (gt.defined() ? 2 : 1); ++side) {
    const at::Tensor& own = side == 0 ? sk : tk;
    const at::Tensor& other = side == 0 ? tk : sk;
    const at::Tensor& out = side == 0 ? gs : gt;
    ex.items((L + R - 1) / R, [&](int64_t slot, int64_t b) {
      const int64_t i0 = b * R, bi = std::min(R, L - i0);
      at::Tensor C = tile_view(ws.w[slot].ta, bi, L);
      at::mm_out(C, own.narrow(0, i0, bi), other.t());
      if (side == 0) con_grad_rows<T>(C.data_ptr<T>(), L, bi, i0, beta, lse, wrow);
      else con_grad_keys<T>(C.data_ptr<T>(), L, bi, i0, beta, lse, wrow);
      at::Tensor gI = out.narrow(0, i0, bi);
      at::mm_out(gI, C, other);
    });
  }
}

at::ScalarType acc_type(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_relation_fwd_cpu(KDK_TOKEN_RELATION_FWD_ARGS) {
  const RelationArgs a = token_relation_parse(student, teacher, mask, std::string(loss), std::string(similarity),
                                              num_heads, temperature, tau);
  const auto acc = acc_type(student);
  const auto opts = student.options().dtype(acc);
  at::Tensor stat = at::zeros({a.P, a.H, a.n, kRelStats}, opts);
  if (a.P == 0) return {at::zeros({a.P, a.n}, opts), stat};
  const TokenOrder o = token_order(mask);
  const at::Tensor ys = token_heads(student, o, a.H, a.cosine, acc), yt = token_heads(teacher, o, a.H, a.cosine, acc);
  const int64_t Q = a.P * a.H, n = a.n;
  at::Tensor loss_h = at::zeros({Q, n}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "token_relation_fwd_cpu", [&] {
    using T = scalar_t;
    const at::Tensor ysq = ys.view({Q, n, a.ds}), ytq = yt.view({Q, n, a.dt});
    T* lh = loss_h.data_ptr<T>();
    T* st = stat.data_ptr<T>();
    Workers<T> ws(opts, kTile * kTile, false);
    for_problems(Q, n, [&](int64_t q, const Exec& ex) {
      const int64_t L = problem_len(o, q / a.H, n);
      if (L > 0) rel_fwd_problem<T>(a, ysq[q], ytq[q], L, lh + q * n, st + q * n * kRelStats, ws, ex);
    });
  });
  return {token_unorder_rows(loss_h.view({a.P, a.H, n}).mean(1), o), stat};
}

std::tuple<at::Tensor, at::Tensor> token_relation_bwd_cpu(KDK_TOKEN_RELATION_BWD_ARGS) {
  const RelationArgs a = token_relation_parse(student, teacher, mask, std::string(loss), std::string(similarity),
                                              num_heads, temperature, tau);
  token_relation_check_saved(a, grad_loss, stat, student);
  const auto acc = acc_type(student);
  const auto opts = student.options().dtype(acc);
  const int64_t Q = a.P * a.H, n = a.n;
  if (a.P == 0)
    return {at::zeros_like(student, at::MemoryFormat::Contiguous),
            teacher_grad ? at::zeros_like(teacher, at::MemoryFormat::Contiguous) : at::empty({0}, teacher.options())};
  at::Tensor gs = at::zeros({a.P, a.H, n, a.ds}, opts);
  at::Tensor gt = teacher_grad ? at::zeros({a.P, a.H, n, a.dt}, opts) : at::Tensor();
  const TokenOrder o = token_order(mask);
  const at::Tensor ys = token_heads(student, o, a.H, a.cosine, acc), yt = token_heads(teacher, o, a.H, a.cosine, acc);
  const at::Tensor wrow = token_order_rows(grad_loss.to(acc), o).contiguous();
  const at::Tensor st = stat.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "token_relation_bwd_cpu", [&] {
    using T = scalar_t;
    const at::Tensor ysq = ys.view({Q, n, a.ds}), ytq = yt.view({Q, n, a.dt});
    const at::Tensor gsq = gs.view({Q, n, a.ds});
    const at::Tensor gtq = teacher_grad ? gt.view({Q, n, a.dt}) : at::Tensor();
    const T* pst = st.data_ptr<T>();
    const T* pw = wrow.data_ptr<T>();
    Workers<T> ws(opts, kTile * kTile, true);
    for_problems(Q, n, [&](int64_t q, const Exec& ex) {
      const int64_t p = q / a.H, L = problem_len(o, p, n);
      if (L == 0) return;
      const T* sq = pst + q * n * kRelStats;
      const T* wq = pw + p * n;
      const at::Tensor gtqq = teacher_grad ? gtq[q] : at::Tensor();
      if (a.loss == kRelKL) {
        if (teacher_grad) rel_bwd_problem<kRelKL, true, T>(a, ysq[q], ytq[q], L, sq, wq, gsq[q], gtqq, ws, ex);
        else rel_bwd_problem<kRelKL, false, T>(a, ysq[q], ytq[q], L, sq, wq, gsq[q], gtqq, ws, ex);
      } else {
        if (teacher_grad) rel_bwd_problem<kRelMSE, true, T>(a, ysq[q], ytq[q], L, sq, wq, gsq[q], gtqq, ws, ex);
        else rel_bwd_problem<kRelMSE, false, T>(a, ysq[q], ytq[q], L, sq, wq, gsq[q], gtqq, ws, ex);
      }
    });
  });
  return {token_heads_backward(gs, student, o, a.H, a.cosine),
          teacher_grad ? token_heads_backward(gt, teacher, o, a.H, a.cosine) : at::empty({0}, teacher.options())};
}

std::tuple<at::Tensor, at::Tensor> token_contrastive_fwd_cpu(KDK_TOKEN_CONTRASTIVE_FWD_ARGS) {
  const ContrastiveArgs a = token_contrastive_parse(student, teacher, mask, std::string(similarity), tau);
  const auto acc = acc_type(student);
  const auto opts = student.options().dtype(acc);
  at::Tensor loss = at::zeros({a.P, a.n}, opts), lse = at::zeros({a.P, a.n}, opts);
  if (a.P == 0) return {loss, lse};
  const TokenOrder o = token_order(mask);
  const at::Tensor s = token_heads(student, o, 1, a.cosine, acc).view({a.P, a.n, a.D});
  const at::Tensor t = token_heads(teacher, o, 1, a.cosine, acc).view({a.P, a.n, a.D});
  const int64_t R = con_rows(a.n);
  AT_DISPATCH_FLOATING_TYPES(acc, "token_contrastive_fwd_cpu", [&] {
    using T = scalar_t;
    T* pl = loss.data_ptr<T>();
    T* pe = lse.data_ptr<T>();
    Workers<T> ws(opts, R * a.n, false);
    for_problems(a.P, a.n, [&](int64_t q, const Exec& ex) {
      const int64_t L = problem_len(o, q, a.n);
      if (L > 0) con_fwd_problem<T>(s[q], t[q], L, R, static_cast<T>(a.beta), pl + q * a.n, pe + q * a.n, ws, ex);
    });
  });
  return {token_unorder_rows(loss, o), lse};
}

std::tuple<at::Tensor, at::Tensor> token_contrastive_bwd_cpu(KDK_TOKEN_CONTRASTIVE_BWD_ARGS) {
  const ContrastiveArgs a = token_contrastive_parse(student, teacher, mask, std::string(similarity), tau);
  token_contrastive_check_saved(a, grad_loss, lse, student);
  const auto acc = acc_type(student);
  const auto opts = student.options().dtype(acc);
  if (a.P == 0)
    return {at::zeros_like(student, at::MemoryFormat::Contiguous),
            teacher_grad ? at::zeros_like(teacher, at::MemoryFormat::Contiguous) : at::empty({0}, teacher.options())};
  const TokenOrder o = token_order(mask);
  const at::Tensor s = token_heads(student, o, 1, a.cosine, acc).view({a.P, a.n, a.D});
  const at::Tensor t = token_heads(teacher, o, 1, a.cosine, acc).view({a.P, a.n, a.D});
  const at::Tensor wrow = token_order_rows(grad_loss.to(acc), o).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor gs = at::zeros({a.P, 1, a.n, a.D}, opts);
  at::Tensor gt = teacher_grad ? at::zeros({a.P, 1, a.n, a.D}, opts) : at::Tensor();
  const int64_t R = con_rows(a.n);
  AT_DISPATCH_FLOATING_TYPES(acc, "token_contrastive_bwd_cpu", [&] {
    using T = scalar_t;
    const T* pe = lse_c.data_ptr<T>();
    const T* pw = wrow.data_ptr<T>();
    Workers<T> ws(opts, R * a.n, false);
    for_problems(a.P, a.n, [&](int64_t q, const Exec& ex) {
      const int64_t L = problem_len(o, q, a.n);
      if (L > 0)
        con_bwd_problem<T>(s[q], t[q], L, R, static_cast<T>(a.beta), pe + q * a.n, pw + q * a.n, gs[q][0],
                           teacher_grad ? gt[q][0] : at::Tensor(), ws, ex);
    });
  });
  return {token_heads_backward(gs, student, o, 1, a.cosine),
          teacher_grad ? token_heads_backward(gt, teacher, o, 1, a.cosine) : at::empty({0}, teacher.options())};
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("token_relation_fwd", &token_relation_fwd_cpu);
  m.impl("token_relation_bwd", &token_relation_bwd_cpu);
  m.impl("token_contrastive_fwd", &token_contrastive_fwd_cpu);
  m.impl("token_contrastive_bwd", &token_contrastive_bwd_cpu);
}

}  // namespace kdk
