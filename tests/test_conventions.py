"""Each row of docs/conventions.md: the kdkernels call that reproduces a peer library's loss and gradient."""
import types

import pytest
import torch

import kdkernels

F32, F64 = torch.float32, torch.float64
# Liger-Kernel is Triton-only; kdkernels runs on CPU copies of the same inputs, so no CUDA build is needed.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's Triton kernels need a CUDA device")


def randn(*shape, dtype=F64, scale=2.0, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(grad)


def labels_for(shape, V, seed=7):
    """Token labels with about a third ignored (-100), never all of them."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, shape, generator=g)
    lab[torch.rand(shape, generator=g) < 0.35] = -100
    lab.view(-1)[0] = 3
    return lab


def close(ours, peer):
    tol = dict(rtol=1e-9, atol=1e-12) if ours.dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.detach().cpu(), peer.detach().cpu().to(ours.dtype), **tol)


def check(peer, ours, xp, xo=None):
    """Values, then gradients w.r.t. the student inputs xp (peer) / xo (ours); rows weighted distinctly."""
    xo = xp if xo is None else xo
    close(ours, peer)
    w = torch.linspace(0.5, 1.5, max(ours.numel(), 1), dtype=ours.dtype).reshape(ours.shape)
    gp = torch.autograd.grad((peer.cpu().to(ours.dtype) * w).sum(), xp)
    go = torch.autograd.grad((ours * w).sum(), xo)
    for a, b in zip(go, gp):
        close(a, b)


# ---- TRL -----------------------------------------------------------------------------------------------

# GKD reductions: (reduction, labels?, num_items_in_batch). 'batchmean' divides by the batch size without
# labels and by the number of kept tokens with them; 'mean' by every element (tokens x V).
GKD_CASES = [("batchmean", False, None), ("batchmean", True, None), ("sum", True, None), ("mean", False, None),
             ("mean", True, None), ("batchmean", True, 7)]


@pytest.mark.parametrize("case", GKD_CASES, ids=lambda c: f"{c[0]}-labels{int(c[1])}-n{c[2]}")
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_trl_gkd_generalized_jsd(beta, T, case):
    gkd = pytest.importorskip("trl.experimental.gkd")
    reduction, use_labels, n = case
    B, L, V = 3, 5, 37
    z, t = randn(B, L, V, grad=True), randn(B, L, V, seed=1)
    labels = labels_for((B, L), V) if use_labels else None
    peer = gkd.GKDTrainer.generalized_jsd_loss(z, t, labels=labels, beta=beta, temperature=T, reduction=reduction,
                                               num_items_in_batch=n)
    rows = B * L if labels is None else int((labels != -100).sum())
    if n is not None:
        kw = dict(num_items=n)
    elif reduction == "batchmean":
        kw = dict(reduction="mean") if use_labels else dict(reduction="sum", num_items=B)
    else:
        kw = dict(reduction="sum", num_items=None if reduction == "sum" else rows * V)
    ours = kdkernels.topk_kl_div(z, t, mode="dense", divergence="jsd", beta=beta, temperature=T, scale_by_t2=False,
                                 labels=labels, **kw)
    check(peer, ours, (z,))


@pytest.mark.parametrize("num_items", [None, 13])
@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
def test_trl_distillation_chunked_jsd(beta, num_items):
    dt = pytest.importorskip("trl.trainer.distillation_trainer")
    B, L, Hs, Ht, V, T = 2, 7, 12, 9, 53, 1.7
    hs, bs = randn(B, L, Hs, dtype=F32, grad=True), randn(V, dtype=F32, seed=2, grad=True)
    Ws = randn(V, Hs, dtype=F32, scale=0.5, seed=1, grad=True)
    ht, bt = randn(B, L, Ht, dtype=F32, seed=3), randn(V, dtype=F32, seed=5)
    Wt = randn(V, Ht, dtype=F32, scale=0.5, seed=4)
    mask = labels_for((B, L), V) != -100
    # TRL always projects and reduces in float32: compare in float32.
    peer = dt._chunked_divergence_loss(hs, ht, Ws, Wt, mask.long(), beta, num_items, bs, bt, temperature=T)[0]
    ours = kdkernels.linear_topk_kl_div(hs, Ws, ht @ Wt.T + bt, bias=bs, mode="dense", divergence="jsd", beta=beta,
                                        temperature=T, scale_by_t2=False, mask=mask, num_items=num_items)
    check(peer, ours, (hs, Ws, bs))


SERVER = "trl.experimental.server_distillation.server_distillation_trainer"


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", [True, False])
def test_trl_server_topk_forward_kl(tail, T):
    cls = pytest.importorskip(SERVER).ServerDistillationTrainer
    B, L, V, K = 2, 6, 41, 5
    z = randn(B, L, V, grad=True)
    vals, ids = kdkernels.teacher_topk(randn(B, L, V, seed=1), K)  # the server's top-k log-probs (at T = 1)
    labels = labels_for((B, L), V)
    # The loss methods only read these attributes of the trainer (no server, no model needed).
    fake = types.SimpleNamespace(loss_add_tail=tail, _reduce_divergence_loss=cls._reduce_divergence_loss)
    peer = cls._compute_server_forward_kl_loss(fake, {"topk_logprobs": vals, "topk_token_ids": ids},
                                               torch.log_softmax(z / T, -1), labels)
    ours = kdkernels.topk_kl_div(z, vals, ids, values_are="logprobs", mode="tail" if tail else "support",
                                 temperature=T, scale_by_t2=False, labels=labels)
    check(peer, ours, (z,))


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_trl_server_top1_jsd(beta, tail):
    cls = pytest.importorskip(SERVER).ServerDistillationTrainer
    B, L, V = 3, 4, 23
    z = randn(B, L, V, grad=True)
    t_logp = torch.log_softmax(randn(B, L, V, seed=1), -1)
    top_lp, top_id = t_logp.max(-1)
    sampled = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(5))
    sampled[0, :2] = top_id[0, :2]  # the sampled token is often the teacher's top-1
    sampled_lp = t_logp.gather(-1, sampled[..., None])[..., 0]
    labels = labels_for((B, L), V)
    fake = types.SimpleNamespace(beta=beta, loss_add_tail=tail, _reduce_divergence_loss=cls._reduce_divergence_loss)
    peer = cls._compute_sparse_top_1_divergence_loss(fake, torch.log_softmax(z, -1), top_id, top_lp, sampled,
                                                     sampled_lp, labels)
    if beta == 1.0:  # TRL's support is the sampled token alone
        ids, vals = sampled[..., None], sampled_lp[..., None]
    else:  # {teacher top-1, sampled}; a repeat is dropped: id V (out of range) with zero teacher mass
        dup = sampled == top_id
        ids = torch.stack([top_id, sampled.masked_fill(dup, V)], -1)
        vals = torch.stack([top_lp, sampled_lp.masked_fill(dup, float("-inf"))], -1)
    ours = kdkernels.topk_kl_div(z, vals, ids, values_are="logprobs", mode="tail" if tail else "support",
                                 divergence="jsd", beta=beta, scale_by_t2=False, labels=labels, out_of_range="drop")
    check(peer, ours, (z,))


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_trl_iw_opd_topk_jsd(beta, tail, reduction):
    iw = pytest.importorskip("trl.experimental.iw_opd")
    B, L, V, k, T = 2, 5, 31, 4, 1.5
    z, t = randn(B, L, V, grad=True), randn(B, L, V, seed=1)
    labels = labels_for((B, L), V)
    peer = iw.IWOPDTrainer.generalized_jsd_loss(z, t, labels=labels, beta=beta, temperature=T, reduction=reduction,
                                                top_k=k, add_tail=tail)
    # TRL's support: the teacher's top-k (beta 0), the student's (beta 1), else both, a repeat dropped (id V).
    t_ids, s_ids = t.topk(k, -1).indices, z.detach().topk(k, -1).indices
    rep = (s_ids[..., :, None] == t_ids[..., None, :]).any(-1)
    ids = t_ids if beta == 0 else s_ids if beta == 1 else torch.cat([t_ids, s_ids.masked_fill(rep, V)], -1)
    vals = torch.log_softmax(t / T, -1).gather(-1, ids.clamp(max=V - 1)).masked_fill(ids == V, float("-inf"))
    # 'mean' divides by every bucket TRL holds: kept tokens x (support width + tail)
    num = None if reduction == "batchmean" else int((labels != -100).sum()) * (ids.shape[-1] + tail)
    ours = kdkernels.topk_kl_div(z, vals, ids, values_are="logprobs", mode="tail" if tail else "support",
                                 divergence="jsd", beta=beta, temperature=T, scale_by_t2=False, labels=labels,
                                 reduction="mean" if num is None else "sum", num_items=num, out_of_range="drop")
    check(peer, ours, (z,))


# ---- NVIDIA ModelOpt -----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:reduction:UserWarning")  # torch's notice that 'mean' is not 'batchmean'
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
def test_modelopt_logits_distillation_loss(reduction, T):
    mtd = pytest.importorskip("modelopt.torch.distill")
    B, L, V = 3, 4, 31
    z, t = randn(B, L, V, grad=True), randn(B, L, V, seed=1)
    peer = mtd.LogitsDistillationLoss(temperature=T, reduction=reduction)(z, t)
    # torch's kl_div: 'mean' divides by every element (B L V), 'batchmean' by the first dim only.
    num = {"mean": B * L * V, "batchmean": B}.get(reduction)
    ours = kdkernels.topk_kl_div(z, t, mode="dense", temperature=T, scale_by_t2=True,
                                 reduction="none" if reduction == "none" else "sum", num_items=num)
    check(peer, ours, (z,))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("top_k", [None, 6])
def test_modelopt_megatron_logits_kl(top_k, reverse):
    pytest.importorskip("megatron.core")
    mg = pytest.importorskip("modelopt.torch.distill.plugins.megatron")
    S, B, V, T = 5, 3, 29, 2.0  # Megatron's [s, b, V] layout; the loss comes back as [b, s]
    z, t = randn(S, B, V, dtype=F32, grad=True), randn(S, B, V, dtype=F32, seed=1)
    cfg = types.SimpleNamespace(tensor_model_parallel_size=1)
    crit = mg.LogitsKLLoss(cfg, T, reverse) if top_k is None else mg.TopKLogitsKLLoss(cfg, T, reverse, top_k)
    peer = crit(z, t)[0]
    kw = dict(divergence="reverse_kl" if reverse else "forward_kl", temperature=T, scale_by_t2=False, reduction="none")
    if top_k is None:
        ours = kdkernels.topk_kl_div(z, t, mode="dense", **kw)
    else:  # both sides renormalised over the teacher's top-k ids, no tail bucket
        vals, ids = kdkernels.teacher_topk(t, top_k, values_are="logits")
        ours = kdkernels.topk_kl_div(z, vals, ids, values_are="logits", mode="support", **kw)
    check(peer, ours.transpose(0, 1), (z,))


# ---- POT (ot.batch) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("grad", ["autodiff", "envelope"])
@pytest.mark.parametrize("method", ["log_sinkhorn", "sinkhorn"])
def test_pot_solve_batch(method, grad, weights):
    otb = pytest.importorskip("ot.batch")
    B, n, m, eps, iters = 4, 7, 5, 0.3, 25
    C = randn(B, n, m, scale=1.0).abs().add(0.1).requires_grad_()
    a, b = (w / w.sum(-1, keepdim=True) for w in (randn(B, k, seed=k).abs() + 0.2 for k in (n, m)))
    # tol=0: POT runs exactly max_iter iterations (its tol test is batch-wide, every 10th iteration).
    res = otb.solve_batch(C, reg=eps, a=a if weights else None, b=b if weights else None, max_iter=iters, tol=0,
                          method=method, grad=grad)
    marg = dict(a=a, b=b) if weights else dict(marginals="uniform")
    ours, plan = kdkernels.sinkhorn(C, eps, iters, **marg, grad="unrolled" if grad == "autodiff" else "envelope",
                                    return_plan=True)
    close(plan, res.plan)
    # POT's `value` adds the entropic term eps * sum P log P; kdkernels returns `value_linear`.
    close(ours + eps * (plan * torch.log(plan + 1e-16)).sum((1, 2)), res.value)
    check(res.value_linear, ours, (C,))


@pytest.mark.parametrize("marginals", ["ones", "uniform"])
@pytest.mark.parametrize("cost,metric", [("l1", "minkowski"), ("sqeuclidean", "sqeuclidean")])
def test_pot_sinkd_loss(cost, metric, marginals):
    otb = pytest.importorskip("ot.batch")
    B, L, C, T, eps, iters = 3, 6, 11, 2.0, 0.1, 20
    s, t = randn(B, L, C, grad=True), randn(B, L, C, seed=1)
    M = otb.dist_batch(torch.softmax(s / T, -1), torch.softmax(t / T, -1), metric=metric, p=1)
    ones = torch.ones(B, L, dtype=F64) if marginals == "ones" else None
    peer = otb.solve_batch(M, reg=eps, a=ones, b=ones, max_iter=iters, tol=0, method="log_sinkhorn",
                           grad="autodiff").value_linear
    ours = kdkernels.sinkhorn_kd_loss(s, t, temperature=T, eps=eps, n_iters=iters, cost=cost, marginals=marginals,
                                      reduction="none")
    check(peer, ours, (s,))


# ---- Liger-Kernel (CUDA only) --------------------------------------------------------------------------

def _to_cuda(*xs):  # the peer's own leaves, on the GPU
    return tuple(x.detach().cuda().requires_grad_(x.requires_grad) for x in xs)


@cuda
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_liger_jsd(beta, use_labels):
    jsd = pytest.importorskip("liger_kernel.transformers.jsd")
    N, V = 13, 301
    z, logp = randn(N, V, dtype=F32, grad=True), torch.log_softmax(randn(N, V, dtype=F32, seed=1), -1)
    labels = labels_for((N,), V) if use_labels else None
    zc, = _to_cuda(z)
    # Liger takes log-probs (student first) and differentiates w.r.t. them; autograd carries it to the logits.
    peer = jsd.LigerJSD(beta=beta)(torch.log_softmax(zc, -1), logp.cuda(), None if labels is None else labels.cuda())
    ours = kdkernels.topk_kl_div(z, logp, mode="dense", values_are="logprobs", divergence="jsd", beta=beta,
                                 labels=labels)
    check(peer, ours, (zc,), (z,))


@cuda
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_liger_kldiv(reduction, log_target):
    kl = pytest.importorskip("liger_kernel.transformers.kl_div")
    N, V = 9, 257
    z, logp = randn(N, V, dtype=F32, grad=True), torch.log_softmax(randn(N, V, dtype=F32, seed=1), -1)
    zc, = _to_cuda(z)
    target = (logp if log_target else logp.exp()).cuda()
    peer = kl.LigerKLDIVLoss(reduction=reduction, log_target=log_target)(torch.log_softmax(zc, -1), target)
    peer = peer.sum(-1) if reduction == "none" else peer  # Liger's 'none' keeps (N, V); kdkernels' is per row
    ours = kdkernels.topk_kl_div(z, logp, mode="dense", values_are="logprobs",
                                 reduction="none" if reduction == "none" else "sum",
                                 num_items={"batchmean": N, "mean": N * V}.get(reduction))
    check(peer, ours, (zc,), (z,))


@cuda
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_liger_tvd(reduction, use_labels):
    tvd = pytest.importorskip("liger_kernel.transformers.tvd")
    N, V = 11, 263
    z, t = randn(N, V, dtype=F32, grad=True), randn(N, V, dtype=F32, seed=1)
    labels = labels_for((N,), V) if use_labels else None
    zc, = _to_cuda(z)
    # Liger differentiates w.r.t. its first argument: pass the student's probabilities there.
    peer = tvd.LigerTVDLoss(reduction=reduction)(torch.softmax(zc, -1), torch.softmax(t, -1).cuda(),
                                                 None if labels is None else labels.cuda())
    peer = peer.sum(-1) if reduction == "none" else peer
    rows = N if labels is None else int((labels != -100).sum())
    ours = kdkernels.topk_kl_div(z, t, mode="dense", divergence="tvd", labels=labels,
                                 reduction="none" if reduction == "none" else "sum",
                                 num_items={"batchmean": rows, "mean": rows * V}.get(reduction))
    check(peer, ours, (zc,), (z,))


@cuda
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_liger_fused_linear_jsd(beta, use_labels):
    fl = pytest.importorskip("liger_kernel.transformers.fused_linear_jsd")
    N, Hs, Ht, V, T = 11, 16, 24, 203, 1.5
    hs, Ws = randn(N, Hs, dtype=F32, grad=True), randn(V, Hs, dtype=F32, scale=0.3, seed=1, grad=True)
    ht, Wt = randn(N, Ht, dtype=F32, seed=2), randn(V, Ht, dtype=F32, scale=0.3, seed=3)
    labels = labels_for((N,), V) if use_labels else None
    hc, Wc = _to_cuda(hs, Ws)
    peer = fl.LigerFusedLinearJSD(jsd_beta=beta, temperature=T)(hc, Wc, ht.cuda(), Wt.cuda(),
                                                                None if labels is None else labels.cuda())
    ours = kdkernels.linear_topk_kl_div(hs, Ws, ht @ Wt.T, mode="dense", divergence="jsd", beta=beta, temperature=T,
                                        scale_by_t2=False, labels=labels)
    check(peer, ours, (hc, Wc), (hs, Ws))


# ---- DistillKit (arcee-ai/DistillKit: not on PyPI) -----------------------------------------------------

def _distillkit_kld(z, ids, logp, mask, T, uniform_tail, eps=1e-8):
    """KLDLoss on a sparse signal (teacher log-probs made at T = 1), re-stated from arcee-ai/DistillKit @ a61c2e7
    (lossfuncs/kl.py, common.py) in float32 as there; missing = SYMMETRIC_UNIFORM if uniform_tail else ZERO."""
    lq = (z / T).gather(-1, ids) - torch.logsumexp(z / T, -1, keepdim=True)  # student log-probs at S, full vocab
    if uniform_tail:  # teacher re-tempered as p^(1/T), the missing mass (also re-tempered) as one more bucket
        left = (1 - logp.exp().sum(-1, keepdim=True)).clamp(0, 1)
        lp = logp / T - torch.log(torch.exp(logp / T).sum(-1, keepdim=True) + left ** (1 / T))
    else:  # teacher renormalised over S
        lp = torch.log_softmax(logp / T, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    if uniform_tail:
        m, s = lp.exp().sum(-1).clamp(eps, 1 - eps), lq.exp().sum(-1).clamp(eps, 1 - eps)
        kl = kl + (1 - m) * (torch.log1p(-m) - torch.log1p(-s))
    return (kl * mask).sum() * T ** 2 / mask.sum(), lp


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("uniform_tail", [False, True])
def test_distillkit_sparse_kl_restated(uniform_tail, T):
    B, L, V, K = 2, 5, 43, 6
    z = randn(B, L, V, dtype=F32, grad=True)
    vals, ids = kdkernels.teacher_topk(randn(B, L, V, dtype=F32, seed=1), K)
    mask = labels_for((B, L), V) != -100
    peer, lp = _distillkit_kld(z, ids, vals, mask.float(), T, uniform_tail)
    if uniform_tail:  # kdkernels takes the re-tempered teacher log-probs as they are
        ours = kdkernels.topk_kl_div(z, lp, ids, values_are="logprobs", mode="tail", temperature=T, mask=mask)
    else:  # log-probs are logits up to a per-row constant: kdkernels' softmax(t / T) over S is DistillKit's p̂
        ours = kdkernels.topk_kl_div(z, vals, ids, values_are="logits", mode="renorm", temperature=T, mask=mask)
    check(peer, ours, (z,))
