"""Fake (meta) kernels of every kdkernels op, so torch.compile can trace them; they mirror the C++ shape checks."""
import math

import torch

_PREFIX = "kdkernels.topk_kl_div: "
_MODES = ("renorm", "tail", "support", "dense")
_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


_FAKES = {}  # op name -> fake kernel, registered for every op library that declares the ops
_REGISTERED = {"kdkernels"}


def _fake(name):
    def deco(fn):
        _FAKES[name] = fn
        return torch.library.register_fake(f"kdkernels::{name}")(fn)
    return deco


def register_fakes(ns):
    """Registers every fake kernel for op library `ns` too (the emulated CUDA library, kdkernels_emu)."""
    if ns not in _REGISTERED:
        for name, fn in _FAKES.items():
            torch.library.register_fake(f"{ns}::{name}")(fn)
        _REGISTERED.add(ns)


def _fail(msg):
    raise ValueError(_PREFIX + msg)


def _shape_str(shape):
    return str(tuple(int(d) for d in shape))


def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_topk_options(mode, divergence, param, temperature, values_are_logprobs):
    """The option checks of csrc/common/topk_kl_args.cpp, same texts."""
    if mode not in _MODES:
        _fail(f"mode must be one of 'renorm', 'tail', 'support', 'dense': got '{mode}'")
    if divergence not in _DIVERGENCES:
        _fail("divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', "
              f"'skew_reverse_kl', 'tvd': got '{divergence}'")
    if mode == "renorm" and divergence != "forward_kl":
        _fail(f"mode='renorm' supports only divergence='forward_kl': got '{divergence}'")
    if mode == "tail" and not values_are_logprobs:
        _fail("mode='tail' needs values_are='logprobs' (the teacher's tail mass must be known): got 'logits'")
    if not temperature > 0:
        _fail(f"temperature must be > 0: got {temperature}")
    if not 0 <= param <= 1:
        _fail(f"{'beta' if divergence == 'jsd' else 'skew'} must be in [0, 1]: got {param}")


def check_logit_map(logit_scale, softcap):
    """topk_kl_logit_map's checks (csrc/common/topk_kl_args.cpp), same texts."""
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        _fail(f"logit_scale must be > 0: got {logit_scale}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        _fail(f"softcap must be >= 0 (0 or None: no cap): got {softcap}")


@_fake("topk_kl_fwd")
def _topk_kl_fwd_fake(logits, values, indices, row_mask, mode, divergence, param, temperature,
                      values_are_logprobs, drop_out_of_range, validate, logit_scale=1.0, softcap=0.0):
    check_topk_options(mode, divergence, param, temperature, values_are_logprobs)
    check_logit_map(logit_scale, softcap)
    n = logits.shape[0]
    k = 0 if mode == "dense" else values.shape[1]
    acc = _acc_dtype(logits)
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((n, k), dtype=acc), logits.new_empty((n, 4), dtype=acc))


@_fake("topk_kl_bwd_inplace")
def _topk_kl_bwd_inplace_fake(grad_loss, logits, values, indices, lse, coef, stat, topk_mode, divergence, param,
                              temperature, values_are_logprobs, logit_scale=1.0, softcap=0.0):
    _topk_kl_bwd_fake(grad_loss, logits, values, indices, lse, coef, stat, topk_mode, divergence, param, temperature,
                      values_are_logprobs, logit_scale, softcap)
    if not logits.is_contiguous():
        _fail("inplace_grad=True needs contiguous student_logits (the gradient is written over them): got strides "
              f"{_shape_str(logits.stride())}")
    return None


@_fake("topk_kl_bwd")
def _topk_kl_bwd_fake(grad_loss, logits, values, indices, lse, coef, stat, mode, divergence, param,
                      temperature, values_are_logprobs, logit_scale=1.0, softcap=0.0):
    check_topk_options(mode, divergence, param, temperature, values_are_logprobs)
    check_logit_map(logit_scale, softcap)
    n, k, acc = logits.shape[0], 0 if mode == "dense" else values.shape[1], _acc_dtype(logits)
    for name, t, shape, exact in (("grad_loss", grad_loss, (n,), False), ("lse", lse, (n,), True),
                                  ("coef", coef, (n, k), True), ("stat", stat, (n, 4), True)):
        if t.device != logits.device:
            _fail(f"{name} must be on the device of logits ({logits.device}): got {t.device}")
        if tuple(t.shape) != shape:
            _fail(f"{name} must have shape {_shape_str(shape)}: got {_shape_str(t.shape)}")
        if exact and t.dtype != acc:
            _fail(f"{name} must be {acc}: got {t.dtype}")
        if not exact and not t.dtype.is_floating_point:
            _fail(f"{name} must be a floating tensor: got {t.dtype}")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Sinkhorn and the SinKD cost (csrc/common/sinkhorn_args.cpp; texts in docs/sinkhorn.md)
# ---------------------------------------------------------------------------------------------

_SINKHORN = "kdkernels.sinkhorn: "
_SINKD = "kdkernels.sinkhorn_kd_loss: "
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


def check_sinkhorn_options(eps, n_iters, tol, prefix=_SINKHORN):
    """The solver option checks of sinkhorn_parse, same texts."""
    if not eps > 0:
        raise ValueError(f"{prefix}eps must be > 0: got {eps}")
    if not n_iters >= 1:
        raise ValueError(f"{prefix}n_iters must be >= 1: got {n_iters}")
    if not tol >= 0:
        raise ValueError(f"{prefix}tol must be >= 0: got {tol}")


def check_sinkhorn_cost_options(temperature, cost):
    """The option checks of sinkhorn_cost_parse, same texts."""
    if cost not in ("l1", "sqeuclidean"):
        raise ValueError(f"{_SINKD}cost must be 'l1' or 'sqeuclidean': got '{cost}'")
    if not temperature > 0:
        raise ValueError(f"{_SINKD}temperature must be > 0: got {temperature}")


def _check_raw_cost(cost):
    if cost.dtype not in _FLOATS:
        raise ValueError(f"{_SINKHORN}cost must be {_DTYPE_NAMES}: got {cost.dtype}")
    if cost.dim() != 3:
        raise ValueError(f"{_SINKHORN}cost must be 3-D (B, n, m) for the raw op: got shape {tuple(cost.shape)}")


@_fake("sinkhorn_fwd")
def _sinkhorn_fwd_fake(cost, log_a, log_b, eps, n_iters, tol, return_plan, validate):
    _check_raw_cost(cost)
    check_sinkhorn_options(eps, n_iters, tol)
    B, n, m = cost.shape
    acc = _acc_dtype(cost)
    plan_shape = (B, n, m) if return_plan else (0,)
    return (cost.new_empty((B,), dtype=acc), cost.new_empty((B, n_iters, n), dtype=acc),
            cost.new_empty((B, n_iters, m), dtype=acc), cost.new_empty((B,), dtype=torch.int32),
            cost.new_empty(plan_shape, dtype=acc))


@_fake("sinkhorn_bwd")
def _sinkhorn_bwd_fake(grad_value, grad_plan, cost, log_a, log_b, f, g, iters, eps, grad, grad_marginals):
    if grad not in ("unrolled", "envelope"):
        raise ValueError(f"{_SINKHORN}grad must be 'unrolled' or 'envelope': got '{grad}'")
    _check_raw_cost(cost)
    B, n, m = cost.shape
    acc = _acc_dtype(cost)
    return (cost.new_empty(cost.shape),
            cost.new_empty((B, n) if log_a is not None else (0,), dtype=acc),
            cost.new_empty((B, m) if log_b is not None else (0,), dtype=acc))


def _check_raw_logits(student_logits, teacher_logits, temperature, cost):
    check_sinkhorn_cost_options(temperature, cost)
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{_SINKD}{name} must be {_DTYPE_NAMES}: got {t.dtype}")
    if student_logits.dim() != 3:
        raise ValueError(f"{_SINKD}student_logits must be 3-D (B, n, C) for the raw op: got shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.dim() != 3:
        raise ValueError(f"{_SINKD}teacher_logits must be 3-D (B, m, C) for the raw op: got shape "
                         f"{tuple(teacher_logits.shape)}")
    if teacher_logits.shape[2] != student_logits.shape[2]:
        raise ValueError(f"{_SINKD}teacher_logits must have the class dimension of student_logits: expected "
                         f"C = {student_logits.shape[2]}, got C = {teacher_logits.shape[2]}")


@_fake("sinkhorn_cost_fwd")
def _sinkhorn_cost_fwd_fake(student_logits, teacher_logits, temperature, cost, validate):
    _check_raw_logits(student_logits, teacher_logits, temperature, cost)
    B, n, _ = student_logits.shape
    return student_logits.new_empty((B, n, teacher_logits.shape[1]), dtype=_acc_dtype(student_logits))


@_fake("sinkhorn_cost_bwd")
def _sinkhorn_cost_bwd_fake(grad_cost, student_logits, teacher_logits, temperature, cost):
    _check_raw_logits(student_logits, teacher_logits, temperature, cost)
    return student_logits.new_empty(student_logits.shape)


# ---------------------------------------------------------------------------------------------
# Token-relation losses and the token contrastive loss (csrc/common/token_relation_args.cpp;
# texts in docs/token_relation.md)
# ---------------------------------------------------------------------------------------------

_TR = "kdkernels.token_relation_loss: "
_TC = "kdkernels.token_contrastive_loss: "
_TR_STATS = 4  # lse_t, lse_s, c_s, c_t per (instance, head, token)
_TOKEN_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _tshape(s):
    return str(tuple(s))


def check_token_similarity(similarity, prefix):
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"{prefix}similarity must be 'dot' or 'cosine': got '{similarity}'")


def check_token_relation_options(loss, similarity, num_heads, temperature, tau):
    """The option checks of token_relation_parse, same texts and order."""
    if loss not in ("kl", "mse"):
        raise ValueError(f"{_TR}loss must be 'kl' or 'mse': got '{loss}'")
    check_token_similarity(similarity, _TR)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise ValueError(f"{_TR}num_heads must be an int: got {num_heads!r}")
    if num_heads < 1:
        raise ValueError(f"{_TR}num_heads must be >= 1: got {num_heads}")
    if not temperature > 0:
        raise ValueError(f"{_TR}temperature must be > 0: got {temperature}")
    if not tau > 0:
        raise ValueError(f"{_TR}tau must be > 0: got {tau}")


def check_token_contrastive_options(similarity, tau):
    """The option checks of token_contrastive_parse, same texts and order."""
    check_token_similarity(similarity, _TC)
    if not tau > 0:
        raise ValueError(f"{_TC}tau must be > 0: got {tau}")


def check_token_features(prefix, student, teacher, mask, raw=True):
    """The feature checks of token_relation_args.cpp's check_features, same texts and order. raw=False
    leaves the mask's dtype to the caller (the public functions also take integer masks)."""
    for name, t in (("student_feats", student), ("teacher_feats", teacher)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _TOKEN_FLOATS:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{prefix}{name} must be float32, float16, bfloat16 or float64: got {got}")
    if student.dim() != 3:
        raise ValueError(f"{prefix}student_feats must be 3-D (B, T, Ds): got shape {_tshape(student.shape)}")
    if teacher.dim() != 3:
        raise ValueError(f"{prefix}teacher_feats must be 3-D (B, T, Dt): got shape {_tshape(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{prefix}teacher_feats must be on the device of student_feats: expected {student.device}, "
                         f"got {teacher.device}")
    if teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"{prefix}teacher_feats must have the (B, T) of student_feats: expected "
                         f"{_tshape(student.shape[:2])}, got {_tshape(teacher.shape[:2])}")
    if student.shape[1] < 1:
        raise ValueError(f"{prefix}student_feats must have T >= 1 tokens: got shape {_tshape(student.shape)}")
    if student.shape[2] < 1:
        raise ValueError(f"{prefix}student_feats must have a non-empty feature dimension: got shape "
                         f"{_tshape(student.shape)}")
    if teacher.shape[2] < 1:
        raise ValueError(f"{prefix}teacher_feats must have a non-empty feature dimension: got shape "
                         f"{_tshape(teacher.shape)}")
    if mask is not None:
        if mask.device != student.device:
            raise ValueError(f"{prefix}mask must be on the device of student_feats: expected {student.device}, "
                             f"got {mask.device}")
        if tuple(mask.shape) != tuple(student.shape[:2]):
            raise ValueError(f"{prefix}mask must have the (B, T) of student_feats: expected "
                             f"{_tshape(student.shape[:2])}, got {_tshape(mask.shape)}")
        if raw and mask.dtype != torch.bool:
            raise ValueError(f"{prefix}mask must be bool for the raw op: got {mask.dtype}")


def check_token_heads(num_heads, Ds, Dt):
    if Ds % num_heads:
        raise ValueError(f"{_TR}num_heads must divide Ds = {Ds} (the width of student_feats): got num_heads = {num_heads}")
    if Dt % num_heads:
        raise ValueError(f"{_TR}num_heads must divide Dt = {Dt} (the width of teacher_feats): got num_heads = {num_heads}")


def check_token_widths(Ds, Dt):
    if Dt != Ds:
        raise ValueError(f"{_TC}teacher_feats must have the width of student_feats (project the student first): "
                         f"expected D = {Ds}, got D = {Dt}")


@_fake("token_relation_fwd")
def _token_relation_fwd_fake(student, teacher, mask, loss, similarity, num_heads, temperature, tau):
    check_token_relation_options(loss, similarity, num_heads, temperature, tau)
    check_token_features(_TR, student, teacher, mask)
    P, n, Ds = student.shape
    check_token_heads(num_heads, Ds, teacher.shape[2])
    acc = _acc_dtype(student)
    return student.new_empty((P, n), dtype=acc), student.new_empty((P, num_heads, n, _TR_STATS), dtype=acc)


@_fake("token_relation_bwd")
def _token_relation_bwd_fake(grad_loss, student, teacher, mask, stat, loss, similarity, num_heads, temperature, tau,
                             teacher_grad):
    check_token_relation_options(loss, similarity, num_heads, temperature, tau)
    check_token_features(_TR, student, teacher, mask)
    check_token_heads(num_heads, student.shape[2], teacher.shape[2])
    return (student.new_empty(student.shape),
            teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty((0,)))


@_fake("token_contrastive_fwd")
def _token_contrastive_fwd_fake(student, teacher, mask, similarity, tau):
    check_token_contrastive_options(similarity, tau)
    check_token_features(_TC, student, teacher, mask)
    check_token_widths(student.shape[2], teacher.shape[2])
    P, n, _ = student.shape
    acc = _acc_dtype(student)
    return student.new_empty((P, n), dtype=acc), student.new_empty((P, n), dtype=acc)


@_fake("token_contrastive_bwd")
def _token_contrastive_bwd_fake(grad_loss, student, teacher, mask, lse, similarity, tau, teacher_grad):
    check_token_contrastive_options(similarity, tau)
    check_token_features(_TC, student, teacher, mask)
    check_token_widths(student.shape[2], teacher.shape[2])
    return (student.new_empty(student.shape),
            teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty((0,)))


# ---------------------------------------------------------------------------------------------
# Attention, shared (EchoAtt) attention and the layer similarity (csrc/common/attention_args.cpp;
# texts in docs/shared_attention.md)
# ---------------------------------------------------------------------------------------------

import math  # noqa: E402

ATTN_CUDA_MAX_HEAD_DIM = 128  # kAttnCudaMaxHeadDim: the CUDA kernels' largest head size (CPU: any)
ATTN_NAMES = dict(op="attention", q="q", k="k", v="v", lse="lse")
SHARED_NAMES = dict(op="shared_attention", q="q_anchor", k="k_anchor", v="v", lse="lse_anchor")
_ATTN_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _attn_fail(n, msg):
    raise ValueError(f"kdkernels.{n['op']}: {msg}")


def _attn_float(n, t, name):
    if not isinstance(t, torch.Tensor) or t.dtype not in _ATTN_FLOATS:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        _attn_fail(n, f"{name} must be float32, float16, bfloat16 or float64: got {got}")


def _attn_like(n, t, name, ref, ref_name):
    if not isinstance(t, torch.Tensor):
        _attn_fail(n, f"{name} must be a tensor: got {type(t).__name__}")
    if t.dtype != ref.dtype:
        _attn_fail(n, f"{name} must have the dtype of {ref_name}: expected {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        _attn_fail(n, f"{name} must be on the device of {ref_name}: expected {ref.device}, got {t.device}")


def _attn_head_dim(n, q, what, d):
    if d < 1:
        _attn_fail(n, f"{what} must be >= 1: got {d}")
    if q.device.type == "cuda" and d > ATTN_CUDA_MAX_HEAD_DIM:
        _attn_fail(n, f"the CUDA kernels take {what} <= {ATTN_CUDA_MAX_HEAD_DIM}: got {d} (the CPU ops take any size)")


def attn_acc_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_attention(n, q, k, v, lse, scale, mask=None, raw_mask=True):
    """attention_parse of csrc/common/attention_args.cpp, same texts and order. Returns (B, H, Hk, Tq, Tk, D, Dv).
    raw_mask=False leaves the mask to the caller (the public functions take broadcastable masks)."""
    _attn_float(n, q, n["q"])
    if q.dim() != 4:
        _attn_fail(n, f"{n['q']} must be 4-D (batch, heads, seq, head_dim): got shape {tuple(q.shape)}")
    _attn_like(n, k, n["k"], q, n["q"])
    if k.dim() != 4:
        _attn_fail(n, f"{n['k']} must be 4-D (batch, heads, seq, head_dim): got shape {tuple(k.shape)}")
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    if k.shape[0] != B:
        _attn_fail(n, f"{n['k']} must have the batch size of {n['q']}: expected {B}, got {k.shape[0]}")
    if k.shape[3] != D:
        _attn_fail(n, f"{n['k']} must have the head_dim of {n['q']}: expected {D}, got {k.shape[3]}")
    if not (Hk >= 1 and H % Hk == 0):
        _attn_fail(n, f"the heads of {n['q']} must be a multiple of the heads of {n['k']} (grouped-query attention): "
                      f"got {H} and {Hk}")
    Dv = D
    if v is not None:
        _attn_like(n, v, n["v"], q, n["q"])
        if v.dim() != 4:
            _attn_fail(n, f"{n['v']} must be 4-D (batch, heads, seq, head_dim): got shape {tuple(v.shape)}")
        if tuple(v.shape[:3]) != (B, Hk, Tk):
            _attn_fail(n, f"{n['v']} must have the (batch, heads, seq) of {n['k']}: expected {(B, Hk, Tk)}, got "
                          f"{tuple(v.shape[:3])}")
        Dv = v.shape[3]
    _attn_head_dim(n, q, "head_dim", D)
    if v is not None:
        _attn_head_dim(n, q, "the head_dim of v", Dv)
    acc = attn_acc_dtype(q)
    if lse is not None:
        if not isinstance(lse, torch.Tensor):
            _attn_fail(n, f"{n['lse']} must be a tensor: got {type(lse).__name__}")
        if lse.device != q.device:
            _attn_fail(n, f"{n['lse']} must be on the device of {n['q']}: expected {q.device}, got {lse.device}")
        if lse.dtype != acc:
            _attn_fail(n, f"{n['lse']} must be {acc} (the log-sum-exp kdkernels.attention returns for {q.dtype} "
                          f"inputs): got {lse.dtype}")
        if tuple(lse.shape) != (B, H, Tq):
            _attn_fail(n, f"{n['lse']} must have shape (B, H, Tq) = {(B, H, Tq)}: got {tuple(lse.shape)}")
    if raw_mask and mask is not None:
        check_raw_attn_mask(n, mask, q, n["q"], (B, H, Tq, Tk))
    if not math.isfinite(scale):
        _attn_fail(n, f"scale must be finite: got {scale}")
    return B, H, Hk, Tq, Tk, D, Dv


def check_raw_attn_mask(n, mask, q, q_name, shape):
    if mask.device != q.device:
        _attn_fail(n, f"mask must be on the device of {q_name}: expected {q.device}, got {mask.device}")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        _attn_fail(n, f"mask must be a bool tensor of shape (B, H, Tq, Tk) = {tuple(shape)} for the raw op (expand a "
                      f"broadcastable mask first): got {tuple(mask.shape)} {mask.dtype}")


def check_attention_grad(n, dims, grad_out, out, q):
    B, H, _, Tq, _, _, Dv = dims
    _attn_like(n, grad_out, "grad_out", q, n["q"])
    _attn_like(n, out, "out", q, n["q"])
    if tuple(grad_out.shape) != (B, H, Tq, Dv):
        _attn_fail(n, f"grad_out must have shape (B, H, Tq, Dv) = {(B, H, Tq, Dv)}: got {tuple(grad_out.shape)}")
    if tuple(out.shape) != (B, H, Tq, Dv):
        _attn_fail(n, f"out must have shape (B, H, Tq, Dv) = {(B, H, Tq, Dv)}: got {tuple(out.shape)}")


@_fake("attention_fwd")
def _attention_fwd_fake(q, k, v, mask, causal, scale):
    B, H, Hk, Tq, Tk, D, Dv = check_attention(ATTN_NAMES, q, k, v, None, scale, mask)
    return q.new_empty((B, H, Tq, Dv)), q.new_empty((B, H, Tq), dtype=attn_acc_dtype(q))


@_fake("attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, mask, causal, scale):
    dims = check_attention(ATTN_NAMES, q, k, v, lse, scale, mask)
    check_attention_grad(ATTN_NAMES, dims, grad_out, out, q)
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


@_fake("shared_attention_fwd")
def _shared_attention_fwd_fake(q, k, lse, v, mask, causal, scale):
    B, H, Hk, Tq, Tk, D, Dv = check_attention(SHARED_NAMES, q, k, v, lse, scale, mask)
    return q.new_empty((B, H, Tq, Dv))


@_fake("shared_attention_bwd")
def _shared_attention_bwd_fake(grad_out, q, k, lse, v, out, mask, causal, scale, grad_qk):
    dims = check_attention(SHARED_NAMES, q, k, v, lse, scale, mask)
    check_attention_grad(SHARED_NAMES, dims, grad_out, out, q)
    if not grad_qk:
        return q.new_empty((0,)), q.new_empty((0,)), q.new_empty(v.shape)
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


@_fake("shared_attention_group_bwd")
def _shared_attention_group_bwd_fake(grad_out, q, k, lse, v, out, mask, causal, scale):
    group = dict(SHARED_NAMES, op="shared_attention_group_bwd")
    if not isinstance(v, torch.Tensor) or v.dim() != 5 or v.shape[0] < 1:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        _attn_fail(group, f"v must be the sharing layers' values stacked (L, B, Hk, Tk, Dv) with L >= 1: got shape "
                          f"{got}")
    B, H, Hk, Tq, Tk, D, Dv = check_attention(SHARED_NAMES, q, k, v[0], lse, scale, mask)
    want = (v.shape[0], B, H, Tq, Dv)
    for name, t in (("grad_out", grad_out), ("out", out)):
        _attn_like(group, t, name, q, "q_anchor")
        if tuple(t.shape) != want:
            _attn_fail(group, f"{name} must have shape (L, B, H, Tq, Dv) = {want}: got {tuple(t.shape)}")
    return q.new_empty(q.shape), q.new_empty(k.shape)


@_fake("shared_attention_probs_fwd")
def _shared_attention_probs_fwd_fake(q, k, lse, mask, causal, scale):
    B, H, Hk, Tq, Tk, D, Dv = check_attention(SHARED_NAMES, q, k, None, lse, scale, mask)
    return q.new_empty((B, H, Tq, Tk))


@_fake("shared_attention_probs_bwd")
def _shared_attention_probs_bwd_fake(grad_probs, probs, q, k, scale):
    B, H, Hk, Tq, Tk, D, Dv = check_attention(SHARED_NAMES, q, k, None, None, scale)
    for name, t in (("grad_probs", grad_probs), ("probs", probs)):
        _attn_like(SHARED_NAMES, t, name, q, "q_anchor")
    for name, t in (("grad_probs", grad_probs), ("probs", probs)):
        if tuple(t.shape) != (B, H, Tq, Tk):
            _attn_fail(SHARED_NAMES, f"{name} must have shape (B, H, Tq, Tk) = {(B, H, Tq, Tk)}: got {tuple(t.shape)}")
    return q.new_empty(q.shape), q.new_empty(k.shape)


SIM_NAMES = dict(op="attention_similarity")


def check_attention_similarity(qs, ks, mask, scale, metric):
    """attention_similarity_parse, same texts and order (the raw op's stacked 5-D layout)."""
    n = SIM_NAMES
    if metric not in ("js", "cosine"):
        _attn_fail(n, f"metric must be 'js' or 'cosine': got '{metric}'")
    _attn_float(n, qs, "qs")
    if qs.dim() != 5:
        _attn_fail(n, f"qs must be 5-D (layers, batch, heads, seq, head_dim) for the raw op: got shape "
                      f"{tuple(qs.shape)}")
    _attn_like(n, ks, "ks", qs, "qs")
    if ks.dim() != 5:
        _attn_fail(n, f"ks must be 5-D (layers, batch, heads, seq, head_dim) for the raw op: got shape "
                      f"{tuple(ks.shape)}")
    L, B, H, Tq, D = qs.shape
    Hk, Tk = ks.shape[2], ks.shape[3]
    if L < 1:
        _attn_fail(n, f"qs must hold at least one layer: got shape {tuple(qs.shape)}")
    if (ks.shape[0], ks.shape[1], ks.shape[4]) != (L, B, D):
        _attn_fail(n, f"ks must have the (layers, batch, ..., head_dim) of qs: expected {(L, B, D)}, got "
                      f"{(ks.shape[0], ks.shape[1], ks.shape[4])}")
    if not (Hk >= 1 and H % Hk == 0):
        _attn_fail(n, f"the heads of qs must be a multiple of the heads of ks (grouped-query attention): got {H} and "
                      f"{Hk}")
    _attn_head_dim(n, qs, "head_dim", D)
    if mask is not None:
        check_raw_attn_mask(n, mask, qs, "qs", (B, H, Tq, Tk))
    if not math.isfinite(scale):
        _attn_fail(n, f"scale must be finite: got {scale}")
    return L


@_fake("attention_similarity")
def _attention_similarity_fake(qs, ks, mask, causal, scale, metric):
    L = check_attention_similarity(qs, ks, mask, scale, metric)
    return qs.new_empty((L, L), dtype=attn_acc_dtype(qs))
