"""Public loss functions of kdkernels: validate, flatten leading dims, call the autograd Function, reduce."""
from typing import NamedTuple, Optional, Union

import torch

from . import _C
from .autograd import TopKKL



def _shape(s) -> str:
    return str(tuple(s))


def _require_backend(t: torch.Tensor, op: str):
    if t.is_cuda and not _C.compiled_with_cuda():
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
    options: tuple         # (mode, divergence, param, temperature, logprobs, drop): the ops' option args


def _topk_prepare(op: str, shape, device, teacher_values, teacher_indices, *, values_are, mode, divergence, beta,
                  skew, temperature, mask, ignore_index, labels, reduction, num_items, out_of_range) -> _TopkInputs:
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
    options = (mode, divergence, float(param), float(temperature), values_are == "logprobs", out_of_range == "drop")
    return _TopkInputs(lead, values, ids, valid, options)


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
) -> torch.Tensor:
    """Divergence between a sparse (top-k) or dense teacher and the full student softmax, fused.

    student_logits (..., V); teacher_values (..., K) at teacher_indices (..., K), or (..., V) for
    mode='dense'. Exact definitions of every mode, divergence and option: docs/topk_kl.md.
    The teacher is a constant target (no gradient). Returns float32 (float64 for float64 logits).
    validate=True checks id ranges and duplicates (one host sync on CUDA; pass False to skip).
    """
    x = _topk_prepare("topk_kl_div", student_logits.shape, student_logits.device, teacher_values, teacher_indices,
                      values_are=values_are, mode=mode, divergence=divergence, beta=beta, skew=skew,
                      temperature=temperature, mask=mask, ignore_index=ignore_index, labels=labels,
                      reduction=reduction, num_items=num_items, out_of_range=out_of_range)
    _require_backend(student_logits, "topk_kl_div")
    z = student_logits.reshape(-1, student_logits.shape[-1])
    rows = TopKKL.apply(z, x.values, x.ids, x.valid, *x.options, validate)[0]
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
