"""The op library every Python layer calls: torch.ops.kdkernels, or, inside `emulated()`, the same ops run
by the CUDA launchers and kernels on the host emulator (torch.ops.kdkernels_emu, kdkernels._emu)."""
import contextlib

import torch

lib = torch.ops.kdkernels  # read as `_ops.lib` at call time, so `emulated()` can swap it


def load_emu():
    """Imports kdkernels._emu (built with KDKERNELS_EMU=1) and gives its ops the fake kernels; returns it."""
    try:
        from . import _emu
    except ImportError as e:
        raise ImportError("kdkernels._emu is not built; rebuild with KDKERNELS_EMU=1: "
                          "KDKERNELS_EMU=1 pip install --no-build-isolation -e .") from e
    from . import _meta
    _meta.register_fakes("kdkernels_emu")
    return _emu


def emu_available() -> bool:
    try:
        load_emu()
        return True
    except ImportError:
        return False


@contextlib.contextmanager
def emulated():
    """Within the block, every kdkernels op on CPU tensors runs the CUDA code path on the emulator."""
    global lib
    load_emu()
    saved, lib = lib, torch.ops.kdkernels_emu
    try:
        yield
    finally:
        lib = saved
