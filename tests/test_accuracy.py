"""float32 top-k KL as accurate as eager float32 (both against float64), finite tails for confident teachers,
and a dense teacher kept in its own dtype: on the CPU and on the emulated CUDA path."""

import math

import pytest
import torch

import kdkernels
from accuracy import COMBOS, EMU_SHAPES, F32_EPS, SHAPES, TEMPERATURES, measure, within
from kdkernels.reference import topk_kl_div_ref


def _shape_id(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("mode,div", COMBOS, ids=[f"{m}-{d}" for m, d in COMBOS])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_float32_within_2x_of_eager_cpu(shape, mode, div, T):
    lo, le, go, ge, scale = measure(*shape, mode, div, T)
    assert within(lo, le, scale), f"loss error {lo:.3e} vs eager float32 {le:.3e} (value {scale:.3e})"
    assert go <= 2 * ge + 4 * F32_EPS, f"gradient error {go:.3e} vs eager float32 {ge:.3e}"


@pytest.mark.emu
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("mode,div", COMBOS, ids=[f"{m}-{d}" for m, d in COMBOS])
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=_shape_id)
def test_float32_within_2x_of_eager_emulated(shape, mode, div, T):
    from kdkernels import _ops
    with _ops.emulated():
        lo, le, go, ge, scale = measure(*shape, mode, div, T)
    assert within(lo, le, scale), f"loss error {lo:.3e} vs eager float32 {le:.3e} (value {scale:.3e})"
    assert go <= 2 * ge + 4 * F32_EPS, f"gradient error {go:.3e} vs eager float32 {ge:.3e}"


# ---------------------------------------------------------------------------------------------
# A confident teacher: its top-k probabilities sum to 1 in float32, so its tail is 0 before the floor.
# ---------------------------------------------------------------------------------------------

REVERSE = [("reverse_kl", {}), ("jsd", dict(beta=1.0)), ("skew_reverse_kl", dict(skew=0.0)),
           ("jsd", dict(beta=0.5)), ("forward_kl", {}), ("tvd", {})]


def _confident(N=4, V=32000, K=8, H=None):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(N, V, generator=g, dtype=torch.float64)
    t[torch.arange(N), torch.randint(0, V, (N,), generator=g)] += 30.0  # top-1 logit 30 above the rest
    vals, ids = kdkernels.teacher_topk(t.float(), K, values_are="logprobs")
    assert bool((vals.exp().sum(-1) >= 1).all()), "the test needs a teacher whose top-k mass rounds to 1"
    return vals, ids


def _finite(loss, *grads):
    assert torch.isfinite(loss).all(), loss
    for g in grads:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("div,kw", REVERSE, ids=[d + "".join(f"-{k}{v}" for k, v in kw.items()) for d, kw in REVERSE])
def test_tail_confident_teacher_is_finite(device, div, kw):
    V = 32000 if not getattr(device, "emulated", False) else 4096
    vals, ids = _confident(V=V)
    for student_scale in (1.0, 40.0):  # an unsure student, and one as sure as the teacher (tail floored too)
        z0 = torch.randn(4, V, dtype=torch.float64) * 2
        z0.scatter_(1, ids[:, :1], student_scale)
        z = z0.float().to(device).requires_grad_()
        opts = dict(mode="tail", values_are="logprobs", divergence=div, reduction="none", **kw)
        loss = kdkernels.topk_kl_div(z, vals.to(device), ids.to(device), **opts)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        _finite(loss, grad)
        z64 = z0.float().double().requires_grad_()
        ref = topk_kl_div_ref(z64, vals.double(), ids, **opts)  # the vocab-parallel path computes this function
        (gref,) = torch.autograd.grad(ref.sum(), z64)
        _finite(ref, gref)
        torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-4, atol=1e-5)
        # absolute floor: with the sure student every gradient entry is ~1e-12 (float32 noise around 0)
        torch.testing.assert_close(grad.double().cpu(), gref, rtol=1e-4, atol=max(1e-5 * float(gref.abs().max()), 1e-9))


@pytest.mark.parametrize("div,kw", REVERSE[:3], ids=["reverse_kl", "jsd-beta1", "skew_reverse_kl-skew0"])
def test_tail_confident_teacher_is_finite_fused_linear(device, div, kw):
    V, H = (32000, 16) if not getattr(device, "emulated", False) else (4096, 16)
    vals, ids = _confident(V=V)
    h = torch.randn(4, H, device=device, requires_grad=True)
    W = (torch.randn(V, H) / H ** 0.5).to(device).requires_grad_()
    loss = kdkernels.linear_topk_kl_div(h, W, vals.to(device), ids.to(device), mode="tail", values_are="logprobs",
                                        divergence=div, **kw)
    gh, gw = torch.autograd.grad(loss, (h, W))
    _finite(loss, gh, gw)


# ---------------------------------------------------------------------------------------------
# A float32 dense teacher beside bf16 / fp16 student logits is not rounded to the student's dtype.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_dense_float32_teacher_with_16bit_student(device, dtype, div):
    N, V, T = 6, 4099, 1.5
    z = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    t = (z.double() + torch.randn(N, V, dtype=torch.float64)).float()
    kw = dict(mode="dense", divergence=div, temperature=T, reduction="none")
    ref = topk_kl_div_ref(z.double(), t.double(), None, **kw)
    # Eager's mixed computation: the student upcast to float32, the teacher as it is.
    eager = topk_kl_div_ref(z.float(), t, None, **kw)
    ours = kdkernels.topk_kl_div(z.to(device), t.to(device), None, **kw).double().cpu()
    err, err_eager = float((ours - ref).abs().max()), float((eager.double() - ref).abs().max())
    assert within(err, err_eager, float(ref.abs().max())), f"{err:.3e} vs eager's mixed {err_eager:.3e}"
    # and far better than a teacher rounded to the student's dtype
    rounded = float((topk_kl_div_ref(z.float(), t.to(dtype).float(), None, **kw).double() - ref).abs().max())
    assert err < rounded / 10 or rounded < 1e-6


# ---------------------------------------------------------------------------------------------
# TVD near ties: the sub-gradient's sign must follow the exact sign of q - p as often as eager's does.
# ---------------------------------------------------------------------------------------------


def test_tvd_sign_of_near_ties(device):
    N, V = 8, 4099 if getattr(device, "emulated", False) else 32000
    z = torch.randn(N, V, dtype=torch.float64) * 3
    t = z.clone()
    t[:, ::3] += 1e-6 * torch.randn(N, (V + 2) // 3, dtype=torch.float64)  # |q - p| ~ 1e-10 .. 1e-6 q
    z32, t32 = z.float(), t.float()
    kw = dict(mode="dense", divergence="tvd", reduction="sum")

    def grad_sign(fn, a, b):
        a = a.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(a, b, None, **kw), a)
        return g.double().cpu().sign()

    exact = grad_sign(topk_kl_div_ref, z32.double(), t32.double())
    flips_eager = int((grad_sign(topk_kl_div_ref, z32, t32) != exact).sum())
    flips_ours = int((grad_sign(kdkernels.topk_kl_div, z32.to(device), t32.to(device)) != exact).sum())
    assert flips_ours <= 2 * flips_eager + 8, f"{flips_ours} sign flips vs eager's {flips_eager} (of {N * V})"
