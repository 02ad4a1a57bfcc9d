"""Benchmark of kdkernels.topk_kl_div (forward+backward) vs its references and Liger-Kernel, with the spec's bars."""

from __future__ import annotations

import argparse
import math
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
from kdkernels.reference import topk_kl_div_ref  # noqa: E402

# The spec's bar shapes (shared/design/ops/topk_kl.md, "Bars") and small ones for a quick look.
FULL = {"cpu": dict(N=2048, V=32000, K=64, dtype=torch.float32),
        "cuda": dict(N=8192, V=128256, K=64, dtype=torch.bfloat16)}
QUICK = {"cpu": dict(N=256, V=8000, K=32, dtype=torch.float32),
         "cuda": dict(N=1024, V=32000, K=64, dtype=torch.bfloat16)}
ALL_MODES = ("renorm", "tail", "support", "dense")
# What each sparse mode is fed: tail needs full-vocab log-probs (an offline cache); renorm and support
# take raw logits as a teacher cut to top-k on the fly would give them.
VALUES_ARE = {"renorm": "logits", "support": "logits", "tail": "logprobs", "dense": "logits"}
# Dense mode is run with the divergences Liger-Kernel has kernels for, to compare like with like.
DENSE_DIVERGENCES = ("forward_kl", "jsd")

# Bars (spec): CPU >= 3x eager; GPU within 1.3x of the byte floor, >= 5x eager, peak memory above the
# inputs <= one N x V gradient + O(N K). The O(N K) allowance: 64 bytes per (row, K+2) entry, room
# for a few float32/int64 per-row K-vectors (coefficients, gathered logits, statistics).
CPU_SPEEDUP_BAR = 3.0
GPU_SPEEDUP_BAR = 5.0
GPU_FLOOR_BAR = 1.3
NK_BYTES_PER_ENTRY = 64


def make_inputs(N, V, K, dtype, device, mode, seed=0):
    """Student logits (N, V) requiring grad, and the teacher in the form `mode` takes.

    Teacher ids are distinct per row without a sort over V: a random start and a stride of V // K.
    Values are random, not a model's: the kernels' cost does not depend on them.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    z = (2 * torch.randn(N, V, generator=g, device=device, dtype=torch.float32)).to(dtype).requires_grad_()
    if mode == "dense":
        t = (2 * torch.randn(N, V, generator=g, device=device, dtype=torch.float32)).to(dtype)
        return z, t, None
    start = torch.randint(0, V, (N, 1), generator=g, device=device)
    ids = (start + torch.arange(K, device=device) * (V // K)) % V
    t = 2 * torch.randn(N, K, generator=g, device=device, dtype=torch.float32)
    if VALUES_ARE[mode] == "logprobs":
        t = torch.log_softmax(t, dim=-1) + math.log(0.9)  # 90% of the teacher's mass on its top-k
    return z, t, ids


def loss_fns(mode, divergence, device, compile_ref: bool, with_liger: bool):
    """(impl name, fn(z, t, ids) -> scalar loss) for every implementation of this case."""
    kw = dict(values_are=VALUES_ARE[mode], mode=mode, divergence=divergence)
    # On CUDA validate=True costs one host synchronisation per call; a training loop that trusts its
    # cache turns it off, and that is the path the GPU bars are about.
    validate = device.type != "cuda"
    fns = [(f"kdkernels{'' if validate else ' (validate=False)'}",
            lambda z, t, i: kdkernels.topk_kl_div(z, t, i, validate=validate, **kw)),
           ("reference eager", lambda z, t, i: topk_kl_div_ref(z, t, i, **kw))]
    if compile_ref:
        compiled = torch.compile(topk_kl_div_ref)
        fns.append(("reference torch.compile", lambda z, t, i: compiled(z, t, i, **kw)))
    if with_liger and mode == "dense" and device.type == "cuda":  # Liger is Triton: GPU only
        try:
            from liger_kernel.transformers.jsd import LigerJSD
            from liger_kernel.transformers.kl_div import LigerKLDIVLoss
        except Exception:  # not installed, or no triton: simply no Liger rows
            pass
        else:
            # Liger takes log-probabilities, so the user computes both log_softmaxes in eager first;
            # those belong to the measured step (kdkernels takes the raw logits).
            if divergence == "forward_kl":
                kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
                fns.append(("Liger LigerKLDIVLoss", lambda z, t, i: kl(torch.log_softmax(z, -1),
                                                                        torch.log_softmax(t, -1))))
            elif divergence == "jsd":
                jsd = LigerJSD(beta=0.5)
                fns.append(("Liger LigerJSD", lambda z, t, i: jsd(torch.log_softmax(z, -1),
                                                                  torch.log_softmax(t, -1))))
    return fns


def fwd_bwd(fn, z, t, ids):
    """One training step of the loss: a fresh gradient each call, as in training (grad set to None)."""
    def step():
        z.grad = None
        fn(z, t, ids).backward()
    return step


def case_name(shape, mode, divergence):
    dname = str(shape["dtype"]).replace("torch.", "")
    return (f"{mode}/{divergence} N={shape['N']} V={shape['V']}" + ("" if mode == "dense" else f" K={shape['K']}")
            + f" {dname}")


def time_case(device, shape, mode, divergence, compile_ref, with_liger, log):
    """Time every implementation of one case; returns its rows and the loss functions that ran."""
    N, V, K, dtype = shape["N"], shape["V"], shape["K"], shape["dtype"]
    case = case_name(shape, mode, divergence)
    z, t, ids = make_inputs(N, V, K, dtype, device, mode)
    rows, losses, grads, ran = [], {}, {}, {}
    # The oracle: the reference on float32 copies (float64 would double the GPU footprint for little:
    # the question is whether a low-precision kernel lands near float32 math). Not timed.
    zf = z.detach().float().requires_grad_()
    kw = dict(values_are=VALUES_ARE[mode], mode=mode, divergence=divergence)
    oracle = topk_kl_div_ref(zf, t.float(), ids, **kw)
    oracle.backward()
    oracle_loss, oracle_grad = float(oracle), zf.grad
    del zf, oracle
    for impl, fn in loss_fns(mode, divergence, device, compile_ref, with_liger):
        log(f"  {case}: {impl} ...")
        extra = dict(mode=mode, divergence=divergence, N=N, V=V, K=K if mode != "dense" else None,
                     dtype=str(dtype).replace("torch.", ""))
        try:
            t0 = time.perf_counter()
            z.grad = None
            loss = fn(z, t, ids)
            loss.backward()  # first call: compiles (torch.compile) or autotunes (Triton) here
            common.synchronize(device)
            extra["first_call_s"] = round(time.perf_counter() - t0, 3)
            losses[impl] = float(loss.detach().float())
            if impl.startswith("kdkernels"):
                grads[impl] = z.grad.detach().clone()
            timing = common.time_fn(fwd_bwd(fn, z, t, ids), device)
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            rows.append(common.make_row(device, case, impl, None, error=f"{type(e).__name__}: {e}", **extra))
            log(f"    failed: {type(e).__name__}: {str(e)[:200]}")
            z.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        ran[impl] = fn
        rows.append(common.make_row(device, case, impl, timing, loss=losses[impl], **extra))
        log(f"    {timing['ms']:.3f} ms (median of {timing['runs']})")
    z.grad = None
    _agreement(rows, losses, grads, oracle_loss, oracle_grad)
    del z, t, ids, grads, oracle_grad
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, ran


def memory_case(device, shape, mode, rows, ran):
    """Peak memory of one forward+backward of every implementation that ran, on fresh inputs; then the bars."""
    N, V, K, dtype = shape["N"], shape["V"], shape["K"], shape["dtype"]
    z, t, ids = make_inputs(N, V, K, dtype, device, mode)
    def clear_grad():
        z.grad = None

    for r in rows:
        if r["impl"] in ran:
            r["peak_bytes"] = common.peak_memory(fwd_bwd(ran[r["impl"]], z, t, ids), device, setup=clear_grad,
                                                 exact_cpu=True)
    z.grad = None
    _bars(device, rows, mode, N, V, K, dtype, t, ids)
    del z, t, ids
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _agreement(rows, losses, grads, oracle_loss, oracle_grad):
    """Note each row's loss, and kdkernels' gradient, against the float32 reference: a fast wrong kernel
    must not look like a win (and a bf16 eager baseline's own error shows beside it)."""
    scale = float(oracle_grad.abs().max()) or 1.0
    for r in rows:
        if r.get("error") or r["impl"] not in losses:
            continue
        rel = abs(losses[r["impl"]] - oracle_loss) / max(abs(oracle_loss), 1e-12)
        note = f"loss rel diff vs float32 reference {rel:.1e}"
        if r["impl"] in grads:
            diff = float((grads[r["impl"]].float() - oracle_grad).abs().max())
            note += f", grad max abs diff {diff:.1e} ({diff / scale:.1e} of max |grad|)"
        r["note"] = note


def _bars(device, rows, mode, N, V, K, dtype, t, ids):
    by = {r["impl"]: r for r in rows if not r.get("error")}
    kdk = next((r for k, r in by.items() if k.startswith("kdkernels")), None)
    if kdk is None:
        for r in rows:
            if r["impl"].startswith("kdkernels"):
                common.check_bar(r, "runs", False)
        return
    eager = by.get("reference eager")
    elt = torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu":
        if eager and mode != "dense":  # the spec's CPU bar is for the top-k case
            sp = eager["ms"] / kdk["ms"]
            common.check_bar(kdk, f">= {CPU_SPEEDUP_BAR:g}x eager (got {sp:.2f}x)", sp >= CPU_SPEEDUP_BAR)
        return
    if mode == "dense":
        # Two passes over both (N, V) inputs and one gradient write, shown for information: the spec's
        # dense bars are against Liger only.
        kdk["floor_ms"] = common.floor_ms(device, bytes_moved=5 * N * V * elt)
        for name in ("Liger LigerKLDIVLoss", "Liger LigerJSD"):
            lg = by.get(name)
            if lg:
                faster = kdk["ms"] < lg["ms"]
                smaller = (kdk.get("peak_bytes") or 0) < (lg.get("peak_bytes") or 0)
                common.check_bar(kdk, f"faster than {name} ({kdk['ms']:.2f} vs {lg['ms']:.2f} ms)", faster)
                common.check_bar(kdk, f"less memory than {name} ({(kdk['peak_bytes'] or 0) / 2**20:.0f} vs "
                                 f"{(lg['peak_bytes'] or 0) / 2**20:.0f} MiB)", smaller)
        return
    # The spec's floor: read the logits twice (statistics pass, gradient pass), write the gradient once;
    # plus the teacher's (N, K) values and ids, read once (negligible at K << V, counted for honesty).
    teacher_bytes = t.numel() * t.element_size() + ids.numel() * ids.element_size()
    floor = common.floor_ms(device, bytes_moved=3 * N * V * elt + teacher_bytes)
    kdk["floor_ms"] = floor
    common.check_bar(kdk, f"<= {GPU_FLOOR_BAR:g}x floor (got {kdk['ms'] / floor:.2f}x)",
                     kdk["ms"] <= GPU_FLOOR_BAR * floor)
    if eager:
        sp = eager["ms"] / kdk["ms"]
        common.check_bar(kdk, f">= {GPU_SPEEDUP_BAR:g}x eager (got {sp:.1f}x)", sp >= GPU_SPEEDUP_BAR)
    budget = N * V * elt + NK_BYTES_PER_ENTRY * N * (K + 2)
    peak = kdk.get("peak_bytes")
    common.check_bar(kdk, f"peak <= grad + O(NK) = {budget / 2**20:.0f} MiB", None if peak is None else peak <= budget)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--modes", default=None,
                   help=f"comma list of {', '.join(ALL_MODES)} (default: all on CUDA; renorm,tail on CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes (seconds); the bars are for the full shapes")
    p.add_argument("--compile-modes", default="renorm",
                   help="modes whose reference also runs under torch.compile: a comma list, 'all' or 'none' "
                        "(each mode compiles anew, ~10-60 s)")
    p.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel even where it is importable")
    p.add_argument("--out", default=None, help="write rows to .csv, .json or .jsonl (appended)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_topk_kl: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shape = (QUICK if a.quick else FULL)[device.type]
    modes = a.modes.split(",") if a.modes else (list(ALL_MODES) if device.type == "cuda" else ["renorm", "tail"])
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}: choose from {ALL_MODES}")
    compile_modes = (set(ALL_MODES) if a.compile_modes == "all" else set() if a.compile_modes == "none"
                     else set(a.compile_modes.split(",")))
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))

    if device.type == "cuda":
        bw = common.copy_bandwidth(device)
        log(f"measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    cases = [(m, d) for m in modes for d in (DENSE_DIVERGENCES if m == "dense" else ("forward_kl",))]
    done = []
    for mode, div in cases:
        rows, ran = time_case(device, shape, mode, div, mode in compile_modes, not a.no_liger, log)
        if device.type == "cuda":  # free each case's (N, V) buffers before the next
            memory_case(device, shape, mode, rows, ran)
        done.append((mode, rows, ran))
    if device.type == "cpu":  # all timings first: the exact CPU memory pass changes the allocator for good
        log("  memory pass ...")
        for mode, rows, ran in done:
            memory_case(device, shape, mode, rows, ran)
    rows = [r for _, case_rows, _ in done for r in case_rows]

    print(f"\n## topk_kl_div forward+backward ({'quick shapes' if a.quick else 'bar shapes'})\n")
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
# pytest-benchmark entry points: `pytest benchmarks/bench_topk_kl.py --benchmark-only`
# (KDK_BENCH_QUICK=1 for the small shapes). One test per (device, mode, implementation).
# ----------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the script itself needs no pytest
    pytest = None

if pytest is not None:
    _DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    _IMPLS = ["kdkernels", "reference eager", "reference torch.compile"]

    @pytest.mark.parametrize("impl", _IMPLS)
    @pytest.mark.parametrize("mode", ["renorm", "tail", "dense"])
    @pytest.mark.parametrize("device", _DEVICES)
    def test_topk_kl_fwd_bwd(benchmark, device, mode, impl):
        dev = torch.device(device)
        shape = (QUICK if os.environ.get("KDK_BENCH_QUICK") == "1" else FULL)[dev.type]
        fns = dict(loss_fns(mode, "forward_kl", dev, impl.endswith("compile"), False))
        fn = next(f for k, f in fns.items() if k.startswith(impl))
        z, t, ids = make_inputs(shape["N"], shape["V"], shape["K"], shape["dtype"], dev, mode)
        step = common.synced(fwd_bwd(fn, z, t, ids), dev)
        try:
            step()  # compile / first-call costs stay out of the statistics
        except Exception as e:
            if impl.endswith("compile"):
                pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e)[:200]}")
            raise
        benchmark.extra_info.update(common.env_info(dev))
        benchmark.extra_info.update(mode=mode, impl=impl, **{k: str(v) for k, v in shape.items()})
        benchmark.pedantic(step, rounds=10 if dev.type == "cpu" else 30, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
