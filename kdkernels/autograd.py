"""torch.autograd.Functions of kdkernels: each calls only its kdkernels forward and backward
ops, through `_ops.lib` (torch.ops.kdkernels, or the emulated CUDA library in tests)."""
import torch

from . import _ops


class TopKKL(torch.autograd.Function):
    """Per-row top-k KL of (N, V) student logits; the gradient is recomputed from the saved row statistics."""

    @staticmethod
    def forward(logits, values, indices, row_mask, mode, divergence, param, temperature, logprobs, drop, scale, cap,
                validate, inplace=False):
        return _ops.lib.topk_kl_fwd(logits, values, indices, row_mask, mode, divergence, param, temperature, logprobs,
                                    drop, validate, scale, cap)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, values, indices, row_mask, mode, divergence, param, temperature, logprobs, _, scale, cap, _ = inputs[:13]
        _, lse, coef, stat = output
        ctx.save_for_backward(logits, values, indices, row_mask, lse, coef, stat)
        ctx.options = (mode, divergence, param, temperature, logprobs, scale, cap)
        ctx.inplace = bool(inputs[13]) if len(inputs) > 13 else False
        ctx.mark_non_differentiable(lse, coef, stat)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if not ctx.needs_input_grad[0]:
            return (None,) * 14
        logits, values, indices, row_mask, lse, coef, stat = ctx.saved_tensors
        if row_mask is not None:  # masked rows must get exactly zero, whatever the upstream gradient
            grad_loss = torch.where(row_mask, grad_loss, torch.zeros_like(grad_loss))
        if ctx.inplace:  # the gradient over the logits' own storage: one (N, V) tensor per step, not two
            _ops.lib.topk_kl_bwd_inplace(grad_loss, logits, values, indices, lse, coef, stat, *ctx.options)
            # Any other node that saved these logits now fails loudly ("modified by an inplace operation").
            torch.autograd.graph.increment_version(logits)
            grad = logits
        else:
            grad = _ops.lib.topk_kl_bwd(grad_loss, logits, values, indices, lse, coef, stat, *ctx.options)
        # The teacher is a constant target: no gradient flows to its values or ids.
        return (grad,) + (None,) * 13


class Sinkhorn(torch.autograd.Function):
    """Batched log-domain Sinkhorn over (B, n, m) costs. Saves the cost and the potentials of every
    iteration (O(B L (n + m))); the backward replays the unrolled loop from them (grad='unrolled')
    or returns the plan (grad='envelope')."""

    @staticmethod
    def forward(cost, log_a, log_b, eps, n_iters, tol, grad, return_plan, validate):
        return _ops.lib.sinkhorn_fwd(cost, log_a, log_b, eps, n_iters, tol, return_plan, validate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        cost, log_a, log_b, eps, _, _, grad, return_plan, _ = inputs
        _, f, g, iters, plan = output
        ctx.save_for_backward(cost, log_a, log_b, f, g, iters)
        ctx.eps, ctx.grad, ctx.return_plan = eps, grad, return_plan
        ctx.mark_non_differentiable(f, g, iters)
        if grad == "envelope" or not return_plan:  # the envelope gives no gradient through the plan
            ctx.mark_non_differentiable(plan)

    @staticmethod
    def backward(ctx, grad_value, grad_f, grad_g, grad_iters, grad_plan):
        need_cost, need_a, need_b = ctx.needs_input_grad[:3]
        if not (need_cost or need_a or need_b):
            return (None,) * 9
        cost, log_a, log_b, f, g, iters = ctx.saved_tensors
        if grad_value is None:
            grad_value = torch.zeros(cost.shape[0], dtype=f.dtype, device=cost.device)
        if not (ctx.return_plan and ctx.grad == "unrolled"):
            grad_plan = None
        dcost, dla, dlb = _ops.lib.sinkhorn_bwd(grad_value, grad_plan, cost, log_a, log_b, f, g, iters,
                                                           ctx.eps, ctx.grad, bool(need_a or need_b))
        return (dcost if need_cost else None, dla if need_a else None, dlb if need_b else None) + (None,) * 6


class SinkhornCost(torch.autograd.Function):
    """The SinKD cost of (B, n, C) student and (B, m, C) teacher logits: softmax at temperature, then the
    L1 (or squared-L2) distance of every pair, (B, n, m). The teacher is a constant target."""

    @staticmethod
    def forward(student_logits, teacher_logits, temperature, cost, validate):
        return _ops.lib.sinkhorn_cost_fwd(student_logits, teacher_logits, temperature, cost, validate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student_logits, teacher_logits, temperature, cost, _ = inputs
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.options = (temperature, cost)

    @staticmethod
    def backward(ctx, grad_cost):
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        student_logits, teacher_logits = ctx.saved_tensors
        grad = _ops.lib.sinkhorn_cost_bwd(grad_cost, student_logits, teacher_logits, *ctx.options)
        return (grad,) + (None,) * 4


class TokenRelation(torch.autograd.Function):
    """Relation KL / MSE between the token graphs of (P, n, Ds) student and (P, n, Dt) teacher features:
    per-token losses (P, n), mean over heads. Saves the (P, H, n, 4) row statistics; the backward
    recomputes the similarity tiles from them. The teacher gets a gradient only with teacher_grad=True."""

    @staticmethod
    def forward(student, teacher, mask, loss, similarity, num_heads, temperature, tau, teacher_grad):
        return _ops.lib.token_relation_fwd(student, teacher, mask, loss, similarity, num_heads,
                                                      temperature, tau)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, mask, loss, similarity, num_heads, temperature, tau, teacher_grad = inputs
        stat = output[1]
        ctx.save_for_backward(student, teacher, mask, stat)
        ctx.options = (loss, similarity, num_heads, temperature, tau)
        ctx.teacher_grad = teacher_grad
        ctx.mark_non_differentiable(stat)

    @staticmethod
    def backward(ctx, grad_loss, grad_stat):
        need_s = ctx.needs_input_grad[0]
        need_t = bool(ctx.teacher_grad and ctx.needs_input_grad[1])
        if not (need_s or need_t):
            return (None,) * 9
        student, teacher, mask, stat = ctx.saved_tensors
        gs, gt = _ops.lib.token_relation_bwd(grad_loss, student, teacher, mask, stat, *ctx.options, need_t)
        return (gs if need_s else None, gt if need_t else None) + (None,) * 7


class TokenContrastive(torch.autograd.Function):
    """InfoNCE over tokens: -log softmax_j(<s_i, t_j> / tau)[i] per valid token of (P, n, D) features.
    Saves the (P, n) row log-sum-exps; the backward recomputes the logit tiles from them."""

    @staticmethod
    def forward(student, teacher, mask, similarity, tau, teacher_grad):
        return _ops.lib.token_contrastive_fwd(student, teacher, mask, similarity, tau)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, mask, similarity, tau, teacher_grad = inputs
        lse = output[1]
        ctx.save_for_backward(student, teacher, mask, lse)
        ctx.options = (similarity, tau)
        ctx.teacher_grad = teacher_grad
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        need_s = ctx.needs_input_grad[0]
        need_t = bool(ctx.teacher_grad and ctx.needs_input_grad[1])
        if not (need_s or need_t):
            return (None,) * 6
        student, teacher, mask, lse = ctx.saved_tensors
        gs, gt = _ops.lib.token_contrastive_bwd(grad_loss, student, teacher, mask, lse, *ctx.options, need_t)
        return (gs if need_s else None, gt if need_t else None) + (None,) * 4


# ---------------------------------------------------------------------------------------------
# Attention with its log-sum-exp and shared (EchoAtt) attention (docs/shared_attention.md)
# ---------------------------------------------------------------------------------------------


class Attention(torch.autograd.Function):
    """softmax(scale q k^T) v with its log-sum-exp (non-differentiable: a statistic for shared attention)."""

    @staticmethod
    def forward(q, k, v, mask, causal, scale):
        return _ops.lib.attention_fwd(q, k, v, mask, causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.options = (causal, scale)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        need = ctx.needs_input_grad
        if grad_out is None or not any(need[:3]):
            return (None,) * 6
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = _ops.lib.attention_bwd(grad_out, q, k, v, out, lse, mask, *ctx.options)
        return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None


class SharedAttention(torch.autograd.Function):
    """exp(scale q_a k_a^T - lse_a) v recomputed tile by tile from the anchor's saved log-sum-exp. The gradient
    to (q_a, k_a) is that of softmax(scale q_a k_a^T) v (lse_a is the anchor's own statistic, not an input
    that gets a gradient)."""

    @staticmethod
    def forward(q, k, lse, v, mask, causal, scale):
        return _ops.lib.shared_attention_fwd(q, k, lse, v, mask, causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, lse, v, mask, causal, scale = inputs
        ctx.save_for_backward(q, k, lse, v, output, mask)
        ctx.options = (causal, scale)

    @staticmethod
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad
        if not (need[0] or need[1] or need[3]):
            return (None,) * 7
        q, k, lse, v, out, mask = ctx.saved_tensors
        grad_qk = bool(need[0] or need[1])
        dq, dk, dv = _ops.lib.shared_attention_bwd(grad_out, q, k, lse, v, out, mask, *ctx.options,
                                                              grad_qk)
        return (dq if need[0] else None, dk if need[1] else None, None, dv if need[3] else None, None, None, None)


class SharedAttentionProbs(torch.autograd.Function):
    """The anchor's probabilities exp(scale q_a k_a^T - lse_a), materialised (B, H, Tq, Tk) for the GEMMs of a
    group's sharing layers; the backward is the softmax's: dS = P (dP - rowsum(dP P))."""

    @staticmethod
    def forward(q, k, lse, mask, causal, scale):
        return _ops.lib.shared_attention_probs_fwd(q, k, lse, mask, causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, lse, mask, causal, scale = inputs
        ctx.save_for_backward(q, k, output)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad_probs):
        need = ctx.needs_input_grad
        if not (need[0] or need[1]):
            return (None,) * 6
        q, k, probs = ctx.saved_tensors
        dq, dk = _ops.lib.shared_attention_probs_bwd(grad_probs, probs, q, k, ctx.scale)
        return dq if need[0] else None, dk if need[1] else None, None, None, None, None


class _GroupState:
    """What the sharing layers of one recompute-mode group share: the anchor's (detached) q, k, lse, the mask and
    options, and the (grad_out, v, out) each layer's backward leaves for the group's one dQ / dK backward."""

    def __init__(self, q, k, lse, mask, causal, scale):
        self.q, self.k, self.lse, self.mask, self.causal, self.scale = q, k, lse, mask, causal, scale
        self.pending = []


class SharedAttentionGroupGate(torch.autograd.Function):
    """The anchor's (q, k) as a group's sharing layers see them: an empty token every layer takes as input. Its
    backward runs after every layer's (autograd orders it so) and turns what they stashed into dq, dk with one
    shared_attention_group_bwd: dP summed over the layers, dS, dQ and dK formed once."""

    @staticmethod
    def forward(q, k, state):
        return q.new_empty((0,))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.state = inputs[2]

    @staticmethod
    def backward(ctx, _grad_token):
        st = ctx.state
        pending, st.pending = st.pending, []
        if not pending or not any(ctx.needs_input_grad[:2]):
            return None, None, None
        go, v, out = (torch.stack([p[i] for p in pending]) for i in range(3))
        dq, dk = _ops.lib.shared_attention_group_bwd(go, st.q, st.k, st.lse, v, out, st.mask, st.causal, st.scale)
        return dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None, None


class SharedAttentionMember(torch.autograd.Function):
    """One sharing layer of a recompute-mode group: the forward of SharedAttention; the backward computes this
    layer's dV alone and leaves (grad_out, v, out) to the group's gate for dq, dk."""

    @staticmethod
    def forward(q, k, lse, v, mask, token, causal, scale, state):
        return _ops.lib.shared_attention_fwd(q, k, lse, v, mask, causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, lse, v, mask, token, causal, scale, state = inputs
        ctx.save_for_backward(q, k, lse, v, output, mask)
        ctx.options = (causal, scale)
        ctx.state = state

    @staticmethod
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad
        q, k, lse, v, out, mask = ctx.saved_tensors
        dv = dtoken = None
        if need[3]:
            dv = _ops.lib.shared_attention_bwd(grad_out, q, k, lse, v, out, mask, *ctx.options, False)[2]
        if need[5]:
            ctx.state.pending.append((grad_out, v, out))
            dtoken = q.new_zeros((0,))
        return None, None, None, dv, None, dtoken, None, None, None
