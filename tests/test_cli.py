"""The command line: info works, and demo/bench hand their flags through in order."""
from pathlib import Path

import pytest

import kdkernels.__main__ as cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "compiled_with_cuda" in capsys.readouterr().out


def test_demo_flags_reach_the_demo_in_order(monkeypatch):
    seen = {}
    monkeypatch.setattr("kdkernels.demo.main", lambda argv: seen.setdefault("argv", argv) and 0)
    cli.main(["demo", "--quick", "--plot", "x.png", "--steps", "3"])
    assert seen["argv"] == ["--quick", "--plot", "x.png", "--steps", "3"]


def test_bench_ops_and_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_bench", lambda args: seen.update(ops=args.ops, rest=args.rest) or 0)
    cli.main(["bench", "topk_kl", "sinkhorn", "--kdk-quick", "--benchmark-json=r.json"])
    assert seen == {"ops": ["topk_kl", "sinkhorn"], "rest": ["--kdk-quick", "--benchmark-json=r.json"]}


def test_bench_commands(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    run, render = cli.bench_commands(str(bench), ["topk_kl"], ["--kdk-quick"])
    assert run[1:3] == ["-m", "pytest"] and str(bench / "test_bench_topk_kl.py") in run
    assert "--benchmark-only" in run and "--benchmark-json=bench.json" in run and run[-1] == "--kdk-quick"
    assert render[1:] == [str(bench / "report.py"), "bench.json"]
    run, render = cli.bench_commands(str(bench), [], ["--benchmark-json=x.json"])
    assert run[3] == str(bench) and render[-1] == "x.json" and "--benchmark-json=bench.json" not in run
    run, render = cli.bench_commands(str(bench), [], ["--benchmark-json", "y.json", "--kdk-quick"])
    assert render[-1] == "y.json" and "--benchmark-json=bench.json" not in run
    with pytest.raises(FileNotFoundError, match="test_bench_nope.py"):
        cli.bench_commands(str(bench), ["nope"], [])


def test_unknown_verb_is_refused():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
