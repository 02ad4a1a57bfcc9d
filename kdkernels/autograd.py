"""torch.autograd.Functions of kdkernels: each calls only its torch.ops.kdkernels.* forward and backward ops."""
import torch


class TopKKL(torch.autograd.Function):
    """Per-row top-k KL of (N, V) student logits; the gradient is recomputed from the saved row statistics."""

    @staticmethod
    def forward(logits, values, indices, row_mask, mode, divergence, param, temperature, logprobs, drop, validate):
        return torch.ops.kdkernels.topk_kl_fwd(logits, values, indices, row_mask, mode, divergence, param,
                                               temperature, logprobs, drop, validate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, values, indices, row_mask, mode, divergence, param, temperature, logprobs, _, _ = inputs
        _, lse, coef, stat = output
        ctx.save_for_backward(logits, values, indices, row_mask, lse, coef, stat)
        ctx.options = (mode, divergence, param, temperature, logprobs)
        ctx.mark_non_differentiable(lse, coef, stat)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        logits, values, indices, row_mask, lse, coef, stat = ctx.saved_tensors
        if row_mask is not None:  # masked rows must get exactly zero, whatever the upstream gradient
            grad_loss = torch.where(row_mask, grad_loss, torch.zeros_like(grad_loss))
        grad = torch.ops.kdkernels.topk_kl_bwd(grad_loss, logits, values, indices, lse, coef, stat, *ctx.options)
        # The teacher is a constant target: no gradient flows to its values or ids.
        return (grad,) + (None,) * 10
