// CUDA launchers of the token-relation ops: checks, device guard, feature preparation (valid tokens first,
// heads, cosine normalisation: ATen ops shared with the CPU backend), params, dtype dispatch, launch.
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/launch.h"
#include "common/token_relation_args.h"
#include "kernels/token_relation.cuh"
#include "ops.h"

namespace kdk {
namespace {

// The CUDA types the kernels (and WMMA) take for ATen's half types; same layout.
template <class T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <class kt> const kt* ptr(const at::Tensor& t) { return reinterpret_cast<const kt*>(t.data_ptr()); }

const int* lens_ptr(const TokenOrder& o) { return o.lens.defined() ? o.lens.data_ptr<int>() : nullptr; }

template <class scalar_t, class acc_t> int64_t blocks_per_problem(int64_t n) {
  return (n + trk::Geo<acc_t>::BM - 1) / trk::Geo<acc_t>::BM;
}

// One block per BM tokens of each problem; opts the kernel into the dynamic shared memory it needs (> 48 KB):
// the fixed carve-up, plus `acc` bytes of gradient-row accumulators when p.acc_smem.
template <class scalar_t, class acc_t, class Kernel, class Params>
void run(Kernel kernel, const Params& p, int64_t problems, const char* op, size_t acc = 0) {
  const int64_t grid = problems * p.nblocks;
  KDK_CHECK(op, grid < (int64_t(1) << 31), "too many tokens for one launch: ", problems, " problems x ", p.nblocks,
            " blocks");
  if (grid == 0) return;
  const size_t smem = trk::Smem<scalar_t, acc_t>::total + (p.acc_smem ? acc : 0);
  allow_dynamic_smem(kernel, smem);
  launch(kernel, static_cast<unsigned>(grid), trk::kThreads, smem, p);
}

// Whether the backward's gradient accumulators (`acc` bytes) fit in shared memory beside the fixed carve-up.
template <class scalar_t, class acc_t> bool acc_fits(size_t acc) {
  return trk::Smem<scalar_t, acc_t>::total + acc <= max_dynamic_smem_optin();
}

at::ScalarType acc_type(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_relation_fwd_cuda(KDK_TOKEN_RELATION_FWD_ARGS) {
  const RelationArgs a = token_relation_parse(student, teacher, mask, std::string(loss), std::string(similarity),
                                              num_heads, temperature, tau);
  const DeviceGuard guard(student.device());
  const auto acc = acc_type(student);
  const auto opts = student.options().dtype(acc);
  at::Tensor stat = at::zeros({a.P, a.H, a.n, kRelStats}, opts);
  if (a.P == 0) return {at::zeros({a.P, a.n}, opts), stat};
  const TokenOrder o = token_order(mask);
  // Both models in the student's dtype: the tensor-core path multiplies 16-bit operands.
  const auto dt = student.scalar_type();
  const at::Tensor ys = token_heads(student, o, a.H, a.cosine, dt), yt = token_heads(teacher, o, a.H, a.cosine, dt);
  const int64_t Q = a.P * a.H;
  at::Tensor loss_h = at::zeros({Q, a.n}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "token_relation_fwd_cuda", [&] {
    using kt = typename CudaType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    trk::RelParams<kt, acc_t> p{};
    p.ys = ptr<kt>(ys);
    p.yt = ptr<kt>(yt);
    p.lens = lens_ptr(o);
    p.loss = loss_h.data_ptr<acc_t>();
    p.stat = stat.data_ptr<acc_t>();
    p.n = a.n;
    p.nblocks = blocks_per_problem<kt, acc_t>(a.n);
    p.H = static_cast<int>(a.H);
    p.ds = static_cast<int>(a.ds);
    p.dt = static_cast<int>(a.dt);
    p.beta_s = static_cast<acc_t>(a.beta_s);
    p.beta_t = static_cast<acc_t>(a.beta_t);
    p.inv_h = static_cast<acc_t>(1.0 / a.H);
    if (a.loss == kRelKL) run<kt, acc_t>(trk::relation_fwd_kernel<kt, acc_t, kRelKL>, p, Q, "token_relation_loss");
    else run<kt, acc_t>(trk::relation_fwd_kernel<kt, acc_t, kRelMSE>, p, Q, "token_relation_loss");
  });
  return {token_unorder_rows(loss_h.view({a.P, a.H, a.n}).mean(1), o), stat};
}

std::tuple<at::Tensor, at::Tensor> token_relation_bwd_cuda(KDK_TOKEN_RELATION_BWD_ARGS) {
  const RelationArgs a = token_relation_parse(student, teacher, mask, std::string(loss), std::string(similarity),
                                              num_heads, temperature, tau);
  token_relation_check_saved(a, grad_loss, stat, student);
  const DeviceGuard guard(student.device());
  const auto acc = acc_type(student);
  const auto opts = student.options().dtype(acc);
  if (a.P == 0)
    return {at::zeros_like(student, at::MemoryFormat::Contiguous),
            teacher_grad ? at::zeros_like(teacher, at::MemoryFormat::Contiguous) : at::empty({0}, teacher.options())};
  const TokenOrder o = token_order(mask);
  const auto dt = student.scalar_type();
  const at::Tensor ys = token_heads(student, o, a.H, a.cosine, dt), yt = token_heads(teacher, o, a.H, a.cosine, dt);
  const at::Tensor wrow = token_order_rows(grad_loss.to(acc), o).contiguous();
  const at::Tensor st = stat.contiguous();
  const int64_t Q = a.P * a.H;
  at::Tensor gs = at::zeros({a.P, a.H, a.n, a.ds}, opts);
  at::Tensor gt = teacher_grad ? at::zeros({a.P, a.H, a.n, a.dt}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "token_relation_bwd_cuda", [&] {
    using kt = typename CudaType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    trk::RelParams<kt, acc_t> p{};
    p.ys = ptr<kt>(ys);
    p.yt = ptr<kt>(yt);
    p.lens = lens_ptr(o);
    p.stat = const_cast<acc_t*>(st.data_ptr<acc_t>());
    p.w = wrow.data_ptr<acc_t>();
    p.gs = gs.data_ptr<acc_t>();
    p.gt = teacher_grad ? gt.data_ptr<acc_t>() : nullptr;
    p.n = a.n;
    p.nblocks = blocks_per_problem<kt, acc_t>(a.n);
    p.H = static_cast<int>(a.H);
    p.ds = static_cast<int>(a.ds);
    p.dt = static_cast<int>(a.dt);
    p.beta_s = static_cast<acc_t>(a.beta_s);
    p.beta_t = static_cast<acc_t>(a.beta_t);
    p.inv_h = static_cast<acc_t>(1.0 / a.H);
    const char* op = "token_relation_loss";
    using M = trk::Smem<kt, acc_t>;
    const size_t acc = M::acc_bytes(p.ds) + (teacher_grad ? M::acc_bytes(p.dt) : 0);
    p.acc_smem = acc_fits<kt, acc_t>(acc);
    if (a.loss == kRelKL) {
      if (teacher_grad) run<kt, acc_t>(trk::relation_bwd_kernel<kt, acc_t, kRelKL, true>, p, Q, op, acc);
      else run<kt, acc_t>(trk::relation_bwd_kernel<kt, acc_t, kRelKL, false>, p, Q, op, acc);
    } else {
      if (teacher_grad) run<kt, acc_t>(trk::relation_bwd_kernel<kt, acc_t, kRelMSE, true>, p, Q, op, acc);
      else run<kt, acc_t>(trk::relation_bwd_kernel<kt, acc_t, kRelMSE, false>, p, Q, op, acc);
    }
  });
  return {token_heads_backward(gs, student, o, a.H, a.cosine),
          teacher_grad ? token_heads_backward(gt, teacher, o, a.H, a.cosine) : at::empty({0}, teacher.options())};
}

std::tuple<at::Tensor, at::Tensor> token_contrastive_fwd_cuda(KDK_TOKEN_CONTRASTIVE_FWD_ARGS) {
  const ContrastiveArgs a = token_contrastive_parse(student, teacher, mask, std::string(similarity), tau);
  const DeviceGuard guard(student.device());
  const auto acc = acc_type(student);
  const auto opts = student.options().dtype(acc);
  at::Tensor loss = at::zeros({a.P, a.n}, opts), lse = at::zeros({a.P, a.n}, opts);
  if (a.P == 0) return {loss, lse};
  const TokenOrder o = token_order(mask);
  const auto dt = student.scalar_type();
  const at::Tensor s = token_heads(student, o, 1, a.cosine, dt), t = token_heads(teacher, o, 1, a.cosine, dt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "token_contrastive_fwd_cuda", [&] {
    using kt = typename CudaType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    trk::ConParams<kt, acc_t> p{};
    p.s = ptr<kt>(s);
    p.t = ptr<kt>(t);
    p.lens = lens_ptr(o);
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<acc_t>();
    p.n = a.n;
    p.nblocks = blocks_per_problem<kt, acc_t>(a.n);
    p.D = static_cast<int>(a.D);
    p.beta = static_cast<acc_t>(a.beta);
    run<kt, acc_t>(trk::contrastive_fwd_kernel<kt, acc_t>, p, a.P, "token_contrastive_loss");
  });
  return {token_unorder_rows(loss, o), lse};
}

std::tuple<at::Tensor, at::Tensor> token_contrastive_bwd_cuda(KDK_TOKEN_CONTRASTIVE_BWD_ARGS) {
  const ContrastiveArgs a = token_contrastive_parse(student, teacher, mask, std::string(similarity), tau);
  token_contrastive_check_saved(a, grad_loss, lse, student);
  const DeviceGuard guard(student.device());
  const auto acc = acc_type(student);
  const auto opts = student.options().dtype(acc);
  if (a.P == 0)
    return {at::zeros_like(student, at::MemoryFormat::Contiguous),
            teacher_grad ? at::zeros_like(teacher, at::MemoryFormat::Contiguous) : at::empty({0}, teacher.options())};
  const TokenOrder o = token_order(mask);
  const auto dt = student.scalar_type();
  const at::Tensor s = token_heads(student, o, 1, a.cosine, dt), t = token_heads(teacher, o, 1, a.cosine, dt);
  const at::Tensor wrow = token_order_rows(grad_loss.to(acc), o).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor gs = at::zeros({a.P, 1, a.n, a.D}, opts);
  at::Tensor gt = teacher_grad ? at::zeros({a.P, 1, a.n, a.D}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "token_contrastive_bwd_cuda", [&] {
    using kt = typename CudaType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    trk::ConParams<kt, acc_t> p{};
    p.s = ptr<kt>(s);
    p.t = ptr<kt>(t);
    p.lens = lens_ptr(o);
    p.lse = const_cast<acc_t*>(lse_c.data_ptr<acc_t>());
    p.w = wrow.data_ptr<acc_t>();
    p.n = a.n;
    p.nblocks = blocks_per_problem<kt, acc_t>(a.n);
    p.D = static_cast<int>(a.D);
    p.beta = static_cast<acc_t>(a.beta);
    p.grad = gs.data_ptr<acc_t>();
    const size_t acc = trk::Smem<kt, acc_t>::acc_bytes(p.D);
    p.acc_smem = acc_fits<kt, acc_t>(acc);
    run<kt, acc_t>(trk::contrastive_bwd_kernel<kt, acc_t, false>, p, a.P, "token_contrastive_loss", acc);
    if (teacher_grad) {
      p.grad = gt.data_ptr<acc_t>();
      run<kt, acc_t>(trk::contrastive_bwd_kernel<kt, acc_t, true>, p, a.P, "token_contrastive_loss", acc);
    }
  });
  return {token_heads_backward(gs, student, o, 1, a.cosine),
          teacher_grad ? token_heads_backward(gt, teacher, o, 1, a.cosine) : at::empty({0}, teacher.options())};
}

TORCH_LIBRARY_IMPL(KDK_LIB, KDK_DEVICE_KEY, m) {
  m.impl("token_relation_fwd", KDK_IMPL(token_relation_fwd_cuda));
  m.impl("token_relation_bwd", KDK_IMPL(token_relation_bwd_cuda));
  m.impl("token_contrastive_fwd", KDK_IMPL(token_contrastive_fwd_cuda));
  m.impl("token_contrastive_bwd", KDK_IMPL(token_contrastive_bwd_cuda));
}

}  // namespace kdk
