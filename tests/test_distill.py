"""Tests of kdkernels.DistillationLoss: the weighted objective, one normaliser for every term
(num_items for gradient accumulation), teacher logits vs cached top-k, plug-in terms, refusals."""

import re

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels import DistillationLoss, TeacherTargets
from kdkernels.distill import KDInputs, kd_terms, register_kd_term

B, L, V, K = 3, 6, 11, 4
P = "kdkernels.DistillationLoss: "


def _data(dtype=torch.float64):
    z = torch.randn(B, L, V, dtype=dtype, requires_grad=True)
    t = torch.randn(B, L, V, dtype=dtype) * 2
    labels = torch.randint(0, V, (B, L))
    labels[0, -2:] = -100  # padding / prompt positions
    labels[2, 0] = -100
    return z, t, labels


def test_total_is_weighted_sum_and_terms_are_unweighted():
    z, t, labels = _data()
    fn = DistillationLoss(ce_weight=0.3, terms={
        "tail": {"fn": "topk_kl", "weight": 0.5, "mode": "tail", "k": K, "temperature": 2.0},
        "rev": {"fn": "topk_kl", "weight": 0.25, "mode": "support", "divergence": "reverse_kl", "k": K},
        "dense": {"fn": "topk_kl", "weight": 0.1, "mode": "dense", "divergence": "jsd", "beta": 0.3},
    })
    out = fn(z, labels, teacher=TeacherTargets(logits=t))
    valid = labels != -100
    n = valid.sum()
    assert out.num_items == n and list(out.terms) == ["ce", "tail", "rev", "dense"]
    ce = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum") / n
    v2, i2 = kdkernels.teacher_topk(t, K, 2.0)
    v1, i1 = kdkernels.teacher_topk(t, K, 1.0)
    tail = kdkernels.topk_kl_div(z, v2, i2, values_are="logprobs", mode="tail", temperature=2.0, mask=valid,
                                 reduction="sum") / n
    rev = kdkernels.topk_kl_div(z, v1, i1, values_are="logprobs", mode="support", divergence="reverse_kl",
                                mask=valid, reduction="sum") / n
    dense = kdkernels.topk_kl_div(z, t, mode="dense", divergence="jsd", beta=0.3, mask=valid, reduction="sum") / n
    for got, want in zip(out.terms.values(), (ce, tail, rev, dense)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.loss, 0.3 * ce + 0.5 * tail + 0.25 * rev + 0.1 * dense)
    out.loss.backward()
    assert (z.grad[~valid] == 0).all()  # uncounted positions get no gradient from any term
    assert (z.grad[valid] != 0).any()


def test_cached_topk_equals_live_teacher():
    """Values/ids from a cache (log-probs at T) give the same loss as the teacher's logits."""
    z, t, labels = _data()
    spec = {"kd": {"fn": "topk_kl", "weight": 1.0, "mode": "tail", "k": K, "temperature": 1.5}}
    fn = DistillationLoss(ce_weight=1.0, terms=spec)
    live = fn(z, labels, teacher=TeacherTargets(logits=t))
    v, i = kdkernels.teacher_topk(t, K, 1.5)
    cached = fn(z, labels, teacher=TeacherTargets(values=v, ids=i.int(), temperature=1.5))
    torch.testing.assert_close(live.loss, cached.loss)
    # k may be left to the cache
    fn2 = DistillationLoss(ce_weight=1.0, terms={"kd": {"fn": "topk_kl", "weight": 1.0, "mode": "tail",
                                                         "temperature": 1.5}})
    torch.testing.assert_close(fn2(z, labels, teacher=TeacherTargets(values=v, ids=i, temperature=1.5)).loss,
                               live.loss)


def test_num_items_splits_like_one_batch():
    """Two micro-batches normalised by the global count add up to the loss (and gradient) of the whole batch."""
    z, t, labels = _data()
    fn = DistillationLoss(ce_weight=0.5, terms={"kd": {"fn": "topk_kl", "weight": 0.5, "mode": "tail", "k": K}})
    whole = fn(z, labels, teacher=TeacherTargets(logits=t))
    (g_whole,) = torch.autograd.grad(whole.loss, z)
    n = (labels != -100).sum()
    parts = [fn(z[s], labels[s], teacher=TeacherTargets(logits=t[s]), num_items=n) for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(parts[0].loss + parts[1].loss, whole.loss)
    for key in ("ce", "kd"):
        torch.testing.assert_close(parts[0].terms[key] + parts[1].terms[key], whole.terms[key])
    (g_parts,) = torch.autograd.grad(parts[0].loss + parts[1].loss, z)
    torch.testing.assert_close(g_parts, g_whole)
    # per-micro-batch means would not (the micro-batches count different numbers of tokens)
    naive = sum(fn(z[s], labels[s], teacher=TeacherTargets(logits=t[s])).loss for s in (slice(0, 1), slice(1, 3))) / 2
    assert not torch.allclose(naive, whole.loss)
    out = fn(z, labels, teacher=TeacherTargets(logits=t), num_items=torch.tensor(7))
    torch.testing.assert_close(out.terms["ce"] * 7, whole.terms["ce"] * n)


def test_mask_and_pure_kd():
    z, t, labels = _data()
    mask = torch.rand(B, L) > 0.3
    fn = DistillationLoss(ce_weight=0.0, terms={"kd": {"fn": "topk_kl", "weight": 1.0, "mode": "renorm", "k": K}})
    out = fn(z, None, teacher=TeacherTargets(logits=t), mask=mask)
    assert list(out.terms) == ["kd"] and out.num_items == mask.sum()
    v, i = kdkernels.teacher_topk(t, K)
    torch.testing.assert_close(out.loss, kdkernels.topk_kl_div(z, v, i, values_are="logprobs", mask=mask))
    # labels and mask together: the positions counted are those both allow
    out = fn(z, labels, teacher=TeacherTargets(logits=t), mask=mask)
    assert out.num_items == ((labels != -100) & mask).sum()


def test_ce_weight_zero_logs_ce_without_gradient():
    z, t, labels = _data()
    fn = DistillationLoss(ce_weight=0.0, terms={"kd": {"fn": "topk_kl", "weight": 1.0, "mode": "tail", "k": K}})
    out = fn(z, labels, teacher=TeacherTargets(logits=t))
    assert "ce" in out.terms and not out.terms["ce"].requires_grad
    torch.testing.assert_close(out.loss, out.terms["kd"])


def test_ce_only_and_low_precision():
    z, _, labels = _data(torch.bfloat16)
    out = DistillationLoss(ce_weight=1.0, terms={})(z, labels)
    want = F.cross_entropy(z.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert z.grad.dtype == torch.bfloat16


def test_plugin_terms_by_callable_and_by_name():
    z, t, labels = _data()
    seen = {}

    def l2(x: KDInputs):
        seen["x"] = x
        diff = (x.student_logits - x.teacher.logits).pow(2).sum(-1)
        return (diff * x.mask).sum() / x.num_items

    register_kd_term("test_l2", lambda scale=1.0: (lambda x: scale * l2(x)), replace=True)
    assert "test_l2" in kd_terms() and "topk_kl" in kd_terms()
    fn = DistillationLoss(ce_weight=1.0, terms={"a": {"fn": l2, "weight": 0.1},
                                                "b": {"fn": "test_l2", "weight": 0.2, "scale": 3.0}})
    out = fn(z, labels, teacher=TeacherTargets(logits=t))
    torch.testing.assert_close(out.terms["b"], 3 * out.terms["a"])
    assert seen["x"].mask.shape == (B, L) and seen["x"].labels is labels
    with pytest.raises(ValueError, match="a term named 'test_l2' is already registered"):
        register_kd_term("test_l2", l2)
    assert fn.config()["terms"] == {"a": {"fn": "l2", "weight": 0.1}, "b": {"fn": "test_l2", "weight": 0.2,
                                                                          "scale": 3.0}}


def test_config_round_trip():
    spec = {"kd": {"fn": "topk_kl", "weight": 0.7, "mode": "tail", "k": K, "temperature": 2.0}}
    fn = DistillationLoss(ce_weight=0.3, terms=spec, label_smoothing=0.1)
    again = DistillationLoss(**fn.config())
    z, t, labels = _data()
    torch.testing.assert_close(again(z, labels, teacher=TeacherTargets(logits=t)).loss,
                               fn(z, labels, teacher=TeacherTargets(logits=t)).loss)


def test_refusals():
    z, t, labels = _data()
    kd = {"fn": "topk_kl", "weight": 1.0, "mode": "tail", "k": K}
    cases = [
        (lambda: DistillationLoss(terms={"kd": kd}), TypeError, "ce_weight"),
        (lambda: DistillationLoss(ce_weight=None, terms={}), ValueError,
         f"{P}ce_weight must be a finite number >= 0: got None"),
        (lambda: DistillationLoss(ce_weight=1.0, terms={"kd": {"fn": "topk_kl", "mode": "tail"}}), ValueError,
         f"{P}terms['kd'] needs an explicit 'weight'"),
        (lambda: DistillationLoss(ce_weight=1.0, terms={"kd": {"fn": "sinkhorn_typo", "weight": 1}}), ValueError,
         f"{P}terms['kd']: unknown term 'sinkhorn_typo' (registered: "),
        (lambda: DistillationLoss(ce_weight=1.0, terms={"ce": kd}), ValueError,
         f"{P}the label 'ce' is the hard-label term's"),
        (lambda: DistillationLoss(ce_weight=0.0, terms={}), ValueError,
         f"{P}ce_weight is 0 and there are no terms: the objective would be empty"),
        (lambda: DistillationLoss(ce_weight=1.0, terms={"kd": {"fn": print, "weight": 1, "k": 3}}), ValueError,
         f"{P}terms['kd']: options ['k'] given with a callable 'fn'"),
        (lambda: DistillationLoss(ce_weight=1.0, terms={"kd": kd})(z, labels), ValueError,
         f"{P}a teacher is required for the terms ['kd']"),
        (lambda: DistillationLoss(ce_weight=1.0, terms={"kd": kd})(z, None, teacher=TeacherTargets(logits=t)),
         ValueError, f"{P}labels are required for the hard-label term (ce_weight=1.0)"),
        (lambda: DistillationLoss(ce_weight=1.0, terms={})(z, labels[:, :-1]), ValueError,
         f"{P}labels must have the leading shape of student_logits: expected (3, 6), got (3, 5)"),
        (lambda: DistillationLoss(ce_weight=1.0, terms={"kd": dict(kd, k=None)})(
            z, labels, teacher=TeacherTargets(logits=t)), ValueError,
         f"{P}term 'kd' needs k (how many teacher entries per token) when the teacher gives full logits"),
        (lambda: DistillationLoss(ce_weight=1.0, terms={})(z, labels, num_items=0), ValueError,
         f"{P}num_items must be > 0: got 0"),
        (lambda: TeacherTargets(values=t[..., :K], ids=torch.zeros(B, L, K, dtype=torch.long)), ValueError,
         f"{P}TeacherTargets: values (top-k log-probs) need the temperature they were computed at"),
    ]
    for make, exc, msg in cases:
        with pytest.raises(exc, match=re.escape(msg)):
            make()
    v, i = kdkernels.teacher_topk(t, K, 1.0)
    cached = TeacherTargets(values=v, ids=i, temperature=1.0)
    with pytest.raises(ValueError, match=re.escape(f"{P}term 'kd' runs at temperature 2.0, but the teacher's top-k "
                                                   "log-probs were computed at temperature 1.0")):
        DistillationLoss(ce_weight=1.0, terms={"kd": dict(kd, temperature=2.0)})(z, labels, teacher=cached)
    with pytest.raises(ValueError, match=re.escape(f"{P}term 'kd' asks for k = 3, but the teacher's top-k has k = 4")):
        DistillationLoss(ce_weight=1.0, terms={"kd": dict(kd, k=3)})(z, labels, teacher=cached)
    with pytest.raises(ValueError, match=re.escape(f"{P}term 'kd' with mode='dense' needs the teacher's full logits")):
        DistillationLoss(ce_weight=1.0, terms={"kd": {"fn": "topk_kl", "weight": 1, "mode": "dense"}})(
            z, labels, teacher=cached)
    with pytest.raises(ValueError, match=re.escape("kdkernels.topk_kl_div: mode='renorm' supports only "
                                                   "divergence='forward_kl': got 'jsd'")):
        DistillationLoss(ce_weight=1.0, terms={"kd": {"fn": "topk_kl", "weight": 1, "k": K, "divergence": "jsd"}})(
            z, labels, teacher=TeacherTargets(logits=t))


def test_topk_term_defaults_are_the_functions():
    """A term built with no options computes exactly topk_kl_div's defaults (nothing changes behind the user)."""
    z, t, labels = _data()
    v, i = kdkernels.teacher_topk(t, K)
    out = DistillationLoss(ce_weight=0.0, terms={"kd": {"fn": "topk_kl", "weight": 1.0}})(
        z, labels, teacher=TeacherTargets(values=v, ids=i, temperature=1.0))
    want = kdkernels.topk_kl_div(z, v, i, values_are="logprobs", labels=labels)
    torch.testing.assert_close(out.loss, want)


@pytest.mark.parametrize("mode", ["dense", "tail"])
def test_vocabularies_of_different_sizes(mode):
    # Student table of 40 rows, 37 of them real (valid_vocab); a teacher of 45 entries, cut to the student's.
    g = torch.Generator().manual_seed(8)
    N, Vs, Vt, real = 23, 40, 45, 37
    z = torch.randn(N, Vs, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(N, Vt, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, real, (N,), generator=g)
    y[::5] = -100
    terms = {"kd": {"fn": "topk_kl", "weight": 0.7, "mode": mode, "k": 9, "temperature": 1.5}}
    loss = DistillationLoss(ce_weight=0.3, terms=terms, valid_vocab=real, teacher_vocab="truncate")
    out = loss(z, y, teacher=TeacherTargets(logits=t))
    cnt = (y != -100).sum()
    ce = F.cross_entropy(z[:, :real], y, reduction="sum") / cnt
    if mode == "dense":
        kd = kdkernels.topk_kl_div(z[:, :real], t[:, :real], mode="dense", temperature=1.5, labels=y,
                                   reduction="sum") / cnt
    else:  # the teacher's top-9 over all 45 entries; those >= 37 are dropped, their mass stays in the tail
        v, ix = kdkernels.teacher_topk(t, 9, temperature=1.5, values_are="logprobs")
        assert bool((ix >= real).any())
        kd = kdkernels.topk_kl_div(z[:, :real], v, ix, values_are="logprobs", mode="tail", temperature=1.5,
                                   labels=y, out_of_range="drop", reduction="sum") / cnt
    torch.testing.assert_close(out.loss, 0.3 * ce + 0.7 * kd, rtol=1e-12, atol=1e-12)
    gz, = torch.autograd.grad(out.loss, z)
    assert float(gz[:, real:].abs().max()) == 0.0  # the padded rows take no part
    with pytest.raises(ValueError, match="teacher_vocab must be None, 'truncate' or 'pad': got 'cut'"):
        DistillationLoss(ce_weight=1.0, terms={}, teacher_vocab="cut")
    with pytest.raises(ValueError, match=r"valid_vocab \(41\) exceeds the student's vocabulary \(40\)"):
        DistillationLoss(ce_weight=1.0, terms={}, valid_vocab=41)(z, y)
    plain = DistillationLoss(ce_weight=0.3, terms=terms)
    with pytest.raises(ValueError, match=r"\(45\) and the student's \(40\) differ" if mode == "dense" else
                       r"out of range"):
        plain(z, y, teacher=TeacherTargets(logits=t))
