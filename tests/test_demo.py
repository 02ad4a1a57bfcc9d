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
