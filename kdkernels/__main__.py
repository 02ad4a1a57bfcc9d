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


def _bench(args):
    """Runs the benchmark scripts of a source checkout (they are not part of the installed package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(root, "benchmarks")
    if not os.path.isdir(bench_dir):
        print("kdkernels bench: the benchmarks/ folder of a source checkout is needed (git clone the repository)",
              file=sys.stderr)
        return 2
    names = args.ops or sorted(f[len("bench_"):-3] for f in os.listdir(bench_dir)
                               if f.startswith("bench_") and f.endswith(".py"))
    status = 0
    for name in names:
        script = os.path.join(bench_dir, f"bench_{name}.py")
        if not os.path.exists(script):
            print(f"kdkernels bench: no benchmark named '{name}' ({script} is missing)", file=sys.stderr)
            return 2
        status |= subprocess.call([sys.executable, script] + args.rest)
    return status


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
    p = sub.add_parser("bench", help="run benchmarks/bench_<op>.py of a source checkout")
    p.add_argument("ops", nargs="*", help="op stems, e.g. topk_kl (default: all); other flags (e.g. --quick) "
                   "are passed to each script")
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
