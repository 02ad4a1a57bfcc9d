"""Benchmarks of kdkernels.linear_topk_kl_div (forward+backward) against the unfused path, eager, its compile and Liger."""

from __future__ import annotations

import math

import pytest
import torch

import common
import kdkernels
from kdkernels.reference import topk_kl_div_ref

# Issue 7's bar shape on GPU; on CPU a shape whose unfused logits are 0.5 GB; small ones for a quick look.
FULL = {"cpu": [dict(N=4096, H=256, V=32000, K=64, dtype=torch.float32)],
        "cuda": [dict(N=8192, H=4096, V=128256, K=64, dtype=torch.bfloat16)]}
QUICK = {"cpu": [dict(N=512, H=128, V=8000, K=32, dtype=torch.float32)],
         "cuda": [dict(N=2048, H=2048, V=32000, K=64, dtype=torch.bfloat16)]}
IMPLS = ["kdkernels", "unfused", "eager", "eager+compile", "liger"]
# An offline cache's convention: full-vocabulary log-probs of the teacher's top k, the rest as one tail bucket.
KW = dict(values_are="logprobs", mode="tail")

# Bars (issue 7): peak memory above the inputs <= 1/4 of the unfused path's (logits GEMM + topk_kl_div);
# on GPU, time <= 1.15x the unfused path's (chunking must not cost more than the logits it saves).
MEMORY_BAR, TIME_BAR = 0.25, 1.15


def make_inputs(N, H, V, K, dtype, device, seed=0):
    """Hidden states (N, H) and an lm_head weight (V, H), both requiring grad, and the teacher's top-k.
    Teacher ids are distinct per row without a sort over V (a random start, a stride of V // K); the values
    hold 90% of the mass. W is scaled by 1 / sqrt(H) so the logits are O(1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, H, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, device=device) / H ** 0.5).to(dtype).requires_grad_()
    start = torch.randint(0, V, (N, 1), generator=g, device=device)
    ids = (start + torch.arange(K, device=device) * (V // K)) % V
    vals = torch.log_softmax(torch.randn(N, K, generator=g, device=device), -1) + math.log(0.9)
    return h, w, vals, ids


def eager_loss(h, w, vals, ids):
    """What a user writes without kdkernels: the full logits, then the loss on them, both plain PyTorch."""
    return topk_kl_div_ref(h @ w.t(), vals, ids, **KW)


def loss_fn(impl, device, h, w):
    # validate=True costs a host synchronisation on CUDA; a training loop that trusts its cache turns it off
    validate = device.type != "cuda"
    if impl == "kdkernels":
        return lambda h, w, v, i: kdkernels.linear_topk_kl_div(h, w, v, i, validate=validate, **KW)
    if impl == "unfused":  # the (N, V) logits and their gradient live at once: what the fused path avoids
        return lambda h, w, v, i: kdkernels.topk_kl_div(h @ w.t(), v, i, validate=validate, **KW)
    if impl == "eager":
        return eager_loss
    if impl == "eager+compile":
        return torch.compile(eager_loss)
    # Liger (Triton: GPU only) has no sparse teacher: its fused linear JSD takes the teacher's hidden states and
    # head, so its step also runs the teacher's logits GEMM. A teacher of the student's shape, made once.
    if device.type != "cuda":
        pytest.skip("Liger-Kernel's LigerFusedLinearJSD is Triton: CUDA only")
    liger = pytest.importorskip("liger_kernel.transformers")
    jsd = liger.LigerFusedLinearJSD(jsd_beta=0.5)
    th, tw = h.detach().clone(), w.detach().clone()
    return lambda h, w, v, i: jsd(h, w, th, tw)


def bars(device):
    """Issue 7's bars on the kdkernels row (the time bar on GPU only)."""
    out = [dict(vs="unfused", max_peak_fraction_of=MEMORY_BAR)]
    if device.type == "cuda":
        out.append(dict(vs="unfused", min_speedup=1 / TIME_BAR))
    return out


@pytest.mark.shapes(full=FULL, quick=QUICK)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_topk_kl(kdk_bench, device, shape, impl):
    N, H, V, K = (shape[k] for k in ("N", "H", "V", "K"))
    h, w, vals, ids = make_inputs(N, H, V, K, shape["dtype"], device)
    fn = loss_fn(impl, device, h, w)

    def step():  # fresh gradients each call, as in training
        h.grad = w.grad = None
        loss = fn(h, w, vals, ids)
        loss.backward()
        return loss

    def free_grads():
        h.grad = w.grad = None

    # The logits GEMM and the two gradient GEMMs (6 N H V FLOPs) bound every path from below (GPU only).
    floor = common.floor_ms(device, flops=6 * N * H * V)
    kdk_bench.run(step, op="linear_topk_kl", case=KW["mode"], impl=impl, device=device, shape=shape,
                  floor_ms=floor, bars=bars(device) if impl == "kdkernels" else (), mem_setup=free_grads, grads=(h, w),
                  **(dict(note="dense teacher JSD (beta 0.5): also runs the teacher's head GEMM")
                     if impl == "liger" else {}))
