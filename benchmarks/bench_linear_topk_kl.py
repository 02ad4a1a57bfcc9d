"""Benchmark of kdkernels.linear_topk_kl_div (forward+backward) against the unfused path, with issue 7's bars."""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
    import kdkernels
except ModuleNotFoundError:  # a source checkout built in place but not pip-installed
    sys.path.insert(1, os.path.dirname(_HERE))
    import kdkernels

import torch  # noqa: E402

import common  # noqa: E402

# Issue 7's bar shape on GPU; a CPU shape whose unfused logits are 0.5 GB; small ones for a quick look.
FULL = {"cpu": dict(N=4096, H=256, V=32000, K=64, dtype=torch.float32),
        "cuda": dict(N=8192, H=4096, V=128256, K=64, dtype=torch.bfloat16)}
QUICK = {"cpu": dict(N=512, H=128, V=8000, K=32, dtype=torch.float32),
         "cuda": dict(N=2048, H=2048, V=32000, K=64, dtype=torch.bfloat16)}
MEMORY_BAR = 0.25  # peak <= 1/4 of the unfused path's
TIME_BAR = 1.15    # time <= 1.15x the unfused path's (GPU)


def make_inputs(N, H, V, K, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, H, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, device=device, dtype=torch.float32) / H ** 0.5).to(dtype).requires_grad_()
    start = torch.randint(0, V, (N, 1), generator=g, device=device)
    ids = (start + torch.arange(K, device=device) * (V // K)) % V
    vals = torch.log_softmax(torch.randn(N, K, generator=g, device=device), -1) - 0.1
    return h, w, vals, ids


def impls(device):
    validate = device.type != "cuda"
    kw = dict(values_are="logprobs", mode="tail", validate=validate)
    fns = [("kdkernels fused linear", lambda h, w, v, i: kdkernels.linear_topk_kl_div(h, w, v, i, **kw)),
           ("unfused: logits GEMM + kdkernels.topk_kl_div",
            lambda h, w, v, i: kdkernels.topk_kl_div(h @ w.t(), v, i, **kw))]
    try:  # Liger's fused linear JSD (a dense teacher: it also runs the teacher's head GEMM) where installed
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:
        return fns
    jsd = LigerFusedLinearJSD(jsd_beta=0.5)
    teacher = {}

    def liger(h, w, v, i):
        if "w" not in teacher:  # a teacher head of the same shape, made once
            teacher["h"], teacher["w"] = h.detach().clone(), w.detach().clone()
        return jsd(h, w, teacher["h"], teacher["w"])
    fns.append(("Liger LigerFusedLinearJSD (dense teacher)", liger))
    return fns


def step_of(fn, h, w, v, i):
    def step():
        h.grad = None
        w.grad = None
        fn(h, w, v, i).backward()
    return step


def bf16_gradient_errors(device, N=48, H=64, V=32000, K=32, seed=3):
    """Relative gradient error (norm) against float64 at bf16 inputs and LLM-sized logits: the fused path
    (float32 chunk logits) beside the unfused one (bf16 logits upcast before the loss, as HF steps do)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).bfloat16()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * (8 / H ** 0.5)).bfloat16()
    t = h.double() @ w.double().t() + torch.randn(N, V, generator=g, dtype=torch.float64)
    vals, ids = kdkernels.teacher_topk(t, K, values_are="logprobs")
    kw = dict(mode="tail", values_are="logprobs", divergence="reverse_kl")
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.autograd.grad(kdkernels.topk_kl_div(h64 @ w64.t(), vals, ids, **kw), (h64, w64))
    out = {}
    for name, fn in (("fused", lambda a, b: kdkernels.linear_topk_kl_div(a, b, vals.float().to(device),
                                                                          ids.to(device), **kw)),
                     ("unfused", lambda a, b: kdkernels.topk_kl_div((a @ b.t()).float(), vals.float().to(device),
                                                                     ids.to(device), **kw))):
        a, b = h.to(device).requires_grad_(), w.to(device).requires_grad_()
        grads = torch.autograd.grad(fn(a, b), (a, b))
        out[name] = [float((x.double().cpu() - r).norm() / r.norm()) for x, r in zip(grads, ref)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = (QUICK if a.quick else FULL)[device.type]
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))
    N, H, V, K, dtype = (shape[k] for k in ("N", "H", "V", "K", "dtype"))
    case = f"tail N={N} H={H} V={V} K={K} {str(dtype).replace('torch.', '')}"
    h, w, vals, ids = make_inputs(N, H, V, K, dtype, device)
    rows, by = [], {}
    for impl, fn in impls(device):
        log(f"  {case}: {impl} ...")
        try:
            t0 = time.perf_counter()
            loss = fn(h, w, vals, ids)
            loss.backward()
            common.synchronize(device)
            timing = common.time_fn(step_of(fn, h, w, vals, ids), device)
            peak = common.peak_memory(step_of(fn, h, w, vals, ids), device)
        except Exception as e:
            rows.append(common.make_row(device, case, impl, None, error=f"{type(e).__name__}: {e}"))
            continue
        row = common.make_row(device, case, impl, timing, peak_bytes=peak, loss=float(loss.detach()),
                              first_call_s=round(time.perf_counter() - t0, 3))
        # Logits GEMM + two gradient GEMMs: the FLOP floor of either path.
        row["floor_ms"] = common.floor_ms(device, flops=3 * 2 * N * H * V) if device.type == "cuda" else None
        rows.append(row)
        by[impl] = row
        log(f"    {timing['ms']:.2f} ms, peak {peak / 2**20 if peak else float('nan'):.0f} MiB")
    fused, unfused = by.get("kdkernels fused linear"), by.get("unfused: logits GEMM + kdkernels.topk_kl_div")
    if fused and unfused:
        rel = abs(fused["loss"] - unfused["loss"]) / max(abs(unfused["loss"]), 1e-12)
        fused["note"] = f"loss rel diff vs unfused {rel:.1e}"
        if fused.get("peak_bytes") is not None and unfused.get("peak_bytes"):
            ratio = fused["peak_bytes"] / unfused["peak_bytes"]
            # The bar is for the bar shapes: at --quick shapes all rows fit one chunk of the default budget.
            common.check_bar(fused, f"peak <= {MEMORY_BAR:g} x unfused (got {ratio:.2f})",
                             None if a.quick else ratio <= MEMORY_BAR)
        t = fused["ms"] / unfused["ms"]
        common.check_bar(fused, f"time <= {TIME_BAR:g} x unfused (got {t:.2f})",
                         t <= TIME_BAR if device.type == "cuda" else None)

    def baseline_of(r):
        return unfused if r is not unfused else None

    errs = bf16_gradient_errors(device)
    precision = (f"- bf16 gradients vs float64 (V = 32000, |logits| ~ 30; hidden, weight): fused "
                 f"{errs['fused'][0]:.1e}, {errs['fused'][1]:.1e}; unfused (bf16 logits) "
                 f"{errs['unfused'][0]:.1e}, {errs['unfused'][1]:.1e}")
    log(precision)

    print(f"\n## linear_topk_kl_div forward+backward ({'quick shapes' if a.quick else 'bar shapes'})\n")
    print(common.header(device) + "\n")
    print(common.summary_table(rows, baseline_of))
    notes = [f"- {r['impl']}: {r['note']}" for r in rows if r.get("note")] + [precision]
    if notes:
        print("\n" + "\n".join(notes))
    if a.out:
        common.write_rows(rows, a.out)
    failed = [r for r in rows if r.get("result") == "FAIL"]
    print(f"\nbars: {sum(r.get('result') == 'PASS' for r in rows)} PASS, {len(failed)} FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
