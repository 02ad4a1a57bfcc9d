"""The command line: info works, and demo/bench hand their flags through in order."""
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
    cli.main(["bench", "topk_kl", "sinkhorn", "--quick", "--out", "r.jsonl"])
    assert seen == {"ops": ["topk_kl", "sinkhorn"], "rest": ["--quick", "--out", "r.jsonl"]}


def test_unknown_verb_is_refused():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
