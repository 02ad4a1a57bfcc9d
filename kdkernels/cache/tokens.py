"""Tokenized datasets for the cache builder: variable-length sequences of token ids, memory-mapped.

File formats (documented in docs/cache.md):

- ``tokens.npy`` 1-D integer array, every sequence's ids concatenated, plus ``lengths.npy`` 1-D
  integer array of the sequence lengths (``sum(lengths) == len(tokens)``);
- ``tokens.npy`` 2-D integer array (N, L): N sequences of L tokens each (no padding, no lengths file);
- ``data.npz`` with arrays ``tokens`` (1-D) and ``lengths`` (loaded into memory: .npz cannot be mapped).
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from ._format import CacheError, _p


class TokenData:
    """Sequences of token ids: ``tokens`` (T,) and ``offsets`` (N + 1,); ``data[i]`` is a view of sequence i."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, source: str = "<memory>"):
        tokens = np.asarray(tokens) if not isinstance(tokens, np.memmap) else tokens
        lengths = np.asarray(lengths)
        if tokens.ndim != 1:
            raise CacheError(_p(f"{source}: tokens must be 1-D (concatenated sequences): got shape {tokens.shape}"))
        if not np.issubdtype(tokens.dtype, np.integer):
            raise CacheError(_p(f"{source}: tokens must be integers: got {tokens.dtype}"))
        if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
            raise CacheError(_p(f"{source}: lengths must be a 1-D integer array: got {lengths.dtype} "
                                f"shape {lengths.shape}"))
        if len(lengths) == 0:
            raise CacheError(_p(f"{source}: the dataset has no sequences"))
        if lengths.min() < 1:
            raise CacheError(_p(f"{source}: every sequence needs at least one token: sequence "
                                f"{int(np.argmin(lengths))} has length {int(lengths.min())}"))
        total = int(lengths.sum())
        if total != len(tokens):
            raise CacheError(_p(f"{source}: the lengths add up to {total} tokens but the token array holds "
                                f"{len(tokens)}"))
        self.tokens = tokens
        self.lengths = lengths.astype(np.int64)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.source = source

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int]]) -> "TokenData":
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        tokens = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        return cls(tokens, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def max_id(self) -> int:
        m = 0
        for s in range(0, len(self.tokens), 1 << 24):
            m = max(m, int(self.tokens[s:s + (1 << 24)].max()))
        return m

    def fingerprint(self) -> str:
        """blake2b of the lengths and the ids (as little-endian int64), whatever dtype they are stored in."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.lengths.astype("<i8").tobytes())
        for s in range(0, len(self.tokens), 1 << 22):
            h.update(np.ascontiguousarray(self.tokens[s:s + (1 << 22)]).astype("<i8").tobytes())
        return h.hexdigest()


def load_tokens(path: str, lengths: Optional[str] = None) -> TokenData:
    """Open a token file (see the module docstring); .npy files are memory-mapped."""
    if not os.path.exists(path):
        raise CacheError(_p(f"token file {path} does not exist"))
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                if "tokens" not in z or "lengths" not in z:
                    raise CacheError(_p(f"{path} must hold arrays 'tokens' and 'lengths': found {sorted(z.files)}"))
                return TokenData(z["tokens"], z["lengths"], path)
        toks = np.load(path, mmap_mode="r", allow_pickle=False)
    except CacheError:
        raise
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for bad files
        raise CacheError(_p(f"cannot read token file {path}: {e}")) from e
    if toks.ndim == 2:
        if lengths is not None:
            raise CacheError(_p(f"{path} is 2-D (N, L): it takes no lengths file"))
        n, L = toks.shape
        return TokenData(toks.reshape(-1), np.full(n, L, dtype=np.int64), path)
    if lengths is None:
        raise CacheError(_p(f"{path} is 1-D (concatenated sequences): the lengths file is required "
                            "(--lengths lengths.npy)"))
    try:
        lens = np.load(lengths, allow_pickle=False)
    except Exception as e:
        raise CacheError(_p(f"cannot read lengths file {lengths}: {e}")) from e
    return TokenData(toks, lens, path)


def save_tokens(tokens_path: str, lengths_path: str, sequences: Iterable[Sequence[int]],
                dtype: str = "int32") -> TokenData:
    """Write sequences in the two-file format (tokens.npy + lengths.npy); returns them as TokenData."""
    data = TokenData.from_sequences(sequences)
    np.save(tokens_path, data.tokens.astype(dtype))
    np.save(lengths_path, data.lengths)
    return data
