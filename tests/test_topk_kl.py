"""Tests of kdkernels.topk_kl_div, TopKKLDivLoss, teacher_topk and the raw topk_kl ops vs the float64 reference."""

import re

import pytest
import torch

import kdkernels
from kdkernels import _ops
from kdkernels.reference import teacher_topk_ref, topk_kl_div_ref
from utils import (
    ALL_DTYPES,
    LOW_PRECISION,
    assert_grad_close,
    assert_loss_close,
    make_student,
    make_teacher,
    ref_loss_and_grad,
    unique_ids,
    upcast,
)

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
# Every valid (mode, divergence) pair: renorm is forward KL only.
COMBOS = [("renorm", "forward_kl")] + [(m, d) for m in ("tail", "support", "dense") for d in DIVERGENCES]
COMBO_IDS = [f"{m}-{d}" for m, d in COMBOS]
ERRORS = (ValueError, RuntimeError)  # Python-side checks raise ValueError, C++ TORCH_CHECK RuntimeError


def _dtype_id(dt):
    return str(dt).replace("torch.", "")


def _values_are(mode):
    # tail needs log-probs; the others are exercised with logits here and with both further down.
    return "logprobs" if mode == "tail" else "logits"


def _run(student, values, ids, upstream=None, **kw):
    """The op's loss and d(sum(upstream * loss)) / d student."""
    loss = kdkernels.topk_kl_div(student, values, ids, **kw)
    g = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    (grad,) = torch.autograd.grad((loss * g).sum(), student)
    return loss, grad


def _check(student, values, ids, dtype, upstream=None, **kw):
    """Op vs float64 reference: value and gradient. Returns the op's (loss, grad)."""
    loss, grad = _run(student, values, ids, upstream, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "validate"}
    ref, ref_grad = ref_loss_and_grad(topk_kl_div_ref, student, values, ids, upstream, **ref_kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == student.shape
    assert_loss_close(loss, ref, dtype)
    assert_grad_close(grad, ref_grad, dtype)
    return loss, grad


# ---------------------------------------------------------------------------------------------
# Every mode x divergence x dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("mode,divergence", COMBOS, ids=COMBO_IDS)
def test_matches_reference(device, mode, divergence, dtype):
    N, V, K = 9, 101, 8
    va = _values_are(mode)
    z = make_student(N, V, dtype, device)
    t, ids = make_teacher(N, V, K, va, mode, dtype=dtype, device=device)
    kw = dict(mode=mode, divergence=divergence, values_are=va, beta=0.3, skew=0.2)
    # reduction='none' with a random upstream gradient: every row's gradient is scaled separately.
    up = torch.rand(N, dtype=torch.float64).to(device)
    _check(z, t, ids, dtype, upstream=up, reduction="none", **kw)
    # the default mean, used as 2 * loss
    loss, grad = _run(z, t, ids, **kw)
    ref, ref_grad = ref_loss_and_grad(topk_kl_div_ref, z, t, ids, **kw)
    (grad2,) = torch.autograd.grad(2 * kdkernels.topk_kl_div(z, t, ids, **kw), z)
    assert_loss_close(loss, ref, dtype)
    assert_grad_close(grad2, 2 * ref_grad, dtype)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints(device, beta):
    # beta = 0 / 1 are the forward / reverse KL limits, not the degenerate 0 of the formula.
    z = make_student(5, 37, torch.float32, device)
    t, ids = make_teacher(5, 37, 6, "logprobs", dtype=torch.float32, device=device)
    for mode in ("tail", "support"):
        _check(z, t, ids, torch.float32, mode=mode, divergence="jsd", beta=beta, values_are="logprobs")


@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("mode,values_are", [("renorm", "logits"), ("renorm", "logprobs"), ("tail", "logprobs"),
                                             ("support", "logits"), ("support", "logprobs"),
                                             ("dense", "logits"), ("dense", "logprobs")])
def test_values_are_and_temperature(device, mode, values_are, T, scale_by_t2):
    N, V, K = 6, 64, 5
    z = make_student(N, V, torch.float32, device)
    t, ids = make_teacher(N, V, K, values_are, mode, temperature=T, device=device)
    divergence = "forward_kl" if mode == "renorm" else "jsd"
    _check(z, t, ids, torch.float32, mode=mode, divergence=divergence, values_are=values_are,
           temperature=T, scale_by_t2=scale_by_t2)


# ---------------------------------------------------------------------------------------------
# Reductions, masks, labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("sum", None), ("none", None), ("mean", 7),
                                                 ("sum", 11.0)])
@pytest.mark.parametrize("mode", ["renorm", "tail"])
def test_reductions_masks_labels(device, mode, reduction, num_items):
    lead, V, K = (3, 5), 50, 4
    z = make_student(0, V, torch.float32, device, lead=lead)
    t, ids = make_teacher(15, V, K, "logprobs", dtype=torch.float32)
    t, ids = t.view(*lead, K).to(device), ids.view(*lead, K).to(device)
    mask = (torch.rand(lead) > 0.25).to(device)
    labels = torch.randint(0, V, lead)
    labels[0, 0] = labels[2, 4] = -7
    labels = labels.to(device)
    up = torch.rand(lead, dtype=torch.float64).to(device) if reduction == "none" else None
    loss, grad = _check(z, t, ids, torch.float32, upstream=up, mode=mode, values_are="logprobs",
                        reduction=reduction, num_items=num_items, mask=mask, labels=labels, ignore_index=-7)
    valid = mask & (labels != -7)
    assert (grad[~valid] == 0).all()
    if reduction == "none":
        assert loss.shape == lead and (loss[~valid] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["renorm", "tail", "support", "dense"])
def test_all_masked_is_exactly_zero(device, mode, reduction):
    N, V, K = 4, 30, 3
    z = make_student(N, V, torch.float32, device)
    t, ids = make_teacher(N, V, K, "logprobs", mode, device=device)
    for masking in (dict(mask=torch.zeros(N, dtype=torch.bool, device=device)),
                    dict(labels=torch.full((N,), -100, device=device))):
        loss = kdkernels.topk_kl_div(z, t, ids, mode=mode, values_are="logprobs", reduction=reduction, **masking)
        assert (loss == 0).all() and not torch.isnan(loss).any()
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert (grad == 0).all()


@pytest.mark.parametrize("mode", ["renorm", "dense"])
def test_empty_batch(device, mode):
    V, K = 20, 4
    z = make_student(0, V, torch.float32, device)
    t, ids = make_teacher(0, V, K, "logits", mode, device=device)
    loss = kdkernels.topk_kl_div(z, t, ids, mode=mode)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.shape == (0, V)
    assert kdkernels.topk_kl_div(z, t, ids, mode=mode, reduction="none").shape == (0,)


# ---------------------------------------------------------------------------------------------
# Awkward shapes and layouts
# ---------------------------------------------------------------------------------------------

SHAPES = [  # (N, V, K, layout, id dtype)
    (5, 37, 1, "contiguous", torch.int64),  # K = 1
    (4, 37, 37, "contiguous", torch.int64),  # K = V
    (1, 1000, 16, "contiguous", torch.int64),  # one row
    (7, 1000, 50, "slice", torch.int32),  # a slice of a bigger tensor, int32 ids
    (6, 37, 5, "transposed", torch.int32),  # stride on V != 1
    (3, 1, 1, "contiguous", torch.int64),  # V = 1
]


@pytest.mark.parametrize("mode,divergence", [("renorm", "forward_kl"), ("tail", "jsd"), ("support", "reverse_kl"),
                                             ("dense", "skew_forward_kl")], ids=lambda x: str(x))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}-K{s[2]}-{s[3]}-{_dtype_id(s[4])}")
def test_awkward_shapes(device, shape, mode, divergence):
    N, V, K, layout, id_dtype = shape
    z = make_student(N, V, torch.float32, device, layout=layout)
    t, ids = make_teacher(N, V, K, "logprobs", mode, dtype=torch.float32, device=device, id_dtype=id_dtype)
    if ids is not None:
        assert ids.dtype == id_dtype
    up = torch.rand(N, dtype=torch.float64).to(device)
    _check(z, t, ids, torch.float32, upstream=up, reduction="none", mode=mode, divergence=divergence,
           values_are="logprobs")


def test_leading_dims_and_mixed_dtypes(device):
    # (B, L, V) bf16 student with float32 cached teacher values, as a training step would have.
    B, L, V, K = 2, 3, 77, 6
    z = make_student(0, V, torch.bfloat16, device, lead=(B, L))
    t, ids = make_teacher(B * L, V, K, "logprobs", dtype=torch.float32)
    t, ids = t.view(B, L, K).to(device), ids.view(B, L, K).to(device)
    _check(z, t, ids, torch.bfloat16, mode="tail", values_are="logprobs")
    loss = kdkernels.topk_kl_div(z, t, ids, mode="tail", values_are="logprobs", reduction="none")
    assert loss.shape == (B, L)


def test_larger_case(device):
    # One realistic-width row block (the only large shape in this file).
    N, V, K = 16, 32000, 64
    z = make_student(N, V, torch.float32, device)
    t, ids = make_teacher(N, V, K, "logprobs", dtype=torch.float32, device=device)
    for mode in ("renorm", "tail"):
        _check(z, t, ids, torch.float32, mode=mode, values_are="logprobs", temperature=2.0)


# ---------------------------------------------------------------------------------------------
# Dropped ids, -inf teacher values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,divergence", [("renorm", "forward_kl"), ("tail", "forward_kl"), ("tail", "tvd"),
                                             ("support", "jsd")])
def test_out_of_range_drop(device, mode, divergence):
    N, V, K = 6, 40, 6
    z = make_student(N, V, torch.float32, device)
    t, ids = make_teacher(N, V, K, "logprobs", dtype=torch.float32)
    ids[:, 0] = V + torch.arange(N)  # ids of a bigger teacher vocabulary
    ids[2, 3] = V
    ids[4] = V + 5 + torch.arange(K)  # a row with every id dropped
    ids = ids.to(device)
    t = t.to(device)
    kw = dict(mode=mode, divergence=divergence, values_are="logprobs")
    with pytest.raises(ERRORS, match=re.escape(f"teacher_indices out of range [0, {V}): found ")):
        kdkernels.topk_kl_div(z, t, ids, **kw)
    up = torch.rand(N, dtype=torch.float64).to(device)
    loss, _ = _check(z, t, ids, torch.float32, upstream=up, reduction="none", out_of_range="drop", **kw)
    if mode != "tail":
        assert loss[4].item() == 0.0


@pytest.mark.parametrize("mode,divergence", [("renorm", "forward_kl"), ("tail", "forward_kl"), ("tail", "jsd"),
                                             ("support", "forward_kl"), ("support", "tvd"), ("dense", "jsd"),
                                             ("dense", "skew_reverse_kl")])
def test_neg_inf_teacher_values(device, mode, divergence):
    N, V, K = 5, 40, 6
    z = make_student(N, V, torch.float32, device)
    t, ids = make_teacher(N, V, K, "logprobs", mode, dtype=torch.float32)
    t[0, :2] = float("-inf")  # masked vocabulary entries
    t[3, :] = float("-inf")  # a teacher with no mass at all
    t = t.to(device)
    up = torch.rand(N, dtype=torch.float64).to(device)
    loss, grad = _check(z, t, ids, torch.float32, upstream=up, reduction="none", mode=mode,
                        divergence=divergence, values_are="logprobs")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if mode != "tail":  # no teacher mass on the support: 0 and no gradient
        assert loss[3].item() == 0.0 and (grad[3] == 0).all()


@pytest.mark.parametrize("mode,divergence", [("renorm", "forward_kl"), ("tail", "reverse_kl"), ("support", "jsd"),
                                             ("dense", "forward_kl"), ("dense", "jsd")])
def test_neg_inf_at_row_start(device, mode, divergence):
    # -inf in the first 600 entries of a row: every GPU thread's first elements (up to 512 threads x 16-byte
    # loads, or 128 threads x 4 floats) are -inf, which once made the CUDA path's online log-sum-exp NaN.
    N, V, K, P = 4, 1100, 6, 600
    z = make_student(N, V, torch.float32, device, requires_grad=False)
    t, ids = make_teacher(N, V, K, "logprobs", mode, dtype=torch.float32)
    if mode == "dense":
        t[:3, :P] = float("-inf")  # the teacher's masked ids
        t = torch.log_softmax(t, -1)
    else:
        ids = torch.stack([torch.randperm(V - P)[:K] + P for _ in range(N)])  # the support is finite
        z[:3, :P] = float("-inf")  # masked student logits
    z = z.to(device).requires_grad_(True)
    up = torch.rand(N, dtype=torch.float64).to(device)
    loss, grad = _check(z, t.to(device), None if ids is None else ids.to(device), torch.float32, upstream=up,
                        reduction="none", mode=mode,
                        divergence=divergence, values_are="logprobs")
    assert torch.isfinite(loss).all() and not grad.isnan().any()


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,divergence", COMBOS, ids=COMBO_IDS)
def test_gradcheck(device, mode, divergence):
    N, V, K = 3, 7, 3
    z = make_student(N, V, torch.float64, device)
    va = _values_are(mode)
    t, ids = make_teacher(N, V, K, va, mode, dtype=torch.float64, device=device)
    if divergence == "tvd":
        # |P - Q| has a kink at P == Q; random draws keep clear of it, but make sure.
        ref = topk_kl_div_ref(*upcast(z, t, ids), mode=mode, divergence="tvd", values_are=va, reduction="none")
        assert torch.isfinite(ref).all()

    def fn(x):
        return kdkernels.topk_kl_div(x, t, ids, mode=mode, divergence=divergence, values_are=va, beta=0.4,
                                     skew=0.25, temperature=1.5, reduction="none")

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def _raw_inputs(mode, device, dtype=torch.float32, N=5, V=33, K=4, masked=False):
    z = make_student(N, V, dtype, device, requires_grad=False)
    va = "logprobs" if mode == "tail" else "logits"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t, ids = make_teacher(N, V, K, va, mode, dtype=dtype if mode == "dense" else acc, device=device)
    row_mask = (torch.arange(N) % 3 != 1).to(device) if masked else None
    return z, t, ids, row_mask, va


RAW_CONFIGS = [("renorm", "forward_kl", False), ("tail", "jsd", True), ("support", "tvd", False),
               ("dense", "skew_reverse_kl", True)]


@pytest.mark.parametrize("mode,divergence,masked", RAW_CONFIGS)
def test_raw_ops_values(device, mode, divergence, masked):
    z, t, ids, row_mask, va = _raw_inputs(mode, device, masked=masked)
    T, param = 1.5, 0.3
    loss, lse, coef, stat = _ops.lib.topk_kl_fwd(
        z, t, ids, row_mask, mode, divergence, param, T, va == "logprobs", False, True)
    N = z.shape[0]
    K = 0 if mode == "dense" else t.shape[1]
    assert loss.shape == (N,) and lse.shape == (N,) and coef.shape == (N, K) and stat.shape == (N, 4)
    assert loss.dtype == lse.dtype == coef.dtype == stat.dtype == torch.float32
    keep = torch.ones(N, dtype=torch.bool) if row_mask is None else row_mask.cpu()
    # masked rows are skipped by the kernel: their statistics are unspecified
    torch.testing.assert_close(lse.cpu().double()[keep], torch.logsumexp(z.cpu().double() / T, -1)[keep],
                               rtol=1e-5, atol=1e-5)
    up = torch.rand(N, dtype=torch.float64)
    ref, ref_grad = ref_loss_and_grad(topk_kl_div_ref, z, t, ids, up * keep, mode=mode, divergence=divergence,
                                      values_are=va, beta=param, skew=param, temperature=T, scale_by_t2=False,
                                      reduction="none")
    assert_loss_close(loss.cpu()[keep], ref[keep], torch.float32)
    grad = _ops.lib.topk_kl_bwd((up * keep).float().to(device), z, t, ids, lse, coef, stat, mode,
                                          divergence, param, T, va == "logprobs")
    assert grad.shape == z.shape and grad.dtype == z.dtype
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("bad", ["lse", "coef", "stat", "grad_loss", "dtype"])
def test_raw_backward_checks_saved_inputs(device, bad):
    # A raw call of the backward with saved tensors of the wrong shape once read out of bounds.
    z, t, ids, _, va = _raw_inputs("support", device)
    N, K = ids.shape
    saved = dict(grad_loss=torch.ones(N), lse=torch.zeros(N), coef=torch.zeros(N, K), stat=torch.zeros(N, 4))
    if bad == "dtype":
        saved["lse"], msg = saved["lse"].double(), "lse must be torch.float32: got torch.float64"
    else:
        saved[bad] = saved[bad][:2]
        want = {"lse": "(5,)", "coef": f"({N}, {K})", "stat": f"({N}, 4)", "grad_loss": "(5,)"}[bad]
        msg = f"{bad} must have shape {want}: got"
    s = {k: v.to(device) for k, v in saved.items()}
    with pytest.raises(ValueError, match=re.escape("kdkernels.topk_kl_div: " + msg)):
        _ops.lib.topk_kl_bwd(s["grad_loss"], z, t, ids, s["lse"], s["coef"], s["stat"], "support", "forward_kl", 0.5,
                             1.0, va == "logprobs")


@pytest.mark.parametrize("mode,divergence,masked", RAW_CONFIGS[:3])
def test_opcheck(device, mode, divergence, masked):
    z, t, ids, row_mask, va = _raw_inputs(mode, device, masked=masked, N=3, V=11, K=3)
    args = (z, t, ids, row_mask, mode, divergence, 0.3, 1.5, va == "logprobs", False, True)
    torch.library.opcheck(_ops.lib.topk_kl_fwd.default, args)
    loss, lse, coef, stat = _ops.lib.topk_kl_fwd(*args)
    bwd_args = (torch.rand_like(loss), z, t, ids, lse, coef, stat, mode, divergence, 0.3, 1.5, va == "logprobs")
    torch.library.opcheck(_ops.lib.topk_kl_bwd.default, bwd_args)


@pytest.mark.parametrize("mode,divergence,backend", [("renorm", "forward_kl", "inductor"),
                                                     ("tail", "jsd", "aot_eager")])
def test_compile_fullgraph_matches_eager(device, mode, divergence, backend):
    torch._dynamo.reset()
    N, V, K = 6, 50, 5
    z = make_student(N, V, torch.float32, device)
    t, ids = make_teacher(N, V, K, "logprobs", dtype=torch.float32, device=device)
    mask = (torch.arange(N) != 2).to(device)

    def step(x, values, idx, m):
        return 2.0 * kdkernels.topk_kl_div(x, values, idx, mode=mode, divergence=divergence, values_are="logprobs",
                                           temperature=2.0, mask=m)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager = step(z, t, ids, mask)
    (g_eager,) = torch.autograd.grad(eager, z)
    got = compiled(z, t, ids, mask)
    (g_got,) = torch.autograd.grad(got, z)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_eager, rtol=1e-6, atol=1e-8)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Low precision: no worse than the same math done in that precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=_dtype_id)
@pytest.mark.parametrize("mode,divergence", [("renorm", "forward_kl"), ("tail", "forward_kl"), ("tail", "jsd"),
                                             ("support", "reverse_kl"), ("dense", "forward_kl"), ("dense", "tvd")])
def test_low_precision_error_vs_reference_in_that_precision(device, mode, divergence, dtype):
    N, V, K = 16, 1000, 32
    va = _values_are(mode)
    z = make_student(N, V, dtype, device)
    t, ids = make_teacher(N, V, K, va, mode, dtype=dtype, device=device)
    kw = dict(mode=mode, divergence=divergence, values_are=va, reduction="none", temperature=2.0)
    up = torch.rand(N, dtype=torch.float64)
    loss, grad = _run(z, t, ids, up.to(device), **kw)
    ref64, grad64 = ref_loss_and_grad(topk_kl_div_ref, z, t, ids, up, **kw)
    # the reference itself, run on the CPU in the low precision
    zl = z.detach().cpu().requires_grad_(True)
    ref_lp = topk_kl_div_ref(zl, t.cpu(), None if ids is None else ids.cpu(), **kw)
    (grad_lp,) = torch.autograd.grad((ref_lp * up.to(dtype)).sum(), zl)

    def err(a, b):
        return (a.double().cpu() - b).abs().max().item()

    e_op, e_lp = err(loss, ref64), err(ref_lp, ref64)
    assert e_op <= 2 * e_lp + 1e-5 * ref64.abs().max().item(), f"loss error {e_op:.3g} vs reference in {dtype} {e_lp:.3g}"
    g_op, g_lp = err(grad, grad64), err(grad_lp, grad64)
    assert g_op <= 2 * g_lp + 1e-4 * grad64.abs().max().item(), f"grad error {g_op:.3g} vs reference in {dtype} {g_lp:.3g}"


# ---------------------------------------------------------------------------------------------
# Module, teacher_topk
# ---------------------------------------------------------------------------------------------


def test_module_equals_functional(device):
    z = make_student(4, 30, torch.float32, device)
    t, ids = make_teacher(4, 30, 5, "logprobs", device=device)
    kw = dict(mode="tail", values_are="logprobs", divergence="skew_reverse_kl", skew=0.3, temperature=1.7)
    mod = kdkernels.TopKKLDivLoss(**kw)
    assert isinstance(mod, torch.nn.Module)
    torch.testing.assert_close(mod(z, t, ids), kdkernels.topk_kl_div(z, t, ids, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("values_are", ["logits", "logprobs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_teacher_topk(device, values_are, dtype):
    tl = torch.randn(2, 3, 50).to(dtype).to(device)
    v, i = kdkernels.teacher_topk(tl, 7, temperature=1.5, values_are=values_are)
    rv, ri = teacher_topk_ref(tl.double(), 7, temperature=1.5, values_are=values_are)
    assert v.shape == i.shape == (2, 3, 7)
    assert (i.cpu() == ri.cpu()).all()
    torch.testing.assert_close(v.double().cpu(), rv.cpu(), rtol=1e-5, atol=1e-5)
    # the pair feeds straight into the loss
    z = make_student(6, 50, torch.float32, device, lead=(2, 3))
    mode = "tail" if values_are == "logprobs" else "renorm"
    assert torch.isfinite(kdkernels.topk_kl_div(z, v, i, mode=mode, values_are=values_are, temperature=1.5))


# ---------------------------------------------------------------------------------------------
# Refusals: exact texts of docs/topk_kl.md
# ---------------------------------------------------------------------------------------------

P = "kdkernels.topk_kl_div: "


def _bad_inputs(device):
    """Valid defaults: logits (4, 7, 11), values/ids (4, 7, 5)."""
    z = torch.randn(4, 7, 11, device=device)
    t = torch.randn(4, 7, 5, device=device)
    ids = unique_ids(28, 11, 5).view(4, 7, 5).to(device)
    return z, t, ids


def _refusals(device):
    z, t, ids = _bad_inputs(device)
    f = kdkernels.topk_kl_div
    dup = ids.clone()
    dup_rows = unique_ids(4, 11, 5)
    dup_rows[3] = torch.tensor([7, 1, 7, 2, 3])
    oor = ids.clone()
    oor[1, 2, 3] = 11
    cases = [
        (lambda: f(z.long(), t, ids), "student_logits must be float32, float16, bfloat16 or float64: got torch.int64"),
        (lambda: f(torch.randn(4, 0, device=device), torch.randn(4, 1, device=device),
                   torch.zeros(4, 1, dtype=torch.long, device=device)),
         "student_logits must have a non-empty last (vocabulary) dimension: got shape (4, 0)"),
        (lambda: f(z, t[:, :6], ids[:, :6]),
         "teacher_values must have the leading shape of student_logits: expected (4, 7), got (4, 6)"),
        (lambda: f(z, t, torch.zeros(4, 7, 6, dtype=torch.long, device=device)),
         "teacher_indices must have the shape of teacher_values: expected (4, 7, 5), got (4, 7, 6)"),
        (lambda: f(z, t, ids.float()), "teacher_indices must be int32 or int64: got torch.float32"),
        (lambda: f(z, t.long(), ids), "teacher_values must be float32, float16, bfloat16 or float64: got torch.int64"),
        (lambda: f(z, t, None), "teacher_indices is required for mode='renorm'"),
        (lambda: f(z, t, None, mode="support"), "teacher_indices is required for mode='support'"),
        (lambda: f(z, t[..., :0], ids[..., :0]), "teacher_values must have K >= 1 entries per row: got K = 0"),
        (lambda: f(z[0], torch.randn(7, 12, device=device), torch.arange(12, device=device).remainder(11).expand(7, 12)),
         "teacher_values has more entries per row than the vocabulary: K = 12 > V = 11"),
        (lambda: f(z, t, oor), "teacher_indices out of range [0, 11): found 11 (pass out_of_range='drop' to ignore "
                               "ids outside the student vocabulary)"),
        (lambda: f(z[0, :4], t[0, :4], dup_rows.to(device)),
         "teacher_indices has a duplicate id within a row: row 3 repeats id 7"),
        (lambda: f(z, z, ids, mode="dense"), "mode='dense' takes no teacher_indices"),
        (lambda: f(z, t, mode="dense"),
         "the teacher's vocabulary (5) and the student's (11) differ: pass teacher_vocab='truncate' (drop the "
         "teacher's ids >= 11) or 'pad' (the student's ids >= 5 get teacher probability 0)"),
        (lambda: f(z, t, ids, mode="foo"), "mode must be one of 'renorm', 'tail', 'support', 'dense': got 'foo'"),
        (lambda: f(z, t, ids, divergence="kl"),
         "divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl', 'tvd': "
         "got 'kl'"),
        (lambda: f(z, t, ids, divergence="jsd"), "mode='renorm' supports only divergence='forward_kl': got 'jsd'"),
        (lambda: f(z, t, ids, mode="tail"),
         "mode='tail' needs values_are='logprobs' (the teacher's tail mass must be known): got 'logits'"),
        (lambda: f(z, t, ids, values_are="probs"), "values_are must be 'logits' or 'logprobs': got 'probs'"),
        (lambda: f(z, t, ids, temperature=0.0), "temperature must be > 0: got 0.0"),
        (lambda: f(z, t, ids, mode="support", divergence="jsd", beta=1.5), "beta must be in [0, 1]: got 1.5"),
        (lambda: f(z, t, ids, mode="support", divergence="skew_forward_kl", skew=-0.1),
         "skew must be in [0, 1]: got -0.1"),
        (lambda: f(z, t, ids, reduction="avg"), "reduction must be one of 'mean', 'sum', 'none': got 'avg'"),
        (lambda: f(z, t, ids, out_of_range="clip"), "out_of_range must be 'error' or 'drop': got 'clip'"),
        (lambda: f(z, t, ids, mask=torch.ones(4, 8, dtype=torch.bool, device=device)),
         "mask must have the leading shape of student_logits: expected (4, 7), got (4, 8)"),
        (lambda: f(z, t, ids, labels=torch.ones(4, 8, dtype=torch.long, device=device)),
         "labels must have the leading shape of student_logits: expected (4, 7), got (4, 8)"),
        (lambda: f(z, t, ids, num_items=0), "num_items must be > 0: got 0"),
        (lambda: f(z, t, ids, reduction="none", num_items=3), "num_items cannot be combined with reduction='none'"),
    ]
    return [(fn, P + msg) for fn, msg in cases] + [
        (lambda: kdkernels.teacher_topk(z, 12), "kdkernels.teacher_topk: k must be in [1, V = 11]: got 12"),
    ]


N_REFUSALS = 29


@pytest.mark.parametrize("case", range(N_REFUSALS))
def test_refusals(device, case):
    cases = _refusals(device)
    assert len(cases) == N_REFUSALS
    fn, msg = cases[case]
    with pytest.raises(ERRORS, match=re.escape(msg)):
        fn()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("what", ["teacher_values", "teacher_indices", "mask", "labels"])
def test_refusal_wrong_device(what):
    z, t, ids = _bad_inputs("cpu")
    kw = dict(teacher_values=t, teacher_indices=ids, mask=torch.ones(4, 7, dtype=torch.bool),
              labels=torch.zeros(4, 7, dtype=torch.long))
    kw[what] = kw[what].cuda()
    with pytest.raises(ERRORS, match=re.escape(f"{P}{what} must be on the device of student_logits: expected cpu, got cuda:0")):
        kdkernels.topk_kl_div(z, kw.pop("teacher_values"), kw.pop("teacher_indices"), **kw)


# ---------------------------------------------------------------------------------------------
# Vocabularies of different sizes: valid_vocab (a padded student table), teacher_vocab (dense widths)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,divergence", [("tail", "reverse_kl"), ("renorm", "forward_kl"), ("support", "jsd"),
                                             ("dense", "jsd")])
def test_valid_vocab_excludes_padded_rows(device, mode, divergence):
    N, V, pad, K = 7, 61, 5, 6  # a student table padded from 61 to 66 rows
    z = make_student(N, V + pad, torch.float32, device)
    full_t = torch.randn(N, V + pad, dtype=torch.float64) * 2
    if mode == "dense":
        vals, ids = full_t.float().to(device), None  # the same padded layout: cut to valid_vocab as well
        ref_vals = vals[:, :V]
    else:
        vals, ids = kdkernels.teacher_topk(full_t, K, values_are="logprobs")
        ids[:, 0] = V + 2  # a teacher id in the padding: dropped, its mass in the tail
        vals, ids, ref_vals = vals.float().to(device), ids.to(device), None
    kw = dict(mode=mode, divergence=divergence, values_are="logprobs", reduction="none")
    if mode != "dense":
        with pytest.raises(ERRORS, match=re.escape(f"teacher_indices out of range [0, {V}): found {V + 2}")):
            kdkernels.topk_kl_div(z, vals, ids, valid_vocab=V, **kw)
        kw["out_of_range"] = "drop"
    loss = kdkernels.topk_kl_div(z, vals, ids, valid_vocab=V, **kw)
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert (g[:, V:] == 0).all()
    zr = z.detach()[:, :V].clone().requires_grad_()
    want = kdkernels.topk_kl_div(zr, ref_vals if mode == "dense" else vals, ids, **kw)
    (gw,) = torch.autograd.grad(want.sum(), zr)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g[:, :V], gw)


def test_dense_teacher_of_another_width(device):
    N, Vs = 5, 40
    z = make_student(N, Vs, torch.float64, device)
    wide, narrow = torch.randn(N, Vs + 3, dtype=torch.float64).to(device), torch.randn(N, Vs - 4, dtype=torch.float64).to(device)
    kw = dict(mode="dense", reduction="none")
    for t in (wide, narrow):
        with pytest.raises(ValueError, match=re.escape(f"the teacher's vocabulary ({t.shape[1]}) and the student's "
                                                       f"({Vs}) differ: pass teacher_vocab='truncate'")):
            kdkernels.topk_kl_div(z, t, **kw)
    cut = kdkernels.topk_kl_div(z, wide, teacher_vocab="truncate", **kw)
    torch.testing.assert_close(cut, kdkernels.topk_kl_div(z, wide[:, :Vs], **kw))
    padded = kdkernels.topk_kl_div(z, narrow, teacher_vocab="pad", divergence="forward_kl", **kw)
    full = torch.cat([narrow, torch.full((N, 4), float("-inf"), dtype=torch.float64, device=device)], -1)
    torch.testing.assert_close(padded, kdkernels.topk_kl_div(z, full, **kw))
    with pytest.raises(ValueError, match=re.escape("valid_vocab must be an int in [1, 40]")):
        kdkernels.topk_kl_div(z, wide[:, :Vs], valid_vocab=41, **kw)


def test_valid_vocab_fused_linear():
    N, H, V, pad = 9, 8, 50, 6
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V + pad, H, dtype=torch.float64, requires_grad=True)
    t = torch.randn(N, V + pad, dtype=torch.float64)
    got = kdkernels.linear_topk_kl_div(h, W, t, mode="dense", valid_vocab=V, chunk_size=4)
    gh, gw = torch.autograd.grad(got, (h, W))
    want = kdkernels.topk_kl_div(h @ W[:V].t(), t[:, :V], mode="dense")
    wh, ww = torch.autograd.grad(want, (h, W))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)
    assert (gw[V:] == 0).all()


# ---------------------------------------------------------------------------------------------
# The student's final-logit map: logit_scale (Cohere) and softcap (Gemma 2/3), scale -> cap -> temperature
# ---------------------------------------------------------------------------------------------

SOFTCAP_COMBOS = [("renorm", "forward_kl"), ("tail", "reverse_kl"), ("support", "jsd"), ("dense", "skew_reverse_kl"),
                  ("dense", "tvd")]


@pytest.mark.parametrize("scale,cap", [(1.0, 5.0), (0.0625, None), (0.5, 4.0)])
@pytest.mark.parametrize("mode,divergence", SOFTCAP_COMBOS)
def test_logit_scale_and_softcap_match_float64(device, mode, divergence, scale, cap):
    from kdkernels.functional import logit_map
    N, V, K = 9, 203, 7
    z0 = torch.randn(N, V, dtype=torch.float64) * 8  # |z| up to ~30: tanh saturates, the cap matters
    teacher = torch.randn(N, V, dtype=torch.float64) * 3
    if mode == "dense":
        vals, ids = teacher, None
    else:
        vals, ids = kdkernels.teacher_topk(teacher, K, temperature=1.7, values_are="logprobs")
    kw = dict(mode=mode, divergence=divergence, values_are="logprobs" if mode == "tail" else "logits",
              temperature=1.7, reduction="none")
    z64 = z0.clone().requires_grad_()
    ref = topk_kl_div_ref(logit_map(z64, scale, cap), vals, ids, **kw)
    (gref,) = torch.autograd.grad(ref.sum(), z64)
    for dtype in (torch.float64, torch.float32):
        z = z0.to(dtype).to(device).requires_grad_()
        got = kdkernels.topk_kl_div(z, vals.to(dtype if mode == "dense" else vals.dtype).to(device),
                                    None if ids is None else ids.to(device), logit_scale=scale, softcap=cap, **kw)
        (g,) = torch.autograd.grad(got.sum(), z)
        tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.double().cpu(), ref.detach(), **tol)
        torch.testing.assert_close(g.double().cpu(), gref, rtol=tol["rtol"], atol=tol["atol"] * float(gref.abs().max()))


def test_softcap_fused_linear_and_distill_loss(device):
    from kdkernels.functional import logit_map
    N, H, V, K = 17, 10, 121, 5
    h = torch.randn(N, H, dtype=torch.float64)
    W = torch.randn(V, H, dtype=torch.float64) * 3
    vals, ids = kdkernels.teacher_topk(torch.randn(N, V, dtype=torch.float64) * 3, K, values_are="logprobs")
    labels = torch.randint(0, V, (N,))
    labels[::4] = -100
    kw = dict(mode="tail", values_are="logprobs", divergence="jsd", logit_scale=0.5, softcap=6.0)
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    zr = logit_map(hr @ Wr.t(), 0.5, 6.0)
    ce = torch.nn.functional.cross_entropy(zr, labels)
    kd = topk_kl_div_ref(zr, vals, ids, labels=labels, **{k: v for k, v in kw.items() if k not in ("logit_scale", "softcap")})
    gk = torch.autograd.grad(kd, (hr, Wr), retain_graph=True)
    gt = torch.autograd.grad(0.4 * ce + 0.6 * kd, (hr, Wr))
    hd, Wd = h.to(device).requires_grad_(), W.to(device).requires_grad_()
    got = kdkernels.linear_topk_kl_div(hd, Wd, vals.to(device), ids.to(device), labels=labels.to(device),
                                       chunk_size=5, **kw)
    torch.testing.assert_close(got.detach().cpu(), kd.detach())
    for a, e in zip(torch.autograd.grad(got, (hd, Wd)), gk):
        torch.testing.assert_close(a.cpu(), e)
    loss, metrics = kdkernels.linear_distill_loss(hd, Wd, labels.to(device), vals.to(device), ids.to(device),
                                                  ce_weight=0.4, kd_weight=0.6, chunk_size=5, **kw)
    torch.testing.assert_close(loss.detach().cpu(), (0.4 * ce + 0.6 * kd).detach())
    for a, e in zip(torch.autograd.grad(loss, (hd, Wd)), gt):
        torch.testing.assert_close(a.cpu(), e)
    assert metrics["ce"] == pytest.approx(float(ce.detach()), rel=1e-9)


@pytest.mark.parametrize("kw,msg", [(dict(logit_scale=0.0), "logit_scale must be > 0: got 0.0"),
                                    (dict(softcap=-1.0), "softcap must be None or > 0: got -1.0")])
def test_logit_map_refusals(kw, msg):
    z = torch.randn(3, 9)
    vals, ids = kdkernels.teacher_topk(torch.randn(3, 9), 2)
    with pytest.raises(ValueError, match=re.escape("kdkernels.topk_kl_div: " + msg)):
        kdkernels.topk_kl_div(z, vals, ids, **kw)


def test_raw_ops_refuse_bad_logit_map(device):
    z, t, ids, _, va = _raw_inputs("support", device)
    for args, msg in (((0.0, 0.0), "logit_scale must be > 0: got 0"), ((1.0, -2.0), "softcap must be >= 0")):
        with pytest.raises(ERRORS, match=re.escape("kdkernels.topk_kl_div: " + msg)):
            _ops.lib.topk_kl_fwd(z, t, ids, None, "support", "forward_kl", 0.5, 1.0, va == "logprobs", False, True,
                                 *args)


def test_opcheck_with_softcap(device):
    z, t, ids, row_mask, va = _raw_inputs("tail", device)
    args = (z, t, ids, row_mask, "tail", "jsd", 0.5, 1.3, va == "logprobs", False, False, 0.7, 4.0)
    torch.library.opcheck(_ops.lib.topk_kl_fwd.default, args)
    loss, lse, coef, stat = _ops.lib.topk_kl_fwd(*args)
    bwd_args = (torch.rand_like(loss), z, t, ids, lse, coef, stat, "tail", "jsd", 0.5, 1.3, va == "logprobs", 0.7, 4.0)
    torch.library.opcheck(_ops.lib.topk_kl_bwd.default, bwd_args)


# ---------------------------------------------------------------------------------------------
# inplace_grad: the gradient written over the logits' own storage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,divergence,cap", [("tail", "jsd", None), ("renorm", "forward_kl", None),
                                                 ("support", "tvd", 5.0), ("dense", "reverse_kl", None),
                                                 ("dense", "jsd", 4.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad_matches_and_reuses_the_logits(device, mode, divergence, cap, dtype):
    N, H, V, K = 13, 8, 301, 7
    h = torch.randn(N, H, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    W = (torch.randn(V, H, dtype=torch.float64) * 2).to(dtype).to(device).requires_grad_()
    teacher = torch.randn(N, V, dtype=torch.float64) * 2
    if mode == "dense":
        vals, ids = teacher.to(dtype).to(device), None
    else:
        vals, ids = kdkernels.teacher_topk(teacher, K, values_are="logprobs")
        vals, ids = vals.float().to(device), ids.to(device)
        ids[1, 2] = V + 4  # a dropped id
    kw = dict(mode=mode, divergence=divergence, values_are="logprobs" if mode != "dense" else "logits",
              softcap=cap, reduction="sum", out_of_range="drop")
    out = {}
    for inplace in (False, True):
        z = h @ W.t()
        z.retain_grad() if not inplace else None
        loss = kdkernels.topk_kl_div(z, vals, ids, inplace_grad=inplace, **kw)
        loss.backward()
        g_z = z.grad if not inplace else z.detach().clone()  # in place: the logits tensor now holds d loss / d z
        out[inplace] = (float(loss.detach()), h.grad.clone(), W.grad.clone(), g_z)
        h.grad, W.grad = None, None
    assert out[True][0] == out[False][0]
    for a, b in zip(out[True][1:], out[False][1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernels: bit for bit



def test_inplace_grad_refusals():
    V, K = 31, 4
    vals, ids = kdkernels.teacher_topk(torch.randn(5, V), K)
    leaf = torch.randn(5, V, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape("inplace_grad=True writes the gradient over student_logits: they "
                                                   "must come from an operation")):
        kdkernels.topk_kl_div(leaf, vals, ids, inplace_grad=True)
    w = torch.randn(V, 5, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape("inplace_grad=True needs contiguous student_logits")):
        kdkernels.topk_kl_div((w * 1).t(), vals, ids, inplace_grad=True)
    # Another node that saved the logits (here: before the loss) makes autograd refuse, never a wrong gradient.
    z = w.t() * 2.0
    z = z.contiguous()
    extra = z.pow(2).mean()
    loss = kdkernels.topk_kl_div(z, vals, ids, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + extra).backward()


def test_opcheck_inplace_backward(device):
    z, t, ids, _, va = _raw_inputs("support", device)
    loss, lse, coef, stat = _ops.lib.topk_kl_fwd(z, t, ids, None, "support", "tvd", 0.5, 1.3, va == "logprobs", False,
                                                 False)
    args = (torch.rand_like(loss), z.clone(), t, ids, lse, coef, stat, "support", "tvd", 0.5, 1.3, va == "logprobs")
    torch.library.opcheck(_ops.lib.topk_kl_bwd_inplace.default, args)
    want = _ops.lib.topk_kl_bwd(*args[:1], z, *args[2:])
    zc = z.clone()
    _ops.lib.topk_kl_bwd_inplace(args[0], zc, *args[2:])
    torch.testing.assert_close(zc, want, rtol=0, atol=0)


def test_teacher_vocab_refusal():
    z, t = torch.randn(3, 9), torch.randn(3, 9)
    with pytest.raises(ValueError, match=re.escape("teacher_vocab must be None, 'truncate' or 'pad': got 'cut'")):
        kdkernels.topk_kl_div(z, t, mode="dense", teacher_vocab="cut")


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,divergence", [("tail", "forward_kl"), ("dense", "jsd"), ("support", "reverse_kl")])
def test_autocast_logits_from_float32_parameters(device, amp_dtype, mode, divergence):
    # Mixed precision as most people train: float32 parameters, the logits made by a matmul inside the autocast
    # region (so 16-bit), the loss called inside it too. Same value and gradient as float64 from those logits.
    dev = "cpu" if str(device) == "cpu" else str(device).split(":")[0]
    N, H, V, K = 19, 24, 157, 7
    g = torch.Generator().manual_seed(11)
    h = torch.randn(N, H, generator=g).to(device)
    W = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(device).requires_grad_()
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    vals, ids = (t.float(), None) if mode == "dense" else kdkernels.teacher_topk(t.float(), K, values_are="logprobs",
                                                                               temperature=1.5)
    vals, ids = vals.to(device), None if ids is None else ids.to(device)
    kw = dict(mode=mode, divergence=divergence, temperature=1.5, values_are="logprobs" if mode != "dense" else "logits")
    with torch.autocast(device_type=dev, dtype=amp_dtype):
        z = h @ W.t()
        assert z.dtype == amp_dtype
        loss = kdkernels.topk_kl_div(z, vals, ids, **kw)
    assert loss.dtype == torch.float32
    gw, = torch.autograd.grad(loss, W)
    assert gw.dtype == torch.float32
    z64 = z.detach().double().requires_grad_()
    ref = kdkernels.topk_kl_div(z64, vals.double(), ids, **kw)
    gz, = torch.autograd.grad(ref, z64)
    # the reference gradient pushed through the same 16-bit matmul autocast used (grad_W = g^T h in 16 bits)
    gw_ref = (gz.to(amp_dtype).t() @ h.to(amp_dtype)).double()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=2e-2, atol=2e-2 * float(gw_ref.abs().max()))
