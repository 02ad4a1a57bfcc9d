"""Test helpers: per-dtype tolerances, random inputs of awkward shapes, comparisons against float64."""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# Tolerances. Inputs are rounded to the tested dtype *before* the float64 reference sees them, so
# these bound only the op's own arithmetic: the loss is accumulated (and returned) in float32 for
# every low-precision input, while the gradient is returned in the logits' dtype and so carries
# one rounding of that dtype (bf16: 2^-8, fp16: 2^-11 relative). Gradient atol is a fraction of
# the largest gradient entry, because most entries are q_v * G, tiny at large V.
# ---------------------------------------------------------------------------------------------

LOSS_TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1e-3, atol=1e-4),
}

GRAD_TOL = {  # atol is relative to max |expected|
    torch.float64: dict(rtol=1e-7, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def assert_loss_close(actual, expected, dtype, msg=""):
    """Loss of the op (float32/float64) vs the float64 reference."""
    tol = LOSS_TOL[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), rtol=tol["rtol"], atol=tol["atol"], msg=msg or None
    )


def assert_grad_close(actual, expected, dtype, msg=""):
    """Gradient of the op (in the logits' dtype) vs the float64 reference's gradient."""
    tol = GRAD_TOL[dtype]
    expected = expected.double().cpu()
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double().cpu(), expected, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-12), msg=msg or None
    )


# ---------------------------------------------------------------------------------------------
# Inputs. Everything is drawn in float64 on the CPU (one stream of random numbers whatever the
# device), rounded to the tested dtype, then moved; values are never exactly zero.
# ---------------------------------------------------------------------------------------------


def _randn(*shape, scale=2.0):
    x = torch.randn(*shape, dtype=torch.float64) * scale
    # An exact zero is a value a kernel could "get right" by never reading it.
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


def make_student(N, V, dtype=torch.float32, device="cpu", layout="contiguous", lead=None, requires_grad=True):
    """Student logits (N, V) (or lead + (V,)): 'contiguous', 'slice' (unit stride on V, padded rows:
    a slice of a bigger tensor) or 'transposed' (stride on V != 1)."""
    shape = tuple(lead) if lead is not None else (N,)
    n = 1
    for s in shape:
        n *= s
    if layout == "contiguous":
        z = _randn(n, V).to(dtype).reshape(*shape, V).to(device)
    elif layout == "slice":
        big = _randn(n, V + 7).to(dtype).to(device)
        z = big[:, 3 : 3 + V].view(*shape, V)
    elif layout == "transposed":
        z = _randn(V, n).to(dtype).to(device).t().view(*shape, V)
    else:
        raise ValueError(layout)
    if requires_grad:
        z.requires_grad_(True)
    return z


def unique_ids(N, V, K, id_dtype=torch.int64, device="cpu"):
    """K distinct ids in [0, V) per row, in random order."""
    return torch.rand(N, V).argsort(dim=-1)[:, :K].to(id_dtype).to(device)


def make_teacher(N, V, K, values_are="logits", mode="renorm", temperature=1.0, dtype=torch.float32,
                 device="cpu", id_dtype=torch.int64):
    """(values, ids) as a cache would hold them: raw logits at S, or full-vocab log-probs at T at S.
    For mode='dense' values are (N, V) (log-probs at T when values_are='logprobs') and ids None."""
    full = _randn(N, V)
    if values_are == "logprobs":
        full = torch.log_softmax(full / temperature, dim=-1)
    if mode == "dense":
        return full.to(dtype).to(device), None
    ids = unique_ids(N, V, K, id_dtype)
    vals = full.gather(-1, ids.long())
    return vals.to(dtype).to(device), ids.to(device)


def upcast(*tensors):
    """Detached float64 CPU copies (ints stay ints) for the reference, with grad where useful."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        elif t.is_floating_point():
            out.append(t.detach().double().cpu())
        else:
            out.append(t.detach().cpu())
    return out


def ref_loss_and_grad(ref_fn, student, values, ids, upstream=None, **kwargs):
    """Run the reference in float64 and return (loss, d(sum(upstream * loss))/d student)."""
    z, v, i = upcast(student, values, ids)
    z.requires_grad_(True)
    kw = dict(kwargs)
    for key in ("mask", "labels"):
        if kw.get(key) is not None:
            kw[key] = kw[key].cpu()
    loss = ref_fn(z, v, i, **kw)
    g = torch.ones_like(loss) if upstream is None else upstream.double().cpu()
    (grad,) = torch.autograd.grad((loss * g).sum(), z, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(z)
    return loss.detach(), grad


# Prepended to the subprocess scripts that measure one step's peak memory above its start (Linux /proc).
PEAK_RSS = r"""
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak-RSS counter (VmHWM)
    return rss("VmRSS:")
"""
