"""Vocab-parallel top-k KL: student logits split over the vocabulary across a torch.distributed group.

Each rank holds the logits of its vocabulary slice [start, start + V_local) (as a tensor-parallel
lm_head produces them); teacher ids are global. The row statistics (log-sum-exp, the student's
log-probs at the teacher's ids, dense partial sums) are combined with all-reduces; the K-element
epilogue then runs identically on every rank (float32 PyTorch on (N, K) tensors, the reference
math of kdkernels.reference.sparse_rows_ref, coefficients by autograd); each rank's gradient slice
comes from the same fused backward op as the single-process path, given the global statistics.

Data parallel needs nothing special: pass num_items = (global count of valid tokens) / world_size
when DistributedDataParallel averages gradients, so every rank's loss is its share of the global mean.
"""
from typing import Optional, Union

import torch
import torch.distributed as dist

from . import _ops
from .functional import _reduce, _require_backend, _t2, _topk_prepare, logit_map
from .linear import _run_linear, chunk_rows
from .reference import _DIVERGENCE_FNS, sparse_rows_ref

_NEG_INF = float("-inf")


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _identity(t):
    return t


def _global_lse(x: torch.Tensor, scale: float, group, rows_per_chunk: int = 1024, fn=None):
    """logsumexp over the global vocabulary of fn(x) * scale, x (N, V_local): a max and a sum all-reduce.

    Returned as (hi, lo), hi the rounded value and lo the rest (the ops' stat layout, docs/topk_kl.md):
    log-probs formed as (x - hi) - lo are as exact as eager's log_softmax."""
    acc = _acc(x)
    m = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for a in range(0, x.shape[0], rows_per_chunk):  # chunks bound the float32 temporaries
        m[a:a + rows_per_chunk] = (fn or _identity)(x[a:a + rows_per_chunk].to(acc)).amax(-1) * scale
    local_m = m.clone()
    dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
    s = torch.zeros_like(m)
    for a in range(0, x.shape[0], rows_per_chunk):
        sl = slice(a, a + rows_per_chunk)
        e = torch.exp((fn or _identity)(x[sl].to(acc)) * scale - m[sl, None])
        s[sl] = torch.where(torch.isfinite(m[sl]), e.sum(-1), 0.0)
    del local_m
    dist.all_reduce(s, group=group)
    exact = m.double() + torch.log(s.double())
    hi = torch.where(s > 0, exact, _NEG_INF).to(acc)
    lo = torch.where(s > 0, exact - hi.double(), 0.0).to(acc)
    return hi, lo


def _validate_ids(ids: torch.Tensor, vocab: int, drop: bool, pre: str):
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if not drop and bool(bad.any()):
        raise ValueError(f"{pre}teacher_indices out of range [0, {vocab}): found {int(ids[bad][0])} "
                         "(pass out_of_range='drop' to ignore ids outside the student vocabulary)")
    srt = ids.sort(-1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0) & (srt[:, 1:] < vocab)
    if bool(dup.any()):
        row, col = (int(i) for i in dup.nonzero()[0])
        raise ValueError(f"{pre}teacher_indices has a duplicate id within a row: row {row} repeats id {int(srt[row, col])}")


class VocabParallelCore:
    """The forward statistics and backward op of one chunk of rows, for one rank's vocabulary slice."""

    def __init__(self, options, start: int, vocab: int, group, pre: str, validate: bool):
        self.options, self.start, self.vocab, self.group, self.pre, self.validate = \
            options, start, vocab, group, pre, validate

    def fwd(self, z, values, ids, valid):
        mode, div, param, temperature, logprobs, drop, scale, cap = self.options
        inv_t = 1.0 / temperature
        acc = _acc(z)
        n, v_local = z.shape
        fmap = (lambda t: logit_map(t, scale, cap or None)) if scale != 1.0 or cap > 0 else _identity
        lse, lse_lo = _global_lse(z, inv_t, self.group, fn=fmap)
        loss = torch.zeros(n, dtype=acc, device=z.device)
        stat = torch.zeros(n, 4, dtype=acc, device=z.device)  # G, lse_lo, teacher lse (hi, lo)
        keep = valid if valid is not None else torch.ones(n, dtype=torch.bool, device=z.device)
        if mode == "dense":
            t_scale = 1.0 if logprobs else inv_t
            lse_t, lse_t_lo = _global_lse(values, t_scale, self.group)
            ok = keep & (lse_t > _NEG_INF)  # rows without teacher mass contribute 0 (docs/topk_kl.md)
            with torch.enable_grad():
                log_q = ((fmap(z[ok].to(acc)) * inv_t - lse[ok, None]) - lse_lo[ok, None]).requires_grad_()
                log_p = (values[ok].to(acc) * t_scale - lse_t[ok, None]) - lse_t_lo[ok, None]
                part = _DIVERGENCE_FNS[div](log_p, log_q, param)  # separable over v: a partial sum
                h, = torch.autograd.grad(part.sum(), log_q) if part.numel() else (torch.zeros_like(log_q),)
            loss[ok] = part.detach()
            stat[ok, 0] = h.sum(-1)
            dist.all_reduce(loss, group=self.group)
            dist.all_reduce(stat, group=self.group)
            stat[:, 1], stat[:, 2], stat[:, 3] = lse_lo, lse_t, lse_t_lo
            return loss, lse, values.new_zeros((n, 0), dtype=acc), stat, None
        if self.validate:
            _validate_ids(ids, self.vocab, drop, self.pre)
        local = ids.long() - self.start
        inside = (local >= 0) & (local < v_local)
        gathered = (fmap(z.gather(1, local.clamp(0, v_local - 1)).to(acc)) * inv_t - lse[:, None]) - lse_lo[:, None]
        log_q_s = torch.where(inside, gathered, _NEG_INF)
        dist.all_reduce(log_q_s, dist.ReduceOp.MAX, group=self.group)  # exactly one rank owns each id
        coef = torch.zeros_like(log_q_s)
        with torch.enable_grad():
            lq = log_q_s[keep].requires_grad_()
            rows = sparse_rows_ref(lq, values[keep].to(acc), "logprobs" if logprobs else "logits", mode, div,
                                   param, param, temperature)
            if rows.numel():
                coef[keep], = torch.autograd.grad(rows.sum(), lq)
        loss[keep] = rows.detach()
        stat[:, 0], stat[:, 1] = coef.sum(-1), lse_lo
        return loss, lse, coef, stat, torch.where(inside, local, -1)

    def bwd(self, grad_rows, z, values, local_ids, lse, coef, stat):
        mode, div, param, temperature, logprobs, _, scale, cap = self.options
        return _ops.lib.topk_kl_bwd(grad_rows, z, values, local_ids, lse, coef, stat, mode, div, param,
                                    temperature, logprobs, scale, cap)


class VocabParallelTopKKL(torch.autograd.Function):
    """Per-row losses of one rank's logits slice; the gradient is that slice of the global gradient."""

    @staticmethod
    def forward(ctx, z, values, ids, valid, core):
        loss, lse, coef, stat, local_ids = core.fwd(z, values, ids, valid)
        ctx.save_for_backward(z, values, local_ids, valid, lse, coef, stat)
        ctx.core = core
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        z, values, local_ids, valid, lse, coef, stat = ctx.saved_tensors
        if valid is not None:
            grad_rows = torch.where(valid, grad_rows, torch.zeros_like(grad_rows))
        return ctx.core.bwd(grad_rows, z, values, local_ids, lse, coef, stat), None, None, None, None


def _slice_of(group, v_local: int, vocab_start, vocab_size, device):
    if vocab_start is not None and vocab_size is not None:
        return int(vocab_start), int(vocab_size)
    sizes = torch.tensor([v_local], device=device)
    every = [torch.zeros_like(sizes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, sizes, group=group)
    every = [int(s) for s in every]
    rank = dist.get_rank(group)
    return sum(every[:rank]), sum(every)


def vocab_parallel_topk_kl_div(
    local_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: Optional[torch.Tensor] = None,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    values_are: str = "logits",
    mode: str = "renorm",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    labels: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items: Optional[Union[int, float, torch.Tensor]] = None,
    out_of_range: str = "error",
    validate: bool = True,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """topk_kl_div of the logits that the ranks of `group` hold in vocabulary slices, equal on every rank.

    local_logits (..., V_local) is this rank's slice starting at global id `vocab_start` of a
    vocabulary of `vocab_size` (both default to the ranks' slices laid end to end in rank order,
    found with one all_gather). teacher_indices are global ids; for mode='dense' teacher_values is
    this rank's slice of the dense teacher, like local_logits. Every rank must call it with the same
    rows. Other arguments: topk_kl_div's. Needs K <= V_local.
    """
    pre = "vocab_parallel_topk_kl_div"
    start, vocab = _slice_of(group, local_logits.shape[-1], vocab_start, vocab_size, local_logits.device)
    kw = dict(values_are=values_are, mode=mode, divergence=divergence, beta=beta, skew=skew, temperature=temperature,
              mask=mask, ignore_index=ignore_index, labels=labels, reduction=reduction, num_items=num_items,
              out_of_range=out_of_range, logit_scale=logit_scale, softcap=softcap)
    shape = local_logits.shape if mode == "dense" else tuple(local_logits.shape[:-1]) + (vocab,)
    x = _topk_prepare(pre, shape, local_logits.device, teacher_values, teacher_indices, **kw)
    _require_backend(local_logits, pre)
    core = VocabParallelCore(x.options, start, vocab, group, f"kdkernels.{pre}: ", validate)
    z = local_logits.reshape(-1, local_logits.shape[-1])
    rows = VocabParallelTopKKL.apply(z, x.values, x.ids, x.valid, core)
    return _reduce(pre, _t2(rows, temperature, scale_by_t2), x.valid, x.lead, reduction, num_items)


def vocab_parallel_linear_topk_kl_div(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: Optional[torch.Tensor] = None,
    *,
    local_bias: Optional[torch.Tensor] = None,
    group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    **kwargs,
) -> torch.Tensor:
    """linear_topk_kl_div with the lm_head split over the vocabulary: local_weight (V_local, H).

    hidden (..., H) is the same on every rank (as after a tensor-parallel all-gather); its gradient is
    all-reduced over the group, the weight's (and bias's) gradient is this rank's slice.
    """
    pre = "vocab_parallel_linear_topk_kl_div"
    start, vocab = _slice_of(group, local_weight.shape[0], vocab_start, vocab_size, hidden.device)
    mode = kwargs.get("mode", "renorm")
    validate = kwargs.pop("validate", True)
    for name in ("valid_vocab", "teacher_vocab"):  # the local slices would need the global cut: not supported
        if kwargs.get(name) is not None:
            raise ValueError(f"kdkernels.{pre}: {name} is not supported on vocab-parallel heads (slice the "
                             "sharded table so its padding is excluded)")

    def core_for(options):
        return VocabParallelCore(options, start, vocab, group, f"kdkernels.{pre}: ", validate)

    shape_vocab = local_weight.shape[0] if mode == "dense" else vocab
    if chunk_size is None:  # from the global vocabulary, so every rank walks the same chunks (collectives match)
        rows = hidden[..., 0].numel() if hidden.dim() else 0
        chunk_size = chunk_rows(rows, vocab, hidden.dtype, memory_budget)
    return _run_linear(pre, hidden, local_weight, local_bias, teacher_values, teacher_indices, chunk_size,
                       memory_budget, kwargs, shape_vocab, core_for, lambda g: dist.all_reduce(g, group=group))
