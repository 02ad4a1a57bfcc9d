"""Fused linear + top-k KL: the student's logits are made chunk by chunk and never all held at once."""
from typing import Optional, Union

import torch

from . import _ops
from .functional import _align_vocab, _logit_map_deriv, _require_backend, _shape, _t2, _topk_prepare, logit_map

# Default bytes for one chunk's logits and their gradient (2 x rows x V elements): small enough that
# the chunk is a fraction of the (N, H) / (V, H) tensors the step holds anyway, large enough that each
# chunk's GEMM still runs at full rate.
DEFAULT_MEMORY_BUDGET = 128 * 2**20


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, memory_budget: Optional[int] = None) -> int:
    """Rows per chunk so that one chunk's logits and logits-gradient fit in memory_budget bytes."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    per_row = 2 * vocab * torch.empty((), dtype=dtype).element_size()
    return max(1, min(max(n_rows, 1), budget // per_row))


class _Head:
    """The lm_head of one call. Each chunk's logits come out in float32 (float64 for float64 inputs): 16-bit
    operands are multiplied with float32 accumulation and the logits are never rounded to bf16/fp16 before
    the loss (Liger-Kernel #1432: that rounding alone gives 4-23% gradient error). On CUDA the GEMMs read
    the 16-bit operands and write float32 (`torch.mm(..., out_dtype=)`); the CPU has no such GEMM, so there
    the weight is widened once per call (one (V, H) float32 copy)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight = weight
        self.acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        narrow = weight.dtype != self.acc
        self.mixed = narrow and weight.is_cuda
        self.wide = weight.to(self.acc) if narrow and not self.mixed else weight
        self.bias = None if bias is None else bias.to(self.acc)

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b in the accumulation dtype, b a view of the weight (16-bit on CUDA: a is rounded to it)."""
        if self.mixed:
            return torch.mm(a.to(b.dtype), b, out_dtype=self.acc)
        return torch.mm(a.to(self.acc), b)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = self._mm(h, (self.weight if self.mixed else self.wide).t())
        return z.add_(self.bias) if self.bias is not None else z

    def grad_hidden(self, g: torch.Tensor) -> torch.Tensor:
        return self._mm(g, self.weight if self.mixed else self.wide)

    def grad_weight(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.mixed:
            return torch.mm(g.t().to(h.dtype), h, out_dtype=self.acc)
        return torch.mm(g.t(), h.to(self.acc))


class LocalCore:
    """The fused top-k KL ops on one chunk of rows (the vocab-parallel twin lives in kdkernels.parallel)."""

    def __init__(self, options, validate: bool):
        self.options, self.validate = options, validate

    def fwd(self, z, values, ids, valid):
        o = self.options
        loss, lse, coef, stat = _ops.lib.topk_kl_fwd(z, values, ids, valid, *o[:6], self.validate, *o[6:])
        return loss, lse, coef, stat, ids

    def bwd(self, grad_rows, z, values, ids, lse, coef, stat):
        return _ops.lib.topk_kl_bwd(grad_rows, z, values, ids, lse, coef, stat, *self.options[:5], *self.options[6:])


class _Grads:
    """Gradients of hidden / weight / bias accumulated chunk by chunk from each chunk's logits gradient, in
    `accum` (default float32, float64 for float64) across chunks and cast to the parameters' dtypes once at
    the end. Each chunk's own contribution is always formed in the head's float32 (or float64)."""

    def __init__(self, hidden, weight, bias, needs, head: _Head, accum: Optional[torch.dtype] = None):
        self.head = head
        acc = self.accum = head.acc if accum is None else accum
        self.hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if needs[0] else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) \
            if needs[2] and bias is not None else None
        self.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)

    def add(self, a, b, g, h):
        head = self.head
        same = self.accum == head.acc and not head.mixed
        if self.hidden is not None:
            if same:  # written in place: no chunk-sized temporary
                torch.mm(g, head.wide, out=self.hidden[a:b])
            else:
                self.hidden[a:b] = head.grad_hidden(g)
        if self.weight is not None:
            if same:
                self.weight.addmm_(g.t(), h.to(head.acc))
            else:  # formed in the head's dtype, then added (rounded once into a narrower accumulator)
                self.weight += head.grad_weight(g, h)
        if self.bias is not None:
            self.bias += g.sum(0, dtype=self.bias.dtype)

    def final(self):
        """(hidden, weight, bias) gradients in the parameters' dtypes (one cast each)."""
        return tuple(None if g is None else g.to(dt) for g, dt in zip((self.hidden, self.weight, self.bias), self.dtypes))


def _sl(t, a, b):
    return None if t is None else t[a:b]


class LinearTopKKL(torch.autograd.Function):
    """sum_n w_n * KL_n(hidden_n @ W^T + b) for a per-row weight w (the reduction's d loss / d row).

    With w known in the forward (every scalar reduction), each chunk's gradient is formed right after
    its loss and pushed through the linear layer at once (as Liger-Kernel's fused linear losses do), so
    the backward only scales by the upstream scalar: the same GEMMs as the unfused path, no logits kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, ids, valid, row_weight, core, chunk, needs, reduce_hidden,
                extra=None, accum=None):
        # needs: which of hidden/weight/bias want a gradient, decided by the caller (grad mode is off in here).
        # extra: a _CrossEntropy adding the hard-label term and collecting metrics from the same chunks.
        head = _Head(weight, bias)
        grads = _Grads(hidden, weight, bias, needs, head, accum)
        total = torch.zeros((), dtype=row_weight.dtype, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            b = min(hidden.shape[0], a + chunk)
            h = hidden[a:b]
            z = head.logits(h)
            v_c, ids_c = values[a:b], _sl(ids, a, b)
            loss, lse, coef, stat, ids_k = core.fwd(z, v_c, ids_c, _sl(valid, a, b))
            w = row_weight[a:b]
            total += (loss * w).sum()
            g = core.bwd(w, z, v_c, ids_k, lse, coef, stat) if any(needs) else None
            if extra is not None:
                total += extra.chunk(a, b, z, g, v_c, ids_k, lse, stat, loss)
            if g is not None:
                grads.add(a, b, g, h)
            del z, g
        if grads.hidden is not None and reduce_hidden is not None:
            reduce_hidden(grads.hidden)
        # Kept in float32 until the upstream scalar is known: scaled, then cast once.
        ctx.dtypes = grads.dtypes
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        out = [None if g is None else (g * grad_total.to(g.dtype)).to(dt)
               for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*out, None, None, None, None, None, None, None, None, None, None)


class LinearTopKKLRows(torch.autograd.Function):
    """Per-row losses (reduction='none'): the backward recomputes each chunk's logits from the saved
    row statistics and the upstream per-row gradient (one extra logits GEMM, no logits kept)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, ids, valid, core, chunk, reduce_hidden, accum=None):
        parts = []
        head = _Head(weight, bias)
        for a in range(0, hidden.shape[0], chunk):
            b = min(hidden.shape[0], a + chunk)
            z = head.logits(hidden[a:b])
            parts.append(core.fwd(z, values[a:b], _sl(ids, a, b), _sl(valid, a, b)))
            del z
        acc = head.acc
        empty = [hidden.new_zeros(s, dtype=acc) for s in ((0,), (0,), (0, values.shape[1]), (0, 4))]
        loss, lse, coef, stat = (torch.cat([p[i] for p in parts]) if parts else empty[i] for i in range(4))
        ids_k = torch.cat([p[4] for p in parts]) if parts and parts[0][4] is not None else ids
        ctx.save_for_backward(hidden, weight, bias, values, ids_k, valid, lse, coef, stat)
        ctx.core, ctx.chunk, ctx.reduce_hidden, ctx.accum = core, chunk, reduce_hidden, accum
        return loss

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_rows):
        hidden, weight, bias, values, ids, valid, lse, coef, stat = ctx.saved_tensors
        if valid is not None:
            grad_rows = torch.where(valid, grad_rows, torch.zeros_like(grad_rows))
        head = _Head(weight, bias)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3], head, ctx.accum)
        for a in range(0, hidden.shape[0], ctx.chunk):
            b = min(hidden.shape[0], a + ctx.chunk)
            h = hidden[a:b]
            z = head.logits(h)
            g = ctx.core.bwd(grad_rows[a:b], z, values[a:b], _sl(ids, a, b), lse[a:b], coef[a:b], stat[a:b])
            grads.add(a, b, g, h)
        if grads.hidden is not None and ctx.reduce_hidden is not None:
            ctx.reduce_hidden(grads.hidden)
        return (*grads.final(), None, None, None, None, None, None, None)


class _CrossEntropy:
    """The hard-label cross-entropy and the distillation metrics, from the fused loss's own chunks.

    CE is one more sparse target of the same float32 logits: its gradient w (softmax(z) - onehot(y)) is
    added to the chunk's logits gradient before the two GEMMs, so there is no second GEMM and no second
    (N, V) tensor. Metrics (detached, means over the rows the KD term counts): teacher_topk_mass (sum of
    exp(values) over the ids; 'logprobs' only), student_topk_mass (the student's probability at T on the
    teacher's ids), top1_agreement (student argmax == teacher's top-1 id), ce and kd (the unweighted terms).
    """

    def __init__(self, labels, ce_row_weight, valid, x, vocab, t2):
        self.labels, self.w, self.valid, self.vocab, self.t2 = labels, ce_row_weight, valid, vocab, t2
        mode, _, _, temperature, logprobs = x.options[:5]
        self.logit_map = x.options[6:]
        self.mode, self.logprobs, self.inv_t = mode, logprobs, 1.0 / temperature
        self.sums = dict(ce=0.0, kd=0.0, teacher_topk_mass=0.0, student_topk_mass=0.0, top1_agreement=0.0)
        self.ce_sum, self.ce_count, self.rows = 0.0, 0, 0

    def chunk(self, a, b, z, g, values, ids, lse, stat, kd_rows):
        scale, cap = self.logit_map
        raw = z
        if scale != 1.0 or cap > 0:  # the model's logits, and the chain rule's factor (chunk temporaries)
            z = logit_map(raw, scale, cap or None)
        y = self.labels[a:b]
        ok = y >= 0
        yc = y.clamp(0, self.vocab - 1)[:, None]
        # log-sum-exp at T = 1: the KD op's own (hi + lo) when the KD temperature is 1, else one more read.
        lse1 = lse + stat[:, 1] if self.inv_t == 1.0 else torch.logsumexp(z, -1)
        ce = torch.where(ok, lse1 - z.gather(1, yc).squeeze(1), 0.0)
        self.ce_sum += float(ce.sum())
        self.ce_count += int(ok.sum())
        self._metrics(a, b, z, values, ids, lse, stat, kd_rows)
        wc = self.w[a:b]
        if g is not None:  # + w (softmax(z) - onehot(y)), one chunk-sized temporary
            ce_g = torch.sub(z, lse1[:, None]).exp_().mul_(wc[:, None])
            ce_g.scatter_add_(1, yc, -wc[:, None].to(g.dtype))
            g.add_(ce_g.mul_(_logit_map_deriv(raw, scale, cap or None)) if z is not raw else ce_g)
        return (ce * wc).sum()

    def _metrics(self, a, b, z, values, ids, lse, stat, kd_rows):
        keep = self.valid[a:b] if self.valid is not None else torch.ones(b - a, dtype=torch.bool, device=z.device)
        self.rows += int(keep.sum())
        s = self.sums
        s["kd"] += float((kd_rows * keep).sum()) * self.t2
        top1 = z.argmax(-1)
        if self.mode == "dense":
            s["top1_agreement"] += float(((top1 == values.argmax(-1)) & keep).sum())
            s["teacher_topk_mass"] += float(keep.sum())
            s["student_topk_mass"] += float(keep.sum())
            return
        present = (ids >= 0) & (ids < self.vocab)
        idc = ids.long().clamp(0, self.vocab - 1)
        lq = (z.gather(1, idc) * self.inv_t - lse[:, None]) - stat[:, 1:2]
        s["student_topk_mass"] += float((torch.where(present, lq.exp(), 0.0).sum(-1) * keep).sum())
        if self.logprobs:
            s["teacher_topk_mass"] += float((torch.where(present, values.exp(), 0.0).sum(-1) * keep).sum())
        best = idc.gather(1, torch.where(present, values, float("-inf")).argmax(-1, keepdim=True)).squeeze(1)
        s["top1_agreement"] += float(((top1 == best) & keep).sum())

    def metrics(self):
        out = {k: v / max(self.rows, 1) for k, v in self.sums.items() if k != "ce"}
        if not self.logprobs and self.mode != "dense":
            del out["teacher_topk_mass"]  # raw teacher logits carry no full-vocabulary mass
        out["ce"] = self.ce_sum / max(self.ce_count, 1)
        out["tokens"], out["kd_rows"] = float(self.ce_count), float(self.rows)  # what the means are over
        return out


def _accum_dtype(pre: str, accum, dtype: torch.dtype) -> Optional[torch.dtype]:
    """accum_dtype: float32 / float64, or the parameters' own dtype (None: float32, float64 for float64)."""
    if accum is None:
        return None
    allowed = {torch.float32, torch.float64, dtype}
    if accum not in allowed:
        names = ", ".join(sorted(str(d) for d in allowed))
        raise ValueError(f"{pre}accum_dtype must be one of {names} (or None for the default): got {accum}")
    return accum


def _run_linear(op, hidden, weight, bias, teacher_values, teacher_indices, chunk_size, memory_budget, kwargs,
                vocab, core_for, reduce_hidden=None, extra_for=None, kd_scale=1.0):
    """Shared body of the fused linear losses: checks, the reduction's row weights, the chunked Function."""
    pre = f"kdkernels.{op}: "
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{pre}weight must have shape (V, H) with H = hidden.shape[-1] = "
                         f"{hidden.shape[-1] if hidden.dim() else None}: got {_shape(weight.shape)}")
    amp = torch.is_autocast_enabled(hidden.device.type) if hidden.dim() else False
    if amp and weight.device == hidden.device and weight.dtype != hidden.dtype and \
            hidden.is_floating_point() and weight.is_floating_point():
        # Under autocast a bf16 hidden state meets the float32 head: compute the loss at the wider dtype
        # (autocast itself runs losses and softmaxes in float32); autograd casts each gradient back.
        wide = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(wide), weight.to(wide)
        bias = None if bias is None else bias.to(wide)
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
    teacher_vocab = kw.pop("teacher_vocab", None)
    vocab, teacher_values = _align_vocab(op, vocab, teacher_values, kw.get("mode", "renorm"),
                                         kw.pop("valid_vocab", None), teacher_vocab)
    if kw.get("mode", "renorm") != "dense" and teacher_vocab == "truncate":  # as in topk_kl_div
        kw["out_of_range"] = "drop"
    weight = weight[:vocab]  # valid_vocab: the padded rows of the head take no part (and get no gradient)
    bias = None if bias is None else bias[:vocab]
    accum = _accum_dtype(pre, kw.pop("accum_dtype", None), hidden.dtype)
    temperature = kw.get("temperature", 1.0)
    scale_by_t2 = kw.pop("scale_by_t2", True)
    reduction, num_items = kw.get("reduction", "mean"), kw.get("num_items")
    for name, default in (("values_are", "logits"), ("mode", "renorm"), ("divergence", "forward_kl"), ("beta", 0.5),
                          ("skew", 0.1), ("temperature", 1.0), ("mask", None), ("ignore_index", -100),
                          ("labels", None), ("reduction", "mean"), ("num_items", None), ("out_of_range", "error"),
                          ("logit_scale", 1.0), ("softcap", None)):
        kw.setdefault(name, default)
    x = _topk_prepare(op, tuple(hidden.shape[:-1]) + (vocab,), hidden.device, teacher_values, teacher_indices, **kw)
    _require_backend(hidden, op)
    core = core_for(x.options)
    h = hidden.reshape(-1, hidden.shape[-1])
    n = h.shape[0]
    chunk = int(chunk_size) if chunk_size is not None else chunk_rows(n, vocab, hidden.dtype, memory_budget)
    if reduction == "none":
        with torch.autocast(hidden.device.type, enabled=False):  # the head and loss run in their own dtypes
            rows = LinearTopKKLRows.apply(h, weight, bias, x.values, x.ids, x.valid, core, chunk, reduce_hidden,
                                          accum)
        return _t2(rows, temperature, scale_by_t2).reshape(x.lead)
    # d loss / d row of the scalar reduction, known before any logits exist.
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    t2 = float(temperature) ** 2 if scale_by_t2 and temperature != 1.0 else 1.0
    w = torch.full((n,), t2 * float(kd_scale), dtype=acc, device=hidden.device)
    if x.valid is not None:
        w = w * x.valid
    if num_items is not None:
        w = w / num_items
    elif reduction == "mean":
        count = x.valid.sum() if x.valid is not None else torch.tensor(n, device=hidden.device)
        w = w / count.clamp(min=1).to(acc)
    needs = tuple(t is not None and t.requires_grad and torch.is_grad_enabled() for t in (hidden, weight, bias))
    extra = extra_for(x, n, acc) if extra_for is not None else None
    with torch.autocast(hidden.device.type, enabled=False):  # the head and loss run in their own dtypes
        total = LinearTopKKL.apply(h, weight, bias, x.values, x.ids, x.valid, w, core, chunk, needs, reduce_hidden,
                                   extra, accum)
    return total if extra is None else (total, extra)


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
    skew, temperature, scale_by_t2, mask, ignore_index, labels, reduction, num_items, out_of_range,
    valid_vocab, teacher_vocab, logit_scale, softcap). accum_dtype: the dtype the hidden / weight / bias
    gradients are summed in across chunks (default float32, float64 for float64 inputs; float64, or the
    parameters' own 16-bit dtype to halve the (V, H) accumulator, are the alternatives); each chunk's
    contribution is formed in float32 whatever it is, and the sum is cast to the parameters' dtype once.
    Scalar reductions compute the gradients of hidden/weight/bias during the forward (the backward
    only scales them); reduction='none' recomputes each chunk's logits in the backward instead.
    """
    allowed = {"values_are", "mode", "divergence", "beta", "skew", "temperature", "scale_by_t2", "mask",
               "ignore_index", "labels", "reduction", "num_items", "out_of_range", "valid_vocab", "teacher_vocab",
               "logit_scale", "softcap", "accum_dtype"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"kdkernels.linear_topk_kl_div: unexpected keyword argument(s): {', '.join(unknown)}")
    return _run_linear("linear_topk_kl_div", hidden, weight, bias, teacher_values, teacher_indices, chunk_size,
                       memory_budget, kwargs, weight.shape[0] if weight.dim() == 2 else 0,
                       lambda options: LocalCore(options, validate))


def linear_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    validate: bool = True,
    **kwargs,
):
    """ce_weight * CE(hidden @ W^T + b, labels) + kd_weight * KD, from one chunked pass over the lm_head.

    KD is linear_topk_kl_div with the same keywords (mode, divergence, temperature, values_are, ...; rows
    whose label is ignore_index count in neither term). CE is the mean cross-entropy at T = 1 over the
    labelled rows (sum / num_items when num_items is given, the HF convention under gradient
    accumulation). The hard label is one more sparse target of the same float32 chunk logits: no second
    GEMM and never more than one chunk of logits. Returns (loss, metrics): metrics is a dict of floats
    (ce, kd, teacher_topk_mass, student_topk_mass, top1_agreement; docs/linear_parallel.md).
    """
    pre = "kdkernels.linear_distill_loss: "
    allowed = {"values_are", "mode", "divergence", "beta", "skew", "temperature", "scale_by_t2", "mask",
               "ignore_index", "reduction", "num_items", "out_of_range", "valid_vocab", "teacher_vocab",
               "logit_scale", "softcap", "accum_dtype"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{pre}unexpected keyword argument(s): {', '.join(unknown)}")
    if kwargs.get("reduction", "mean") != "mean":
        raise ValueError(f"{pre}reduction must be 'mean' (use num_items for a sum / n): got {kwargs['reduction']!r}")
    vocab = kwargs.get("valid_vocab") or (weight.shape[0] if weight.dim() == 2 else 0)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64) or \
            tuple(labels.shape) != tuple(hidden.shape[:-1]):
        got = f"{labels.dtype} {_shape(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{pre}labels must be an integer tensor of hidden's leading shape "
                         f"{_shape(hidden.shape[:-1])}: got {got}")
    ignore = kwargs.get("ignore_index", -100)
    flat = labels.reshape(-1).to(hidden.device)
    used = flat != ignore
    if validate and bool(((flat[used] < 0) | (flat[used] >= vocab)).any()):
        bad = int(flat[used & ((flat < 0) | (flat >= vocab))][0])
        raise ValueError(f"{pre}labels out of range [0, {vocab}) (or ignore_index = {ignore}): found {bad}")
    num_items = kwargs.get("num_items")
    temperature = kwargs.get("temperature", 1.0)
    t2 = float(temperature) ** 2 if kwargs.get("scale_by_t2", True) and temperature != 1.0 else 1.0
    kw = dict(kwargs, labels=labels)

    def extra_for(x, n, acc):
        y = torch.where(used, flat.long(), -1)
        denom = float(num_items) if num_items is not None else max(int(used.sum()), 1)
        w = torch.where(used, ce_weight / denom, 0.0).to(acc)
        return _CrossEntropy(y, w, x.valid, x, vocab, t2)

    total, extra = _run_linear("linear_distill_loss", hidden, weight, bias, teacher_values, teacher_indices,
                               chunk_size, memory_budget, kw, vocab, lambda options: LocalCore(options, validate),
                               extra_for=extra_for, kd_scale=kd_weight)
    return total, extra.metrics()


@torch.no_grad()
def linear_teacher_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    values_are: str = "logprobs",
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
):
    """teacher_topk(hidden @ weight.T + bias, k, temperature) from the teacher's last hidden state, a chunk
    of rows at a time: the teacher's (N, V) float32 logits never exist at once (ModelOpt #2334: 30 GiB per
    tensor at seq 32768, V = 248k). Logits are made in float32 from 16-bit operands (as in
    linear_topk_kl_div) and go through the teacher's final-logit map (logit_scale, softcap) first.
    Returns (values (..., k) float32, ids (..., k) int64); values are log-probs at `temperature` over the
    full vocabulary ('logprobs') or the mapped raw logits ('logits')."""
    pre = "kdkernels.linear_teacher_topk: "
    if values_are not in ("logits", "logprobs"):
        raise ValueError(f"{pre}values_are must be 'logits' or 'logprobs': got {values_are!r}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{pre}weight must have shape (V, H) with H = hidden.shape[-1]: got {_shape(weight.shape)}")
    V = weight.shape[0]
    if not 1 <= int(k) <= V:
        raise ValueError(f"{pre}k must be in [1, V = {V}]: got {k}")
    if not temperature > 0:
        raise ValueError(f"{pre}temperature must be > 0: got {temperature}")
    h = hidden.reshape(-1, hidden.shape[-1])
    n = h.shape[0]
    head = _Head(weight, bias)
    chunk = int(chunk_size) if chunk_size is not None else chunk_rows(n, V, torch.float32, memory_budget)
    vals = torch.empty(n, int(k), dtype=head.acc, device=h.device)
    ids = torch.empty(n, int(k), dtype=torch.int64, device=h.device)
    with torch.autocast(h.device.type, enabled=False):  # float32 logits under autocast too
        for a in range(0, n, chunk):
            z = logit_map(head.logits(h[a:a + chunk]), logit_scale, softcap)
            top, idx = z.topk(int(k), dim=-1)
            if values_are == "logprobs":
                top = top / temperature - torch.logsumexp(z / temperature, -1, keepdim=True)
            vals[a:a + chunk], ids[a:a + chunk] = top, idx
            del z
    lead = tuple(hidden.shape[:-1])
    return vals.reshape(*lead, int(k)), ids.reshape(*lead, int(k))


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


class LinearDistillLoss(torch.nn.Module):
    """Wraps a model's lm_head: `loss, metrics = LinearDistillLoss(model.lm_head, values_are='logprobs')(hidden,
    labels, vals, ids)`, the fused CE + KD of linear_distill_loss with the head's weight (and bias).

    Because the loss is this module's forward, data-parallel wrappers treat the head as they treat any module:
    under FSDP2 (`fully_shard(loss_module)`, before the model's own `fully_shard`) the weight is gathered
    once per call and its gradient reduce-scattered; under DDP the gradient is all-reduced. Tested with 2 and
    4 gloo processes against one process (tests/test_dist_fused.py).
    """

    def __init__(self, lm_head: torch.nn.Linear, **kwargs):
        super().__init__()
        self.lm_head = lm_head
        self.kwargs = kwargs

    def forward(self, hidden, labels, teacher_values, teacher_indices=None, **overrides):
        return linear_distill_loss(hidden, self.lm_head.weight, labels, teacher_values, teacher_indices,
                                   bias=self.lm_head.bias, **{**self.kwargs, **overrides})
