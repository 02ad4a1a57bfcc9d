"""DistillationLoss: hard-label cross-entropy plus a weighted set of kdkernels' distillation terms.

    loss_fn = kdkernels.DistillationLoss(
        ce_weight=0.5,
        terms={"kd": {"fn": "topk_kl", "weight": 0.5, "mode": "tail", "k": 64, "temperature": 1.0}},
    )
    out = loss_fn(student_logits, labels, teacher=kdkernels.TeacherTargets(logits=teacher_logits))
    out.loss.backward(); log(out.terms)      # {'ce': ..., 'kd': ...} (unweighted values)

Normalisation: every term, the cross-entropy included, is a sum over the same counted positions
(labels != ignore_index, and mask) divided by one count: `num_items` when given (the token count of
the whole accumulated batch, for gradient accumulation: the micro-batch losses then add up to the
loss of the full batch), else the number of counted positions of this call. The total is
ce_weight * ce + sum(weight * term). Nothing is implicit: ce_weight and every term's weight are
required, a term that cannot get the teacher data it needs raises instead of being skipped, and a
cache's temperature or k must equal the term's (no silent rescaling).

New kinds of term plug in by name (register_kd_term) or as a callable: a term receives a KDInputs
and returns sum-over-counted-positions / inputs.num_items (or its own documented normalisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .functional import topk_kl_div

_P = "kdkernels.DistillationLoss: "
Number = Union[int, float, torch.Tensor]


@dataclass
class TeacherTargets:
    """What the teacher offers, positions aligned with the student's logits (leading shape (...)).

    logits (..., V): the teacher's full logits (a live teacher model).
    values, ids (..., K): top-k log-probs at `temperature` and their ids (a teacher cache; values as
      stored, float16/bfloat16 are fine), `lse` (...) the full-vocab logsumexp(logits / temperature).
    hidden_states: the teacher's hidden states (tuple of (..., D)), for feature terms.
    """

    logits: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    ids: Optional[torch.Tensor] = None
    temperature: Optional[float] = None
    lse: Optional[torch.Tensor] = None
    hidden_states: Optional[Sequence[torch.Tensor]] = None

    def __post_init__(self):
        if self.logits is None and self.values is None and self.hidden_states is None:
            raise ValueError(f"{_P}TeacherTargets needs logits, values/ids or hidden_states")
        if self.values is not None:
            if self.ids is None:
                raise ValueError(f"{_P}TeacherTargets: values need their ids")
            if self.temperature is None:
                raise ValueError(f"{_P}TeacherTargets: values (top-k log-probs) need the temperature they were "
                                 "computed at")


@dataclass
class KDInputs:
    """Everything a distillation term may use. mask (...) bool: the counted positions; num_items: the
    normaliser every term divides its sum by."""

    student_logits: torch.Tensor
    teacher: TeacherTargets
    mask: torch.Tensor
    num_items: Number
    labels: Optional[torch.Tensor] = None
    student_hidden_states: Optional[Sequence[torch.Tensor]] = None
    valid_vocab: Optional[int] = None
    teacher_vocab: Optional[str] = None
    _topk: Dict[Tuple[int, float], Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def teacher_topk(self, k: Optional[int], temperature: float, term: str):
        """(values, ids): the teacher's top-k log-probs at `temperature`, from the cache (which must have been
        built at that temperature, with that k) or computed from the teacher's logits (memoised per (k, T))."""
        t = self.teacher
        if t.values is not None:
            kc = t.values.shape[-1]
            if k is not None and k != kc:
                raise ValueError(f"{_P}term '{term}' asks for k = {k}, but the teacher's top-k has k = {kc}")
            if not math.isclose(float(t.temperature), float(temperature), rel_tol=0, abs_tol=1e-12):
                raise ValueError(f"{_P}term '{term}' runs at temperature {temperature}, but the teacher's top-k "
                                 f"log-probs were computed at temperature {t.temperature} (a cache stores them at "
                                 "one temperature: build another cache or use the same temperature)")
            return t.values, t.ids
        if t.logits is None:
            raise ValueError(f"{_P}term '{term}' needs the teacher's logits or top-k; the teacher gave neither")
        if k is None:
            raise ValueError(f"{_P}term '{term}' needs k (how many teacher entries per token) when the teacher "
                             "gives full logits")
        key = (int(k), float(temperature))
        if key not in self._topk:
            from .functional import teacher_topk

            self._topk[key] = teacher_topk(t.logits.detach(), int(k), float(temperature), "logprobs")
        return self._topk[key]


KDTerm = Callable[[KDInputs], torch.Tensor]


def out_of_range(term, valid_vocab: Optional[int], teacher_vocab: Optional[str]) -> str:
    """A sparse term's out_of_range under a vocabulary cut: teacher ids at or above the student's (valid)
    vocabulary are dropped, their mass left in the teacher's tail, once the user said the sizes differ."""
    if term.mode != "dense" and (valid_vocab is not None or teacher_vocab == "truncate"):
        return "drop"
    return term.out_of_range


class TopKKLTerm:
    """kdkernels.topk_kl_div as a distillation term; options are topk_kl_div's (same defaults), plus `k`.

    Sparse modes (renorm, tail, support) use the teacher's top-k log-probs at `temperature`
    (values_are='logprobs'): from a cache as stored, or computed from the teacher's logits with
    teacher_topk(logits, k, temperature). mode='dense' needs the teacher's full logits.
    """

    options = ("k", "mode", "divergence", "beta", "skew", "temperature", "scale_by_t2", "out_of_range", "validate")

    def __init__(self, *, k: Optional[int] = None, mode: str = "renorm", divergence: str = "forward_kl",
                 beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0, scale_by_t2: bool = True,
                 out_of_range: str = "error", validate: bool = True, name: str = "topk_kl"):
        if k is not None and int(k) < 1:
            raise ValueError(f"{_P}term '{name}': k must be >= 1: got {k}")
        self.k, self.mode, self.divergence, self.beta, self.skew = k, mode, divergence, beta, skew
        self.temperature, self.scale_by_t2, self.out_of_range, self.validate = temperature, scale_by_t2, \
            out_of_range, validate
        self.name = name

    def __call__(self, x: KDInputs) -> torch.Tensor:
        kw = dict(mode=self.mode, divergence=self.divergence, beta=self.beta, skew=self.skew,
                  temperature=self.temperature, scale_by_t2=self.scale_by_t2, mask=x.mask, reduction="sum",
                  out_of_range=out_of_range(self, x.valid_vocab, x.teacher_vocab), validate=self.validate,
                  valid_vocab=x.valid_vocab)
        if self.mode == "dense":
            if x.teacher.logits is None:
                raise ValueError(f"{_P}term '{self.name}' with mode='dense' needs the teacher's full logits; a "
                                 "teacher cache holds only its top-k (use mode='tail', 'renorm' or 'support')")
            total = topk_kl_div(x.student_logits, x.teacher.logits.detach(), values_are="logits",
                                teacher_vocab=x.teacher_vocab, **kw)
        else:
            values, ids = x.teacher_topk(self.k, self.temperature, self.name)
            total = topk_kl_div(x.student_logits, values, ids, values_are="logprobs", **kw)
        return total / x.num_items

    def config(self) -> dict:
        return {o: getattr(self, o) for o in self.options}


_REGISTRY: Dict[str, Callable[..., KDTerm]] = {"topk_kl": TopKKLTerm}


def register_kd_term(name: str, factory: Callable[..., KDTerm], *, replace: bool = False) -> None:
    """Make `{"fn": name, ...options}` build `factory(**options)` (a callable KDInputs -> Tensor)."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"{_P}a term named '{name}' is already registered (pass replace=True)")
    _REGISTRY[name] = factory


def kd_terms() -> list:
    """Names of the registered distillation terms."""
    return sorted(_REGISTRY)


@dataclass
class DistillationOutput:
    """loss: the weighted total; terms: each term's unweighted value ('ce' first); num_items: the normaliser."""

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]
    num_items: Number


class DistillationLoss(torch.nn.Module):
    """ce_weight * cross_entropy + sum of weight * distillation term (see the module docstring).

    ce_weight: weight of the hard-label cross-entropy (required; 0 for pure distillation).
    terms: {label: {"fn": name-or-callable (default: label), "weight": w (required), **options}}.
      Built-in name: 'topk_kl' (options: TopKKLTerm's). Labels name the terms in DistillationOutput.terms.
    ignore_index: labels equal to it are not counted. label_smoothing: of the cross-entropy (default 0).
    valid_vocab: the student's real vocabulary when its embedding table is padded (e.g. 151665 of 151936
      rows): the rows beyond take no part in the cross-entropy's or any term's softmax.
    teacher_vocab: None (the teacher's vocabulary must equal the student's), 'truncate' (a larger teacher:
      its ids at or above the student's vocabulary are dropped, their mass kept in the teacher's tail; a
      dense teacher is cut) or 'pad' (a smaller teacher: the student's extra ids get teacher probability 0).
      docs/distill.md, 'Vocabularies of different sizes'.
    """

    def __init__(self, *, ce_weight: float, terms: Mapping[str, Mapping[str, Any]],
                 ignore_index: int = -100, label_smoothing: float = 0.0, valid_vocab: Optional[int] = None,
                 teacher_vocab: Optional[str] = None):
        super().__init__()
        if valid_vocab is not None and (isinstance(valid_vocab, bool) or not isinstance(valid_vocab, int)
                                        or valid_vocab < 1):
            raise ValueError(f"{_P}valid_vocab must be None or an int >= 1: got {valid_vocab!r}")
        if teacher_vocab not in (None, "truncate", "pad"):
            raise ValueError(f"{_P}teacher_vocab must be None, 'truncate' or 'pad': got {teacher_vocab!r}")
        self.valid_vocab, self.teacher_vocab = valid_vocab, teacher_vocab
        if ce_weight is None or not isinstance(ce_weight, (int, float)) or not math.isfinite(ce_weight) \
                or ce_weight < 0:
            raise ValueError(f"{_P}ce_weight must be a finite number >= 0: got {ce_weight!r}")
        if not isinstance(terms, Mapping):
            raise TypeError(f"{_P}terms must be a dict {{label: {{'fn': ..., 'weight': ..., **options}}}}: got "
                            f"{type(terms).__name__}")
        self.ce_weight = float(ce_weight)
        self.ignore_index, self.label_smoothing = ignore_index, float(label_smoothing)
        self.terms: Dict[str, KDTerm] = {}
        self.weights: Dict[str, float] = {}
        self._specs: Dict[str, dict] = {}
        for label, spec in terms.items():
            if label == "ce":
                raise ValueError(f"{_P}the label 'ce' is the hard-label term's; name the term otherwise")
            if not isinstance(spec, Mapping):
                raise TypeError(f"{_P}terms['{label}'] must be a dict with 'weight' (and 'fn', options): got "
                                f"{type(spec).__name__}")
            spec = dict(spec)
            if "weight" not in spec:
                raise ValueError(f"{_P}terms['{label}'] needs an explicit 'weight'")
            w = spec.pop("weight")
            if not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"{_P}terms['{label}']: weight must be a finite number: got {w!r}")
            fn = spec.pop("fn", label)
            if isinstance(fn, str):
                if fn not in _REGISTRY:
                    raise ValueError(f"{_P}terms['{label}']: unknown term '{fn}' (registered: "
                                     f"{', '.join(kd_terms())}; or pass a callable as 'fn')")
                factory = _REGISTRY[fn]
                extra = {"name": label} if factory is TopKKLTerm else {}
                term = factory(**spec, **extra)
            elif callable(fn):
                if spec:
                    raise ValueError(f"{_P}terms['{label}']: options {sorted(spec)} given with a callable 'fn' "
                                     "(bind them into the callable)")
                term = fn
            else:
                raise TypeError(f"{_P}terms['{label}']: 'fn' must be a registered name or a callable: got {fn!r}")
            self.terms[label], self.weights[label] = term, float(w)
            self._specs[label] = {"fn": fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn)),
                                  "weight": float(w), **spec}
        if not self.terms and self.ce_weight == 0:
            raise ValueError(f"{_P}ce_weight is 0 and there are no terms: the objective would be empty")

    def config(self) -> dict:
        """The configuration as plain data (for logs and checkpoints)."""
        return {"ce_weight": self.ce_weight, "ignore_index": self.ignore_index,
                "label_smoothing": self.label_smoothing, "valid_vocab": self.valid_vocab,
                "teacher_vocab": self.teacher_vocab, "terms": {k: dict(v) for k, v in self._specs.items()}}

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, terms={self._specs}"

    def forward(self, student_logits: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                teacher: Optional[TeacherTargets] = None, mask: Optional[torch.Tensor] = None,
                num_items: Optional[Number] = None,
                student_hidden_states: Optional[Sequence[torch.Tensor]] = None) -> DistillationOutput:
        """student_logits (..., V) aligned with labels (...) (already shifted for a causal LM: logits at
        position i predict labels[i]) and with the teacher's targets; mask (...) optional extra filter.
        num_items: the normaliser (the global count of counted positions under gradient accumulation);
        default: the count of counted positions here."""
        lead = student_logits.shape[:-1]
        if labels is not None and tuple(labels.shape) != tuple(lead):
            raise ValueError(f"{_P}labels must have the leading shape of student_logits: expected {tuple(lead)}, "
                             f"got {tuple(labels.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(lead):
            raise ValueError(f"{_P}mask must have the leading shape of student_logits: expected {tuple(lead)}, "
                             f"got {tuple(mask.shape)}")
        if labels is None and self.ce_weight != 0:
            raise ValueError(f"{_P}labels are required for the hard-label term (ce_weight={self.ce_weight})")
        if self.terms and teacher is None:
            raise ValueError(f"{_P}a teacher is required for the terms {sorted(self.terms)}")
        counted = torch.ones(lead, dtype=torch.bool, device=student_logits.device)
        if labels is not None:
            counted = counted & (labels != self.ignore_index)
        if mask is not None:
            counted = counted & mask.to(torch.bool)
        if num_items is None:
            num_items = counted.sum().clamp(min=1)
        elif not isinstance(num_items, torch.Tensor) and not num_items > 0:
            raise ValueError(f"{_P}num_items must be > 0: got {num_items}")

        terms: Dict[str, torch.Tensor] = {}
        total = None
        if self.valid_vocab is not None:
            if self.valid_vocab > student_logits.shape[-1]:
                raise ValueError(f"{_P}valid_vocab ({self.valid_vocab}) exceeds the student's vocabulary "
                                 f"({student_logits.shape[-1]})")
        if labels is not None:
            V = self.valid_vocab or student_logits.shape[-1]
            tgt = labels.masked_fill(~counted, self.ignore_index).reshape(-1).long()
            acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
            # With ce_weight 0 the cross-entropy is only logged: no graph, no backward cost.
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.ce_weight != 0):
                ce = F.cross_entropy(student_logits[..., :V].reshape(-1, V).to(acc), tgt, ignore_index=self.ignore_index,
                                     reduction="sum", label_smoothing=self.label_smoothing) / num_items
            terms["ce"] = ce
            total = ce * self.ce_weight
        if self.terms:
            x = KDInputs(student_logits=student_logits, teacher=teacher, mask=counted, num_items=num_items,
                         labels=labels, student_hidden_states=student_hidden_states, valid_vocab=self.valid_vocab,
                         teacher_vocab=self.teacher_vocab)
            for label, term in self.terms.items():
                value = term(x)
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    raise TypeError(f"{_P}term '{label}' must return a scalar tensor: got "
                                    f"{getattr(value, 'shape', type(value).__name__)}")
                terms[label] = value
                contrib = value * self.weights[label]
                total = contrib if total is None else total + contrib.to(total.dtype)
        return DistillationOutput(loss=total, terms=terms, num_items=num_items)
