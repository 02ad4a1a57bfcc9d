"""Tests of kdkernels.attention, shared_attention, shared_attention_probs, attention_similarity and their raw ops
against the materialised float64 references (kdkernels.reference) and torch's SDPA."""

import re

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels import _ops
from kdkernels.functional import attention_similarity
from kdkernels.reference import (attention_probs_ref, attention_ref, attention_similarity_ref,
                                 shared_attention_ref)
from utils import GRAD_TOL

ERRORS = (ValueError, RuntimeError)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Outputs are stored in the inputs' dtype (one rounding); the LSE is float32 (float64) whatever the input.
OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _dt(dt):
    return str(dt).replace("torch.", "")


def _randn(*shape, scale=1.0):
    x = torch.randn(*shape, dtype=torch.float64) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


def make_qkv(B=2, H=4, Hk=2, Tq=37, Tk=None, D=16, Dv=None, dtype=torch.float32, device="cpu", layout="contiguous",
             grad=True):
    """q (B, H, Tq, D), k (B, Hk, Tk, D), v (B, Hk, Tk, Dv) drawn in float64, rounded to dtype, moved.
    layout='transposed': (B, T, H, D) storage viewed as (B, H, T, D), as a Hugging Face attention has them."""
    Tk = Tq if Tk is None else Tk
    Dv = D if Dv is None else Dv
    out = []
    for heads, T, d in ((H, Tq, D), (Hk, Tk, D), (Hk, Tk, Dv)):
        if layout == "transposed":
            t = _randn(B, T, heads, d, scale=1.5).to(dtype).to(device).transpose(1, 2)
        else:
            t = _randn(B, heads, T, d, scale=1.5).to(dtype).to(device)
        out.append(t.requires_grad_(grad))
    return out


def up(*ts):
    """float64 CPU leaf copies requiring grad (None stays None)."""
    return [None if t is None else t.detach().double().cpu().requires_grad_(True) for t in ts]


def assert_close(actual, expected, dtype, what=""):
    tol = OUT_TOL[dtype]
    expected = expected.detach().double().cpu()
    scale = float(expected[torch.isfinite(expected)].abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol * max(scale, 1e-12), msg=what or None)


def assert_grads_close(actual, expected, dtype):
    tol = GRAD_TOL[dtype] if dtype in (torch.float16, torch.bfloat16) else dict(rtol=OUT_TOL[dtype],
                                                                                atol=OUT_TOL[dtype])
    for i, (a, e) in enumerate(zip(actual, expected)):
        e = e.detach().double().cpu()
        scale = float(e.abs().max()) if e.numel() else 1.0
        torch.testing.assert_close(a.double().cpu(), e, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-12),
                                   msg=f"gradient {i}")


def random_mask(B, H, Tq, Tk, device, p=0.3, empty_rows=((0, 0, 2),)):
    m = torch.rand(B, H, Tq, Tk) > p
    for b, h, i in empty_rows:
        m[b, h, i] = False
    return m.to(device)


# ---------------------------------------------------------------------------------------------
# attention(): forward, LSE and gradients against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hk", [4, 2], ids=["mha", "gqa"])
def test_attention_matches_reference(device, dtype, causal, Hk):
    q, k, v = make_qkv(H=4, Hk=Hk, Tq=37, D=16, dtype=dtype, device=device)
    out, lse = kdkernels.attention(q, k, v, causal=causal)
    assert out.dtype == dtype and out.shape == (2, 4, 37, 16)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == (2, 4, 37)
    qr, kr, vr = up(q, k, v)
    ro, rl = attention_ref(qr, kr, vr, causal=causal)
    assert_close(out, ro, dtype)
    torch.testing.assert_close(lse.double().cpu(), rl.detach(), rtol=1e-5 if dtype != torch.float64 else 1e-10,
                               atol=1e-5 if dtype != torch.float64 else 1e-10)
    g = _randn(*out.shape)
    grads = torch.autograd.grad((out * g.to(dtype).to(device)).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ro * g.to(dtype).double()).sum(), (qr, kr, vr))
    assert [x.dtype for x in grads] == [dtype] * 3
    assert_grads_close(grads, ref_grads, dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dt)
def test_attention_matches_sdpa(device, causal, dtype):
    q, k, v = make_qkv(B=2, H=6, Hk=3, Tq=33, D=32, dtype=dtype, device=device)
    mask = random_mask(2, 1, 33, 33, device, empty_rows=()) | torch.eye(33, dtype=torch.bool, device=device)
    for m in (None, mask):
        out = kdkernels.attention(q, k, v, causal=causal, mask=m, return_lse=False)
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        if m is not None and causal:  # SDPA takes one of attn_mask / is_causal
            m_sdpa = m & torch.ones(33, 33, dtype=torch.bool, device=device).tril()
            ref = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m_sdpa)
        else:
            ref = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m, is_causal=causal)
        assert_close(out, ref.detach(), dtype)
        g = torch.randn_like(out)
        a = torch.autograd.grad((out * g).sum(), (q, k, v))
        b = torch.autograd.grad((ref * g).sum(), (q, k, v))
        assert_grads_close(a, b, dtype)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 21), (21,), (17, 21), (2, 3, 17, 21), (1, 3, 1, 21)],
                         ids=lambda s: "x".join(map(str, s)))
def test_masks_broadcast_and_empty_rows(device, mask_shape):
    q, k, v = make_qkv(B=2, H=3, Hk=3, Tq=17, Tk=21, D=8, Dv=5, dtype=torch.float64, device=device)
    mask = torch.rand(mask_shape) > 0.3
    if len(mask_shape) == 4 and mask_shape[2] > 1:
        mask[0, 0, 4] = False  # a query that sees no key
    mask = mask.to(device)
    out, lse = kdkernels.attention(q, k, v, mask=mask)
    qr, kr, vr = up(q, k, v)
    ro, rl = attention_ref(qr, kr, vr, mask=mask.cpu())
    assert_close(out, ro, torch.float64)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rl))
    empty = ~mask.expand(2, 3, 17, 21).any(-1).cpu()
    assert (out.cpu()[empty] == 0).all() and (lse.cpu()[empty] == float("-inf")).all()
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    assert all(torch.isfinite(x).all() for x in grads)
    assert (grads[0].cpu()[empty] == 0).all()
    assert_grads_close(grads, torch.autograd.grad((ro * g.cpu()).sum(), (qr, kr, vr)), torch.float64)


@pytest.mark.parametrize("Tq,Tk", [(1, 9), (5, 13), (13, 5), (3, 0), (0, 4), (1, 1)])
def test_odd_lengths_and_bottom_right_causal(device, Tq, Tk):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Tq=Tq, Tk=Tk, D=7, Dv=3, dtype=torch.float64, device=device)
    for causal in (False, True):
        out, lse = kdkernels.attention(q, k, v, causal=causal)
        qr, kr, vr = up(q, k, v)
        ro, rl = attention_ref(qr, kr, vr, causal=causal)
        assert out.shape == (1, 2, Tq, 3) and lse.shape == (1, 2, Tq)
        assert_close(out, ro, torch.float64)
        assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rl))
        if out.numel():
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            ref = torch.autograd.grad(ro.sum(), (qr, kr, vr))
            assert_grads_close(grads, ref, torch.float64)


@pytest.mark.parametrize("D,Dv", [(1, 1), (8, 8), (64, 64), (80, 48), (96, 128), (128, 128), (128, 16)])
def test_head_dims(device, D, Dv):
    q, k, v = make_qkv(B=1, H=2, Hk=2, Tq=70, D=D, Dv=Dv, dtype=torch.float32, device=device)
    out, lse = kdkernels.attention(q, k, v, causal=True)
    qr, kr, vr = up(q, k, v)
    ro, _ = attention_ref(qr, kr, vr, causal=True)
    assert_close(out, ro, torch.float32)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert_grads_close(grads, torch.autograd.grad(ro.sum(), (qr, kr, vr)), torch.float32)


def test_layouts_and_scale(device):
    q, k, v = make_qkv(B=2, H=4, Hk=2, Tq=19, D=12, layout="transposed", dtype=torch.float64, device=device)
    assert not q.is_contiguous()
    out, lse = kdkernels.attention(q, k, v, causal=True, scale=0.37)
    qr, kr, vr = up(q, k, v)
    ro, rl = attention_ref(qr, kr, vr, causal=True, scale=0.37)
    assert_close(out, ro, torch.float64)
    torch.testing.assert_close(lse.cpu(), rl.detach())
    assert_grads_close(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ro.sum(), (qr, kr, vr)),
                       torch.float64)


def test_gradcheck_attention(device):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Tq=5, Tk=6, D=3, Dv=2, dtype=torch.float64, device=device)
    mask = torch.ones(1, 2, 5, 6, dtype=torch.bool)
    mask[0, 1, 2] = False
    mask[0, 0, 3, 1] = False
    mask = mask.to(device)
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: kdkernels.attention(a, b, c, causal=causal, mask=mask)[0],
                                        (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# shared_attention(): the anchor's softmax applied to another V, both modes
# ---------------------------------------------------------------------------------------------

MODES = ["recompute", "materialize", "auto", "probs"]


def _shared(mode, q, k, lse, v, **kw):
    if mode == "probs":
        P = kdkernels.shared_attention_probs(q, k, lse, **kw)
        return kdkernels.shared_attention(q, k, lse, v, probs=P, **kw)
    return kdkernels.shared_attention(q, k, lse, v, mode=mode, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("mode", MODES)
def test_shared_attention_matches_reference(device, mode, dtype):
    q, k, _ = make_qkv(B=2, H=4, Hk=2, Tq=29, D=16, dtype=dtype, device=device)
    v = _randn(2, 2, 29, 24).to(dtype).to(device).requires_grad_()  # the sharing layer's V, another head size
    mask = random_mask(2, 4, 29, 29, device)
    kw = dict(causal=True, mask=mask)
    _, lse = kdkernels.attention(q, k, torch.zeros_like(v), **kw)
    out = _shared(mode, q, k, lse, v, **kw)
    assert out.dtype == dtype and out.shape == (2, 4, 29, 24)
    qr, kr, vr = up(q, k, v)
    ro = shared_attention_ref(qr, kr, vr, causal=True, mask=mask.cpu())
    assert_close(out, ro, dtype)
    g = _randn(*out.shape)
    grads = torch.autograd.grad((out * g.to(dtype).to(device)).sum(), (q, k, v))
    ref = torch.autograd.grad((ro * g.to(dtype).double()).sum(), (qr, kr, vr))
    assert_grads_close(grads, ref, dtype)


@pytest.mark.parametrize("mode", ["recompute", "materialize"])
def test_shared_attention_group_gradient(device, mode):
    """An anchor and two sharing layers on one softmax: every gradient reaching Q_a, K_a adds up."""
    q, k, v0 = make_qkv(B=1, H=4, Hk=2, Tq=23, D=8, dtype=torch.float64, device=device)
    v1, v2 = (_randn(1, 2, 23, 8).to(device).requires_grad_() for _ in range(2))
    out0, lse = kdkernels.attention(q, k, v0, causal=True)
    if mode == "materialize":
        P = kdkernels.shared_attention_probs(q, k, lse, causal=True)
        outs = [kdkernels.shared_attention(q, k, lse, v, causal=True, probs=P) for v in (v1, v2)]
    else:
        outs = [kdkernels.shared_attention(q, k, lse, v, causal=True, mode="recompute") for v in (v1, v2)]
    loss = (out0 * 1.5).sum() + (outs[0] ** 2).sum() + outs[1].sin().sum()
    grads = torch.autograd.grad(loss, (q, k, v0, v1, v2))
    qr, kr, v0r, v1r, v2r = up(q, k, v0, v1, v2)
    r0 = attention_ref(qr, kr, v0r, causal=True)[0]
    r1, r2 = (shared_attention_ref(qr, kr, v, causal=True) for v in (v1r, v2r))
    ref = torch.autograd.grad((r0 * 1.5).sum() + (r1 ** 2).sum() + r2.sin().sum(), (qr, kr, v0r, v1r, v2r))
    assert_grads_close(grads, ref, torch.float64)


def test_shared_attention_only_v_grad(device):
    q, k, v = make_qkv(B=1, H=2, Hk=2, Tq=11, D=4, dtype=torch.float64, device=device, grad=False)
    v.requires_grad_(True)
    _, lse = kdkernels.attention(q, k, v)
    for mode in ("recompute", "materialize"):
        out = kdkernels.shared_attention(q, k, lse, v, mode=mode)
        (dv,) = torch.autograd.grad(out.sum(), v)
        ref = torch.autograd.grad(shared_attention_ref(*up(q, k), vr := up(v)[0]).sum(), vr)[0]
        torch.testing.assert_close(dv.cpu(), ref)


def test_shared_attention_auto_mode_budget(device, monkeypatch):
    q, k, v = make_qkv(B=1, H=2, Hk=2, Tq=8, D=4, dtype=torch.float64, device=device)
    _, lse = kdkernels.attention(q, k, v)
    calls = []
    import kdkernels.functional as fn
    monkeypatch.setattr(fn.SharedAttentionProbs, "apply", lambda *a: calls.append("materialize") or
                        _ops.lib.shared_attention_probs_fwd(*a))
    monkeypatch.setattr(fn.SharedAttention, "apply", lambda *a: calls.append("recompute") or
                        _ops.lib.shared_attention_fwd(*a))
    kdkernels.shared_attention(q, k, lse, v)  # 2 * 8 * 8 doubles: far under the default budget
    kdkernels.shared_attention(q, k, lse, v, memory_budget=2 * 8 * 8 * 8 - 1)
    kdkernels.shared_attention(q, k, lse, v, memory_budget=2 * 8 * 8 * 8)
    assert calls == ["materialize", "recompute", "materialize"]


def test_gradcheck_shared_attention(device):
    q, k, v0 = make_qkv(B=1, H=2, Hk=1, Tq=4, Tk=5, D=3, dtype=torch.float64, device=device)
    v = _randn(1, 1, 5, 2).to(device).requires_grad_()
    mask = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    mask[0, 0, 1, 3] = False
    mask = mask.to(device)

    def fn(mode):
        def f(a, b, c):
            # the LSE follows the perturbed q, k (as in a real anchor); it is the anchor's statistic, no input
            with torch.no_grad():
                _, lse = kdkernels.attention(a, b, v0, causal=True, mask=mask)
            return kdkernels.shared_attention(a, b, lse, c, causal=True, mask=mask, mode=mode)
        return f

    for mode in ("recompute", "materialize"):
        assert torch.autograd.gradcheck(fn(mode), (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_shared_attention_probs_values(device):
    q, k, v = make_qkv(B=2, H=2, Hk=1, Tq=9, Tk=12, D=5, dtype=torch.float64, device=device)
    mask = random_mask(2, 2, 9, 12, device, empty_rows=((1, 1, 0),))
    _, lse = kdkernels.attention(q, k, v, mask=mask, causal=True)
    P = kdkernels.shared_attention_probs(q, k, lse, mask=mask, causal=True)
    ref, _ = attention_probs_ref(*up(q, k), mask=mask.cpu(), causal=True)
    torch.testing.assert_close(P.cpu(), ref.detach())
    assert (P.cpu()[1, 1, 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# Refusals: the public functions and the raw ops say the same
# ---------------------------------------------------------------------------------------------


def _bad_cases(device):
    q, k, v = make_qkv(B=2, H=4, Hk=2, Tq=6, Tk=7, D=8, dtype=torch.float32, device=device, grad=False)
    lse = torch.zeros(2, 4, 6, device=device)
    return q, k, v, lse


ATTN_REFUSALS = [
    ("q 3-D", lambda q, k, v, l: (q[0], k, v), "q must be 4-D (batch, heads, seq, head_dim): got shape (4, 6, 8)"),
    ("int q", lambda q, k, v, l: (q.long(), k, v), "q must be float32, float16, bfloat16 or float64: got torch.int64"),
    ("k dtype", lambda q, k, v, l: (q, k.double(), v), "k must have the dtype of q: expected torch.float32, got "
                                                        "torch.float64"),
    ("k batch", lambda q, k, v, l: (q, k[:1], v[:1]), "k must have the batch size of q: expected 2, got 1"),
    ("k head_dim", lambda q, k, v, l: (q, k[..., :4], v), "k must have the head_dim of q: expected 8, got 4"),
    ("heads", lambda q, k, v, l: (q[:, :3], k, v), "the heads of q must be a multiple of the heads of k "
                                                  "(grouped-query attention): got 3 and 2"),
    ("v seq", lambda q, k, v, l: (q, k, v[:, :, :5]), "v must have the (batch, heads, seq) of k: expected (2, 2, 7), "
                                                      "got (2, 2, 5)"),
    ("v heads", lambda q, k, v, l: (q, k, v[:, :1]), "v must have the (batch, heads, seq) of k: expected (2, 2, 7), "
                                                     "got (2, 1, 7)"),
]


@pytest.mark.parametrize("name,make,msg", ATTN_REFUSALS, ids=[c[0] for c in ATTN_REFUSALS])
def test_attention_refusals(device, name, make, msg):
    q, k, v, lse = _bad_cases(device)
    args = make(q, k, v, lse)
    with pytest.raises(ValueError, match=re.escape(f"kdkernels.attention: {msg}")):
        kdkernels.attention(*args)
    with pytest.raises(ValueError, match=re.escape(f"kdkernels.attention: {msg}")):  # the C++ check, same text
        _ops.lib.attention_fwd(*args, None, False, 1.0)


def test_attention_mask_and_scale_refusals(device):
    q, k, v, _ = _bad_cases(device)
    with pytest.raises(ValueError, match=re.escape("kdkernels.attention: mask must be a bool tensor (True = attend) "
                                                   "broadcastable to (B, H, Tq, Tk) = (2, 4, 6, 7): got shape (6, 6) "
                                                   "torch.bool")):
        kdkernels.attention(q, k, v, mask=torch.ones(6, 6, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=re.escape("got shape (6, 7) torch.float32")):
        kdkernels.attention(q, k, v, mask=torch.zeros(6, 7, device=device))
    with pytest.raises(ValueError, match=re.escape("kdkernels.attention: mask must be a bool tensor of shape "
                                                   "(B, H, Tq, Tk) = (2, 4, 6, 7) for the raw op (expand a "
                                                   "broadcastable mask first): got (6, 7) torch.bool")):
        _ops.lib.attention_fwd(q, k, v, torch.ones(6, 7, dtype=torch.bool, device=device), False, 1.0)
    with pytest.raises(ValueError, match=re.escape("kdkernels.attention: scale must be finite: got inf")):
        kdkernels.attention(q, k, v, scale=float("inf"))
    with pytest.raises(ValueError, match=re.escape("kdkernels.attention: scale must be finite: got nan")):
        _ops.lib.attention_fwd(q, k, v, None, False, float("nan"))


SHARED_REFUSALS = [
    ("lse dtype", lambda q, k, v, l: (q, k, l.bfloat16(), v),
     "lse_anchor must be torch.float32 (the log-sum-exp kdkernels.attention returns for torch.float32 inputs): got "
     "torch.bfloat16"),
    ("lse shape", lambda q, k, v, l: (q, k, l[:, :, :5], v), "lse_anchor must have shape (B, H, Tq) = (2, 4, 6): got "
                                                              "(2, 4, 5)"),
    ("T mismatch", lambda q, k, v, l: (q, k, l, v[:, :, :6]), "v must have the (batch, heads, seq) of k_anchor: "
                                                              "expected (2, 2, 7), got (2, 2, 6)"),
    ("head mismatch", lambda q, k, v, l: (q, k, l, v[:, :1]), "v must have the (batch, heads, seq) of k_anchor: "
                                                              "expected (2, 2, 7), got (2, 1, 7)"),
    ("anchor heads", lambda q, k, v, l: (q[:, :3], k, l[:, :3], v),
     "the heads of q_anchor must be a multiple of the heads of k_anchor (grouped-query attention): got 3 and 2"),
    ("v dtype", lambda q, k, v, l: (q, k, l, v.double()), "v must have the dtype of q_anchor: expected torch.float32, "
                                                          "got torch.float64"),
]


@pytest.mark.parametrize("name,make,msg", SHARED_REFUSALS, ids=[c[0] for c in SHARED_REFUSALS])
def test_shared_attention_refusals(device, name, make, msg):
    q, k, v, lse = _bad_cases(device)
    args = make(q, k, v, lse)
    for mode in ("recompute", "materialize"):
        with pytest.raises(ValueError, match=re.escape(f"kdkernels.shared_attention: {msg}")):
            kdkernels.shared_attention(*args, mode=mode)
    with pytest.raises(ValueError, match=re.escape(f"kdkernels.shared_attention: {msg}")):
        _ops.lib.shared_attention_fwd(*args, None, False, 1.0)


def test_shared_attention_option_refusals(device):
    q, k, v, lse = _bad_cases(device)
    with pytest.raises(ValueError, match=re.escape("kdkernels.shared_attention: mode must be one of 'auto', "
                                                   "'recompute', 'materialize': got 'fast'")):
        kdkernels.shared_attention(q, k, lse, v, mode="fast")
    P = torch.zeros(2, 4, 6, 7, device=device)
    with pytest.raises(ValueError, match=re.escape("kdkernels.shared_attention: probs (materialised probabilities) "
                                                   "cannot be combined with mode='recompute'")):
        kdkernels.shared_attention(q, k, lse, v, mode="recompute", probs=P)
    with pytest.raises(ValueError, match=re.escape("kdkernels.shared_attention: probs must be (B, H, Tq, Tk) = "
                                                   "(2, 4, 6, 7)")):
        kdkernels.shared_attention(q, k, lse, v, probs=P[..., :6])


@pytest.mark.needs_cuda
def test_cuda_head_dim_refused():
    q, k, v = make_qkv(B=1, H=1, Hk=1, Tq=4, D=160, dtype=torch.float32, device="cuda", grad=False)
    msg = "kdkernels.attention: the CUDA kernels take head_dim <= 128: got 160 (the CPU ops take any size)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        kdkernels.attention(q, k, v)
    with pytest.raises(ValueError, match=re.escape(msg)):
        _ops.lib.attention_fwd(q, k, v, None, False, 1.0)


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


def test_opcheck(device):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Tq=5, Tk=6, D=4, Dv=3, dtype=torch.float32, device=device, grad=False)
    mask = random_mask(1, 2, 5, 6, device, empty_rows=((0, 1, 2),))
    ops = torch.ops.kdkernels
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, mask, True, 0.5))
    out, lse = ops.attention_fwd(q, k, v, mask, True, 0.5)
    g = torch.randn_like(out)
    torch.library.opcheck(ops.attention_bwd.default, (g, q, k, v, out, lse, mask, True, 0.5))
    torch.library.opcheck(ops.shared_attention_fwd.default, (q, k, lse, v, mask, True, 0.5))
    for grad_qk in (True, False):
        torch.library.opcheck(ops.shared_attention_bwd.default, (g, q, k, lse, v, out, mask, True, 0.5, grad_qk))
    torch.library.opcheck(ops.shared_attention_probs_fwd.default, (q, k, lse, mask, True, 0.5))
    P = ops.shared_attention_probs_fwd(q, k, lse, mask, True, 0.5)
    torch.library.opcheck(ops.shared_attention_probs_bwd.default, (torch.randn_like(P), P, q, k, 0.5))
    qs, ks = torch.stack([q, q + 0.1]), torch.stack([k, k * 0.5])
    torch.library.opcheck(ops.attention_similarity.default, (qs, ks, mask, True, 0.5, "js"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()
    q, k, v = make_qkv(B=1, H=2, Hk=1, Tq=9, D=8, dtype=torch.float32, device=device)
    v2 = _randn(1, 1, 9, 8).float().to(device).requires_grad_()
    mask = random_mask(1, 1, 9, 9, device, empty_rows=())

    def step(a, b, c, d, m):
        out, lse = kdkernels.attention(a, b, c, causal=True, mask=m)
        s1 = kdkernels.shared_attention(a, b, lse, d, causal=True, mask=m, mode="recompute")
        s2 = kdkernels.shared_attention(a, b, lse, d, causal=True, mask=m, mode="materialize")
        return (out * 2).sum() + (s1 ** 2).sum() + s2.sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager = step(q, k, v, v2, mask)
    g_eager = torch.autograd.grad(eager, (q, k, v, v2))
    got = compiled(q, k, v, v2, mask)
    g_got = torch.autograd.grad(got, (q, k, v, v2))
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# attention_similarity: streamed vs materialised maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["js", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=_dt)
def test_attention_similarity_matches_materialised(device, metric, dtype):
    L, B, H, Hk, T, D = 4, 2, 4, 2, 13, 8
    base = _randn(B, H, T, D)
    qs = [(base + 0.4 * layer * _randn(B, H, T, D)).to(dtype).to(device) for layer in range(L)]  # drifting layers
    kb = _randn(B, Hk, T, D)
    ks = [(kb + 0.4 * layer * _randn(B, Hk, T, D)).to(dtype).to(device) for layer in range(L)]
    mask = random_mask(B, 1, T, T, device, empty_rows=((1, 0, 3),))
    S = attention_similarity(qs, ks, metric=metric, causal=True, mask=mask)
    assert S.shape == (L, L) and S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = attention_similarity_ref([x.double().cpu() for x in qs], [x.double().cpu() for x in ks], metric=metric,
                                   causal=True, mask=mask.cpu())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(S.double().cpu(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(S, S.T)
    assert torch.allclose(S.diagonal().double().cpu(), torch.ones(L, dtype=torch.float64), atol=1e-5)
    assert S[0, 1] > S[0, 3]  # the drift shows
    # the stacked (L, B, H, T, d) form and kdkernels.echoatt's export are the same function
    torch.testing.assert_close(kdkernels.echoatt.attention_similarity(torch.stack(qs), torch.stack(ks), metric=metric,
                                                                      causal=True, mask=mask), S)


def test_attention_similarity_gqa_scale_and_no_valid_rows(device):
    qs = [_randn(1, 4, 7, 5).to(device) for _ in range(2)]
    ks = [_randn(1, 1, 9, 5).to(device) for _ in range(2)]
    S = attention_similarity(qs, ks, scale=0.3)
    ref = attention_similarity_ref([q.cpu() for q in qs], [k.cpu() for k in ks], scale=0.3)
    torch.testing.assert_close(S.cpu(), ref)
    nan = attention_similarity(qs, ks, mask=torch.zeros(9, dtype=torch.bool, device=device))
    assert torch.isnan(nan).all()


def test_attention_similarity_refusals(device):
    q = torch.randn(1, 2, 5, 4, device=device)
    pre = "kdkernels.attention_similarity: "
    with pytest.raises(ValueError, match=re.escape(pre + "metric must be 'js' or 'cosine': got 'kl'")):
        attention_similarity([q], [q], metric="kl")
    with pytest.raises(ValueError, match=re.escape(pre + "qs and ks must hold the same number of layers: got 2 and 1")):
        attention_similarity([q, q], [q])
    with pytest.raises(ValueError, match=re.escape(pre + "qs[1] must have the shape, dtype and device of qs[0]")):
        attention_similarity([q, q[:, :, :4]], [q, q])
    with pytest.raises(ValueError, match=re.escape(pre + "qs must hold at least one layer: got an empty sequence")):
        attention_similarity([], [])
    with pytest.raises(ValueError, match=re.escape(pre + "the heads of qs must be a multiple of the heads of ks")):
        attention_similarity([q], [torch.randn(1, 3, 5, 4, device=device)])
    with pytest.raises(ValueError, match=re.escape(pre + "metric must be 'js' or 'cosine': got 'kl'")):
        _ops.lib.attention_similarity(q[None], q[None], None, False, 1.0, "kl")


# ---------------------------------------------------------------------------------------------
# The tensor-core forward (csrc/kernels/attention_mma.cuh): float16 / bfloat16, D = Dv in {64, 96, 128}
# ---------------------------------------------------------------------------------------------


def _tensor_core_case(device):
    """(emulated, Tq, Tk) of a tensor-core test: small on the emulator, awkward GPU lengths on a device;
    plain CPU tensors skip (the tensor-core kernels are a CUDA code path)."""
    emulated = getattr(device, "emulated", False)
    if device == "cpu" and not emulated:
        pytest.skip("the tensor-core kernels are a CUDA code path")
    return emulated, *((70, 75) if emulated else (333, 517))


def _mma_launches():
    from kdkernels import _emu
    return {k: v for k, v in _emu.launch_counts().items() if "attention_fwd_mma_kernel" in k}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("case", ["causal_gqa", "mask_odd", "shared", "transposed"])
def test_tensor_core_forward(device, dtype, D, case):
    # 70 query rows: two row blocks, the second partial; 75 keys: two key tiles, the second partial
    emulated, Tq, Tk = _tensor_core_case(device)
    layout = "transposed" if case == "transposed" else "contiguous"
    q, k, v = make_qkv(B=1, H=2, Hk=1 if case == "causal_gqa" else 2, Tq=Tq, Tk=Tk, D=D, dtype=dtype,
                       device=device, layout=layout, grad=False)
    kw = dict(causal=case in ("causal_gqa", "shared"))
    if case in ("mask_odd", "shared"):
        kw["mask"] = random_mask(1, 2, Tq, Tk, device, empty_rows=((0, 1, 3),))
    if emulated:
        from kdkernels import _emu
        _emu.reset_launch_counts()
    qr, kr, vr = up(q, k, v)
    if case == "shared":  # the anchor's LSE from the float64 reference, the sharing layer's own V
        _, lse = attention_ref(qr, kr, vr, **{k_: (m.cpu() if k_ == "mask" else m) for k_, m in kw.items()})
        out = kdkernels.shared_attention(q, k, lse.float().to(device), v, mode="recompute", **kw)
        ro = shared_attention_ref(qr, kr, vr, **{k_: (m.cpu() if k_ == "mask" else m) for k_, m in kw.items()})
    else:
        out, lse = kdkernels.attention(q, k, v, **kw)
        ro, rl = attention_ref(qr, kr, vr, **{k_: (m.cpu() if k_ == "mask" else m) for k_, m in kw.items()})
        finite = torch.isfinite(rl)
        torch.testing.assert_close(lse.double().cpu()[finite], rl.detach()[finite], rtol=2e-5, atol=2e-5)
        assert torch.equal(torch.isfinite(lse.cpu()), finite)  # fully masked rows: -inf, as the SIMT kernel
    assert_close(out, ro, dtype)
    if emulated:
        assert _mma_launches(), "the tensor-core kernel did not run"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("case", ["causal_gqa", "mask_odd", "shared_v_only"])
def test_tensor_core_backward(device, dtype, D, case):
    emulated, Tq, Tk = _tensor_core_case(device)
    q, k, v = make_qkv(B=1, H=2, Hk=1 if case == "causal_gqa" else 2, Tq=Tq, Tk=Tk, D=D, dtype=dtype, device=device)
    kw = dict(causal=case == "causal_gqa")
    if case != "causal_gqa":
        kw["mask"] = random_mask(1, 2, Tq, Tk, device, empty_rows=((0, 1, 3),))
    ref_kw = {k_: (m.cpu() if k_ == "mask" else m) for k_, m in kw.items()}
    if emulated:
        from kdkernels import _emu
        _emu.reset_launch_counts()
    qr, kr, vr = up(q, k, v)
    g = _randn(1, 2, Tq, D)
    if case == "shared_v_only":  # shared attention's backward with only V needing a gradient
        _, lse = attention_ref(qr, kr, vr, **ref_kw)
        qd, kd = q.detach(), k.detach()
        out = kdkernels.shared_attention(qd, kd, lse.detach().float().to(device), v, mode="recompute", **kw)
        grads = torch.autograd.grad((out * g.to(dtype).to(device)).sum(), (v,))
        ro = shared_attention_ref(qr.detach(), kr.detach(), vr, **ref_kw)
        ref = torch.autograd.grad((ro * g.to(dtype).double()).sum(), (vr,))
    else:
        out, _ = kdkernels.attention(q, k, v, **kw)
        grads = torch.autograd.grad((out * g.to(dtype).to(device)).sum(), (q, k, v))
        ro, _ = attention_ref(qr, kr, vr, **ref_kw)
        ref = torch.autograd.grad((ro * g.to(dtype).double()).sum(), (qr, kr, vr))
    assert_grads_close(grads, ref, dtype)
    if emulated:
        from kdkernels import _emu
        assert any("attention_bwd_mma_kernel" in name for name in _emu.launch_counts()), _emu.launch_counts()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("D", [64, 128])
def test_tensor_core_backward_deterministic(device, dtype, D):
    # torch.use_deterministic_algorithms(True): dQ from its own kernel, summed without atomics
    emulated, Tq, Tk = _tensor_core_case(device)
    q, k, v = make_qkv(B=1, H=4, Hk=2, Tq=Tq, Tk=Tk, D=D, dtype=dtype, device=device)
    mask = random_mask(1, 4, Tq, Tk, device, empty_rows=((0, 1, 3),))
    g = _randn(1, 4, Tq, D).to(dtype).to(device)
    was = torch.are_deterministic_algorithms_enabled()
    runs = []
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(2):
            if emulated:
                from kdkernels import _emu
                _emu.reset_launch_counts()
            out, _ = kdkernels.attention(q, k, v, causal=True, mask=mask)
            runs.append(torch.autograd.grad((out * g).sum(), (q, k, v)))
            if emulated:
                assert any("attention_bwd_dq_mma_kernel" in n for n in _emu.launch_counts())
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # bitwise, run to run
    qr, kr, vr = up(q, k, v)
    ro, _ = attention_ref(qr, kr, vr, causal=True, mask=mask.cpu())
    ref = torch.autograd.grad((ro * g.double().cpu()).sum(), (qr, kr, vr))
    assert_grads_close(runs[0], ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("D,Dv", [(64, 128), (128, 96), (40, 40), (72, 24), (120, 128)])
def test_tensor_core_padded_head_dims(device, dtype, D, Dv):
    """D != Dv and head sizes other than 64 / 96 / 128 (up to 128) run on the tensor-core kernels after
    zero-padding to the next supported size: forward, LSE and every gradient against float64."""
    emulated, Tq, Tk = _tensor_core_case(device)
    q, k, v = make_qkv(B=1, H=4, Hk=2, Tq=Tq, Tk=Tk, D=D, Dv=Dv, dtype=dtype, device=device, layout="transposed")
    mask = random_mask(1, 4, Tq, Tk, device, empty_rows=((0, 1, 3),))
    if emulated:
        from kdkernels import _emu
        _emu.reset_launch_counts()
    out, lse = kdkernels.attention(q, k, v, causal=True, mask=mask)
    g = _randn(*out.shape).to(dtype).to(device)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    qr, kr, vr = up(q, k, v)
    ro, rl = attention_ref(qr, kr, vr, causal=True, mask=mask.cpu())
    assert out.shape == (1, 4, Tq, Dv)
    assert_close(out, ro, dtype)
    finite = torch.isfinite(rl)
    torch.testing.assert_close(lse.double().cpu()[finite], rl.detach()[finite], rtol=2e-5, atol=2e-5)
    ref = torch.autograd.grad((ro * g.double().cpu()).sum(), (qr, kr, vr))
    assert_grads_close(grads, ref, dtype)
    if emulated:
        names = _emu.launch_counts()
        assert any("attention_fwd_mma_kernel" in n for n in names), names
        assert any("attention_bwd_mma_kernel" in n for n in names), names
        assert not any(re.search(r"\battention_(fwd|bwd)_kernel<", n) for n in names), names  # no SIMT


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("D", [64, 128])
def test_tensor_core_probs(device, dtype, D):
    """The materialised probabilities on tensor cores (attention_probs_mma_kernel), and the group gradient
    through them (dS in the inputs' dtype, GEMMs on tensor cores), against float64."""
    emulated, Tq, Tk = _tensor_core_case(device)
    q, k, v = make_qkv(B=1, H=4, Hk=2, Tq=Tq, Tk=Tk, D=D, dtype=dtype, device=device)
    mask = random_mask(1, 4, Tq, Tk, device, empty_rows=((0, 1, 3),))
    kw = dict(causal=True, mask=mask)
    with torch.no_grad():
        _, lse = kdkernels.attention(q, k, v, **kw)
    if emulated:
        from kdkernels import _emu
        _emu.reset_launch_counts()
    P = kdkernels.shared_attention_probs(q, k, lse, **kw)
    if emulated:
        assert any("attention_probs_mma_kernel" in n for n in _emu.launch_counts()), _emu.launch_counts()
    qr, kr, vr = up(q, k, v)
    rp = attention_probs_ref(qr, kr, causal=True, mask=mask.cpu())[0]
    assert_close(P, rp, dtype)
    outs = [kdkernels.shared_attention(q, k, lse, x, probs=P, **kw) for x in (v, v * 0.5)]
    g = [_randn(*o.shape).to(dtype).to(device) for o in outs]
    grads = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(outs, g)), (q, k, v))
    ro = [shared_attention_ref(qr, kr, x, causal=True, mask=mask.cpu()) for x in (vr, vr * 0.5)]
    ref = torch.autograd.grad(sum((o * gi.double().cpu()).sum() for o, gi in zip(ro, g)), (qr, kr, vr))
    assert_grads_close(grads, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("metric", ["js", "cosine"])
@pytest.mark.parametrize("D", [64, 128])
def test_tensor_core_similarity(device, dtype, metric, D):
    """attention_similarity on tensor cores (attention_similarity_mma_kernel): 70 rows (two row groups, the
    second partial), GQA, causal, a mask with an empty row, against the float64 reference."""
    emulated = getattr(device, "emulated", False)
    if device == "cpu" and not emulated:
        pytest.skip("the tensor-core path is a CUDA code path")
    L, T = 3, (70 if emulated else 333)
    base, kb = _randn(1, 4, T, D), _randn(1, 2, T, D)
    qs = [(base + 0.5 * layer * _randn(1, 4, T, D)).to(dtype).to(device) for layer in range(L)]
    ks = [(kb + 0.5 * layer * _randn(1, 2, T, D)).to(dtype).to(device) for layer in range(L)]
    mask = random_mask(1, 4, T, T, device, empty_rows=((0, 2, 5),))
    if emulated:
        from kdkernels import _emu
        _emu.reset_launch_counts()
    S = attention_similarity(qs, ks, metric=metric, causal=True, mask=mask)
    if emulated:
        assert any("attention_similarity_mma_kernel" in n for n in _emu.launch_counts()), _emu.launch_counts()
    ref = attention_similarity_ref([x.double().cpu() for x in qs], [x.double().cpu() for x in ks], metric=metric,
                                   causal=True, mask=mask.cpu())
    torch.testing.assert_close(S.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    assert S[0, 1] > S[0, 2]
