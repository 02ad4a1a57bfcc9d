"""Bar chart of benchmark rows (`bench_<op>.py --out rows.jsonl` / .json): python benchmarks/plot_results.py
ROWS OUT.png [--title T]. Needs matplotlib (pip install 'kdkernels[plot]')."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kdkernels._plot import plot_bench  # noqa: E402


def read_rows(path):
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        data = json.loads(text)
        return data if isinstance(data, list) else data.get("rows", [])
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("rows")
    p.add_argument("out")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    try:
        plot_bench(read_rows(a.rows), a.out, a.title or os.path.basename(a.rows))
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"bar chart: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
