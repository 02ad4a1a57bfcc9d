"""Benchmark helpers shared by benchmarks/bench_*.py: timing, peak memory, device ceilings, result rows, tables."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Iterable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Environment: every row says what code on what machine produced it.
# ----------------------------------------------------------------------------------------------

def git_commit() -> str:
    """Short hash of HEAD, '+dirty' when the tree differs from it; else $KDK_COMMIT (a copy of the tree
    without .git, as on the device machine), else 'uncommitted' / 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return os.environ.get("KDK_COMMIT") or "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("KDK_COMMIT") or "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


_ENV_CACHE: dict = {}


def env_info(device: torch.device) -> dict:
    """Fields stamped on every row: commit, versions, device."""
    key = str(device)
    if key not in _ENV_CACHE:
        try:
            import kdkernels

            kdk = kdkernels.__version__
        except Exception as e:  # the benchmark itself reports the import failure; keep the stamp usable
            kdk = f"import failed: {type(e).__name__}"
        _ENV_CACHE[key] = {
            "commit": git_commit(),
            "kdkernels": kdk,
            "torch": torch.__version__,
            "cuda": torch.version.cuda or "none",
            "device": device_name(device),
        }
    return dict(_ENV_CACHE[key])


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda(fn: Callable[[], object], warmup: int = 5, iters: int = 20) -> list[float]:
    """Milliseconds of each of `iters` calls, timed by CUDA events on the current stream after `warmup` calls.

    One event pair per call (not one around the loop) so the median discards stragglers; the host
    never waits inside the loop except where `fn` itself synchronises.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_cpu(fn: Callable[[], object], warmup: int = 2, iters: int = 10, max_seconds: float = 30.0) -> list[float]:
    """Milliseconds of each call by perf_counter after `warmup` calls; stops early past `max_seconds`
    (at least 3 timed calls) so a slow eager baseline cannot eat a shared CPU machine's budget."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    t_end = time.perf_counter() + max_seconds
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
        if i >= 2 and time.perf_counter() > t_end:
            break
    return out


def time_fn(fn: Callable[[], object], device: torch.device, warmup: Optional[int] = None,
            iters: Optional[int] = None) -> dict:
    """Median and spread of `fn` on `device` (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        ms = time_cuda(fn, warmup if warmup is not None else 5, iters if iters is not None else 30)
    else:
        ms = time_cpu(fn, warmup if warmup is not None else 2, iters if iters is not None else 10)
    ms_sorted = sorted(ms)
    return {
        "ms": statistics.median(ms),
        "ms_min": ms_sorted[0],
        "ms_p80": ms_sorted[min(len(ms) - 1, int(0.8 * len(ms)))],
        "runs": len(ms),
    }


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` followed by a device synchronisation: what pytest-benchmark's wall clock needs on CUDA."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------

def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_LIBC = None
_PINNED = False


def _libc():
    """glibc through ctypes, or None (another libc, or none)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def _pin_mmap_threshold(libc) -> None:
    """Make glibc serve every allocation above 64 KiB by its own mmap, returned to the OS on free.

    By default glibc raises its mmap threshold after large frees and serves later tensors from freed,
    still-resident heap pages, so the RSS overstates or blurs the live memory (by ~30% on the eager
    reference here). Pinned, the RSS follows the live tensors. It cannot be undone, and every large
    allocation then page-faults, which slows later timings: only for a memory pass after all timings.
    """
    global _PINNED
    if not _PINNED:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        _PINNED = True


def peak_memory(fn: Callable[[], object], device: torch.device,
                setup: Optional[Callable[[], object]] = None, exact_cpu: bool = False) -> Optional[int]:
    """Bytes allocated at the peak of one call of `fn` above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated after a reset (the caching allocator's live tensors, not
    its reserve). CPU: the process's peak resident size (VmHWM, reset via /proc/self/clear_refs) above
    the resident size before the call, after glibc has handed its free heap pages back (malloc_trim),
    so the step's allocations show as new resident pages. exact_cpu=True also pins glibc's mmap
    threshold (see _pin_mmap_threshold): tighter numbers, but slower timings afterwards, so use it
    only after every timing of the run. None where Linux or libc does not allow the measurement.
    `setup` runs before the baseline is read: free what a previous call left alive (a gradient, say),
    else it counts in the baseline and its release inside the step hides as much new memory.
    """
    if device.type == "cuda":
        if setup is not None:
            setup()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    libc = _libc()
    if libc is None:
        return None
    if exact_cpu:
        _pin_mmap_threshold(libc)
    fn()  # once more first, so one-time allocations (lazy init, caches) stay out of the number
    if setup is not None:
        setup()
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(peak - base, 0) * 1024


def memory_label(device: torch.device) -> str:
    return "CUDA max allocated above inputs" if device.type == "cuda" else "CPU peak RSS above start"


# ----------------------------------------------------------------------------------------------
# Ceilings measured on the spot (the floors' denominators)
# ----------------------------------------------------------------------------------------------

_CEILINGS: dict = {}


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    2 GiB per buffer: far above the L2 (60 MB on an H200), so it measures HBM. Median of 20 copies.
    """
    key = ("bw", str(device))
    if key not in _CEILINGS:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = statistics.median(time_cuda(lambda: dst.copy_(src), warmup=3, iters=20))
        _CEILINGS[key] = 2 * nbytes / (ms / 1000)
        del src, dst
        torch.cuda.empty_cache()
    return _CEILINGS[key]


def gemm_rate(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matrix-product rate in FLOP/s (2 n^3 per product), random data, median of 10."""
    key = ("gemm", str(device), n, dtype)
    if key not in _CEILINGS:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = statistics.median(time_cuda(lambda: a @ b, warmup=3, iters=10))
        _CEILINGS[key] = 2 * n**3 / (ms / 1000)
        del a, b
        torch.cuda.empty_cache()
    return _CEILINGS[key]


def floor_ms(device: torch.device, bytes_moved: float = 0.0, flops: float = 0.0) -> Optional[float]:
    """The larger of bytes / copy bandwidth and FLOPs / GEMM rate, in ms (GPU only: None on CPU)."""
    if device.type != "cuda":
        return None
    t = 0.0
    if bytes_moved:
        t = max(t, bytes_moved / copy_bandwidth(device))
    if flops:
        t = max(t, flops / gemm_rate(device))
    return 1000 * t


def ceilings(device: torch.device) -> dict:
    """The ceilings measured so far in this process (for the report header)."""
    out = {}
    for key, val in _CEILINGS.items():
        if key[1] == str(device):
            if key[0] == "bw":
                out["copy_bandwidth_TBps"] = round(val / 1e12, 3)
            else:
                out["gemm_TFLOPps"] = round(val / 1e12, 1)
    return out


# ----------------------------------------------------------------------------------------------
# Rows, bars, tables, files
# ----------------------------------------------------------------------------------------------

def make_row(device: torch.device, case: str, impl: str, timing: Optional[dict], **extra) -> dict:
    """A result row: the environment stamp, the case, the implementation, the timing, anything extra.

    Conventional extras: shape, dtype, mode, peak_bytes, floor_ms, note, error (the row did not run).
    """
    row = env_info(device)
    row.update(case=case, impl=impl, device_type=device.type)
    if timing:
        row.update(timing)
    row.update(extra)
    return row


def check_bar(row: dict, text: str, passed: Optional[bool]):
    """Record a bar on a row; several bars on one row are joined; any failure makes the row FAIL."""
    tag = {None: "n/a", True: "PASS", False: "FAIL"}[passed]
    text = f"{text} [{tag}]"
    row["bar"] = f"{row['bar']}; {text}" if row.get("bar") else text
    if passed is None:
        row.setdefault("result", "n/a")
    elif not passed:
        row["result"] = "FAIL"
    elif row.get("result") != "FAIL":
        row["result"] = "PASS"


def _fmt(x, digits=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return str(x)


def summary_table(rows: Iterable[dict], baseline_of: Optional[Callable[[dict], Optional[dict]]] = None) -> str:
    """Markdown: one line per row with ms, ratio to its baseline (kdkernels / baseline), x floor, memory, bar.

    `baseline_of(row)` returns the row it is compared with (None: no ratio); by default the first
    row of the same case whose impl starts with 'reference eager'.
    """
    rows = list(rows)
    if baseline_of is None:
        def baseline_of(r):
            for b in rows:
                if b["case"] == r["case"] and b["impl"].startswith("reference eager") and b is not r:
                    return b
            return None
    lines = ["| case | impl | ms (median) | vs baseline | floor ms | x floor | peak MiB | bar | result |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['impl']} | - | - | - | - | - | {r.get('bar', '')} | "
                         f"{r.get('result', 'ERROR')}: {r['error'][:120]} |")
            continue
        b = baseline_of(r)
        ratio = (f"{r['ms'] / b['ms']:.3f} ({b['impl']})" if b and b.get("ms") and r.get("ms") else "-")
        fl = r.get("floor_ms")
        xfl = r["ms"] / fl if fl and r.get("ms") else None
        mem = r.get("peak_bytes")
        lines.append(f"| {r['case']} | {r['impl']} | {_fmt(r.get('ms'), 3)} | {ratio} | {_fmt(fl, 3)} | "
                     f"{_fmt(xfl)} | {_fmt(mem / 2**20 if mem is not None else None, 1)} | "
                     f"{r.get('bar', '')} | {r.get('result', '')} |")
    return "\n".join(lines)


def header(device: torch.device) -> str:
    env = env_info(device)
    ceil = ceilings(device)
    extra = "".join(f", {k} {v}" for k, v in ceil.items())
    return (f"commit {env['commit']}, kdkernels {env['kdkernels']}, torch {env['torch']}, CUDA {env['cuda']}, "
            f"device {env['device']}{extra}; memory: {memory_label(device)}")


def write_rows(rows: list[dict], path: str):
    """Save rows by the file's extension: .csv, .json (a list), or .jsonl (appended, one row a line,
    so several benchmark scripts can share one file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    if path.endswith(".csv"):
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    elif path.endswith(".jsonl"):
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
