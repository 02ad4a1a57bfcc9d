"""Pure-PyTorch references (float64-capable, autograd-differentiable): the oracle of tests and benchmarks."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["topk_kl_div_ref", "teacher_topk_ref", "sparse_rows_ref", "TAIL_FLOOR"]

# Neither tail bucket of mode 'tail' goes below this (docs/topk_kl.md; TRL's convention): about float32's
# resolution of 1 - s near 1. Flooring both sides keeps every divergence finite when either puts all its
# mass on S (a zero teacher tail against a floored student tail would make reverse KL infinite).
TAIL_FLOOR = 1e-7

_PREFIX = "kdkernels.topk_kl_div: "
_MODES = ("renorm", "tail", "support", "dense")
_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Bucket divergences. Every helper takes log-probabilities logP (teacher) and logQ (student) of
# shape (N, B), where -inf means an empty bucket, and returns the per-row divergence (N,).
# -inf never reaches a multiplication or a log: torch.where picks finite stand-ins first, so
# 0 log 0 = 0 holds in the values *and* the gradients stay free of NaN (where's backward sends
# zero to the branch it did not pick, and zero times a finite number is zero).
# --------------------------------------------------------------------------------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_b A_b (log A_b - log B_b), with terms where A_b == 0 exactly 0 (inf where A_b > 0 = B_b)."""
    pos = log_a > _NEG_INF
    la = torch.where(pos, log_a, 0.0)
    lb = torch.where(pos, log_b, 0.0)
    return torch.where(pos, la.exp() * (la - lb), 0.0).sum(-1)


def _log_mix(w: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(w A + (1 - w) B) in log space (no underflow in the tail), -inf where both are empty."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    both_empty = (log_a == _NEG_INF) & (log_b == _NEG_INF)
    # logaddexp(-inf, -inf) has a NaN gradient: feed it zeros there and put the -inf back after.
    la = torch.where(both_empty, 0.0, log_a) + math.log(w)
    lb = torch.where(both_empty, 0.0, log_b) + math.log1p(-w)
    return torch.where(both_empty, _NEG_INF, torch.logaddexp(la, lb))


def _forward_kl(log_p, log_q, param=None):
    return _kl(log_p, log_q)


def _reverse_kl(log_p, log_q, param=None):
    return _kl(log_q, log_p)


def _jsd(log_p, log_q, beta):
    # The endpoints are the KL limits (Liger / TRL GKD convention), not the degenerate 0 the
    # formula would give at beta = 0.
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _log_mix(beta, log_p, log_q)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _skew_forward_kl(log_p, log_q, skew):
    return _kl(log_p, _log_mix(skew, log_p, log_q))


def _skew_reverse_kl(log_p, log_q, skew):
    return _kl(log_q, _log_mix(1.0 - skew, log_p, log_q))


def _tvd(log_p, log_q, param=None):
    # abs' sub-gradient at 0 is 0, the documented choice where P == Q.
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


_DIVERGENCE_FNS = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _masked_log_softmax(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """log_softmax of x over the entries where ok, -inf elsewhere; a row with no ok entry is all -inf."""
    any_ok = ok.any(-1, keepdim=True)
    x = torch.where(ok, x, _NEG_INF)
    # A row of only -inf would make log_softmax NaN (values and gradients): give it dummy zeros.
    x = torch.where(any_ok, x, 0.0)
    return torch.where(ok, torch.log_softmax(x, dim=-1), _NEG_INF)


def _check_args(mode, divergence, values_are, temperature, beta, skew, reduction, out_of_range, num_items):
    if mode not in _MODES:
        raise ValueError(_PREFIX + f"mode must be one of 'renorm', 'tail', 'support', 'dense': got {mode!r}")
    if divergence not in _DIVERGENCES:
        raise ValueError(
            _PREFIX + "divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', "
            f"'skew_reverse_kl', 'tvd': got {divergence!r}"
        )
    if mode == "renorm" and divergence != "forward_kl":
        raise ValueError(_PREFIX + f"mode='renorm' supports only divergence='forward_kl': got {divergence!r}")
    if values_are not in ("logits", "logprobs"):
        raise ValueError(_PREFIX + f"values_are must be 'logits' or 'logprobs': got {values_are!r}")
    if mode == "tail" and values_are != "logprobs":
        raise ValueError(
            _PREFIX + "mode='tail' needs values_are='logprobs' (the teacher's tail mass must be known): "
            f"got {values_are!r}"
        )
    if not temperature > 0:
        raise ValueError(_PREFIX + f"temperature must be > 0: got {float(temperature)!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(_PREFIX + f"beta must be in [0, 1]: got {beta!r}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(_PREFIX + f"skew must be in [0, 1]: got {skew!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(_PREFIX + f"reduction must be one of 'mean', 'sum', 'none': got {reduction!r}")
    if out_of_range not in ("error", "drop"):
        raise ValueError(_PREFIX + f"out_of_range must be 'error' or 'drop': got {out_of_range!r}")
    if num_items is not None:
        if reduction == "none":
            raise ValueError(_PREFIX + "num_items cannot be combined with reduction='none'")
        if not num_items > 0:
            raise ValueError(_PREFIX + f"num_items must be > 0: got {num_items!r}")


def _rows(z, t, ids, V, values_are, mode, divergence, beta, skew, T):
    """Un-scaled divergence per row (n,) for logits z (n, V), values t (n, K or V), ids (n, K) or None."""
    log_q = torch.log_softmax(z / T, dim=-1)  # (n, V): full-vocabulary student log-probs

    if mode == "dense":
        ok = t > _NEG_INF
        log_p = _masked_log_softmax(t / T if values_are == "logits" else t, ok)
        has_mass = ok.any(-1, keepdim=True)
        log_q_b = torch.where(has_mass, log_q, _NEG_INF)
    else:
        present = (ids >= 0) & (ids < V)
        # Dropped ids leave S: no teacher bucket and no student bucket (their teacher mass is
        # simply not counted, so it falls into the tail in 'tail' and p̂ renormalises otherwise).
        log_q_s = log_q.gather(-1, torch.where(present, ids, 0))
        log_q_s = torch.where(present, log_q_s, _NEG_INF)
        return sparse_rows_ref(log_q_s, t, values_are, mode, divergence, beta, skew, T)

    param = beta if divergence == "jsd" else skew
    return _DIVERGENCE_FNS[divergence](log_p, log_q_b, param)


def sparse_rows_ref(log_q_s, t, values_are, mode, divergence, beta, skew, T):
    """Un-scaled divergence per row of the sparse modes from the student's full-vocab log-probs at S.

    log_q_s (n, K) is -inf at dropped ids. Differentiable in log_q_s: the vocab-parallel path runs
    it on all-reduced (n, K) statistics and takes coef = d rows / d log_q_s by autograd.
    """
    present = log_q_s > _NEG_INF
    ok = present & (t > _NEG_INF)  # ids carrying teacher mass
    has_mass = ok.any(-1, keepdim=True)

    if mode == "tail":
        # Teacher: p_S = exp(t) (full-vocab probs), tail max(1 - m, TAIL_FLOOR);
        # student: q_S, tail max(1 - s, TAIL_FLOOR).
        log_p_s = torch.where(ok, t, _NEG_INF)
        m = log_p_s.exp().sum(-1, keepdim=True)
        s = log_q_s.exp().sum(-1, keepdim=True)
        log_p = torch.cat([log_p_s, (1.0 - m).clamp(min=TAIL_FLOOR).log()], dim=-1)
        log_q_b = torch.cat([log_q_s, (1.0 - s).clamp(min=TAIL_FLOOR).log()], dim=-1)
    else:
        log_p = _masked_log_softmax(t / T if values_are == "logits" else t, ok)
        if mode == "renorm":
            log_q_b = log_q_s  # not renormalised: the full-vocab softmax (cross-entropy)
        else:  # support: q̂ = q_S / s over the ids still in S
            log_q_b = _masked_log_softmax(log_q_s, present)
        # A row whose teacher has no mass on its support contributes 0 (docs): empty buckets
        # on both sides make every divergence exactly 0 with a zero gradient.
        log_q_b = torch.where(has_mass, log_q_b, _NEG_INF)

    param = beta if divergence == "jsd" else skew
    return _DIVERGENCE_FNS[divergence](log_p, log_q_b, param)


# --------------------------------------------------------------------------------------------
# Public references
# --------------------------------------------------------------------------------------------


def topk_kl_div_ref(
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
    num_items=None,
    out_of_range: str = "error",
) -> torch.Tensor:
    """The top-k distillation loss of docs/topk_kl.md, computed plainly in student_logits' dtype.

    Materialises full (N, V) log-probabilities; run it on float64 inputs for the oracle, or on
    bf16/fp16 inputs to measure what "the same math in low precision" gets wrong.
    """
    _check_args(mode, divergence, values_are, temperature, beta, skew, reduction, out_of_range, num_items)
    if mode == "dense":
        if teacher_indices is not None:
            raise ValueError(_PREFIX + "mode='dense' takes no teacher_indices")
    elif teacher_indices is None:
        raise ValueError(_PREFIX + f"teacher_indices is required for mode={mode!r}")

    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    dtype = student_logits.dtype
    z_all = student_logits.reshape(-1, V)
    N = z_all.shape[0]
    t_all = teacher_values.to(dtype).reshape(N, teacher_values.shape[-1])  # (N, -1) fails at N = 0

    valid = torch.ones(N, dtype=torch.bool, device=z_all.device)
    if mask is not None:
        valid = valid & mask.reshape(N).to(device=z_all.device, dtype=torch.bool)
    if labels is not None:
        valid = valid & (labels.reshape(N).to(z_all.device) != ignore_index)

    ids = None
    if mode != "dense":
        ids_all = teacher_indices.reshape(N, teacher_indices.shape[-1]).long()
        in_range = (ids_all >= 0) & (ids_all < V)
        if out_of_range == "error" and not bool(in_range.all()):
            bad = ids_all[~in_range][0].item()
            raise ValueError(
                _PREFIX + f"teacher_indices out of range [0, {V}): found {bad} "
                "(pass out_of_range='drop' to ignore ids outside the student vocabulary)"
            )
        ids = ids_all[valid]

    # Compute on the valid rows only, then scatter: an invalid row's term may be inf (reverse_kl
    # with P = 0 < Q), and even a zeroed upstream gradient would turn 0 * inf into NaN.
    rows = _rows(z_all[valid], t_all[valid], ids, V, values_are, mode, divergence, beta, skew, float(temperature))
    if scale_by_t2:
        rows = rows * (float(temperature) ** 2)
    per_row = rows.new_zeros(N).masked_scatter(valid, rows)

    if reduction == "none":
        return per_row.reshape(lead)
    total = per_row.sum()
    if num_items is not None:
        return total / float(num_items)
    if reduction == "sum":
        return total
    return total / max(int(valid.sum()), 1)  # 0 when no row is valid


def teacher_topk_ref(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, values_are: str = "logprobs"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cut a dense teacher to its top-k: (values, indices), values as raw logits or log-probs at T."""
    if values_are not in ("logits", "logprobs"):
        raise ValueError(_PREFIX + f"values_are must be 'logits' or 'logprobs': got {values_are!r}")
    V = teacher_logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"kdkernels.teacher_topk: k must be in [1, V = {V}]: got {k}")
    top, idx = teacher_logits.topk(k, dim=-1)
    if values_are == "logits":
        return top, idx
    lse = torch.logsumexp(teacher_logits / float(temperature), dim=-1, keepdim=True)
    return top / float(temperature) - lse, idx


# --------------------------------------------------------------------------------------------
# Sinkhorn and SinKD (docs/sinkhorn.md)
# --------------------------------------------------------------------------------------------

__all__ += ["sinkd_official_ref", "sinkhorn_ref", "sinkhorn_plain_ref", "sinkhorn_cost_ref", "sinkhorn_kd_loss_ref"]


def sinkd_official_ref(y_s: torch.Tensor, y_t: torch.Tensor, temperature: float = 2.0, eps: float = 0.1,
                       n_iters: int = 20, weight: float = 1.0) -> torch.Tensor:
    """SinKD exactly as the official code computes it (github 2018cx/SinKD, loss.py), line by line:
    one (N, C) batch, plain domain, no convergence test, gradient by autograd through every step.
    The official code hard-codes T = 2, eps = 0.1, 20 iterations and its own weight."""
    p_s = torch.softmax(y_s / temperature, dim=1)
    p_t = torch.softmax(y_t / temperature, dim=1)
    Wxy = torch.cdist(p_s, p_t, p=1)  # N x N, L1 between probability vectors
    K = torch.exp(-Wxy / eps)
    P = K
    for _ in range(n_iters):
        P = P / torch.sum(P, dim=1, keepdim=True)
        P = P / torch.sum(P, dim=0, keepdim=True)
    return weight * torch.sum(P * Wxy)


def _ref_log_weights(w, marginals, B, k, like):
    """(B, k) log-weights (-inf for zero weights) from a (k,) / (B, k) tensor or the named default."""
    if w is None:
        if marginals == "ones":
            return torch.zeros(B, k, dtype=like.dtype, device=like.device)
        return torch.full((B, k), -math.log(k), dtype=like.dtype, device=like.device)
    w = w.to(like.dtype).expand(B, k) if w.dim() == 1 else w.to(like.dtype).reshape(B, k)
    return torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), torch.full_like(w, _NEG_INF))


def sinkhorn_ref(cost: torch.Tensor, eps: float = 0.1, n_iters: int = 20, a: Optional[torch.Tensor] = None,
                 b: Optional[torch.Tensor] = None, *, marginals: str = "ones", tol: Optional[float] = None,
                 grad: str = "unrolled", return_plan: bool = False):
    """Eager batched log-domain Sinkhorn (the definition kdkernels.sinkhorn implements), in cost's dtype.

    cost (..., n, m); g_0 = 0; per iteration f = log a - lse_j(Z0 + g), then g = log b - lse_i(Z0 + f),
    Z0 = -cost / eps; P = exp(Z0 + f + g); value = sum P cost (forbidden pairs, cost = inf, give 0).
    Autograd through the loop is the unrolled gradient; grad='envelope' detaches P. tol: a problem
    stops (its potentials freeze) once the row marginal error of its plan is <= tol; no host sync.
    Weights may be 0 (an absent point); a problem with no point left on a side has value 0.
    """
    lead, (n, m) = cost.shape[:-2], cost.shape[-2:]
    C = cost.reshape(-1, n, m)
    B = C.shape[0]
    la = _ref_log_weights(None if a is None else a.reshape(-1, n) if a.dim() > 1 else a, marginals, B, n, C)
    lb = _ref_log_weights(None if b is None else b.reshape(-1, m) if b.dim() > 1 else b, marginals, B, m, C)
    sparse = a is not None or b is not None  # zero weights possible: guard the -inf arithmetic
    Z0 = -C / eps
    if sparse:
        row_on, col_on = la > _NEG_INF, lb > _NEG_INF
        live = row_on.any(1) & col_on.any(1)
        # an empty problem runs on stand-in weights (so nothing is NaN) and its value is zeroed below
        la = torch.where(live[:, None], la, torch.zeros_like(la))
        lb = torch.where(live[:, None], lb, torch.zeros_like(lb))
        row_on, col_on = la > _NEG_INF, lb > _NEG_INF
        g = torch.where(col_on, torch.zeros_like(lb), lb)
    else:
        g = torch.zeros_like(lb)
    f = None
    done = torch.zeros(B, dtype=torch.bool, device=C.device)
    for it in range(n_iters):
        S = Z0 + g[:, None, :]
        if sparse:  # an absent row may have no finite entry at all: keep its lse finite, f = -inf
            S = torch.where(row_on[:, :, None], S, torch.zeros_like(S))
        f_new = la - torch.logsumexp(S, dim=2)
        if tol is not None and tol > 0 and it > 0:
            with torch.no_grad():
                diff = torch.where(la > _NEG_INF, (f - f_new).exp() - 1, torch.zeros_like(f))
                err = (la.exp() * diff.abs()).sum(1)
                done = done | (err <= tol)
            f_new = torch.where(done[:, None], f, f_new)
        f = f_new
        S = Z0 + f[:, :, None]
        if sparse:
            S = torch.where(col_on[:, None, :], S, torch.zeros_like(S))
        g_new = lb - torch.logsumexp(S, dim=1)
        g = torch.where(done[:, None], g, g_new) if tol else g_new
    P = torch.exp(Z0 + f[:, :, None] + g[:, None, :])
    C_safe = torch.nan_to_num(C, posinf=0.0)  # a forbidden pair has P = 0 and adds 0 (no 0 * inf)
    value = ((P.detach() if grad == "envelope" else P) * C_safe).sum((1, 2))
    if sparse:
        value = torch.where(live, value, torch.zeros_like(value))
        P = torch.where(live[:, None, None], P, torch.zeros_like(P))
    if return_plan:
        return value.reshape(lead), P.reshape(*lead, n, m)
    return value.reshape(lead)


def sinkhorn_plain_ref(cost: torch.Tensor, eps: float = 0.1, n_iters: int = 20, a: Optional[torch.Tensor] = None,
                       b: Optional[torch.Tensor] = None, *, marginals: str = "ones"):
    """The same iteration in the plain domain, K = exp(-cost / eps) scaled by rows then columns: it
    underflows for small eps (0 / 0), which is what the log domain is for. Returns (value, plan)."""
    lead, (n, m) = cost.shape[:-2], cost.shape[-2:]
    C = cost.reshape(-1, n, m)
    B = C.shape[0]
    wa = _ref_log_weights(a, marginals, B, n, C).exp()
    wb = _ref_log_weights(b, marginals, B, m, C).exp()
    P = torch.exp(-C / eps)
    for _ in range(n_iters):
        P = P * (wa / P.sum(2))[:, :, None]
        P = P * (wb / P.sum(1))[:, None, :]
    value = (P * torch.nan_to_num(C, posinf=0.0)).sum((1, 2))
    return value.reshape(lead), P.reshape(*lead, n, m)


def sinkhorn_cost_ref(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                      cost: str = "l1") -> torch.Tensor:
    """SinKD cost (..., L, L): softmax at temperature, then sum_c |p_s - p_t| ('l1', torch.cdist p=1 as the
    official code) or sum_c (p_s - p_t)^2 ('sqeuclidean'). The teacher is detached (a constant target)."""
    p_s = torch.softmax(student_logits / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits.detach() / temperature, dim=-1)
    if cost == "l1":
        return torch.cdist(p_s, p_t, p=1)
    if cost == "sqeuclidean":
        return ((p_s.unsqueeze(-2) - p_t.unsqueeze(-3)) ** 2).sum(-1)
    raise ValueError(f"kdkernels.sinkhorn_kd_loss: cost must be 'l1' or 'sqeuclidean': got '{cost}'")


def sinkhorn_kd_loss_ref(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 2.0,
                         eps: float = 0.1, n_iters: int = 20, cost: str = "l1", weight: float = 1.0,
                         grad: str = "unrolled", marginals: str = "ones", mask: Optional[torch.Tensor] = None,
                         tol: Optional[float] = None, reduction: str = "mean") -> torch.Tensor:
    """The SinKD loss of kdkernels.sinkhorn_kd_loss, eagerly: (N, C) -> one N x N problem,
    (..., L, C) -> one L x L problem per leading index; mask drops tokens from both marginals."""
    lead, L = student_logits.shape[:-2], student_logits.shape[-2]
    W = sinkhorn_cost_ref(student_logits, teacher_logits, temperature, cost)
    w = None
    if mask is not None:
        keep = mask.reshape(-1, L).to(W.device, torch.bool)
        w = keep.to(W.dtype)
        if marginals == "uniform":
            w = w / keep.sum(1, keepdim=True).clamp_min(1).to(W.dtype)
    value = sinkhorn_ref(W, eps, n_iters, w, w, marginals=marginals, tol=tol, grad=grad).reshape(-1) * weight
    if reduction == "none":
        return value.reshape(lead)
    if reduction == "sum":
        return value.sum()
    live = keep.any(1).sum() if mask is not None else value.numel()
    return value.sum() / max(int(live), 1)


# --------------------------------------------------------------------------------------------
# Token-relation graph losses and the token contrastive loss (docs/token_relation.md)
# --------------------------------------------------------------------------------------------

__all__ += ["token_relation_loss_ref", "token_contrastive_loss_ref", "token_sample_ref", "COSINE_EPS"]

# Cosine similarity divides by max(|x|, COSINE_EPS) per head (as torch.nn.functional.normalize).
COSINE_EPS = 1e-8


def token_sample_ref(batch: int, length: int, k: int, mask: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """The (batch, k) positions of sample=k: random keys from torch.rand on the generator's device, masked
    tokens pushed behind every valid one (+1), the k smallest keys per instance."""
    gdev = generator.device if generator is not None else device
    keys = torch.rand((batch, length), generator=generator, device=gdev).to(device)
    if mask is not None:
        keys = keys + (~mask).to(keys.dtype)
    return torch.sort(keys, dim=1, stable=True)[1][:, :k]


def _token_sets(student, teacher, mask, graph, sample, generator):
    """(P, n, D) features and (P, n) validity of the graphs, and the (B, T') shape of the per-token rows."""
    B, T = student.shape[:2]
    valid = (torch.ones(B, T, dtype=torch.bool, device=student.device) if mask is None
             else mask.to(student.device) != 0)
    if sample is not None:
        idx = token_sample_ref(B, T, sample, None if mask is None else valid, generator, student.device)
        student = student.gather(1, idx.unsqueeze(-1).expand(-1, -1, student.shape[-1]))
        teacher = teacher.gather(1, idx.unsqueeze(-1).expand(-1, -1, teacher.shape[-1]))
        valid = valid.gather(1, idx)
    lead = tuple(valid.shape)
    if graph == "inter" and B > 0:
        student = student.reshape(1, -1, student.shape[-1])
        teacher = teacher.reshape(1, -1, teacher.shape[-1])
        valid = valid.reshape(1, -1)
    return student, teacher, valid, lead


def _token_heads_ref(x: torch.Tensor, heads: int, cosine: bool) -> torch.Tensor:
    """(P, n, D) -> (P, H, n, D / H), each head's vectors divided by max(|x|, COSINE_EPS) under cosine."""
    P, n, D = x.shape
    xh = x.reshape(P, n, heads, D // heads).transpose(1, 2)
    if cosine:
        xh = xh / xh.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    return xh


def _token_reduce_ref(rows, valid, lead, reduction):
    rows = torch.where(valid, rows, torch.zeros_like(rows)).reshape(lead)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1).to(rows.dtype)  # no host sync: torch.compile traces it


def token_relation_loss_ref(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *, loss: str = "kl",
                            similarity: str = "dot", num_heads: int = 1, temperature: float = 1.0, tau: float = 0.1,
                            mask: Optional[torch.Tensor] = None, graph: str = "intra", sample: Optional[int] = None,
                            generator: Optional[torch.Generator] = None, reduction: str = "mean",
                            teacher_grad: bool = False) -> torch.Tensor:
    """kdkernels.token_relation_loss, materialised: builds the (P, H, n, n) graphs of both models in the
    inputs' dtype, their masked log-softmaxes, then KL or MSE per row; mean over heads, reduction over
    valid tokens. The teacher is detached unless teacher_grad."""
    teacher = teacher_feats if teacher_grad else teacher_feats.detach()
    s, t, valid, lead = _token_sets(student_feats, teacher.to(student_feats.dtype), mask, graph, sample, generator)
    cosine = similarity == "cosine"

    def graph_logits(x):
        xh = _token_heads_ref(x, num_heads, cosine)
        scale = 1.0 / tau if cosine else 1.0 / math.sqrt(xh.shape[-1])
        return (xh @ xh.transpose(-1, -2)) * (scale / temperature)

    a, b = graph_logits(t), graph_logits(s)
    keys = valid[:, None, None, :].expand(a.shape)  # masked tokens are no keys
    lpt, lps = _masked_log_softmax(a, keys), _masked_log_softmax(b, keys)
    if loss == "kl":
        rows = _kl(lpt, lps)
    elif loss == "mse":
        rows = ((lpt.exp() - lps.exp()) ** 2).sum(-1)
    else:
        raise ValueError(f"kdkernels.token_relation_loss: loss must be 'kl' or 'mse': got '{loss}'")
    return _token_reduce_ref(rows.mean(1), valid, lead, reduction)


def token_contrastive_loss_ref(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *, tau: float = 0.1,
                               similarity: str = "dot", mask: Optional[torch.Tensor] = None, graph: str = "intra",
                               sample: Optional[int] = None, generator: Optional[torch.Generator] = None,
                               reduction: str = "mean", teacher_grad: bool = False) -> torch.Tensor:
    """kdkernels.token_contrastive_loss, materialised: the (P, n, n) logits <s_i, t_j> / tau over valid keys,
    -log_softmax at the diagonal per valid token; reduction over valid tokens."""
    teacher = teacher_feats if teacher_grad else teacher_feats.detach()
    s, t, valid, lead = _token_sets(student_feats, teacher.to(student_feats.dtype), mask, graph, sample, generator)
    cosine = similarity == "cosine"
    sh, th = _token_heads_ref(s, 1, cosine)[:, 0], _token_heads_ref(t, 1, cosine)[:, 0]
    c = (sh @ th.transpose(-1, -2)) / tau
    lp = _masked_log_softmax(c, valid[:, None, :].expand(c.shape))
    rows = -torch.diagonal(lp, dim1=-2, dim2=-1)
    return _token_reduce_ref(rows, valid, lead, reduction)


# --------------------------------------------------------------------------------------------
# Attention with its log-sum-exp, shared (EchoAtt) attention, layer similarity (docs/shared_attention.md).
# Everything is materialised (B, H, Tq, Tk): the plain softmax(scale Q K^T) V the kernels must equal.
# --------------------------------------------------------------------------------------------

__all__ += ["attention_ref", "attention_probs_ref", "shared_attention_ref", "attention_similarity_ref"]


def _attn_keep(B, H, Tq, Tk, causal, mask, device):
    """(B, H, Tq, Tk) bool: which keys each query sees (causal is bottom-right aligned, as flash-attn)."""
    keep = torch.ones(B, H, Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        keep = keep & (j <= i + (Tk - Tq))
    if mask is not None:
        keep = keep & mask.to(device=device, dtype=torch.bool)
    return keep


def attention_probs_ref(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, scale: Optional[float] = None,
                        mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, lse): P = softmax(scale q k^T) (B, H, Tq, Tk) with masked keys at 0, rows without a visible key all 0
    and lse -inf there. GQA: k may have fewer heads (an integer ratio). Differentiable, no NaN anywhere."""
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k.repeat_interleave(H // Hk, dim=1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    keep = _attn_keep(B, H, Tq, Tk, causal, mask, q.device)
    row_ok = keep.any(-1, keepdim=True)
    s = torch.where(keep, s, _NEG_INF)
    s = torch.where(row_ok, s, 0.0)  # rows without keys: any finite row, zeroed below
    p = torch.where(keep, torch.softmax(s, dim=-1), 0.0)
    lse = torch.where(row_ok[..., 0], torch.logsumexp(s, dim=-1), _NEG_INF)
    return p, lse


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: Optional[float] = None, mask: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of softmax(scale q k^T + mask) v, materialised; rows without a visible key give 0 and -inf."""
    p, lse = attention_probs_ref(q, k, causal=causal, scale=scale, mask=mask)
    vv = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.matmul(p, vv), lse


def shared_attention_ref(q_anchor: torch.Tensor, k_anchor: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                         scale: Optional[float] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(scale Q_a K_a^T) V_l: the anchor's attention applied to a sharing layer's V."""
    return attention_ref(q_anchor, k_anchor, v, causal=causal, scale=scale, mask=mask)[0]


def attention_similarity_ref(qs, ks, *, metric: str = "js", causal: bool = False, scale: Optional[float] = None,
                             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (L, L) layer similarity from each layer's materialised attention map: the mean over (batch, head,
    query row with a visible key) of the cosine of two probability rows ('cosine') or 1 - JSD / ln 2 ('js')."""
    if metric not in ("js", "cosine"):
        raise ValueError(f"kdkernels.attention_similarity: metric must be 'js' or 'cosine': got '{metric}'")
    probs = [attention_probs_ref(q, k, causal=causal, scale=scale, mask=mask) for q, k in zip(qs, ks)]
    valid = torch.isfinite(probs[0][1])  # rows with a visible key (the same in every layer)
    L = len(probs)
    out = torch.empty(L, L, dtype=probs[0][0].dtype)
    for a in range(L):
        for b in range(L):
            pa, pb = probs[a][0], probs[b][0]
            if metric == "cosine":
                num = (pa * pb).sum(-1)
                sim = num / (pa.norm(dim=-1) * pb.norm(dim=-1)).clamp_min(1e-300)
            else:
                m = 0.5 * (pa + pb)
                safe_m = torch.where(m > 0, m, 1.0)

                def kl(p):
                    return torch.where(p > 0, p * (torch.log(torch.where(p > 0, p, 1.0)) - torch.log(safe_m)), 0.0)

                jsd = 0.5 * (kl(pa) + kl(pb)).sum(-1)
                sim = (1.0 - jsd / math.log(2.0)).clamp(0.0, 1.0)
            out[a, b] = sim[valid].mean()
    return out
