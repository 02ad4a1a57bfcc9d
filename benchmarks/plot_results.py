"""Bar chart of a pytest-benchmark JSON (`pytest benchmarks/ --benchmark-only --benchmark-json=out.json`):
python benchmarks/plot_results.py out.json [more.json ...] OUT.png [--title T]. Needs matplotlib
(pip install 'kdkernels[plot]')."""
import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))
import report  # noqa: E402
from kdkernels._plot import plot_bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    try:
        plot_bench(report.rows(report.load(a.json)), a.out, a.title or ", ".join(map(os.path.basename, a.json)))
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"bar chart: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
