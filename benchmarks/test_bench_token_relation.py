"""Benchmarks of kdkernels.token_relation_loss / token_contrastive_loss vs the eager reference, its compile, the GEMMs."""

from __future__ import annotations


import pytest
import torch

import common
import kdkernels
from kdkernels.reference import token_contrastive_loss_ref, token_relation_loss_ref

# The spec's bar shapes (shared/design/ops/token_relation.md, "Bars") and small ones for a quick look.
FULL = {"cpu": [dict(B=1, T=4096, Ds=256, Dt=256, H=1, dtype=torch.float32)],
        "cuda": [dict(B=8, T=4096, Ds=384, Dt=768, H=12, dtype=torch.bfloat16)]}
QUICK = {"cpu": [dict(B=1, T=1024, Ds=128, Dt=128, H=1, dtype=torch.float32)],
         "cuda": [dict(B=2, T=2048, Ds=384, Dt=768, H=12, dtype=torch.bfloat16)]}
# GPU, KL only, full shapes only: the tensor-core bar shape (issue 13) and the length where the materialised
# reference should not fit (one (H, T, T) bf16 graph is 26 GB and it holds several).
LONG_T = 32768
KL_GPU = {"cuda": [dict(B=8, T=4096, Ds=1024, Dt=1024, H=16, dtype=torch.bfloat16),
                   dict(FULL["cuda"][0], B=1, T=LONG_T)]}
CASES = ["kl", "mse", "contrastive"]  # relation KL and MSE (dot similarity, H heads); contrastive (cosine)
IMPLS = ["kdkernels", "eager", "eager+compile", "gemm"]
CONTRASTIVE_TAU = 0.1

# Bars (spec): CPU >= 1.5x eager with memory far below T x T (here: under a quarter of one float32 T x T matrix,
# the reference holds several, plus 4 MiB for the per-thread 256 x 256 tiles); GPU >= 4x eager, no slower than
# 1.5x the similarity GEMMs, peak memory O(B T (Ds + Dt)) (here: at most 32 bytes per (token, feature) of both
# models: the 16-bit feature copies, the float32 gradient accumulator and its re-ordered copies).
CPU_SPEEDUP_BAR, GPU_SPEEDUP_BAR, GPU_GEMM_BAR = 1.5, 4.0, 1.5
BYTES_PER_TOKEN_FEATURE, CPU_WORKSPACE = 32, 4 << 20


def case_shape(case, shape):
    """The shape as `case` uses it: contrastive compares Ds-wide features of both models with one head."""
    return dict(shape, Dt=shape["Ds"], H=None) if case == "contrastive" else shape


def make_inputs(shape, device, seed=0):
    """Student (B, T, Ds) features requiring grad and teacher (B, T, Dt), drawn in float32 then cast."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, T = shape["B"], shape["T"]
    s = torch.randn(B, T, shape["Ds"], generator=g, device=device).to(shape["dtype"]).requires_grad_()
    t = torch.randn(B, T, shape["Dt"], generator=g, device=device).to(shape["dtype"])
    return s, t


def loss_fn(impl, case, shape):
    if case == "contrastive":
        op, ref, kw = (kdkernels.token_contrastive_loss, token_contrastive_loss_ref,
                       dict(tau=CONTRASTIVE_TAU, similarity="cosine"))
    else:
        op, ref, kw = kdkernels.token_relation_loss, token_relation_loss_ref, dict(loss=case, num_heads=shape["H"])
    if impl == "kdkernels":
        return lambda s, t: op(s, t, **kw)
    if impl == "eager":
        return lambda s, t: ref(s, t, **kw)
    compiled = torch.compile(ref)
    return lambda s, t: compiled(s, t, **kw)


def gemm_step(case, shape, s, t):
    """The similarity products the op must do, materialised by torch.matmul on the same shapes: the forward
    graph(s), the backward's recomputation and its gradient product. A lower bound, not a loss (returns no scalar)."""
    if case == "contrastive":
        sh, th = s.detach(), t.detach()

        def step():
            torch.matmul(sh, th.transpose(1, 2))  # forward logits
            c = torch.matmul(sh, th.transpose(1, 2))  # backward: recomputed
            return torch.matmul(c, th)  # dS = G T
        return step
    B, T, H = shape["B"], shape["T"], shape["H"]
    ys = s.detach().reshape(B, T, H, -1).transpose(1, 2)
    yt = t.detach().reshape(B, T, H, -1).transpose(1, 2)

    def step():
        for _ in range(2):  # forward, then the backward's recomputation
            torch.matmul(yt, yt.transpose(-1, -2))
            g = torch.matmul(ys, ys.transpose(-1, -2))
        return torch.matmul(g, ys)  # dYs = M Ys
    return step


def gemm_flops(case, shape):
    """The GEMM work the loss implies, no recomputation. Relation: both graphs forward (2 B T^2 D each) and the
    student's gradient (M + M^T) Ys backward; contrastive: the logits S T^T forward and dS = G T backward."""
    B, T, Ds, Dt = shape["B"], shape["T"], shape["Ds"], shape["Dt"]
    if case == "contrastive":
        return 4.0 * B * T * T * Ds
    return 2.0 * B * T * T * (Ds + Dt) + 4.0 * B * T * T * Ds


def bars(device, case, shape, vs_gemm=True):
    """The spec's bars on the kdkernels row, with the GEMM-rate floor of the implied work on GPU."""
    B, T, Ds, Dt = shape["B"], shape["T"], shape["Ds"], shape["Dt"]
    if device.type == "cpu":
        return None, [dict(vs="eager", min_speedup=CPU_SPEEDUP_BAR),
                      dict(max_peak_bytes=T * T * 4 // 4 + CPU_WORKSPACE, why="T x T float32 / 4 + 4 MiB")]
    floor = common.floor_ms(device, flops=gemm_flops(case, shape))
    budget = BYTES_PER_TOKEN_FEATURE * B * T * (Ds + Dt)
    return floor, ([dict(vs="gemm", min_speedup=1 / GPU_GEMM_BAR)] if vs_gemm else []) + [
        dict(vs="eager", min_speedup=GPU_SPEEDUP_BAR),
        dict(max_peak_bytes=budget, why=f"{BYTES_PER_TOKEN_FEATURE} B x B T (Ds + Dt)")]


def bench(kdk_bench, device, shape, case, impl, long=False):
    """Time one implementation of one case. `long`: the length past the reference's reach, where the GEMM floor
    is not timed (eager is tried: kdk_bench skips a row that runs out of memory, saying so)."""
    if long and impl == "gemm":
        pytest.skip(f"the GEMM lower bound is a bar at the bar shapes only; at T={shape['T']} the bar is memory")
    shape = case_shape(case, shape)
    s, t = make_inputs(shape, device)
    if impl == "gemm":
        step = gemm_step(case, shape, s, t)
    else:
        fn = loss_fn(impl, case, shape)

        def step():  # a fresh gradient each call, as in training
            s.grad = None
            loss = fn(s, t)
            loss.backward()
            return loss

    floor, bar = bars(device, case, shape, vs_gemm=not long) if impl == "kdkernels" else (None, ())
    kdk_bench.run(step, op="token_relation", case=case, impl=impl, device=device, shape=shape, floor_ms=floor,
                  bars=bar, mem_setup=lambda: setattr(s, "grad", None), grads=(s,), gemm_flops=gemm_flops(case, shape))


@pytest.mark.shapes(full=FULL, quick=QUICK)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_token_relation(kdk_bench, device, shape, case, impl):
    bench(kdk_bench, device, shape, case, impl)


# The KL-only GPU shapes have their own test, so the main one skips nothing. The tensor-core shape's bars are the
# GEMMs and eager (no compiled reference); at the long length the bar is kdkernels' memory: eager is tried for the
# ratio and skipped when its graphs do not fit, the GEMM floor is not timed.
@pytest.mark.shapes(full=KL_GPU, quick={})
@pytest.mark.parametrize("impl", ["kdkernels", "eager", "gemm"])
def test_token_relation_kl_gpu(kdk_bench, device, shape, impl):
    bench(kdk_bench, device, shape, "kl", impl, long=shape["T"] >= LONG_T)
