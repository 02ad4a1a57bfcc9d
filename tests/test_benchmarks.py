"""The benchmark suites: report.py's derived columns and bars, and a CPU run of every benchmarks/test_bench_<op>.py
under pytest-benchmark whose JSON has kdkernels and eager rows for every op and renders as markdown."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402

OPS = sorted(p.stem[len("test_bench_"):] for p in (ROOT / "benchmarks").glob("test_bench_*.py"))


def _bench(impl, ms, group="g", **info):
    return dict(name=f"t[{impl}]", group=group, stats=dict(median=ms / 1000, rounds=3), extra_info=dict(impl=impl, **info))


def test_every_op_has_a_suite():
    assert set(OPS) >= {"topk_kl", "linear_topk_kl", "sinkhorn", "token_relation", "shared_attention"}
    assert not list((ROOT / "benchmarks").glob("bench_*.py")), "the hand-written benchmark scripts are replaced"


def test_derive_ratios_floor_and_bars():
    kdk = _bench("kdkernels", 2.0, loss=1.0001, floor_ms=1.0, peak_bytes=3 << 20, bars=[
        dict(vs="eager", min_speedup=3.0), dict(vs="eager", min_speedup=5.0), dict(max_x_floor=1.3),
        dict(max_peak_bytes=4 << 20, why="one gradient"), dict(vs="eager", max_peak_fraction_of=0.25),
        dict(vs="liger", min_speedup=1.0), dict(vs="eager", min_speedup=1 / 1.3)])
    eager = _bench("eager", 8.0, loss=1.0, peak_bytes=16 << 20)
    other = _bench("eager", 1.0, group="h")  # another group's eager is not this group's baseline
    report.derive([kdk, eager, other])
    k = kdk["extra_info"]
    assert k["ms"] == pytest.approx(2.0) and k["ratio_to_eager"] == pytest.approx(0.25)
    assert k["speedup_vs_eager"] == pytest.approx(4.0) and k["loss_rel_diff_vs_eager"] == pytest.approx(1e-4)
    assert k["floor_fraction"] == pytest.approx(0.5) and k["x_floor"] == pytest.approx(2.0)
    assert [r.rsplit("[", 1)[1] for r in k["bar_results"]] == ["PASS]", "FAIL]", "FAIL]", "PASS]", "PASS]", "n/a]",
                                                             "PASS]"]
    assert "got 4.00x" in k["bar_results"][0] and "(no liger row)" in k["bar_results"][5]
    assert k["bar_results"][6].startswith("time <= 1.3x eager's (got 0.25x)")
    assert k["result"] == "FAIL" and eager["extra_info"]["result"] == ""
    assert eager["extra_info"]["ratio_to_eager"] == pytest.approx(1.0)


def test_markdown_and_merge(tmp_path):
    js = tmp_path / "a.json"
    js.write_text(json.dumps({"benchmarks": [
        _bench("kdkernels", 1.0, commit="abc", device="cpu", bars=[dict(vs="eager", min_speedup=2.0)]),
        _bench("eager", 3.0, commit="abc", device="cpu")]}))
    merged, md = tmp_path / "m.json", tmp_path / "t.md"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(js), "--out", str(md), "--merged",
                          str(merged), "--fail-on-bars"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = md.read_text()
    assert "commit abc" in text and "| g | kdkernels | 1.000 | 0.333 |" in text and "bars: 1 PASS, 0 FAIL" in text
    assert json.loads(merged.read_text())["benchmarks"][0]["extra_info"]["speedup_vs_eager"] == pytest.approx(3.0)


def test_every_suite_runs_on_cpu(tmp_path):
    """The suites at their quick shapes, one round each, kdkernels and eager only (torch.compile of every case
    would cost minutes here; `make bench` runs it): every op writes rows and the report renders them."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-only", "--benchmark-json", str(out),
           "--kdk-device", "cpu", "--kdk-quick", "--kdk-max-rounds", "1", "--kdk-seconds", "0.01",
           "--kdk-impls", "kdkernels,eager", "-q", "-p", "no:cacheprovider"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    benches = json.loads(out.read_text())["benchmarks"]
    seen = {(b["extra_info"]["op"], b["extra_info"]["impl"]) for b in benches}
    assert {(op, impl) for op in OPS for impl in ("kdkernels", "eager")} <= seen
    for b in benches:
        info = b["extra_info"]
        assert info["commit"] and info["device_type"] == "cpu" and info["ms"] > 0 and "ratio_to_eager" in info
    md = subprocess.run([sys.executable, str(ROOT / "benchmarks/report.py"), str(out)], capture_output=True, text=True)
    assert md.returncode == 0 and md.stdout.count("| kdkernels |") >= len(OPS)


def test_unknown_impl_is_a_usage_error():
    res = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks/test_bench_sinkhorn.py"), "--collect-only",
                          "-q", "--kdk-device", "cpu", "--kdk-impls", "kdkernels, eagre", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 4 and "unknown implementation(s) ['eagre']" in res.stderr + res.stdout, res.stderr[-2000:]
