"""Tests of kdkernels.SharedAttentionGroup and its op shared_attention_group_bwd (EchoAtt's recompute-mode group
backward: the anchor's dQ, dK once for all sharing layers) against the float64 references and per-layer sums."""

import re

import pytest
import torch

import kdkernels
from kdkernels import _ops
from kdkernels.reference import attention_ref, shared_attention_ref
from test_attention import DTYPES, _dt, _randn, assert_close, assert_grads_close, make_qkv, random_mask, up


def _emu():
    from kdkernels import _emu
    return _emu


def _anchor_and_group(device, dtype, *, B=1, H=4, Hk=2, Tq=29, Tk=None, D=16, Dv=24, L=3, layout="contiguous"):
    q, k, v0 = make_qkv(B=B, H=H, Hk=Hk, Tq=Tq, Tk=Tk, D=D, dtype=dtype, device=device, layout=layout)
    Tk = Tq if Tk is None else Tk
    vs = [_randn(B, Hk, Tk, Dv).to(dtype).to(device).requires_grad_() for _ in range(L)]
    return q, k, v0, vs


def _loss(outs):
    """A different function of every layer's output, so that each dO_l differs."""
    fns = [lambda o: (o * 1.5).sum(), lambda o: (o ** 2).sum(), lambda o: o.sin().sum(), lambda o: (o * o.cos()).sum()]
    return sum(fns[i % len(fns)](o) for i, o in enumerate(outs))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_group_matches_reference(device, dtype):
    """Anchor + 3 sharing layers (GQA, causal, a mask with an empty row, Dv != D): values and every gradient."""
    q, k, v0, vs = _anchor_and_group(device, dtype)
    mask = random_mask(1, 4, 29, 29, device)
    kw = dict(causal=True, mask=mask)
    out0, lse = kdkernels.attention(q, k, v0, **kw)
    group = kdkernels.SharedAttentionGroup(q, k, lse, **kw)
    outs = [group(v) for v in vs]
    for v, o in zip(vs, outs):  # the same values as shared_attention, layer by layer
        torch.testing.assert_close(o, kdkernels.shared_attention(q, k, lse, v, mode="recompute", **kw))
    g0 = _randn(*out0.shape).to(dtype).to(device)
    grads = torch.autograd.grad((out0 * g0).sum() + _loss(outs), (q, k, v0, *vs))
    qr, kr, v0r, *vr = up(q, k, v0, *vs)
    ref_kw = dict(causal=True, mask=mask.cpu())
    r0 = attention_ref(qr, kr, v0r, **ref_kw)[0]
    rs = [shared_attention_ref(qr, kr, v, **ref_kw) for v in vr]
    for o, r in zip(outs, rs):
        assert_close(o, r, dtype)
    ref = torch.autograd.grad((r0 * g0.double().cpu()).sum() + _loss(rs), (qr, kr, v0r, *vr))
    assert_grads_close(grads, ref, dtype)


def test_group_only_some_gradients(device):
    """Only V wanted (q, k frozen), or only q: the group still gives exactly what the reference does."""
    q, k, v0, vs = _anchor_and_group(device, torch.float64, L=2)
    _, lse = kdkernels.attention(q.detach(), k.detach(), v0.detach(), causal=True)
    qr, kr, *vr = up(q, k, *vs)
    rs = [shared_attention_ref(qr, kr, v, causal=True) for v in vr]
    group = kdkernels.SharedAttentionGroup(q.detach(), k.detach(), lse, causal=True)
    dvs = torch.autograd.grad(_loss([group(v) for v in vs]), vs)
    ref = torch.autograd.grad(_loss(rs), vr, retain_graph=True)
    assert_grads_close(dvs, ref, torch.float64)
    group = kdkernels.SharedAttentionGroup(q, k.detach(), lse, causal=True)
    (dq,) = torch.autograd.grad(_loss([group(v.detach()) for v in vs]), (q,))
    (rq,) = torch.autograd.grad(_loss(rs), (qr,))
    assert_grads_close((dq,), (rq,), torch.float64)


def test_group_backward_twice_with_retain_graph(device):
    q, k, v0, vs = _anchor_and_group(device, torch.float64, L=2, Tq=9, D=4, Dv=4)
    _, lse = kdkernels.attention(q, k, v0)
    group = kdkernels.SharedAttentionGroup(q, k, lse)
    loss = _loss([group(v) for v in vs])
    first = torch.autograd.grad(loss, (q, k), retain_graph=True)
    second = torch.autograd.grad(loss, (q, k))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_group_op_is_the_sum_of_layer_backwards(device):
    """shared_attention_group_bwd == the sum over layers of shared_attention_bwd's (dq, dk), in float64."""
    q, k, _ = make_qkv(B=2, H=4, Hk=1, Tq=13, Tk=17, D=8, dtype=torch.float64, device=device, grad=False)
    mask = random_mask(2, 4, 13, 17, device)
    _, lse = kdkernels.attention(q, k, torch.zeros(2, 1, 17, 8, dtype=torch.float64, device=device), mask=mask)
    v = _randn(3, 2, 1, 17, 5).to(device)
    out = torch.stack([_ops.lib.shared_attention_fwd(q, k, lse, v[l], mask, False, 0.4) for l in range(3)])
    go = _randn(*out.shape).to(device)
    dq, dk = _ops.lib.shared_attention_group_bwd(go, q, k, lse, v, out, mask, False, 0.4)
    per = [_ops.lib.shared_attention_bwd(go[l], q, k, lse, v[l], out[l], mask, False, 0.4, True) for l in range(3)]
    torch.testing.assert_close(dq, sum(p[0] for p in per), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, sum(p[1] for p in per), rtol=1e-10, atol=1e-12)


def test_group_refusals(device):
    q, k, v = make_qkv(B=1, H=2, Hk=2, Tq=5, D=4, dtype=torch.float32, device=device, grad=False)
    _, lse = kdkernels.attention(q, k, v)
    out = _ops.lib.shared_attention_fwd(q, k, lse, v, None, False, 0.5)
    op = _ops.lib.shared_attention_group_bwd
    pre = "kdkernels.shared_attention_group_bwd: "
    with pytest.raises(ValueError, match=re.escape(pre + "v must be the sharing layers' values stacked "
                                                   "(L, B, Hk, Tk, Dv) with L >= 1: got shape (1, 2, 5, 4)")):
        op(out[None], q, k, lse, v, out[None], None, False, 0.5)
    with pytest.raises(ValueError, match=re.escape(pre + "grad_out must have shape (L, B, H, Tq, Dv) = "
                                                   "(2, 1, 2, 5, 4): got (1, 1, 2, 5, 4)")):
        op(out[None], q, k, lse, torch.stack([v, v]), torch.stack([out, out]), None, False, 0.5)
    with pytest.raises(ValueError, match=re.escape(pre + "out must have the dtype of q_anchor")):
        op(out[None], q, k, lse, v[None], out[None].double(), None, False, 0.5)
    group = kdkernels.SharedAttentionGroup(q, k, lse)
    with pytest.raises(ValueError, match=re.escape("kdkernels.shared_attention: v must have the (batch, heads, seq)")):
        group(v[:, :, :3])


def test_group_opcheck(device):
    q, k, v = make_qkv(B=1, H=2, Hk=1, Tq=5, Tk=6, D=4, Dv=3, dtype=torch.float32, device=device, grad=False)
    mask = random_mask(1, 2, 5, 6, device, empty_rows=((0, 1, 2),))
    _, lse = torch.ops.kdkernels.attention_fwd(q, k, v, mask, True, 0.5)
    vs = torch.stack([v, v * 0.5 + 0.1])
    out = torch.stack([torch.ops.kdkernels.shared_attention_fwd(q, k, lse, x, mask, True, 0.5) for x in vs])
    torch.library.opcheck(torch.ops.kdkernels.shared_attention_group_bwd.default,
                          (torch.randn_like(out), q, k, lse, vs, out, mask, True, 0.5))


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_group_under_compile(device, backend):
    """torch.compile of a step using a group (the group object breaks the graph around its calls)."""
    torch._dynamo.reset()
    q, k, v0, vs = _anchor_and_group(device, torch.float32, L=2, Tq=9, D=8, Dv=8)

    def step(a, b, c, d, e):
        out, lse = kdkernels.attention(a, b, c, causal=True)
        group = kdkernels.SharedAttentionGroup(a, b, lse, causal=True)
        return out.sum() + _loss([group(d), group(e)])

    eager = step(q, k, v0, *vs)
    g_eager = torch.autograd.grad(eager, (q, k, v0, *vs))
    got = torch.compile(step, backend=backend)(q, k, v0, *vs)
    g_got = torch.autograd.grad(got, (q, k, v0, *vs))
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# The tensor-core group backward (csrc/kernels/attention_mma.cuh, p.layers)
# ---------------------------------------------------------------------------------------------


def _bwd_launches():
    return {n: c for n, c in _emu().launch_counts().items() if "attention_bwd" in n}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("chunk", [None, 2], ids=["all_layers", "chunks_of_2"])
def test_tensor_core_group(device, dtype, D, deterministic, chunk):
    """3 sharing layers on tensor cores: the dV of each layer alone, then dQ, dK in one group backward (or, when
    shared memory holds only 2 layers' tiles, two launches summing into the same buffers)."""
    emulated = getattr(device, "emulated", False)
    if device == "cpu" and not emulated:
        pytest.skip("the tensor-core group backward is a CUDA code path")
    if chunk is not None and not emulated:
        pytest.skip("the shared-memory limit is set on the emulated device")
    Tq, Tk = (70, 75) if emulated else (333, 517)
    q, k, v0, vs = _anchor_and_group(device, dtype, B=1, H=4, Hk=2, Tq=Tq, Tk=Tk, D=D, Dv=D, L=3)
    mask = random_mask(1, 4, Tq, Tk, device, empty_rows=((0, 1, 3),))
    kw = dict(causal=True, mask=mask)
    with torch.no_grad():
        _, lse = kdkernels.attention(q, k, v0, **kw)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic)
        if emulated:
            _emu().reset_launch_counts()
            if chunk is not None:
                _emu().set_device(arch=80, max_smem_optin=_group_smem(D, chunk, deterministic))
        group = kdkernels.SharedAttentionGroup(q, k, lse, **kw)
        outs = [group(v) for v in vs]
        grads = torch.autograd.grad(_loss(outs), (q, k, *vs))
        if emulated:
            launches = _bwd_launches()
    finally:
        torch.use_deterministic_algorithms(was)
        if emulated:
            _emu().set_device(arch=80)
    qr, kr, *vr = up(q, k, *vs)
    ref = torch.autograd.grad(_loss([shared_attention_ref(qr, kr, v, causal=True, mask=mask.cpu()) for v in vr]),
                              (qr, kr, *vr))
    assert_grads_close(grads, ref, dtype)
    if emulated:
        key = sum(c for n, c in launches.items() if "attention_bwd_mma_kernel" in n)
        dq = sum(c for n, c in launches.items() if "attention_bwd_dq_mma_kernel" in n)
        groups = 1 if chunk is None else 2  # 3 layers: one launch, or chunks of 2 + 1
        assert key == 3 + groups, launches  # one dV-only launch per layer, then the group's
        assert dq == (groups if deterministic else 0), launches
        assert not any("attention_bwd_kernel" in n for n in launches), launches  # no SIMT fallback


def _group_smem(D, layers, deterministic):
    """The opt-in shared memory that fits exactly `layers` value (and dO) tiles per launch."""
    rows = 64 * (D + 8) * 2
    key = (3 + layers) * rows + 64 * 72 * 2 + 2 * 64 * 4
    dq = (3 + layers) * rows
    return max(key, dq if deterministic else 0)
