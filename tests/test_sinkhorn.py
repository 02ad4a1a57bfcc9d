"""Tests of kdkernels.sinkhorn, sinkhorn_kd_loss, SinkhornKDLoss and the raw sinkhorn ops.

Oracles: the float64 transcription of the official SinKD code (plain domain, autograd through every
step), the eager batched log-domain reference, the plain-domain reference, POT's batch solver when
it is installed, and finite differences (gradcheck).
"""

import math
import re

import pytest
import torch

import kdkernels
from conftest import cuda_path
from kdkernels import _ops
from kdkernels.reference import (
    sinkd_official_ref,
    sinkhorn_cost_ref,
    sinkhorn_kd_loss_ref,
    sinkhorn_plain_ref,
    sinkhorn_ref,
)
from utils import _randn

ERRORS = (ValueError, RuntimeError)
F64 = torch.float64


def _dtype_id(dt):
    return str(dt).replace("torch.", "")


def _close(actual, expected, rtol, atol_frac=None, msg=""):
    """actual vs float64 expected; atol is a fraction of max |expected| (default rtol)."""
    expected = expected.detach().double().cpu()
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    atol = (rtol if atol_frac is None else atol_frac) * max(scale, 1e-12)
    torch.testing.assert_close(actual.detach().double().cpu(), expected, rtol=rtol, atol=atol, msg=msg or None)


def _logits(*shape, dtype=F64, device="cpu", scale=2.0, requires_grad=True):
    x = _randn(*shape, scale=scale).to(dtype).to(device)
    return x.requires_grad_(requires_grad)


def _costs(*shape, dtype=F64, device="cpu", high=1.0, requires_grad=True):
    c = (torch.rand(*shape, dtype=F64) * 0.9 + 0.1) * high  # never 0, never negative
    return c.to(dtype).to(device).requires_grad_(requires_grad)


def _grad(out, x, up=None):
    up = torch.ones_like(out) if up is None else up.to(out)
    (g,) = torch.autograd.grad((out * up).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _ref64(fn, *tensors, up=None):
    """fn on float64 CPU copies of tensors; returns (value, grads of sum(up * value) w.r.t. each)."""
    xs = [t.detach().double().cpu().requires_grad_(True) for t in tensors]
    out = fn(*xs)
    u = torch.ones_like(out) if up is None else up.double().cpu()
    grads = torch.autograd.grad((out * u).sum(), xs, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


# ---------------------------------------------------------------------------------------------
# SinKD as published: the official computation, in float64, to 1e-6 relative (value and gradient)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,C", [(1, 2), (5, 2), (16, 7), (32, 100), (9, 1000)])
def test_matches_official_sinkd_float64(device, N, C):
    ys, yt = _logits(N, C, device=device), _logits(N, C, device=device, requires_grad=False)
    loss = kdkernels.sinkhorn_kd_loss(ys, yt)  # defaults: T = 2, eps = 0.1, 20 iterations, L1, weight 1
    ref, (ref_grad, _) = _ref64(lambda a, b: sinkd_official_ref(a, b), ys, yt)
    assert loss.dtype == F64 and loss.shape == ()
    _close(loss, ref, 1e-6)
    _close(_grad(loss, ys), ref_grad, 1e-6)


@pytest.mark.parametrize("T,eps,n_iters,weight", [(1.0, 0.05, 1, 0.001), (4.0, 0.5, 7, 2.5), (2.0, 0.02, 50, 1.0)])
def test_matches_official_options(device, T, eps, n_iters, weight):
    N, C = 12, 10
    ys, yt = _logits(N, C, device=device), _logits(N, C, device=device, requires_grad=False)
    kw = dict(temperature=T, eps=eps, n_iters=n_iters)
    loss = kdkernels.sinkhorn_kd_loss(ys, yt, weight=weight, **kw)
    ref, (ref_grad, _) = _ref64(lambda a, b: sinkd_official_ref(a, b, weight=weight, **kw), ys, yt)
    _close(loss, ref, 1e-6)
    _close(_grad(2 * loss, ys), 2 * ref_grad, 1e-6)  # used as 2 * loss


def test_official_float32(device):
    N, C = 32, 50
    ys, yt = _logits(N, C, dtype=torch.float32, device=device), _logits(N, C, dtype=torch.float32, device=device)
    loss = kdkernels.sinkhorn_kd_loss(ys, yt)
    ref, (ref_grad, _) = _ref64(lambda a, b: sinkd_official_ref(a, b), ys, yt)
    assert loss.dtype == torch.float32
    _close(loss, ref, 1e-4)
    g = _grad(loss, ys)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    _close(g, ref_grad, 1e-4, 1e-3)


def test_reference_log_domain_equals_official():
    # The eager log-domain reference (oracle of the batched tests) is the official computation.
    ys, yt = _logits(10, 6), _logits(10, 6, requires_grad=False)
    a = sinkhorn_kd_loss_ref(ys, yt)
    b = sinkd_official_ref(ys, yt)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(_grad(a, ys), _grad(b, ys), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# The generic solver against the eager log-domain reference
# ---------------------------------------------------------------------------------------------

SOLVER_SHAPES = [(1, 1, 1), (3, 5, 5), (4, 7, 3), (2, 1, 9), (5, 33, 31), (2, 64, 64)]


@pytest.mark.parametrize("marginals", ["ones", "uniform", "given"])
@pytest.mark.parametrize("shape", SOLVER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_solver_matches_reference(device, shape, marginals):
    B, n, m = shape
    cost = _costs(B, n, m, device=device, high=3.0)
    a = b = None
    mk = "ones" if marginals == "given" else marginals
    if marginals == "given":
        a = (torch.rand(B, n, dtype=F64) + 0.1).to(device).requires_grad_(True)
        b = (torch.rand(m, dtype=F64) + 0.1).to(device).requires_grad_(True)  # one b for every problem
    kw = dict(eps=0.2, n_iters=15, marginals=mk)
    up = torch.rand(B, dtype=F64).to(device)
    val = kdkernels.sinkhorn(cost, a=a, b=b, **kw)
    assert val.shape == (B,) and val.dtype == F64
    inputs = [cost] + ([a, b] if a is not None else [])
    grads = torch.autograd.grad((val * up).sum(), inputs)

    def fn(c, *ab):
        return sinkhorn_ref(c, a=ab[0] if ab else None, b=ab[1] if ab else None, **kw)

    ref, ref_grads = _ref64(fn, *inputs, up=up)
    _close(val, ref, 1e-9)
    for g, r in zip(grads, ref_grads):
        _close(g, r, 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
def test_solver_low_precision_costs(device, dtype):
    B, n, m = 3, 20, 17
    cost = _costs(B, n, m, dtype=dtype, device=device)
    val = kdkernels.sinkhorn(cost, eps=0.1, n_iters=20)
    assert val.dtype == torch.float32
    g = _grad(val, cost)
    assert g.dtype == dtype
    # the reference on the same (rounded) costs in float64: only the accumulation differs
    ref, (ref_g,) = _ref64(lambda c: sinkhorn_ref(c, 0.1, 20), cost)
    _close(val, ref, 1e-4)
    tol = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    _close(g, ref_g, tol, tol)


def test_leading_dims_and_plan(device):
    cost = _costs(2, 3, 6, 4, device=device)
    val, plan = kdkernels.sinkhorn(cost, 0.3, 10, return_plan=True)
    assert val.shape == (2, 3) and plan.shape == (2, 3, 6, 4)
    rv, rp = sinkhorn_ref(cost.detach().double().cpu(), 0.3, 10, return_plan=True)
    _close(val, rv, 1e-9)
    _close(plan, rp, 1e-9)
    # the columns of the plan hold exactly the column marginal (the last step is a column step)
    torch.testing.assert_close(plan.detach().sum(-2).cpu(), torch.ones(2, 3, 4, dtype=F64), rtol=1e-12, atol=1e-12)
    # a non-contiguous cost (a transposed view) solves the transposed problems
    ct = cost.detach().transpose(-1, -2)
    assert not ct.is_contiguous()
    torch.testing.assert_close(kdkernels.sinkhorn(ct, 0.3, 10), kdkernels.sinkhorn(ct.contiguous(), 0.3, 10),
                               rtol=0, atol=0)
    # a 2-D cost is one problem with a scalar value
    v2 = kdkernels.sinkhorn(cost[0, 0], 0.3, 10)
    assert v2.shape == ()
    torch.testing.assert_close(v2, val[0, 0])


def test_gradient_through_plan(device):
    B, n, m = 2, 6, 5
    cost = _costs(B, n, m, device=device)
    w = torch.rand(B, n, m, dtype=F64).to(device)
    up = torch.rand(B, dtype=F64).to(device)

    def obj(val, plan):
        return (val * up).sum() + (plan * w).sum()

    val, plan = kdkernels.sinkhorn(cost, 0.25, 8, return_plan=True)
    (g,) = torch.autograd.grad(obj(val, plan), cost)
    c64 = cost.detach().double().cpu().requires_grad_(True)
    rv, rp = sinkhorn_ref(c64, 0.25, 8, return_plan=True)
    (rg,) = torch.autograd.grad((rv * up.cpu()).sum() + (rp * w.cpu()).sum(), c64)
    _close(g, rg, 1e-8)


def test_zero_weights_equal_the_subproblem(device):
    # A zero weight removes the point: the value and gradient equal those of the smaller problem.
    n, m = 7, 6
    cost = _costs(1, n, m, device=device)
    a = torch.rand(n, dtype=F64) + 0.2
    b = torch.rand(m, dtype=F64) + 0.2
    a[[1, 4]] = 0
    b[[0, 5]] = 0
    rows, cols = [0, 2, 3, 5, 6], [1, 2, 3, 4]
    val = kdkernels.sinkhorn(cost, 0.15, 12, a.to(device), b.to(device))
    g = _grad(val, cost)
    sub = cost.detach()[:, rows][:, :, cols].clone().requires_grad_(True)
    vs = kdkernels.sinkhorn(sub, 0.15, 12, a[rows].to(device), b[cols].to(device))
    gs = _grad(vs, sub)
    torch.testing.assert_close(val, vs, rtol=1e-12, atol=1e-14)
    expected = torch.zeros(1, n, m, dtype=F64, device=device)
    expected[:, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = gs
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


def test_forbidden_pairs(device):
    B, n, m = 2, 5, 6
    cost = _costs(B, n, m, device=device, requires_grad=False)
    cost[0, 1, 2] = cost[0, 3, :4] = cost[1, :, 0] = cost[1, 4, 5] = math.inf
    cost[1, :2, 0] = 0.5  # column 0 of problem 1 keeps two finite entries
    cost.requires_grad_(True)
    up = torch.rand(B, dtype=F64).to(device)
    val, plan = kdkernels.sinkhorn(cost, 0.2, 10, return_plan=True)
    g = torch.autograd.grad((val * up).sum(), cost)[0]
    ref, (rg,) = _ref64(lambda c: sinkhorn_ref(c, 0.2, 10), cost, up=up)
    assert torch.isfinite(val).all() and torch.isfinite(g).all()
    _close(val, ref, 1e-9)
    _close(g, rg, 1e-8)
    inf = torch.isinf(cost.detach())
    assert (plan.detach()[inf] == 0).all() and (g[inf] == 0).all()


def test_envelope_gradient_is_the_plan(device):
    cost = _costs(3, 8, 8, device=device)
    up = torch.rand(3, dtype=F64).to(device)
    val, plan = kdkernels.sinkhorn(cost, 0.1, 20, grad="envelope", return_plan=True)
    assert not plan.requires_grad
    g = _grad(val, cost, up)
    torch.testing.assert_close(g, up[:, None, None] * plan, rtol=1e-12, atol=1e-15)
    # the same value as the unrolled mode, a different gradient (the spec: ~20% apart)
    val_u = kdkernels.sinkhorn(cost, 0.1, 20)
    torch.testing.assert_close(val, val_u, rtol=1e-12, atol=0)
    g_u = _grad(val_u, cost, up)
    assert (g - g_u).abs().max() > 1e-3 * g_u.abs().max()
    ref, (rg,) = _ref64(lambda c: sinkhorn_ref(c, 0.1, 20, grad="envelope"), cost, up=up)
    _close(g, rg, 1e-9)


def test_tolerance_stops_each_problem(device):
    B, n, m = 6, 10, 10
    # problems of very different difficulty: large eps converges in a few iterations, small eps not
    cost = _costs(B, n, m, device=device, requires_grad=False)
    cost = (cost * torch.tensor([0.05, 0.1, 1, 3, 10, 30], dtype=F64, device=device)[:, None, None])
    cost.requires_grad_(True)
    kw = dict(eps=1.0, n_iters=200, tol=1e-6, marginals="uniform")
    val = kdkernels.sinkhorn(cost, **kw)
    up = torch.rand(B, dtype=F64).to(device)
    g = _grad(val, cost, up)
    ref, (rg,) = _ref64(lambda c: sinkhorn_ref(c, **kw), cost, up=up)
    _close(val, ref, 1e-9)
    _close(g, rg, 1e-7)
    la = torch.full((B, n), -math.log(n), dtype=F64, device=device)
    lb = torch.full((B, m), -math.log(m), dtype=F64, device=device)
    out = _ops.lib.sinkhorn_fwd(cost.detach(), la, lb, 1.0, 200, 1e-6, True, True)
    iters = out[3].cpu()
    assert iters.dtype == torch.int32 and (iters >= 1).all() and (iters <= 200).all()
    assert (iters < 200).sum() >= 4 and len(set(iters.tolist())) > 3, iters  # each problem stopped on its own
    # the plan of each stopped problem meets the tolerance on its rows; the others ran every iteration
    err = (out[4].sum(-1) - la.exp()).abs().sum(-1).cpu()
    stopped = iters < 200
    assert (err[stopped] <= 1e-6).all() and (err[~stopped] > 1e-6).all()
    # tol = 0 runs every iteration
    out0 = _ops.lib.sinkhorn_fwd(cost.detach(), la, lb, 1.0, 7, 0.0, False, True)
    assert (out0[3] == 7).all()


# ---------------------------------------------------------------------------------------------
# Log domain vs plain domain; POT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("marginals", ["ones", "uniform"])
def test_log_domain_equals_plain_domain_where_finite(device, marginals):
    cost = _costs(4, 9, 7, device=device, high=2.0)
    val, plan = kdkernels.sinkhorn(cost, 0.5, 25, marginals=marginals, return_plan=True)
    pv, pp = sinkhorn_plain_ref(cost.detach().double().cpu(), 0.5, 25, marginals=marginals)
    assert torch.isfinite(pv).all()
    _close(val, pv, 1e-10)
    _close(plan, pp, 1e-10)
    # where the plain domain breaks down (eps = 1e-3 on costs ~ 1: exp(-1000) = 0 -> 0 / 0), the
    # log domain stays finite
    pv2, _ = sinkhorn_plain_ref(cost.detach().double().cpu(), 1e-3, 5)
    assert not torch.isfinite(pv2).all()
    assert torch.isfinite(kdkernels.sinkhorn(cost, 1e-3, 5)).all()


def test_matches_pot_batch_solver():
    ot = pytest.importorskip("ot")
    if not hasattr(ot, "batch") or not hasattr(ot.batch, "solve_batch"):
        pytest.skip("this POT has no ot.batch.solve_batch")
    B, n, m, L, eps = 5, 12, 9, 30, 0.2
    cost = _costs(B, n, m)
    import inspect

    # the spec's call: solver='log_sinkhorn' (POT 0.9.6); POT 0.9.7 renamed the argument to method
    key = "method" if "method" in inspect.signature(ot.batch.solve_batch).parameters else "solver"
    res = ot.batch.solve_batch(cost, eps, max_iter=L, tol=0, grad="autodiff", **{key: "log_sinkhorn"})
    (pot_grad,) = torch.autograd.grad(res.value_linear.sum(), cost)
    val, plan = kdkernels.sinkhorn(cost, eps, L, marginals="uniform", return_plan=True)
    _close(val, res.value_linear, 1e-9)
    _close(plan, res.plan, 1e-9)
    _close(_grad(val, cost), pot_grad, 1e-8)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, finite differences)
# ---------------------------------------------------------------------------------------------


def test_gradcheck_solver(device):
    cost = _costs(2, 3, 4, device=device)
    a = (torch.rand(2, 3, dtype=F64) + 0.5).to(device).requires_grad_(True)
    b = (torch.rand(4, dtype=F64) + 0.5).to(device).requires_grad_(True)

    def fn(c, x, y):
        v, p = kdkernels.sinkhorn(c, 0.3, 6, x, y, return_plan=True)
        return v, p

    assert torch.autograd.gradcheck(fn, (cost, a, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cost_kind", ["l1", "sqeuclidean"])
def test_gradcheck_loss(device, cost_kind):
    ys = _logits(2, 4, 5, device=device)
    yt = _logits(2, 4, 5, device=device, requires_grad=False)
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]], device=device)

    def fn(x):
        return kdkernels.sinkhorn_kd_loss(x, yt, cost=cost_kind, eps=0.3, n_iters=5, mask=mask, reduction="none")

    assert torch.autograd.gradcheck(fn, (ys,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The loss: token level, masks, costs, reductions, module
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cost_kind", ["l1", "sqeuclidean"])
@pytest.mark.parametrize("marginals", ["ones", "uniform"])
def test_token_level_with_mask(device, cost_kind, marginals):
    B, L, C = 4, 9, 13
    ys = _logits(B, L, C, device=device)
    yt = _logits(B, L, C, device=device, requires_grad=False)
    mask = torch.rand(B, L) > 0.3
    mask[1] = False  # a problem emptied by the mask: 0 and no gradient
    mask[2, 4:] = False
    mask[3] = True
    mask = mask.to(device)
    kw = dict(cost=cost_kind, marginals=marginals, eps=0.2, n_iters=10, temperature=1.5)
    up = torch.rand(B, dtype=F64).to(device)
    loss = kdkernels.sinkhorn_kd_loss(ys, yt, mask=mask, reduction="none", **kw)
    g = _grad(loss, ys, up)
    ref, (rg, _) = _ref64(lambda x, t: sinkhorn_kd_loss_ref(x, t, mask=mask.cpu(), reduction="none", **kw), ys, yt,
                          up=up)
    assert loss.shape == (B,)
    _close(loss, ref, 1e-9)
    _close(g, rg, 1e-8)
    assert loss[1].item() == 0 and (g[1] == 0).all()
    assert (g[~mask] == 0).all()  # padded tokens get no gradient
    # mean over non-empty problems, sum
    mean = kdkernels.sinkhorn_kd_loss(ys, yt, mask=mask, **kw)
    torch.testing.assert_close(mean, loss.sum() / 3)
    torch.testing.assert_close(kdkernels.sinkhorn_kd_loss(ys, yt, mask=mask, reduction="sum", **kw), loss.sum())


def test_all_masked_is_exactly_zero(device):
    ys = _logits(3, 5, 4, device=device)
    yt = _logits(3, 5, 4, device=device, requires_grad=False)
    mask = torch.zeros(3, 5, dtype=torch.bool, device=device)
    for reduction in ("mean", "sum", "none"):
        loss = kdkernels.sinkhorn_kd_loss(ys, yt, mask=mask, reduction=reduction)
        assert (loss == 0).all() and not torch.isnan(loss).any()
        assert (_grad(loss, ys) == 0).all()


def test_sequence_level_one_problem_per_batch(device):
    # (N, C) is one N x N problem; (1, N, C) is the same problem as a batch of one
    ys = _logits(11, 6, device=device)
    yt = _logits(11, 6, device=device, requires_grad=False)
    a = kdkernels.sinkhorn_kd_loss(ys, yt)
    b = kdkernels.sinkhorn_kd_loss(ys[None], yt[None], reduction="none")
    assert b.shape == (1,)
    torch.testing.assert_close(a, b[0], rtol=1e-12, atol=0)


def test_cost_matches_reference(device):
    ys = _logits(3, 7, 20, device=device)
    yt = _logits(3, 5, 20, device=device, requires_grad=False)
    for kind in ("l1", "sqeuclidean"):
        w = kdkernels.autograd.SinkhornCost.apply(ys, yt, 1.7, kind, True)
        up = torch.rand(3, 7, 5, dtype=F64).to(device)
        g = _grad(w, ys, up)
        ref, (rg, _) = _ref64(lambda x, t: sinkhorn_cost_ref(x, t, 1.7, kind), ys, yt, up=up)
        _close(w, ref, 1e-12)
        _close(g, rg, 1e-10)


def test_cost_neg_inf_logits_at_row_start(device):
    # Masked classes (-inf logits; accepted with validate=False) in the first 40 of 70 classes: every lane of a
    # GPU warp meets -inf first, which once made the CUDA softmax NaN. The CPU op refuses them always.
    if not cuda_path(device):
        pytest.skip("the CPU op checks finiteness itself, whatever validate says")
    ys = _logits(2, 5, 70, device=device, requires_grad=False)
    yt = _logits(2, 4, 70, device=device, requires_grad=False)
    ys[:, :3, :40] = float("-inf")
    yt[:, 1:, :40] = float("-inf")
    ys.requires_grad_(True)
    for kind in ("l1", "sqeuclidean"):
        w = kdkernels.autograd.SinkhornCost.apply(ys, yt, 1.3, kind, False)
        up = torch.rand(2, 5, 4, dtype=F64).to(device)
        g = _grad(w, ys, up)
        ref, (rg, _) = _ref64(lambda x, t: sinkhorn_cost_ref(x, t, 1.3, kind), ys, yt, up=up)
        assert not w.isnan().any() and not g.isnan().any()
        _close(w, ref, 1e-12)
        _close(g, rg, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_dtype_id)
def test_loss_low_precision(device, dtype):
    B, L, C = 2, 16, 50
    ys = _logits(B, L, C, dtype=dtype, device=device)
    yt = _logits(B, L, C, dtype=dtype, device=device, requires_grad=False)
    loss = kdkernels.sinkhorn_kd_loss(ys, yt, reduction="none")
    g = _grad(loss, ys)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    ref, (rg, _) = _ref64(lambda x, t: sinkhorn_kd_loss_ref(x, t, reduction="none"), ys, yt)
    _close(loss, ref, 1e-4 if dtype == torch.float32 else 1e-3)
    tol = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    _close(g, rg, tol, tol)


def test_module_equals_functional(device):
    ys = _logits(2, 6, 5, device=device)
    yt = _logits(2, 6, 5, device=device, requires_grad=False)
    kw = dict(temperature=1.3, eps=0.2, n_iters=9, cost="sqeuclidean", weight=0.5)
    mod = kdkernels.SinkhornKDLoss(**kw)
    assert isinstance(mod, torch.nn.Module) and "eps=0.2" in repr(mod)
    torch.testing.assert_close(mod(ys, yt), kdkernels.sinkhorn_kd_loss(ys, yt, **kw), rtol=0, atol=0)
    torch.testing.assert_close(mod(ys, yt, reduction="sum"), kdkernels.sinkhorn_kd_loss(ys, yt, reduction="sum", **kw))


def test_teacher_gets_no_gradient(device):
    ys = _logits(5, 4, device=device)
    yt = _logits(5, 4, device=device)  # requires grad, but is a constant target
    loss = kdkernels.sinkhorn_kd_loss(ys, yt)
    gs, gt = torch.autograd.grad(loss, (ys, yt), allow_unused=True)
    assert gs is not None and gt is None


# ---------------------------------------------------------------------------------------------
# Stability: eps 1e-3 .. 10, costs up to 100, float32: never NaN or inf
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("high", [1.0, 100.0])
def test_stability_float32(device, eps, high):
    cost = _costs(3, 24, 20, dtype=torch.float32, device=device, high=high)
    for marginals in ("ones", "uniform"):
        for grad in ("unrolled", "envelope"):
            val, plan = kdkernels.sinkhorn(cost, eps, 20, marginals=marginals, grad=grad, return_plan=True)
            g = _grad(val, cost)
            assert torch.isfinite(val).all() and torch.isfinite(plan).all() and torch.isfinite(g).all(), (
                eps, high, marginals, grad)
    ys = _logits(16, 30, dtype=torch.float32, device=device, scale=high)
    yt = _logits(16, 30, dtype=torch.float32, device=device, scale=high, requires_grad=False)
    loss = kdkernels.sinkhorn_kd_loss(ys, yt, eps=eps, temperature=1.0)
    assert torch.isfinite(loss) and torch.isfinite(_grad(loss, ys)).all()


def test_stability_float32_close_to_float64(device):
    # small eps in float32 still tracks the float64 result (relative to the plan's scale)
    cost = _costs(2, 16, 16, dtype=torch.float32, device=device, high=10.0)
    val = kdkernels.sinkhorn(cost, 1e-2, 20)
    ref = sinkhorn_ref(cost.detach().double().cpu(), 1e-2, 20)
    _close(val, ref, 1e-3)


# ---------------------------------------------------------------------------------------------
# Raw ops: values, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


def test_raw_ops_shapes(device):
    cost = _costs(3, 4, 5, dtype=torch.float32, device=device, requires_grad=False)
    value, f, g, iters, plan = _ops.lib.sinkhorn_fwd(cost, None, None, 0.1, 6, 0.0, False, True)
    assert value.shape == (3,) and f.shape == (3, 6, 4) and g.shape == (3, 6, 5) and iters.shape == (3,)
    assert plan.shape == (0,) and (iters == 6).all()
    dc, dla, dlb = _ops.lib.sinkhorn_bwd(torch.ones_like(value), None, cost, None, None, f, g, iters, 0.1,
                                                    "unrolled", False)
    assert dc.shape == cost.shape and dla.shape == (0,) and dlb.shape == (0,)
    # the potentials are those of the log-domain recursion
    c = cost.double().cpu()
    gg = torch.zeros(3, 5, dtype=F64)
    for level in range(6):
        ff = -torch.logsumexp(-c / 0.1 + gg[:, None, :], 2)
        gg = -torch.logsumexp(-c / 0.1 + ff[:, :, None], 1)
        torch.testing.assert_close(f[:, level].double().cpu(), ff, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g[:, level].double().cpu(), gg, rtol=1e-5, atol=1e-4)


def _opcheck_inputs(device):
    cost = _costs(2, 3, 4, device=device, requires_grad=False)
    la = torch.log(torch.rand(2, 3, dtype=F64) + 0.5).to(device)
    lb = torch.log(torch.rand(2, 4, dtype=F64) + 0.5).to(device)
    return cost, la, lb


def test_opcheck(device):
    cost, la, lb = _opcheck_inputs(device)
    for args in ((cost, None, None, 0.2, 4, 0.0, True, True), (cost.float(), None, None, 0.2, 3, 1e-3, False, True),
                 (cost, la, lb, 0.3, 5, 0.0, True, False)):
        torch.library.opcheck(_ops.lib.sinkhorn_fwd.default, args)
    value, f, g, iters, plan = _ops.lib.sinkhorn_fwd(cost, la, lb, 0.3, 5, 0.0, True, True)
    for grad in ("unrolled", "envelope"):
        bwd = (torch.rand_like(value), torch.rand_like(plan), cost, la, lb, f, g, iters, 0.3, grad, True)
        torch.library.opcheck(_ops.lib.sinkhorn_bwd.default, bwd)
    ys = _logits(2, 3, 5, device=device, requires_grad=False)
    yt = _logits(2, 4, 5, device=device, requires_grad=False).float()
    torch.library.opcheck(_ops.lib.sinkhorn_cost_fwd.default, (ys, yt, 2.0, "l1", True))
    w = torch.rand(2, 3, 4, dtype=F64, device=device)
    torch.library.opcheck(_ops.lib.sinkhorn_cost_bwd.default, (w, ys, yt, 2.0, "sqeuclidean"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()
    B, L, C = 3, 8, 6
    ys = _logits(B, L, C, dtype=torch.float32, device=device)
    yt = _logits(B, L, C, dtype=torch.float32, device=device, requires_grad=False)
    mask = (torch.arange(L) != 3).expand(B, L).to(device)

    def step(x, t, mk):
        return 2.0 * kdkernels.sinkhorn_kd_loss(x, t, mask=mk, eps=0.2, n_iters=10) + kdkernels.sinkhorn(
            x.detach().float().abs().sum(-1, keepdim=True).expand(B, L, L).contiguous(), 0.5, 3).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager = step(ys, yt, mask)
    got = compiled(ys, yt, mask)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_grad(got, ys), _grad(eager, ys), rtol=1e-6, atol=1e-8)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# CUDA kernel paths (warp per problem, CTA in shared memory, CTA on global memory) vs the CPU op
# ---------------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("shape", [(37, 5, 7), (9, 32, 32), (5, 33, 64), (4, 64, 64), (3, 200, 150), (2, 300, 260)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_paths_match_cpu(shape, dtype):
    B, n, m = shape
    cost = _costs(B, n, m, dtype=dtype, high=2.0, requires_grad=False)
    cost[0, 1, 2] = math.inf
    a = torch.rand(B, n, dtype=F64) + 0.1
    a[1, 0] = 0
    up = torch.rand(B, dtype=F64)
    res = {}
    for dev in ("cpu", "cuda"):
        c = cost.to(dev).requires_grad_(True)
        aa = a.to(dev).requires_grad_(True)
        val, plan = kdkernels.sinkhorn(c, 0.1, 20, aa, return_plan=True)
        gc, ga = torch.autograd.grad((val * up.to(dev)).sum() + plan.sum(), (c, aa))
        res[dev] = (val, plan, gc, ga)
    tol = 1e-9 if dtype == F64 else 2e-4
    # values, plans and marginal gradients are float32 (float64); the cost gradient has the cost's dtype
    tols = (tol, tol, 1e-2 if dtype == torch.bfloat16 else tol, tol)
    for x, y, t in zip(res["cuda"], res["cpu"], tols):
        _close(x, y, t, t)
    env = [kdkernels.sinkhorn(cost.to(dev).requires_grad_(True), 0.1, 20, grad="envelope") for dev in ("cpu", "cuda")]
    _close(env[1], env[0], tol)


@pytest.mark.needs_cuda
def test_cuda_tolerance_and_loss_match_cpu():
    B, L, C = 6, 40, 30
    ys, yt = _logits(B, L, C, dtype=torch.float32), _logits(B, L, C, dtype=torch.float32, requires_grad=False)
    mask = torch.rand(B, L) > 0.2
    mask[2] = False
    out = {}
    for dev in ("cpu", "cuda"):
        x = ys.detach().to(dev).requires_grad_(True)
        loss = kdkernels.sinkhorn_kd_loss(x, yt.to(dev), mask=mask.to(dev), tol=1e-4, n_iters=100, reduction="none")
        out[dev] = (loss, _grad(loss, x))
    # (a problem near the tolerance may stop one iteration apart on the two devices)
    for x, y in zip(out["cuda"], out["cpu"]):
        _close(x, y, 2e-3, 2e-3)


# ---------------------------------------------------------------------------------------------
# Refusals: exact texts of docs/sinkhorn.md
# ---------------------------------------------------------------------------------------------

P = "kdkernels.sinkhorn: "
PL = "kdkernels.sinkhorn_kd_loss: "


def _refusals(device):
    c = torch.rand(2, 4, 3, device=device) + 0.1
    s = torch.randn(2, 4, 5, device=device)
    t = torch.randn(2, 4, 5, device=device)
    nan_c = c.clone()
    nan_c[1, 2, 0] = math.nan
    ninf_c = c.clone()
    ninf_c[0, 0, 0] = -math.inf
    row_c = c.clone()
    row_c[1, 2] = math.inf
    col_c = c.clone()
    col_c[0, :, 1] = math.inf
    bad_s = s.clone()
    bad_s[1, 2, 3] = math.inf
    bad_t = t.clone()
    bad_t[0, 3, 0] = math.nan
    req = torch.ones(3, device=device, requires_grad=True)
    f, fl = kdkernels.sinkhorn, kdkernels.sinkhorn_kd_loss
    cases = [
        (lambda: f(c.long()), P + "cost must be float32, float16, bfloat16 or float64: got torch.int64"),
        (lambda: f(c[0, 0]), P + "cost must have at least 2 dimensions (..., n, m): got shape (3,)"),
        (lambda: f(c[:0]), P + "cost must hold at least one problem with n, m >= 1: got shape (0, 4, 3)"),
        (lambda: f(c[:, :0]), P + "cost must hold at least one problem with n, m >= 1: got shape (2, 0, 3)"),
        (lambda: f(c, 0.0), P + "eps must be > 0: got 0.0"),
        (lambda: f(c, -1.0), P + "eps must be > 0: got -1.0"),
        (lambda: f(c, 0.1, 0), P + "n_iters must be >= 1: got 0"),
        (lambda: f(c, 0.1, 2.5), P + "n_iters must be an int: got 2.5"),
        (lambda: f(c, tol=-1.0), P + "tol must be >= 0: got -1.0"),
        (lambda: f(c, grad="implicit"), P + "grad must be 'unrolled' or 'envelope': got 'implicit'"),
        (lambda: f(c, marginals="probs"), P + "marginals must be 'ones' or 'uniform': got 'probs'"),
        (lambda: f(c, a=torch.ones(5, device=device)), P + "a must have shape (4,) or (2, 4): got (5,)"),
        (lambda: f(c, b=torch.ones(2, 4, device=device)), P + "b must have shape (3,) or (2, 3): got (2, 4)"),
        (lambda: f(c, a=torch.ones(4, dtype=torch.long, device=device)),
         P + "a must be a float32, float16, bfloat16 or float64 tensor: got torch.int64"),
        (lambda: f(c, a=torch.tensor([1.0, -1.0, 1.0, 1.0], device=device)),
         P + "a must be finite and >= 0: got a negative or non-finite weight"),
        (lambda: f(c, b=torch.tensor([1.0, math.inf, 1.0], device=device)),
         P + "b must be finite and >= 0: got a negative or non-finite weight"),
        (lambda: f(c, b=req, grad="envelope"),
         P + "grad='envelope' gives no gradient for the marginals: detach b or use grad='unrolled'"),
        (lambda: f(nan_c), P + "cost must not contain NaN or -inf: found one in problem 1"),
        (lambda: f(ninf_c), P + "cost must not contain NaN or -inf: found one in problem 0"),
        (lambda: f(row_c), P + "cost row 2 of problem 1 has no finite entry (every pair of that point is forbidden)"),
        (lambda: f(col_c),
         P + "cost column 1 of problem 0 has no finite entry (every pair of that point is forbidden)"),
        (lambda: _ops.lib.sinkhorn_fwd(c[0], None, None, 0.1, 3, 0.0, False, True),
         P + "cost must be 3-D (B, n, m) for the raw op: got shape (4, 3)"),
        (lambda: _ops.lib.sinkhorn_fwd(c, torch.zeros(2, 4, dtype=F64, device=device), None, 0.1, 3, 0.0,
                                                  False, True),
         P + "log_a must be torch.float32 (the accumulation dtype of cost): got torch.float64"),
        (lambda: _ops.lib.sinkhorn_fwd(c, None, torch.zeros(2, 4, device=device), 0.1, 3, 0.0, False, True),
         P + "log_b must have shape (2, 3): got (2, 4)"),
        (lambda: _ops.lib.sinkhorn_fwd(c, torch.tensor([[0.0] * 4, [0.0, math.nan, 0.0, 0.0]],
                                                                  device=device), None, 0.1, 3, 0.0, False, True),
         P + "log_a must not contain NaN or +inf: found one in problem 1"),
        # the loss
        (lambda: fl(s.long(), t), PL + "student_logits must be float32, float16, bfloat16 or float64: got torch.int64"),
        (lambda: fl(s, t.int()), PL + "teacher_logits must be float32, float16, bfloat16 or float64: got torch.int32"),
        (lambda: fl(s[0, 0], t[0, 0]),
         PL + "student_logits must have at least 2 dimensions (N, C) or (..., L, C): got shape (5,)"),
        (lambda: fl(s, torch.randn(2, 4, 6, device=device)),
         PL + "teacher_logits must have the class dimension of student_logits: expected C = 5, got C = 6"),
        (lambda: fl(s, t[:, :3]),
         PL + "teacher_logits must have the shape of student_logits: expected (2, 4, 5), got (2, 3, 5)"),
        (lambda: fl(s[:0], t[:0]), PL + "student_logits must be non-empty: got shape (0, 4, 5)"),
        (lambda: fl(bad_s, t), PL + "student_logits must be finite: found a non-finite value in problem 1, row 2"),
        (lambda: fl(s, bad_t), PL + "teacher_logits must be finite: found a non-finite value in problem 0, row 3"),
        (lambda: fl(s, t, temperature=0.0), PL + "temperature must be > 0: got 0.0"),
        (lambda: fl(s, t, eps=0.0), PL + "eps must be > 0: got 0.0"),
        (lambda: fl(s, t, n_iters=0), PL + "n_iters must be >= 1: got 0"),
        (lambda: fl(s, t, tol=-0.5), PL + "tol must be >= 0: got -0.5"),
        (lambda: fl(s, t, cost="l2"), PL + "cost must be 'l1' or 'sqeuclidean': got 'l2'"),
        (lambda: fl(s, t, grad="plan"), PL + "grad must be 'unrolled' or 'envelope': got 'plan'"),
        (lambda: fl(s, t, marginals="x"), PL + "marginals must be 'ones' or 'uniform': got 'x'"),
        (lambda: fl(s, t, reduction="avg"), PL + "reduction must be one of 'mean', 'sum', 'none': got 'avg'"),
        (lambda: fl(s, t, mask=torch.ones(2, 5, dtype=torch.bool, device=device)),
         PL + "mask must have the leading shape of student_logits: expected (2, 4), got (2, 5)"),
        (lambda: _ops.lib.sinkhorn_cost_fwd(s, torch.randn(3, 4, 5, device=device), 2.0, "l1", True),
         PL + "teacher_logits must hold as many problems as student_logits: expected B = 2, got B = 3"),
        (lambda: _ops.lib.sinkhorn_cost_fwd(s[0], t[0], 2.0, "l1", True),
         PL + "student_logits must be 3-D (B, n, C) for the raw op: got shape (4, 5)"),
    ]
    return cases


N_REFUSALS = 44


@pytest.mark.parametrize("case", range(N_REFUSALS))
def test_refusals(device, case):
    cases = _refusals(device)
    assert len(cases) == N_REFUSALS
    fn, msg = cases[case]
    with pytest.raises(ERRORS, match=re.escape(msg)):
        fn()


def test_weights_checked_under_compile():
    # no host sync inside a compiled graph: the op's own check of the log-weights reports a bad weight
    torch._dynamo.reset()
    fn = torch.compile(lambda c, w: kdkernels.sinkhorn(c, 0.1, 3, w), fullgraph=True, backend="aot_eager")
    c = torch.rand(2, 4, 3) + 0.1
    torch.testing.assert_close(fn(c, torch.ones(4)), kdkernels.sinkhorn(c, 0.1, 3, torch.ones(4)))
    with pytest.raises(ERRORS, match=re.escape(P + "log_a must not contain NaN or +inf: found one in problem 0")):
        fn(c, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    torch._dynamo.reset()


def test_refusals_raise_value_error():
    # Python-side checks and the C++ data checks (KDK_CHECK -> TORCH_CHECK_VALUE) are both ValueError
    c = torch.rand(1, 3, 3)
    c[0, 1] = math.inf
    with pytest.raises(ValueError):
        kdkernels.sinkhorn(c)
    with pytest.raises(ValueError):
        kdkernels.sinkhorn(torch.rand(1, 3, 3), eps=-1.0)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("what", ["teacher_logits", "mask"])
def test_refusal_wrong_device(what):
    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    kw = dict(teacher_logits=t, mask=torch.ones(2, 4, dtype=torch.bool))
    kw[what] = kw[what].cuda()
    with pytest.raises(ERRORS, match=re.escape(f"{PL}{what} must be on the device of student_logits: expected cpu, "
                                               "got cuda:0")):
        kdkernels.sinkhorn_kd_loss(s, kw.pop("teacher_logits"), **kw)
