"""Build a teacher cache: run the teacher once over a tokenized dataset, store its top-k per token.

The build is crash-safe and resumable:

1. The index (index.json, the only file a reader trusts) is written first with the cache's
   configuration and no shards, atomically (temporary file, fsync, rename, fsync of the directory).
2. Each shard is a directory of .npy files written under a temporary name (``.tmp-shard-NNNNN-PID``);
   every file is fsynced, then the directory is renamed to ``shard-NNNNN`` (a rename is atomic) and
   the parent directory fsynced.
3. Only then is the shard added to the index (with each file's size and blake2b checksum), again by
   an atomic replace. A shard not in the index does not exist for readers.

A killed build leaves at most a temporary directory, or a renamed shard the index does not list
yet; a resumed build (the same call again) removes both, checks that it asks for the same cache
(vocab size, k, temperature, dtypes, tokenizer and dataset hashes, shard size), and continues with
the first shard the index lacks. Shards are planned from the sequence lengths alone, so a resumed
build cuts the same shards, batches them the same way and writes the same bytes as an
uninterrupted one.
"""
from __future__ import annotations

import inspect
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import _format
from ._format import (CONFIG_KEYS, FORMAT, ID_ENCODINGS, INDEX, SHARD_PREFIX, TMP_PREFIX, VALUE_DTYPES, VERSION,
                      CacheError, _p, fsync_dir, id_bits, pack_ids, plan_shards, read_index, shard_files,
                      shard_name, token_dtype_for, write_index, write_npy)
from .distributed import (broadcast, finish_index, gather, progress_name, read_progress, recorded, world_and_rank,
                          write_progress)
from .tokens import TokenData

ProgressFn = Callable[[int, int], None]
_ROWS = 1024  # token rows post-processed at a time (top-k, logsumexp): bounds the float32 temporaries


@dataclass
class BuildReport:
    """What a build did. `tokens_per_s` counts the tokens computed by this call (not resumed ones)."""

    path: str
    num_sequences: int
    num_tokens: int
    num_shards: int
    resumed_shards: int
    built_tokens: int
    seconds: float
    bytes: int
    vocab_size: int
    k: int

    @property
    def tokens_per_s(self) -> float:
        return self.built_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.num_tokens, 1)


class _Teacher:
    """Calls a teacher as `teacher(input_ids=, attention_mask=)` when its forward takes attention_mask
    (Hugging Face models), else `teacher(input_ids)`; takes `.logits`, a tuple's first item, or the tensor."""

    def __init__(self, teacher: Callable):
        self.fn = teacher
        fwd = getattr(teacher, "forward", teacher)
        try:
            params = inspect.signature(fwd).parameters
            self.takes_mask = "attention_mask" in params
        except (TypeError, ValueError):
            self.takes_mask = False

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        out = self.fn(input_ids=ids, attention_mask=attn) if self.takes_mask else self.fn(ids)
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise CacheError(_p(f"the teacher returned {type(out).__name__}; expected logits (B, L, V), an object "
                                "with .logits, or a tuple whose first item is the logits"))
        return out


def _device_of(teacher, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(teacher, torch.nn.Module):
        for p in teacher.parameters():
            return p.device
    return torch.device("cpu")


def _batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, batch_tokens: int):
    """Greedy batches over `order` (sequence ids sorted by length): <= batch_size sequences and
    <= batch_tokens padded tokens (a longer sequence goes alone)."""
    batch, longest = [], 0
    for i in order:
        n = int(lengths[i])
        if batch and (len(batch) >= batch_size or max(longest, n) * (len(batch) + 1) > batch_tokens):
            yield batch
            batch, longest = [], 0
        batch.append(int(i))
        longest = max(longest, n)
    if batch:
        yield batch


def _clean(root: str, committed: set) -> None:
    """Remove what an interrupted build left: temporary files/dirs and shards the index does not list."""
    for name in os.listdir(root):
        full = os.path.join(root, name)
        if name.startswith(TMP_PREFIX) or (name.startswith(SHARD_PREFIX) and name not in committed):
            if os.path.isdir(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
    fsync_dir(root)


def _dir_bytes(root: str, index: dict) -> int:
    return sum(f["bytes"] for s in index["shards"] for f in s["files"].values())


def build_cache(
    teacher: Callable,
    data: Union[TokenData, Sequence[Sequence[int]]],
    path: str,
    *,
    k: int,
    temperature: float = 1.0,
    value_dtype: str = "float16",
    id_encoding: str = "packed",
    store_lse: bool = False,
    vocab_size: Optional[int] = None,
    tokenizer_hash: Optional[str] = None,
    teacher_name: Optional[str] = None,
    batch_size: int = 16,
    batch_tokens: int = 4096,
    shard_tokens: int = 1 << 20,
    device: Union[str, torch.device, None] = None,
    progress: Optional[ProgressFn] = None,
) -> BuildReport:
    """Run `teacher` over `data` once and store its top-k log-probs per token at `path` (see docs/cache.md).

    teacher: a causal LM, `teacher(input_ids)` or `teacher(input_ids=, attention_mask=)` -> logits (B, L, V)
      (a tensor, `.logits`, or a tuple's first item). Sequences are right-padded, so position i of a
      sequence sees only tokens 0..i; set it to eval mode yourself if it is not an nn.Module.
    data: TokenData (see kdkernels.cache.load_tokens) or a list of token-id sequences.
    k, temperature: the cache stores, per token, the k largest teacher log-probs
      log_softmax(logits / temperature) and their ids (sorted by decreasing value), i.e. exactly
      kdkernels.teacher_topk(logits, k, temperature); train with topk_kl_div(values_are='logprobs',
      temperature=<the same>).
    value_dtype: 'float16' (default: 11 significant bits for log-probs in [-65504, 0]) or 'bfloat16'.
    id_encoding: 'packed' (ceil(log2 V) bits per id, lossless) or 'int32'.
    store_lse: also store the teacher's full-vocab logsumexp(logits / temperature) per token (float32).
    vocab_size: checked against the teacher's logits (default: read from a first teacher call).
    tokenizer_hash: any string identifying the tokenizer (see tokenizer_hash()); readers can require it.
    batch_size, batch_tokens: at most this many sequences / padded tokens per teacher call.
    shard_tokens: tokens per shard (shards end at sequence boundaries).
    progress: called as progress(done_tokens, total_tokens) after every teacher batch.

    Calling it again on an interrupted build resumes it; on a complete one it returns at once.
    """
    if not isinstance(data, TokenData):
        data = TokenData.from_sequences(data)
    if hasattr(teacher, "topk_logprobs"):  # a served teacher (kdkernels.cache.ServedTeacher): top-k only
        if float(temperature) != 1.0 or store_lse:
            raise ValueError(_p("a served teacher returns top-k log-probs of its raw distribution: it can fill a cache "
                                "at temperature 1.0 without store_lse only (a tempered log-softmax and the "
                                "log-sum-exp need the full vocabulary)"))
        if vocab_size is None:
            vocab_size = teacher.vocab_size
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(_p(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}: got '{value_dtype}'"))
    if id_encoding not in ID_ENCODINGS:
        raise ValueError(_p(f"id_encoding must be one of {', '.join(ID_ENCODINGS)}: got '{id_encoding}'"))
    if not temperature > 0:
        raise ValueError(_p(f"temperature must be > 0: got {temperature}"))
    for name, val in (("batch_size", batch_size), ("batch_tokens", batch_tokens), ("shard_tokens", shard_tokens)):
        if int(val) < 1:
            raise ValueError(_p(f"{name} must be >= 1: got {val}"))

    world, rank, ours = world_and_rank()
    per_rank = "{rank}" in str(path)
    root = os.path.abspath(str(path).replace("{rank}", str(rank)))
    if world > 1 or per_rank or (os.path.isdir(root) and read_progress(root)):
        try:  # several ranks (or a build they left): kdkernels/cache/distributed.py
            return _build_ranks(root, per_rank, world, rank, teacher, data, k=k, temperature=temperature,
                                value_dtype=value_dtype, id_encoding=id_encoding, store_lse=store_lse,
                                vocab_size=vocab_size, tokenizer_hash=tokenizer_hash, teacher_name=teacher_name,
                                batch_size=batch_size, batch_tokens=batch_tokens, shard_tokens=shard_tokens,
                                device=device, progress=progress)
        finally:
            if ours:
                import torch.distributed as dist
                dist.destroy_process_group()
    _refuse_foreign(root)
    os.makedirs(root, exist_ok=True)
    with _BuildLock(root):
        return _build_locked(root, teacher, data, k=k, temperature=temperature, value_dtype=value_dtype,
                             id_encoding=id_encoding, store_lse=store_lse, vocab_size=vocab_size,
                             tokenizer_hash=tokenizer_hash, teacher_name=teacher_name, batch_size=batch_size,
                             batch_tokens=batch_tokens, shard_tokens=shard_tokens, device=device, progress=progress)


LOCK = ".lock"


def _refuse_foreign(root: str) -> None:
    if os.path.isdir(root) and not os.path.exists(os.path.join(root, INDEX)) and any(
            not n.startswith(TMP_PREFIX) and not n.startswith(LOCK) for n in os.listdir(root)):
        raise CacheError(_p(f"{root} exists, is not empty and holds no {INDEX}: refusing to build a "
                            "teacher cache into it (choose a new or empty directory)"))


class _BuildLock:
    """An exclusive flock on root/.lock (or root/<name>): two builds never write one cache (the OS drops it if
    the process dies)."""

    def __init__(self, root: str, name: str = LOCK):
        self.path, self.fd = os.path.join(root, name), None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise CacheError(_p(f"another build is writing {os.path.dirname(self.path)} (it holds {self.path}); "
                                "wait for it or stop it")) from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
        return False


def _build_locked(root, teacher, data, *, k, temperature, value_dtype, id_encoding, store_lse, vocab_size,
                  tokenizer_hash, teacher_name, batch_size, batch_tokens, shard_tokens, device, progress):
    call = _Teacher(teacher)
    dev = _device_of(teacher, device)
    was_training = teacher.training if isinstance(teacher, torch.nn.Module) else None
    if was_training:
        teacher.eval()
    try:
        index = _open_or_create(root, call, dev, data, k=k, temperature=float(temperature),
                                value_dtype=value_dtype, id_encoding=id_encoding, store_lse=bool(store_lse),
                                vocab_size=vocab_size, tokenizer_hash=tokenizer_hash, teacher_name=teacher_name,
                                shard_tokens=int(shard_tokens))
        return _run(root, index, call, dev, data, int(batch_size), int(batch_tokens), progress)
    finally:
        if was_training:
            teacher.train()


def _open_or_create(root, call, dev, data: TokenData, **cfg) -> dict:
    index_path = os.path.join(root, INDEX)
    if os.path.exists(index_path):
        index = read_index(root)
        cfg_vocab = cfg["vocab_size"] if cfg["vocab_size"] is not None else index["config"]["vocab_size"]
    else:
        index = None
        cfg_vocab = cfg["vocab_size"]
        if cfg_vocab is None:  # one teacher call on the single token 0 tells the vocabulary size
            probe = torch.zeros(1, 1, dtype=torch.long, device=dev)
            with torch.inference_mode():
                cfg_vocab = int(call(probe, torch.ones_like(probe)).shape[-1])
    V = int(cfg_vocab)
    if not 1 <= cfg["k"] <= V:
        raise ValueError(_p(f"k must be in [1, V = {V}]: got {cfg['k']}"))
    top = data.max_id()
    if top >= V:
        raise CacheError(_p(f"{data.source}: token id {top} is outside the teacher's vocabulary [0, {V})"))
    config = {
        "vocab_size": V,
        "k": int(cfg["k"]),
        "temperature": cfg["temperature"],
        "value_dtype": cfg["value_dtype"],
        "id_encoding": cfg["id_encoding"],
        "id_bits": id_bits(V) if cfg["id_encoding"] == "packed" else 32,
        "store_lse": cfg["store_lse"],
        "token_dtype": token_dtype_for(V),
        "tokenizer_hash": cfg["tokenizer_hash"],
        "dataset_hash": data.fingerprint(),
        "num_sequences": len(data),
        "num_tokens": data.num_tokens,
        "shard_tokens": cfg["shard_tokens"],
    }
    if index is not None:
        old = index["config"]
        diffs = [f"{key} {old.get(key)!r} (cache) != {config[key]!r} (this build)"
                 for key in CONFIG_KEYS if old.get(key) != config[key]]
        if diffs:
            raise CacheError(_p(f"{index_path} was started with other settings: {'; '.join(diffs)}. Resume with the "
                                "same teacher, data and options, or build into a new directory"))
        progress = list(read_progress(root).values())  # shards a multi-rank build committed
        _clean(root, {s["name"] for s in index["shards"] + progress})
        for s in index["shards"] + progress:  # a committed shard must still be there, whole (sizes; `verify` hashes)
            for fname, meta in s["files"].items():
                f = os.path.join(root, s["name"], fname)
                size = os.path.getsize(f) if os.path.exists(f) else None
                if size != meta["bytes"]:
                    raise CacheError(_p(f"shard file {f} is missing or truncated (expected {meta['bytes']} bytes, "
                                        f"found {size}); delete {os.path.join(root, s['name'])} and its entry, "
                                        "or rebuild the cache"))
        return index
    _clean(root, set())
    for name in os.listdir(root):  # progress files without an index belong to no cache
        if name.startswith("progress-rank"):
            os.remove(os.path.join(root, name))
    index = {"format": FORMAT, "version": VERSION, "config": config, "teacher": cfg["teacher_name"],
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False, "shards": []}
    write_index(root, index)
    return index


def _run(root, index, call, dev, data: TokenData, batch_size, batch_tokens, progress) -> BuildReport:
    cfg = index["config"]
    plan = plan_shards(data.lengths, cfg["shard_tokens"])
    done = len(index["shards"])
    next_seq = sum(s["num_sequences"] for s in index["shards"])
    if done > len(plan) or (done < len(plan) and plan[done][0] != next_seq):
        raise CacheError(_p(f"{os.path.join(root, INDEX)} lists {done} shards that do not match this dataset's "
                            "shard plan; build into a new directory"))
    done_tokens = sum(s["num_tokens"] for s in index["shards"])
    total = data.num_tokens
    t0 = time.perf_counter()
    built = 0
    if progress is not None:
        progress(done_tokens, total)
    for si in range(done, len(plan)):
        first, count, ntok = plan[si]
        arrays = _compute_shard(call, dev, data, cfg, first, count, ntok, batch_size, batch_tokens,
                                lambda n: progress(done_tokens + n, total) if progress is not None else None)
        record = _commit_shard(root, si, arrays, first, count, ntok)
        index["shards"].append(record)
        index["complete"] = si == len(plan) - 1
        write_index(root, index)
        _format._fault_hook("index_written")
        done_tokens += ntok
        built += ntok
    if not index["complete"]:  # a build that had nothing left to do but never flagged it (e.g. empty plan)
        index["complete"] = True
        write_index(root, index)
    seconds = time.perf_counter() - t0
    return BuildReport(path=root, num_sequences=len(data), num_tokens=total, num_shards=len(plan),
                       resumed_shards=done, built_tokens=built, seconds=seconds, bytes=_dir_bytes(root, index),
                       vocab_size=cfg["vocab_size"], k=cfg["k"])


def _build_ranks(root, per_rank, world, rank, teacher, data, *, batch_size, batch_tokens, device, progress, **cfg):
    """One rank of a multi-rank build (see kdkernels/cache/distributed.py): rank 0 (every rank, with per-rank
    directories) prepares the directory, each rank computes the shards i with i % world == rank that no
    progress file or index holds yet, and rank 0 writes the final index once all are done."""
    call, dev = _Teacher(teacher), _device_of(teacher, device)
    was_training = teacher.training if isinstance(teacher, torch.nn.Module) else None
    if was_training:
        teacher.eval()
    lead = rank == 0 or per_rank
    locks = []
    try:
        index, err = None, None
        if lead:
            try:
                _refuse_foreign(root)
                os.makedirs(root, exist_ok=True)
                locks.append(_BuildLock(root).__enter__())
                index = _open_or_create(root, call, dev, data, k=int(cfg["k"]), **_cfg_rest(cfg))
            except Exception as e:  # every rank must hear of it, or the others wait at the barrier forever
                err = f"rank {rank}: {e}"
        errs = [e for e in gather(err, world) if e]
        if errs:
            raise CacheError(errs[0] if errs[0].startswith("kdkernels.cache") else _p(errs[0]))
        if not per_rank:
            index = broadcast(index, world)
            if rank != 0:
                locks.append(_BuildLock(root, f"{LOCK}.rank{rank}").__enter__())
        conf = index["config"]
        plan = plan_shards(data.lengths, conf["shard_tokens"])
        if conf["dataset_hash"] != data.fingerprint():
            raise CacheError(_p(f"rank {rank} was given other data than rank 0 (dataset hash {data.fingerprint()} "
                                f"!= {conf['dataset_hash']})"))
        done = recorded(root, index)
        mine = _own_file(root, rank)
        own = {si: rec for si, rec in read_progress(root).items() if si in mine}
        pending = [si for si in range(len(plan)) if si % world == rank and si not in done]
        total = sum(plan[si][2] for si in pending)
        t0, built = time.perf_counter(), 0
        if progress is not None:
            progress(0, total)
        for si in pending:
            first, count, ntok = plan[si]
            arrays = _compute_shard(call, dev, data, conf, first, count, ntok, batch_size, batch_tokens,
                                    lambda n: progress(built + n, total) if progress is not None else None)
            own[si] = _commit_shard(root, si, arrays, first, count, ntok)
            write_progress(root, rank, own)
            _format._fault_hook("progress_written")
            built += ntok
        gather(None, world)  # every rank has committed its shards
        complete = False
        if rank == 0 and not per_rank:
            complete = finish_index(root, index, recorded(root, index), len(plan))
        complete = broadcast(complete, world)  # nobody returns before the index is final
        if not per_rank and not complete:
            raise CacheError(_p(f"{root}: some shard of the plan is missing after every rank finished; rerun the build"))
        records = recorded(root, read_index(root))
        return BuildReport(path=root, num_sequences=len(data), num_tokens=data.num_tokens, num_shards=len(plan),
                           resumed_shards=len(done), built_tokens=built, seconds=time.perf_counter() - t0,
                           bytes=sum(f["bytes"] for r in records.values() for f in r["files"].values()),
                           vocab_size=conf["vocab_size"], k=conf["k"])
    finally:
        for lock in reversed(locks):
            lock.__exit__(None, None, None)
        if was_training:
            teacher.train()


def _cfg_rest(cfg: dict) -> dict:
    """build_cache's options as _open_or_create takes them."""
    return dict(temperature=float(cfg["temperature"]), value_dtype=cfg["value_dtype"],
                id_encoding=cfg["id_encoding"], store_lse=bool(cfg["store_lse"]), vocab_size=cfg["vocab_size"],
                tokenizer_hash=cfg["tokenizer_hash"], teacher_name=cfg["teacher_name"],
                shard_tokens=int(cfg["shard_tokens"]))


def _own_file(root: str, rank: int) -> set:
    """The shard indices this rank's own progress file records (kept when it rewrites the file)."""
    path = os.path.join(root, progress_name(rank))
    if not os.path.exists(path):
        return set()
    import json
    with open(path) as f:
        return {int(si) for si in json.load(f)["shards"]}


def _values_to_numpy(v: torch.Tensor, value_dtype: str) -> np.ndarray:
    if value_dtype == "float16":
        return v.to(torch.float16).cpu().numpy()
    return v.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


@torch.inference_mode()
def _compute_shard(call, dev, data: TokenData, cfg, first, count, ntok, batch_size, batch_tokens, on_progress):
    k, T, V = cfg["k"], cfg["temperature"], cfg["vocab_size"]
    lengths = data.lengths[first:first + count]
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    files = shard_files(cfg)
    out = {name: np.empty((ntok,) + shape if shape is not None else (count + 1,), dtype=dt)
           for name, (dt, shape) in files.items()}
    out["offsets.npy"][:] = offsets
    out["tokens.npy"][:] = data.tokens[data.offsets[first]:data.offsets[first + count]]
    order = np.argsort(lengths, kind="stable")
    written = 0
    if hasattr(call.fn, "topk_logprobs"):  # a served teacher: its top-k log-probs, stored as they come
        for batch in _batches(order, lengths, batch_size, batch_tokens):
            got = call.fn.topk_logprobs([data[first + j] for j in batch], k)
            for (vals, top), j in zip(got, batch):
                rows = slice(int(offsets[j]), int(offsets[j]) + int(lengths[j]))
                out["values.npy"][rows] = _values_to_numpy(torch.from_numpy(vals), cfg["value_dtype"])
                out["ids.npy"][rows] = pack_ids(top, cfg["id_bits"]) if cfg["id_encoding"] == "packed" else top
                written += int(lengths[j])
            on_progress(written)
        return out
    for batch in _batches(order, lengths, batch_size, batch_tokens):
        L = int(lengths[batch].max())
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        attn = torch.zeros(len(batch), L, dtype=torch.long)
        for b, j in enumerate(batch):
            n = int(lengths[j])
            ids[b, :n] = torch.from_numpy(np.asarray(data[first + j], dtype=np.int64))
            attn[b, :n] = 1
        logits = call(ids.to(dev), attn.to(dev))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (len(batch), L) or logits.shape[-1] != V:
            raise CacheError(_p(f"the teacher returned logits of shape {tuple(logits.shape)} for input ids of shape "
                                f"{(len(batch), L)}; expected {(len(batch), L, V)} (vocab_size {V})"))
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        for b, j in enumerate(batch):
            n, o = int(lengths[j]), int(offsets[j])
            for r0 in range(0, n, _ROWS):  # bounded temporaries, padding rows skipped
                r1 = min(n, r0 + _ROWS)
                part = logits[b, r0:r1]
                # Exactly kdkernels.teacher_topk(logits, k, T, 'logprobs'), plus the logsumexp it computes.
                vals, top = torch.topk(part, k, dim=-1)
                z = part.to(acc)
                lse = torch.logsumexp(z / T if T != 1.0 else z, dim=-1)
                vals = vals.to(acc) / T - lse[:, None]
                rows = slice(o + r0, o + r1)
                out["values.npy"][rows] = _values_to_numpy(vals, cfg["value_dtype"])
                top_np = top.to(torch.int32).cpu().numpy()
                out["ids.npy"][rows] = pack_ids(top_np, cfg["id_bits"]) if cfg["id_encoding"] == "packed" else top_np
                if cfg["store_lse"]:
                    out["lse.npy"][rows] = lse.float().cpu().numpy()
            written += n
        del logits
        on_progress(written)
    return out


def _commit_shard(root: str, si: int, arrays: dict, first: int, count: int, ntok: int) -> dict:
    name = shard_name(si)
    tmp = os.path.join(root, f"{TMP_PREFIX}{name}-{os.getpid()}")
    os.mkdir(tmp)
    files = {}
    for fname, arr in arrays.items():
        def hook(n):
            if n > 0:  # the .npy header is written, the data not yet: a crash here leaves a partial file
                _format._fault_hook("mid_file")
        files[fname] = write_npy(os.path.join(tmp, fname), arr, on_write=hook)
    fsync_dir(tmp)
    _format._fault_hook("shard_written")
    os.rename(tmp, os.path.join(root, name))
    fsync_dir(root)
    _format._fault_hook("shard_renamed")
    return {"name": name, "first_sequence": first, "num_sequences": count, "num_tokens": ntok, "files": files}


def tokenizer_hash(tokenizer) -> str:
    """A stable hash of a tokenizer's vocabulary (token -> id) and special tokens, for `tokenizer_hash=`.

    Works with Hugging Face tokenizers (get_vocab()) and with any mapping token -> id.
    """
    import hashlib
    import json

    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else dict(tokenizer)
    special = sorted(getattr(tokenizer, "all_special_tokens", []) or [])
    blob = json.dumps([sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), special], ensure_ascii=False)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()
