// Runs the CUDA kernels of csrc/kernels/attention.cuh on the host (attention_shim.h) against a naive float64
// reference: forward (attention and shared), backward (with and without dQ/dK), materialised probabilities and their
// backward, and the layer similarity, in float32 and float64. Built and run by
// tests/test_attention.py::test_cuda_kernels_host_emulation (KDKERNELS_CUDA_EMU=1), or by hand:
//   g++ -std=c++20 -O1 -pthread -Icsrc tests/cuda_emu/attention_emu.cpp -o emu
//   ./emu [quick]
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>
#include "attention_shim.h"
#include "kernels/attention.cuh"
using namespace kdk;

static std::mt19937_64 rng(1234);
static double rnd() { return std::normal_distribution<double>(0.0, 1.0)(rng); }
static double urand() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng); }
static int failures = 0;

static void check(const char* what, const std::vector<double>& got, const std::vector<double>& ref, double tol) {
  double worst = 0, scale = 0;
  size_t at = 0;
  for (size_t i = 0; i < ref.size(); ++i) scale = std::max(scale, std::fabs(ref[i]));
  for (size_t i = 0; i < ref.size(); ++i) {
    double d;
    if (std::isinf(ref[i]) || std::isinf(got[i])) d = (ref[i] == got[i]) ? 0 : INFINITY;
    else d = std::fabs(got[i] - ref[i]);
    if (!(d <= worst)) { worst = d; at = i; }
  }
  const bool ok = worst <= tol * std::max(scale, 1.0);
  if (!ok) ++failures;
  printf("  %-28s max err %.3g (scale %.3g) %s", what, worst, scale, ok ? "ok" : "FAIL");
  if (!ok) printf("  at %zu got %g ref %g", at, got[at], ref[at]);
  printf("\n");
}

struct Case { int B, H, Hk, Tq, Tk, D, Dv; bool causal; int mask_kind; };

template <class T> void run(const Case& c, double tol) {
  const int B = c.B, H = c.H, Hk = c.Hk, Tq = c.Tq, Tk = c.Tk, D = c.D, Dv = c.Dv, g = H / Hk;
  const double scale = 1.0 / std::sqrt(double(D)) * 1.3;
  printf("case B%d H%d Hk%d Tq%d Tk%d D%d Dv%d causal%d mask%d %s\n", B, H, Hk, Tq, Tk, D, Dv, c.causal, c.mask_kind,
         sizeof(T) == 8 ? "double" : "float");
  // q laid out (B, Tq, H, D) (a transposed view, as HF gives it); k, v contiguous
  std::vector<T> q(size_t(B) * Tq * H * D), k(size_t(B) * Hk * Tk * D), v(size_t(B) * Hk * Tk * Dv),
      dout(size_t(B) * H * Tq * Dv);
  for (auto* vec : {&q, &k, &v, &dout}) for (auto& x : *vec) x = T(rnd());
  auto Q = [&](int b, int h, int i, int d) { return double(q[((size_t(b) * Tq + i) * H + h) * D + d]); };
  auto K = [&](int b, int h, int j, int d) { return double(k[((size_t(b) * Hk + h) * Tk + j) * D + d]); };
  auto V = [&](int b, int h, int j, int d) { return double(v[((size_t(b) * Hk + h) * Tk + j) * Dv + d]); };
  // masks: 0 none; 1 key padding (B, 1, 1, Tk) broadcast with strides 0; 2 full random with fully masked rows
  std::unique_ptr<bool[]> mask;
  int64_t m_sb = 0, m_sh = 0, m_sq = 0, m_sk = 0;
  if (c.mask_kind == 1) {
    mask.reset(new bool[size_t(B) * Tk]);
    for (int b = 0; b < B; ++b) for (int j = 0; j < Tk; ++j) mask[b * Tk + j] = j < Tk - 3 * b;
    m_sb = Tk; m_sk = 1;
  } else if (c.mask_kind == 2) {
    mask.reset(new bool[size_t(B) * H * Tq * Tk]);
    for (size_t i = 0; i < size_t(B) * H * Tq * Tk; ++i) mask[i] = urand() > 0.3;
    for (int j = 0; j < Tk; ++j) mask[(size_t(0) * H * Tq + 2) * Tk + j] = false;            // b0 h0 row 2
    for (int j = 0; j < Tk; ++j) mask[((size_t(1 % B) * H + H - 1) * Tq + Tq - 1) * Tk + j] = false;
    m_sb = int64_t(H) * Tq * Tk; m_sh = int64_t(Tq) * Tk; m_sq = Tk; m_sk = 1;
  }
  auto vis = [&](int b, int h, int i, int j) {
    if (c.causal && j > i + (Tk - Tq)) return false;
    if (mask && !mask[b * m_sb + h * m_sh + i * m_sq + j * m_sk]) return false;
    return true;
  };
  // reference
  const size_t nq = size_t(B) * H * Tq;
  std::vector<double> P(nq * Tk), lse(nq), out(nq * Dv), dq(nq * D, 0), dk(size_t(B) * Hk * Tk * D, 0),
      dv(size_t(B) * Hk * Tk * Dv, 0), ds(nq * Tk), S(nq * Tk);
  for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int i = 0; i < Tq; ++i) {
    const size_t row = (size_t(b) * H + h) * Tq + i;
    double m = -INFINITY;
    for (int j = 0; j < Tk; ++j) {
      double s = 0;
      for (int d = 0; d < D; ++d) s += Q(b, h, i, d) * K(b, h / g, j, d);
      S[row * Tk + j] = s;
      s *= scale;
      P[row * Tk + j] = vis(b, h, i, j) ? s : -INFINITY;
      m = std::max(m, P[row * Tk + j]);
    }
    double sum = 0;
    for (int j = 0; j < Tk; ++j) sum += m == -INFINITY ? 0 : std::exp(P[row * Tk + j] - m);
    lse[row] = m == -INFINITY ? -INFINITY : m + std::log(sum);
    for (int j = 0; j < Tk; ++j) P[row * Tk + j] = lse[row] == -INFINITY ? 0 : std::exp(P[row * Tk + j] - lse[row]);
    for (int d = 0; d < Dv; ++d) {
      double o = 0;
      for (int j = 0; j < Tk; ++j) o += P[row * Tk + j] * V(b, h / g, j, d);
      out[row * Dv + d] = o;
    }
    double delta = 0;
    for (int d = 0; d < Dv; ++d) delta += double(dout[row * Dv + d]) * out[row * Dv + d];
    for (int j = 0; j < Tk; ++j) {
      double dp = 0;
      for (int d = 0; d < Dv; ++d) dp += double(dout[row * Dv + d]) * V(b, h / g, j, d);
      ds[row * Tk + j] = P[row * Tk + j] * (dp - delta);
    }
    for (int d = 0; d < D; ++d) {
      double a = 0;
      for (int j = 0; j < Tk; ++j) a += ds[row * Tk + j] * K(b, h / g, j, d);
      dq[row * D + d] = scale * a;
    }
    for (int j = 0; j < Tk; ++j) {
      const size_t kr = (size_t(b) * Hk + h / g) * Tk + j;
      for (int d = 0; d < D; ++d) dk[kr * D + d] += scale * ds[row * Tk + j] * Q(b, h, i, d);
      for (int d = 0; d < Dv; ++d) dv[kr * Dv + d] += P[row * Tk + j] * double(dout[row * Dv + d]);
    }
  }
  // kernels
  AttnParams<T, T> p{};
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.mask = mask.get();
  p.q_sb = int64_t(Tq) * H * D; p.q_sh = D; p.q_st = int64_t(H) * D;
  p.k_sb = int64_t(Hk) * Tk * D; p.k_sh = int64_t(Tk) * D; p.k_st = D;
  p.v_sb = int64_t(Hk) * Tk * Dv; p.v_sh = int64_t(Tk) * Dv; p.v_st = Dv;
  p.m_sb = m_sb; p.m_sh = m_sh; p.m_sq = m_sq; p.m_sk = m_sk;
  p.B = B; p.H = H; p.Hk = Hk; p.Tq = Tq; p.Tk = Tk; p.group = g; p.off = Tk - Tq;
  p.D = D; p.Dv = Dv; p.causal = c.causal; p.grad_qk = 1; p.scale = T(scale);
  std::vector<T> o(nq * Dv, T(NAN)), l(nq, T(NAN));
  p.o = o.data(); p.lse_out = l.data();
  constexpr int BM = AttnFwdTile<T>::BM, BNb = AttnBwdTile<T>::BN;
  const size_t smf = attention_smem_fwd<T>(D, Dv);
  dim3emu gf{unsigned((Tq + BM - 1) / BM), unsigned(B * H), 1};
  if (Dv <= 64) emu_launch(gf, kAttnThreads, smf, [&] { attention_fwd_kernel<T, T, 64, false>(p); });
  else emu_launch(gf, kAttnThreads, smf, [&] { attention_fwd_kernel<T, T, 128, false>(p); });
  auto tod = [](const std::vector<T>& x) { return std::vector<double>(x.begin(), x.end()); };
  check("attention out", tod(o), out, tol);
  check("attention lse", tod(l), lse, tol);
  // shared forward from the reference lse and a different V
  std::vector<T> o2(nq * Dv, T(NAN)), lse_t(nq);
  for (size_t i = 0; i < nq; ++i) lse_t[i] = T(lse[i]);
  p.lse_in = lse_t.data(); p.o = o2.data();
  if (Dv <= 64) emu_launch(gf, kAttnThreads, smf, [&] { attention_fwd_kernel<T, T, 64, true>(p); });
  else emu_launch(gf, kAttnThreads, smf, [&] { attention_fwd_kernel<T, T, 128, true>(p); });
  check("shared out", tod(o2), out, tol);
  // backward, with the kernel's own out for delta (as the launcher does)
  std::vector<T> delta(nq), dqa(nq * D, T(0)), dkk(dk.size(), T(NAN)), dvv(dv.size(), T(NAN));
  for (size_t r = 0; r < nq; ++r) {
    double d = 0;
    for (int x = 0; x < Dv; ++x) d += double(dout[r * Dv + x]) * double(o[r * Dv + x]);
    delta[r] = T(d);
  }
  p.dout = dout.data(); p.delta = delta.data(); p.dq = dqa.data(); p.dk = dkk.data(); p.dv = dvv.data();
  const size_t smb = attention_smem_bwd<T>(D, Dv);
  dim3emu gb{unsigned((Tk + BNb - 1) / BNb), unsigned(B * Hk), 1};
  if (std::max(D, Dv) <= 64) emu_launch(gb, kAttnThreads, smb, [&] { attention_bwd_kernel<T, T, 64>(p); });
  else emu_launch(gb, kAttnThreads, smb, [&] { attention_bwd_kernel<T, T, 128>(p); });
  check("dq", tod(dqa), dq, tol);
  check("dk", tod(dkk), dk, tol);
  check("dv", tod(dvv), dv, tol);
  // grad_qk = false: dv only
  std::vector<T> dvv2(dv.size(), T(NAN));
  p.grad_qk = 0; p.dk = nullptr; p.dv = dvv2.data();
  if (std::max(D, Dv) <= 64) emu_launch(gb, kAttnThreads, smb, [&] { attention_bwd_kernel<T, T, 64>(p); });
  else emu_launch(gb, kAttnThreads, smb, [&] { attention_bwd_kernel<T, T, 128>(p); });
  check("dv (no dq/dk)", tod(dvv2), dv, tol);
  // materialised probabilities and their softmax backward
  std::vector<T> St(nq * Tk), probs(nq * Tk, T(NAN)), gp(nq * Tk), dst(nq * Tk, T(NAN));
  for (size_t i = 0; i < nq * Tk; ++i) { St[i] = T(S[i]); gp[i] = T(rnd()); }
  ProbsParams<T, T> pp{};
  pp.s = St.data(); pp.lse = lse_t.data(); pp.mask = mask.get(); pp.probs = probs.data();
  pp.m_sb = m_sb; pp.m_sh = m_sh; pp.m_sq = m_sq; pp.m_sk = m_sk;
  pp.H = H; pp.Tq = Tq; pp.Tk = Tk; pp.rows = int64_t(nq); pp.off = Tk - Tq; pp.causal = c.causal; pp.scale = T(scale);
  emu_launch(dim3emu{3, 1, 1}, kAttnThreads, 0, [&] { attention_probs_fwd_kernel<T, T>(pp); });
  check("probs", tod(probs), P, tol);
  pp.g = gp.data(); pp.pr = probs.data(); pp.ds = dst.data();
  emu_launch(dim3emu{3, 1, 1}, kAttnThreads, 0, [&] { attention_probs_bwd_kernel<T, T>(pp); });
  std::vector<double> dsr(nq * Tk);
  for (size_t r = 0; r < nq; ++r) {
    double d = 0;
    for (int j = 0; j < Tk; ++j) d += double(gp[r * Tk + j]) * double(probs[r * Tk + j]);
    for (int j = 0; j < Tk; ++j) dsr[r * Tk + j] = double(probs[r * Tk + j]) * (double(gp[r * Tk + j]) - d);
  }
  check("probs backward", tod(dst), dsr, tol);
}

// Layer similarity: L layers, reference from materialised maps.
template <class T> void run_sim(int L, int B, int H, int Hk, int Tq, int Tk, int D, bool causal, bool masked,
                                bool cosine, int BN, unsigned grid, double tol) {
  printf("similarity L%d B%d H%d Hk%d Tq%d Tk%d D%d causal%d mask%d %s BN%d grid%u %s\n", L, B, H, Hk, Tq, Tk, D,
         causal, masked, cosine ? "cosine" : "js", BN, grid, sizeof(T) == 8 ? "double" : "float");
  const int g = H / Hk;
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<T> q(size_t(L) * B * H * Tq * D), k(size_t(L) * B * Hk * Tk * D);
  for (auto& x : q) x = T(rnd());
  for (auto& x : k) x = T(rnd());
  // make layers 1 and 2 similar to layer 0
  for (int l = 1; l < std::min(L, 3); ++l)
    for (size_t i = 0; i < q.size() / L; ++i) q[l * (q.size() / L) + i] = T(double(q[i]) + 0.3 * rnd());
  std::unique_ptr<bool[]> mask;
  if (masked) {
    mask.reset(new bool[size_t(B) * H * Tq * Tk]);
    for (size_t i = 0; i < size_t(B) * H * Tq * Tk; ++i) mask[i] = urand() > 0.25;
    for (int j = 0; j < Tk; ++j) mask[size_t(1) * Tk + j] = false;  // b0 h0 row 1 fully masked
  }
  auto vis = [&](int b, int h, int i, int j) {
    if (causal && j > i + (Tk - Tq)) return false;
    return !mask || mask[((size_t(b) * H + h) * Tq + i) * Tk + j];
  };
  std::vector<double> Pm(size_t(L) * B * H * Tq * Tk);
  std::vector<char> valid(size_t(B) * H * Tq);
  for (int l = 0; l < L; ++l) for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int i = 0; i < Tq; ++i) {
    double* pr = &Pm[((((size_t(l) * B + b) * H + h) * Tq) + i) * Tk];
    double m = -INFINITY;
    for (int j = 0; j < Tk; ++j) {
      double s = 0;
      for (int d = 0; d < D; ++d)
        s += double(q[((((size_t(l) * B + b) * H + h) * Tq) + i) * D + d]) *
             double(k[((((size_t(l) * B + b) * Hk + h / g) * Tk) + j) * D + d]);
      pr[j] = vis(b, h, i, j) ? s * scale : -INFINITY;
      m = std::max(m, pr[j]);
    }
    double sum = 0;
    for (int j = 0; j < Tk; ++j) sum += m == -INFINITY ? 0 : std::exp(pr[j] - m);
    for (int j = 0; j < Tk; ++j) pr[j] = m == -INFINITY ? 0 : std::exp(pr[j] - m) / sum;
    if (l == 0) valid[(size_t(b) * H + h) * Tq + i] = m != -INFINITY;
  }
  std::vector<double> ref(size_t(L) * L, 0);
  double count = 0;
  for (size_t row = 0; row < valid.size(); ++row) count += valid[row];
  for (int a = 0; a < L; ++a) for (int c = 0; c < L; ++c) {
    double tot = 0;
    for (size_t row = 0; row < valid.size(); ++row) {
      if (!valid[row]) continue;
      const double* pa = &Pm[(size_t(a) * valid.size() + row) * Tk];
      const double* pb = &Pm[(size_t(c) * valid.size() + row) * Tk];
      double sim;
      if (cosine) {
        double d = 0, na = 0, nb = 0;
        for (int j = 0; j < Tk; ++j) { d += pa[j] * pb[j]; na += pa[j] * pa[j]; nb += pb[j] * pb[j]; }
        sim = d / std::sqrt(na * nb);
      } else {
        double js = 0;
        for (int j = 0; j < Tk; ++j) {
          const double mm = 0.5 * (pa[j] + pb[j]);
          if (pa[j] > 0) js += 0.5 * pa[j] * std::log(pa[j] / mm);
          if (pb[j] > 0) js += 0.5 * pb[j] * std::log(pb[j] / mm);
        }
        sim = std::min(1.0, std::max(0.0, 1.0 - js / std::log(2.0)));
      }
      tot += sim;
    }
    ref[a * L + c] = tot / count;
  }
  SimParams<T, T> p{};
  p.q = q.data(); p.k = k.data(); p.mask = mask.get();
  p.m_sb = int64_t(H) * Tq * Tk; p.m_sh = int64_t(Tq) * Tk; p.m_sq = Tk; p.m_sk = 1;
  p.L = L; p.B = B; p.H = H; p.Hk = Hk; p.Tq = Tq; p.Tk = Tk; p.group = g; p.off = Tk - Tq;
  p.npairs = int64_t(L) * (L + 1) / 2; p.ngroups = int64_t(B) * H * ((Tq + kSimRows - 1) / kSimRows);
  p.D = D; p.BN = BN; p.causal = causal; p.cosine = cosine; p.scale = T(scale);
  std::vector<T> work(size_t(grid) * kSimRows * p.npairs, T(NAN)), partial(size_t(grid) * (p.npairs + 1), T(0));
  p.work = work.data(); p.partial = partial.data();
  emu_launch(dim3emu{grid, 1, 1}, kAttnThreads, attention_smem_sim<T>(L, D, BN),
             [&] { attention_similarity_kernel<T, T>(p); });
  std::vector<double> tot(p.npairs + 1, 0), got(size_t(L) * L);
  for (unsigned gb = 0; gb < grid; ++gb)
    for (int64_t i = 0; i <= p.npairs; ++i) tot[i] += double(partial[gb * (p.npairs + 1) + i]);
  for (int a = 0, pi = 0; a < L; ++a)
    for (int c = 0; c <= a; ++c, ++pi) got[a * L + c] = got[c * L + a] = tot[pi] / tot[p.npairs];
  check("similarity", got, ref, tol);
  if (std::fabs(tot[p.npairs] - count) > 0.5) { printf("  count %g vs %g FAIL\n", tot[p.npairs], count); ++failures; }
}

int main(int argc, char** argv) {
  const std::vector<Case> cases = {
      {1, 1, 1, 5, 5, 8, 8, false, 0},
      {2, 4, 2, 37, 37, 16, 24, false, 0},
      {2, 4, 2, 37, 37, 16, 24, true, 0},
      {2, 2, 1, 70, 70, 40, 40, true, 2},     // two query blocks, two key tiles, fully masked rows
      {2, 3, 3, 33, 45, 8, 72, true, 1},      // Tq < Tk (bottom-right causal), Dv > 64, key padding
      {1, 2, 2, 45, 33, 72, 8, true, 0},      // Tq > Tk: first rows see no key
      {1, 2, 1, 130, 129, 128, 128, false, 2},  // head_dim 128, several tiles
      {1, 1, 1, 3, 0, 8, 8, false, 0},        // no keys
  };
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  for (size_t i = 0; i < cases.size(); ++i) {
    if (quick && i > 3) break;
    run<float>(cases[i], 2e-5);
    run<double>(cases[i], 1e-12);
  }
  run_sim<float>(3, 2, 2, 1, 9, 9, 8, true, true, false, 8, 3, 2e-5);
  run_sim<float>(3, 2, 2, 1, 9, 9, 8, true, true, true, 8, 3, 2e-5);
  run_sim<double>(4, 1, 2, 2, 13, 11, 16, false, false, false, 16, 2, 1e-12);
  run_sim<double>(4, 1, 2, 2, 13, 17, 16, true, true, true, 8, 5, 1e-12);
  printf(failures ? "FAILURES: %d\n" : "all ok\n", failures);
  return failures != 0;
}
