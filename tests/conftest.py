"""Shared pytest fixtures: the devices to test on (CPU, CUDA, and the CUDA code path on the host emulator),
the needs_cuda and emu markers, per-test seeding, and a summary of what ran emulated."""
import collections
import os
import tempfile

# A fresh torch.compile cache per run: inductor's on-disk cache keys graphs by op name, not by our fake
# kernels, so a cache left by an older build would replay its output shapes against the new op.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kdkernels-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from kdkernels import _ops

EMU = _ops.emu_available()

# The devices present here; op tests take the `device` fixture below, whose CUDA variant always
# exists (so a CPU-only run still lists it, skipped) and carries the needs_cuda marker.
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class EmulatedDevice(str):
    """The device an emulated case puts its tensors on ("cpu"); its ops run the CUDA launchers and kernels."""
    emulated = True


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: the test needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "emu: the CUDA code path on the host emulator (kdkernels._emu, "
                                       "built with KDKERNELS_EMU=1)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_emu = pytest.mark.skip(reason="kdkernels._emu is not built (rebuild with KDKERNELS_EMU=1)")
    for item in items:
        if "needs_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "emu" in item.keywords and not EMU:
            item.add_marker(skip_emu)


@pytest.fixture(autouse=True)
def _seed():
    # A fixed seed per test keeps each test reproducible on its own, whatever ran before it.
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda),
                        pytest.param("emu", marks=pytest.mark.emu)])
def device(request):
    if request.param != "emu":
        yield request.param
        return
    with _ops.emulated():
        yield EmulatedDevice("cpu")


def cuda_path(device) -> bool:
    """Whether the op runs the CUDA launchers and kernels: on a GPU or emulated."""
    return device == "cuda" or getattr(device, "emulated", False)


def emu_skip(device, why):
    """Skips a case too large for the emulator (one CPU thread runs every CUDA thread); say why."""
    if getattr(device, "emulated", False):
        pytest.skip(f"emulated: {why}")


def emu_size(device, full, emulated):
    """A problem size: `full`, or the smaller `emulated` (still spanning several tiles) on the emulator."""
    return emulated if getattr(device, "emulated", False) else full


_emu_passed = collections.Counter()


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed and "emu" in report.keywords:
        _emu_passed[report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("test_")] += 1


def pytest_terminal_summary(terminalreporter):
    if not EMU or not _emu_passed:
        return
    tr = terminalreporter
    tr.section("CUDA code path run on the emulator")
    for op, n in sorted(_emu_passed.items()):
        tr.write_line(f"{op:<20} {n:5d} emulated cases passed")
    launches = collections.Counter()
    for kernel, n in _ops.load_emu().launch_counts().items():
        launches[kernel.split("(")[0].split("<")[0].split("::")[-1]] += n
    for kernel, n in sorted(launches.items()):
        tr.write_line(f"  {kernel:<36} {n:6d} launches")
