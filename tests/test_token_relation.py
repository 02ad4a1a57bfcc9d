"""Tests of kdkernels.token_relation_loss / token_contrastive_loss, their modules and the raw token_* ops
against the materialised float64 references (kdkernels.reference)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import kdkernels
from conftest import emu_size, emu_skip
from kdkernels import _ops
from kdkernels.reference import token_contrastive_loss_ref, token_relation_loss_ref, token_sample_ref

ERRORS = (ValueError, RuntimeError)
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW = [torch.float16, torch.bfloat16]
REL = "kdkernels.token_relation_loss: "
CON = "kdkernels.token_contrastive_loss: "


def _dt(dt):
    return str(dt).replace("torch.", "")


def feats(B, T, D, dtype=torch.float64, device="cpu", scale=1.0, requires_grad=True):
    """Features drawn in float64 on the CPU (one random stream whatever the device), rounded to dtype."""
    x = (torch.randn(B, T, D, dtype=torch.float64) * scale).to(dtype).to(device)
    return x.requires_grad_(requires_grad)


def padding_mask(B, T, device="cpu", keep=0.75):
    m = torch.rand(B, T) < keep
    m[:, 0] = True  # every instance keeps a token (an empty one has its own test)
    return m.to(device)


def run(fn, s, t, upstream=None, teacher=False, **kw):
    """loss and d(sum(upstream * loss)) / d(student[, teacher])."""
    loss = fn(s, t, **kw)
    g = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    inputs = [s, t] if teacher else [s]
    grads = torch.autograd.grad((loss * g).sum(), inputs, allow_unused=True)
    return loss.detach(), grads


def reference(fn, s, t, upstream=None, teacher=False, **kw):
    """The float64 reference on CPU copies of the same (rounded) inputs."""
    s64 = s.detach().double().cpu().requires_grad_(True)
    t64 = t.detach().double().cpu().requires_grad_(teacher)
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return run(fn, s64, t64, None if upstream is None else upstream.cpu(), teacher, **kw)


def close(actual, expected, rtol, atol_rel, what=""):
    expected = expected.double().cpu()
    scale = max(float(expected.detach().abs().max()), 1e-12) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol_rel * scale, msg=what or None)


TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5)}


def check_against_reference(op, ref, s, t, dtype, upstream=None, teacher=False, **kw):
    loss, grads = run(op, s, t, upstream, teacher, **kw)
    ref_loss, ref_grads = reference(ref, s, t, upstream, teacher, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grads[0].dtype == s.dtype and grads[0].shape == s.shape
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    rtol, atol = TOL[dtype]
    close(loss, ref_loss, rtol, atol, "loss")
    for g, rg in zip(grads, ref_grads):
        close(g, rg, rtol, atol, "gradient")
    return loss, grads


# ---------------------------------------------------------------------------------------------
# Relation losses: every loss x similarity, masks, heads, widths that differ, odd T
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dt)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_relation_matches_reference(device, loss, similarity, dtype):
    B, T, Ds, Dt, H = 3, 37, 12, 20, 2
    s, t = feats(B, T, Ds, dtype, device), feats(B, T, Dt, dtype, device)
    m = padding_mask(B, T, device)
    kw = dict(loss=loss, similarity=similarity, num_heads=H, temperature=1.5, tau=0.2, mask=m)
    up = torch.rand(B, T, dtype=torch.float64).to(device)
    out, _ = check_against_reference(kdkernels.token_relation_loss, token_relation_loss_ref, s, t, dtype, up,
                                     reduction="none", **kw)
    assert out.shape == (B, T) and (out[~m] == 0).all()
    # the default mean, used as 2 * loss
    loss_val, (g,) = run(lambda a, b, **k: 2 * kdkernels.token_relation_loss(a, b, **k), s, t, **kw)
    ref_val, (rg,) = reference(token_relation_loss_ref, s, t, **kw)
    rtol, atol = TOL[dtype]
    close(loss_val, 2 * ref_val, rtol, atol)
    close(g, 2 * rg, rtol, atol)
    assert (g[~m] == 0).all()


@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("T", [70, 300, 600])
def test_relation_multi_block(device, loss, T):
    # several 256-token blocks on the CPU (pairs of blocks spread over the workers), ragged lengths; on the
    # CUDA path T = 70 already spans 3 x 3 float64 tiles of 32 tokens
    if T > 70:
        emu_skip(device, "T = 70 covers the multi-tile paths; larger T only costs emulation time")
    B, D = 2, 8
    s, t = feats(B, T, D, device=device), feats(B, T, 2 * D, device=device)
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, T // 2 + 3:] = False
    m = m.to(device)
    up = torch.rand(B, T, dtype=torch.float64).to(device)
    check_against_reference(kdkernels.token_relation_loss, token_relation_loss_ref, s, t, torch.float64, up,
                            teacher=True, loss=loss, num_heads=2, mask=m, reduction="none", teacher_grad=True)


@pytest.mark.parametrize("num_heads,Ds,Dt", [(1, 5, 9), (4, 8, 12), (3, 9, 3)])
@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_relation_heads_and_widths(device, loss, num_heads, Ds, Dt):
    s, t = feats(2, 11, Ds, device=device), feats(2, 11, Dt, device=device)
    check_against_reference(kdkernels.token_relation_loss, token_relation_loss_ref, s, t, torch.float64,
                            loss=loss, num_heads=num_heads, temperature=0.5)


@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_relation_teacher_grad(device, loss, similarity):
    s, t = feats(2, 19, 6, device=device), feats(2, 19, 10, device=device)
    m = padding_mask(2, 19, device)
    up = torch.rand(2, 19, dtype=torch.float64).to(device)
    check_against_reference(kdkernels.token_relation_loss, token_relation_loss_ref, s, t, torch.float64, up,
                            teacher=True, loss=loss, similarity=similarity, num_heads=2, mask=m, reduction="none",
                            teacher_grad=True)
    # default: the teacher is a constant target, whatever its requires_grad
    out = kdkernels.token_relation_loss(s, t, loss=loss, similarity=similarity)
    gs, gt = torch.autograd.grad(out, [s, t], allow_unused=True)
    assert gt is None and gs is not None


def test_relation_temperature_and_reductions(device):
    s, t = feats(2, 13, 6, device=device), feats(2, 13, 4, device=device)
    m = padding_mask(2, 13, device)
    for reduction in ("mean", "sum", "none"):
        for temperature in (0.3, 4.0):
            check_against_reference(kdkernels.token_relation_loss, token_relation_loss_ref, s, t, torch.float64,
                                    mask=m, reduction=reduction, temperature=temperature)
    none = kdkernels.token_relation_loss(s, t, mask=m, reduction="none")
    mean = kdkernels.token_relation_loss(s, t, mask=m)
    torch.testing.assert_close(mean, none.sum() / m.sum())


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_relation_single_token_and_identical_graphs(device, loss):
    # T = 1: every softmax is [1], loss 0, zero gradient (to rounding: FMA contraction of x * beta - max)
    s, t = feats(3, 1, 4, device=device), feats(3, 1, 6, device=device)
    out, (g,) = run(kdkernels.token_relation_loss, s, t, loss=loss, reduction="none")
    assert out.shape == (3, 1) and float(out.detach().abs().max()) < 1e-12 and float(g.abs().max()) < 1e-12
    # the same features on both sides: loss 0 (to rounding), gradient 0
    x = feats(2, 9, 8, device=device)
    out, (g,) = run(kdkernels.token_relation_loss, x, x.detach().clone(), loss=loss)
    assert abs(float(out.detach())) < 1e-12 and float(g.abs().max()) < 1e-12


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_all_masked_instances(device, similarity):
    s, t = feats(3, 7, 4, device=device), feats(3, 7, 6, device=device)
    m = padding_mask(3, 7, device)
    m[1] = False  # an instance with no token at all
    out, (g,) = run(kdkernels.token_relation_loss, s, t, similarity=similarity, mask=m, reduction="none")
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (g[1] == 0).all()
    check_against_reference(kdkernels.token_relation_loss, token_relation_loss_ref, s, t, torch.float64,
                            similarity=similarity, mask=m)
    for fn in (kdkernels.token_relation_loss, kdkernels.token_contrastive_loss):
        t2 = t if fn is kdkernels.token_relation_loss else feats(3, 7, 4, device=device)
        for reduction in ("mean", "sum", "none"):
            out = fn(s, t2, similarity=similarity, mask=torch.zeros(3, 7, dtype=torch.bool, device=device),
                     reduction=reduction)
            (g,) = torch.autograd.grad(out.sum(), s)
            assert (out == 0).all() and (g == 0).all()


def test_cosine_zero_vector(device):
    s, t = feats(2, 9, 6, device=device), feats(2, 9, 4, device=device)
    with torch.no_grad():
        s[0, 3] = 0  # a zero vector in every head of one token
        t[1, 5, :2] = 0  # a zero vector in the teacher's first head
    for fn, ref, tt in ((kdkernels.token_relation_loss, token_relation_loss_ref, t),
                        (kdkernels.token_contrastive_loss, token_contrastive_loss_ref, feats(2, 9, 6, device=device))):
        kw = dict(similarity="cosine", num_heads=2) if fn is kdkernels.token_relation_loss else dict(similarity="cosine")
        out, (g,) = check_against_reference(fn, ref, s, tt, torch.float64, **kw)
        assert torch.isfinite(g).all()


def test_integer_mask_and_empty_batch(device):
    s, t = feats(2, 8, 4, device=device), feats(2, 8, 4, device=device)
    m = padding_mask(2, 8, device)
    a = kdkernels.token_relation_loss(s, t, mask=m.long())  # a HF attention_mask
    b = kdkernels.token_relation_loss(s, t, mask=m)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    e, te = feats(0, 8, 4, device=device), feats(0, 8, 4, device=device)
    for fn in (kdkernels.token_relation_loss, kdkernels.token_contrastive_loss):
        for graph in ("intra", "inter"):
            out = fn(e, te, graph=graph)
            assert float(out.detach()) == 0.0
            (g,) = torch.autograd.grad(out, e)
            assert g.shape == e.shape
            assert fn(e, te, graph=graph, reduction="none").shape == (0, 8)


def test_non_contiguous_inputs(device):
    big = feats(2, 11, 20, device=device, requires_grad=False)
    s = big[:, :, 3:15].detach().requires_grad_(True)  # strided rows
    t = feats(11, 2, 8, device=device, requires_grad=False).transpose(0, 1)
    check_against_reference(kdkernels.token_relation_loss, token_relation_loss_ref, s, t, torch.float64,
                            num_heads=2, mask=padding_mask(2, 11, device))


# ---------------------------------------------------------------------------------------------
# Inter-instance graphs and sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn,ref", [(kdkernels.token_relation_loss, token_relation_loss_ref),
                                    (kdkernels.token_contrastive_loss, token_contrastive_loss_ref)],
                         ids=["relation", "contrastive"])
@pytest.mark.parametrize("graph,sample", [("inter", None), ("inter", 5), ("intra", 4)])
def test_graphs_and_sampling(device, fn, ref, graph, sample):
    B, T = 3, 12
    s, t = feats(B, T, 6, device=device), feats(B, T, 6, device=device)
    m = padding_mask(B, T, device, keep=0.5)
    up = torch.rand(B, sample or T, dtype=torch.float64).to(device)

    def kw():  # a fresh generator per call: the same tokens for the op and the reference
        g = torch.Generator(device="cpu").manual_seed(7)
        return dict(graph=graph, sample=sample, generator=g if sample else None, mask=m, reduction="none")

    loss, (gs,) = run(fn, s, t, up, **kw())
    ref_loss, (rgs,) = reference(ref, s, t, up, **kw())
    assert loss.shape == (B, sample or T)
    close(loss, ref_loss, 1e-9, 1e-10)
    close(gs, rgs, 1e-9, 1e-10)
    if sample:
        # reproducible with the same seed, different with another
        again = fn(s, t, **kw())
        torch.testing.assert_close(again, loss, rtol=0, atol=0)
        other = dict(kw(), generator=torch.Generator().manual_seed(8))
        assert not torch.equal(fn(s, t, **other), loss)
        # only sampled tokens get a gradient
        assert int((gs.abs().sum(-1) > 0).sum()) <= B * sample


def test_inter_graph_is_one_graph_over_the_batch(device):
    # graph='inter' on (B, T) equals graph='intra' on the (1, B * T) flattened batch
    s, t = feats(3, 5, 4, device=device), feats(3, 5, 8, device=device)
    m = padding_mask(3, 5, device)
    a = kdkernels.token_relation_loss(s, t, graph="inter", mask=m, reduction="none")
    b = kdkernels.token_relation_loss(s.reshape(1, 15, 4), t.reshape(1, 15, 8), mask=m.reshape(1, 15),
                                      reduction="none")
    torch.testing.assert_close(a, b.reshape(3, 5), rtol=1e-12, atol=1e-14)


def test_sample_tokens():
    m = torch.zeros(4, 10, dtype=torch.bool)
    m[0, :3] = True
    m[1] = True
    m[2, ::2] = True
    g = torch.Generator().manual_seed(0)
    idx = kdkernels.sample_tokens(4, 10, 4, m, g)
    assert idx.shape == (4, 4)
    # valid tokens first: all 3 valid ones of row 0, then padding; rows with >= 4 valid: only valid ones
    assert set(idx[0, :3].tolist()) == {0, 1, 2} and not m[0, idx[0, 3]]
    assert m[1, idx[1]].all() and m[2, idx[2]].all() and len(set(idx[2].tolist())) == 4
    assert torch.equal(idx, token_sample_ref(4, 10, 4, m, torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------
# Contrastive loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dt)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_contrastive_matches_reference(device, similarity, dtype):
    B, T, D = 3, 41, 10
    s, t = feats(B, T, D, dtype, device, scale=0.5), feats(B, T, D, dtype, device, scale=0.5)
    m = padding_mask(B, T, device)
    up = torch.rand(B, T, dtype=torch.float64).to(device)
    out, (g, gt) = check_against_reference(kdkernels.token_contrastive_loss, token_contrastive_loss_ref, s, t, dtype,
                                           up, teacher=True, similarity=similarity, tau=0.3, mask=m,
                                           reduction="none", teacher_grad=True)
    assert (out[~m] == 0).all() and (g[~m] == 0).all() and (gt[~m] == 0).all()
    check_against_reference(kdkernels.token_contrastive_loss, token_contrastive_loss_ref, s, t, dtype,
                            similarity=similarity, tau=0.3, mask=m)


def test_contrastive_multi_block(device):
    T = emu_size(device, 700, 100)  # 100: 4 x 4 float64 tiles
    s, t = feats(1, T, 6, device=device), feats(1, T, 6, device=device)
    check_against_reference(kdkernels.token_contrastive_loss, token_contrastive_loss_ref, s, t, torch.float64,
                            teacher=True, tau=0.5, teacher_grad=True, mask=padding_mask(1, T, device))


# ---------------------------------------------------------------------------------------------
# Low precision: no worse than the materialised computation in that precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW, ids=_dt)
@pytest.mark.parametrize("case", ["kl-dot", "mse-cosine", "contrastive-cosine"])
def test_low_precision(device, case, dtype):
    B, T = 2, 150
    loss_kind, similarity = case.split("-")
    s = feats(B, T, 32, dtype, device)
    if loss_kind == "contrastive":
        fn, ref, t, kw = (kdkernels.token_contrastive_loss, token_contrastive_loss_ref, feats(B, T, 32, dtype, device),
                          dict(similarity=similarity, tau=0.2))
    else:
        fn, ref, t, kw = (kdkernels.token_relation_loss, token_relation_loss_ref, feats(B, T, 48, dtype, device),
                          dict(loss=loss_kind, similarity=similarity, num_heads=2, tau=0.2))
    m = padding_mask(B, T, device)
    up = torch.rand(B, T, dtype=torch.float64)
    loss, (g,) = run(fn, s, t, up.to(device), mask=m, reduction="none", **kw)
    ref64, (g64,) = reference(ref, s, t, up, mask=m, reduction="none", **kw)
    sl = s.detach().cpu().requires_grad_(True)  # the reference itself run on the CPU in the low precision
    ref_lp, (g_lp,) = run(ref, sl, t.detach().cpu(), up, mask=m.cpu(), reduction="none", **kw)

    def err(a, b):
        return float((a.double().cpu() - b).abs().max())

    assert err(loss, ref64) <= 2 * err(ref_lp, ref64) + 1e-5 * float(ref64.abs().max())
    assert err(g, g64) <= 2 * err(g_lp, g64) + 1e-4 * float(g64.abs().max())


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, modules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss,similarity", [("kl", "dot"), ("kl", "cosine"), ("mse", "dot"), ("mse", "cosine")])
def test_gradcheck_relation(device, loss, similarity):
    s, t = feats(2, 5, 4, device=device), feats(2, 5, 6, device=device)
    m = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool, device=device)

    def fn(a, b):
        return kdkernels.token_relation_loss(a, b, loss=loss, similarity=similarity, num_heads=2, temperature=0.8,
                                             tau=0.5, mask=m, reduction="none", teacher_grad=True)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_gradcheck_contrastive(device, similarity):
    s, t = feats(2, 5, 3, device=device), feats(2, 5, 3, device=device)
    m = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool, device=device)

    def fn(a, b):
        return kdkernels.token_contrastive_loss(a, b, similarity=similarity, tau=0.7, mask=m, reduction="none",
                                                teacher_grad=True)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(device, masked):
    s, t = feats(2, 6, 4, torch.float32, device, requires_grad=False), feats(2, 6, 6, torch.float32, device,
                                                                               requires_grad=False)
    m = padding_mask(2, 6, device) if masked else None
    for loss, similarity in (("kl", "dot"), ("mse", "cosine")):
        args = (s, t, m, loss, similarity, 2, 1.3, 0.2)
        torch.library.opcheck(_ops.lib.token_relation_fwd.default, args)
        out, stat = _ops.lib.token_relation_fwd(*args)
        assert out.shape == (2, 6) and stat.shape == (2, 2, 6, 4)
        for teacher_grad in (False, True):
            torch.library.opcheck(_ops.lib.token_relation_bwd.default,
                                  (torch.rand_like(out), s, t, m, stat, loss, similarity, 2, 1.3, 0.2, teacher_grad))
    u = feats(2, 6, 4, torch.float32, device, requires_grad=False)
    args = (s, u, m, "cosine", 0.3)
    torch.library.opcheck(_ops.lib.token_contrastive_fwd.default, args)
    out, lse = _ops.lib.token_contrastive_fwd(*args)
    for teacher_grad in (False, True):
        torch.library.opcheck(_ops.lib.token_contrastive_bwd.default,
                              (torch.rand_like(out), s, u, m, lse, "cosine", 0.3, teacher_grad))


def test_raw_op_statistics(device):
    # without a mask the saved log-sum-exps are those of the materialised rows
    s, t = feats(1, 9, 4, torch.float64, device, requires_grad=False), feats(1, 9, 6, torch.float64, device,
                                                                              requires_grad=False)
    _, stat = _ops.lib.token_relation_fwd(s, t, None, "kl", "dot", 2, 1.0, 0.1)
    for k, x in ((0, t), (1, s)):
        xh = x.reshape(1, 9, 2, -1).transpose(1, 2)
        lse = torch.logsumexp(xh @ xh.transpose(-1, -2) / xh.shape[-1] ** 0.5, -1)
        torch.testing.assert_close(stat[..., k], lse)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()
    s, t = feats(2, 10, 8, torch.float32, device), feats(2, 10, 12, torch.float32, device)
    u = feats(2, 10, 8, torch.float32, device, requires_grad=False)
    m = padding_mask(2, 10, device)

    def step(a, b, c, mask):
        rel = kdkernels.token_relation_loss(a, b, loss="mse", similarity="cosine", num_heads=2, mask=mask)
        con = kdkernels.token_contrastive_loss(a, c, tau=0.5, mask=mask, graph="inter")
        return 2.0 * rel + con

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager = step(s, t, u, m)
    (g_eager,) = torch.autograd.grad(eager, s)
    got = compiled(s, t, u, m)
    (g_got,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_eager, rtol=1e-6, atol=1e-8)
    torch._dynamo.reset()


def test_modules_equal_functional(device):
    s, t = feats(2, 7, 6, device=device), feats(2, 7, 4, device=device)
    m = padding_mask(2, 7, device)
    mod = kdkernels.TokenRelationLoss(loss="mse", num_heads=2, temperature=2.0)
    assert isinstance(mod, torch.nn.Module) and "num_heads=2" in repr(mod)
    torch.testing.assert_close(mod(s, t, mask=m), kdkernels.token_relation_loss(s, t, loss="mse", num_heads=2,
                                                                                temperature=2.0, mask=m),
                               rtol=0, atol=0)
    u = feats(2, 7, 6, device=device)
    con = kdkernels.TokenContrastiveLoss(tau=0.4)
    torch.testing.assert_close(con(s, u, mask=m), kdkernels.token_contrastive_loss(s, u, tau=0.4, mask=m),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Memory: far below T x T where the materialised reference needs gigabytes
# ---------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import json, resource, sys, torch
import kdkernels

def hwm_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def hwm_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

def peak_above_now(fn):
    # the peak resident size during fn above the resident size before it, in bytes (VmHWM reset), or
    # the growth of ru_maxrss where Linux does not allow the reset
    if hwm_reset():
        base = hwm_kib()
        fn()
        return (hwm_kib() - base) * 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024

T, D = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
s = torch.randn(1, T, D, requires_grad=True)
t = torch.randn(1, T, 2 * D)

def step(n=T):
    s.grad = None
    kdkernels.token_relation_loss(s[:, :n], t[:, :n], loss="kl").backward()
    u = torch.randn(1, n, D, requires_grad=True)
    kdkernels.token_contrastive_loss(u, s[:, :n].detach(), teacher_grad=False).backward()

step(600)  # allocator pools, per-thread buffers, BLAS workspaces at a small size first
control = peak_above_now(lambda: torch.ones(16 << 20).sum())  # 64 MiB: the measurement must see it
peak = peak_above_now(step)
print(json.dumps(dict(control=control, peak=peak)))
"""


def test_cpu_memory_far_below_t_squared():
    T, D = 8192, 16
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(T), str(D)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["control"] >= 60 << 20, f"the measurement misses a 64 MiB allocation: {r}"
    one_matrix = T * T * 4  # a single float32 T x T matrix: 256 MiB; the reference materialises several
    assert r["peak"] < one_matrix / 8, f"peak {r['peak'] / 2**20:.1f} MiB vs T x T {one_matrix / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Refusals: exact texts of docs/token_relation.md
# ---------------------------------------------------------------------------------------------


def _refusals(device):
    s, t = torch.randn(2, 7, 8, device=device), torch.randn(2, 7, 12, device=device)
    f, c = kdkernels.token_relation_loss, kdkernels.token_contrastive_loss
    u = torch.randn(2, 7, 8, device=device)
    cases = [
        (lambda: f(s.long(), t), REL + "student_feats must be float32, float16, bfloat16 or float64: got torch.int64"),
        (lambda: f(s, t.int()), REL + "teacher_feats must be float32, float16, bfloat16 or float64: got torch.int32"),
        (lambda: f(s[0], t), REL + "student_feats must be 3-D (B, T, Ds): got shape (7, 8)"),
        (lambda: f(s, t[None]), REL + "teacher_feats must be 3-D (B, T, Dt): got shape (1, 2, 7, 12)"),
        (lambda: f(s, t[:, :6]), REL + "teacher_feats must have the (B, T) of student_feats: expected (2, 7), got (2, 6)"),
        (lambda: f(s, t[:1]), REL + "teacher_feats must have the (B, T) of student_feats: expected (2, 7), got (1, 7)"),
        (lambda: f(s[:, :0], t[:, :0]), REL + "student_feats must have T >= 1 tokens: got shape (2, 0, 8)"),
        (lambda: f(s[..., :0], t), REL + "student_feats must have a non-empty feature dimension: got shape (2, 7, 0)"),
        (lambda: f(s, t[..., :0]), REL + "teacher_feats must have a non-empty feature dimension: got shape (2, 7, 0)"),
        (lambda: f(s, t, num_heads=3), REL + "num_heads must divide Ds = 8 (the width of student_feats): got num_heads = 3"),
        (lambda: f(s, t, num_heads=8), REL + "num_heads must divide Dt = 12 (the width of teacher_feats): got num_heads = 8"),
        (lambda: f(s, t, num_heads=0), REL + "num_heads must be >= 1: got 0"),
        (lambda: f(s, t, num_heads=2.0), REL + "num_heads must be an int: got 2.0"),
        (lambda: f(s, t, loss="ce"), REL + "loss must be 'kl' or 'mse': got 'ce'"),
        (lambda: f(s, t, similarity="l2"), REL + "similarity must be 'dot' or 'cosine': got 'l2'"),
        (lambda: f(s, t, temperature=0.0), REL + "temperature must be > 0: got 0.0"),
        (lambda: f(s, t, tau=-1.0), REL + "tau must be > 0: got -1.0"),
        (lambda: f(s, t, graph="global"), REL + "graph must be 'intra' or 'inter': got 'global'"),
        (lambda: f(s, t, sample=8), REL + "sample must be an int in [1, T = 7]: got 8"),
        (lambda: f(s, t, sample=0), REL + "sample must be an int in [1, T = 7]: got 0"),
        (lambda: f(s, t, sample=3, generator=5), REL + "generator must be a torch.Generator: got int"),
        (lambda: f(s, t, reduction="avg"), REL + "reduction must be one of 'mean', 'sum', 'none': got 'avg'"),
        (lambda: f(s, t, mask=torch.ones(2, 6, dtype=torch.bool, device=device)),
         REL + "mask must have the (B, T) of student_feats: expected (2, 7), got (2, 6)"),
        (lambda: f(s, t, mask=torch.ones(2, 7, device=device)),
         REL + "mask must be bool or integer (nonzero = keep): got torch.float32"),
        (lambda: c(s, t), CON + "teacher_feats must have the width of student_feats (project the student first): "
                              "expected D = 8, got D = 12"),
        (lambda: c(s, u, tau=0.0), CON + "tau must be > 0: got 0.0"),
        (lambda: c(s, u, similarity="dotp"), CON + "similarity must be 'dot' or 'cosine': got 'dotp'"),
        (lambda: c(s, u.long()), CON + "teacher_feats must be float32, float16, bfloat16 or float64: got torch.int64"),
        (lambda: c(s, u[:, :5]), CON + "teacher_feats must have the (B, T) of student_feats: expected (2, 7), got (2, 5)"),
        (lambda: c(s, u, mask=torch.ones(7, dtype=torch.bool, device=device)),
         CON + "mask must have the (B, T) of student_feats: expected (2, 7), got (7,)"),
        (lambda: c(s, u, sample=9), CON + "sample must be an int in [1, T = 7]: got 9"),
        # the raw ops (direct users) refuse with the same texts
        (lambda: _ops.lib.token_relation_fwd(s, t, None, "kl", "dot", 3, 1.0, 0.1),
         REL + "num_heads must divide Ds = 8 (the width of student_feats): got num_heads = 3"),
        (lambda: _ops.lib.token_relation_fwd(s, t[:, :6], None, "kl", "dot", 1, 1.0, 0.1),
         REL + "teacher_feats must have the (B, T) of student_feats: expected (2, 7), got (2, 6)"),
        (lambda: _ops.lib.token_relation_fwd(s, t, torch.ones(2, 7, device=device, dtype=torch.long), "kl",
                                                        "dot", 1, 1.0, 0.1),
         REL + "mask must be bool for the raw op: got torch.int64"),
        (lambda: _ops.lib.token_relation_fwd(s, t, None, "js", "dot", 1, 1.0, 0.1),
         REL + "loss must be 'kl' or 'mse': got 'js'"),
        (lambda: _ops.lib.token_contrastive_fwd(s, t, None, "dot", 0.1),
         CON + "teacher_feats must have the width of student_feats (project the student first): "
               "expected D = 8, got D = 12"),
    ]
    return cases


N_REFUSALS = 36


@pytest.mark.parametrize("case", range(N_REFUSALS))
def test_refusals(device, case):
    cases = _refusals(device)
    assert len(cases) == N_REFUSALS
    fn, msg = cases[case]
    with pytest.raises(ERRORS, match=re.escape(msg)):
        fn()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("what", ["teacher_feats", "mask"])
def test_refusal_wrong_device(what):
    s, t = torch.randn(2, 7, 8), torch.randn(2, 7, 12)
    kw = dict(teacher_feats=t, mask=torch.ones(2, 7, dtype=torch.bool))
    kw[what] = kw[what].cuda()
    with pytest.raises(ERRORS, match=re.escape(f"{REL}{what} must be on the device of student_feats: expected cpu, "
                                               "got cuda:0")):
        kdkernels.token_relation_loss(s, kw.pop("teacher_feats"), **kw)


# ---------------------------------------------------------------------------------------------
# CUDA: larger shapes (several tiles, ragged lengths, tensor-core dtypes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_dt)
@pytest.mark.parametrize("loss", ["kl", "mse", "contrastive"])
def test_cuda_tiles(loss, dtype):
    B, T, H = 2, 333, 4
    s = feats(B, T, 64, dtype, "cuda")
    if loss == "contrastive":
        t = feats(B, T, 64, dtype, "cuda")
        fn, ref, kw = kdkernels.token_contrastive_loss, token_contrastive_loss_ref, dict(tau=0.5)
    else:
        t = feats(B, T, 128, dtype, "cuda")
        fn, ref, kw = kdkernels.token_relation_loss, token_relation_loss_ref, dict(loss=loss, num_heads=H)
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 200:] = False
    m = m.cuda()
    up = torch.rand(B, T, dtype=torch.float64)
    loss_v, grads = run(fn, s, t, up.cuda(), teacher=True, mask=m, reduction="none", teacher_grad=True, **kw)
    ref_v, ref_grads = reference(ref, s, t, up, teacher=True, mask=m, reduction="none", teacher_grad=True, **kw)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    close(loss_v, ref_v, rtol, rtol)
    for g, rg in zip(grads, ref_grads):
        close(g, rg, rtol * 4, rtol * 4)
