"""Accuracy of kdkernels' float32 top-k KL against eager float32, both measured against float64.

Eager float32 is what a user writes without us: the plain reference (log_softmax, gather, sum) run in
float32. `measure` returns both errors for one case; tests/test_accuracy.py asserts the ratio and
`python tests/accuracy.py` prints the whole grid.
"""

from __future__ import annotations

import math

import torch

import kdkernels
from kdkernels.reference import topk_kl_div_ref

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
COMBOS = [("renorm", "forward_kl")] + [(m, d) for m in ("tail", "support", "dense") for d in DIVERGENCES]
TEMPERATURES = [0.5, 1.0, 2.0]
# (rows, V, K): TRL's GKD test shape (4 x 64 x 8192), a Llama vocabulary, an awkward one.
SHAPES = [(256, 8192, 8), (48, 32000, 64), (37, 4099, 5)]
EMU_SHAPES = [(6, 8192, 8), (5, 4099, 5)]
F32_EPS = 2.0 ** -23


def inputs(N, V, K, mode, T, seed=0):
    """float64 student logits and teacher values/ids as a cache would hold them (scale ~ LLM logits)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 3.0
    t = z + torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5  # a teacher the student half-knows
    values_are = "logprobs" if mode == "tail" else "logits"
    if mode == "dense":
        return z, t, None, values_are
    vals, ids = t.topk(K, dim=-1)
    if values_are == "logprobs":
        vals = vals / T - torch.logsumexp(t / T, -1, keepdim=True)
    return z, vals, ids, values_are


def _loss_grad(fn, z, vals, ids, **kw):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, vals, ids, reduction="none", **kw)
    (g,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach().double(), g.double()


def measure(N, V, K, mode, div, T, seed=0):
    """(loss error ours, loss error eager, grad error ours, grad error eager, loss scale).

    Loss error: max over rows of |loss - loss64|; gradient error: ||g - g64|| / ||g64||."""
    z, vals, ids, values_are = inputs(N, V, K, mode, T, seed)
    kw = dict(mode=mode, divergence=div, temperature=T, values_are=values_are, beta=0.5, skew=0.1)
    z32, v32 = z.float(), vals.float()  # the float64 oracle sees the same (float32) inputs
    l64, g64 = _loss_grad(topk_kl_div_ref, z32.double(), v32.double(), ids, **kw)
    le, ge = _loss_grad(topk_kl_div_ref, z32, v32, ids, **kw)
    lo, go = _loss_grad(kdkernels.topk_kl_div, z32, v32, ids, **kw)
    gn = float(g64.norm()) or 1.0
    return (float((lo - l64).abs().max()), float((le - l64).abs().max()),
            float((go - g64).norm()) / gn, float((ge - g64).norm()) / gn, float(l64.abs().max()))


def within(ours, eager, scale, ulps=4):
    """The issue's bar: within 2x eager's error, or within `ulps` float32 ulps of the value."""
    return ours <= 2 * eager or ours <= ulps * F32_EPS * max(scale, 2.0 ** -126) * 2


def main():
    import sys
    emulate = "--emu" in sys.argv
    shapes = EMU_SHAPES if emulate else SHAPES
    from kdkernels import _ops
    ctx = _ops.emulated() if emulate else __import__("contextlib").nullcontext()
    with ctx:
        for N, V, K in shapes:
            for mode, div in COMBOS:
                for T in TEMPERATURES:
                    lo, le, go, ge, s = measure(N, V, K, mode, div, T)
                    flag = "" if within(lo, le, s) and go <= 2 * ge + 4 * F32_EPS else "  <-- FAIL"
                    print(f"{N:4d}x{V:<6d} {mode:8s} {div:16s} T={T:<4} loss {lo:.2e} vs eager {le:.2e} "
                          f"(x{lo / max(le, 1e-30):6.2f})  grad {go:.2e} vs {ge:.2e} (x{go / max(ge, 1e-30):5.2f}){flag}")


if __name__ == "__main__":
    main()
