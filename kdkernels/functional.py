"""Public loss functions of kdkernels: validate, flatten leading dims, call the autograd Function, reduce."""
import math
from typing import NamedTuple, Optional, Union

import torch

from . import _C, _ops
from .autograd import Sinkhorn, SinkhornCost, TopKKL



def _shape(s) -> str:
    return str(tuple(s))


# Read once: a pybind11 call inside an op would break torch.compile(fullgraph=True) graphs on CUDA.
_COMPILED_WITH_CUDA = _C.compiled_with_cuda()


def _require_backend(t: torch.Tensor, op: str):
    if t.is_cuda and not _COMPILED_WITH_CUDA:
        raise RuntimeError(
            f"kdkernels.{op}: kdkernels was built without CUDA support, but got a CUDA tensor; reinstall with a "
            "CUDA toolkit present (or KDKERNELS_FORCE_CUDA=1): pip install --no-build-isolation -e .")


def _row_mask(pre: str, name: str, lead, t: Optional[torch.Tensor], device, valid_fn):
    if t is None:
        return None
    if tuple(t.shape) != tuple(lead):
        raise ValueError(f"{pre}{name} must have the leading shape of student_logits: expected "
                         f"{_shape(lead)}, got {_shape(t.shape)}")
    if t.device != device:
        raise ValueError(f"{pre}{name} must be on the device of student_logits: expected {device}, got {t.device}")
    return valid_fn(t).reshape(-1)


def _reduce(op: str, rows: torch.Tensor, valid: Optional[torch.Tensor], lead, reduction: str,
            num_items: Optional[Union[int, float, torch.Tensor]]) -> torch.Tensor:
    """'none' -> leading shape; 'sum'; 'mean' over valid rows (0 when none is valid); num_items divides the sum."""
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "sum":
        return total
    count = valid.sum() if valid is not None else torch.tensor(rows.numel(), device=rows.device)
    return total / count.clamp(min=1).to(total.dtype)


def _check_reduction(op: str, reduction: str, num_items):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"kdkernels.{op}: reduction must be one of 'mean', 'sum', 'none': got '{reduction}'")
    if num_items is not None:
        if reduction == "none":
            raise ValueError(f"kdkernels.{op}: num_items cannot be combined with reduction='none'")
        if not isinstance(num_items, torch.Tensor) and not num_items > 0:
            raise ValueError(f"kdkernels.{op}: num_items must be > 0: got {num_items}")


class _TopkInputs(NamedTuple):
    """topk_kl_div's inputs after validation, flattened to rows: what every top-k entry point passes down."""
    lead: torch.Size       # leading shape of the student's logits
    values: torch.Tensor   # (N, K), or (N, V) for mode='dense'
    ids: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]  # (N,) bool, or None when every row counts
    options: tuple         # (mode, divergence, param, temperature, logprobs, drop, logit_scale, softcap): the
                           # ops' option args (the last two after `validate` in topk_kl_fwd)


def _topk_prepare(op: str, shape, device, teacher_values, teacher_indices, *, values_are, mode, divergence, beta,
                  skew, temperature, mask, ignore_index, labels, reduction, num_items, out_of_range,
                  logit_scale=1.0, softcap=None) -> _TopkInputs:
    """Checks every argument of the top-k KL family against the student's logits shape (..., V)."""
    pre = f"kdkernels.{op}: "
    if values_are not in ("logits", "logprobs"):
        raise ValueError(f"{pre}values_are must be 'logits' or 'logprobs': got '{values_are}'")
    if out_of_range not in ("error", "drop"):
        raise ValueError(f"{pre}out_of_range must be 'error' or 'drop': got '{out_of_range}'")
    _check_reduction(op, reduction, num_items)
    for name, val in (("beta", beta), ("skew", skew)):
        if not 0 <= val <= 1:
            raise ValueError(f"{pre}{name} must be in [0, 1]: got {val}")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"{pre}logit_scale must be > 0: got {logit_scale}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{pre}softcap must be None or > 0: got {softcap}")
    if not temperature > 0:
        raise ValueError(f"{pre}temperature must be > 0: got {temperature}")
    if len(shape) < 1 or shape[-1] == 0:
        raise ValueError(f"{pre}student_logits must have a non-empty last (vocabulary) dimension: got shape "
                         f"{_shape(shape)}")
    lead, V = torch.Size(shape[:-1]), shape[-1]
    if mode == "dense":
        if teacher_indices is not None:
            raise ValueError(f"{pre}mode='dense' takes no teacher_indices")
        if tuple(teacher_values.shape) != tuple(shape):
            raise ValueError(f"{pre}teacher_values must have the shape of student_logits for mode='dense': "
                             f"expected {_shape(shape)}, got {_shape(teacher_values.shape)}")
    else:
        if teacher_values.dim() < 1 or teacher_values.shape[:-1] != lead:
            raise ValueError(f"{pre}teacher_values must have the leading shape of student_logits: expected "
                             f"{_shape(lead)}, got {_shape(teacher_values.shape[:-1])}")
        if teacher_indices is None and mode in ("renorm", "tail", "support"):
            raise ValueError(f"{pre}teacher_indices is required for mode='{mode}'")
        if teacher_indices is not None and teacher_indices.shape != teacher_values.shape:
            raise ValueError(f"{pre}teacher_indices must have the shape of teacher_values: expected "
                             f"{_shape(teacher_values.shape)}, got {_shape(teacher_indices.shape)}")
        if teacher_values.shape[-1] == 0:
            raise ValueError(f"{pre}teacher_values must have K >= 1 entries per row: got K = 0")

    valid = _row_mask(pre, "mask", lead, mask, device, lambda m: m.to(torch.bool))
    from_labels = _row_mask(pre, "labels", lead, labels, device, lambda lab: lab != ignore_index)
    if from_labels is not None:
        valid = from_labels if valid is None else valid & from_labels
    width = V if mode == "dense" else teacher_values.shape[-1]
    values = teacher_values.reshape(-1, width)
    ids = None if teacher_indices is None else teacher_indices.reshape(-1, width)
    param = beta if divergence == "jsd" else skew
    options = (mode, divergence, float(param), float(temperature), values_are == "logprobs", out_of_range == "drop",
               float(logit_scale), float(softcap or 0.0))
    return _TopkInputs(lead, values, ids, valid, options)


def logit_map(z: torch.Tensor, logit_scale: float = 1.0, softcap: Optional[float] = None) -> torch.Tensor:
    """A model's final-logit map in PyTorch (what the kernels apply in place): scale, then cap * tanh(. / cap)."""
    z = z * logit_scale if logit_scale != 1.0 else z
    return softcap * torch.tanh(z / softcap) if softcap else z


def _logit_map_deriv(z: torch.Tensor, logit_scale: float, softcap: Optional[float]) -> torch.Tensor:
    """d logit_map / d z, as s sech^2(u) = s 4 e^{-2|u|} / (1 + e^{-2|u|})^2 (exact where tanh rounds to 1)."""
    if not softcap:
        return torch.full_like(z, logit_scale)
    e = torch.exp(-2.0 * (z * (logit_scale / softcap)).abs())
    return logit_scale * 4.0 * e / (1.0 + e) ** 2


def _align_vocab(op: str, vocab: int, teacher_values: torch.Tensor, mode: str, valid_vocab, teacher_vocab):
    """The student's effective vocabulary size and the teacher values aligned to it (docs/topk_kl.md,
    'Vocabularies of different sizes'). valid_vocab excludes a padded embedding table's extra rows from the
    student's softmax; a dense teacher of another width is cut ('truncate') or padded with -inf ('pad')."""
    pre = f"kdkernels.{op}: "
    if teacher_vocab not in (None, "truncate", "pad"):
        raise ValueError(f"{pre}teacher_vocab must be None, 'truncate' or 'pad': got {teacher_vocab!r}")
    v = vocab
    if valid_vocab is not None:
        if isinstance(valid_vocab, bool) or not isinstance(valid_vocab, int) or not 1 <= valid_vocab <= vocab:
            raise ValueError(f"{pre}valid_vocab must be an int in [1, {vocab}] (the student's vocabulary "
                             f"size): got {valid_vocab!r}")
        v = valid_vocab
    if mode != "dense" or not isinstance(teacher_values, torch.Tensor) or teacher_values.dim() < 1:
        return v, teacher_values
    vt = teacher_values.shape[-1]
    if vt == v:
        return v, teacher_values
    if vt == vocab and valid_vocab is not None:  # the same padded table on both sides: drop the padding
        return v, teacher_values[..., :v]
    if teacher_vocab == "truncate" and vt > v:
        return v, teacher_values[..., :v]
    if teacher_vocab == "pad" and vt < v:
        pad = teacher_values.new_full(tuple(teacher_values.shape[:-1]) + (v - vt,), float("-inf"))
        return v, torch.cat([teacher_values, pad], -1)
    raise ValueError(f"{pre}the teacher's vocabulary ({vt}) and the student's ({v}"
                     f"{', valid_vocab' if valid_vocab is not None else ''}) differ: pass "
                     f"teacher_vocab='truncate' (drop the teacher's ids >= {v}) or 'pad' (the student's ids >= {vt} "
                     "get teacher probability 0), or valid_vocab= for a padded student table")


def topk_kl_div(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: Optional[torch.Tensor] = None,
    *,
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
    valid_vocab: Optional[int] = None,
    teacher_vocab: Optional[str] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Divergence between a sparse (top-k) or dense teacher and the full student softmax, fused.

    student_logits (..., V); teacher_values (..., K) at teacher_indices (..., K), or (..., V) for
    mode='dense'. Exact definitions of every mode, divergence and option: docs/topk_kl.md.
    The teacher is a constant target (no gradient). Returns float32 (float64 for float64 logits).
    validate=True checks id ranges and duplicates (one host sync on CUDA; pass False to skip).
    valid_vocab=n keeps only the first n logits in the softmax (a padded embedding table); a dense teacher
    of another width needs teacher_vocab='truncate' or 'pad' (docs/topk_kl.md). logit_scale and softcap
    apply the student model's final-logit map to raw logits, as the model does (scale, then
    softcap * tanh(z / softcap), then the temperature), with exact gradients. inplace_grad=True writes the
    gradient over the logits' own storage (they must be contiguous and made by an operation, not a leaf;
    nothing else may need their values afterwards: autograd refuses a node that saved them).
    """
    if inplace_grad:
        if student_logits.requires_grad and student_logits.is_leaf:
            raise ValueError("kdkernels.topk_kl_div: inplace_grad=True writes the gradient over student_logits: they "
                             "must come from an operation (e.g. the lm_head), not be a leaf tensor")
        if not student_logits.is_contiguous():
            raise ValueError("kdkernels.topk_kl_div: inplace_grad=True needs contiguous student_logits (the gradient "
                             f"is written over them): got strides {tuple(student_logits.stride())}")
        if valid_vocab is not None and valid_vocab != student_logits.shape[-1]:
            raise ValueError("kdkernels.topk_kl_div: inplace_grad=True cannot be combined with valid_vocab (the "
                             "padded columns would keep their logits as gradient)")
    if student_logits.dim() >= 1:
        v, teacher_values = _align_vocab("topk_kl_div", student_logits.shape[-1], teacher_values, mode, valid_vocab,
                                         teacher_vocab)
        student_logits = student_logits[..., :v]
    if mode != "dense" and teacher_vocab == "truncate":  # a larger teacher's ids beyond the student's: dropped
        out_of_range = "drop"
    x = _topk_prepare("topk_kl_div", student_logits.shape, student_logits.device, teacher_values, teacher_indices,
                      values_are=values_are, mode=mode, divergence=divergence, beta=beta, skew=skew,
                      temperature=temperature, mask=mask, ignore_index=ignore_index, labels=labels,
                      reduction=reduction, num_items=num_items, out_of_range=out_of_range,
                      logit_scale=logit_scale, softcap=softcap)
    _require_backend(student_logits, "topk_kl_div")
    z = student_logits.reshape(-1, student_logits.shape[-1])
    rows = TopKKL.apply(z, x.values, x.ids, x.valid, *x.options, validate, bool(inplace_grad))[0]
    return _reduce("topk_kl_div", _t2(rows, temperature, scale_by_t2), x.valid, x.lead, reduction, num_items)


def _t2(rows: torch.Tensor, temperature: float, scale_by_t2: bool) -> torch.Tensor:
    """Hinton's T^2 factor, which keeps gradient magnitudes comparable across temperatures."""
    return rows * (float(temperature) ** 2) if scale_by_t2 and temperature != 1.0 else rows


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, values_are: str = "logprobs"):
    """The teacher's top-k ids and values, in the form topk_kl_div (and offline caches) take.

    values_are='logprobs': full-vocab log-probs at `temperature` (float32), i.e. what mode='tail' needs;
    'logits': the raw logits at those ids. Computed without gradient (the teacher is a target).
    """
    V = teacher_logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"kdkernels.teacher_topk: k must be in [1, V = {V}]: got {k}")
    if not temperature > 0:
        raise ValueError(f"kdkernels.teacher_topk: temperature must be > 0: got {temperature}")
    if values_are not in ("logits", "logprobs"):
        raise ValueError(f"kdkernels.teacher_topk: values_are must be 'logits' or 'logprobs': got '{values_are}'")
    with torch.no_grad():
        values, indices = torch.topk(teacher_logits, k, dim=-1)
        if values_are == "logprobs":
            acc = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
            lse = torch.logsumexp(teacher_logits.to(acc) / temperature, dim=-1, keepdim=True)
            values = values.to(acc) / temperature - lse
    return values, indices


# ---------------------------------------------------------------------------------------------
# Batched Sinkhorn and the SinKD loss (docs/sinkhorn.md)
# ---------------------------------------------------------------------------------------------

_SK = "kdkernels.sinkhorn: "
_SKD = "kdkernels.sinkhorn_kd_loss: "
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_solver_options(prefix, eps, n_iters, tol, grad, marginals):
    from ._meta import check_sinkhorn_options

    if isinstance(n_iters, bool) or not hasattr(n_iters, "__index__"):
        raise ValueError(f"{prefix}n_iters must be an int: got {n_iters!r}")
    if grad not in ("unrolled", "envelope"):
        raise ValueError(f"{prefix}grad must be 'unrolled' or 'envelope': got '{grad}'")
    if marginals not in ("ones", "uniform"):
        raise ValueError(f"{prefix}marginals must be 'ones' or 'uniform': got '{marginals}'")
    if tol is not None and not tol >= 0:
        raise ValueError(f"{prefix}tol must be >= 0: got {tol}")
    check_sinkhorn_options(eps, n_iters, 0.0 if tol is None else tol, prefix)


def _log_marginal(name: str, w, lead, k: int, B: int, marginals: str, ref: torch.Tensor, grad: str,
                  validate: bool):
    """(B, k) log-weights in the accumulation dtype (-inf = absent point), or None for all ones."""
    acc = _acc(ref)
    if w is None:
        if marginals == "ones":
            return None
        return torch.full((B, k), -math.log(k), dtype=acc, device=ref.device)
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{_SK}{name} must be a float32, float16, bfloat16 or float64 tensor: got {got}")
    if tuple(w.shape) not in ((k,), tuple(lead) + (k,)):
        raise ValueError(f"{_SK}{name} must have shape {_shape((k,))} or {_shape(tuple(lead) + (k,))}: got "
                         f"{_shape(w.shape)}")
    if w.device != ref.device:
        raise ValueError(f"{_SK}{name} must be on the device of cost: expected {ref.device}, got {w.device}")
    if grad == "envelope" and w.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_SK}grad='envelope' gives no gradient for the marginals: detach {name} or use "
                         "grad='unrolled'")
    # A data check needs a host sync; under torch.compile the op's own check of the log-weights (NaN or
    # +inf, which is what a negative or non-finite weight becomes below) reports it instead.
    if validate and not torch.compiler.is_compiling() and bool(((w < 0) | ~torch.isfinite(w)).any()):
        raise ValueError(f"{_SK}{name} must be finite and >= 0: got a negative or non-finite weight")
    w = w.to(acc).expand(*lead, k).reshape(B, k)
    # log w: -inf for a zero weight (an absent point, with no gradient: where() sends it none), NaN for a
    # negative one, +inf for +inf
    bad = torch.full_like(w, math.nan).masked_fill(w == 0, -math.inf)
    return torch.where(w > 0, w.clamp_min(torch.finfo(acc).tiny).log(), bad)


def sinkhorn(
    cost: torch.Tensor,
    eps: float = 0.1,
    n_iters: int = 20,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    marginals: str = "ones",
    tol: Optional[float] = None,
    grad: str = "unrolled",
    return_plan: bool = False,
    validate: bool = True,
):
    """Batched entropic OT by log-domain Sinkhorn: the transport cost sum_ij P_ij C_ij of every problem.

    cost (..., n, m): one n x m problem per leading index (forbidden pairs: +inf). Starting from
    g = 0, each of the n_iters iterations normalises the rows, then the columns (docs/sinkhorn.md).
    Marginals a (n,) or (..., n) and b likewise; those not given are `marginals`: 'ones' (SinKD: every
    point has mass 1) or 'uniform' (1/n, 1/m). tol > 0 stops each problem on its own once the row
    marginal error of its plan, sum_i |P 1 - a|_i, is <= tol (no host synchronisation).
    grad='unrolled': the exact gradient of the truncated algorithm (also for a, b and the plan);
    'envelope': d value / d cost = P (cheaper, not that gradient). Returns the values (...) in float32
    (float64 for float64 costs), and the plans (..., n, m) with return_plan=True.
    validate=True checks the data (NaN or -inf costs, a point without any finite cost, bad weights);
    on CUDA this costs one host synchronisation.
    """
    _check_solver_options(_SK, eps, n_iters, tol, grad, marginals)
    if not isinstance(cost, torch.Tensor) or cost.dtype not in _FLOAT_DTYPES:
        got = cost.dtype if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(f"{_SK}cost must be float32, float16, bfloat16 or float64: got {got}")
    if cost.dim() < 2:
        raise ValueError(f"{_SK}cost must have at least 2 dimensions (..., n, m): got shape {_shape(cost.shape)}")
    if cost.numel() == 0:
        raise ValueError(f"{_SK}cost must hold at least one problem with n, m >= 1: got shape {_shape(cost.shape)}")
    _require_backend(cost, "sinkhorn")
    lead, (n, m) = cost.shape[:-2], cost.shape[-2:]
    B = cost.numel() // (n * m)
    log_a = _log_marginal("a", a, lead, n, B, marginals, cost, grad, validate)
    log_b = _log_marginal("b", b, lead, m, B, marginals, cost, grad, validate)
    out = Sinkhorn.apply(cost.reshape(B, n, m), log_a, log_b, float(eps), int(n_iters), float(tol or 0.0), grad,
                         bool(return_plan), bool(validate))
    value = out[0].reshape(lead)
    if return_plan:
        return value, out[4].reshape(*lead, n, m)
    return value


def sinkhorn_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    eps: float = 0.1,
    n_iters: int = 20,
    cost: str = "l1",
    weight: float = 1.0,
    grad: str = "unrolled",
    marginals: str = "ones",
    mask: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    reduction: str = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """SinKD: entropic OT between the student's and the teacher's output distributions.

    (N, C) logits: one N x N problem over the batch (SinKD as published); (..., L, C): one L x L
    problem per leading index (token level). p = softmax(logits / temperature); cost 'l1':
    W_ij = sum_c |p_s[i, c] - p_t[j, c]| ('sqeuclidean': squared differences); then `sinkhorn` on W
    with eps, n_iters, marginals, tol and grad; loss = weight * sum_ij P_ij W_ij per problem.
    mask (..., L) bool: False drops that token from both marginals (a problem left empty gives 0 and
    no gradient). reduction over problems: 'mean' (over non-empty problems), 'sum' or 'none'.
    The teacher is a constant target. Exact definitions: docs/sinkhorn.md.
    """
    from ._meta import check_sinkhorn_cost_options

    _check_solver_options(_SKD, eps, n_iters, tol, grad, marginals)
    check_sinkhorn_cost_options(temperature, cost)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{_SKD}reduction must be one of 'mean', 'sum', 'none': got '{reduction}'")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{_SKD}{name} must be float32, float16, bfloat16 or float64: got {got}")
    if student_logits.dim() < 2:
        raise ValueError(f"{_SKD}student_logits must have at least 2 dimensions (N, C) or (..., L, C): got shape "
                         f"{_shape(student_logits.shape)}")
    if teacher_logits.dim() >= 1 and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"{_SKD}teacher_logits must have the class dimension of student_logits: expected "
                         f"C = {student_logits.shape[-1]}, got C = {teacher_logits.shape[-1]}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"{_SKD}teacher_logits must have the shape of student_logits: expected "
                         f"{_shape(student_logits.shape)}, got {_shape(teacher_logits.shape)}")
    if student_logits.numel() == 0:
        raise ValueError(f"{_SKD}student_logits must be non-empty: got shape {_shape(student_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"{_SKD}teacher_logits must be on the device of student_logits: expected "
                         f"{student_logits.device}, got {teacher_logits.device}")
    _require_backend(student_logits, "sinkhorn_kd_loss")
    lead, L, C = student_logits.shape[:-2], student_logits.shape[-2], student_logits.shape[-1]
    B = student_logits.numel() // (L * C)
    acc = _acc(student_logits)
    device = student_logits.device

    log_w = None
    live = None
    if mask is not None:
        if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
            raise ValueError(f"{_SKD}mask must have the leading shape of student_logits: expected "
                             f"{_shape(student_logits.shape[:-1])}, got {_shape(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"{_SKD}mask must be on the device of student_logits: expected {device}, got {mask.device}")
        keep = mask.reshape(B, L).to(torch.bool)
        count = keep.sum(1, keepdim=True)
        live = count.reshape(B) > 0
        present = (torch.zeros((), dtype=acc, device=device) if marginals == "ones"
                   else -torch.log(count.clamp_min(1).to(acc)))
        log_w = torch.where(keep, present, torch.full((), -math.inf, dtype=acc, device=device))
    elif marginals == "uniform":
        log_w = torch.full((B, L), -math.log(L), dtype=acc, device=device)

    W = SinkhornCost.apply(student_logits.reshape(B, L, C), teacher_logits.reshape(B, L, C), float(temperature),
                           cost, bool(validate))
    # W is finite and >= 0 by construction: the solver's data checks have nothing to find.
    # (one tensor may not be passed as two inputs of an autograd.Function under torch.compile: clone)
    log_b = None if log_w is None else log_w.clone()
    value = Sinkhorn.apply(W, log_w, log_b, float(eps), int(n_iters), float(tol or 0.0), grad, False, False)[0]
    rows = value * float(weight)
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    count = live.sum() if live is not None else torch.tensor(B, device=device)
    return total / count.clamp(min=1).to(total.dtype)


# ---------------------------------------------------------------------------------------------
# Token-relation graph losses and the token contrastive loss (docs/token_relation.md)
# ---------------------------------------------------------------------------------------------

from .autograd import TokenContrastive, TokenRelation  # noqa: E402

_TR = "kdkernels.token_relation_loss: "
_TC = "kdkernels.token_contrastive_loss: "


def sample_tokens(batch: int, length: int, k: int, mask: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """The (batch, k) token positions `sample=k` picks: per instance, k positions uniformly at random without
    replacement among its valid tokens (then among its masked ones, which stay masked, when fewer than k are
    valid). Keys are drawn with torch.rand on the generator's device (the default generator of `device`
    without one), so a seeded generator gives the same tokens on every device."""
    gdev = generator.device if generator is not None else device
    keys = torch.rand((batch, length), generator=generator, device=gdev).to(device)
    if mask is not None:
        keys = keys + (~mask).to(keys.dtype)  # masked tokens sort after every valid one
    return torch.sort(keys, dim=1, stable=True)[1][:, :k]


def _token_graph(prefix: str, op: str, student: torch.Tensor, teacher: torch.Tensor, mask, graph: str, sample,
                 generator, reduction: str):
    """Checks shared by the token losses; returns the (P, n, D) features and (P, n) bool mask the op takes,
    and the (B, T') shape of the per-token rows (T' = sample or T)."""
    from ._meta import check_token_features

    if graph not in ("intra", "inter"):
        raise ValueError(f"{prefix}graph must be 'intra' or 'inter': got '{graph}'")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{prefix}reduction must be one of 'mean', 'sum', 'none': got '{reduction}'")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype.is_floating_point or mask.dtype.is_complex:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{prefix}mask must be bool or integer (nonzero = keep): got {got}")
    check_token_features(prefix, student, teacher, mask, raw=False)
    B, T = student.shape[:2]
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or not 1 <= sample <= T):
        raise ValueError(f"{prefix}sample must be an int in [1, T = {T}]: got {sample!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{prefix}generator must be a torch.Generator: got {type(generator).__name__}")
    _require_backend(student, op)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    if sample is not None:
        idx = sample_tokens(B, T, sample, mask, generator, student.device)
        student = student.gather(1, idx.unsqueeze(-1).expand(B, sample, student.shape[2]))
        teacher = teacher.gather(1, idx.unsqueeze(-1).expand(B, sample, teacher.shape[2]))
        mask = None if mask is None else mask.gather(1, idx)
    lead = (B, student.shape[1])
    if graph == "inter" and B > 0:  # one graph over every (sampled) token of the batch
        student = student.reshape(1, -1, student.shape[2])
        teacher = teacher.reshape(1, -1, teacher.shape[2])
        mask = None if mask is None else mask.reshape(1, -1)
    return student, teacher, mask, lead


def _token_reduce(rows: torch.Tensor, mask: Optional[torch.Tensor], lead, reduction: str) -> torch.Tensor:
    rows = rows.reshape(lead)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = mask.sum() if mask is not None else torch.tensor(rows.numel(), device=rows.device)
    return total / count.clamp(min=1).to(total.dtype)


def token_relation_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    loss: str = "kl",
    similarity: str = "dot",
    num_heads: int = 1,
    temperature: float = 1.0,
    tau: float = 0.1,
    mask: Optional[torch.Tensor] = None,
    graph: str = "intra",
    sample: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    teacher_grad: bool = False,
) -> torch.Tensor:
    """Token-relation graph distillation (TRG local / inner-instance graphs, MiniLMv2 relations), flash-style.

    student_feats (B, T, Ds), teacher_feats (B, T, Dt): widths may differ. Per relation head h (D split
    into num_heads groups) the graph R[i, j] = <x_i, x_j> / sqrt(d_h) ('dot') or <x_i/|x_i|, x_j/|x_j|> / tau
    ('cosine'); rows P[i, :] = softmax_j(R[i, :] / temperature) over the valid keys. loss='kl':
    sum_j P_t (log P_t - log P_s); 'mse': sum_j (P_t - P_s)^2; per token the mean over heads, then
    'mean' over valid tokens ('sum', or 'none' -> (B, T')). mask (B, T) bool/int: False drops the token as
    query and key. graph='inter': one graph over the tokens of the whole batch; sample=k: k random tokens
    per instance (see sample_tokens; reproducible with `generator`). The T x T graphs are never stored.
    teacher_grad=False (default): the teacher is a constant target. Exact definitions: docs/token_relation.md.
    """
    from ._meta import check_token_heads, check_token_relation_options

    check_token_relation_options(loss, similarity, num_heads, temperature, tau)
    s, t, m, lead = _token_graph(_TR, "token_relation_loss", student_feats, teacher_feats, mask, graph, sample,
                                 generator, reduction)
    check_token_heads(num_heads, s.shape[2], t.shape[2])
    if not teacher_grad:
        t = t.detach()
    rows = TokenRelation.apply(s, t, m, loss, similarity, num_heads, float(temperature), float(tau),
                               bool(teacher_grad))[0]
    return _token_reduce(rows, m, lead, reduction)


def token_contrastive_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    tau: float = 0.1,
    similarity: str = "dot",
    mask: Optional[torch.Tensor] = None,
    graph: str = "intra",
    sample: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    teacher_grad: bool = False,
) -> torch.Tensor:
    """TRG's contextual InfoNCE over tokens, fused: -log softmax_j(<s_i, t_j> / tau)[i] for every valid token i
    of a set, over the set's valid tokens j (an implicit N x N logit matrix, never stored).

    student_feats (B, T, D) (project the student to the teacher's width first), teacher_feats (B, T, D).
    similarity='cosine' normalises both first. graph='intra': one set per instance; 'inter': one set over
    the whole batch; sample=k, generator, mask and reduction as token_relation_loss.
    """
    from ._meta import check_token_contrastive_options, check_token_widths

    check_token_contrastive_options(similarity, tau)
    s, t, m, lead = _token_graph(_TC, "token_contrastive_loss", student_feats, teacher_feats, mask, graph, sample,
                                 generator, reduction)
    check_token_widths(s.shape[2], t.shape[2])
    if not teacher_grad:
        t = t.detach()
    rows = TokenContrastive.apply(s, t, m, similarity, float(tau), bool(teacher_grad))[0]
    return _token_reduce(rows, m, lead, reduction)


# ---------------------------------------------------------------------------------------------
# Attention with its log-sum-exp, shared (EchoAtt) attention, layer similarity (docs/shared_attention.md)
# ---------------------------------------------------------------------------------------------

import math as _math  # noqa: E402

from ._meta import ATTN_NAMES as _ATTN, SHARED_NAMES as _SHARED  # noqa: E402
from ._meta import check_attention as _check_attention, check_attention_similarity as _check_similarity  # noqa: E402
from .autograd import Attention, SharedAttention, SharedAttentionProbs  # noqa: E402
from .autograd import SharedAttentionGroupGate, SharedAttentionMember, _GroupState  # noqa: E402

# shared_attention(mode='auto') materialises the anchor's probabilities when they take at most this many bytes
# (B * H * Tq * Tk elements of q's dtype); above it, it recomputes them from the saved log-sum-exp.
SHARED_ATTENTION_MATERIALIZE_BUDGET = 256 * 2**20
_SHARED_MODES = ("auto", "recompute", "materialize")


def _attn_mask(op: str, mask, shape, device, q_name: str):
    """A bool mask broadcastable to (B, H, Tq, Tk) -> an expanded (B, H, Tq, Tk) view (no copy), or None."""
    if mask is None:
        return None
    pre = f"kdkernels.{op}: "
    shape = tuple(int(s) for s in shape)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{pre}mask must be a bool tensor (True = attend): got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"{pre}mask must be on the device of {q_name}: expected {device}, got {mask.device}")
    ok = mask.dtype == torch.bool and mask.dim() <= 4 and all(
        m in (1, s) for m, s in zip(tuple(mask.shape)[::-1], shape[::-1]))
    if not ok:
        raise ValueError(f"{pre}mask must be a bool tensor (True = attend) broadcastable to (B, H, Tq, Tk) = {shape}: "
                         f"got shape {tuple(mask.shape)} {mask.dtype}")
    return mask[(None,) * (4 - mask.dim())].expand(shape)


def _attn_scale(op: str, scale, D: int) -> float:
    if scale is None:
        return 1.0 / _math.sqrt(D)
    if isinstance(scale, torch.Tensor) or not _math.isfinite(float(scale)):
        raise ValueError(f"kdkernels.{op}: scale must be a finite float: got {scale!r}")
    return float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, mask: Optional[torch.Tensor] = None, return_lse: bool = True):
    """Fused attention softmax(scale q k^T) v that also returns the log-sum-exp of every query row.

    q (B, H, Tq, D), k (B, Hk, Tk, D), v (B, Hk, Tk, Dv) with H a multiple of Hk (grouped-query attention).
    causal: query i sees keys j <= i + Tk - Tq (bottom-right aligned; the usual mask when Tq == Tk).
    mask: bool, True = attend, broadcastable to (B, H, Tq, Tk). scale defaults to 1 / sqrt(D).
    Returns out (B, H, Tq, Dv) in q's dtype and, with return_lse, lse (B, H, Tq) in float32 (float64 for float64
    inputs; not differentiable). A row that sees no key gives out 0 and lse -inf. CUDA: D, Dv <= 128.
    """
    s = 1.0 if scale is None or isinstance(scale, torch.Tensor) else float(scale)
    B, H, Hk, Tq, Tk, D, Dv = _check_attention(_ATTN, q, k, v, None, s, raw_mask=False)
    scale = _attn_scale("attention", scale, D)
    m = _attn_mask("attention", mask, (B, H, Tq, Tk), q.device, "q")
    _require_backend(q, "attention")
    out, lse = Attention.apply(q, k, v, m, bool(causal), scale)
    return (out, lse) if return_lse else out


def _shared_checks(q_anchor, k_anchor, lse_anchor, v, scale, mask):
    s = 1.0 if scale is None or isinstance(scale, torch.Tensor) else float(scale)
    dims = _check_attention(_SHARED, q_anchor, k_anchor, v, lse_anchor, s, raw_mask=False)
    B, H, Hk, Tq, Tk, D, Dv = dims
    scale = _attn_scale("shared_attention", scale, D)
    m = _attn_mask("shared_attention", mask, (B, H, Tq, Tk), q_anchor.device, "q_anchor")
    _require_backend(q_anchor, "shared_attention")
    return dims, scale, m


def _apply_probs(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, H, Tq, Tk) @ v (B, Hk, Tk, Dv) -> (B, H, Tq, Dv): one batched GEMM (query heads grouped by
    key/value head, no repeated V)."""
    B, H, Tq, Tk = probs.shape
    Hk, Dv = v.shape[1], v.shape[3]
    return torch.matmul(probs.reshape(B, Hk, H // Hk, Tq, Tk), v.unsqueeze(2)).reshape(B, H, Tq, Dv)


def shared_attention_probs(q_anchor: torch.Tensor, k_anchor: torch.Tensor, lse_anchor: torch.Tensor, *,
                           causal: bool = False, scale: Optional[float] = None,
                           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The anchor's attention probabilities exp(scale q_a k_a^T - lse_a), materialised (B, H, Tq, Tk) in q's
    dtype (0 at masked keys), differentiable to q_anchor and k_anchor. Pass them as `probs=` to
    shared_attention in every sharing layer of a group: each layer is then one batched GEMM, and the group's
    gradient reaches q_a, k_a through one softmax backward."""
    dims, scale, m = _shared_checks(q_anchor, k_anchor, lse_anchor, None, scale, mask)
    return SharedAttentionProbs.apply(q_anchor, k_anchor, lse_anchor, m, bool(causal), scale)


def shared_attention(q_anchor: torch.Tensor, k_anchor: torch.Tensor, lse_anchor: torch.Tensor, v: torch.Tensor, *,
                     causal: bool = False, scale: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                     mode: str = "auto", probs: Optional[torch.Tensor] = None,
                     memory_budget: Optional[int] = None) -> torch.Tensor:
    """An anchor layer's attention applied to a sharing layer's V: softmax(scale Q_a K_a^T) V (EchoAtt).

    q_anchor (B, H, Tq, D), k_anchor (B, Hk, Tk, D) and lse_anchor (B, H, Tq) come from the anchor's
    `attention(..., return_lse=True)` call (same causal / scale / mask); v (B, Hk, Tk, Dv) is this layer's.
    mode: 'recompute' re-forms P = exp(scale q k^T - lse) tile by tile in one pass (O(B H T) extra memory);
    'materialize' stores P (B, H, Tq, Tk) in q's dtype and does one batched GEMM; 'auto' materialises when P
    takes at most memory_budget bytes (default SHARED_ATTENTION_MATERIALIZE_BUDGET = 256 MiB).
    probs: P from shared_attention_probs, re-used across a group (implies materialize).
    Gradients reach v, q_anchor and k_anchor (those of softmax(QK^T)V); lse_anchor gets none.
    """
    if mode not in _SHARED_MODES:
        raise ValueError(f"kdkernels.shared_attention: mode must be one of 'auto', 'recompute', 'materialize': "
                         f"got '{mode}'")
    (B, H, Hk, Tq, Tk, D, Dv), scale, m = _shared_checks(q_anchor, k_anchor, lse_anchor, v, scale, mask)
    if probs is not None:
        if mode == "recompute":
            raise ValueError("kdkernels.shared_attention: probs (materialised probabilities) cannot be combined "
                             "with mode='recompute'")
        if not isinstance(probs, torch.Tensor) or probs.dtype != q_anchor.dtype or probs.device != q_anchor.device \
                or tuple(probs.shape) != (B, H, Tq, Tk):
            got = (f"{tuple(probs.shape)} {probs.dtype} on {probs.device}" if isinstance(probs, torch.Tensor)
                   else type(probs).__name__)
            raise ValueError(f"kdkernels.shared_attention: probs must be (B, H, Tq, Tk) = {(B, H, Tq, Tk)} in the "
                             f"dtype and on the device of q_anchor ({q_anchor.dtype} on {q_anchor.device}): got {got}")
        return _apply_probs(probs, v)
    if mode == "auto":
        budget = SHARED_ATTENTION_MATERIALIZE_BUDGET if memory_budget is None else memory_budget
        mode = "materialize" if B * H * Tq * Tk * q_anchor.element_size() <= budget else "recompute"
    if mode == "recompute":
        return SharedAttention.apply(q_anchor, k_anchor, lse_anchor, v, m, bool(causal), scale)
    P = SharedAttentionProbs.apply(q_anchor, k_anchor, lse_anchor, m, bool(causal), scale)
    return _apply_probs(P, v)


class SharedAttentionGroup:
    """An anchor's attention shared by several layers in recompute mode, with the anchor's dQ, dK formed once.

        group = kdkernels.SharedAttentionGroup(q_a, k_a, lse_a, causal=True)   # after the anchor's attention
        out_l = group(v_l)                                                    # in each sharing layer

    Each call returns what shared_attention(q_a, k_a, lse_a, v_l, mode='recompute', ...) returns, with the same
    gradients. The backward computes each layer's dV as it reaches that layer, and dQ, dK of the anchor once
    for the whole group when it reaches the anchor: one shared_attention_group_bwd with the layers' dO and V
    side by side (dP = sum_l dO_l V_l^T), instead of one softmax backward per layer. On CUDA's SIMT path (float32,
    float64, head dims the tensor-core kernels do not take) that op sums per-layer backwards.
    Build one group per forward pass (it holds that pass's activations).
    """

    def __init__(self, q_anchor: torch.Tensor, k_anchor: torch.Tensor, lse_anchor: torch.Tensor, *,
                 causal: bool = False, scale: Optional[float] = None, mask: Optional[torch.Tensor] = None):
        _, scale, m = _shared_checks(q_anchor, k_anchor, lse_anchor, None, scale, mask)
        self._q, self._k, self._lse = q_anchor.detach(), k_anchor.detach(), lse_anchor
        self._mask, self._causal, self._scale, self._raw_mask = m, bool(causal), scale, mask
        self._state = _GroupState(self._q, self._k, lse_anchor, m, self._causal, scale)
        self._token = SharedAttentionGroupGate.apply(q_anchor, k_anchor, self._state)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        _shared_checks(self._q, self._k, self._lse, v, self._scale, self._raw_mask)
        return SharedAttentionMember.apply(self._q, self._k, self._lse, v, self._mask, self._token, self._causal,
                                           self._scale, self._state)


def _stack_layers(name: str, xs) -> torch.Tensor:
    pre = "kdkernels.attention_similarity: "
    if isinstance(xs, torch.Tensor):
        if xs.dim() != 5:
            raise ValueError(f"{pre}{name} must be a sequence of (B, H, T, d) tensors, one per layer, or one "
                             f"(L, B, H, T, d) tensor: got shape {tuple(xs.shape)}")
        return xs.detach()
    xs = list(xs)
    if not xs:
        raise ValueError(f"{pre}{name} must hold at least one layer: got an empty sequence")
    first = xs[0]
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{pre}{name}[{i}] must be a 4-D (batch, heads, seq, head_dim) tensor: got {got}")
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"{pre}{name}[{i}] must have the shape, dtype and device of {name}[0] "
                             f"({tuple(first.shape)} {first.dtype} on {first.device}): got {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}")
    return torch.stack([x.detach() for x in xs])


def attention_similarity(qs, ks, *, metric: str = "js", causal: bool = False, scale: Optional[float] = None,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (L, L) similarity of L layers' attention maps, streamed (no T x T map is ever stored).

    qs, ks: one (B, H, T, d) query / key tensor per layer (post-RoPE, as the attention sees them; GQA keys
    allowed), or stacked (L, B, H, T, d). S[a, b] = mean over (batch, head, query row with a visible key) of
    sim(P_a[b, h, i, :], P_b[b, h, i, :]) with P = softmax(scale q k^T + mask): the cosine of the two rows
    ('cosine') or 1 - JSD / ln 2 ('js', in [0, 1]). Symmetric, 1 on the diagonal; float32 (float64 for
    float64 inputs); NaN where no row has a visible key. No gradient.
    """
    if metric not in ("js", "cosine"):
        raise ValueError(f"kdkernels.attention_similarity: metric must be 'js' or 'cosine': got '{metric}'")
    q5, k5 = _stack_layers("qs", qs), _stack_layers("ks", ks)
    if q5.shape[0] != k5.shape[0]:
        raise ValueError(f"kdkernels.attention_similarity: qs and ks must hold the same number of layers: got "
                         f"{q5.shape[0]} and {k5.shape[0]}")
    s = 1.0 if scale is None or isinstance(scale, torch.Tensor) else float(scale)
    _check_similarity(q5, k5, None, s, metric)
    L, B, H, Tq, D = q5.shape
    scale = _attn_scale("attention_similarity", scale, D)
    m = _attn_mask("attention_similarity", mask, (B, H, Tq, k5.shape[3]), q5.device, "qs")
    _require_backend(q5, "attention_similarity")
    with torch.no_grad():
        return _ops.lib.attention_similarity(q5, k5, m, bool(causal), scale, metric)
