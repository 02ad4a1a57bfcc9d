"""Benchmarks of kdkernels.topk_kl_div (forward+backward) against the eager reference, its torch.compile and Liger-Kernel."""

from __future__ import annotations

import math

import pytest
import torch

import common
import kdkernels
from kdkernels.reference import topk_kl_div_ref

# The spec's bar shapes (shared/design/ops/topk_kl.md, "Bars") and small ones for a quick look.
FULL = {"cpu": [dict(N=2048, V=32000, K=64, dtype=torch.float32)],
        "cuda": [dict(N=8192, V=128256, K=64, dtype=torch.bfloat16)]}
QUICK = {"cpu": [dict(N=256, V=8000, K=32, dtype=torch.float32)],
         "cuda": [dict(N=1024, V=32000, K=64, dtype=torch.bfloat16)]}
# (mode, divergence): every convention with the forward KL; dense also with JSD, which Liger has a kernel for.
CASES = [("renorm", "forward_kl"), ("tail", "forward_kl"), ("support", "forward_kl"), ("dense", "forward_kl"),
         ("dense", "jsd")]
IMPLS = ["kdkernels", "eager", "eager+compile", "liger"]
# What each mode is fed: tail takes full-vocabulary log-probs (an offline cache); the others raw logits.
VALUES_ARE = {"renorm": "logits", "support": "logits", "tail": "logprobs", "dense": "logits"}

# Bars (spec): CPU >= 3x eager (top-k modes); GPU within 1.3x of the byte floor, >= 5x eager, peak memory above
# the inputs <= one N x V gradient + 64 bytes per (row, K+2) entry (room for a few per-row K-vectors); dense:
# faster than Liger with less memory.
CPU_SPEEDUP_BAR, GPU_SPEEDUP_BAR, GPU_FLOOR_BAR, NK_BYTES_PER_ENTRY = 3.0, 5.0, 1.3, 64


def make_inputs(N, V, K, dtype, device, mode, seed=0):
    """Student logits (N, V) requiring grad and the teacher as `mode` takes it. Teacher ids are distinct per row
    without a sort over V (a random start, a stride of V // K); `tail` values hold 90% of the mass."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = (2 * torch.randn(N, V, generator=g, device=device)).to(dtype).requires_grad_()
    if mode == "dense":
        return z, (2 * torch.randn(N, V, generator=g, device=device)).to(dtype), None
    start = torch.randint(0, V, (N, 1), generator=g, device=device)
    ids = (start + torch.arange(K, device=device) * (V // K)) % V
    t = 2 * torch.randn(N, K, generator=g, device=device)
    if VALUES_ARE[mode] == "logprobs":
        t = torch.log_softmax(t, dim=-1) + math.log(0.9)
    return z, t, ids


def loss_fn(impl, mode, divergence, device):
    kw = dict(values_are=VALUES_ARE[mode], mode=mode, divergence=divergence)
    if impl == "kdkernels":
        # validate=True costs a host synchronisation on CUDA; a training loop that trusts its cache turns it off
        return lambda z, t, i: kdkernels.topk_kl_div(z, t, i, validate=device.type != "cuda", **kw)
    if impl == "eager":
        return lambda z, t, i: topk_kl_div_ref(z, t, i, **kw)
    if impl == "eager+compile":
        compiled = torch.compile(topk_kl_div_ref)
        return lambda z, t, i: compiled(z, t, i, **kw)
    # Liger (Triton: GPU only) takes log-probabilities, so the user's two eager log_softmaxes belong to its step.
    if mode != "dense" or device.type != "cuda":
        pytest.skip("Liger-Kernel has dense CUDA kernels only")
    liger = pytest.importorskip("liger_kernel.transformers")
    loss = (liger.LigerKLDIVLoss(reduction="batchmean", log_target=True) if divergence == "forward_kl"
            else liger.LigerJSD(beta=0.5))
    return lambda z, t, i: loss(torch.log_softmax(z, -1), torch.log_softmax(t, -1))


def bars(device, mode, shape, t, ids):
    """The spec's bars on the kdkernels row, with the byte floor on GPU."""
    N, V, K = shape["N"], shape["V"], shape["K"]
    if device.type == "cpu":
        return None, ([dict(vs="eager", min_speedup=CPU_SPEEDUP_BAR)] if mode != "dense" else [])
    elt = torch.empty((), dtype=shape["dtype"]).element_size()
    if mode == "dense":  # two passes over both inputs and one gradient write, for information
        return common.floor_ms(device, bytes_moved=5 * N * V * elt), [
            dict(vs="liger", min_speedup=1.0), dict(vs="liger", max_peak_fraction_of=1.0)]
    # read the logits twice (statistics, gradient), write the gradient once, read the teacher's values and ids
    teacher = t.numel() * t.element_size() + ids.numel() * ids.element_size()
    floor = common.floor_ms(device, bytes_moved=3 * N * V * elt + teacher)
    budget = N * V * elt + NK_BYTES_PER_ENTRY * N * (K + 2)
    return floor, [dict(max_x_floor=GPU_FLOOR_BAR), dict(vs="eager", min_speedup=GPU_SPEEDUP_BAR),
                   dict(max_peak_bytes=budget, why="one gradient + O(NK)")]


@pytest.mark.shapes(full=FULL, quick=QUICK)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,divergence", CASES)
def test_topk_kl(kdk_bench, device, shape, mode, divergence, impl):
    fn = loss_fn(impl, mode, divergence, device)
    z, t, ids = make_inputs(shape["N"], shape["V"], shape["K"], shape["dtype"], device, mode)

    def step():  # a fresh gradient each call, as in training
        z.grad = None
        loss = fn(z, t, ids)
        loss.backward()
        return loss

    floor, bar = bars(device, mode, shape, t, ids) if impl == "kdkernels" else (None, ())
    kdk_bench.run(step, op="topk_kl", case=f"{mode}/{divergence}", impl=impl, device=device,
                  shape=dict(shape, K=None if mode == "dense" else shape["K"]), floor_ms=floor, bars=bar,
                  mem_setup=lambda: setattr(z, "grad", None), grads=(z,))
