"""Vocab-parallel top-k KL (plain and fused linear) and the DDP recipe, with 2 and 4 gloo processes on CPU."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,emulated", [(2, False), (4, False), pytest.param(2, True, marks=pytest.mark.emu)])
def test_vocab_parallel_equals_single_process(world, emulated):
    # Every rank compares its value and gradient slice with the single-process op; a mismatch raises there.
    # emulated: the ranks' ops run the CUDA launchers and kernels on the emulator.
    mp.spawn(_dist_workers.vocab_parallel, args=(world, _free_port(), emulated), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_recipe(world):
    mp.spawn(_dist_workers.data_parallel, args=(world, _free_port()), nprocs=world, join=True)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_vocab_parallel_under_autocast(amp_dtype):
    mp.spawn(_dist_workers.vocab_parallel_autocast, args=(2, _free_port(), amp_dtype), nprocs=2, join=True)
