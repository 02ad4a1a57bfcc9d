"""`kdkernels cache build|verify|inspect`: the command line of the teacher cache."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_BUILD_EPILOG = """\
teacher (--teacher):
  a directory (or hub id) of a Hugging Face causal LM, loaded with AutoModelForCausalLM (needs
  transformers: pip install 'kdkernels[hf]'); its tokenizer, when present, gives the tokenizer hash;
  or a file saved with torch.save(model, path) (a pickled nn.Module called as model(input_ids) ->
  logits (B, L, V); unpickling runs code: only load files you trust).

token data (--tokens, --lengths), integer .npy files (see docs/cache.md):
  tokens.npy 1-D (every sequence's ids concatenated) + --lengths lengths.npy 1-D (one length per
  sequence); or tokens.npy 2-D (N, L) (N sequences of L tokens); or data.npz with arrays 'tokens'
  and 'lengths'.

Running the same command again resumes an interrupted build.

many processes and machines (docs/cache.md, "Many processes"): run it under torchrun, e.g.
  torchrun --nnodes 2 --nproc-per-node 8 -m kdkernels cache build ... --out /shared/cache
shard i goes to rank i % world, rank 0 writes the index when all are done; a rerun keeps every finished
shard whatever the world size. Without a shared filesystem use --out 'cache-{rank}' and join the
directories with `kdkernels cache merge`.

example:
  kdkernels cache build --teacher ./teacher --tokens tokens.npy --lengths lengths.npy \\
      --out cache/ --k 64 --temperature 1.0
"""


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, else a line per tenth of the work."""

    def __init__(self, what: str, unit: str, quiet: bool = False, stream=None):
        self.what, self.unit, self.quiet = what, unit, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0, self.start, self.last_tenth, self.last_draw = time.perf_counter(), None, -1, 0.0

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or total <= 0:
            return
        now = time.perf_counter()
        if self.start is None:
            self.start = (done, now)
        d0, t0 = self.start
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        frac = done / total
        if self.tty:
            if now - self.last_draw < 0.1 and done < total:
                return
            self.last_draw = now
            bar = "#" * int(30 * frac)
            eta_s = f"eta {eta:5.0f}s" if eta == eta else "eta     ?"
            self.stream.write(f"\r{self.what} [{bar:<30}] {frac:6.1%} {done:,}/{total:,} {self.unit} "
                              f"{rate:,.0f} {self.unit}/s {eta_s}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            tenth = int(10 * frac)
            if tenth > self.last_tenth:
                self.last_tenth = tenth
                self.stream.write(f"{self.what}: {done:,}/{total:,} {self.unit} ({frac:.0%}, {rate:,.0f} "
                                  f"{self.unit}/s, {now - self.t0:.1f}s)\n")
                self.stream.flush()


def _err(msg: str) -> int:
    print(f"kdkernels cache: {msg}", file=sys.stderr)
    return 1


def _load_teacher(path: str, device: str, dtype: str):
    """(model, name, tokenizer_hash or None)."""
    import torch

    from .build import tokenizer_hash

    tdtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if os.path.isfile(path):
        model = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(_err(f"{path} holds a {type(model).__name__}, not an nn.Module (save the model with "
                                  "torch.save(model, path), not its state_dict)"))
        if tdtype is not None:
            model = model.to(tdtype)
        return model.to(device).eval(), os.path.basename(path), None
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SystemExit(_err(f"{path} is not a file; loading a Hugging Face model needs transformers "
                              "(pip install 'kdkernels[hf]')"))
    kw = {} if tdtype is None else {"dtype": tdtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kw).to(device).eval()
    thash = None
    # Some transformers versions make an empty tokenizer where there are no files: look for them first.
    has_files = not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(path) if has_files else None
        if tok is not None and len(tok.get_vocab()) > 1:
            thash = tokenizer_hash(tok)
    except Exception:  # no usable tokenizer: the cache records no hash
        pass
    if thash is None:
        print(f"kdkernels cache: no tokenizer found at {path}; the cache records no tokenizer hash (pass "
              "--tokenizer-hash to record one)", file=sys.stderr)
    return model, path, thash


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                    "vocab.txt")


def _build(args) -> int:
    from ._format import CacheError
    from .build import build_cache
    from .tokens import load_tokens

    if args.device is None:
        import torch

        local = os.environ.get("LOCAL_RANK")  # torchrun: one GPU per process
        args.device = (f"cuda:{local}" if local is not None else "cuda") if torch.cuda.is_available() else "cpu"
    try:
        data = load_tokens(args.tokens, args.lengths)
        model, name, thash = _load_teacher(args.teacher, args.device, args.teacher_dtype)
        if args.tokenizer_hash is not None:
            thash = args.tokenizer_hash
        quiet = args.quiet
        print(f"kdkernels cache build: teacher {name}, {len(data):,} sequences, {data.num_tokens:,} tokens -> "
              f"{args.out} (k={args.k}, T={args.temperature}, {args.dtype}, ids {args.ids}"
              f"{', lse' if args.lse else ''})", file=sys.stderr)
        report = build_cache(model, data, args.out, k=args.k, temperature=args.temperature, value_dtype=args.dtype,
                             id_encoding=args.ids, store_lse=args.lse, vocab_size=args.vocab_size,
                             tokenizer_hash=thash, teacher_name=name, batch_size=args.batch_size,
                             batch_tokens=args.batch_tokens, shard_tokens=args.shard_tokens, device=args.device,
                             progress=Progress("build", "tokens", quiet))
    except CacheError as e:
        return _err(str(e).removeprefix("kdkernels.cache: "))
    if report.resumed_shards:
        print(f"resumed: {report.resumed_shards} of {report.num_shards} shards were already built")
    print(f"built {report.built_tokens:,} tokens in {report.seconds:.2f} s: {report.tokens_per_s:,.0f} tokens/s")
    print(f"cache {report.path}: {report.num_shards} shards, {report.num_sequences:,} sequences, "
          f"{report.num_tokens:,} tokens, {report.bytes:,} bytes, {report.bytes_per_token:.1f} bytes/token "
          f"(V={report.vocab_size}, k={report.k})")
    return 0


def _merge(args) -> int:
    from ._format import CacheError
    from .distributed import merge_caches

    try:
        index = merge_caches(args.out, args.sources)
    except CacheError as e:
        return _err(str(e).removeprefix("kdkernels.cache: "))
    n = sum(s["num_tokens"] for s in index["shards"])
    print(f"merged {len(args.sources)} directories into {os.path.abspath(args.out)}: {len(index['shards'])} shards, "
          f"{n:,} tokens (check it with `kdkernels cache verify {args.out}`)")
    return 0


def _verify(args) -> int:
    from ._format import CacheError
    from .reader import verify_cache

    t0 = time.perf_counter()
    try:
        problems = verify_cache(args.path, progress=Progress("verify", "shards", args.quiet))
    except CacheError as e:
        return _err(str(e).removeprefix("kdkernels.cache: "))
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"FAILED: {len(problems)} problem(s) in {os.path.abspath(args.path)}")
        return 1
    from .reader import TeacherCache

    c = TeacherCache(args.path, check="size", allow_incomplete=True)
    print(f"OK: {c.num_shards} shards, {c.num_tokens:,} tokens, {c.nbytes:,} bytes verified (blake2b) in "
          f"{time.perf_counter() - t0:.2f} s" + ("" if c.index.get("complete") else " (the build is incomplete)"))
    return 0


def _inspect(args) -> int:
    from ._format import CacheError
    from .reader import TeacherCache

    try:
        c = TeacherCache(args.path, check="size", allow_incomplete=True)
    except CacheError as e:
        return _err(str(e).removeprefix("kdkernels.cache: "))
    cfg = c.config
    info = {
        "path": c.path,
        "complete": bool(c.index.get("complete")),
        "teacher": c.index.get("teacher"),
        "vocab_size": c.vocab_size,
        "k": c.k,
        "temperature": c.temperature,
        "values": f"{c.value_dtype} log-probs at temperature {c.temperature}",
        "ids": (f"packed, {cfg['id_bits']} bits" if cfg["id_encoding"] == "packed" else "int32"),
        "lse": c.store_lse,
        "tokenizer_hash": c.tokenizer_hash,
        "dataset_hash": c.dataset_hash,
        "shards": c.num_shards,
        "sequences": len(c),
        "tokens": c.num_tokens,
        "bytes": c.nbytes,
        "bytes_per_token": round(c.bytes_per_token, 2),
    }
    if not info["complete"]:
        info["planned_sequences"] = cfg["num_sequences"]
        info["planned_tokens"] = cfg["num_tokens"]
    if args.json:
        if args.shards:
            info["shard_list"] = c.index["shards"]
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, val in info.items():
        print(f"{key:<{width}}  {val:,}" if isinstance(val, int) and not isinstance(val, bool)
              else f"{key:<{width}}  {val}")
    if args.shards:
        print(f"\n{'shard':<12} {'first seq':>10} {'sequences':>10} {'tokens':>10} {'bytes':>14}")
        for s in c.index["shards"]:
            nbytes = sum(f["bytes"] for f in s["files"].values())
            print(f"{s['name']:<12} {s['first_sequence']:>10,} {s['num_sequences']:>10,} {s['num_tokens']:>10,} "
                  f"{nbytes:>14,}")
    return 0


def add_parser(sub) -> None:
    """Add `cache {build,merge,verify,inspect}` to the subparsers of `python -m kdkernels`."""
    p = sub.add_parser("cache", help="build, verify or inspect an offline teacher cache (top-k log-probs per token)",
                       description="An offline teacher cache: the teacher's top-k log-probs per token, computed once, "
                       "memory-mapped by every student run (format: docs/cache.md).")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="{build,merge,verify,inspect}")
    fmt = argparse.RawDescriptionHelpFormatter

    b = verbs.add_parser("build", help="run a teacher over token data once and store its top-k (resumable)",
                         description="Run a teacher over a tokenized dataset once and store, per token, its top-k\n"
                         "log-probs at a temperature and their ids, in checksummed shards (crash-safe, resumable).",
                         epilog=_BUILD_EPILOG, formatter_class=fmt)
    b.add_argument("--teacher", required=True, metavar="PATH", help="Hugging Face model directory/id, or a "
                   "torch.save'd nn.Module file")
    b.add_argument("--tokens", required=True, metavar="FILE", help="token ids: .npy (1-D with --lengths, or 2-D) "
                   "or .npz")
    b.add_argument("--lengths", metavar="FILE", help="sequence lengths .npy (with a 1-D --tokens)")
    b.add_argument("--out", required=True, metavar="DIR", help="cache directory (new, or an interrupted build "
                   "to resume)")
    b.add_argument("--k", type=int, required=True, help="teacher entries kept per token")
    b.add_argument("--temperature", type=float, default=1.0, metavar="T", help="log-probs are log_softmax(logits / T) "
                   "(default: 1.0); train with the same temperature")
    b.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="stored value dtype "
                   "(default: float16)")
    b.add_argument("--ids", choices=("packed", "int32"), default="packed", help="id storage: ceil(log2 V) bits "
                   "per id, or int32 (default: packed)")
    b.add_argument("--lse", action="store_true", help="also store the teacher's full-vocab log-sum-exp per token")
    b.add_argument("--vocab-size", type=int, default=None, metavar="V", help="check the teacher's vocabulary size")
    b.add_argument("--tokenizer-hash", default=None, metavar="HASH", help="record this tokenizer hash (default: "
                   "computed from a Hugging Face teacher's tokenizer)")
    b.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per teacher call (default: 16)")
    b.add_argument("--batch-tokens", type=int, default=4096, metavar="N",
                   help="padded tokens per teacher call (default: 4096)")
    b.add_argument("--shard-tokens", type=int, default=1 << 20, metavar="N", help="tokens per shard (default: 1048576)")
    b.add_argument("--device", default=None, metavar="DEV", help="cpu | cuda | cuda:N (default: cuda when available)")
    b.add_argument("--teacher-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype to run the teacher in (default: as saved)")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.set_defaults(fn=_build)

    m = verbs.add_parser("merge", help="join cache directories built apart (--out 'dir-{rank}') into one",
                         description="Join the directories of one cache built by ranks without a shared filesystem "
                         "(build --out 'dir-{rank}') into a new directory: same configuration, every shard once.")
    m.add_argument("out", metavar="OUT", help="new cache directory")
    m.add_argument("sources", nargs="+", metavar="DIR", help="the per-rank directories")
    m.set_defaults(fn=_merge)

    v = verbs.add_parser("verify", help="check every shard's size and blake2b checksum against the index",
                         description="Check every shard file of a teacher cache (size, blake2b checksum, array "
                         "headers, offsets). Exit status 1 when anything is wrong, each problem naming its file.")
    v.add_argument("path", metavar="DIR", help="cache directory")
    v.add_argument("--quiet", action="store_true", help="no progress output")
    v.set_defaults(fn=_verify)

    i = verbs.add_parser("inspect", help="print what a cache holds: shards, tokens, bytes/token, k, V, T, dtype",
                         description="Print a teacher cache's configuration and size (no checksums; see verify).")
    i.add_argument("path", metavar="DIR", help="cache directory")
    i.add_argument("--shards", action="store_true", help="also list the shards")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(fn=_inspect)
