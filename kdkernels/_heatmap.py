"""A dependency-free heatmap written as PNG, built on the canvas, font and PNG writer of kdkernels._plot.

    plot_heatmap(similarity, "layers.png", "attention similarity (JS)", labels=[str(i) for i in range(L)])

Cells are coloured by a perceptually ordered map (viridis' anchor colours, linearly interpolated), with a
colour bar; values are printed in the cells when they fit. Non-finite cells are drawn grey.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from ._plot import BLACK, WHITE, draw_line, draw_text, fill_rect, text_size, write_png

# viridis at 0, 1/8, ..., 1
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
                     (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)
_NAN_COLOR = (190, 190, 190)


def colormap(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> (..., 3) uint8 RGB."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(t).astype(np.int64).clip(0, len(_VIRIDIS) - 2)
    frac = (t - lo)[..., None]
    return np.rint(_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).astype(np.uint8)


def _label(v: float) -> str:
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.3g}"


def plot_heatmap(matrix, path: str, title: str = "", *, labels: Optional[Sequence[str]] = None,
                 vmin: Optional[float] = None, vmax: Optional[float] = None, x_label: str = "",
                 y_label: str = "", cell: Optional[int] = None, annotate: Optional[bool] = None,
                 boxes: Sequence[Tuple[int, int, int, int]] = (), box_color=(220, 30, 30)) -> np.ndarray:
    """Draw a 2-D matrix as a heatmap PNG at `path`; returns the (H, W, 3) canvas.

    vmin/vmax default to the finite range of the matrix; labels name the rows and columns (default 0..n-1);
    cell is the cell size in pixels (default: about 600 px for the whole matrix, at least 8); annotate prints
    each value in its cell (default: when the cells are wide enough).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"plot_heatmap: the matrix must be 2-D and non-empty: got shape {m.shape}")
    rows, cols = m.shape
    finite = m[np.isfinite(m)]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else float(vmin))
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else float(vmax))
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    if labels is None:
        labels = [str(i) for i in range(max(rows, cols))]
    labels = [str(s) for s in labels]
    if cell is None:
        cell = max(8, min(48, 600 // max(rows, cols)))
    if annotate is None:
        annotate = cell >= text_size("0.00")[0] + 4
    lab_w = max(text_size(s)[0] for s in labels[:max(rows, cols)])
    left = 12 + lab_w + (14 if y_label else 0)
    top = (40 if title else 12)
    grid_w, grid_h = cols * cell, rows * cell
    bar_x = left + grid_w + 20
    bar_w = 16
    ticks = [lo + (hi - lo) * i / 4 for i in range(5)]
    right = bar_x + bar_w + 8 + max(text_size(_label(t))[0] for t in ticks) + 10
    bottom = top + grid_h + 14 + 7 + (18 if x_label else 0) + 8
    width = max(right, (text_size(title, 2)[0] + 24) if title else 0)
    canvas = np.full((bottom, width, 3), WHITE, dtype=np.uint8)

    t = (m - lo) / (hi - lo)
    colors = colormap(np.where(np.isfinite(t), t, 0.0))
    for i in range(rows):
        for j in range(cols):
            x0, y0 = left + j * cell, top + i * cell
            color = tuple(int(c) for c in colors[i, j]) if np.isfinite(m[i, j]) else _NAN_COLOR
            fill_rect(canvas, x0, y0, x0 + cell, y0 + cell, color)
            if annotate and np.isfinite(m[i, j]):
                s = _label(m[i, j])
                w, h = text_size(s)
                ink = BLACK if (t[i, j] > 0.6) else WHITE
                draw_text(canvas, x0 + (cell - w) // 2, y0 + (cell - h) // 2, s, ink)
    # row labels (left) and column labels (below), thinned when the cells are narrower than the text
    step_r = max(1, math.ceil(9 / cell))
    for i in range(0, rows, step_r):
        w, h = text_size(labels[i])
        draw_text(canvas, left - 6 - w, top + i * cell + (cell - h) // 2, labels[i])
    step_c = max(1, math.ceil((max(text_size(s)[0] for s in labels[:cols]) + 4) / cell))
    for j in range(0, cols, step_c):
        w, _ = text_size(labels[j])
        draw_text(canvas, left + j * cell + (cell - w) // 2, top + grid_h + 6, labels[j])
    draw_line(canvas, left - 1, top - 1, left + grid_w, top - 1, BLACK)
    draw_line(canvas, left - 1, top + grid_h, left + grid_w, top + grid_h, BLACK)
    draw_line(canvas, left - 1, top - 1, left - 1, top + grid_h, BLACK)
    draw_line(canvas, left + grid_w, top - 1, left + grid_w, top + grid_h, BLACK)
    for r0, c0, r1, c1 in boxes:
        x0, y0, x1, y1 = left + c0 * cell, top + r0 * cell, left + (c1 + 1) * cell - 1, top + (r1 + 1) * cell - 1
        for xa, ya, xb, yb in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
            draw_line(canvas, xa, ya, xb, yb, box_color, width=2)
    # colour bar, high at the top
    for y in range(grid_h):
        fill_rect(canvas, bar_x, top + y, bar_x + bar_w, top + y + 1,
                  tuple(int(c) for c in colormap(1.0 - y / max(grid_h - 1, 1))))
    for v in ticks:
        yy = top + int(round((hi - v) / (hi - lo) * (grid_h - 1)))
        draw_line(canvas, bar_x + bar_w, yy, bar_x + bar_w + 3, yy, BLACK)
        draw_text(canvas, bar_x + bar_w + 6, yy - 3, _label(v))
    if title:
        w, _ = text_size(title, 2)
        draw_text(canvas, (width - w) // 2, 12, title, scale=2)
    if x_label:
        w, _ = text_size(x_label)
        draw_text(canvas, left + (grid_w - w) // 2, top + grid_h + 22, x_label)
    if y_label:
        for i, ch in enumerate(y_label[: max(grid_h // 9, 1)]):
            draw_text(canvas, 2, top + grid_h // 2 - 9 * len(y_label) // 2 + 9 * i, ch)
    write_png(path, canvas)
    return canvas
