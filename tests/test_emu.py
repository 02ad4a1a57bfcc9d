"""The emulator's own checks: each fires on a deliberately broken kernel (csrc/emu/selftest.cpp) and stays
quiet on its correct twin; the message names the check, the kernel, the block and the thread."""
import re

import pytest
import torch

from kdkernels import _ops

pytestmark = pytest.mark.emu


@pytest.fixture(scope="module")
def emu():
    try:
        return _ops.load_emu()
    except ImportError as e:
        pytest.skip(str(e))


def run(check, n=64):
    return torch.ops.kdkernels_emu.emu_selftest(check, torch.randn(n))


@pytest.mark.parametrize("check", ["shared_ok", "warp_sync_ok", "global_ok", "launch_bounds_ok", "smem_optin_ok",
                                   "atomic_ok", "divergent_syncwarp_ok", "shfl_width_ok", "tile_ok"])
def test_correct_kernels_pass(emu, check):
    out = run(check)
    if check == "shared_ok":  # each thread read its neighbour's value
        assert torch.equal(out[:128], (torch.arange(128) + 1).remainder(128).float())
    if check in ("warp_sync_ok", "divergent_syncwarp_ok"):
        assert torch.equal(out[:128], (torch.arange(128) ^ 1).float())
    if check == "atomic_ok":  # 128 atomic adds, then everyone sees the total
        assert torch.equal(out[:128], torch.full((128,), 128.0))
    if check == "shfl_width_ok":  # butterfly within 16-lane groups
        assert torch.equal(out[:64], (torch.arange(64) ^ 8).float())


KERNEL = r"kdk_on_emu::selftest_\w+_kernel"
WHERE = r"block \(\d+,0,0\), thread \(\d+,0,0\)"

BROKEN = [
    ("race_raw", r"shared-memory race \(read after write\): 4 bytes at shared offset \d+ .*last touched by thread"),
    ("race_waw", r"shared-memory race \(write after write\)"),
    ("race_war", r"shared-memory race \(write after read\)"),
    ("race_warp", r"shared-memory race \(read after write\)"),
    ("race_atomic", r"shared-memory race \(atomic with a plain access\)"),  # thread 0 read before thread 1's add
    ("race_war_reread", r"shared-memory race \(write after read\)"),
    ("uninit", r"read of shared memory never written in this block: 4 bytes at shared offset 0 "),
    ("shared_oob", r"shared-memory out-of-bounds read of 4 bytes at offset 512 .*512 bytes of dynamic"),
    ("global_read_oob", r"global-memory out-of-bounds read of 4 bytes at 0x[0-9a-f]+, outside every tensor"),
    ("global_write_oob", r"global-memory out-of-bounds write of 4 bytes"),
    ("shfl_mask", r"warp collective mask mismatch: lane 0 calls __shfl_xor_sync with mask 0xffffffff but lane "
                  r"16 has exited"),
    ("shfl_lane", r"lane \d+ reads lane 20 in __shfl_sync, which is not in the mask 0xffff"),
    # the tile primitives of csrc/common/tile_mma.cuh (cp.async lands only when its group is waited for)
    ("cp_async_no_wait", r"shared memory accessed while a cp.async copy into it is in flight \(no "
                         r"cp.async.wait_group retired it\)"),
    ("cp_async_no_sync", r"shared-memory race \(read after write\)"),
    ("ldmatrix_misaligned", r"ldmatrix: a row address is not 16-byte aligned"),
    ("mma_half_warp", r"warp collective mask mismatch: lane \d+ calls a warp-wide tile primitive \(mma.sync / "
                      r"ldmatrix\) with mask 0xffffffff but lane \d+ has exited"),
    ("cp_async_to_global", r"cp.async: the destination is not in shared memory"),
]


@pytest.mark.parametrize("check,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_kernel_is_caught(emu, check, message):
    with pytest.raises(RuntimeError, match=message) as e:
        run(check)
    text = str(e.value)
    assert re.search(KERNEL, text) and re.search(WHERE, text), text


LIMITS = [
    ("block_too_big", r"launch limit: block \(2048,1,1\) exceeds 1024 threads"),
    ("launch_bounds", r"launch limit: block of 256 threads exceeds the kernel's __launch_bounds__\(128\)"),
    ("grid_y", r"launch limit: grid \(1,70000,1\) exceeds 2\^31-1 x 65535 x 65535"),
    ("smem_no_optin", r"launch limit: 65536 bytes of dynamic shared memory without the opt-in"),
    ("smem_over_device", r"launch limit: cudaFuncSetAttribute\(MaxDynamicSharedMemorySize, 245760\) exceeds the "
                         r"device's opt-in limit of 166912 bytes \(sm_80\)"),
]


@pytest.mark.parametrize("check,message", LIMITS, ids=[b[0] for b in LIMITS])
def test_launch_limits(emu, check, message):
    with pytest.raises(RuntimeError, match=message) as e:
        run(check)
    assert re.search(KERNEL, str(e.value)), str(e.value)


def test_device_limits_follow_the_architecture(emu):
    try:
        emu.set_device(arch=90)
        assert emu.device()["max_smem_optin"] == 232448
        run("smem_optin_ok")
        with pytest.raises(RuntimeError, match=r"opt-in limit of 232448 bytes \(sm_90\)"):
            run("smem_over_device")
    finally:
        emu.set_device(arch=80)
    assert emu.device()["max_smem_optin"] == 166912


def test_an_error_leaves_the_emulator_usable(emu):
    with pytest.raises(RuntimeError):
        run("race_raw")
    run("shared_ok")
    assert emu.launch_counts()  # launches are counted per kernel
