"""pytest-benchmark setup of benchmarks/test_bench_<op>.py: devices, shape tables, the kdk_bench fixture, the JSON's
derived columns (ratio to eager, floor fraction, bars)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # `import common, report`
try:
    import kdkernels  # noqa: F401
except ModuleNotFoundError:  # a source checkout built in place but not pip-installed
    sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402
import report  # noqa: E402

BASELINE = report.BASELINE
COMPILED = "eager+compile"


def required(impl: str) -> bool:
    """kdkernels (every variant) and eager must run wherever their case is benchmarked; any other impl (compile,
    peers) that cannot run here is skipped with its reason: a missing peer or no C++ compiler is not a failure."""
    return impl == BASELINE or impl == "kdkernels" or impl.startswith("kdkernels ")


def pytest_addoption(parser):
    g = parser.getgroup("kdkernels benchmarks")
    g.addoption("--kdk-device", default=None,
                help="cpu, cuda or cpu,cuda (default: cuda where available, else cpu)")
    g.addoption("--kdk-quick", action="store_true", default=os.environ.get("KDK_BENCH_QUICK") == "1",
                help="the small shapes (seconds per case; the spec's bars are only checked at the full shapes)")
    g.addoption("--kdk-impls", default=None, help="comma list of implementations to run (default: all)")
    g.addoption("--kdk-seconds", type=float, default=None,
                help="time to spend timing each case (default 5 on CPU, 2 on CUDA; at least 3 rounds)")
    g.addoption("--kdk-max-rounds", type=int, default=None, help="at most this many timed rounds per case")
    g.addoption("--kdk-threads", type=int, default=None,
                help="torch.set_num_threads for the CPU rows (1 gives comparable numbers on a shared machine)")


def pytest_configure(config):
    config.addinivalue_line("markers", "shapes(full, quick): {device type: [shape dicts]} of a benchmark")
    if config.getoption("kdk_threads"):
        torch.set_num_threads(config.getoption("kdk_threads"))
    common.steady_allocator()


def _devices(config) -> list[str]:
    want = config.getoption("kdk_device")
    devs = want.split(",") if want else ["cuda" if torch.cuda.is_available() else "cpu"]
    for d in devs:
        if d not in ("cpu", "cuda"):
            raise pytest.UsageError(f"--kdk-device: expected cpu, cuda or cpu,cuda, got {want!r}")
        if d == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--kdk-device cuda: no CUDA device is visible")
    return devs


def shape_id(shape: dict) -> str:
    return " ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in shape.items() if v is not None)


def pytest_generate_tests(metafunc):
    """`device` and `shape` from the test's shapes marker: the full or quick table, for each device asked for."""
    if "shape" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("shapes")
    if mark is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: a benchmark taking `shape` needs @pytest.mark.shapes")
    which = "quick" if metafunc.config.getoption("kdk_quick") else "full"
    table = mark.kwargs[which]
    devices = _devices(metafunc.config)
    params = [pytest.param(torch.device(d), s, id=f"{d} {shape_id(s)}") for d in devices for s in table.get(d, ())]
    if not params:  # say why, rather than pytest's anonymous "got empty parameter set"
        params = [pytest.param(None, None, id="no shapes",
                               marks=pytest.mark.skip(reason=f"no {','.join(devices)} shapes in its {which} table"))]
    metafunc.parametrize("device,shape", params)


def pytest_collection_modifyitems(config, items):
    """--kdk-impls deselects the other implementations before any input is built."""
    only = config.getoption("kdk_impls")
    if not only:
        return
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    impls = {item.callspec.params["impl"] for item in items
             if getattr(item, "callspec", None) and "impl" in item.callspec.params}
    if impls and wanted - impls:  # a typo would otherwise deselect everything in silence
        raise pytest.UsageError(f"--kdk-impls: unknown implementation(s) {sorted(wanted - impls)}; "
                                f"the collected suites have {sorted(impls)}")
    keep, drop = [], []
    for item in items:
        impl = getattr(item, "callspec", None) and item.callspec.params.get("impl")
        (drop if impl and impl not in wanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class Bench:
    """Runs one (case, implementation) under pytest-benchmark and stamps its extra_info."""

    def __init__(self, benchmark, config):
        self.benchmark, self.config = benchmark, config
        self.quick = config.getoption("kdk_quick")

    def run(self, step, *, op: str, impl: str, device: torch.device, shape: dict, case: str = "",
            floor_ms=None, bars=(), mem_setup=None, grads=(), **info):
        """Time `step` (one forward+backward; its first call's return value is recorded as the loss) and record it.

        The group is (op, case, shape, device), so `--benchmark-group-by=group` puts every implementation of a
        case side by side. The first call is untimed (torch.compile compiles, Triton autotunes there); rounds
        follow from the second call's time and --kdk-seconds. On CUDA each timed call ends with a
        synchronisation, so the wall clock covers the kernels. Peak memory is taken after the timing (see
        common.peak_memory; `mem_setup` frees what the previous call left, a gradient say). `bars` are the
        spec's bars for this row (report.derive evaluates them); they are dropped at the quick shapes.
        `grads`: the leaves whose gradients, after the first call, are compared with eager's (a fast wrong
        backward must not pass unseen). A row out of memory is skipped with that message, except kdkernels': its
        memory is what the bars are about, so there it fails.
        """
        if impl == COMPILED:
            torch._dynamo.reset()  # each case compiles afresh, never against the recompile limit of earlier ones

        def synced():
            out = step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        t0, why = time.perf_counter(), None
        try:
            loss = synced()
        except Exception as e:
            if required(impl) and not (impl == BASELINE and _out_of_memory(e)):
                raise  # kdkernels out of memory is a failed memory bar, not a skip
            why = f"{impl} cannot run here: {type(e).__name__}: {str(e)[:300]}"
        if why is not None:  # outside the except block, so the failed call's tensors are already freed
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pytest.skip(why)
        first_s = time.perf_counter() - t0
        prints = [_fingerprint(t.grad) for t in grads if t.grad is not None]
        t0 = time.perf_counter()
        synced()
        once = max(time.perf_counter() - t0, 1e-6)
        seconds = self.config.getoption("kdk_seconds") or (2.0 if device.type == "cuda" else 5.0)
        rounds = min(max(3, int(seconds / once)), 200 if device.type == "cuda" else 30)
        cap = self.config.getoption("kdk_max_rounds")
        if cap:
            rounds = min(rounds, cap)

        b = self.benchmark
        b.group = f"{op}{' ' + case if case else ''} {shape_id(shape)} [{device.type}]"
        # Stamped before timing, so a row that a SIGINT (gpu_check.sh's timeout) cuts short still says what it is.
        b.extra_info.update(common.env_info(device))
        b.extra_info.update(op=op, case=case, impl=impl, device_type=device.type, first_call_s=round(first_s, 3),
                            memory=common.memory_label(device),
                            **{k: str(v).replace("torch.", "") for k, v in shape.items()})
        try:
            b.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=0)
        except KeyboardInterrupt:
            # pytest-benchmark registers the row when timing starts; one with no round would fail the whole
            # JSON at the end of the session, so it is marked as an error, which leaves it out.
            if not getattr(b, "stats", None):  # Metadata is falsy until a round is recorded
                b.has_error = True
            raise
        b.extra_info["peak_bytes"] = common.peak_memory(step, device, setup=mem_setup)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            b.extra_info["loss"] = float(loss.detach().float())
        if floor_ms is not None:
            b.extra_info["floor_ms"] = floor_ms
            b.extra_info["ceilings"] = common.ceilings(device)
        if bars and not self.quick:
            b.extra_info["bars"] = list(bars)
        b.extra_info.update(info)
        if prints:
            _compare_grads(b.group, impl, torch.cat(prints), b.extra_info)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _out_of_memory(e: Exception) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError: 2.5+
    return isinstance(e, oom) or "out of memory" in str(e)


def _fingerprint(g: torch.Tensor) -> torch.Tensor:
    """A gradient's rows projected on one fixed random vector, in float32 (chunks of rows, so a bf16 gradient
    is neither rounded to bf16 in the product nor copied whole), returned in float64 on the host: a few
    numbers per row that any wrong element moves, without keeping a vocabulary-sized copy for the comparison."""
    g = g.detach().reshape(-1, g.shape[-1]) if g.dim() else g.detach().reshape(1, 1)
    r = torch.randn(g.shape[-1], generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    r = r.to(g.device, torch.float64 if g.dtype == torch.float64 else torch.float32)
    return torch.cat([c.to(r.dtype) @ r for c in g.split(4096)]).double().cpu()


_GRADS: dict = {}  # group -> impl -> (fingerprint, that row's extra_info)


def _compare_grads(group, impl, fp, extra_info):
    """grad_rel_diff_vs_eager on every row of the group once eager's fingerprint is known: the largest
    difference of the projections over the largest of eager's (whichever of the two rows ran first)."""
    rows = _GRADS.setdefault(group, {})
    rows[impl] = (fp, extra_info)
    if BASELINE not in rows:
        return
    ref = rows[BASELINE][0]
    for name, (f, info) in rows.items():
        if name != BASELINE and f.shape == ref.shape:
            info["grad_rel_diff_vs_eager"] = float((f - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


@pytest.fixture
def kdk_bench(benchmark, request):
    return Bench(benchmark, request.config)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The JSON's rows get their derived columns (report.derive) before pytest-benchmark writes them."""
    report.derive(output_json["benchmarks"])
