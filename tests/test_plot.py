"""Tests of kdkernels._plot: a valid PNG (chunks, CRCs, pixels) holding the curves, legend and title."""

import math
import struct
import zlib

import numpy as np
import pytest

from kdkernels._plot import PALETTE, _FONT, draw_text, plot_curves, text_size, write_png


def read_png(path):
    """Decode the PNGs write_png makes (8-bit RGB, filter 0), checking every chunk's CRC."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    W, H, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, inter) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(H, 1 + 3 * W)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(H, W, 3)


def test_write_png_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    write_png(str(tmp_path / "x.png"), img)
    np.testing.assert_array_equal(read_png(str(tmp_path / "x.png")), img)
    with pytest.raises(ValueError, match=r"the canvas must be \(H, W, 3\) uint8"):
        write_png(str(tmp_path / "y.png"), np.zeros((4, 4)))


def test_plot_curves(tmp_path):
    curves = {"hard labels": [4.0 - 0.5 * math.log1p(i) for i in range(50)],
              "top-k KL (tail)": [4.2 - 0.6 * math.log1p(i) for i in range(50)],
              "gap": [3.0, float("nan"), 2.5, 2.4]}
    path = str(tmp_path / "loss.png")
    canvas = plot_curves(curves, path, "Validation loss", y_label="loss", width=640, height=400)
    img = read_png(path)
    np.testing.assert_array_equal(img, canvas)
    assert img.shape == (400, 640, 3)
    for color in PALETTE[:3]:  # every curve (and its legend swatch) is drawn in its colour
        assert (img == np.array(color, dtype=np.uint8)).all(-1).sum() > 20
    assert ((img == 0).all(-1)).sum() > 500  # axes and text in black
    assert (img == 255).all(-1).mean() > 0.6  # mostly paper


def test_text_and_degenerate_inputs(tmp_path):
    assert set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-=:()%") <= set(_FONT)
    c = np.full((12, 40, 3), 255, dtype=np.uint8)
    draw_text(c, 1, 1, "k=8", color=(0, 0, 0))
    assert text_size("k=8") == (17, 7) and (c == 0).all(-1).sum() > 10
    draw_text(c, 30, 8, "~~~~")  # unknown characters as '?', clipped at the border without error
    plot_curves({"flat": [1.0, 1.0, 1.0], "one": [2.0]}, str(tmp_path / "a.png"))  # constant and 1-point curves
    plot_curves({"empty": [], "inf": [float("inf")]}, str(tmp_path / "b.png"), "nothing finite")
    plot_curves({"pos": [1e-3, 1e-2, 1e-1]}, str(tmp_path / "c.png"), log_y=True)
    read_png(str(tmp_path / "c.png"))
    with pytest.raises(ValueError, match="no curves"):
        plot_curves({}, str(tmp_path / "d.png"))
