// Runs the token-relation CUDA kernels in the host emulation (emu.h) on inputs prepared by
// tests/test_token_relation.py (prepared features, valid tokens first, as the launchers pass them).
// usage: main <rel|con> <f32|f64|f16|bf16> <kl=0|mse=1> <teacher 0|1> P H n ds dt beta_s beta_t <dir>
// Files in <dir>: ys.bin (P*H, n, ds), yt.bin (P*H, n, dt) [contrastive: (P, n, ds) each], lens.bin (P,) int32,
// w.bin (P, n) upstream gradient: float64 for f64, else float32 (16-bit features are converted on load).
// Writes loss.bin (P*H, n) per-head losses [contrastive (P, n)], stat.bin (P*H, n, 4) [contrastive: lse (P, n)],
// gs.bin and, with teacher, gt.bin: the float accumulators of the gradients in the same layouts.
#include "emu.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "kernels/token_relation.cuh"

using namespace kdk;
using namespace kdk::trk;

template <class T> std::vector<T> load(const std::string& f, size_t n) {
  std::vector<T> v(n);
  std::ifstream in(f, std::ios::binary);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
  if (!in) {
    fprintf(stderr, "cannot read %zu values from %s\n", n, f.c_str());
    exit(2);
  }
  return v;
}
template <class T> void save(const std::string& f, const std::vector<T>& v) {
  std::ofstream(f, std::ios::binary).write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}
template <class K, class A> std::vector<K> features(const std::string& f, size_t n) {
  const std::vector<A> v = load<A>(f, n);
  std::vector<K> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = K(v[i]);
  return out;
}

template <class K, class A> int run(char** argv) {
  const std::string kind = argv[1], dir = argv[12];
  const int loss = atoi(argv[3]), teacher = atoi(argv[4]);
  const int64_t P = atoll(argv[5]), H = atoll(argv[6]), n = atoll(argv[7]);
  const int ds = atoi(argv[8]), dt = atoi(argv[9]);
  const A beta_s = static_cast<A>(atof(argv[10])), beta_t = static_cast<A>(atof(argv[11]));
  const std::vector<int> lens = load<int>(dir + "/lens.bin", P);
  const std::vector<A> w = load<A>(dir + "/w.bin", P * n);
  const int64_t nb = (n + Geo<A>::BM - 1) / Geo<A>::BM;
  constexpr size_t smem = Smem<K, A>::total;
  if (kind == "rel") {
    const int64_t Q = P * H;
    const auto ys = features<K, A>(dir + "/ys.bin", Q * n * ds), yt = features<K, A>(dir + "/yt.bin", Q * n * dt);
    std::vector<A> out(Q * n, 0), stat(Q * n * 4, 0), gs(Q * n * ds, 0), gt(Q * n * dt, 0);
    RelParams<K, A> p{};
    p.ys = ys.data();
    p.yt = yt.data();
    p.lens = lens.data();
    p.loss = out.data();
    p.stat = stat.data();
    p.w = w.data();
    p.gs = gs.data();
    p.gt = teacher ? gt.data() : nullptr;
    p.n = n;
    p.nblocks = nb;
    p.H = static_cast<int>(H);
    p.ds = ds;
    p.dt = dt;
    p.beta_s = beta_s;
    p.beta_t = beta_t;
    p.inv_h = A(1) / static_cast<A>(H);
    if (loss == kRelKL) emu_launch(relation_fwd_kernel<K, A, kRelKL>, Q * nb, smem, p);
    else emu_launch(relation_fwd_kernel<K, A, kRelMSE>, Q * nb, smem, p);
    if (loss == kRelKL) {
      if (teacher) emu_launch(relation_bwd_kernel<K, A, kRelKL, true>, Q * nb, smem, p);
      else emu_launch(relation_bwd_kernel<K, A, kRelKL, false>, Q * nb, smem, p);
    } else {
      if (teacher) emu_launch(relation_bwd_kernel<K, A, kRelMSE, true>, Q * nb, smem, p);
      else emu_launch(relation_bwd_kernel<K, A, kRelMSE, false>, Q * nb, smem, p);
    }
    save(dir + "/loss.bin", out);
    save(dir + "/stat.bin", stat);
    save(dir + "/gs.bin", gs);
    if (teacher) save(dir + "/gt.bin", gt);
  } else {
    const auto s = features<K, A>(dir + "/ys.bin", P * n * ds), t = features<K, A>(dir + "/yt.bin", P * n * ds);
    std::vector<A> out(P * n, 0), lse(P * n, 0), gs(P * n * ds, 0), gt(P * n * ds, 0);
    ConParams<K, A> p{};
    p.s = s.data();
    p.t = t.data();
    p.lens = lens.data();
    p.loss = out.data();
    p.lse = lse.data();
    p.w = w.data();
    p.n = n;
    p.nblocks = nb;
    p.D = ds;
    p.beta = beta_s;
    emu_launch(contrastive_fwd_kernel<K, A>, P * nb, smem, p);
    p.grad = gs.data();
    emu_launch(contrastive_bwd_kernel<K, A, false>, P * nb, smem, p);
    if (teacher) {
      p.grad = gt.data();
      emu_launch(contrastive_bwd_kernel<K, A, true>, P * nb, smem, p);
    }
    save(dir + "/loss.bin", out);
    save(dir + "/stat.bin", lse);
    save(dir + "/gs.bin", gs);
    if (teacher) save(dir + "/gt.bin", gt);
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 13) {
    fprintf(stderr, "usage: %s <rel|con> <f32|f64|f16|bf16> <loss> <teacher> P H n ds dt beta_s beta_t <dir>\n", argv[0]);
    return 2;
  }
  const std::string dtype = argv[2];
  if (dtype == "f64") return run<double, double>(argv);
  if (dtype == "f16") return run<__half, float>(argv);
  if (dtype == "bf16") return run<__nv_bfloat16, float>(argv);
  return run<float, float>(argv);
}
