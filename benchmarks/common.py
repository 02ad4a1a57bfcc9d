"""What benchmarks/test_bench_*.py share besides pytest-benchmark: the environment stamp, peak memory, the device ceilings."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from typing import Callable, Optional

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
# The ceilings' own timer (the benchmarks themselves are timed by pytest-benchmark)
# ----------------------------------------------------------------------------------------------

def _event_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of `fn` by CUDA event pairs, one pair per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def _mmap_threshold(libc, mmap_bytes: int) -> None:
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_bytes)


def steady_allocator() -> None:
    """glibc's thresholds where its own adjustment settles once a large tensor has been freed (mmap above
    32 MiB, trim above 64 MiB), from the start: every CPU timing of a run then sees the same allocator
    (peak_memory's measured call changes them, and sets them back to these)."""
    libc = _libc()
    if libc is not None:
        _mmap_threshold(libc, 32 << 20)


def peak_memory(fn: Callable[[], object], device: torch.device,
                setup: Optional[Callable[[], object]] = None) -> Optional[int]:
    """Bytes allocated at the peak of one call of `fn` above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated after a reset (the caching allocator's live tensors, not
    its reserve). CPU: the process's peak resident size (VmHWM, reset via /proc/self/clear_refs) above
    the resident size before the call. By default glibc raises its mmap threshold after large frees (up to
    32 MiB) and serves later tensors from freed, still-resident heap pages, so the RSS would blur the live
    memory; for the measured call every allocation above 64 KiB is its own mmap, returned on free, so the RSS
    follows the live tensors. Afterwards the thresholds are set to where glibc's own adjustment settles after
    a large free (mmap above 32 MiB, trim above 64 MiB), so later timings run as they would have. None where
    Linux or glibc does not allow the measurement. `setup` runs before the baseline is read: free what a
    previous call left alive (a gradient, say), else it counts in the baseline and its release inside the
    step hides as much new memory.
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
    _mmap_threshold(libc, 64 * 1024)
    try:
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
    finally:
        _mmap_threshold(libc, 32 << 20)
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
        ms = _event_ms(lambda: dst.copy_(src), warmup=3, iters=20)
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
        ms = _event_ms(lambda: a @ b, warmup=3, iters=10)
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
