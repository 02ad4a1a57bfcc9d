"""On-disk format of the teacher cache: names, the index, checksummed .npy writes, id bit-packing.

Everything the builder and the reader must agree on lives here (and in docs/cache.md).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, Optional

import numpy as np

FORMAT = "kdkernels-teacher-cache"
VERSION = 1
INDEX = "index.json"
SHARD_PREFIX = "shard-"
TMP_PREFIX = ".tmp-"
VALUE_DTYPES = ("float16", "bfloat16")
ID_ENCODINGS = ("packed", "int32")
# Fields of the index header that fix what the cache means; a resumed build must ask for the same.
CONFIG_KEYS = ("vocab_size", "k", "temperature", "value_dtype", "id_encoding", "id_bits", "store_lse",
               "token_dtype", "tokenizer_hash", "dataset_hash", "num_sequences", "num_tokens", "shard_tokens")


class CacheError(RuntimeError):
    """A teacher cache that cannot be used as asked: missing, corrupt, or built for something else."""


def _fault_hook(point: str) -> None:
    """Called at the crash-critical points of a build; the crash tests replace it to kill the process there."""


def _p(msg: str) -> str:
    return "kdkernels.cache: " + msg


def shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i:05d}"


def id_bits(vocab_size: int) -> int:
    """ceil(log2 V) bits per id (at least 1): 50257 -> 16, 151936 -> 18."""
    return max(1, (int(vocab_size) - 1).bit_length())


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def packed_width(k: int, bits: int) -> int:
    """Bytes per row of k ids packed at `bits` bits each."""
    return (k * bits + 7) // 8


# ----------------------------------------------------------------------------------------------
# Bit-packing. Row r's ids form one little-endian bit stream: id j occupies stream bits
# [j*b, (j+1)*b), least significant bit first; stream bit i is bit (i % 8) of byte i // 8.
# For b = 8, 16 or 32 this is exactly the little-endian uint8/uint16/uint32 array.
# ----------------------------------------------------------------------------------------------

def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(N, K) non-negative ints < 2**bits -> (N, ceil(K*bits/8)) uint8."""
    ids = np.asarray(ids)
    n, k = ids.shape
    if bits in (8, 16, 32):
        return np.ascontiguousarray(ids.astype(f"<u{bits // 8}")).view(np.uint8).reshape(n, k * bits // 8)
    shifts = np.arange(bits, dtype=np.uint32)
    stream = ((ids.astype(np.uint32)[..., None] >> shifts) & 1).astype(np.uint8).reshape(n, k * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """(N, ceil(K*bits/8)) uint8 -> (N, K) int32 (the inverse of pack_ids)."""
    packed = np.asarray(packed)
    n = packed.shape[0]
    if bits in (8, 16, 32):
        raw = np.ascontiguousarray(packed).view(f"<u{bits // 8}").reshape(n, k)
        return raw.astype(np.int32)
    stream = np.unpackbits(packed, axis=-1, count=k * bits, bitorder="little").reshape(n, k, bits)
    out = np.zeros((n, k), dtype=np.int32)
    for j in range(bits):
        out |= stream[..., j].astype(np.int32) << j
    return out


# ----------------------------------------------------------------------------------------------
# Durable writes: every file is written under a temporary name, fsynced, then renamed; the parent
# directory is fsynced so the rename itself survives a power cut.
# ----------------------------------------------------------------------------------------------

def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A file-like object for np.lib.format.write_array that hashes and counts what it writes."""

    def __init__(self, f, on_write: Optional[Callable[[int], None]] = None):
        self.f, self.h, self.n, self.on_write = f, hashlib.blake2b(digest_size=16), 0, on_write

    def write(self, b) -> int:
        if self.on_write is not None:
            self.on_write(self.n)  # bytes written so far
        self.f.write(b)
        self.h.update(b)
        self.n += memoryview(b).nbytes
        return len(b)


def write_npy(path: str, arr: np.ndarray, on_write: Optional[Callable[[int], None]] = None) -> dict:
    """Write `arr` as .npy at `path` (a new file), fsync it; returns {"bytes", "blake2b", "shape", "dtype"}."""
    with open(path, "xb") as f:
        w = _HashingWriter(f, on_write)
        np.lib.format.write_array(w, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": w.n, "blake2b": w.h.hexdigest(), "shape": list(arr.shape), "dtype": str(arr.dtype)}


def file_digest(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_index(root: str, index: dict) -> None:
    """Atomically replace root/index.json (write a temporary file, fsync, rename, fsync the directory)."""
    tmp = os.path.join(root, f"{TMP_PREFIX}{INDEX}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fault_hook("index_tmp_written")
    os.replace(tmp, os.path.join(root, INDEX))
    fsync_dir(root)


def read_index(root: str) -> dict:
    path = os.path.join(root, INDEX)
    if not os.path.isdir(root):
        raise CacheError(_p(f"no teacher cache at {root} (the directory does not exist)"))
    if not os.path.exists(path):
        raise CacheError(_p(f"missing index {path}: not a teacher cache, or its build never started "
                            "(run `kdkernels cache build` into this directory)"))
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(_p(f"unreadable index {path}: {e}")) from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CacheError(_p(f"{path} is not a kdkernels teacher cache index (no format '{FORMAT}')"))
    if index.get("version") != VERSION:
        raise CacheError(_p(f"{path} has format version {index.get('version')}; this kdkernels reads version "
                            f"{VERSION}"))
    return index


def shard_files(config: dict) -> dict:
    """File name -> (dtype, shape-per-token or None for offsets) of every array of a shard."""
    k = config["k"]
    files = {
        "tokens.npy": (config["token_dtype"], ()),
        "offsets.npy": ("int64", None),
        "values.npy": ("float16" if config["value_dtype"] == "float16" else "uint16", (k,)),
        "ids.npy": ("uint8", (packed_width(k, config["id_bits"]),)) if config["id_encoding"] == "packed"
        else ("int32", (k,)),
    }
    if config["store_lse"]:
        files["lse.npy"] = ("float32", ())
    return files


def plan_shards(lengths: np.ndarray, shard_tokens: int) -> list:
    """Consecutive sequences, cut once a shard holds >= shard_tokens tokens: [(first, count, tokens)]."""
    plan, first, acc = [], 0, 0
    n = len(lengths)
    for i in range(n):
        acc += int(lengths[i])
        if acc >= shard_tokens or i == n - 1:
            plan.append((first, i + 1 - first, acc))
            first, acc = i + 1, 0
    return plan


def bytes_per_token_estimate(k: int, vocab_size: int, id_encoding: str, store_lse: bool) -> float:
    ids = math.ceil(k * id_bits(vocab_size) / 8) if id_encoding == "packed" else 4 * k
    return 2 * k + ids + (4 if store_lse else 0) + np.dtype(token_dtype_for(vocab_size)).itemsize
