"""nn.Module drop-ins of the kdkernels losses; constructor kwargs are the functional's kwargs."""
import torch

from .functional import topk_kl_div


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
