"""pytest-benchmark JSON -> the markdown table of README / benchmarks/results: ratios to eager, floor, memory, bars.

    python benchmarks/report.py out.json [more.json ...] [--out table.md] [--merged all.json] [--fail-on-bars]

conftest.py calls `derive` when pytest-benchmark writes its JSON, so the file already carries every derived
column in each benchmark's extra_info; this script renders it (deriving again where a column is missing).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Iterable, Optional

BASELINE = "eager"  # the implementation every ratio is taken against


def _ms(bench: dict) -> Optional[float]:
    stats = bench.get("stats") or {}
    return 1000 * stats["median"] if stats.get("median") is not None else None


def _bar_text(bar: dict, me: dict, group: dict) -> tuple[str, Optional[bool]]:
    """One bar of a benchmark: its text with the measured value and whether it passed (None: not measurable)."""
    ms, info = _ms(me), me["extra_info"]
    if "min_speedup" in bar:  # faster than impl `vs` by at least this factor (below 1: at most this much slower)
        other, need = group.get(bar["vs"]), bar["min_speedup"]
        want = f">= {need:g}x {bar['vs']}" if need >= 1 else f"time <= {1 / need:.3g}x {bar['vs']}'s"
        if other is None or ms is None or _ms(other) is None:
            return f"{want} (no {bar['vs']} row)", None
        got = _ms(other) / ms
        return f"{want} (got {got if need >= 1 else 1 / got:.2f}x)", got >= need
    if "max_x_floor" in bar:
        floor = info.get("floor_ms")
        want = f"<= {bar['max_x_floor']:g}x floor"
        if not floor or ms is None:
            return f"{want} (no floor)", None
        return f"{want} (got {ms / floor:.2f}x)", ms <= bar["max_x_floor"] * floor
    if "max_peak_bytes" in bar:
        peak = info.get("peak_bytes")
        want = f"peak <= {bar['max_peak_bytes'] / 2**20:.0f} MiB" + (f" ({bar['why']})" if bar.get("why") else "")
        if peak is None:
            return f"{want} (not measured)", None
        return f"{want} (got {peak / 2**20:.0f})", peak <= bar["max_peak_bytes"]
    if "max_peak_fraction_of" in bar:  # peak memory at most this fraction of impl `vs`'s
        other = group.get(bar["vs"])
        want = f"peak <= {bar['max_peak_fraction_of']:g} x {bar['vs']}'s"
        mine, theirs = info.get("peak_bytes"), other and other["extra_info"].get("peak_bytes")
        if mine is None or not theirs:
            return f"{want} (not measured)", None
        return f"{want} (got {mine / theirs:.2f})", mine <= bar["max_peak_fraction_of"] * theirs
    return f"unknown bar {bar}", None


def derive(benches: Iterable[dict]) -> list[dict]:
    """Fill each benchmark's extra_info with ms, ratio_to_eager (time / eager's, below 1 is faster),
    speedup_vs_eager, floor_fraction (floor / time: 1 is at the physical floor), x_floor, loss_rel_diff_vs_eager,
    bar_results and result (PASS / FAIL / n/a), against the eager row of the same group. Returns the list."""
    benches = list(benches)
    groups: dict = {}
    for b in benches:
        groups.setdefault(b.get("group"), {})[b["extra_info"].get("impl")] = b
    for b in benches:
        info, ms = b["extra_info"], _ms(b)
        info["ms"] = ms
        base = groups[b.get("group")].get(BASELINE)
        if base is not None and ms and _ms(base):
            info["ratio_to_eager"] = ms / _ms(base)
            info["speedup_vs_eager"] = _ms(base) / ms
            lb, lm = base["extra_info"].get("loss"), info.get("loss")
            if lb is not None and lm is not None and b is not base:
                info["loss_rel_diff_vs_eager"] = abs(lm - lb) / max(abs(lb), 1e-30)
        if info.get("floor_ms") and ms:
            info["floor_fraction"] = info["floor_ms"] / ms
            info["x_floor"] = ms / info["floor_ms"]
        results = [_bar_text(bar, b, groups[b.get("group")]) for bar in info.get("bars", ())]
        info["bar_results"] = [f"{t} [{ {None: 'n/a', True: 'PASS', False: 'FAIL'}[ok] }]" for t, ok in results]
        oks = [ok for _, ok in results if ok is not None]
        info["result"] = ("FAIL" if False in oks else "PASS") if oks else ("n/a" if results else "")
    return benches


def rows(benches: Iterable[dict]) -> list[dict]:
    """Flat rows (case = the group, impl, ms and every extra_info field), for tables and plots."""
    return [dict(b["extra_info"], case=b.get("group") or b["name"], name=b["name"],
                 rounds=(b.get("stats") or {}).get("rounds")) for b in derive(benches)]


def _f(x, digits=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return str(x)


def _e(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def header(rs: list[dict]) -> str:
    """Which code on which machine: the stamp every row carries (one line per distinct stamp)."""
    stamps = dict.fromkeys((r.get("commit"), r.get("kdkernels"), r.get("torch"), r.get("cuda"), r.get("device"))
                           for r in rs)
    out = []
    for commit, kdk, torch_v, cuda, dev in stamps:
        ceil: dict = {}  # measured as floors are needed, so later rows carry more: the union, once per device
        for r in rs:
            if r.get("device") == dev:
                ceil.update(r.get("ceilings") or {})
        c = "".join(f", {k} {v}" for k, v in ceil.items())
        out.append(f"commit {commit}, kdkernels {kdk}, torch {torch_v}, CUDA {cuda}, device {dev}{c}")
    return "\n".join(out)


def markdown(benches: Iterable[dict]) -> str:
    rs = rows(benches)
    lines = [header(rs), "",
             "Median of one step (forward+backward unless the case says fwd); vs eager = time / eager's (below 1 is faster); floor fraction = "
             "physical floor / time (GPU); peak = memory above the inputs "
             "(CUDA max allocated; CPU peak RSS); loss diff = relative to eager's loss; grad diff = largest "
             "difference of the gradient's row projections on a fixed random vector over eager's largest.", "",
             "| case | impl | ms | vs eager | floor fraction | peak MiB | loss diff | grad diff | bars | result |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rs:
        peak = r.get("peak_bytes")
        lines.append(f"| {r['case']} | {r.get('impl', r['name'])} | {_f(r.get('ms'), 3)} | {_f(r.get('ratio_to_eager'), 3)} "
                     f"| {_f(r.get('floor_fraction'))} | {_f(peak / 2**20 if peak is not None else None, 1)} "
                     f"| {_e(r.get('loss_rel_diff_vs_eager'))} | {_e(r.get('grad_rel_diff_vs_eager'))} "
                     f"| {'; '.join(r.get('bar_results') or [])} | {r.get('result', '')} |")
    notes = [f"- {r['case']} / {r.get('impl')}: {r['note']}" for r in rs if r.get("note")]
    if notes:
        lines += [""] + notes
    n_pass = sum(r.get("result") == "PASS" for r in rs)
    n_fail = sum(r.get("result") == "FAIL" for r in rs)
    n_bars = [b.rsplit("[", 1)[-1] for r in rs for b in r.get("bar_results") or []]
    lines += ["", f"bars: {n_bars.count('PASS]')} PASS, {n_bars.count('FAIL]')} FAIL, {n_bars.count('n/a]')} n/a "
              f"(rows: {n_pass} PASS, {n_fail} FAIL)"]
    return "\n".join(lines)


def load(paths: Iterable[str]) -> list[dict]:
    """The benchmarks of one or more pytest-benchmark JSON files, in order."""
    out = []
    for p in paths:
        with open(p) as f:
            out += json.load(f).get("benchmarks", [])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    p.add_argument("--out", help="write the markdown here too")
    p.add_argument("--merged", help="write all the files' benchmarks, derived, as one JSON here")
    p.add_argument("--fail-on-bars", action="store_true", help="exit 1 when a bar FAILs")
    a = p.parse_args(argv)
    benches = load(a.json)
    if not benches:
        print(f"report: no benchmarks in {a.json}", file=sys.stderr)
        return 2
    text = markdown(benches)  # derives the columns in place, so --merged writes them too
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.merged:
        with open(a.merged, "w") as f:
            json.dump({"benchmarks": benches}, f, indent=1)
    return 1 if a.fail_on_bars and any(b["extra_info"].get("result") == "FAIL" for b in benches) else 0


if __name__ == "__main__":
    sys.exit(main())
