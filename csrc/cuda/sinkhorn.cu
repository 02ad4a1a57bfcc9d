// CUDA launchers of the batched Sinkhorn ops and the SinKD cost: checks, device guard, params, dtype
// dispatch, the choice of kernel (warp per problem / CTA with shared memory / CTA on global memory),
// launch on the current stream.
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/launch.h"
#include "common/sinkhorn_args.h"
#include "kernels/sinkhorn.cuh"
#include "ops.h"

namespace kdk {
namespace {

template <class T> using acc_of_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kWarpsPerBlockTiny = 4;  // warp-per-problem kernels: 4 problems per block
constexpr int kThreadsSmem = 256;      // CTA kernels with the matrices in shared memory
constexpr int kThreadsGlobal = kSinkhornMaxThreads;  // CTA kernels on global memory (bigger problems)

int odd_stride(int m) { return m | 1; }

// Opt in to more than the default 48 KB of dynamic shared memory when a kernel needs it.
template <class K> void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) allow_dynamic_smem(kernel, bytes);
}

enum class Path { kWarp, kSmem, kGlobal };

// Which kernel solves problems of this size; bytes is its dynamic shared memory per block.
template <class acc_t> Path choose(bool bwd, int n, int m, size_t& bytes, int& threads) {
  const int ld = odd_stride(m);
  const size_t limit = max_dynamic_smem_optin();
  if (n <= 32 && m <= 32) {
    bytes = size_t(SinkhornSmem(bwd, true, n, m, ld).total) * sizeof(acc_t) * kWarpsPerBlockTiny;
    threads = 32 * kWarpsPerBlockTiny;
    if (bytes <= limit) return Path::kWarp;
  }
  bytes = size_t(SinkhornSmem(bwd, true, n, m, ld).total) * sizeof(acc_t);
  threads = kThreadsSmem;
  if (bytes <= limit) return Path::kSmem;
  bytes = size_t(SinkhornSmem(bwd, false, n, m, ld).total) * sizeof(acc_t);
  threads = kThreadsGlobal;
  TORCH_CHECK(bytes <= limit, "kdkernels.sinkhorn: problems of ", n, " x ", m,
              " need more shared memory for their potentials than this GPU has (", limit, " bytes)");
  return Path::kGlobal;
}

int64_t grid_for(int64_t B, int per_block, int64_t cap) {
  return std::max<int64_t>(1, std::min<int64_t>((B + per_block - 1) / per_block, cap));
}

template <class scalar_t, class acc_t, bool kWarp, bool kSmem>
void launch_fwd(const SinkhornParams<scalar_t, acc_t>& p, size_t bytes, int threads) {
  auto kernel = sinkhorn_fwd_kernel<scalar_t, acc_t, kWarp, kSmem>;
  allow_smem(kernel, bytes);
  const int per_block = kWarp ? threads / 32 : 1;
  launch(kernel, grid_for(p.B, per_block, int64_t(1) << 30), threads, bytes, p);
}

template <class scalar_t, class acc_t, bool kWarp, bool kSmem>
void launch_bwd(const SinkhornParams<scalar_t, acc_t>& p, size_t bytes, int threads, int64_t grid) {
  auto kernel = sinkhorn_bwd_kernel<scalar_t, acc_t, kWarp, kSmem>;
  allow_smem(kernel, bytes);
  launch(kernel, grid, threads, bytes, p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cuda(KDK_SINKHORN_FWD_ARGS) {
  const SinkhornArgs a = sinkhorn_parse(cost, log_a, log_b, eps, n_iters, tol);
  const DeviceGuard guard(cost.device());
  KDK_CHECK("sinkhorn", a.n * a.m < (int64_t(1) << 31), "n * m must be < 2^31: got ", a.n, " x ", a.m);
  if (validate) sinkhorn_validate(cost, log_a, log_b);
  const at::Tensor c = cost.contiguous();
  const auto acc = c.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = c.options().dtype(acc);
  at::Tensor value = at::empty({a.B}, opts), F = at::empty({a.B, a.L, a.n}, opts), G = at::empty({a.B, a.L, a.m}, opts);
  at::Tensor iters = at::empty({a.B}, c.options().dtype(at::kInt));
  at::Tensor plan = return_plan ? at::empty({a.B, a.n, a.m}, opts) : at::empty({0}, opts);
  const at::Tensor la = log_a.has_value() ? log_a->contiguous() : at::Tensor();
  const at::Tensor lb = log_b.has_value() ? log_b->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "sinkhorn_fwd_cuda", [&] {
    using T = acc_of_t<scalar_t>;
    SinkhornParams<scalar_t, T> p{};
    p.cost = c.data_ptr<scalar_t>();
    p.log_a = la.defined() ? la.data_ptr<T>() : nullptr;
    p.log_b = lb.defined() ? lb.data_ptr<T>() : nullptr;
    p.value = value.data_ptr<T>();
    p.F = F.data_ptr<T>();
    p.G = G.data_ptr<T>();
    p.iters = iters.data_ptr<int32_t>();
    p.plan = return_plan ? plan.data_ptr<T>() : nullptr;
    p.B = a.B; p.n = int(a.n); p.m = int(a.m); p.L = int(a.L); p.ld = odd_stride(int(a.m));
    p.eps = T(a.eps); p.inv_eps = T(1.0 / a.eps); p.tol = T(a.tol); p.grad_mode = kGradUnrolled;
    size_t bytes; int threads;
    switch (choose<T>(false, p.n, p.m, bytes, threads)) {
      case Path::kWarp: launch_fwd<scalar_t, T, true, true>(p, bytes, threads); break;
      case Path::kSmem: launch_fwd<scalar_t, T, false, true>(p, bytes, threads); break;
      default: launch_fwd<scalar_t, T, false, false>(p, bytes, threads);
    }
  });
  return {value, F, G, iters, plan};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cuda(KDK_SINKHORN_BWD_ARGS) {
  const SinkhornArgs a = sinkhorn_parse_bwd(grad_value, grad_plan, cost, log_a, log_b, f, g, iters, eps,
                                            std::string(grad));
  const DeviceGuard guard(cost.device());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "sinkhorn_bwd_cuda", [&] {
    using T = acc_of_t<scalar_t>;
    SinkhornParams<scalar_t, T> p{};
    p.cost = c.data_ptr<scalar_t>();
    p.log_a = la.defined() ? la.data_ptr<T>() : nullptr;
    p.log_b = lb.defined() ? lb.data_ptr<T>() : nullptr;
    p.F = Fc.data_ptr<T>();
    p.G = Gc.data_ptr<T>();
    p.iters = it.data_ptr<int32_t>();
    p.grad_value = gv.data_ptr<T>();
    p.grad_plan = gp.defined() ? gp.data_ptr<T>() : nullptr;
    p.grad_cost = dcost.data_ptr<scalar_t>();
    p.grad_log_a = want_marg && la.defined() ? dla.data_ptr<T>() : nullptr;
    p.grad_log_b = want_marg && lb.defined() ? dlb.data_ptr<T>() : nullptr;
    p.B = a.B; p.n = int(a.n); p.m = int(a.m); p.L = int(a.L); p.ld = odd_stride(int(a.m));
    p.eps = T(a.eps); p.inv_eps = T(1.0 / a.eps); p.tol = 0; p.grad_mode = a.grad;
    size_t bytes; int threads;
    const Path path = choose<T>(true, p.n, p.m, bytes, threads);
    at::Tensor ws;
    switch (path) {
      case Path::kWarp:
        launch_bwd<scalar_t, T, true, true>(p, bytes, threads, grid_for(a.B, threads / 32, int64_t(1) << 30));
        break;
      case Path::kSmem:
        launch_bwd<scalar_t, T, false, true>(p, bytes, threads, grid_for(a.B, 1, int64_t(1) << 30));
        break;
      default: {
        // dZ of the problems in flight lives in a workspace of one n x m matrix per resident block.
        const int64_t grid = grid_for(a.B, 1, int64_t(num_sms()) * 4);
        ws = at::empty({grid, a.n * a.m}, opts);
        p.workspace = ws.data_ptr<T>();
        launch_bwd<scalar_t, T, false, false>(p, bytes, threads, grid);
      }
    }
  });
  return {dcost, dla, dlb};
}

// ------------------------------------------------------------------------------------------------
// SinKD cost
// ------------------------------------------------------------------------------------------------

namespace {

template <class in_t, class acc_t> void launch_softmax(const in_t* x, int64_t R, int C, acc_t inv_t, acc_t* out) {
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((R + 7) / 8, int64_t(1) << 20));
  launch(sinkhorn_softmax_kernel<in_t, acc_t>, blocks, threads, 0, x, R, C, inv_t, out);
}

// Student and teacher probabilities (acc) of both inputs, in ps / pt.
template <class scalar_t, class acc_t>
void both_softmax(const SinkhornCostArgs& a, const at::Tensor& s, const at::Tensor& t, acc_t inv_t, acc_t* ps, acc_t* pt) {
  launch_softmax<scalar_t, acc_t>(s.data_ptr<scalar_t>(), a.B * a.n, int(a.C), inv_t, ps);
  if (t.scalar_type() == s.scalar_type()) launch_softmax<scalar_t, acc_t>(t.data_ptr<scalar_t>(), a.B * a.m, int(a.C), inv_t, pt);
  else launch_softmax<acc_t, acc_t>(t.data_ptr<acc_t>(), a.B * a.m, int(a.C), inv_t, pt);
}

at::Tensor teacher_like(const at::Tensor& t, c10::ScalarType student, c10::ScalarType acc) {
  return t.scalar_type() == student ? t.contiguous() : t.to(acc).contiguous();
}

}  // namespace

at::Tensor sinkhorn_cost_fwd_cuda(KDK_SINKHORN_COST_FWD_ARGS) {
  const SinkhornCostArgs a = sinkhorn_cost_parse(student_logits, teacher_logits, temperature, std::string(cost));
  const DeviceGuard guard(student_logits.device());
  if (validate) sinkhorn_cost_validate(student_logits, teacher_logits);
  const at::Tensor s = student_logits.contiguous();
  const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t = teacher_like(teacher_logits, s.scalar_type(), acc);
  const auto opts = s.options().dtype(acc);
  at::Tensor out = at::empty({a.B, a.n, a.m}, opts);
  at::Tensor ps = at::empty({a.B, a.n, a.C}, opts), pt = at::empty({a.B, a.m, a.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_cost_fwd_cuda", [&] {
    using T = acc_of_t<scalar_t>;
    both_softmax<scalar_t, T>(a, s, t, T(1.0 / a.temperature), ps.data_ptr<T>(), pt.data_ptr<T>());
    const int64_t tiles = a.B * ((a.n + kCostTile - 1) / kCostTile) * ((a.m + kCostTile - 1) / kCostTile);
    launch(sinkhorn_pair_cost_kernel<T>, std::min<int64_t>(tiles, int64_t(1) << 30), kCostTile * kCostTile, 0,
           ps.data_ptr<T>(), pt.data_ptr<T>(), a.B, int(a.n), int(a.m), int(a.C), a.kind, out.data_ptr<T>());
  });
  return out;
}

at::Tensor sinkhorn_cost_bwd_cuda(KDK_SINKHORN_COST_BWD_ARGS) {
  const SinkhornCostArgs a = sinkhorn_cost_parse(student_logits, teacher_logits, temperature, std::string(cost));
  const DeviceGuard guard(student_logits.device());
  KDK_CHECK("sinkhorn_kd_loss", grad_cost.sizes() == at::IntArrayRef({a.B, a.n, a.m}),
            "grad_cost must have shape ", shape_str({a.B, a.n, a.m}), ": got ", shape_str(grad_cost.sizes()));
  const at::Tensor s = student_logits.contiguous();
  const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t = teacher_like(teacher_logits, s.scalar_type(), acc);
  const auto opts = s.options().dtype(acc);
  const at::Tensor w = grad_cost.to(acc).contiguous();
  at::Tensor out = at::empty(s.sizes(), s.options());
  at::Tensor ps = at::empty({a.B, a.n, a.C}, opts), pt = at::empty({a.B, a.m, a.C}, opts);
  at::Tensor dp = at::empty({a.B, a.n, a.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_cost_bwd_cuda", [&] {
    using T = acc_of_t<scalar_t>;
    const T inv_t = T(1.0 / a.temperature);
    both_softmax<scalar_t, T>(a, s, t, inv_t, ps.data_ptr<T>(), pt.data_ptr<T>());
    const int64_t tiles = a.B * ((a.n + kCostTile - 1) / kCostTile) * ((a.C + kCostChunk - 1) / kCostChunk);
    launch(sinkhorn_pair_cost_bwd_kernel<T>, std::min<int64_t>(tiles, int64_t(1) << 30), dim3(kCostChunk, kCostTile), 0,
           ps.data_ptr<T>(), pt.data_ptr<T>(), w.data_ptr<T>(), a.B, int(a.n), int(a.m), int(a.C), a.kind,
           dp.data_ptr<T>());
    const int64_t R = a.B * a.n;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((R + 7) / 8, int64_t(1) << 20));
    launch(sinkhorn_softmax_bwd_kernel<scalar_t, T>, blocks, 256, 0, ps.data_ptr<T>(), dp.data_ptr<T>(), R, int(a.C),
           inv_t, out.data_ptr<scalar_t>());
  });
  return out;
}

TORCH_LIBRARY_IMPL(KDK_LIB, KDK_DEVICE_KEY, m) {
  m.impl("sinkhorn_fwd", KDK_IMPL(sinkhorn_fwd_cuda));
  m.impl("sinkhorn_bwd", KDK_IMPL(sinkhorn_bwd_cuda));
  m.impl("sinkhorn_cost_fwd", KDK_IMPL(sinkhorn_cost_fwd_cuda));
  m.impl("sinkhorn_cost_bwd", KDK_IMPL(sinkhorn_cost_bwd_cuda));
}

}  // namespace kdk
