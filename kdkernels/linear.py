"""Fused linear + top-k KL: the student's logits are made chunk by chunk and never all held at once."""
from typing import Optional, Union

import torch

from . import _ops
from .functional import _require_backend, _shape, _t2, _topk_prepare

# Default bytes for one chunk's logits and their gradient (2 x rows x V elements): small enough that
# the chunk is a fraction of the (N, H) / (V, H) tensors the step holds anyway, large enough that each
# chunk's GEMM still runs at full rate.
DEFAULT_MEMORY_BUDGET = 128 * 2**20


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, memory_budget: Optional[int] = None) -> int:
    """Rows per chunk so that one chunk's logits and logits-gradient fit in memory_budget bytes."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    per_row = 2 * vocab * torch.empty((), dtype=dtype).element_size()
    return max(1, min(max(n_rows, 1), budget // per_row))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


class LocalCore:
    """The fused top-k KL ops on one chunk of rows (the vocab-parallel twin lives in kdkernels.parallel)."""

    def __init__(self, options, validate: bool):
        self.options, self.validate = options, validate

    def fwd(self, z, values, ids, valid):
        loss, lse, coef, stat = _ops.lib.topk_kl_fwd(z, values, ids, valid, *self.options, self.validate)
        return loss, lse, coef, stat, ids

    def bwd(self, grad_rows, z, values, ids, lse, coef, stat):
        return _ops.lib.topk_kl_bwd(grad_rows, z, values, ids, lse, coef, stat, *self.options[:5])


class _Grads:
    """Gradients of hidden / weight / bias accumulated chunk by chunk from each chunk's logits gradient."""

    def __init__(self, hidden, weight, bias, needs):
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        # Accumulated in the weight's dtype, chunk after chunk, as an unfused step's GEMM would write it.
        self.weight = torch.zeros_like(weight) if needs[1] else None
        self.acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.bias = torch.zeros(weight.shape[0], dtype=self.acc, device=weight.device) \
            if needs[2] and bias is not None else None

    def add(self, a, b, g, h, weight):
        if self.hidden is not None:
            torch.mm(g, weight, out=self.hidden[a:b])
        if self.weight is not None:
            self.weight.addmm_(g.t(), h)
        if self.bias is not None:
            self.bias += g.sum(0, dtype=self.acc)


def _sl(t, a, b):
    return None if t is None else t[a:b]


class LinearTopKKL(torch.autograd.Function):
    """sum_n w_n * KL_n(hidden_n @ W^T + b) for a per-row weight w (the reduction's d loss / d row).

    With w known in the forward (every scalar reduction), each chunk's gradient is formed right after
    its loss and pushed through the linear layer at once (as Liger-Kernel's fused linear losses do), so
    the backward only scales by the upstream scalar: the same GEMMs as the unfused path, no logits kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, ids, valid, row_weight, core, chunk, needs, reduce_hidden):
        # needs: which of hidden/weight/bias want a gradient, decided by the caller (grad mode is off in here)
        grads = _Grads(hidden, weight, bias, needs)
        total = torch.zeros((), dtype=row_weight.dtype, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            b = min(hidden.shape[0], a + chunk)
            h = hidden[a:b]
            z = _logits(h, weight, bias)
            v_c, ids_c = values[a:b], _sl(ids, a, b)
            loss, lse, coef, stat, ids_k = core.fwd(z, v_c, ids_c, _sl(valid, a, b))
            w = row_weight[a:b]
            total += (loss * w).sum()
            if any(needs):
                grads.add(a, b, core.bwd(w, z, v_c, ids_k, lse, coef, stat), h, weight)
            del z
        if grads.hidden is not None and reduce_hidden is not None:
            reduce_hidden(grads.hidden)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        g_hidden, g_weight, g_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad_total.to(g.dtype) for g in (g_hidden, g_weight, g_bias)]
        if scaled[2] is not None:
            scaled[2] = scaled[2].to(ctx.bias_dtype)
        return (*scaled, None, None, None, None, None, None, None, None)


class LinearTopKKLRows(torch.autograd.Function):
    """Per-row losses (reduction='none'): the backward recomputes each chunk's logits from the saved
    row statistics and the upstream per-row gradient (one extra logits GEMM, no logits kept)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, ids, valid, core, chunk, reduce_hidden):
        parts = []
        for a in range(0, hidden.shape[0], chunk):
            b = min(hidden.shape[0], a + chunk)
            z = _logits(hidden[a:b], weight, bias)
            parts.append(core.fwd(z, values[a:b], _sl(ids, a, b), _sl(valid, a, b)))
            del z
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        empty = [hidden.new_zeros(s, dtype=acc) for s in ((0,), (0,), (0, values.shape[1]), (0, 4))]
        loss, lse, coef, stat = (torch.cat([p[i] for p in parts]) if parts else empty[i] for i in range(4))
        ids_k = torch.cat([p[4] for p in parts]) if parts and parts[0][4] is not None else ids
        ctx.save_for_backward(hidden, weight, bias, values, ids_k, valid, lse, coef, stat)
        ctx.core, ctx.chunk, ctx.reduce_hidden = core, chunk, reduce_hidden
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, values, ids, valid, lse, coef, stat = ctx.saved_tensors
        if valid is not None:
            grad_rows = torch.where(valid, grad_rows, torch.zeros_like(grad_rows))
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        for a in range(0, hidden.shape[0], ctx.chunk):
            b = min(hidden.shape[0], a + ctx.chunk)
            h = hidden[a:b]
            z = _logits(h, weight, bias)
            g = ctx.core.bwd(grad_rows[a:b], z, values[a:b], _sl(ids, a, b), lse[a:b], coef[a:b], stat[a:b])
            grads.add(a, b, g, h, weight)
        if grads.hidden is not None and ctx.reduce_hidden is not None:
            ctx.reduce_hidden(grads.hidden)
        return (grads.hidden, grads.weight, None if grads.bias is None else grads.bias.to(bias.dtype),
                None, None, None, None, None, None)


def _run_linear(op, hidden, weight, bias, teacher_values, teacher_indices, chunk_size, memory_budget, kwargs,
                vocab, core_for, reduce_hidden=None):
    """Shared body of the fused linear losses: checks, the reduction's row weights, the chunked Function."""
    pre = f"kdkernels.{op}: "
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{pre}weight must have shape (V, H) with H = hidden.shape[-1] = "
                         f"{hidden.shape[-1] if hidden.dim() else None}: got {_shape(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{pre}weight must match hidden's dtype and device: expected {hidden.dtype} on "
                         f"{hidden.device}, got {weight.dtype} on {weight.device}")
    V = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (V,) or bias.dtype != hidden.dtype):
        raise ValueError(f"{pre}bias must have shape ({V},) and dtype {hidden.dtype}: got "
                         f"{_shape(bias.shape)} {bias.dtype}")
    if chunk_size is not None and not chunk_size >= 1:
        raise ValueError(f"{pre}chunk_size must be >= 1: got {chunk_size}")
    kw = dict(kwargs)
    temperature = kw.get("temperature", 1.0)
    scale_by_t2 = kw.pop("scale_by_t2", True)
    reduction, num_items = kw.get("reduction", "mean"), kw.get("num_items")
    for name, default in (("values_are", "logits"), ("mode", "renorm"), ("divergence", "forward_kl"), ("beta", 0.5),
                          ("skew", 0.1), ("temperature", 1.0), ("mask", None), ("ignore_index", -100),
                          ("labels", None), ("reduction", "mean"), ("num_items", None), ("out_of_range", "error")):
        kw.setdefault(name, default)
    x = _topk_prepare(op, tuple(hidden.shape[:-1]) + (vocab,), hidden.device, teacher_values, teacher_indices, **kw)
    _require_backend(hidden, op)
    core = core_for(x.options)
    h = hidden.reshape(-1, hidden.shape[-1])
    n = h.shape[0]
    chunk = int(chunk_size) if chunk_size is not None else chunk_rows(n, vocab, hidden.dtype, memory_budget)
    if reduction == "none":
        rows = LinearTopKKLRows.apply(h, weight, bias, x.values, x.ids, x.valid, core, chunk, reduce_hidden)
        return _t2(rows, temperature, scale_by_t2).reshape(x.lead)
    # d loss / d row of the scalar reduction, known before any logits exist.
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    t2 = float(temperature) ** 2 if scale_by_t2 and temperature != 1.0 else 1.0
    w = torch.full((n,), t2, dtype=acc, device=hidden.device)
    if x.valid is not None:
        w = w * x.valid
    if num_items is not None:
        w = w / num_items
    elif reduction == "mean":
        count = x.valid.sum() if x.valid is not None else torch.tensor(n, device=hidden.device)
        w = w / count.clamp(min=1).to(acc)
    needs = tuple(t is not None and t.requires_grad and torch.is_grad_enabled() for t in (hidden, weight, bias))
    return LinearTopKKL.apply(h, weight, bias, x.values, x.ids, x.valid, w, core, chunk, needs, reduce_hidden)


def linear_topk_kl_div(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    validate: bool = True,
    **kwargs,
) -> torch.Tensor:
    """topk_kl_div(hidden @ weight.T + bias, ...) without ever holding the (..., V) logits.

    hidden (..., H), weight (V, H) (an lm_head's weight), bias (V,) or None. Rows are processed in
    chunks of `chunk_size` (default: as many as fit `memory_budget` bytes of logits plus their
    gradient, 128 MiB). Every keyword of topk_kl_div is accepted (values_are, mode, divergence, beta,
    skew, temperature, scale_by_t2, mask, ignore_index, labels, reduction, num_items, out_of_range).
    Scalar reductions compute the gradients of hidden/weight/bias during the forward (the backward
    only scales them); reduction='none' recomputes each chunk's logits in the backward instead.
    """
    allowed = {"values_are", "mode", "divergence", "beta", "skew", "temperature", "scale_by_t2", "mask",
               "ignore_index", "labels", "reduction", "num_items", "out_of_range"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"kdkernels.linear_topk_kl_div: unexpected keyword argument(s): {', '.join(unknown)}")
    return _run_linear("linear_topk_kl_div", hidden, weight, bias, teacher_values, teacher_indices, chunk_size,
                       memory_budget, kwargs, weight.shape[0] if weight.dim() == 2 else 0,
                       lambda options: LocalCore(options, validate))


class LinearTopKKLDivLoss(torch.nn.Module):
    """Wraps a model's lm_head: `loss = LinearTopKKLDivLoss(model.lm_head, mode='tail')(hidden, vals, ids)`.

    The head's weight (and bias) are used directly, so its gradients land in the head's parameters.
    """

    def __init__(self, lm_head: torch.nn.Linear, **kwargs):
        super().__init__()
        self.lm_head = lm_head
        self.kwargs = kwargs

    def forward(self, hidden, teacher_values, teacher_indices=None, **overrides):
        return linear_topk_kl_div(hidden, self.lm_head.weight, teacher_values, teacher_indices,
                                  bias=self.lm_head.bias, **{**self.kwargs, **overrides})
