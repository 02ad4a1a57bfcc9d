"""Hugging Face integration: `DistillationTrainer`, a transformers.Trainer that distills.

    pip install "kdkernels[hf]"      # transformers (and accelerate, which its Trainer needs)

    trainer = DistillationTrainer(
        model=student, args=TrainingArguments(...), train_dataset=ds,       # items: {"input_ids": [...]}
        teacher=teacher_model,                                              # or teacher_cache=TeacherCache(...)
        loss=kdkernels.DistillationLoss(ce_weight=0.5, terms={"kd": {"fn": "topk_kl", "weight": 0.5,
                                                                      "mode": "tail", "k": 64}}),
    )
    trainer.train()

Causal LMs: logits at position i are trained towards token i + 1 (labels shifted here, as
transformers' own causal-LM loss does); the teacher's position i (live or cached) is aligned with
the student's position i. Every term of the loss is normalised by one count: the number of
(shifted) labels != -100 over all micro-batches of an optimizer step (this trainer counts them
itself, so gradient accumulation gives the gradient of the full batch whatever the padding), summed
over processes when `average_tokens_across_devices` is set.

Logged per step (averaged over the steps since the last log, like `loss`): `loss_ce` and
`loss_<label>` for each term of the DistillationLoss, unweighted.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional, Sequence, Union

import torch

try:
    import transformers
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("kdkernels.integrations.hf needs transformers: pip install 'kdkernels[hf]' "
                      "(or pip install transformers accelerate)") from e

from ..cache.reader import CacheCollator, TeacherCache
from ..distill import DistillationLoss, KDInputs, TeacherTargets, TopKKLTerm, out_of_range
from ..linear import linear_distill_loss, linear_teacher_topk

_P = "kdkernels.integrations.hf.DistillationTrainer: "
_TEACHER_KEYS = ("teacher_values", "teacher_ids", "teacher_lse", "cache_index")
# What the student learns, logged beside the loss terms by the fused path (means per micro-batch).
_METRICS = ("teacher_topk_mass", "student_topk_mass", "top1_agreement")
CONFIG_NAME = "kdkernels_distillation.json"


class PadCollator:
    """Right-pads items {'input_ids': [...], optional 'attention_mask', 'labels'} into tensors; labels
    default to the input ids, -100 at padding (unshifted: the trainer shifts them)."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        seqs = [torch.as_tensor(it["input_ids"], dtype=torch.long).reshape(-1) for it in items]
        B, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros(B, L, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, (s, it) in enumerate(zip(seqs, items)):
            n = len(s)
            ids[b, :n] = s
            attn[b, :n] = torch.as_tensor(it["attention_mask"]).reshape(-1) if "attention_mask" in it else 1
            labels[b, :n] = torch.as_tensor(it["labels"]).reshape(-1) if "labels" in it else s
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _vocab_size(model) -> Optional[int]:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vocab_size", None)


def _check_vocab(loss: DistillationLoss, student_v: Optional[int], teacher_v: Optional[int], what: str) -> None:
    """Refuse teacher / student vocabularies of different sizes unless the loss says how to align them."""
    if student_v is None or teacher_v is None:
        return
    if loss.valid_vocab is not None and loss.valid_vocab > student_v:
        raise ValueError(f"{_P}valid_vocab ({loss.valid_vocab}) exceeds the student's vocabulary ({student_v})")
    if teacher_v in (student_v, loss.valid_vocab):  # the same table, or the teacher's is the student's real part
        return
    how, eff = loss.teacher_vocab, loss.valid_vocab or student_v
    if how is None or (how == "truncate" and teacher_v < eff) or (how == "pad" and teacher_v > eff):
        said = "" if how is None else f" (teacher_vocab={how!r} does not fit: the teacher's is the " \
            f"{'smaller' if teacher_v < eff else 'larger'})"
        valid = f" (valid_vocab {loss.valid_vocab})" if loss.valid_vocab is not None else ""
        raise ValueError(f"{_P}the {what}'s vocabulary has {teacher_v} entries and the student's {student_v}{valid}"
                         f"{said}: "
                         "pass DistillationLoss(teacher_vocab='truncate') for a larger teacher (its ids beyond the "
                         "student's are dropped, their mass kept in the tail) or 'pad' for a smaller one, and "
                         "valid_vocab= for a padded embedding table")


def _logits(out) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


# Config attributes of a final-logit map, and how each maps onto (logit_scale, softcap).
_LOGIT_MAP_KEYS = ("logit_scale", "final_logit_softcapping")
# Config attributes of logit transforms the fused path cannot apply: a model carrying one is refused.
_UNKNOWN_LOGIT_KEYS = ("output_logits_scaling", "logits_scaling", "attn_logit_softcapping_final")


def logit_map_of(model) -> tuple:
    """(logit_scale, softcap) the model applies to its final logits, read from its config (Cohere's
    logit_scale, Gemma 2/3's final_logit_softcapping); (1.0, None) for the plain head. Refuses a config
    that names a transform the fused path cannot reproduce instead of guessing."""
    cfg = getattr(model, "config", None)
    for key in _UNKNOWN_LOGIT_KEYS:
        if cfg is not None and getattr(cfg, key, None) not in (None, 1, 1.0):
            raise ValueError(f"{_P}{type(model).__name__}'s config sets {key} = {getattr(cfg, key)!r}, a final-logit "
                             "transform the fused path cannot apply: pass fused=False")
    scale = getattr(cfg, "logit_scale", None) if cfg is not None else None
    cap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
    return (1.0 if scale is None else float(scale)), (float(cap) if cap else None)


def _head(model):
    """The output layer (an nn.Linear: weight (V, H), optional bias), tied or not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{_P}{type(model).__name__} has no nn.Linear output layer (get_output_embeddings()): "
                         "pass fused=False")
    return head


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels (B, L) -> (B, L): position i holds labels[i + 1]; the last position is ignore_index."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


class DistillationTrainer(Trainer):
    """A transformers.Trainer whose loss is a kdkernels.DistillationLoss against a teacher.

    loss: the DistillationLoss (required: its weights say what is optimised).
    teacher: a teacher model (run under no_grad in eval mode on the batch the student sees; it must
      share the student's tokenizer and vocabulary size), or
    teacher_cache: a TeacherCache (or its path) built over the training data; the dataset's items
      carry 'cache_index' (TeacherCache.dataset() gives them), and the default collator
      (CacheCollator) checks each item's input_ids against the cached tokens.
    fused: True (default) computes the loss from the student's last hidden state and its lm_head with
      kdkernels.linear_distill_loss (CE and the top-k term from one chunked pass: the (N, V) logits are
      never held), and a live teacher's top-k from its last hidden state, chunk by chunk
      (linear_teacher_topk). It applies when the loss is at most one 'topk_kl' term in a sparse mode
      without label smoothing; otherwise the trainer says once in the log why it uses the logits.
      Final-logit maps (logit_scale, final_logit_softcapping) are read from each model's config.
    Other arguments are transformers.Trainer's. Without data_collator, sequences are right-padded
    with the processing_class's pad_token_id (else 0).
    """

    # compute_loss returns the loss of the whole accumulated batch's normalisation (num_items_in_batch)
    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss: DistillationLoss, teacher: Optional[torch.nn.Module] = None,
                 teacher_cache: Union[TeacherCache, str, os.PathLike, None] = None, fused: bool = True, **kwargs):
        if not isinstance(loss, DistillationLoss):
            raise TypeError(f"{_P}loss must be a kdkernels.DistillationLoss: got {type(loss).__name__}")
        if teacher is not None and teacher_cache is not None:
            raise ValueError(f"{_P}pass a teacher model or a teacher cache, not both")
        if loss.terms and teacher is None and teacher_cache is None:
            raise ValueError(f"{_P}the loss has distillation terms {sorted(loss.terms)}: pass teacher= (a model) or "
                             "teacher_cache= (a TeacherCache or its path)")
        if loss.ignore_index != -100:
            raise ValueError(f"{_P}the loss's ignore_index must be -100 (the label of padding in transformers and in "
                             f"these collators): got {loss.ignore_index}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(f"{_P}compute_loss_func is replaced by loss=; pass only one")
        proc = kwargs.get("processing_class", kwargs.get("tokenizer"))
        pad_id = getattr(proc, "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
        model = kwargs.get("model", args[0] if args else None)
        student_v = _vocab_size(model) if model is not None else None
        if teacher_cache is not None and not isinstance(teacher_cache, TeacherCache):
            teacher_cache = TeacherCache(os.fspath(teacher_cache))
        if teacher_cache is not None:
            _check_vocab(loss, student_v, teacher_cache.vocab_size, f"teacher cache {teacher_cache.index_path}")
        served = teacher is not None and hasattr(teacher, "topk_logprobs")  # kdkernels.cache.ServedTeacher
        if served:
            _check_vocab(loss, student_v, teacher.vocab_size, f"served teacher {teacher!r}")
            for label, term in loss.terms.items():
                if not isinstance(term, TopKKLTerm) or term.mode == "dense":
                    raise ValueError(f"{_P}a served teacher gives top-k log-probs only: term '{label}' needs a "
                                     "sparse topk_kl term (mode renorm, tail or support)")
        elif teacher is not None:
            _check_vocab(loss, student_v, _vocab_size(teacher), "teacher")
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = CacheCollator(teacher_cache, pad_id) if teacher_cache is not None \
                else PadCollator(pad_id)
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError(f"{_P}TrainingArguments.label_smoothing_factor would be ignored (the loss is the "
                             "DistillationLoss): pass DistillationLoss(label_smoothing=...) instead")
        self.loss = loss
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.served = served
        # transformers versions without `loss_is_scaled_for_ga` decide from this whether compute_loss's loss is
        # already normalised for gradient accumulation (it is: by num_items_in_batch)
        self.model_accepts_loss_kwargs = True
        if teacher is not None and not served:
            if getattr(self, "place_model_on_device", True):
                teacher.to(self.args.device)
            teacher.eval()
            teacher.requires_grad_(False)
        self._kd_sums: Dict[str, torch.Tensor] = {}
        self._kd_last_step = 0
        self.fused_reason = self._why_not_fused(loss) if fused else "fused=False"
        if self.fused_reason is None:
            logit_map_of(self.model)  # refuse an unreadable final-logit map now, not at the first step
            if teacher is not None and not served:
                logit_map_of(teacher)
        elif fused:
            transformers.logging.get_logger(__name__).warning(
                f"{_P}computing the loss from the full logits: {self.fused_reason}")

    @staticmethod
    def _why_not_fused(loss: DistillationLoss) -> Optional[str]:
        """None when the fused hidden-state path computes this loss exactly, else why not (for the log)."""
        if loss.label_smoothing:
            return "label_smoothing needs the full logits"
        if len(loss.terms) > 1:
            return f"{len(loss.terms)} distillation terms (the fused pass takes one top-k term)"
        for label, term in loss.terms.items():
            if not isinstance(term, TopKKLTerm):
                return f"term '{label}' is not a topk_kl term"
            if term.mode == "dense":
                return f"term '{label}' has mode='dense', which needs the teacher's full logits"
        return None

    # ------------------------------------------------------------------------------------ data
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in _TEACHER_KEYS + ("labels", "input_ids", "attention_mask"):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """Collect the micro-batches of one optimizer step and count their (shifted) labels != -100."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        if not batch_samples:
            return batch_samples, None
        if any("labels" not in b for b in batch_samples):
            raise ValueError(f"{_P}a batch has no 'labels' (the default collators make them from input_ids)")
        count = sum((b["labels"][..., 1:] != self.loss.ignore_index).sum() for b in batch_samples)
        count = torch.as_tensor(count, device=self.args.device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    # ------------------------------------------------------------------------------------ loss
    def _teacher_targets(self, inputs: Dict[str, Any], cached: Dict[str, Any]) -> Optional[TeacherTargets]:
        if not self.loss.terms:
            return None
        if self.teacher_cache is not None:
            if "teacher_values" not in cached or "teacher_ids" not in cached:
                raise ValueError(f"{_P}the batch has no teacher_values/teacher_ids: with teacher_cache= the data "
                                 "collator must be a CacheCollator (the default) and items must carry 'cache_index'")
            return TeacherTargets(values=cached["teacher_values"], ids=cached["teacher_ids"],
                                  temperature=self.teacher_cache.temperature, lse=cached.get("teacher_lse"))
        if self.served:
            return self._served_targets(inputs)
        need_hidden = any(getattr(t, "needs_hidden_states", False) for t in self.loss.terms.values())
        with torch.no_grad():
            out = self.teacher(**inputs, **({"output_hidden_states": True} if need_hidden else {}))
        return TeacherTargets(logits=_logits(out), hidden_states=getattr(out, "hidden_states", None))

    def _served_targets(self, inputs: Dict[str, Any]) -> TeacherTargets:
        """The served teacher's top-k log-probs (temperature 1) of the batch's real tokens, laid out as a cache
        batch: (B, L, k), padding positions holding ids 0..k-1 and log(1/k)."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        k = max(t.k for t in self.loss.terms.values())
        B, L = ids.shape
        values = torch.full((B, L, k), -math.log(k), dtype=torch.float32)
        top = torch.arange(k, dtype=torch.long).expand(B, L, k).clone()
        rows = [ids[b][mask[b]].tolist() for b in range(B)]
        for b, (v, i) in enumerate(self.teacher.topk_logprobs(rows, k)):
            pos = mask[b].nonzero().squeeze(1).cpu()
            values[b, pos] = torch.from_numpy(v)
            top[b, pos] = torch.from_numpy(i).long()
        dev = ids.device
        return TeacherTargets(values=values.to(dev), ids=top.to(dev), temperature=1.0)

    def _fused_loss(self, model, inputs, cached, labels, num_items):
        """ce_weight * CE + weight * top-k KL from the last hidden states (docs/distill.md): the forward asks
        for one position's logits only (logits_to_keep=1), the loss reads the lm_head weight directly."""
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        student = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        head = _head(student)
        scale, cap = logit_map_of(student)
        (label, term), = self.loss.terms.items() if self.loss.terms else ((None, None),)
        kw = dict(ignore_index=self.loss.ignore_index, num_items=num_items, logit_scale=scale, softcap=cap,
                  valid_vocab=self.loss.valid_vocab)
        if term is None:  # CE only: a zero-weight term on the labels keeps one code path
            vals = ids = None
        elif self.teacher_cache is not None or self.served:
            targets = self._teacher_targets(inputs, cached)  # checks the cache's k and temperature against the term
            vals, ids = KDInputs(student_logits=None, teacher=targets, mask=None, num_items=1).teacher_topk(
                term.k, term.temperature, label)
        else:
            with torch.no_grad():
                t_out = self.teacher(**inputs, output_hidden_states=True, logits_to_keep=1)
            t_head = _head(self.teacher)
            t_scale, t_cap = logit_map_of(self.teacher)
            vals, ids = linear_teacher_topk(t_out.hidden_states[-1], t_head.weight, term.k, bias=t_head.bias,
                                            temperature=term.temperature, logit_scale=t_scale, softcap=t_cap)
        hidden = outputs.hidden_states[-1]
        y = shift_labels(labels, self.loss.ignore_index)
        if term is None:
            vals, ids = torch.zeros(y.shape + (1,), device=hidden.device), torch.zeros(y.shape + (1,), dtype=torch.long,
                                                                                       device=hidden.device)
            kw.update(mode="support", values_are="logprobs")
        else:
            kw.update(mode=term.mode, divergence=term.divergence, beta=term.beta, skew=term.skew,
                      temperature=term.temperature, scale_by_t2=term.scale_by_t2,
                      out_of_range=out_of_range(term, self.loss.valid_vocab, self.loss.teacher_vocab),
                      values_are="logprobs")
        loss, metrics = linear_distill_loss(hidden, head.weight, y, vals, ids, bias=head.bias,
                                            ce_weight=self.loss.ce_weight,
                                            kd_weight=self.loss.weights[label] if term is not None else 0.0, **kw)
        n = float(num_items) if num_items is not None else max(metrics["tokens"], 1.0)
        terms = {"ce": metrics["ce"] * metrics["tokens"] / n}
        if term is not None:
            terms[label] = metrics["kd"] * metrics["kd_rows"] / n
            for key in ("teacher_topk_mass", "student_topk_mass", "top1_agreement"):
                if key in metrics:
                    terms[key] = metrics[key]
        return loss, outputs, {k: torch.tensor(v) for k, v in terms.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(f"{_P}the batch has no 'labels' (the default collators make them from input_ids)")
        cached = {k: inputs.pop(k) for k in _TEACHER_KEYS if k in inputs}
        if self.fused_reason is None:
            num_items = num_items_in_batch if model.training else None
            loss, outputs, terms = self._fused_loss(model, inputs, cached, labels, num_items)
            return self._finish(model, loss, outputs, terms, num_items, return_outputs)
        need_hidden = any(getattr(t, "needs_hidden_states", False) for t in self.loss.terms.values())
        outputs = model(**inputs, **({"output_hidden_states": True} if need_hidden else {}))
        logits = _logits(outputs)
        teacher = self._teacher_targets(inputs, cached)
        # Outside training (evaluation) each batch is its own mean; in training num_items_in_batch is our count.
        num_items = num_items_in_batch if model.training else None
        out = self.loss(logits, shift_labels(labels, self.loss.ignore_index), teacher=teacher, num_items=num_items,
                        student_hidden_states=getattr(outputs, "hidden_states", None))
        return self._finish(model, out.loss, outputs, out.terms, num_items, return_outputs)

    def _finish(self, model, loss, outputs, terms, num_items, return_outputs):
        """Scales for DDP's gradient averaging and adds the terms (and metrics) to the running log sums."""
        scale = 1
        if (model.training and num_items is not None and self.args.average_tokens_across_devices
                and self.args.world_size > 1):
            scale = self.args.world_size  # DDP averages gradients; the count was summed over processes
            loss = loss * scale
        if model.training:
            for label, value in terms.items():
                # terms add up over micro-batches (each is normalised by the whole batch's count); the
                # metrics are per-micro-batch means, so each contributes its share of the step's mean
                per = 1.0 / self.args.gradient_accumulation_steps if label in _METRICS else scale
                v = value.detach().float().to(loss.device) * per
                self._kd_sums[label] = self._kd_sums[label] + v if label in self._kd_sums else v
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------------------ logs
    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._kd_sums:
            steps = max(self.state.global_step - self._kd_last_step, 1)
            for label, total in self._kd_sums.items():
                if self.args.world_size > 1:
                    total = self.accelerator.gather(total.reshape(1)).mean()
                name = label if label in _METRICS else f"loss_{label}"
                logs[name] = round(float(total) / steps, 6)
            self._kd_sums = {}
            self._kd_last_step = self.state.global_step
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------------------ save
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            info = {"loss": self.loss.config(), "kdkernels_teacher": (
                {"cache": self.teacher_cache.path, "dataset_hash": self.teacher_cache.dataset_hash,
                 "tokenizer_hash": self.teacher_cache.tokenizer_hash, "k": self.teacher_cache.k,
                 "temperature": self.teacher_cache.temperature}
                if self.teacher_cache is not None else
                {"served": self.teacher.url, "model": self.teacher.model} if self.served else
                {"model": type(self.teacher).__name__ if self.teacher is not None else None,
                 "name_or_path": getattr(getattr(self.teacher, "config", None), "_name_or_path", None)}),
                "transformers": transformers.__version__}
            with open(os.path.join(output_dir, CONFIG_NAME), "w") as f:
                json.dump(info, f, indent=1, default=str)
