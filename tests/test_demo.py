"""The demo end to end (--quick): it runs, distillation beats hard labels, and the loss-curve PNG is written."""
import json

import kdkernels.demo


def test_demo_quick(tmp_path):
    out, png = tmp_path / "demo.json", tmp_path / "curves.png"
    assert kdkernels.demo.main(["--quick", "--quiet", "--json", str(out), "--plot", str(png), "--threads", "2"]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["method"].split(" (")[0] for r in res][0] == "hard labels"
    hard, best_kd = res[0]["val_ppl"], min(r["val_ppl"] for r in res[1:])
    assert best_kd < hard, res  # the point of the demo: a distilled student beats the hard-label one
    assert all(len(r["val_loss_curve"]) >= 2 for r in res)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_cache_with_two_processes(tmp_path):
    """The demo's cache step with --nproc 2 (two gloo processes sharing the shards) writes the cache one
    process writes."""
    import torch
    from kdkernels.demo import TinyLM, build_teacher_cache

    torch.manual_seed(0)
    teacher = TinyLM(50, 16, 16, 1, 2, 0.0).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (16,), generator=g).tolist() for _ in range(40)]
    kw = dict(k=4, temperature=1.0, vocab_size=50, batch_size=8, shard_tokens=100)
    build_teacher_cache(teacher, seqs, str(tmp_path / "one"), 1, **kw)
    build_teacher_cache(teacher, seqs, str(tmp_path / "two"), 2, **kw)
    one, two = (json.load(open(tmp_path / d / "index.json")) for d in ("one", "two"))
    assert two["complete"] and len(one["shards"]) == len(two["shards"]) >= 2
    assert [s["files"] for s in one["shards"]] == [s["files"] for s in two["shards"]]  # same bytes
