"""Benchmark of kdkernels.token_relation_loss / token_contrastive_loss (forward+backward) against the
materialised references (eager and under torch.compile) and the similarity GEMMs, with the spec's bars."""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # `import common` as a script and under pytest
try:
    import kdkernels
except ModuleNotFoundError:  # a source checkout built in place but not pip-installed
    sys.path.insert(1, os.path.dirname(_HERE))
    import kdkernels

import torch  # noqa: E402

import common  # noqa: E402
from kdkernels.reference import token_contrastive_loss_ref, token_relation_loss_ref  # noqa: E402

# The spec's bar shapes (shared/design/ops/token_relation.md, "Bars") and small ones for a quick look.
FULL = {"cpu": dict(B=1, T=4096, Ds=256, Dt=256, H=1, dtype=torch.float32),
        "cuda": dict(B=8, T=4096, Ds=384, Dt=768, H=12, dtype=torch.bfloat16)}
QUICK = {"cpu": dict(B=1, T=1024, Ds=128, Dt=128, H=1, dtype=torch.float32),
         "cuda": dict(B=2, T=2048, Ds=384, Dt=768, H=12, dtype=torch.bfloat16)}
# GPU only: the length where the materialised reference cannot run (one (H, T, T) bf16 graph is 26 GB).
LONG_T = 32768
ALL_CASES = ("kl", "mse", "contrastive")

# Bars (spec): CPU >= 1.5x eager with memory far below T x T (here: under a quarter of one float32
# T x T matrix, the reference holds several, plus 4 MiB for the per-thread 256 x 256 tiles); GPU >= 4x eager, within 1.5x of the similarity GEMMs timed with torch.matmul, peak memory
# O(B T (Ds + Dt)) (here: at most 32 bytes per (token, feature) of both models: the 16-bit feature
# copies, the float32 gradient accumulator and its re-ordered copies).
# The tensor-core bar shape (issue 13): KL, bf16, forward + backward <= 1.5x the two cuBLAS GEMMs it implies
TC_SHAPE = dict(B=8, T=4096, Ds=1024, Dt=1024, H=16, dtype=torch.bfloat16)
H200_BF16_TFLOPS = 989.0  # dense bf16 tensor-core rate, for the fraction-of-peak column
CPU_SPEEDUP_BAR = 1.5
GPU_SPEEDUP_BAR = 4.0
GPU_GEMM_BAR = 1.5
BYTES_PER_TOKEN_FEATURE = 32
CPU_WORKSPACE = 4 << 20


def make_inputs(shape, case, device, seed=0, T=None):
    """Student (B, T, Ds) features requiring grad, teacher (B, T, Dt) (Ds for the contrastive case)."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, T = shape["B"], T or shape["T"]
    Dt = shape["Ds"] if case == "contrastive" else shape["Dt"]
    s = torch.randn(B, T, shape["Ds"], generator=g, device=device).to(shape["dtype"]).requires_grad_()
    t = torch.randn(B, T, Dt, generator=g, device=device).to(shape["dtype"])
    return s, t


def loss_kwargs(case, shape):
    if case == "contrastive":
        return dict(tau=0.1, similarity="cosine")
    return dict(loss=case, num_heads=shape["H"])


def loss_fns(case, shape, compile_ref: bool):
    """(impl name, fn(s, t) -> scalar loss) for every implementation of this case."""
    kw = loss_kwargs(case, shape)
    op, ref = ((kdkernels.token_contrastive_loss, token_contrastive_loss_ref) if case == "contrastive"
               else (kdkernels.token_relation_loss, token_relation_loss_ref))
    fns = [("kdkernels", lambda s, t: op(s, t, **kw)), ("reference eager", lambda s, t: ref(s, t, **kw))]
    if compile_ref:
        compiled = torch.compile(ref)
        fns.append(("reference torch.compile", lambda s, t: compiled(s, t, **kw)))
    return fns


def gemm_step(case, shape, s, t):
    """The similarity products the op must do, as torch.matmul on the same shapes (materialised):
    forward graph(s), the backward's recomputation and its gradient product dS = G S."""
    B, T, H = s.shape[0], s.shape[1], shape["H"]
    if case == "contrastive":
        sh, th = s.detach(), t.detach()

        def step():
            c = torch.matmul(sh, th.transpose(1, 2))  # forward logits
            c = torch.matmul(sh, th.transpose(1, 2))  # backward: recomputed
            return torch.matmul(c, th)  # dS = G T
        return step
    ys = s.detach().reshape(B, T, H, -1).transpose(1, 2)
    yt = t.detach().reshape(B, T, H, -1).transpose(1, 2)

    def step():
        for _ in range(2):  # forward, then the backward's recomputation
            torch.matmul(yt, yt.transpose(-1, -2))
            g = torch.matmul(ys, ys.transpose(-1, -2))
        return torch.matmul(g, ys)  # dYs = M Ys
    return step


def fwd_bwd(fn, s, t):
    """One training step of the loss: a fresh gradient each call, as in training (grad set to None)."""
    def step():
        s.grad = None
        fn(s, t).backward()
    return step


def run_case(device, shape, case, compile_ref, log, T=None, impls=None):
    B, T = shape["B"], T or shape["T"]
    dname = str(shape["dtype"]).replace("torch.", "")
    Dt = shape["Ds"] if case == "contrastive" else shape["Dt"]
    heads = "" if case == "contrastive" else f" H={shape['H']}"
    name = "contrastive" if case == "contrastive" else f"relation {case}"
    label = f"{name} B={B} T={T} Ds={shape['Ds']} Dt={Dt}{heads} {dname}"
    s, t = make_inputs(shape, case, device, T=T)
    extra = dict(case_kind=case, B=B, T=T, Ds=shape["Ds"], Dt=Dt, H=shape["H"], dtype=dname)
    rows, losses, grads = [], {}, {}
    fns = loss_fns(case, shape, compile_ref)
    if impls is not None:
        fns = [f for f in fns if f[0] in impls]
    for impl, fn in fns:
        log(f"  {label}: {impl} ...")
        try:
            t0 = time.perf_counter()
            s.grad = None
            loss = fn(s, t)
            loss.backward()  # first call: compiles (torch.compile) here
            common.synchronize(device)
            first = round(time.perf_counter() - t0, 3)
            losses[impl] = float(loss.detach().float())
            grads[impl] = s.grad.detach().clone()
            step = fwd_bwd(fn, s, t)
            timing = common.time_fn(step, device)
            s.grad = None
            peak = common.peak_memory(step, device)
        except Exception as e:  # a baseline that cannot run here (e.g. out of memory) is reported, not fatal
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(common.make_row(device, label, impl, None, error=msg, **extra))
            log(f"    failed: {msg}")
            s.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append(common.make_row(device, label, impl, timing, loss=losses[impl], first_call_s=first,
                                    peak_bytes=peak, **extra))
        log(f"    {timing['ms']:.3f} ms (median of {timing['runs']})")
    if impls is None or "similarity GEMMs (torch.matmul)" in impls:
        log(f"  {label}: similarity GEMMs (torch.matmul) ...")
        try:
            timing = common.time_fn(gemm_step(case, shape, s, t), device)
            rows.append(common.make_row(device, label, "similarity GEMMs (torch.matmul)", timing, **extra))
            log(f"    {timing['ms']:.3f} ms")
        except Exception as e:
            rows.append(common.make_row(device, label, "similarity GEMMs (torch.matmul)", None,
                                        error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", **extra))
    s.grad = None
    # The GEMM FLOPs the loss implies: both similarity graphs (2 B T^2 D each) forward, and the student's
    # gradient (G F, twice: both sides of the symmetric product) backward.
    flops = 2.0 * B * T * T * (shape["Ds"] + Dt) + 4.0 * B * T * T * shape["Ds"]
    for r in rows:
        if not r.get("error") and r.get("ms"):
            r["tflops"] = float(f"{flops / (r['ms'] * 1e-3) / 1e12:.3g}")
            if device.type == "cuda":
                r["frac_peak"] = round(r["tflops"] / H200_BF16_TFLOPS, 3)
    _agreement(rows, losses, grads)
    _bars(device, rows, B, T, shape["Ds"], Dt)
    del s, t, grads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _agreement(rows, losses, grads):
    """Each row's loss against the eager reference's, and kdkernels' gradient against the reference's:
    a fast wrong kernel must not look like a win."""
    ref = losses.get("reference eager")
    for r in rows:
        if r.get("error") or ref is None or r["impl"] not in losses or r["impl"] == "reference eager":
            continue
        note = f"loss rel diff vs eager {abs(losses[r['impl']] - ref) / max(abs(ref), 1e-12):.1e}"
        g, gr = grads.get(r["impl"]), grads.get("reference eager")
        if g is not None and gr is not None:
            rel = float((g.float() - gr.float()).abs().max()) / max(float(gr.float().abs().max()), 1e-30)
            note += f", grad max diff / max |grad| {rel:.1e}"
        r["note"] = note


def _bars(device, rows, B, T, Ds, Dt):
    by = {r["impl"]: r for r in rows if not r.get("error")}
    kdk = by.get("kdkernels")
    if kdk is None:
        for r in rows:
            if r["impl"] == "kdkernels":
                common.check_bar(r, "runs", False)
        return
    eager = by.get("reference eager")
    if device.type == "cpu":
        if eager:
            sp = eager["ms"] / kdk["ms"]
            common.check_bar(kdk, f">= {CPU_SPEEDUP_BAR:g}x eager (got {sp:.2f}x)", sp >= CPU_SPEEDUP_BAR)
        budget = T * T * 4 / 4 + CPU_WORKSPACE
        peak = kdk.get("peak_bytes")
        common.check_bar(kdk, f"peak < T x T float32 / 4 + 4 MiB = {budget / 2**20:.0f} MiB",
                         None if peak is None else peak < budget)
        return
    gemm = by.get("similarity GEMMs (torch.matmul)")
    if gemm:
        kdk["floor_ms"] = gemm["ms"]
        common.check_bar(kdk, f"<= {GPU_GEMM_BAR:g}x similarity GEMMs (got {kdk['ms'] / gemm['ms']:.2f}x)",
                         kdk["ms"] <= GPU_GEMM_BAR * gemm["ms"])
    if eager:
        sp = eager["ms"] / kdk["ms"]
        common.check_bar(kdk, f">= {GPU_SPEEDUP_BAR:g}x eager (got {sp:.1f}x)", sp >= GPU_SPEEDUP_BAR)
    budget = BYTES_PER_TOKEN_FEATURE * B * T * (Ds + Dt)
    peak = kdk.get("peak_bytes")
    common.check_bar(kdk, f"peak <= {BYTES_PER_TOKEN_FEATURE} B x B T (Ds + Dt) = {budget / 2**20:.0f} MiB",
                     None if peak is None else peak <= budget)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--cases", default=None,
                   help=f"comma list of {', '.join(ALL_CASES)} (default: all on CUDA; kl,mse on CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes (seconds); the bars are for the full shapes")
    p.add_argument("--compile-cases", default="kl",
                   help="cases whose reference also runs under torch.compile: a comma list, 'all' or 'none'")
    p.add_argument("--no-long", action="store_true", help=f"skip the GPU run at T = {LONG_T}")
    p.add_argument("--out", default=None, help="write rows to .csv, .json or .jsonl (appended)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_token_relation: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shape = (QUICK if a.quick else FULL)[device.type]
    cases = a.cases.split(",") if a.cases else (list(ALL_CASES) if device.type == "cuda" else ["kl", "mse"])
    bad = [c for c in cases if c not in ALL_CASES]
    if bad:
        p.error(f"unknown case(s) {bad}: choose from {ALL_CASES}")
    compile_cases = (set(ALL_CASES) if a.compile_cases == "all" else set() if a.compile_cases == "none"
                     else set(a.compile_cases.split(",")))
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))

    rows = []
    for case in cases:
        rows += run_case(device, shape, case, case in compile_cases, log)
    if device.type == "cuda" and not a.quick and "kl" in cases:
        rows += run_case(device, TC_SHAPE, "kl", False, log, impls=("kdkernels", "reference eager",
                                                                  "similarity GEMMs (torch.matmul)"))
    if device.type == "cuda" and not a.no_long and not a.quick and "kl" in cases:
        # T = 32768 at B = 1: kdkernels runs; the reference is tried and reported (out of memory).
        long_shape = dict(shape, B=1)
        rows += run_case(device, long_shape, "kl", False, log, T=LONG_T, impls=("kdkernels", "reference eager"))

    print(f"\n## token_relation forward+backward ({'quick shapes' if a.quick else 'bar shapes'})\n")
    print(common.header(device) + "\n")
    print(common.summary_table(rows))
    notes = [f"- {r['case']} / {r['impl']}: {r['note']}" for r in rows if r.get("note")]
    notes += [f"- {r['case']} / {r['impl']}: {r['tflops']} TFLOP/s of implied GEMM work" +
              (f" ({100 * r['frac_peak']:.1f}% of the H200's {H200_BF16_TFLOPS:g} TFLOP/s bf16)" if "frac_peak" in r
               else "") for r in rows if r.get("tflops") is not None]
    if notes:
        print("\n" + "\n".join(notes))
    if a.out:
        common.write_rows(rows, a.out)
    failed = [r for r in rows if r.get("result") == "FAIL"]
    print(f"\nbars: {sum(r.get('result') == 'PASS' for r in rows)} PASS, {len(failed)} FAIL")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry points: `pytest benchmarks/bench_token_relation.py --benchmark-only`
# (KDK_BENCH_QUICK=1 for the small shapes). One test per (device, case, implementation).
# ----------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the script itself needs no pytest
    pytest = None

if pytest is not None:
    _DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    _IMPLS = ["kdkernels", "reference eager", "reference torch.compile"]

    @pytest.mark.parametrize("impl", _IMPLS)
    @pytest.mark.parametrize("case", ["kl", "mse", "contrastive"])
    @pytest.mark.parametrize("device", _DEVICES)
    def test_token_relation_fwd_bwd(benchmark, device, case, impl):
        dev = torch.device(device)
        shape = (QUICK if os.environ.get("KDK_BENCH_QUICK") == "1" else FULL)[dev.type]
        fn = dict(loss_fns(case, shape, impl.endswith("compile")))[impl]
        s, t = make_inputs(shape, case, dev)
        step = common.synced(fwd_bwd(fn, s, t), dev)
        try:
            step()  # compile / first-call costs stay out of the statistics
        except Exception as e:
            if impl.endswith("compile"):
                pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e)[:200]}")
            raise
        benchmark.extra_info.update(common.env_info(dev))
        benchmark.extra_info.update(case=case, impl=impl, **{k: str(v) for k, v in shape.items()})
        benchmark.pedantic(step, rounds=10 if dev.type == "cpu" else 30, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
