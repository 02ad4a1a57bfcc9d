"""The fused CE + KD loss with its lm_head under DDP and FSDP2 (fully_shard), 2 and 4 gloo processes on CPU,
with gradient accumulation and num_items: the same loss and lm_head gradient as one process on the whole
batch (worker: tests/_dist_fused.py)."""
import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("mode,world,accum", [("ddp", 2, 2), ("fsdp", 2, 2), ("ddp", 4, 1), ("fsdp", 4, 1)])
def test_fused_loss_data_parallel_matches_one_process(tmp_path, mode, world, accum):
    import kdkernels as k

    with socket.socket() as sock:  # torchrun's --master-port 0 would hang: pick a free one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "result.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(k.__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(port),
           os.path.join(HERE, "_dist_fused.py"), mode, str(accum), out]
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=240)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    with open(out) as f:
        r = json.load(f)
    assert r["world"] == world and r["mode"] == mode
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"])
    assert r["grad_err"] <= 1e-5 * r["grad_scale"], r
