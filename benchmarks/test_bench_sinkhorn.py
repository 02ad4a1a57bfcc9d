"""Benchmarks of kdkernels.sinkhorn and sinkhorn_kd_loss (forward+backward) against the eager reference, its torch.compile and POT."""

from __future__ import annotations

import inspect

import pytest
import torch

import common
import kdkernels
from kdkernels.reference import sinkhorn_kd_loss_ref, sinkhorn_ref

# The spec's bar shapes (shared/design/ops/sinkhorn.md, "Bars") and small ones for a quick look. The solver runs
# with uniform marginals, POT's default, so every implementation solves the same problem.
EPS, ITERS = 0.1, 20
SOLVER_FULL = {"cpu": [dict(B=256, n=64, m=64)], "cuda": [dict(B=4096, n=64, m=64)]}
SOLVER_QUICK = {"cpu": [dict(B=64, n=64, m=64)], "cuda": [dict(B=512, n=64, m=64)]}
# SinKD: B=None is one unbatched (L, C) problem; C=2 and C=1000 are the class-count extremes.
KD_FULL = {"cpu": [dict(B=None, L=32, C=2), dict(B=None, L=32, C=100), dict(B=None, L=32, C=1000),
                   dict(B=8, L=128, C=50)],
           "cuda": [dict(B=None, L=32, C=2), dict(B=None, L=32, C=100), dict(B=None, L=32, C=1000),
                    dict(B=64, L=512, C=50)]}
KD_QUICK = {"cpu": [dict(B=None, L=32, C=100), dict(B=4, L=64, C=50)],
            "cuda": [dict(B=None, L=32, C=100), dict(B=16, L=256, C=50)]}
SOLVER_IMPLS = ["kdkernels", "eager", "eager+compile", "pot"]
KD_IMPLS = ["kdkernels", "eager", "eager+compile"]  # POT has no SinKD loss

# Bars (spec): CPU solver >= 3x eager at B=256, 64 x 64 float32; H200 solver >= 20x eager and >= 50x POT at
# B=4096, 64 x 64, peak memory above the inputs O(B (n + m) L) + one plan; H200 SinKD >= 10x eager (the cost
# construction included). No CPU bar for SinKD.
CPU_SOLVER_BAR, GPU_SOLVER_EAGER_BAR, GPU_SOLVER_POT_BAR, GPU_KD_BAR = 3.0, 20.0, 50.0, 10.0


def pot_solver():
    """POT's batched log-domain Sinkhorn on torch tensors, fixed at ITERS iterations (tol=0), differentiated
    through its iterations like kdkernels' grad='unrolled'; per-problem transport costs."""
    solve_batch = pytest.importorskip("ot.batch", reason="POT (ot.batch) is not installed").solve_batch
    # the spec's call says solver='log_sinkhorn' (POT 0.9.6); POT 0.9.7 renamed it method
    key = "method" if "method" in inspect.signature(solve_batch).parameters else "solver"
    return lambda c: solve_batch(c, EPS, max_iter=ITERS, tol=0, grad="autodiff",
                                 **{key: "log_sinkhorn"}).value_linear


def solver_fn(impl, device):
    """fn(cost) -> the (B,) per-problem values."""
    if impl == "kdkernels":
        # validate=True costs a host synchronisation on CUDA; a training loop that trusts its inputs turns it off
        return lambda c: kdkernels.sinkhorn(c, EPS, ITERS, marginals="uniform", validate=device.type != "cuda")
    if impl == "eager":
        return lambda c: sinkhorn_ref(c, EPS, ITERS, marginals="uniform")
    if impl == "eager+compile":
        ref = torch.compile(sinkhorn_ref)
        return lambda c: ref(c, EPS, ITERS, marginals="uniform")
    return pot_solver()


def kd_loss_fn(impl, device):
    """fn(student, teacher) -> the scalar SinKD loss (the defaults: temperature 2, eps 0.1, 20 iterations, L1 cost)."""
    if impl == "kdkernels":
        return lambda s, t: kdkernels.sinkhorn_kd_loss(s, t, validate=device.type != "cuda")
    if impl == "eager":
        return sinkhorn_kd_loss_ref
    return torch.compile(sinkhorn_kd_loss_ref)


def solver_bars(device, shape):
    """The spec's bars on the kdkernels row, with the byte floor on GPU."""
    B, n, m = shape["B"], shape["n"], shape["m"]
    if device.type == "cpu":
        return None, [dict(vs="eager", min_speedup=CPU_SOLVER_BAR)]
    # read the cost once forward and once backward, write the gradient once
    floor = common.floor_ms(device, bytes_moved=3 * 4 * B * n * m)
    # above the inputs: every iteration's float32 potentials f, g (twice, for slack), the gradient (one plan-sized
    # matrix per problem) and 1 MiB of small vectors
    budget = 2 * 4 * B * ITERS * (n + m) + 4 * B * n * m + (1 << 20)
    return floor, [dict(vs="eager", min_speedup=GPU_SOLVER_EAGER_BAR), dict(vs="pot", min_speedup=GPU_SOLVER_POT_BAR),
                   dict(max_peak_bytes=budget, why="O(B (n+m) L) + one plan")]


@pytest.mark.shapes(full=SOLVER_FULL, quick=SOLVER_QUICK)
@pytest.mark.parametrize("impl", SOLVER_IMPLS)
def test_sinkhorn_solver(kdk_bench, device, shape, impl):
    fn = solver_fn(impl, device)
    g = torch.Generator(device=device).manual_seed(0)
    cost = (torch.rand(shape["B"], shape["n"], shape["m"], generator=g, device=device) + 0.05).requires_grad_()

    def step():  # a fresh gradient each call; the sum of the per-problem values is what the report compares
        cost.grad = None
        loss = fn(cost).sum()
        loss.backward()
        return loss

    floor, bar = solver_bars(device, shape) if impl == "kdkernels" else (None, ())
    kdk_bench.run(step, op="sinkhorn", case="solver", impl=impl, device=device, shape=shape, floor_ms=floor,
                  bars=bar, mem_setup=lambda: setattr(cost, "grad", None), grads=(cost,), eps=EPS, n_iters=ITERS, dtype="float32")


@pytest.mark.shapes(full=KD_FULL, quick=KD_QUICK)
@pytest.mark.parametrize("impl", KD_IMPLS)
def test_sinkhorn_kd_loss(kdk_bench, device, shape, impl):
    fn = kd_loss_fn(impl, device)
    lead = () if shape["B"] is None else (shape["B"],)
    g = torch.Generator(device=device).manual_seed(0)
    s = (2 * torch.randn(*lead, shape["L"], shape["C"], generator=g, device=device)).requires_grad_()
    t = 2 * torch.randn(*lead, shape["L"], shape["C"], generator=g, device=device)

    def step():
        s.grad = None
        loss = fn(s, t)
        loss.backward()
        return loss

    bar = [dict(vs="eager", min_speedup=GPU_KD_BAR)] if impl == "kdkernels" and device.type == "cuda" else ()
    kdk_bench.run(step, op="sinkhorn", case="kd_loss", impl=impl, device=device, shape=shape, bars=bar,
                  mem_setup=lambda: setattr(s, "grad", None), grads=(s,), dtype="float32")
