"""Command line of kdkernels: `python -m kdkernels {info,demo,bench}` (also the `kdkernels` console script)."""
import argparse
import json
import os
import subprocess
import sys


def _info(args):
    import kdkernels

    info = kdkernels.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


def _demo(args):
    from kdkernels import demo

    return demo.main(args.rest)


def bench_commands(bench_dir, ops, rest):
    """The pytest-benchmark run of benchmarks/test_bench_<op>.py (all ops by default) and the report of its JSON.

    pytest flags in `rest` pass through (--kdk-quick, --kdk-device cuda, --benchmark-compare, ...); the JSON goes
    to bench.json unless `rest` names one with --benchmark-json.
    """
    files = [os.path.join(bench_dir, f"test_bench_{op}.py") for op in ops] or [bench_dir]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"no benchmark suite {missing[0]}")
    out = next((a.split("=", 1)[1] if "=" in a else (rest[i + 1] if i + 1 < len(rest) else None)
                for i, a in enumerate(rest) if a.split("=", 1)[0] == "--benchmark-json"), None)
    extra = [] if out else ["--benchmark-json=bench.json"]
    pytest = [sys.executable, "-m", "pytest", *files, "--benchmark-only", "--benchmark-group-by=group",
              "-p", "no:cacheprovider", *extra, *rest]
    return pytest, [sys.executable, os.path.join(bench_dir, "report.py"), out or "bench.json"]


def _bench(args):
    """Runs the benchmark suites of a source checkout (they are not part of the installed package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(root, "benchmarks")
    if not os.path.isdir(bench_dir):
        print("kdkernels bench: the benchmarks/ folder of a source checkout is needed (git clone the repository)",
              file=sys.stderr)
        return 2
    try:
        run, render = bench_commands(bench_dir, args.ops, args.rest)
    except FileNotFoundError as e:
        print(f"kdkernels bench: {e}", file=sys.stderr)
        return 2
    status = subprocess.call(run)
    return status | subprocess.call(render)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kdkernels", description="Fused CUDA/C++ kernels for knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="how the extension was built and which devices this process sees")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(fn=_info)
    p = sub.add_parser("demo", help="train a small teacher LM on pydoc text and distill students (see --help)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the demo (try: demo --help)")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("bench", help="run benchmarks/test_bench_<op>.py of a source checkout under pytest-benchmark")
    p.add_argument("ops", nargs="*", help="ops, e.g. topk_kl (default: all); other flags (e.g. --kdk-quick) "
                   "are passed to pytest")
    p.set_defaults(fn=_bench)
    from .cache.cli import add_parser as add_cache_parser  # `cache build|verify|inspect`

    add_cache_parser(sub)
    from .echoatt.cli import add_parser as add_echoatt_parser  # `echoatt-analyze`

    add_echoatt_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    # demo and bench hand their arguments, in order, to the demo / the benchmark scripts (argparse would
    # split "--flag value" pairs between a REMAINDER and its unknown-argument list).
    if argv[:1] == ["demo"]:  # the demo parses (and documents, --help) its own flags
        return _demo(argparse.Namespace(rest=argv[1:]))
    if argv[:1] == ["bench"] and not {"-h", "--help"} & set(argv[1:]):
        n_ops = next((i for i, x in enumerate(argv[1:]) if x.startswith("-")), len(argv) - 1)
        return _bench(argparse.Namespace(ops=argv[1:1 + n_ops], rest=argv[1 + n_ops:]))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
