"""Benchmark of kdkernels.sinkhorn and kdkernels.sinkhorn_kd_loss (forward+backward) against the eager
batched log-domain reference, that reference under torch.compile, and POT's batch solver, with the spec's bars."""

from __future__ import annotations

import argparse
import inspect
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
from kdkernels.reference import sinkhorn_kd_loss_ref, sinkhorn_ref  # noqa: E402

# The spec's cases (shared/design/ops/sinkhorn.md, "Bars") and small ones for a quick look. Solver cases
# run with uniform marginals, POT's default, so every implementation solves the same problem.
EPS, ITERS = 0.1, 20
SOLVER = {"cpu": [dict(B=256, n=64, m=64)], "cuda": [dict(B=4096, n=64, m=64)]}
SOLVER_QUICK = {"cpu": [dict(B=64, n=64, m=64)], "cuda": [dict(B=512, n=64, m=64)]}
SINKD = {"cpu": [dict(B=None, L=32, C=2), dict(B=None, L=32, C=100), dict(B=None, L=32, C=1000),
                 dict(B=8, L=128, C=50)],
         "cuda": [dict(B=None, L=32, C=2), dict(B=None, L=32, C=100), dict(B=None, L=32, C=1000),
                  dict(B=64, L=512, C=50)]}
SINKD_QUICK = {"cpu": [dict(B=None, L=32, C=100), dict(B=4, L=64, C=50)],
               "cuda": [dict(B=None, L=32, C=100), dict(B=16, L=256, C=50)]}

# Bars (spec): CPU >= 3x eager at B = 256, 64 x 64 float32; H200 >= 20x eager and >= 50x POT at B = 4096,
# 64 x 64, memory above the inputs O(B (n + m) L) + one plan; SinKD >= 10x eager (cost construction included).
CPU_SOLVER_BAR = 3.0
GPU_SOLVER_EAGER_BAR = 20.0
GPU_SOLVER_POT_BAR = 50.0
GPU_SINKD_BAR = 10.0


def _pot():
    try:
        import ot  # noqa: F401
        from ot.batch import solve_batch
    except Exception:
        return None
    # the spec's call says solver='log_sinkhorn' (POT 0.9.6); POT 0.9.7 renamed it method
    key = "method" if "method" in inspect.signature(solve_batch).parameters else "solver"

    def pot(cost):
        res = solve_batch(cost, EPS, max_iter=ITERS, tol=0, grad="autodiff", **{key: "log_sinkhorn"})
        return res.value_linear

    return pot


def solver_fns(device, compile_ref: bool, with_pot: bool):
    """(impl name, fn(cost) -> per-problem values) for every implementation of the solver case."""
    validate = device.type != "cuda"  # on CUDA validate=True is one host sync; a training loop skips it
    fns = [(f"kdkernels{'' if validate else ' (validate=False)'}",
            lambda c: kdkernels.sinkhorn(c, EPS, ITERS, marginals="uniform", validate=validate)),
           ("reference eager", lambda c: sinkhorn_ref(c, EPS, ITERS, marginals="uniform"))]
    if compile_ref:
        compiled = torch.compile(sinkhorn_ref)
        fns.append(("reference torch.compile", lambda c: compiled(c, EPS, ITERS, marginals="uniform")))
    pot = _pot() if with_pot else None
    if pot is not None:
        fns.append(("POT ot.batch.solve_batch (torch)", pot))
    return fns


def sinkd_fns(device, compile_ref: bool):
    validate = device.type != "cuda"
    fns = [(f"kdkernels{'' if validate else ' (validate=False)'}",
            lambda s, t: kdkernels.sinkhorn_kd_loss(s, t, validate=validate)),
           ("reference eager", lambda s, t: sinkhorn_kd_loss_ref(s, t))]
    if compile_ref:
        compiled = torch.compile(sinkhorn_kd_loss_ref)
        fns.append(("reference torch.compile", lambda s, t: compiled(s, t)))
    return fns


def _measure(device, case, impl, step, first, extra, log):
    """Time `step` (one forward+backward); `first` is the first call (compiles, checks agreement)."""
    try:
        t0 = time.perf_counter()
        out = first()
        common.synchronize(device)
        extra["first_call_s"] = round(time.perf_counter() - t0, 3)
        timing = common.time_fn(step, device)
        extra["peak_bytes"] = common.peak_memory(step, device)
    except Exception as e:  # a baseline that cannot run here is reported, not fatal
        log(f"    failed: {type(e).__name__}: {str(e)[:200]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return common.make_row(device, case, impl, None, error=f"{type(e).__name__}: {e}", **extra), None
    log(f"    {timing['ms']:.3f} ms (median of {timing['runs']})")
    return common.make_row(device, case, impl, timing, **extra), out


def run_solver(device, shape, compile_ref, with_pot, log):
    B, n, m = shape["B"], shape["n"], shape["m"]
    case = f"sinkhorn B={B} {n}x{m} L={ITERS} eps={EPS} float32"
    g = torch.Generator(device=device).manual_seed(0)
    cost = (torch.rand(B, n, m, generator=g, device=device) + 0.05).requires_grad_()
    rows, values, grads = [], {}, {}
    for impl, fn in solver_fns(device, compile_ref, with_pot):
        log(f"  {case}: {impl} ...")

        def step(fn=fn):
            cost.grad = None
            fn(cost).sum().backward()

        def first(fn=fn, impl=impl):
            cost.grad = None
            v = fn(cost)
            v.sum().backward()
            values[impl] = v.detach().double().cpu()
            grads[impl] = cost.grad.detach().double().cpu()
            return v

        row, _ = _measure(device, case, impl, step, first, dict(B=B, n=n, m=m, L=ITERS, dtype="float32"), log)
        rows.append(row)
    cost.grad = None
    _agreement(rows, values, grads)
    _solver_bars(device, rows, B, n, m)
    del cost
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_sinkd(device, shape, compile_ref, log):
    B, L, C = shape["B"], shape["L"], shape["C"]
    lead = () if B is None else (B,)
    case = (f"sinkhorn_kd_loss N={L} C={C}" if B is None else f"sinkhorn_kd_loss B={B} L={L} C={C}") + " float32"
    g = torch.Generator(device=device).manual_seed(0)
    s = (2 * torch.randn(*lead, L, C, generator=g, device=device)).requires_grad_()
    t = 2 * torch.randn(*lead, L, C, generator=g, device=device)
    rows, values, grads = [], {}, {}
    for impl, fn in sinkd_fns(device, compile_ref):
        log(f"  {case}: {impl} ...")

        def step(fn=fn):
            s.grad = None
            fn(s, t).backward()

        def first(fn=fn, impl=impl):
            s.grad = None
            v = fn(s, t)
            v.backward()
            values[impl] = v.detach().double().cpu().reshape(1)
            grads[impl] = s.grad.detach().double().cpu()
            return v

        row, _ = _measure(device, case, impl, step, first, dict(B=B, L=L, C=C, dtype="float32"), log)
        rows.append(row)
    s.grad = None
    _agreement(rows, values, grads)
    by = {r["impl"]: r for r in rows if not r.get("error")}
    kdk = next((r for k, r in by.items() if k.startswith("kdkernels")), None)
    eager = by.get("reference eager")
    if kdk and eager:
        sp = eager["ms"] / kdk["ms"]
        if device.type == "cuda":
            common.check_bar(kdk, f">= {GPU_SINKD_BAR:g}x eager (got {sp:.1f}x)", sp >= GPU_SINKD_BAR)
        else:
            common.check_bar(kdk, f"{sp:.2f}x eager (no CPU bar for this case)", None)
    del s, t
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _agreement(rows, values, grads):
    """Each row's values and gradient against the eager reference's: a fast wrong kernel must not look like a win."""
    ref_v, ref_g = values.get("reference eager"), grads.get("reference eager")
    for r in rows:
        if r.get("error") or ref_v is None or r["impl"] == "reference eager" or r["impl"] not in values:
            continue
        rel = float(((values[r["impl"]] - ref_v).abs() / ref_v.abs().clamp_min(1e-12)).max())
        gd = float((grads[r["impl"]] - ref_g).abs().max()) / max(float(ref_g.abs().max()), 1e-30)
        r["note"] = f"value max rel diff vs eager {rel:.1e}, grad max abs diff / max |grad| {gd:.1e}"


def _solver_bars(device, rows, B, n, m):
    by = {r["impl"]: r for r in rows if not r.get("error")}
    kdk = next((r for k, r in by.items() if k.startswith("kdkernels")), None)
    if kdk is None:
        for r in rows:
            if r["impl"].startswith("kdkernels"):
                common.check_bar(r, "runs", False)
        return
    eager = by.get("reference eager")
    pot = next((r for k, r in by.items() if k.startswith("POT")), None)
    if device.type == "cpu":
        if eager:
            sp = eager["ms"] / kdk["ms"]
            common.check_bar(kdk, f">= {CPU_SOLVER_BAR:g}x eager (got {sp:.2f}x)", sp >= CPU_SOLVER_BAR)
        if pot:
            common.check_bar(kdk, f"{pot['ms'] / kdk['ms']:.2f}x POT (no CPU bar)", None)
        return
    if eager:
        sp = eager["ms"] / kdk["ms"]
        common.check_bar(kdk, f">= {GPU_SOLVER_EAGER_BAR:g}x eager (got {sp:.1f}x)", sp >= GPU_SOLVER_EAGER_BAR)
    if pot:
        sp = pot["ms"] / kdk["ms"]
        common.check_bar(kdk, f">= {GPU_SOLVER_POT_BAR:g}x POT (got {sp:.1f}x)", sp >= GPU_SOLVER_POT_BAR)
    else:
        common.check_bar(kdk, f">= {GPU_SOLVER_POT_BAR:g}x POT (POT not installed)", None)
    # memory above the inputs: the potentials of every iteration (f, g in float32), the gradient (one
    # plan-sized matrix per problem) and small vectors; twice the potentials for slack.
    budget = 2 * 4 * B * ITERS * (n + m) + 4 * B * n * m + (1 << 20)
    peak = kdk.get("peak_bytes")
    common.check_bar(kdk, f"peak <= O(B (n+m) L) + one plan = {budget / 2**20:.1f} MiB",
                     None if peak is None else peak <= budget)
    # the floor: read the cost once forward and once backward, write the gradient once
    kdk["floor_ms"] = common.floor_ms(device, bytes_moved=3 * 4 * B * n * m)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small shapes (seconds); the bars are for the full shapes")
    p.add_argument("--cases", default="solver,sinkd", help="comma list of solver, sinkd")
    p.add_argument("--compile", default=None, choices=("on", "off"),
                   help="also time the references under torch.compile (default: on for CUDA, off on CPU, "
                        "where compiling the unrolled loop takes minutes)")
    p.add_argument("--no-pot", action="store_true", help="skip POT even where it is importable")
    p.add_argument("--out", default=None, help="write rows to .csv, .json or .jsonl (appended)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_sinkhorn: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    compile_ref = (a.compile or ("on" if device.type == "cuda" else "off")) == "on"
    cases = set(a.cases.split(","))
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))

    rows = []
    if "solver" in cases:
        for shape in (SOLVER_QUICK if a.quick else SOLVER)[device.type]:
            rows += run_solver(device, shape, compile_ref, not a.no_pot, log)
    if "sinkd" in cases:
        for shape in (SINKD_QUICK if a.quick else SINKD)[device.type]:
            rows += run_sinkd(device, shape, compile_ref, log)

    print(f"\n## sinkhorn / sinkhorn_kd_loss forward+backward ({'quick shapes' if a.quick else 'bar shapes'})\n")
    print(common.header(device) + "\n")
    print(common.summary_table(rows))
    notes = [f"- {r['case']} / {r['impl']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        print("\n" + "\n".join(notes))
    if a.out:
        common.write_rows(rows, a.out)
    failed = [r for r in rows if r.get("result") == "FAIL"]
    print(f"\nbars: {sum(r.get('result') == 'PASS' for r in rows)} PASS, {len(failed)} FAIL")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry points: `pytest benchmarks/bench_sinkhorn.py --benchmark-only`
# (KDK_BENCH_QUICK=1 for the small shapes). One test per (device, implementation).
# ----------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the script itself needs no pytest
    pytest = None

if pytest is not None:
    _DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    @pytest.mark.parametrize("impl", ["kdkernels", "reference eager"])
    @pytest.mark.parametrize("device", _DEVICES)
    def test_sinkhorn_fwd_bwd(benchmark, device, impl):
        dev = torch.device(device)
        shape = (SOLVER_QUICK if os.environ.get("KDK_BENCH_QUICK") == "1" else SOLVER)[dev.type][0]
        fn = next(f for k, f in solver_fns(dev, False, False) if k.startswith(impl))
        cost = (torch.rand(shape["B"], shape["n"], shape["m"], device=dev) + 0.05).requires_grad_()

        def step():
            cost.grad = None
            fn(cost).sum().backward()

        step = common.synced(step, dev)
        step()
        benchmark.extra_info.update(common.env_info(dev))
        benchmark.extra_info.update(impl=impl, **{k: str(v) for k, v in shape.items()})
        benchmark.pedantic(step, rounds=5 if dev.type == "cpu" else 30, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
