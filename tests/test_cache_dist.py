"""The teacher cache built by several processes (torchrun, gloo, CPU): 2 and 4 ranks give the bytes of a
one-process build, a SIGKILLed rank loses nothing once the build is rerun (with any world size), and
per-rank directories join with merge_caches / `kdkernels cache merge`."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cache_helpers import BUILD_KW, TokenTeacher, sequences
from kdkernels.cache import CacheError, TeacherCache, build_cache, merge_caches, verify_cache

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The standard cache built by one process (8 shards of ~300 tokens)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("ref") / "c")
    build_cache(TokenTeacher(), sequences(), path, **BUILD_KW)
    torch.set_num_threads(n)
    return path


def _index(path):
    with open(os.path.join(path, "index.json")) as f:
        return json.load(f)


def _same_cache(a, b):
    ia, ib = _index(a), _index(b)
    assert ia["complete"] and ib["complete"]
    assert [s["files"] for s in ia["shards"]] == [s["files"] for s in ib["shards"]]  # sizes and checksums
    assert ia["config"] == ib["config"]
    names = sorted(n for n in os.listdir(a) if not n.startswith(".lock"))
    assert names == sorted(n for n in os.listdir(b) if not n.startswith(".lock"))


def _torchrun(nproc, out, *extra, timeout=180):
    import kdkernels as k

    with socket.socket() as sock:  # torchrun's --master-port 0 would hang: pick a free one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(k.__file__)), HERE]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           os.path.join(HERE, "cache_helpers.py"), out, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=timeout)


@pytest.mark.parametrize("nproc", [2, 4])
def test_ranks_build_the_one_process_cache(reference, tmp_path, nproc):
    out = str(tmp_path / "c")
    res = _torchrun(nproc, out)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    _same_cache(out, reference)
    assert verify_cache(out) == []
    assert not [n for n in os.listdir(out) if n.startswith("progress-")]  # folded into the index


def test_sigkilled_rank_then_rerun(reference, tmp_path):
    """Rank 1 SIGKILLs itself right after recording its first shard; torchrun stops the group. The cache is
    then incomplete (readers refuse it), and a rerun with 3 ranks, then one with 1, finishes it: the bytes of
    the one-process build, nothing lost or duplicated."""
    out = str(tmp_path / "c")
    res = _torchrun(2, out, "--kill-at", "progress_written", "--kill-rank", "1", "--delay", "0.05")
    assert res.returncode != 0
    assert [n for n in os.listdir(out) if n.startswith("progress-rank")]
    with pytest.raises(CacheError, match="the build is incomplete"):
        TeacherCache(out)
    res = _torchrun(3, out, "--kill-at", "progress_written", "--kill-rank", "2")
    assert res.returncode != 0
    report = build_cache(TokenTeacher(), sequences(), out, **BUILD_KW)  # one process resumes a multi-rank build
    assert report.resumed_shards >= 2 and report.built_tokens < report.num_tokens
    _same_cache(out, reference)
    assert verify_cache(out) == []


def test_per_rank_directories_merge(reference, tmp_path, capsys):
    dirs = str(tmp_path / "part-{rank}")
    res = _torchrun(2, dirs)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    parts = [dirs.replace("{rank}", str(r)) for r in range(2)]
    with pytest.raises(CacheError, match="some shard is missing"):
        merge_caches(str(tmp_path / "half"), parts[:1])
    from kdkernels.__main__ import main

    assert main(["cache", "merge", str(tmp_path / "merged"), *parts]) == 0
    assert "merged 2 directories" in capsys.readouterr().out
    _same_cache(str(tmp_path / "merged"), reference)
    assert verify_cache(str(tmp_path / "merged")) == []
    with pytest.raises(CacheError, match="is not empty"):
        merge_caches(str(tmp_path / "merged"), parts)


def test_batches_per_rank(reference):
    """DistributedSampler's semantics: disjoint equal slices per rank covering the epoch (padded by repeating,
    or cut with drop_last), a new order per epoch, resumable from a step."""
    cache = TeacherCache(reference)
    n = len(cache)  # 60
    for world in (2, 4, 7):
        for drop_last in (False, True):
            seen = []
            for rank in range(world):
                got = [b for b in cache.batches(3, shuffle=True, seed=5, epoch=1, rank=rank, world_size=world,
                                                drop_last=drop_last)]
                seen.append([int(i) for b in got for i in b.index])
            per = n // world if drop_last else -(-n // world)
            assert all(len(s) == per - (per % 3 if drop_last else 0) for s in seen)
            flat = [i for s in seen for i in s]
            if drop_last:
                assert len(set(flat)) == len(flat)  # disjoint
            else:
                assert set(flat) == set(range(n)) and len(flat) == per * world
    e0 = [int(i) for b in cache.batches(4, shuffle=True, rank=0, world_size=2) for i in b.index]
    e1 = [int(i) for b in cache.batches(4, shuffle=True, rank=0, world_size=2, epoch=1) for i in b.index]
    assert e0 != e1 and e0 == [int(i) for b in cache.batches(4, shuffle=True, rank=0, world_size=2)
                               for i in b.index]
    full = list(cache.batches(4, shuffle=True, rank=1, world_size=2))
    resumed = list(cache.batches(4, shuffle=True, rank=1, world_size=2, start=3))
    assert [b.index.tolist() for b in resumed] == [b.index.tolist() for b in full[3:]]
    with pytest.raises(CacheError, match="rank must be in"):
        next(cache.batches(4, rank=2, world_size=2))
