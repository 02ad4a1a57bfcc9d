"""Tests of kdkernels._plot (matplotlib, the optional `plot` extra): loss curves, heatmaps with outlined groups,
benchmark bars; and without matplotlib, a clear message (the demo still runs)."""
import json
import sys

import numpy as np
import pytest

from kdkernels import _plot


def _image(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def test_curves_heatmap_and_bars(tmp_path):
    pytest.importorskip("matplotlib")
    p = _plot.plot_curves({"a": [3.0, 2.0, 1.5], "b": [3.0, 2.5, 2.4]}, str(tmp_path / "c.png"), "t",
                          xs={"a": [0, 10, 20]}, y_label="loss")
    img = _image(p)
    assert img.shape[:2] == (500, 800) and len(np.unique(img.reshape(-1, 3), axis=0)) > 10  # drawn, not blank
    with pytest.raises(ValueError, match="curve 'a' has 2 values but 3 x positions"):
        _plot.plot_curves({"a": [1.0, 2.0]}, str(tmp_path / "x.png"), xs={"a": [0, 1, 2]})
    h = _plot.plot_heatmap([[0.0, 1.0], [2.0, float("nan")]], str(tmp_path / "h.png"), "t", boxes=[(0, 0, 1, 1)])
    red = _image(h)
    assert ((red[..., 0] > 200) & (red[..., 1] < 60) & (red[..., 2] < 60)).sum() > 20  # the outline
    rows = [dict(case="kl fwd+bwd", impl="kdkernels", ms=1.0), dict(case="kl fwd+bwd", impl="eager", ms=5.0),
            dict(case="mse", impl="kdkernels", ms=2.0), dict(case="mse", impl="eager", ms=None, error="OOM")]
    _image(_plot.plot_bench(rows, str(tmp_path / "b.png"), "bench"))
    with pytest.raises(ValueError, match="no timed rows"):
        _plot.plot_bench(rows[3:], str(tmp_path / "e.png"))


def test_without_matplotlib_the_message_says_how(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert not _plot.have_matplotlib()
    with pytest.raises(ImportError, match=r"needs matplotlib, which is not installed: pip install 'kdkernels\[plot\]'"):
        _plot.plot_curves({"a": [1.0]}, str(tmp_path / "c.png"))


def test_bench_plot_script(tmp_path):
    pytest.importorskip("matplotlib")
    import subprocess

    # the shape of pytest-benchmark's --benchmark-json: group, stats in seconds, our extra_info
    js = tmp_path / "bench.json"
    js.write_text(json.dumps({"benchmarks": [
        dict(name=f"t[{impl}]", group="c", stats=dict(median=s, rounds=3), extra_info=dict(impl=impl))
        for impl, s in (("kdkernels", 0.0015), ("eager", 0.003))]}))
    out = tmp_path / "bars.png"
    res = subprocess.run([sys.executable, "benchmarks/plot_results.py", str(js), str(out)], capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
