"""nn.Module drop-ins of the kdkernels losses; constructor kwargs are the functional's kwargs."""
import torch

from .functional import sinkhorn_kd_loss, topk_kl_div


class TopKKLDivLoss(torch.nn.Module):
    """`loss = TopKKLDivLoss(mode='tail', values_are='logprobs')(student_logits, values, ids)`; see topk_kl_div."""

    def __init__(self, **kwargs):
        super().__init__()
        topk_kl_div  # kwargs are checked on the first call, where the inputs are known
        self.kwargs = kwargs

    def forward(self, student_logits, teacher_values, teacher_indices=None, **overrides):
        return topk_kl_div(student_logits, teacher_values, teacher_indices, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class SinkhornKDLoss(torch.nn.Module):
    """`loss = SinkhornKDLoss(temperature=2.0, eps=0.1)(student_logits, teacher_logits)`; see sinkhorn_kd_loss."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs  # checked on the first call, where the inputs are known

    def forward(self, student_logits, teacher_logits, **overrides):
        return sinkhorn_kd_loss(student_logits, teacher_logits, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


from .functional import token_contrastive_loss, token_relation_loss  # noqa: E402


class TokenRelationLoss(torch.nn.Module):
    """`loss = TokenRelationLoss(loss='kl', num_heads=12)(student_feats, teacher_feats, mask=m)`; see
    token_relation_loss (call-time kwargs override the constructor's)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs  # checked on the first call, where the inputs are known

    def forward(self, student_feats, teacher_feats, **overrides):
        return token_relation_loss(student_feats, teacher_feats, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class TokenContrastiveLoss(torch.nn.Module):
    """`loss = TokenContrastiveLoss(tau=0.1)(proj(student_feats), teacher_feats, mask=m)`; see token_contrastive_loss."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, student_feats, teacher_feats, **overrides):
        return token_contrastive_loss(student_feats, teacher_feats, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
