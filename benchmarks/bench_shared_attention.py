"""Benchmark of kdkernels.attention / shared_attention (forward+backward) and of an EchoAtt stack, with the spec's bars.

Cases (shared/design/ops/shared_attention.md, "Bars"):
  attention   kdkernels.attention vs SDPA, flash-attn (when installed) and the eager reference, same shape;
  sharing     one sharing layer: kdkernels.shared_attention (recompute / materialize) vs a full attention call
              of the same shape (SDPA, flash-attn) and the eager reference softmax(Q_a K_a^T) V;
  group       an EchoAtt group of 4 layers (anchor + 3 sharing), forward+backward of the attention alone:
              kdkernels.SharedAttentionGroup (the anchor's dQ, dK once), per-layer shared_attention
              (recompute, materialize) vs 4 SDPA layers;
  stack       a TinyLlama-shaped decoder stack (transformers' LlamaModel), one training step (forward, loss,
              backward): the EchoAtt student (9 of 22 layers sharing) vs the unshared stack.
Bars: GPU (bf16, B=4, H=32, T=2048, d=64) sharing layer >= 1.3x faster than SDPA/flash-attn, EchoAtt group of 4
>= 1.3x faster than 4 SDPA layers, EchoAtt stack >= 1.15x faster per step than the unshared stack; CPU kdkernels
within 3x of the eager reference.
"""

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
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from kdkernels.reference import attention_ref, shared_attention_ref  # noqa: E402

FULL = {"cpu": dict(B=2, H=8, Hk=8, T=512, D=64, dtype=torch.float32),
        "cuda": dict(B=4, H=32, Hk=32, T=2048, D=64, dtype=torch.bfloat16)}
# The tensor-core bar shape (issue 13): attention forward >= 0.8x and backward >= 0.6x SDPA's fastest backend
D128 = {"cuda": dict(B=4, H=32, Hk=32, T=2048, D=128, dtype=torch.bfloat16)}
QUICK = {"cpu": dict(B=1, H=4, Hk=4, T=256, D=64, dtype=torch.float32),
         "cuda": dict(B=2, H=16, Hk=16, T=1024, D=64, dtype=torch.bfloat16)}
# TinyLlama-1.1B's decoder (22 layers, hidden 2048, 32 heads, 4 kv heads, MLP 5632); groups sharing 9 layers
STACK_FULL = {"cpu": dict(layers=22, hidden=256, heads=8, kv_heads=2, mlp=688, B=1, T=256, shared=9),
              "cuda": dict(layers=22, hidden=2048, heads=32, kv_heads=4, mlp=5632, B=4, T=2048, shared=9)}
STACK_QUICK = {"cpu": dict(layers=8, hidden=128, heads=4, kv_heads=2, mlp=344, B=1, T=128, shared=3),
               "cuda": dict(layers=22, hidden=2048, heads=32, kv_heads=4, mlp=5632, B=1, T=1024, shared=9)}

CPU_EAGER_BAR = 3.0      # kdkernels time <= 3x the eager reference's
GPU_SHARED_BAR = 1.3     # sharing layer >= 1.3x faster than SDPA / flash-attn
GPU_STACK_BAR = 1.15     # EchoAtt stack >= 1.15x faster per training step


def _flash_attn():
    try:
        from flash_attn import flash_attn_func
        return flash_attn_func
    except Exception:  # not installed, or no GPU build
        return None


def inputs(shape, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, Hk, T, D, dt = shape["B"], shape["H"], shape["Hk"], shape["T"], shape["D"], shape["dtype"]

    def r(*s):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dt).requires_grad_()

    return r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D), r(B, Hk, T, D)


def step_fn(fn, tensors, grad_out):
    """forward + backward with a fixed upstream gradient, fresh .grad each call."""
    def step():
        for t in tensors:
            t.grad = None
        fn().backward(grad_out)
    return step


def attention_impls(q, k, v, device, causal=True):
    rep = q.shape[1] // k.shape[1]
    impls = [("kdkernels.attention", lambda: kdkernels.attention(q, k, v, causal=causal, return_lse=False)),
             ("SDPA", lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1) if rep > 1 else k,
                                                             v.repeat_interleave(rep, 1) if rep > 1 else v,
                                                             is_causal=causal))]
    if device.type == "cuda":  # each SDPA backend on its own, so the fastest one is the bar
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for label, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA efficient",
                               SDPBackend.EFFICIENT_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=rep > 1)
            impls.append((label, run))
    fa = _flash_attn() if device.type == "cuda" else None
    if fa is not None:
        impls.append(("flash-attn", lambda: fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               causal=causal).transpose(1, 2)))
    impls.append(("reference eager", lambda: attention_ref(q, k, v, causal=causal)[0]))
    return impls


def sharing_impls(q, k, v, v2, lse, device, causal=True):
    impls = [("kdkernels.shared_attention recompute",
              lambda: kdkernels.shared_attention(q, k, lse, v2, causal=causal, mode="recompute")),
             ("kdkernels.shared_attention materialize",
              lambda: kdkernels.shared_attention(q, k, lse, v2, causal=causal, mode="materialize"))]
    impls += [(name, fn) for name, fn in attention_impls(q, k, v2, device, causal) if name in ("SDPA", "flash-attn")]
    impls.append(("reference eager", lambda: shared_attention_ref(q, k, v2, causal=causal)))
    return impls


# Physical floors of the H200 for the fraction-of-peak column: bf16 dense tensor-core rate (the spec's number;
# benchmarks/gpu_check.sh measures the GEMM rate of the machine it runs on).
H200_BF16_TFLOPS = 989.0


def attention_flops(B, H, Tq, Tk, D, causal, backward):
    """FlashAttention's convention: 4 B H Tq Tk D for QK^T and PV (half of it causal); backward 2.5x that."""
    f = 4.0 * B * H * Tq * Tk * D * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def time_impls(device, case, impls, tensors, log, extra, flops=None, forward_only=False):
    rows, outs = [], {}
    for name, fn in impls:
        log(f"  {case}: {name} ...")
        try:
            out = fn()
            g = torch.randn_like(out)
            if forward_only:
                def step(fn=fn):
                    with torch.no_grad():
                        fn()
            else:
                step = step_fn(fn, tensors, g)
            t0 = time.perf_counter()
            step()
            common.synchronize(device)
            first = time.perf_counter() - t0
            outs[name] = out.detach().float()
            timing = common.time_fn(step, device)
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            rows.append(common.make_row(device, case, name, None, error=f"{type(e).__name__}: {e}", **extra))
            log(f"    failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        peak = common.peak_memory(step, device) if device.type == "cuda" else None  # CPU: RSS is too coarse here
        row = common.make_row(device, case, name, timing, first_call_s=round(first, 3), peak_bytes=peak, **extra)
        if flops:
            row["tflops"] = float(f"{flops / (timing['ms'] * 1e-3) / 1e12:.3g}")
            if device.type == "cuda":
                row["frac_peak"] = round(row["tflops"] / H200_BF16_TFLOPS, 3)
        rows.append(row)
        log(f"    {timing['ms']:.3f} ms (median of {timing['runs']})")
    ref = outs.get("reference eager")
    for r in rows:
        if ref is not None and r["impl"] in outs and r["impl"] != "reference eager":
            r["note"] = f"max abs diff vs eager {float((outs[r['impl']] - ref).abs().max()):.1e}"
    return rows


def op_cases(device, shape, log):
    B, H, T, D = shape["B"], shape["H"], shape["T"], shape["D"]
    q, k, v, v2 = inputs(shape, device)
    extra = dict(shape=f"B={B} H={H} Hk={shape['Hk']} T={T} d={D}", dtype=str(shape["dtype"]).replace("torch.", ""))
    fwd_flops = attention_flops(B, H, T, T, D, True, False)
    case_f = f"attention fwd causal {extra['shape']} {extra['dtype']}"
    rows = time_impls(device, case_f, attention_impls(q, k, v, device), (q, k, v), log, extra, flops=fwd_flops,
                      forward_only=True)
    case_a = f"attention fwd+bwd causal {extra['shape']} {extra['dtype']}"
    rows += time_impls(device, case_a, attention_impls(q, k, v, device), (q, k, v), log, extra,
                       flops=attention_flops(B, H, T, T, D, True, True))
    with torch.no_grad():
        _, lse = kdkernels.attention(q, k, v, causal=True)
    case_b = f"sharing layer fwd+bwd causal {extra['shape']} {extra['dtype']}"
    rows += time_impls(device, case_b, sharing_impls(q, k, v, v2, lse, device), (q, k, v2), log, extra)
    return rows


def _llama(cfg, device, dtype):
    import transformers

    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=1024, hidden_size=cfg["hidden"], intermediate_size=cfg["mlp"],
                                 num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                                 num_key_value_heads=cfg["kv_heads"], max_position_embeddings=max(cfg["T"], 128))
    c._attn_implementation = "sdpa"
    return transformers.LlamaModel(c).to(device=device, dtype=dtype)


def stack_groups(layers: int, shared: int):
    """Groups sharing `shared` inner layers: pairs (anchor, sharer) from layer 1 on, as evenly as possible."""
    groups, i, left = [[0]], 1, shared
    while i < layers:
        if left > 0 and i + 1 < layers - 1:
            groups.append([i, i + 1])
            i, left = i + 2, left - 1
        else:
            groups.append([i])
            i += 1
    return groups


def stack_case(device, cfg, dtype, log):
    from kdkernels.echoatt import convert_to_echoatt

    case = (f"stack train step {cfg['layers']} layers ({cfg['shared']} sharing) hidden={cfg['hidden']} "
            f"B={cfg['B']} T={cfg['T']} {str(dtype).replace('torch.', '')}")
    extra = dict(layers=cfg["layers"], shared=cfg["shared"], hidden=cfg["hidden"])
    try:
        teacher = _llama(cfg, device, dtype)
    except ImportError:
        return [common.make_row(device, case, "EchoAtt stack (kdkernels)", None,
                                error="transformers is not installed (pip install 'kdkernels[hf]')", **extra)]
    groups = stack_groups(cfg["layers"], cfg["shared"])
    student = convert_to_echoatt(teacher, groups)
    ids = torch.randint(0, 1024, (cfg["B"], cfg["T"]), device=device)
    rows = []
    for name, model in (("EchoAtt stack (kdkernels)", student), ("unshared stack (SDPA)", teacher)):
        model.train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids).last_hidden_state
            out.float().pow(2).mean().backward()

        log(f"  {case}: {name} ...")
        try:
            step()
            common.synchronize(device)
            timing = common.time_fn(step, device, iters=10 if device.type == "cuda" else 5)
        except Exception as e:
            rows.append(common.make_row(device, case, name, None, error=f"{type(e).__name__}: {e}", **extra))
            log(f"    failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        n = sum(p.numel() for p in model.parameters())
        rows.append(common.make_row(device, case, name, timing, params=n, **extra))
        log(f"    {timing['ms']:.2f} ms (median of {timing['runs']}), {n / 1e6:.2f} M parameters")
    return rows


GROUP_LAYERS = 4  # anchor + 3 sharing layers


def group_impls(q, k, vs, device, causal=True):
    """One group's attention, forward+backward: the anchor's attention and its sharing layers', stacked."""
    rep = q.shape[1] // k.shape[1]

    def kd(mode):
        def run():
            out0, lse = kdkernels.attention(q, k, vs[0], causal=causal)
            if mode == "group":
                g = kdkernels.SharedAttentionGroup(q, k, lse, causal=causal)
                outs = [g(v) for v in vs[1:]]
            elif mode == "probs":
                P = kdkernels.shared_attention_probs(q, k, lse, causal=causal)
                outs = [kdkernels.shared_attention(q, k, lse, v, causal=causal, probs=P) for v in vs[1:]]
            else:
                outs = [kdkernels.shared_attention(q, k, lse, v, causal=causal, mode="recompute") for v in vs[1:]]
            return torch.stack([out0, *outs])
        return run

    def sdpa():
        kk = k.repeat_interleave(rep, 1) if rep > 1 else k
        return torch.stack([F.scaled_dot_product_attention(q, kk, v.repeat_interleave(rep, 1) if rep > 1 else v,
                                                           is_causal=causal) for v in vs])

    impls = [("kdkernels group (SharedAttentionGroup)", kd("group")),
             ("kdkernels per-layer recompute", kd("recompute")),
             ("kdkernels materialized probs", kd("probs")),
             (f"{len(vs)} SDPA layers", sdpa)]
    impls.append(("reference eager", lambda: torch.stack([attention_ref(q, k, v, causal=causal)[0] for v in vs])))
    return impls


def group_case(device, shape, log):
    B, H, T, D = shape["B"], shape["H"], shape["T"], shape["D"]
    q, k, v, _ = inputs(shape, device)
    vs = [v] + [inputs(shape, device, seed=i + 1)[2] for i in range(GROUP_LAYERS - 1)]
    extra = dict(shape=f"B={B} H={H} Hk={shape['Hk']} T={T} d={D}", dtype=str(shape["dtype"]).replace("torch.", ""))
    case = f"group of {GROUP_LAYERS} fwd+bwd causal {extra['shape']} {extra['dtype']}"
    return time_impls(device, case, group_impls(q, k, vs, device), (q, k, *vs), log, extra)


def bars(device, rows):
    by = {}
    for r in rows:
        if not r.get("error"):
            by.setdefault(r["case"], {})[r["impl"]] = r
    for case, impls in by.items():
        if case.startswith("stack"):
            echo, base = impls.get("EchoAtt stack (kdkernels)"), impls.get("unshared stack (SDPA)")
            if echo and base:
                sp = base["ms"] / echo["ms"]
                if device.type == "cuda":
                    common.check_bar(echo, f">= {GPU_STACK_BAR:g}x the unshared stack (got {sp:.2f}x)",
                                     sp >= GPU_STACK_BAR)
                else:
                    common.check_bar(echo, f"speed vs the unshared stack: {sp:.2f}x (no CPU bar)", None)
            continue
        eager = impls.get("reference eager")
        for name, r in impls.items():
            if not name.startswith("kdkernels"):
                continue
            if device.type == "cpu" and eager:
                ratio = r["ms"] / eager["ms"]
                common.check_bar(r, f"<= {CPU_EAGER_BAR:g}x eager (got {ratio:.2f}x)", ratio <= CPU_EAGER_BAR)
            sdpa = [b for n_, b in impls.items() if n_.startswith("SDPA ")]
            if device.type == "cuda" and case.startswith("attention") and sdpa and name == "kdkernels.attention":
                best = min(b["ms"] for b in sdpa)
                want = 0.8 if case.startswith("attention fwd causal") else 0.6
                common.check_bar(r, f">= {want:g}x the fastest SDPA backend's throughput (got {best / r['ms']:.2f}x)",
                                 best / r["ms"] >= want)
            if device.type == "cuda" and case.startswith("group") and name == "kdkernels group (SharedAttentionGroup)":
                b = impls.get(f"{GROUP_LAYERS} SDPA layers")
                if b:
                    sp = b["ms"] / r["ms"]
                    common.check_bar(r, f">= {GPU_SHARED_BAR:g}x {GROUP_LAYERS} SDPA layers (got {sp:.2f}x)",
                                     sp >= GPU_SHARED_BAR)
            if device.type == "cuda" and case.startswith("sharing"):
                for base in ("SDPA", "flash-attn"):
                    b = impls.get(base)
                    if b:
                        sp = b["ms"] / r["ms"]
                        common.check_bar(r, f">= {GPU_SHARED_BAR:g}x {base} (got {sp:.2f}x)", sp >= GPU_SHARED_BAR)


def baseline_of_factory(rows):
    def baseline_of(r):
        want = "unshared stack (SDPA)" if r["case"].startswith("stack") else "reference eager"
        return next((b for b in rows if b["case"] == r["case"] and b["impl"] == want and b is not r
                     and not b.get("error")), None)
    return baseline_of


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small shapes (seconds); the bars are for the full shapes")
    p.add_argument("--cases", default="attention,sharing,group,stack", help="comma list of attention, sharing, "
                   "group, stack (attention and sharing run together)")
    p.add_argument("--out", default=None, help="write rows to .csv, .json or .jsonl (appended)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_shared_attention: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))
    cases = set(a.cases.split(","))
    shape = (QUICK if a.quick else FULL)[device.type]
    rows = []
    if cases & {"attention", "sharing"}:
        rows += op_cases(device, shape, log)
        if device.type == "cuda" and not a.quick:
            rows += op_cases(device, D128["cuda"], log)
    if "group" in cases:
        rows += group_case(device, shape, log)
    if "stack" in cases:
        cfg = (STACK_QUICK if a.quick else STACK_FULL)[device.type]
        rows += stack_case(device, cfg, torch.bfloat16 if device.type == "cuda" else torch.float32, log)
    bars(device, rows)
    print(f"\n## shared attention forward+backward ({'quick shapes' if a.quick else 'bar shapes'})\n")
    print(common.header(device) + "\n")
    print(common.summary_table(rows, baseline_of_factory(rows)))
    notes = [f"- {r['case']} / {r['impl']}: {r['note']}" for r in rows if r.get("note")]
    notes += [f"- {r['case']} / {r['impl']}: {r['tflops']} TFLOP/s" +
              (f" ({100 * r['frac_peak']:.1f}% of the H200's {H200_BF16_TFLOPS:g} TFLOP/s bf16)" if "frac_peak" in r
               else "") for r in rows if r.get("tflops") is not None]
    if notes:
        print("\n" + "\n".join(notes))
    if a.out:
        common.write_rows(rows, a.out)
    failed = [r for r in rows if r.get("result") == "FAIL"]
    print(f"\nbars: {sum(r.get('result') == 'PASS' for r in rows)} PASS, {len(failed)} FAIL")
    return 1 if failed else 0


# pytest-benchmark entry point: `pytest benchmarks/bench_shared_attention.py --benchmark-only` (KDK_BENCH_QUICK=1
# for the small shapes).
try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    _DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    @pytest.mark.parametrize("impl", ["kdkernels.shared_attention recompute", "kdkernels.shared_attention materialize",
                                      "SDPA", "reference eager"])
    @pytest.mark.parametrize("device", _DEVICES)
    def test_sharing_layer_fwd_bwd(benchmark, device, impl):
        dev = torch.device(device)
        shape = (QUICK if os.environ.get("KDK_BENCH_QUICK") == "1" else FULL)[dev.type]
        q, k, v, v2 = inputs(shape, dev)
        with torch.no_grad():
            _, lse = kdkernels.attention(q, k, v, causal=True)
        fn = dict(sharing_impls(q, k, v, v2, lse, dev))[impl]
        step = common.synced(step_fn(fn, (q, k, v2), torch.randn_like(fn())), dev)
        step()
        benchmark.extra_info.update(common.env_info(dev))
        benchmark.pedantic(step, rounds=10 if dev.type == "cpu" else 30, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
