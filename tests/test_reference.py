"""Checks the float64 oracle (kdkernels.reference) against plain, independently written PyTorch math."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from kdkernels.reference import TAIL_FLOOR, teacher_topk_ref, topk_kl_div_ref
from utils import make_student, make_teacher, unique_ids

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
F64 = torch.float64


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def _close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-10), atol=kw.get("atol", 1e-12))


# ---- independent per-row divergences in *probability* space (no log-space tricks) -------------


def _plogp_ratio(a, b):
    # sum a log(a / b) with 0 log 0 = 0, written with xlogy so it is a different code path.
    return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)


def _direct(divergence, P, Q, beta=0.5, skew=0.1):
    if divergence == "forward_kl":
        return _plogp_ratio(P, Q)
    if divergence == "reverse_kl":
        return _plogp_ratio(Q, P)
    if divergence == "jsd":
        M = beta * P + (1 - beta) * Q
        return beta * _plogp_ratio(P, M) + (1 - beta) * _plogp_ratio(Q, M)
    if divergence == "skew_forward_kl":
        return _plogp_ratio(P, skew * P + (1 - skew) * Q)
    if divergence == "skew_reverse_kl":
        return _plogp_ratio(Q, (1 - skew) * P + skew * Q)
    if divergence == "tvd":
        return 0.5 * (P - Q).abs().sum(-1)
    raise AssertionError(divergence)


def _trl_generalized_jsd(student_logp, teacher_logp, beta):
    """TRL GKD's generalized JSD, written out here: KL terms via F.kl_div (log_target), mixture
    in log space through logsumexp of the two weighted log-probs; per row (summed over buckets)."""
    if beta == 0:
        return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=student_logp.dtype)
    mix = torch.logsumexp(torch.stack([student_logp + torch.log(1 - b), teacher_logp + torch.log(b)]), dim=0)
    kl_t = F.kl_div(mix, teacher_logp, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(mix, student_logp, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


# ---- dense ---------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_dense_forward_kl_matches_torch_kl_div(T):
    z = make_student(5, 37, F64)
    t, _ = make_teacher(5, 37, 0, mode="dense", dtype=F64)
    ours = topk_kl_div_ref(z, t, mode="dense", temperature=T)
    torch_ = F.kl_div(
        F.log_softmax(z / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean"
    ) * T**2
    _close(ours, torch_)
    _close(_grad(ours, z), _grad(torch_, z))


def test_dense_logprobs_is_softmax_of_values():
    # values_are='logprobs' in dense mode means P = softmax(t) (no division by T).
    z = make_student(4, 23, F64)
    tl, _ = make_teacher(4, 23, 0, mode="dense", dtype=F64)
    T = 2.0
    lp = torch.log_softmax(tl / T, -1)
    a = topk_kl_div_ref(z, lp, mode="dense", values_are="logprobs", temperature=T)
    b = topk_kl_div_ref(z, tl, mode="dense", values_are="logits", temperature=T)
    _close(a, b)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dense_every_divergence_matches_direct_formula(divergence):
    z = make_student(6, 29, F64)
    t, _ = make_teacher(6, 29, 0, mode="dense", dtype=F64)
    T = 1.7
    kw = dict(beta=0.3, skew=0.2)
    ours = topk_kl_div_ref(z, t, mode="dense", divergence=divergence, temperature=T, reduction="none", **kw)
    P, Q = torch.softmax(t / T, -1), torch.softmax(z / T, -1)
    ref = _direct(divergence, P, Q, **kw) * T**2
    _close(ours, ref)
    up = torch.rand(6, dtype=F64)
    _close(_grad((ours * up).sum(), z), _grad((ref * up).sum(), z), rtol=1e-9, atol=1e-12)


# ---- renorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values_are", ["logits", "logprobs"])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_renorm_is_cross_entropy_to_full_softmax(values_are, T):
    N, V, K = 7, 41, 6
    z = make_student(N, V, F64)
    t, ids = make_teacher(N, V, K, values_are=values_are, temperature=T, dtype=F64)
    ours = topk_kl_div_ref(z, t, ids, values_are=values_are, temperature=T)
    p_hat = torch.softmax(t / T if values_are == "logits" else t, -1)
    ce = -(p_hat * torch.log_softmax(z / T, -1).gather(-1, ids)).sum(-1)
    neg_entropy = (p_hat * p_hat.log()).sum(-1)
    ref = ((ce + neg_entropy) * T**2).mean()
    _close(ours, ref)
    _close(_grad(ours, z), _grad(ref, z))


# ---- support and tail: explicit bucket constructions ---------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("values_are", ["logits", "logprobs"])
def test_support_matches_renormalised_buckets(divergence, values_are):
    N, V, K, T = 5, 31, 7, 1.3
    z = make_student(N, V, F64)
    t, ids = make_teacher(N, V, K, values_are=values_are, temperature=T, dtype=F64)
    ours = topk_kl_div_ref(z, t, ids, mode="support", divergence=divergence, values_are=values_are,
                           temperature=T, reduction="none", beta=0.4, skew=0.3)
    P = torch.softmax(t / T if values_are == "logits" else t, -1)
    qS = torch.softmax(z / T, -1).gather(-1, ids)
    Q = qS / qS.sum(-1, keepdim=True)
    ref = _direct(divergence, P, Q, beta=0.4, skew=0.3) * T**2
    _close(ours, ref)
    up = torch.rand(N, dtype=F64)
    _close(_grad((ours * up).sum(), z), _grad((ref * up).sum(), z), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_tail_matches_k_plus_one_buckets(divergence, T):
    N, V, K = 6, 40, 5
    z = make_student(N, V, F64)
    t, ids = make_teacher(N, V, K, values_are="logprobs", temperature=T, dtype=F64)
    ours = topk_kl_div_ref(z, t, ids, mode="tail", divergence=divergence, values_are="logprobs",
                           temperature=T, reduction="sum")
    pS = t.exp()
    P = torch.cat([pS, (1 - pS.sum(-1, keepdim=True)).clamp_min(0)], -1)
    qS = torch.softmax(z / T, -1).gather(-1, ids)
    Q = torch.cat([qS, torch.clamp(1 - qS.sum(-1, keepdim=True), min=TAIL_FLOOR)], -1)
    ref = _direct(divergence, P, Q).sum() * T**2
    _close(ours, ref)
    _close(_grad(ours, z), _grad(ref, z), rtol=1e-9, atol=1e-12)


def test_tail_student_floor_binds():
    # A student with (almost) all its mass on S: the tail is the constant 1e-7, loss finite.
    N, V, K = 3, 10, 4
    ids = unique_ids(N, V, K)
    z = torch.full((N, V), -80.0, dtype=F64)
    z.scatter_(-1, ids, torch.randn(N, K, dtype=F64))
    z.requires_grad_(True)
    t = torch.log(torch.full((N, K), 0.2, dtype=F64))  # m = 0.8, teacher tail 0.2
    loss = topk_kl_div_ref(z, t, ids, mode="tail", values_are="logprobs", reduction="none")
    qS = torch.softmax(z.detach(), -1).gather(-1, ids)
    expected = (0.2 * (math.log(0.2) - qS.log())).sum(-1) + 0.2 * (math.log(0.2) - math.log(TAIL_FLOOR))
    _close(loss.detach(), expected, rtol=1e-9)
    assert torch.isfinite(_grad(loss.sum(), z)).all()


# ---- jsd conventions ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd(beta):
    z = make_student(4, 33, F64)
    t, _ = make_teacher(4, 33, 0, mode="dense", dtype=F64)
    ours = topk_kl_div_ref(z, t, mode="dense", divergence="jsd", beta=beta, reduction="none")
    trl = _trl_generalized_jsd(torch.log_softmax(z, -1), torch.log_softmax(t, -1), beta)
    _close(ours, trl)
    _close(_grad(ours.sum(), z), _grad(trl.sum(), z))


def test_jsd_endpoints_are_the_kl_limits():
    z = make_student(3, 17, F64)
    t, ids = make_teacher(3, 17, 5, values_are="logprobs", dtype=F64)
    kw = dict(mode="tail", values_are="logprobs", reduction="none")
    _close(topk_kl_div_ref(z, t, ids, divergence="jsd", beta=0.0, **kw),
           topk_kl_div_ref(z, t, ids, divergence="forward_kl", **kw))
    _close(topk_kl_div_ref(z, t, ids, divergence="jsd", beta=1.0, **kw),
           topk_kl_div_ref(z, t, ids, divergence="reverse_kl", **kw))
    # skew 0 is plain KL as well.
    _close(topk_kl_div_ref(z, t, ids, divergence="skew_forward_kl", skew=0.0, **kw),
           topk_kl_div_ref(z, t, ids, divergence="forward_kl", **kw))
    _close(topk_kl_div_ref(z, t, ids, divergence="skew_reverse_kl", skew=0.0, **kw),
           topk_kl_div_ref(z, t, ids, divergence="reverse_kl", **kw))


# ---- masks, reductions -----------------------------------------------------------------------


def test_masked_rows_and_reductions():
    lead, V, K = (3, 4), 19, 5
    z = make_student(0, V, F64, lead=lead)
    t, ids = make_teacher(12, V, K, dtype=F64)
    t, ids = t.view(*lead, K), ids.view(*lead, K)
    mask = torch.rand(lead) > 0.3
    labels = torch.randint(0, V, lead)
    labels[0, 1] = labels[2, 3] = -100
    valid = mask & (labels != -100)
    assert 0 < int(valid.sum()) < 12

    none = topk_kl_div_ref(z, t, ids, mask=mask, labels=labels, reduction="none")
    assert none.shape == lead
    assert (none[~valid] == 0).all()
    dense_rows = topk_kl_div_ref(z, t, ids, reduction="none")
    _close(none[valid], dense_rows[valid])

    s = topk_kl_div_ref(z, t, ids, mask=mask, labels=labels, reduction="sum")
    m = topk_kl_div_ref(z, t, ids, mask=mask, labels=labels, reduction="mean")
    n = topk_kl_div_ref(z, t, ids, mask=mask, labels=labels, num_items=7)
    _close(s, none.sum())
    _close(m, none.sum() / valid.sum())
    _close(n, none.sum() / 7)
    g = _grad(m, z)
    assert (g[~valid] == 0).all() and (g[valid] != 0).any()


@pytest.mark.parametrize("mode", ["renorm", "tail", "support", "dense"])
def test_all_masked_is_zero_with_zero_grad(mode):
    z = make_student(4, 13, F64)
    t, ids = make_teacher(4, 13, 3, values_are="logprobs", mode=mode, dtype=F64)
    loss = topk_kl_div_ref(z, t, ids, mode=mode, values_are="logprobs", mask=torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert (z.grad == 0).all()


def test_empty_batch():
    z = make_student(0, 13, F64)
    t, ids = make_teacher(0, 13, 3, dtype=F64)
    assert topk_kl_div_ref(z, t, ids).item() == 0.0
    assert topk_kl_div_ref(z, t, ids, reduction="none").shape == (0,)


# ---- -inf teacher values, dropped ids --------------------------------------------------------


@pytest.mark.parametrize("mode,divergence", [("renorm", "forward_kl")] + [
    (m, d) for m in ("tail", "support", "dense") for d in DIVERGENCES])
def test_neg_inf_teacher_values_give_no_nan(mode, divergence):
    N, V, K = 4, 21, 6
    z = make_student(N, V, F64)
    t, ids = make_teacher(N, V, K, values_are="logprobs", mode=mode, dtype=F64)
    t = t.clone()
    t[0, :2] = float("-inf")  # some masked entries
    t[1, :] = float("-inf")  # a row with no teacher mass at all
    loss = topk_kl_div_ref(z, t, ids, mode=mode, divergence=divergence, values_are="logprobs", reduction="none")
    # reverse-type divergences are inf where P = 0 < Q: that is the definition, not a NaN.
    inf_ok = divergence in ("reverse_kl",) and mode in ("tail", "support", "dense")
    assert not torch.isnan(loss).any()
    if not inf_ok:
        assert torch.isfinite(loss).all()
        g = _grad(loss.sum(), z)
        assert torch.isfinite(g).all()
    if mode in ("renorm", "support", "dense"):
        # no mass on the support: loss 0 and gradient 0 for that row
        assert loss[1].item() == 0.0
        # (only row 1's own slice: an inf row's gradient under a zero upstream is 0 * inf)
        assert (_grad(loss[1], z)[1] == 0).all()
    if mode == "renorm":
        # row 0 equals the same row with its -inf entries removed
        keep = slice(2, None)
        r = topk_kl_div_ref(z[:1], t[:1, keep], ids[:1, keep], values_are="logprobs", reduction="none")
        _close(loss[:1], r)


def test_reverse_kl_with_zero_teacher_mass_is_inf():
    z = make_student(2, 9, F64)
    t, ids = make_teacher(2, 9, 3, values_are="logprobs", dtype=F64)
    t = t.clone()
    t[0, 0] = float("-inf")
    loss = topk_kl_div_ref(z, t, ids, mode="support", divergence="reverse_kl", values_are="logprobs",
                           reduction="none")
    assert loss[0].item() == float("inf") and torch.isfinite(loss[1])


@pytest.mark.parametrize("mode", ["renorm", "support", "tail"])
def test_out_of_range_drop(mode):
    N, V, K = 3, 15, 5
    z = make_student(N, V, F64)
    t, ids = make_teacher(N, V, K, values_are="logprobs", dtype=F64)
    bad = ids.clone()
    bad[:, 0] = V + 3  # a vocabulary mismatch in the first slot
    bad[1, 1] = -1
    kw = dict(mode=mode, values_are="logprobs", reduction="none")
    with pytest.raises(ValueError, match=r"teacher_indices out of range \[0, 15\): found 18"):
        topk_kl_div_ref(z, t, bad, **kw)
    dropped = topk_kl_div_ref(z, t, bad, out_of_range="drop", **kw)
    for r in range(N):
        keep = (bad[r] >= 0) & (bad[r] < V)
        # Dropping is removal from S: in 'tail' the teacher mass moves to the tail bucket and the
        # student bucket disappears, otherwise p̂ renormalises over the ids left.
        expected = topk_kl_div_ref(z[r : r + 1], t[r : r + 1, keep], ids[r : r + 1, keep], **kw)
        _close(dropped[r : r + 1], expected)
    # every id dropped: no support left, loss 0 (renorm/support)
    if mode != "tail":
        all_bad = torch.full_like(ids, V)
        assert (topk_kl_div_ref(z, t, all_bad, out_of_range="drop", **kw) == 0).all()


# ---- low precision, teacher_topk ---------------------------------------------------------------


def test_runs_in_the_input_dtype():
    z = make_student(4, 50, torch.bfloat16)
    t, ids = make_teacher(4, 50, 8, dtype=torch.bfloat16)
    loss = topk_kl_div_ref(z, t, ids)
    assert loss.dtype == torch.bfloat16
    loss.backward()
    assert z.grad.dtype == torch.bfloat16
    ref = topk_kl_div_ref(z.detach().double(), t.double(), ids)
    assert 0 < abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())


@pytest.mark.parametrize("values_are", ["logits", "logprobs"])
def test_teacher_topk_ref(values_are):
    tl = torch.randn(3, 2, 20, dtype=F64)
    T = 2.0
    v, i = teacher_topk_ref(tl, 4, temperature=T, values_are=values_are)
    assert v.shape == i.shape == (3, 2, 4)
    assert (i == tl.argsort(-1, descending=True)[..., :4]).all()
    full = tl if values_are == "logits" else torch.log_softmax(tl / T, -1)
    _close(v, full.gather(-1, i))
    with pytest.raises(ValueError, match=re.escape("kdkernels.teacher_topk: k must be in [1, V = 20]: got 21")):
        teacher_topk_ref(tl, 21)

