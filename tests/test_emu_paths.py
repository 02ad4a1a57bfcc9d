"""Launcher paths a real GPU rarely takes, forced on the emulator: an emulated device with little shared
memory sends the launchers to their global-memory fallbacks, and every result must still match the
float64 reference (and the launch counts show the fallback kernels ran)."""
import pytest
import torch

import kdkernels
from kdkernels import _ops
from kdkernels.reference import sinkhorn_ref, topk_kl_div_ref
from utils import GRAD_TOL, make_student, make_teacher, ref_loss_and_grad

pytestmark = pytest.mark.emu
F64 = torch.float64


@pytest.fixture
def small_device():
    """The emulated sm_80 with `max_smem_optin` bytes of shared memory per block (restored afterwards)."""
    try:
        emu = _ops.load_emu()
    except ImportError as e:
        pytest.skip(str(e))

    def set_limit(nbytes):
        emu.set_device(arch=80, max_smem_optin=nbytes)
        emu.reset_launch_counts()
        return emu

    with _ops.emulated():
        yield set_limit
    emu.set_device(arch=80)


def launched(emu, fragment):
    return sum(n for k, n in emu.launch_counts().items() if fragment in k)


@pytest.mark.parametrize("n,m", [(40, 40), (70, 33)])
def test_sinkhorn_global_memory_path(small_device, n, m):
    emu = small_device(8 * 1024)  # 40 x 40 float64 potentials and costs do not fit: the CTA-on-global path
    cost = (torch.rand(3, n, m, dtype=F64) * 3).requires_grad_(True)
    up = torch.rand(3, dtype=F64)
    val = kdkernels.sinkhorn(cost, eps=0.2, n_iters=12)
    (g,) = torch.autograd.grad((val * up).sum(), cost)
    assert launched(emu, "sinkhorn_fwd_kernel<double, double, false, false>") == 1
    assert launched(emu, "sinkhorn_bwd_kernel<double, double, false, false>") == 1
    c = cost.detach().requires_grad_(True)
    ref = sinkhorn_ref(c, eps=0.2, n_iters=12)
    (rg,) = torch.autograd.grad((ref * up).sum(), c)
    torch.testing.assert_close(val, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, rg, rtol=1e-8, atol=1e-12)


def test_topk_workspace_epilogue():
    # K large enough that the epilogue's 2K values leave shared memory for a global workspace.
    with _ops.emulated():
        N, V, K = 2, 6300, 6200
        z = make_student(N, V, torch.float32)
        t, ids = make_teacher(N, V, K, "logprobs", "support", dtype=torch.float32)
        up = torch.rand(N, dtype=F64)
        loss = kdkernels.topk_kl_div(z, t, ids, mode="support", values_are="logprobs", reduction="none")
        (g,) = torch.autograd.grad((loss * up.float()).sum(), z)
    ref, rg = ref_loss_and_grad(topk_kl_div_ref, z, t, ids, up, mode="support", values_are="logprobs",
                                reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), rg, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("limit", [None, 60 * 1024], ids=["smem_rows", "global_rows"])
def test_token_relation_gradient_rows(small_device, dtype, limit):
    """The backward sums a block's gradient rows in shared memory, or, when they do not fit beside the fixed
    carve-up (~58 KB), in the global buffer: both match the float64 reference (relation with the teacher's
    gradient: two accumulators; contrastive: one per side)."""
    from kdkernels.reference import token_contrastive_loss_ref, token_relation_loss_ref
    emu = small_device(limit or 0)
    if limit is None:
        emu.set_device(arch=80)
    g = torch.Generator().manual_seed(3)
    B, T, Ds, Dt = 2, 70, 48, 40  # 70 tokens: two row blocks; 48 / 40 features: vector and odd chunks
    s = torch.randn(B, T, Ds, generator=g, dtype=F64)
    t = torch.randn(B, T, Dt, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.2
    sx, tx = s.to(dtype).requires_grad_(True), t.to(dtype).requires_grad_(True)
    with _ops.emulated():
        rel = kdkernels.token_relation_loss(sx, tx, num_heads=2, mask=mask, teacher_grad=True)
        con = kdkernels.token_contrastive_loss(sx, tx[..., :Ds // 2].repeat(1, 1, 2), mask=mask, teacher_grad=True)
        grads = torch.autograd.grad(rel + con, (sx, tx))
    assert launched(emu, "relation_bwd_kernel") == 1 and launched(emu, "contrastive_bwd_kernel") == 2
    sr, tr = (x.detach().to(dtype).double().requires_grad_(True) for x in (s, t))
    ref = token_relation_loss_ref(sr, tr, num_heads=2, mask=mask, teacher_grad=True) + \
        token_contrastive_loss_ref(sr, tr[..., :Ds // 2].repeat(1, 1, 2), mask=mask, teacher_grad=True)
    rgrads = torch.autograd.grad(ref, (sr, tr))
    torch.testing.assert_close(rel.double() + con.double(), ref, rtol=1e-4, atol=1e-5)
    tol = GRAD_TOL[dtype]  # atol relative to max |expected|
    for a, e in zip(grads, rgrads):
        torch.testing.assert_close(a.double(), e, rtol=tol["rtol"], atol=tol["atol"] * float(e.abs().max()))
