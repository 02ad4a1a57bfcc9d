"""A dependency-free line plot written as PNG: numpy for the canvas, zlib + struct for the file.

    plot_curves({"hard labels": [3.1, 2.7, 2.5], "top-k KL": [3.0, 2.5, 2.2]}, "val_loss.png",
                "validation loss")

Text uses a built-in 5x7 pixel font of capitals, digits and common punctuation (lower case is drawn
in capitals; any other character as '?'). Non-finite values break a curve.
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from typing import Dict, Optional, Sequence

import numpy as np

# 5x7 glyphs, one string of 7 rows of 5 pixels per character ('#' ink, '.' paper).
_GLYPHS = {
    " ": ".....|.....|.....|.....|.....|.....|.....",
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#", "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.", "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####", "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####", "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.", "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#", "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#", "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.", "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#", "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.", "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.", "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.", "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..", "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.", "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####", "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.", "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.", "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.", "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    ".": ".....|.....|.....|.....|.....|.##..|.##..", ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    "-": ".....|.....|.....|#####|.....|.....|.....", "_": ".....|.....|.....|.....|.....|.....|#####",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....", "=": ".....|.....|#####|.....|#####|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....", "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...", "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##", "[": ".###.|.#...|.#...|.#...|.#...|.#...|.###.",
    "]": ".###.|...#.|...#.|...#.|...#.|...#.|.###.", "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
    "'": "..#..|..#..|.#...|.....|.....|.....|.....", "!": "..#..|..#..|..#..|..#..|..#..|.....|..#..",
    "*": ".....|..#..|#.#.#|.###.|#.#.#|..#..|.....", "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...", "#": ".#.#.|.#.#.|#####|.#.#.|#####|.#.#.|.#.#.",
}
_FONT = {c: np.array([[ch == "#" for ch in row] for row in g.split("|")], dtype=bool) for c, g in _GLYPHS.items()}

# Colour-blind-friendly qualitative palette (Okabe & Ito), then a few more.
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (0, 0, 0), (240, 228, 66), (120, 120, 120), (150, 40, 40)]
WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)


def text_size(text: str, scale: int = 1):
    """(width, height) in pixels of `text` drawn at `scale`."""
    return (6 * len(text) - 1) * scale if text else 0, 7 * scale


def draw_text(canvas: np.ndarray, x: int, y: int, text: str, color=BLACK, scale: int = 1) -> None:
    """Draw `text` with its top-left corner at (x, y) (pixels outside the canvas are clipped)."""
    H, W = canvas.shape[:2]
    for i, ch in enumerate(text):
        g = _FONT.get(ch.upper(), _FONT["?"])
        if scale > 1:
            g = np.kron(g, np.ones((scale, scale), dtype=bool))
        x0, y0 = x + 6 * scale * i, y
        ys, xs = np.nonzero(g)
        ys, xs = ys + y0, xs + x0
        ok = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        canvas[ys[ok], xs[ok]] = color


def draw_line(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
    """A straight segment, `width` pixels thick, sampled at sub-pixel steps (clipped to the canvas)."""
    H, W = canvas.shape[:2]
    n = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 2
    t = np.linspace(0.0, 1.0, n)
    xs = np.rint(x0 + (x1 - x0) * t).astype(np.int64)
    ys = np.rint(y0 + (y1 - y0) * t).astype(np.int64)
    lo, hi = -((width - 1) // 2), width // 2
    for dy in range(lo, hi + 1):
        for dx in range(lo, hi + 1):
            yy, xx = ys + dy, xs + dx
            ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            canvas[yy[ok], xx[ok]] = color


def fill_rect(canvas: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
    H, W = canvas.shape[:2]
    canvas[max(y0, 0):min(y1, H), max(x0, 0):min(x1, W)] = color


def write_png(path: str, canvas: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB array as an 8-bit truecolour PNG (filter 0 per row, zlib level 9)."""
    canvas = np.ascontiguousarray(canvas, dtype=np.uint8)
    if canvas.ndim != 3 or canvas.shape[2] != 3:
        raise ValueError(f"write_png: the canvas must be (H, W, 3) uint8: got shape {canvas.shape}")
    H, W = canvas.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = np.concatenate([np.zeros((H, 1), dtype=np.uint8), canvas.reshape(H, W * 3)], axis=1).tobytes()
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def _nice_ticks(lo: float, hi: float, n: int = 5):
    """About n round tick values covering [lo, hi]."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks, step


def _fmt(v: float, step: float) -> str:
    if step >= 1 and abs(v) < 1e6:
        return f"{v:.0f}"
    if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3):
        return f"{v:.1e}"
    digits = max(0, -int(math.floor(math.log10(step))) + (1 if step / 10 ** math.floor(math.log10(step)) == 2.5
                                                           else 0))
    return f"{v:.{digits}f}"


def plot_curves(curves: Dict[str, Sequence[float]], path: str, title: str = "", *, x_label: str = "step",
                y_label: str = "", xs: Optional[Dict[str, Sequence[float]]] = None, width: int = 800,
                height: int = 500, log_y: bool = False) -> np.ndarray:
    """Plot named curves (y values, x = 0, 1, 2, ... or xs[name]) into a PNG at `path`; returns the canvas.

    Each curve gets a colour of PALETTE in order and an entry in the legend (top right).
    log_y plots log10(y) (non-positive values are dropped).
    """
    if not curves:
        raise ValueError("plot_curves: no curves to plot")
    canvas = np.full((height, width, 3), WHITE, dtype=np.uint8)
    series = []
    for name, ys in curves.items():
        y = np.asarray(list(ys), dtype=np.float64)
        x = np.asarray(list(xs[name]), dtype=np.float64) if xs is not None and name in xs else \
            np.arange(len(y), dtype=np.float64)
        if len(x) != len(y):
            raise ValueError(f"plot_curves: curve '{name}' has {len(y)} values but {len(x)} x positions")
        if log_y:
            y = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
        series.append((name, x, y))
    finite_y = np.concatenate([y[np.isfinite(y)] for _, _, y in series] or [np.zeros(0)])
    finite_x = np.concatenate([x[np.isfinite(y)] for _, x, y in series] or [np.zeros(0)])
    ylo, yhi = (float(finite_y.min()), float(finite_y.max())) if finite_y.size else (0.0, 1.0)
    xlo, xhi = (float(finite_x.min()), float(finite_x.max())) if finite_x.size else (0.0, 1.0)
    if yhi - ylo < 1e-12 * max(1.0, abs(yhi)):
        ylo, yhi = ylo - 0.5, yhi + 0.5
    pad = 0.05 * (yhi - ylo)
    ylo, yhi = ylo - pad, yhi + pad
    if xhi <= xlo:
        xhi = xlo + 1.0
    yt, ystep = _nice_ticks(ylo, yhi)
    xt, xstep = _nice_ticks(xlo, xhi, 6)
    ylabels = [("1e" + _fmt(v, ystep)) if log_y else _fmt(v, ystep) for v in yt]

    left = 16 + max(text_size(s)[0] for s in ylabels) + (14 if y_label else 0)
    top, right, bottom = (40 if title else 16), 20, 44
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area [x0, x1] x [y0, y1]

    def px(v):
        return x0 + (v - xlo) / (xhi - xlo) * (x1 - x0)

    def py(v):
        return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)

    for v, s in zip(yt, ylabels):
        yy = py(v)
        draw_line(canvas, x0, yy, x1, yy, GRID)
        w, h = text_size(s)
        draw_text(canvas, x0 - 6 - w, int(round(yy)) - h // 2, s)
    for v in xt:
        xx = px(v)
        draw_line(canvas, xx, y0, xx, y1, GRID)
        s = _fmt(v, xstep)
        w, _ = text_size(s)
        draw_text(canvas, int(round(xx)) - w // 2, y1 + 6, s)
    draw_line(canvas, x0, y1, x1, y1, BLACK)
    draw_line(canvas, x0, y0, x0, y1, BLACK)
    if title:
        w, _ = text_size(title, 2)
        draw_text(canvas, (width - w) // 2, 12, title, scale=2)
    if x_label:
        w, _ = text_size(x_label)
        draw_text(canvas, (x0 + x1 - w) // 2, y1 + 22, x_label)
    if y_label:  # drawn vertically, one character per line
        for i, ch in enumerate(y_label[: (y1 - y0) // 9]):
            draw_text(canvas, 4, (y0 + y1) // 2 - 9 * len(y_label) // 2 + 9 * i, ch)

    for i, (name, x, y) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        ok = np.isfinite(y) & np.isfinite(x)
        for j in range(len(y) - 1):
            if ok[j] and ok[j + 1]:
                draw_line(canvas, px(x[j]), py(y[j]), px(x[j + 1]), py(y[j + 1]), color, width=2)
        lone = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]  # isolated points: a dot
        for j in np.nonzero(lone)[0]:
            fill_rect(canvas, int(px(x[j])) - 2, int(py(y[j])) - 2, int(px(x[j])) + 3, int(py(y[j])) + 3, color)

    names = [name for name, _, _ in series]
    lw = max(text_size(n)[0] for n in names) + 30
    lx, ly = x1 - lw - 8, y0 + 8
    fill_rect(canvas, lx - 6, ly - 6, lx + lw + 4, ly + 12 * len(names) + 2, WHITE)
    for i, name in enumerate(names):
        yy = ly + 12 * i
        draw_line(canvas, lx, yy + 3, lx + 18, yy + 3, PALETTE[i % len(PALETTE)], width=3)
        draw_text(canvas, lx + 24, yy, name)
    write_png(path, canvas)
    return canvas
