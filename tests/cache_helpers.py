"""Tiny deterministic teachers and data for the teacher-cache tests; also run as a script by the crash tests:

    python cache_helpers.py OUT_DIR [--delay S] [--kill-at POINT [--kill-rank R]]

builds the standard test cache into OUT_DIR (sleeping S seconds per teacher call; with --kill-at, the
process SIGKILLs itself the first time the build reaches POINT, see kdkernels.cache._format._fault_hook).
Under torchrun each rank runs it: the multi-rank build (kdkernels/cache/distributed.py); OUT_DIR may hold
{rank} for per-rank directories.
"""
import argparse
import os
import signal
import sys
import time

import numpy as np
import torch

# The standard cache of the crash tests: awkward lengths, several shards, every option that adds a file.
V, K = 1000, 8
BUILD_KW = dict(k=K, temperature=1.5, store_lse=True, shard_tokens=300, batch_size=4, batch_tokens=160)


class TokenTeacher(torch.nn.Module):
    """logits of a token depend on that token alone, so they are bit-identical whatever the batch and padding."""

    def __init__(self, vocab=V, dim=16, seed=0, delay=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g) * 0.5)
        self.delay = delay

    def forward(self, input_ids):
        if self.delay:
            time.sleep(self.delay)
        return torch.tanh(self.emb[input_ids]) @ self.out * 2.0


class CausalTeacher(torch.nn.Module):
    """A causal toy LM: position i sees the running mean of the embeddings of tokens 0..i."""

    def __init__(self, vocab=V, dim=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g) * 0.5)

    def forward(self, input_ids):
        e = self.emb[input_ids]
        mean = e.cumsum(1) / torch.arange(1, e.shape[1] + 1, dtype=e.dtype)[None, :, None]
        return torch.tanh(mean + e) @ self.out * 2.0


def assert_topk_match(ids, values, want_ids, want_values, gap=1e-4):
    """ids equal to the teacher's top-k except where two of its values are within `gap` (a near-tie a
    different batch shape may order either way); values equal to float16 rounding."""
    ids, want_ids = np.asarray(ids), np.asarray(want_ids)
    wv = np.asarray(want_values, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(values, dtype=np.float64), wv, rtol=2 ** -9, atol=1e-3)
    d = np.abs(np.diff(wv, axis=-1)) < gap
    tie = np.zeros(wv.shape, dtype=bool)
    tie[..., :-1] |= d
    tie[..., 1:] |= d
    np.testing.assert_array_equal(ids[~tie], want_ids[~tie])


def sequences(n=60, vocab=V, lo=1, hi=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi + 1))) for _ in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--kill-at", default=None)
    p.add_argument("--kill-rank", type=int, default=None, help="under torchrun: only this rank kills itself")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from kdkernels.cache import _format, build_cache

    if args.kill_at and (args.kill_rank is None or int(os.environ.get("RANK", "0")) == args.kill_rank):
        def hook(point):
            if point == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        _format._fault_hook = hook
    build_cache(TokenTeacher(delay=args.delay), sequences(), args.out, **BUILD_KW)
    return 0


if __name__ == "__main__":
    sys.exit(main())
