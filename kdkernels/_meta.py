"""Fake (meta) kernels of every kdkernels op, so torch.compile can trace them; they mirror the C++ shape checks."""
import torch

_PREFIX = "kdkernels.topk_kl_div: "
_MODES = ("renorm", "tail", "support", "dense")
_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def _fail(msg):
    raise ValueError(_PREFIX + msg)


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


@torch.library.register_fake("kdkernels::topk_kl_fwd")
def _topk_kl_fwd_fake(logits, values, indices, row_mask, mode, divergence, param, temperature,
                      values_are_logprobs, drop_out_of_range, validate):
    check_topk_options(mode, divergence, param, temperature, values_are_logprobs)
    n = logits.shape[0]
    k = 0 if mode == "dense" else values.shape[1]
    acc = _acc_dtype(logits)
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((n, k), dtype=acc), logits.new_empty((n, 2), dtype=acc))


@torch.library.register_fake("kdkernels::topk_kl_bwd")
def _topk_kl_bwd_fake(grad_loss, logits, values, indices, lse, coef, stat, mode, divergence, param,
                      temperature, values_are_logprobs):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)
