"""Offline teacher cache: run a teacher once over a tokenized dataset, train many students from it.

Per token the cache stores the teacher's top-k log-probs at a stated temperature (float16 or
bfloat16), their ids (bit-packed to ceil(log2 V) bits, or int32), optionally the full-vocab
log-sum-exp, and the token ids themselves, in shards listed by an index (docs/cache.md).

Why numpy .npy rather than safetensors: .npy needs no dependency beyond numpy (already required),
is memory-mapped by ``np.load(mmap_mode='r')`` with zero copies, is written by a streaming writer we
can hash and fsync as it goes, and every tool that reads numpy reads it. safetensors would add a
dependency, has no bfloat16 advantage here (we store bfloat16 as its raw uint16 bits, documented in
the index) and no checksums of its own; its one advantage, a single file per shard, we get from
directory renames (a shard is a directory that appears atomically).

    from kdkernels.cache import build_cache, TeacherCache, load_tokens
    build_cache(teacher, load_tokens("tokens.npy", "lengths.npy"), "cache/", k=64, temperature=1.0)
    cache = TeacherCache("cache/", vocab_size=V, k=64)
    for b in cache.batches(8, shuffle=True):
        logits = student(b.input_ids)
        kd = kdkernels.topk_kl_div(logits, b.values, b.ids, values_are="logprobs",
                                   temperature=cache.temperature, mode="tail", mask=b.mask)
"""
from ._format import CacheError, id_bits, pack_ids, unpack_ids
from .build import BuildReport, build_cache, tokenizer_hash
from .distributed import merge_caches
from .served import ServedTeacher
from .reader import CacheBatch, CacheCollator, CacheDataset, TeacherCache, open_cache, verify_cache
from .tokens import TokenData, load_tokens, save_tokens

__all__ = ["build_cache", "merge_caches", "ServedTeacher", "BuildReport", "TeacherCache", "open_cache", "verify_cache", "CacheBatch", "CacheDataset",
           "CacheCollator",
           "CacheError", "TokenData", "load_tokens", "save_tokens", "tokenizer_hash", "pack_ids", "unpack_ids",
           "id_bits"]
