// CUDA launchers of the attention ops: checks, device guard, params, dtype dispatch, launch
// (kernels in csrc/kernels/attention.cuh). The materialised path of shared attention computes its two
// GEMMs with ATen (cuBLAS) in float32 (float64), the exp/mask and the softmax backward with our kernels.
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/attention_args.h"
#include "common/checks.h"
#include "common/launch.h"
#include "kernels/attention.cuh"
#include "kernels/attention_mma.cuh"
#include "ops.h"

namespace kdk {
namespace {

constexpr size_t kDefaultSmem = 48 * 1024;
constexpr int64_t kMaxGridY = 65535;

// Opts the kernel in to `smem` bytes of dynamic shared memory (above the default 48 KB), or refuses.
template <class Kernel> void allow_smem(Kernel kernel, size_t smem, const char* op) {
  if (smem <= kDefaultSmem) return;
  const size_t limit = max_dynamic_smem_optin();
  KDK_CHECK(op, smem <= limit, "this head_dim needs ", smem,
            " bytes of shared memory per block; the device allows ", limit);
  allow_dynamic_smem(kernel, smem);
}

template <class scalar_t, class acc_t>
AttnParams<scalar_t, acc_t> make_params(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& mask) {
  AttnParams<scalar_t, acc_t> p{};
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.v = v.defined() ? v.data_ptr<scalar_t>() : nullptr;
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_st = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  if (v.defined()) { p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2); }
  if (mask.defined()) {
    p.mask = mask.data_ptr<bool>();
    p.m_sb = mask.stride(0); p.m_sh = mask.stride(1); p.m_sq = mask.stride(2); p.m_sk = mask.stride(3);
  }
  p.B = a.B; p.H = a.H; p.Hk = a.Hk; p.Tq = a.Tq; p.Tk = a.Tk; p.group = a.group; p.off = a.off;
  p.D = static_cast<int>(a.D); p.Dv = static_cast<int>(a.Dv); p.causal = a.causal; p.grad_qk = 1;
  p.layers = 1;
  p.scale = static_cast<acc_t>(a.scale);
  return p;
}

// Whether the tensor-core forward (kernels/attention_mma.cuh) takes this call: float16 / bfloat16, D = Dv in
// {64, 96, 128}, every row of q, k, v 16-byte aligned (cp.async), on an sm_80+ device.
template <class scalar_t>
bool use_mma_fwd(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if constexpr (!std::is_same_v<scalar_t, at::Half> && !std::is_same_v<scalar_t, at::BFloat16>) {
    return false;
  } else {
    if (a.D != a.Dv || (a.D != 64 && a.D != 96 && a.D != 128)) return false;
    for (const at::Tensor* t : {&q, &k, &v}) {
      if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
      for (int d = 0; d < 3; ++d)
        if (t->size(d) > 1 && t->stride(d) % 8 != 0) return false;
    }
#ifdef KDK_EMU
    return true;  // the emulator models sm_80 / sm_90
#else
    return at::cuda::getCurrentDeviceProperties()->major >= 8;
#endif
  }
}

// Launches the tensor-core forward when use_mma_fwd says it applies; false otherwise (the SIMT kernel runs).
template <class scalar_t, class acc_t>
bool try_mma_fwd(const AttnNames& n, const AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const AttnParams<scalar_t, acc_t>& p, bool shared) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (!use_mma_fwd<scalar_t>(a, q, k, v)) return false;
    constexpr bool bf = std::is_same_v<scalar_t, at::BFloat16>;
    const size_t smem = attention_mma_smem(p.D);
    const dim3 grid(static_cast<unsigned>((a.Tq + kAttnMmaBM - 1) / kAttnMmaBM), static_cast<unsigned>(a.B * a.H));
    auto run = [&](auto kernel) {
      allow_smem(kernel, smem, n.op);
      launch(kernel, grid, kAttnMmaThreads, smem, p);
    };
    if (a.D == 64) shared ? run(attention_fwd_mma_kernel<scalar_t, bf, 64, true>)
                          : run(attention_fwd_mma_kernel<scalar_t, bf, 64, false>);
    else if (a.D == 96) shared ? run(attention_fwd_mma_kernel<scalar_t, bf, 96, true>)
                               : run(attention_fwd_mma_kernel<scalar_t, bf, 96, false>);
    else shared ? run(attention_fwd_mma_kernel<scalar_t, bf, 128, true>)
                : run(attention_fwd_mma_kernel<scalar_t, bf, 128, false>);
    return true;
  } else {
    return false;
  }
}

// The tensor-core backward under the same conditions (and a 16-byte aligned dO); false: the SIMT kernel runs.
// dQ: float atomics from the key-block kernel, or, under torch.use_deterministic_algorithms(True), a second
// kernel per query block that sums it in a fixed order.
template <class scalar_t, class acc_t>
bool try_mma_bwd(const AttnNames& n, const AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& go, const AttnParams<scalar_t, acc_t>& p) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (!use_mma_fwd<scalar_t>(a, q, k, v) || reinterpret_cast<uintptr_t>(go.data_ptr()) % 16 != 0) return false;
    constexpr bool bf = std::is_same_v<scalar_t, at::BFloat16>;
    const size_t smem = attention_mma_bwd_smem(p.D);
    const dim3 grid(static_cast<unsigned>((a.Tk + 63) / 64), static_cast<unsigned>(a.B * a.Hk));
    auto run = [&](auto kernel) {
      allow_smem(kernel, smem, n.op);
      launch(kernel, grid, kAttnMmaThreads, smem, p);
    };
    // Deterministic algorithms: dQ from its own kernel (no float atomics), then dK / dV without the dQ share.
    const bool det = p.grad_qk && at::globalContext().deterministicAlgorithms();
    if (det) {
      const size_t dq_smem = attention_mma_dq_smem(p.D);
      const dim3 dq_grid(static_cast<unsigned>((a.Tq + 63) / 64), static_cast<unsigned>(a.B * a.H));
      auto run_dq = [&](auto kernel) {
        allow_smem(kernel, dq_smem, n.op);
        launch(kernel, dq_grid, kAttnMmaThreads, dq_smem, p);
      };
      if (a.D == 64) run_dq(attention_bwd_dq_mma_kernel<scalar_t, bf, 64>);
      else if (a.D == 96) run_dq(attention_bwd_dq_mma_kernel<scalar_t, bf, 96>);
      else run_dq(attention_bwd_dq_mma_kernel<scalar_t, bf, 128>);
      if (a.D == 64) run(attention_bwd_mma_kernel<scalar_t, bf, 64, false, false>);
      else if (a.D == 96) run(attention_bwd_mma_kernel<scalar_t, bf, 96, false, false>);
      else run(attention_bwd_mma_kernel<scalar_t, bf, 128, false, false>);
    } else {
      if (a.D == 64) run(attention_bwd_mma_kernel<scalar_t, bf, 64, true, false>);
      else if (a.D == 96) run(attention_bwd_mma_kernel<scalar_t, bf, 96, true, false>);
      else run(attention_bwd_mma_kernel<scalar_t, bf, 128, true, false>);
    }
    return true;
  } else {
    return false;
  }
}

// The group backward on tensor cores (kernels/attention_mma.cuh, p.layers): as many layers per launch as the
// shared memory allows (their value tiles stay resident), dK and dQ summed in float buffers across launches.
// False when the tensor-core kernels do not apply (the caller then sums per-layer backwards).
template <class scalar_t, class acc_t>
bool try_mma_group(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& go, const at::Tensor& delta_layers, AttnParams<scalar_t, acc_t> p) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    const int64_t L = v.size(0);
    if (!use_mma_fwd<scalar_t>(a, q, k, v[0]) || reinterpret_cast<uintptr_t>(go.data_ptr()) % 16 != 0 ||
        v.stride(0) % 8 != 0)
      return false;
    const bool det = at::globalContext().deterministicAlgorithms();
    const size_t limit = max_dynamic_smem_optin();
    int per = 0;  // layers per launch
    while (per < L && attention_mma_bwd_smem(p.D, per + 1) <= limit &&
           (!det || attention_mma_dq_smem(p.D, per + 1) <= limit))
      ++per;
    if (per == 0) return false;
    constexpr bool bf = std::is_same_v<scalar_t, at::BFloat16>;
    const dim3 grid(static_cast<unsigned>((a.Tk + 63) / 64), static_cast<unsigned>(a.B * a.Hk));
    const dim3 dq_grid(static_cast<unsigned>((a.Tq + 63) / 64), static_cast<unsigned>(a.B * a.H));
    const scalar_t* v0 = p.v;
    const scalar_t* go0 = p.dout;
    for (int64_t l0 = 0; l0 < L; l0 += per) {
      p.layers = static_cast<int>(std::min<int64_t>(per, L - l0));
      // dS = P (dP - delta) is linear in the layers' (dP_l, delta_l): each launch takes its layers' share
      const at::Tensor delta = delta_layers.narrow(0, l0, p.layers).sum(at::IntArrayRef{0}).contiguous();
      p.delta = delta.data_ptr<acc_t>();
      p.v = v0 + l0 * p.v_sl;
      p.dout = go0 + l0 * p.do_sl;
      const size_t smem = attention_mma_bwd_smem(p.D, p.layers), dq_smem = attention_mma_dq_smem(p.D, p.layers);
      auto run = [&](auto kernel, dim3 g, size_t bytes) {
        allow_smem(kernel, bytes, kSharedNames.op);
        launch(kernel, g, kAttnMmaThreads, bytes, p);
      };
      if (det) {  // dQ summed in a fixed order by its own kernel, dK by the key-block kernel without atomics
        if (a.D == 64) run(attention_bwd_dq_mma_kernel<scalar_t, bf, 64>, dq_grid, dq_smem);
        else if (a.D == 96) run(attention_bwd_dq_mma_kernel<scalar_t, bf, 96>, dq_grid, dq_smem);
        else run(attention_bwd_dq_mma_kernel<scalar_t, bf, 128>, dq_grid, dq_smem);
        if (a.D == 64) run(attention_bwd_mma_kernel<scalar_t, bf, 64, false, true>, grid, smem);
        else if (a.D == 96) run(attention_bwd_mma_kernel<scalar_t, bf, 96, false, true>, grid, smem);
        else run(attention_bwd_mma_kernel<scalar_t, bf, 128, false, true>, grid, smem);
      } else {
        if (a.D == 64) run(attention_bwd_mma_kernel<scalar_t, bf, 64, true, true>, grid, smem);
        else if (a.D == 96) run(attention_bwd_mma_kernel<scalar_t, bf, 96, true, true>, grid, smem);
        else run(attention_bwd_mma_kernel<scalar_t, bf, 128, true, true>, grid, smem);
      }
    }
    return true;
  } else {
    return false;
  }
}

// The head size the tensor-core kernels run a call at: the smallest of 64, 96, 128 holding max(D, Dv); 0 above.
inline int64_t mma_head(const AttnArgs& a) {
  const int64_t d = std::max(a.D, a.Dv);
  return d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : 0;
}

// A copy of t (..., d) zero-padded to (..., P), contiguous.
at::Tensor pad_head(const at::Tensor& t, int64_t P) {
  return t.size(-1) == P ? t.contiguous() : at::constant_pad_nd(t, {0, P - t.size(-1)}).contiguous();
}

// float16 / bfloat16 calls the tensor-core kernels do not take as they are (D != Dv, a head size other than
// 64 / 96 / 128, rows not 16-byte aligned) but whose D, Dv <= 128: q, k, v (and dO) are copied zero-padded to
// P = mma_head(a) and the kernels run at D = Dv = P. Zero columns add nothing to a score q k^T and leave the
// output's first Dv columns as they are; the padded columns of O, dQ, dK, dV are dropped. The copies cost a
// pass over the inputs, far less than the SIMT kernels would take.
template <class scalar_t> bool use_mma_padded(const AttnArgs& a) {
  if constexpr (!std::is_same_v<scalar_t, at::Half> && !std::is_same_v<scalar_t, at::BFloat16>) {
    return false;
  } else {
    if (mma_head(a) == 0) return false;
#ifdef KDK_EMU
    return true;
#else
    return at::cuda::getCurrentDeviceProperties()->major >= 8;
#endif
  }
}

template <class scalar_t, class acc_t>
bool try_mma_fwd_padded(const AttnNames& n, const AttnArgs& a, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& m, const at::Tensor& out,
                        const AttnParams<scalar_t, acc_t>& p0, bool shared) {
  if (!use_mma_padded<scalar_t>(a)) return false;
  AttnArgs ap = a;
  ap.D = ap.Dv = mma_head(a);
  const at::Tensor qp = pad_head(q, ap.D), kp = pad_head(k, ap.D), vp = pad_head(v, ap.D);
  at::Tensor op = at::empty({a.B, a.H, a.Tq, ap.D}, q.options());
  AttnParams<scalar_t, acc_t> p = make_params<scalar_t, acc_t>(ap, qp, kp, vp, m);
  p.o = op.data_ptr<scalar_t>();
  p.lse_in = p0.lse_in;
  p.lse_out = p0.lse_out;
  if (!try_mma_fwd<scalar_t>(n, ap, qp, kp, vp, p, shared)) return false;
  out.copy_(op.narrow(-1, 0, a.Dv));
  return true;
}

template <class scalar_t, class acc_t>
bool try_mma_bwd_padded(const AttnNames& n, const AttnArgs& a, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& go, const at::Tensor& m,
                        const AttnParams<scalar_t, acc_t>& p0, const at::Tensor& dq_acc, const at::Tensor& dk,
                        const at::Tensor& dv) {
  if (!use_mma_padded<scalar_t>(a)) return false;
  AttnArgs ap = a;
  ap.D = ap.Dv = mma_head(a);
  const at::Tensor qp = pad_head(q, ap.D), kp = pad_head(k, ap.D), vp = pad_head(v, ap.D), gp = pad_head(go, ap.D);
  const bool grad_qk = p0.grad_qk;
  at::Tensor dqp = grad_qk ? at::zeros({a.B, a.H, a.Tq, ap.D}, dq_acc.options()) : at::Tensor();
  at::Tensor dkp = grad_qk ? at::empty({a.B, a.Hk, a.Tk, ap.D}, q.options()) : at::Tensor();
  at::Tensor dvp = at::empty({a.B, a.Hk, a.Tk, ap.D}, q.options());
  AttnParams<scalar_t, acc_t> p = make_params<scalar_t, acc_t>(ap, qp, kp, vp, m);
  p.dout = gp.data_ptr<scalar_t>();
  p.lse_in = p0.lse_in;
  p.delta = p0.delta;  // rowsum(dO * O) is the same with the zero columns
  p.grad_qk = grad_qk;
  p.dq = grad_qk ? dqp.data_ptr<acc_t>() : nullptr;
  p.dk = grad_qk ? dkp.data_ptr<scalar_t>() : nullptr;
  p.dv = dvp.data_ptr<scalar_t>();
  if (!try_mma_bwd<scalar_t>(n, ap, qp, kp, vp, gp, p)) return false;
  if (grad_qk) {
    dq_acc.copy_(dqp.narrow(-1, 0, a.D));
    dk.copy_(dkp.narrow(-1, 0, a.D));
  }
  dv.copy_(dvp.narrow(-1, 0, a.Dv));
  return true;
}

at::Tensor opt_mask(const c10::optional<at::Tensor>& mask);

// The similarity kernels' parameters (tensor-core and SIMT alike): the layers' Q and K, the mask, the per-block
// work rows and partial sums, the shape, and the key tile BN.
template <class scalar_t, class acc_t>
SimParams<scalar_t, acc_t> sim_params(const SimArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& m,
                                      const at::Tensor& work, const at::Tensor& partial, int64_t npairs,
                                      int64_t ngroups, int BN) {
  SimParams<scalar_t, acc_t> p{};
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  if (m.defined()) {
    p.mask = m.data_ptr<bool>();
    p.m_sb = m.stride(0); p.m_sh = m.stride(1); p.m_sq = m.stride(2); p.m_sk = m.stride(3);
  }
  p.work = work.data_ptr<acc_t>();
  p.partial = partial.data_ptr<acc_t>();
  p.L = a.L; p.B = a.B; p.H = a.H; p.Hk = a.Hk; p.Tq = a.Tq; p.Tk = a.Tk; p.group = a.group; p.off = a.off;
  p.npairs = npairs; p.ngroups = ngroups;
  p.D = static_cast<int>(a.D); p.BN = BN; p.causal = a.causal; p.cosine = a.cosine;
  p.scale = static_cast<acc_t>(a.scale);
  return p;
}

// attention_similarity on tensor cores (attention_similarity_mma_kernel) for float16 / bfloat16 with head_dim
// 64 / 96 / 128 on sm_80+, when the L layers' probability tiles fit in shared memory: the per-block partial
// sums (grid, npairs + 1); undefined otherwise (the SIMT kernel runs).
at::Tensor similarity_mma(const SimArgs& a, const at::Tensor& qs, const at::Tensor& ks,
                          const c10::optional<at::Tensor>& mask) {
  at::Tensor partial;
  const bool half = qs.scalar_type() == at::kHalf || qs.scalar_type() == at::kBFloat16;
  if (!half || (a.D != 64 && a.D != 96 && a.D != 128)) return partial;
#ifndef KDK_EMU
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return partial;
#endif
  const size_t smem = attention_mma_sim_smem(a.L, static_cast<int>(a.D));
  if (smem > max_dynamic_smem_optin()) return partial;
  const at::Tensor q = qs.contiguous(), k = ks.contiguous(), m = opt_mask(mask);
  if (reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 != 0 || reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 != 0)
    return partial;
  const int64_t npairs = a.L * (a.L + 1) / 2;
  const int64_t ngroups = a.B * a.H * ((a.Tq + kSimMmaRows - 1) / kSimMmaRows);
  const int64_t grid = std::min<int64_t>(ngroups, int64_t(num_sms()) * 4);
  at::Tensor work = at::empty({grid, kSimMmaRows * npairs}, q.options().dtype(at::kFloat));
  partial = at::zeros({grid, npairs + 1}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_similarity_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      constexpr bool bf = std::is_same_v<scalar_t, at::BFloat16>;
      const auto p = sim_params<scalar_t, float>(a, q, k, m, work, partial, npairs, ngroups, kSimMmaBN);
      auto run = [&](auto kernel) {
        allow_smem(kernel, smem, "attention_similarity");
        launch(kernel, static_cast<unsigned>(grid), kAttnMmaThreads, smem, p);
      };
      if (a.D == 64) run(attention_similarity_mma_kernel<scalar_t, bf, 64>);
      else if (a.D == 96) run(attention_similarity_mma_kernel<scalar_t, bf, 96>);
      else run(attention_similarity_mma_kernel<scalar_t, bf, 128>);
    }
  });
  return partial;
}

// shared_attention_probs_fwd on tensor cores (attention_probs_mma_kernel) for float16 / bfloat16 q, k whose
// head size and rows the tensor-core kernels take; false: the float32 GEMM path runs.
bool probs_mma(const AttnArgs& a, const at::Tensor& q0, const at::Tensor& k0, const at::Tensor& lse,
               const c10::optional<at::Tensor>& mask, const at::Tensor& probs) {
  bool done = false;
  if (a.B * a.H > kMaxGridY) return false;
  const at::Tensor q = attn_unit_last(q0), k = attn_unit_last(k0), m = opt_mask(mask), lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "shared_attention_probs_fwd_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      AttnArgs ak = a;
      ak.Dv = a.D;  // the probabilities have no V: check q, k alone
      if (!use_mma_fwd<scalar_t>(ak, q, k, k)) return;
      constexpr bool bf = std::is_same_v<scalar_t, at::BFloat16>;
      AttnParams<scalar_t, float> p = make_params<scalar_t, float>(ak, q, k, at::Tensor(), m);
      p.lse_in = lse_c.data_ptr<float>();
      p.o = probs.data_ptr<scalar_t>();
      const size_t smem = attention_mma_probs_smem(p.D);
      const dim3 grid(static_cast<unsigned>((a.Tk + 63) / 64), static_cast<unsigned>((a.Tq + 63) / 64),
                      static_cast<unsigned>(a.B * a.H));
      auto run = [&](auto kernel) {
        allow_smem(kernel, smem, kSharedNames.op);
        launch(kernel, grid, kAttnMmaThreads, smem, p);
      };
      if (a.D == 64) run(attention_probs_mma_kernel<scalar_t, bf, 64>);
      else if (a.D == 96) run(attention_probs_mma_kernel<scalar_t, bf, 96>);
      else run(attention_probs_mma_kernel<scalar_t, bf, 128>);
      done = true;
    }
  });
  return done;
}

at::Tensor opt_mask(const c10::optional<at::Tensor>& mask) { return mask.has_value() ? *mask : at::Tensor(); }

// attention (lse_in undefined) or shared attention in recompute mode (lse_in given).
std::tuple<at::Tensor, at::Tensor> forward_cuda(const AttnNames& n, const AttnArgs& a, const at::Tensor& q0,
                                                const at::Tensor& k0, const at::Tensor& v0, const at::Tensor& lse_in,
                                                const c10::optional<at::Tensor>& mask) {
  const DeviceGuard guard(q0.device());
  const at::Tensor q = attn_unit_last(q0), k = attn_unit_last(k0), v = attn_unit_last(v0), m = opt_mask(mask);
  at::Tensor out = at::empty({a.B, a.H, a.Tq, a.Dv}, q.options());
  at::Tensor lse = lse_in.defined() ? lse_in.contiguous() : at::empty({a.B, a.H, a.Tq}, q.options().dtype(a.acc));
  if (a.B * a.H * a.Tq == 0) return {out, lse};
  KDK_CHECK(n.op, a.B * a.H <= kMaxGridY, "batch * heads must be <= ", kMaxGridY, " on CUDA: got ", a.B * a.H);
  const bool shared = lse_in.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    AttnParams<scalar_t, acc_t> p = make_params<scalar_t, acc_t>(a, q, k, v, m);
    p.o = out.data_ptr<scalar_t>();
    if (shared) p.lse_in = lse.data_ptr<acc_t>();
    else p.lse_out = lse.data_ptr<acc_t>();
    if (try_mma_fwd<scalar_t>(n, a, q, k, v, p, shared)) return;
    if (try_mma_fwd_padded<scalar_t>(n, a, q, k, v, m, out, p, shared)) return;
    const size_t smem = attention_smem_fwd<acc_t>(p.D, p.Dv);
    const dim3 grid(static_cast<unsigned>((a.Tq + AttnFwdTile<acc_t>::BM - 1) / AttnFwdTile<acc_t>::BM),
                    static_cast<unsigned>(a.B * a.H));
    auto run = [&](auto kernel) {
      allow_smem(kernel, smem, n.op);
      launch(kernel, grid, kAttnThreads, smem, p);
    };
    if (shared) {
      if (a.Dv <= 64) run(attention_fwd_kernel<scalar_t, acc_t, 64, true>);
      else run(attention_fwd_kernel<scalar_t, acc_t, 128, true>);
    } else {
      if (a.Dv <= 64) run(attention_fwd_kernel<scalar_t, acc_t, 64, false>);
      else run(attention_fwd_kernel<scalar_t, acc_t, 128, false>);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const AttnNames& n, const AttnArgs& a,
                                                             const at::Tensor& grad_out, const at::Tensor& q0,
                                                             const at::Tensor& k0, const at::Tensor& v0,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const c10::optional<at::Tensor>& mask, bool grad_qk) {
  const DeviceGuard guard(q0.device());
  const at::Tensor q = attn_unit_last(q0), k = attn_unit_last(k0), v = attn_unit_last(v0), m = opt_mask(mask);
  const auto acc_opts = q.options().dtype(a.acc);
  at::Tensor dq_acc = grad_qk ? at::zeros({a.B, a.H, a.Tq, a.D}, acc_opts) : at::Tensor();
  at::Tensor dk = grad_qk ? at::empty({a.B, a.Hk, a.Tk, a.D}, q.options()) : at::empty({0}, q.options());
  at::Tensor dv = at::empty({a.B, a.Hk, a.Tk, a.Dv}, q.options());
  if (a.B * a.Hk * a.Tk > 0) {
    KDK_CHECK(n.op, a.B * a.Hk <= kMaxGridY, "batch * kv_heads must be <= ", kMaxGridY, " on CUDA: got ", a.B * a.Hk);
    const at::Tensor go = grad_out.contiguous(), lse_c = lse.contiguous();
    // D_i = rowsum(dO * O): the softmax backward's row term (ATen, one fused reduction).
    const at::Tensor delta = (go.to(a.acc) * out.to(a.acc)).sum(at::IntArrayRef{-1}).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      AttnParams<scalar_t, acc_t> p = make_params<scalar_t, acc_t>(a, q, k, v, m);
      p.dout = go.data_ptr<scalar_t>();
      p.lse_in = lse_c.data_ptr<acc_t>();
      p.delta = delta.data_ptr<acc_t>();
      p.grad_qk = grad_qk;
      p.dq = grad_qk ? dq_acc.data_ptr<acc_t>() : nullptr;
      p.dk = grad_qk ? dk.data_ptr<scalar_t>() : nullptr;
      p.dv = dv.data_ptr<scalar_t>();
      if (try_mma_bwd<scalar_t>(n, a, q, k, v, go, p)) return;
      if (try_mma_bwd_padded<scalar_t>(n, a, q, k, v, go, m, p, dq_acc, dk, dv)) return;
      const size_t smem = attention_smem_bwd<acc_t>(p.D, p.Dv);
      const dim3 grid(static_cast<unsigned>((a.Tk + AttnBwdTile<acc_t>::BN - 1) / AttnBwdTile<acc_t>::BN),
                      static_cast<unsigned>(a.B * a.Hk));
      auto run = [&](auto kernel) {
        allow_smem(kernel, smem, n.op);
        launch(kernel, grid, kAttnThreads, smem, p);
      };
      if (std::max(a.D, a.Dv) <= 64) run(attention_bwd_kernel<scalar_t, acc_t, 64>);
      else run(attention_bwd_kernel<scalar_t, acc_t, 128>);
    });
  }
  at::Tensor dq = grad_qk ? dq_acc.to(q.scalar_type()) : at::empty({0}, q.options());
  return {dq, dk, dv};
}

unsigned row_blocks(int64_t rows) {
  const int64_t per_block = kAttnThreads / 32;  // one warp per row
  return static_cast<unsigned>(std::min<int64_t>((rows + per_block - 1) / per_block, int64_t(1) << 20));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(KDK_ATTENTION_FWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kAttentionNames, q, k, &v, nullptr, mask, causal, scale);
  return forward_cuda(kAttentionNames, a, q, k, v, at::Tensor(), mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(KDK_ATTENTION_BWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kAttentionNames, q, k, &v, &lse, mask, causal, scale);
  attention_check_grad(kAttentionNames, a, grad_out, out, q);
  return backward_cuda(kAttentionNames, a, grad_out, q, k, v, out, lse, mask, true);
}

at::Tensor shared_attention_fwd_cuda(KDK_SHARED_ATTENTION_FWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kSharedNames, q, k, &v, &lse, mask, causal, scale);
  return std::get<0>(forward_cuda(kSharedNames, a, q, k, v, lse, mask));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_attention_bwd_cuda(KDK_SHARED_ATTENTION_BWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kSharedNames, q, k, &v, &lse, mask, causal, scale);
  attention_check_grad(kSharedNames, a, grad_out, out, q);
  return backward_cuda(kSharedNames, a, grad_out, q, k, v, out, lse, mask, grad_qk);
}

std::tuple<at::Tensor, at::Tensor> shared_attention_group_bwd_cuda(KDK_SHARED_ATTENTION_GROUP_BWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = shared_group_parse(grad_out, q, k, lse, v, out, mask, causal, scale);
  const DeviceGuard guard(q.device());
  const int64_t L = v.size(0);
  const auto acc_opts = q.options().dtype(a.acc);
  at::Tensor dq = at::zeros({a.B, a.H, a.Tq, a.D}, acc_opts), dk = at::zeros({a.B, a.Hk, a.Tk, a.D}, acc_opts);
  bool done = a.B * a.Hk * a.Tk == 0 || a.Tq == 0;
  if (!done) {
    KDK_CHECK(kSharedNames.op, a.B * a.Hk <= kMaxGridY && a.B * a.H <= kMaxGridY, "batch * heads must be <= ",
              kMaxGridY, " on CUDA: got ", a.B * a.H);
    const at::Tensor qc = attn_unit_last(q), kc = attn_unit_last(k), vc = attn_unit_last(v), m = opt_mask(mask);
    const at::Tensor go = grad_out.contiguous(), lse_c = lse.contiguous();
    // delta_l,i = rowsum(dO_l * O_l), per layer (L, B, H, Tq)
    const at::Tensor delta = (go.to(a.acc) * out.to(a.acc)).sum(at::IntArrayRef{-1});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qc.scalar_type(), "shared_attention_group_bwd_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      AttnParams<scalar_t, acc_t> p = make_params<scalar_t, acc_t>(a, qc, kc, vc[0], m);
      p.v = vc.data_ptr<scalar_t>();
      p.v_sl = vc.stride(0);
      p.dout = go.data_ptr<scalar_t>();
      p.do_sl = go.stride(0);
      p.lse_in = lse_c.data_ptr<acc_t>();
      p.dq = dq.data_ptr<acc_t>();
      p.dk_acc = dk.data_ptr<acc_t>();
      p.dv = nullptr;
      done = try_mma_group<scalar_t>(a, qc, kc, vc, go, delta, p);
    });
  }
  if (!done) {  // the SIMT kernels: one backward per layer, dQ and dK summed (the same sum, L times the work)
    for (int64_t l = 0; l < L; ++l) {
      auto grads = backward_cuda(kSharedNames, a, grad_out[l], q, k, v[l], out[l], lse, mask, true);
      dq.add_(std::get<0>(grads));
      dk.add_(std::get<1>(grads));
    }
  }
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type())};
}

at::Tensor shared_attention_probs_fwd_cuda(KDK_SHARED_ATTENTION_PROBS_FWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kSharedNames, q, k, nullptr, &lse, mask, causal, scale);
  const DeviceGuard guard(q.device());
  at::Tensor probs = at::empty({a.B, a.H, a.Tq, a.Tk}, q.options());
  if (probs.numel() == 0) return probs;
  if (probs_mma(a, q, k, lse, mask, probs)) return probs;
  // S = q k^T in float32 (float64): products of fp16/bf16 inputs are exact there, as in a flash kernel.
  const at::Tensor qf = q.to(a.acc).reshape({a.B, a.Hk, a.group, a.Tq, a.D});
  const at::Tensor kf = k.to(a.acc).unsqueeze(2);
  const at::Tensor S = at::matmul(qf, kf.transpose(-1, -2)).reshape({a.B, a.H, a.Tq, a.Tk}).contiguous();
  const at::Tensor lse_c = lse.contiguous(), m = opt_mask(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "shared_attention_probs_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    ProbsParams<scalar_t, acc_t> p{};
    p.s = S.data_ptr<acc_t>();
    p.lse = lse_c.data_ptr<acc_t>();
    p.probs = probs.data_ptr<scalar_t>();
    if (m.defined()) {
      p.mask = m.data_ptr<bool>();
      p.m_sb = m.stride(0); p.m_sh = m.stride(1); p.m_sq = m.stride(2); p.m_sk = m.stride(3);
    }
    p.H = a.H; p.Tq = a.Tq; p.Tk = a.Tk; p.rows = a.B * a.H * a.Tq; p.off = a.off; p.causal = a.causal;
    p.scale = static_cast<acc_t>(a.scale);
    launch(attention_probs_fwd_kernel<scalar_t, acc_t>, row_blocks(p.rows), kAttnThreads, 0, p);
  });
  return probs;
}

std::tuple<at::Tensor, at::Tensor> shared_attention_probs_bwd_cuda(KDK_SHARED_ATTENTION_PROBS_BWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kSharedNames, q, k, nullptr, nullptr, c10::nullopt, false, scale);
  attention_check_probs(a, grad_probs, probs, q);
  const DeviceGuard guard(q.device());
  const auto acc_opts = q.options().dtype(a.acc);
  if (a.B * a.H * a.Tq == 0 || a.Tk == 0)
    return {at::zeros({a.B, a.H, a.Tq, a.D}, q.options()), at::zeros({a.B, a.Hk, a.Tk, a.D}, q.options())};
  at::Tensor dS = at::empty({a.B, a.H, a.Tq, a.Tk}, acc_opts);
  const at::Tensor g = grad_probs.contiguous(), pr = probs.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "shared_attention_probs_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    ProbsParams<scalar_t, acc_t> p{};
    p.g = g.data_ptr<scalar_t>();
    p.pr = pr.data_ptr<scalar_t>();
    p.ds = dS.data_ptr<acc_t>();
    p.H = a.H; p.Tq = a.Tq; p.Tk = a.Tk; p.rows = a.B * a.H * a.Tq;
    launch(attention_probs_bwd_kernel<scalar_t, acc_t>, row_blocks(p.rows), kAttnThreads, 0, p);
  });
  // dQ = scale dS K, dK = scale sum over the group's query heads of dS^T Q. float16 / bfloat16: GEMMs on
  // tensor cores with dS rounded to the inputs' dtype (as FlashAttention's backward does) and float32
  // accumulation; float32 / float64: GEMMs in that dtype.
  const bool half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const auto gemm_t = half ? q.scalar_type() : a.acc;
  const at::Tensor dS5 = dS.view({a.B, a.Hk, a.group, a.Tq, a.Tk}).to(gemm_t);
  const at::Tensor kf = k.to(gemm_t).unsqueeze(2), qf = q.to(gemm_t).reshape({a.B, a.Hk, a.group, a.Tq, a.D});
  at::Tensor dq = at::matmul(dS5, kf).reshape({a.B, a.H, a.Tq, a.D}).to(a.acc).mul_(a.scale);
  at::Tensor dk = at::matmul(dS5.transpose(-1, -2), qf).sum(at::IntArrayRef{2}, false, a.acc).mul_(a.scale);
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type())};
}

at::Tensor attention_similarity_cuda(KDK_ATTENTION_SIMILARITY_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const SimArgs a = attention_similarity_parse(qs, ks, mask, causal, scale, std::string(metric));
  const DeviceGuard guard(qs.device());
  const int64_t L = a.L, npairs = L * (L + 1) / 2;
  const int64_t ngroups = a.B * a.H * ((a.Tq + kSimRows - 1) / kSimRows);
  std::vector<double> total(static_cast<size_t>(npairs + 1), 0.0);
  at::Tensor tc_partial;
  if (ngroups > 0 && a.Tk > 0) tc_partial = similarity_mma(a, qs, ks, mask);
  if (tc_partial.defined()) {
    const at::Tensor tot = tc_partial.sum(at::IntArrayRef{0}, /*keepdim=*/false, at::kDouble).cpu();
    const double* t = tot.data_ptr<double>();
    std::copy(t, t + npairs + 1, total.begin());
  } else if (ngroups > 0 && a.Tk > 0) {
    const at::Tensor q = qs.contiguous(), k = ks.contiguous(), m = opt_mask(mask);
    const int sms = num_sms();
    const int64_t grid = std::min<int64_t>(ngroups, int64_t(sms) * 8);
    const auto acc_opts = q.options().dtype(a.acc);
    at::Tensor work = at::empty({grid, kSimRows * npairs}, acc_opts);
    at::Tensor partial = at::zeros({grid, npairs + 1}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_similarity_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      // The widest key tile whose shared memory fits the default 48 KB, else the device's opt-in limit.
      const size_t limit = max_dynamic_smem_optin();
      int BN = 0;
      for (int bn : {64, 32, 16, 8})
        if (attention_smem_sim<acc_t>(L, static_cast<int>(a.D), bn) <= kDefaultSmem) { BN = bn; break; }
      if (BN == 0)
        for (int bn : {64, 32, 16, 8})
          if (attention_smem_sim<acc_t>(L, static_cast<int>(a.D), bn) <= limit) { BN = bn; break; }
      KDK_CHECK("attention_similarity", BN > 0, "too many layers for one pass: ", L, " layers of head_dim ", a.D,
                " need ", attention_smem_sim<acc_t>(L, static_cast<int>(a.D), 8),
                " bytes of shared memory per block; the device allows ", limit, " (compare fewer layers at a time)");
      const auto p = sim_params<scalar_t, acc_t>(a, q, k, m, work, partial, npairs, ngroups, BN);
      const size_t smem = attention_smem_sim<acc_t>(L, p.D, BN);
      auto kernel = attention_similarity_kernel<scalar_t, acc_t>;
      allow_smem(kernel, smem, "attention_similarity");
      launch(kernel, static_cast<unsigned>(grid), kAttnThreads, smem, p);
    });
    const at::Tensor tot = partial.sum(at::IntArrayRef{0}, /*keepdim=*/false, at::kDouble).cpu();  // one host sync: an analysis op
    const double* t = tot.data_ptr<double>();
    std::copy(t, t + npairs + 1, total.begin());
  }
  at::Tensor sim = at::empty({L, L}, at::TensorOptions().dtype(at::kDouble));
  double* s = sim.data_ptr<double>();
  for (int64_t x = 0, pi = 0; x < L; ++x)
    for (int64_t y = 0; y <= x; ++y, ++pi) s[x * L + y] = s[y * L + x] = total[pi] / total[npairs];  // 0/0: NaN
  return sim.to(qs.device(), a.acc);
}

TORCH_LIBRARY_IMPL(KDK_LIB, KDK_DEVICE_KEY, m) {
  m.impl("attention_fwd", KDK_IMPL(attention_fwd_cuda));
  m.impl("attention_bwd", KDK_IMPL(attention_bwd_cuda));
  m.impl("shared_attention_fwd", KDK_IMPL(shared_attention_fwd_cuda));
  m.impl("shared_attention_bwd", KDK_IMPL(shared_attention_bwd_cuda));
  m.impl("shared_attention_group_bwd", KDK_IMPL(shared_attention_group_bwd_cuda));
  m.impl("shared_attention_probs_fwd", KDK_IMPL(shared_attention_probs_fwd_cuda));
  m.impl("shared_attention_probs_bwd", KDK_IMPL(shared_attention_probs_bwd_cuda));
  m.impl("attention_similarity", KDK_IMPL(attention_similarity_cuda));
}

}  // namespace kdk
