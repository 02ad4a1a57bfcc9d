"""Read a teacher cache: memory-mapped, random access by sequence, padded batches for topk_kl_div."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ._format import CacheError, _p, file_digest, read_index, shard_files, unpack_ids

CHECKS = ("lazy", "full", "size")


@dataclass
class CacheBatch:
    """Padded sequences and their teacher top-k, positions aligned: row b, position i is token i of
    sequence b, and values/ids there are the teacher's distribution of the token that follows it.

    input_ids (B, L) int64 (0 at padding); mask (B, L) bool (True on real tokens); lengths (B,) int64;
    targets (B, L) int64: the next token, -100 at each sequence's last position and at padding;
    values (B, L, K) log-probs at the cache's temperature (float16/bfloat16; padding: log(1/K));
    ids (B, L, K) int32 (padding: 0..K-1); lse (B, L) float32 or None; index (B,) int64 sequence numbers.
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    values: torch.Tensor
    ids: torch.Tensor
    lse: Optional[torch.Tensor]
    index: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "CacheBatch":
        return CacheBatch(**{f.name: (None if getattr(self, f.name) is None
                                      else getattr(self, f.name).to(device, non_blocking=non_blocking))
                             for f in fields(self)})


class _Shard:
    __slots__ = ("name", "first", "count", "ntok", "files", "arrays", "checked")

    def __init__(self, record: dict):
        self.name = record["name"]
        self.first, self.count, self.ntok = record["first_sequence"], record["num_sequences"], record["num_tokens"]
        self.files = record["files"]
        self.arrays = None
        self.checked = False

    def __getstate__(self):  # pickled (DataLoader workers under spawn): the maps are reopened, not copied
        return {k: (None if k == "arrays" else getattr(self, k)) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)


class TeacherCache:
    """A teacher cache opened for reading (see docs/cache.md).

    vocab_size, k, tokenizer_hash, temperature: what this run needs; a cache built otherwise is refused
    with an error naming its index. check: 'lazy' (default) hashes each shard the first time it is
    read and compares with the index (one sequential read per shard and process); 'full' hashes every
    shard now; 'size' checks only file sizes and array headers (use after `verify` on trusted storage).
    allow_incomplete: read a cache whose build has not finished (only its committed shards).
    """

    def __init__(self, path: str, *, vocab_size: Optional[int] = None, k: Optional[int] = None,
                 tokenizer_hash: Optional[str] = None, temperature: Optional[float] = None,
                 check: str = "lazy", allow_incomplete: bool = False, _defer_checks: bool = False):
        if check not in CHECKS:
            raise ValueError(_p(f"check must be one of {', '.join(CHECKS)}: got '{check}'"))
        self.path = os.path.abspath(path)
        self.index_path = os.path.join(self.path, "index.json")
        index = read_index(self.path)
        self.index = index
        self.config = cfg = index["config"]
        want = {"vocab_size": vocab_size, "k": k, "tokenizer_hash": tokenizer_hash, "temperature": temperature}
        for key, val in want.items():
            if val is not None and cfg.get(key) != val:
                raise CacheError(_p(f"{self.index_path} was built for {key} {cfg.get(key)!r}, but this run asks "
                                    f"for {val!r}"))
        if not index.get("complete") and not allow_incomplete:
            n = sum(s["num_sequences"] for s in index["shards"])
            raise CacheError(_p(f"{self.index_path}: the build is incomplete ({len(index['shards'])} shards, {n} of "
                                f"{cfg['num_sequences']} sequences); resume it (run the same build again) or pass "
                                "allow_incomplete=True"))
        self.check = check
        self.vocab_size, self.k, self.temperature = cfg["vocab_size"], cfg["k"], cfg["temperature"]
        self.tokenizer_hash, self.dataset_hash = cfg["tokenizer_hash"], cfg["dataset_hash"]
        self.value_dtype, self.store_lse = cfg["value_dtype"], cfg["store_lse"]
        self._expect = shard_files(cfg)
        self._shards = [_Shard(r) for r in index["shards"]]
        self._starts = np.array([s.first for s in self._shards] + [sum(s.count for s in self._shards)], np.int64)
        if any(self._starts[i] != self._starts[i - 1] + self._shards[i - 1].count
               for i in range(1, len(self._shards))):
            raise CacheError(_p(f"{self.index_path}: its shards do not cover consecutive sequences"))
        if self._shards and self._starts[0] != 0:
            raise CacheError(_p(f"{self.index_path}: the first shard does not start at sequence 0"))
        if _defer_checks:  # verify() reports every problem instead of raising on the first
            return
        for s in self._shards:  # cheap: missing and truncated files are caught at open
            for fname in self._expect:
                self._check_size(s, fname)
        if check == "full":
            for s in self._shards:
                self._open(s)

    # --------------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(s.ntok for s in self._shards)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def nbytes(self) -> int:
        return sum(f["bytes"] for s in self._shards for f in s.files.values())

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / max(self.num_tokens, 1)

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(self._open(s)["offsets.npy"]) for s in self._shards]) if self._shards \
            else np.zeros(0, np.int64)

    def __repr__(self) -> str:
        return (f"TeacherCache({self.path!r}, sequences={len(self)}, tokens={self.num_tokens}, V={self.vocab_size}, "
                f"k={self.k}, T={self.temperature}, {self.value_dtype}, {self.config['id_encoding']})")

    # ---------------------------------------------------------------------------------- checking
    def _file(self, s: _Shard, fname: str) -> str:
        return os.path.join(self.path, s.name, fname)

    def _check_size(self, s: _Shard, fname: str) -> None:
        f = self._file(s, fname)
        meta = s.files.get(fname)
        if meta is None:
            raise CacheError(_p(f"{self.index_path}: shard {s.name} lists no {fname}"))
        if not os.path.exists(f):
            raise CacheError(_p(f"shard file {f} is missing (the index lists it); rebuild the cache"))
        size = os.path.getsize(f)
        if size != meta["bytes"]:
            raise CacheError(_p(f"shard file {f} is truncated or altered: expected {meta['bytes']} bytes, found "
                                f"{size}; rebuild the cache (`kdkernels cache verify` checks every shard)"))

    def _check_digest(self, s: _Shard, fname: str) -> None:
        f = self._file(s, fname)
        got, want = file_digest(f), s.files[fname]["blake2b"]
        if got != want:
            raise CacheError(_p(f"checksum mismatch in shard file {f}: expected blake2b {want}, got {got}; the file "
                                "is corrupt, rebuild the cache"))

    def _open(self, s: _Shard) -> dict:
        if s.arrays is not None:
            return s.arrays
        arrays = {}
        for fname, (dtype, per_token) in self._expect.items():
            self._check_size(s, fname)
            if self.check != "size" and not s.checked:
                self._check_digest(s, fname)
            f = self._file(s, fname)
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
            except Exception as e:
                raise CacheError(_p(f"shard file {f} is not a readable .npy file ({e}); rebuild the cache")) from e
            shape = (s.count + 1,) if per_token is None else (s.ntok,) + per_token
            if a.dtype != np.dtype(dtype) or a.shape != shape:
                raise CacheError(_p(f"shard file {f} holds {a.dtype} {a.shape}, expected {dtype} {shape} "
                                    f"(from {self.index_path})"))
            arrays[fname] = a
        off = arrays["offsets.npy"]
        if off[0] != 0 or off[-1] != s.ntok or np.any(np.diff(off) < 1):
            raise CacheError(_p(f"shard file {self._file(s, 'offsets.npy')} holds inconsistent offsets"))
        s.checked = True
        s.arrays = arrays
        return arrays

    def verify(self, progress=None) -> list:
        """Hash every shard file and compare with the index; returns the problems found (empty: intact)."""
        problems = []
        for i, s in enumerate(self._shards):
            before = len(problems)
            for fname in self._expect:
                try:
                    self._check_size(s, fname)
                    self._check_digest(s, fname)
                except CacheError as e:
                    problems.append(str(e))
            if len(problems) == before:  # intact bytes: now the array headers and offsets
                try:
                    s.arrays, s.checked = None, True
                    self._open(s)
                except CacheError as e:
                    problems.append(str(e))
            if progress is not None:
                progress(i + 1, len(self._shards))
        extra = [n for n in os.listdir(self.path) if n.startswith(".tmp-") or
                 (n.startswith("shard-") and n not in {s.name for s in self._shards})]
        if extra:
            problems.append(_p(f"{self.path} holds leftovers of an interrupted build ({', '.join(sorted(extra))}); "
                               "resuming the build removes them"))
        return problems

    # ----------------------------------------------------------------------------------- reading
    def _locate(self, i: int):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"kdkernels.cache: sequence {i} out of range for a cache of {n} sequences")
        i %= n
        si = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self._shards[si], i - self._shards[si].first

    def sequence(self, i: int) -> dict:
        """Sequence i as numpy arrays; tokens, values (and lse) are zero-copy views of the mapped shard;
        ids are decoded (a copy) when bit-packed. values of a bfloat16 cache are raw uint16 bits."""
        s, j = self._locate(i)
        a = self._open(s)
        lo, hi = int(a["offsets.npy"][j]), int(a["offsets.npy"][j + 1])
        ids = a["ids.npy"][lo:hi]
        if self.config["id_encoding"] == "packed":
            ids = unpack_ids(ids, self.k, self.config["id_bits"])
        out = {"tokens": a["tokens.npy"][lo:hi], "values": a["values.npy"][lo:hi], "ids": ids}
        if self.store_lse:
            out["lse"] = a["lse.npy"][lo:hi]
        return out

    def batch(self, indices: Sequence[int], pad_id: int = 0) -> CacheBatch:
        """Padded batch of the given sequences (see CacheBatch)."""
        indices = [int(i) for i in indices]
        seqs = [self.sequence(i) for i in indices]
        B, K = len(seqs), self.k
        L = max((len(s["tokens"]) for s in seqs), default=0)
        vdt = torch.float16 if self.value_dtype == "float16" else torch.bfloat16
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        targets = torch.full((B, L), -100, dtype=torch.long)
        values = torch.full((B, L, K), -math.log(K), dtype=vdt)
        ids = torch.arange(K, dtype=torch.int32).expand(B, L, K).clone()
        lse = torch.zeros(B, L, dtype=torch.float32) if self.store_lse else None
        lengths = torch.tensor([len(s["tokens"]) for s in seqs], dtype=torch.long)
        for b, s in enumerate(seqs):
            n = len(s["tokens"])
            tok = torch.from_numpy(s["tokens"].astype(np.int64))
            input_ids[b, :n] = tok
            mask[b, :n] = True
            targets[b, :n - 1] = tok[1:]
            v = torch.from_numpy(np.array(s["values"]))
            values[b, :n] = v if self.value_dtype == "float16" else v.view(torch.int16).view(torch.bfloat16)
            ids[b, :n] = torch.from_numpy(np.asarray(s["ids"], dtype=np.int32))
            if lse is not None:
                lse[b, :n] = torch.from_numpy(np.array(s["lse"]))
        return CacheBatch(input_ids, mask, lengths, targets, values, ids, lse, torch.tensor(indices, dtype=torch.long))

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                indices: Optional[Sequence[int]] = None, pad_id: int = 0, epoch: int = 0,
                rank: Optional[int] = None, world_size: Optional[int] = None, start: int = 0) -> Iterator[CacheBatch]:
        """Iterate over padded batches of sequences (all of them, or `indices`), in order or shuffled by
        `seed + epoch`.

        Several data-parallel ranks (DistributedSampler's semantics): each rank gets every world_size-th
        sequence of the epoch's order from its rank on, a disjoint slice of equal length (the order is padded
        by repeating its start, or with drop_last cut, to a multiple of world_size). rank / world_size default
        to the initialised torch.distributed group's, else 0 / 1; pass world_size=1 to read everything.
        start: skip this many batches (resume an epoch from a step).
        """
        world, r = _data_parallel(rank, world_size)
        order = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if shuffle:
            order = np.random.default_rng(seed + epoch).permutation(order)
        if world > 1 and len(order):
            per = len(order) // world if drop_last else -(-len(order) // world)
            order = np.resize(order, per * world)[r::world]  # np.resize repeats from the start
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for lo in range(int(start) * batch_size, stop, batch_size):
            yield self.batch(order[lo:lo + batch_size], pad_id=pad_id)

    def dataset(self) -> "CacheDataset":
        """A torch Dataset of {'input_ids', 'cache_index'} (for DataLoader / Hugging Face Trainer + CacheCollator)."""
        return CacheDataset(self)


def _data_parallel(rank: Optional[int], world_size: Optional[int]):
    """(world, rank): the arguments, else the initialised torch.distributed group's, else (1, 0)."""
    if world_size is None and rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    world = 1 if world_size is None else int(world_size)
    r = 0 if rank is None else int(rank)
    if world < 1 or not 0 <= r < world:
        raise CacheError(_p(f"batches: rank must be in [0, world_size): got rank {r}, world_size {world}"))
    return world, r


class CacheDataset(torch.utils.data.Dataset):
    """Item i: {'input_ids': the cached tokens of sequence i (int64 tensor), 'cache_index': i}."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        s, j = self.cache._locate(i)
        a = self.cache._open(s)
        lo, hi = int(a["offsets.npy"][j]), int(a["offsets.npy"][j + 1])
        return {"input_ids": torch.from_numpy(a["tokens.npy"][lo:hi].astype(np.int64)), "cache_index": int(i)}


class CacheCollator:
    """Collates items carrying 'cache_index' (and optionally 'input_ids', 'labels') into a batch dict:
    input_ids, attention_mask, labels (the items' labels, else input_ids; -100 at padding: the Hugging
    Face convention, not shifted), teacher_values, teacher_ids, teacher_lse (when stored).

    When items carry input_ids, they must equal the cached tokens of that sequence (else the cache
    belongs to other data and the error says which sequence).
    """

    def __init__(self, cache: TeacherCache, pad_id: int = 0):
        self.cache, self.pad_id = cache, pad_id

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items or any("cache_index" not in it for it in items):
            raise CacheError(_p("CacheCollator: every item needs a 'cache_index' (the sequence number in the cache); "
                                "use TeacherCache.dataset() or add the column to your dataset"))
        idx = [int(it["cache_index"]) for it in items]
        b = self.cache.batch(idx, pad_id=self.pad_id)
        for row, it in enumerate(items):
            if "input_ids" in it:
                given = torch.as_tensor(it["input_ids"]).reshape(-1).long()
                n = int(b.lengths[row])
                if given.numel() != n or not torch.equal(given, b.input_ids[row, :n]):
                    raise CacheError(_p(f"CacheCollator: the input_ids of cache_index {idx[row]} differ from the "
                                        f"tokens cached for that sequence in {self.cache.path} (the cache was built "
                                        "from other data or another tokenization)"))
        labels = b.input_ids.masked_fill(~b.mask, -100)
        for row, it in enumerate(items):  # items may bring their own labels (e.g. -100 on prompt tokens)
            if "labels" in it:
                lab = torch.as_tensor(it["labels"]).reshape(-1).long()
                if lab.numel() != int(b.lengths[row]):
                    raise CacheError(_p(f"CacheCollator: the labels of cache_index {idx[row]} have {lab.numel()} "
                                        f"entries for a sequence of {int(b.lengths[row])} tokens"))
                labels[row, :lab.numel()] = lab
        out = {"input_ids": b.input_ids, "attention_mask": b.mask.long(), "labels": labels,
               "teacher_values": b.values, "teacher_ids": b.ids}
        if b.lse is not None:
            out["teacher_lse"] = b.lse
        return out


def open_cache(path: str, **kwargs) -> TeacherCache:
    """TeacherCache(path, **kwargs)."""
    return TeacherCache(path, **kwargs)


def verify_cache(path: str, progress=None) -> list:
    """Check every shard file of the cache at `path` (sizes, blake2b checksums, array headers, offsets),
    complete or not; returns the problems found, each naming its file (empty: the cache is intact)."""
    cache = TeacherCache(path, check="size", allow_incomplete=True, _defer_checks=True)
    return cache.verify(progress)
