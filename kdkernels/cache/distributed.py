"""Teacher-cache builds by many processes (torchrun / torch.distributed), and the merge of caches built apart.

The shard plan is a function of the sequence lengths alone (plan_shards), so every rank knows it: shard i
belongs to rank i % world. Each rank computes and commits its shards exactly as a one-process build does
(temporary directory, fsync, atomic rename) and then records them in its own progress file,
``progress-rankNNNNN.json``, replaced atomically. Rank 0 prepares the directory before anyone starts (the
index with the configuration, the removal of what a killed build left) and, once every rank is done,
writes the index with every shard in plan order and removes the progress files: a reader sees either an
incomplete cache or the complete one, never a mix.

A killed rank (torchrun then stops the others) loses at most the shard it was writing: the rerun keeps
every recorded shard, whatever its world size, and computes the rest. With ``{rank}`` in the path each
rank writes its own directory (machines without a shared filesystem); `merge_caches` then joins them.
Shard bytes do not depend on who computed them, so any world size gives the cache a one-process build
gives.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

from ._format import CONFIG_KEYS, INDEX, TMP_PREFIX, CacheError, _p, fsync_dir, read_index, shard_name, write_index

PROGRESS_GLOB = "progress-rank*.json"


def progress_name(rank: int) -> str:
    return f"progress-rank{rank:05d}.json"


def world_and_rank():
    """(world, rank, initialised_here): an initialised torch.distributed group, or torchrun's environment (a gloo
    group is then started here: it only carries barriers and a few small objects), or (1, 0, False)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_available():
            raise CacheError(_p(f"WORLD_SIZE={world} but this torch has no torch.distributed"))
        dist.init_process_group("gloo")
        return dist.get_world_size(), dist.get_rank(), True
    return 1, 0, False


def read_progress(root: str) -> Dict[int, dict]:
    """Every shard recorded by any rank's progress file in root: {shard index: index record}."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, PROGRESS_GLOB))):
        with open(path) as f:
            try:
                data = json.load(f)
            except ValueError as e:
                raise CacheError(_p(f"{path} is not valid JSON ({e}); delete it to recompute its shards")) from None
        for si, rec in data["shards"].items():
            out[int(si)] = rec
    return out


def write_progress(root: str, rank: int, records: Dict[int, dict]) -> None:
    """Atomically replace this rank's progress file (temporary file, fsync, rename, fsync of the directory)."""
    path = os.path.join(root, progress_name(rank))
    tmp = os.path.join(root, f"{TMP_PREFIX}{progress_name(rank)}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"rank": rank, "shards": {str(k): v for k, v in sorted(records.items())}}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(root)


def recorded(root: str, index: dict) -> Dict[int, dict]:
    """The committed shards of a cache directory: those of its index and of its progress files."""
    out = {int(rec["name"][len("shard-"):]): rec for rec in index["shards"]}
    out.update(read_progress(root))
    return out


def finish_index(root: str, index: dict, records: Dict[int, dict], nshards: int) -> bool:
    """When records hold every shard of the plan: the index lists them in order and says complete, and the
    progress files go. Returns whether the cache is complete."""
    if sorted(records) != list(range(nshards)):
        return False
    index["shards"] = [records[i] for i in range(nshards)]
    index["complete"] = True
    write_index(root, index)
    for path in glob.glob(os.path.join(root, PROGRESS_GLOB)):
        os.remove(path)
    fsync_dir(root)
    return True


def broadcast(obj, world: int):
    """obj from rank 0 to every rank (world 1: itself)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def merge_caches(out: str, sources: Sequence[str]) -> dict:
    """Join cache directories built apart (e.g. `kdkernels cache build --out dir-{rank}` on machines without a
    shared filesystem) into `out`: same configuration required, every shard of the plan present once; shard
    directories are copied (then checksummed by `verify_cache`). Returns the index written."""
    if not sources:
        raise CacheError(_p("merge needs at least one source directory"))
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        raise CacheError(_p(f"{out} exists and is not empty: merge into a new directory"))
    first: Optional[dict] = None
    found: Dict[int, str] = {}
    records: Dict[int, dict] = {}
    for src in sources:
        index = read_index(src)
        if first is None:
            first = index
        else:
            diffs = [f"{k} {first['config'].get(k)!r} != {index['config'].get(k)!r}" for k in CONFIG_KEYS
                     if first["config"].get(k) != index["config"].get(k)]
            if diffs:
                raise CacheError(_p(f"{src} was built with other settings than {sources[0]}: {'; '.join(diffs)}"))
        for si, rec in recorded(src, index).items():
            if si in found and found[si] != src:
                continue  # the same shard twice (same bytes by construction): keep the first
            found[si], records[si] = src, rec
    total = first["config"]["num_sequences"]
    order = sorted(records)
    covered = sum(records[i]["num_sequences"] for i in order)
    if order != list(range(len(order))) or covered != total:
        have = ", ".join(str(i) for i in order[:20]) + (" ..." if len(order) > 20 else "")
        raise CacheError(_p(f"the sources hold shards [{have}] covering {covered} of {total} sequences: some shard "
                            "is missing (finish or rerun the build that owns it)"))
    os.makedirs(out, exist_ok=True)
    for si in order:
        shutil.copytree(os.path.join(found[si], shard_name(si)), os.path.join(out, f"{TMP_PREFIX}{shard_name(si)}"))
        os.rename(os.path.join(out, f"{TMP_PREFIX}{shard_name(si)}"), os.path.join(out, shard_name(si)))
    fsync_dir(out)
    index = dict(first, shards=[records[i] for i in order], complete=True)
    write_index(out, index)
    return index


def rank_dirs(path: str, world: int) -> List[str]:
    """The per-rank directories of a `{rank}` path."""
    return [os.path.abspath(path.replace("{rank}", str(r))) for r in range(world)]


__all__ = ["merge_caches", "world_and_rank", "read_progress", "INDEX"]
