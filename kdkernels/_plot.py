"""Plots with matplotlib (the optional `plot` extra: pip install 'kdkernels[plot]'): the demo's loss curves, the
EchoAtt similarity heatmap with its groups outlined, and benchmark bar charts. Headless (Agg backend)."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

INSTALL = "pip install 'kdkernels[plot]'  (or: pip install matplotlib)"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _pyplot(what: str):
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"kdkernels: {what} needs matplotlib, which is not installed: {INSTALL}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


@contextlib.contextmanager
def _figure(what: str, path: str, size):
    """(plt, fig, ax) of a new figure; on a clean exit it is laid out and saved to path; closed either way."""
    plt = _pyplot(what)
    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        yield plt, fig, ax
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_curves(curves: Dict[str, Sequence[float]], path: str, title: str = "", *, x_label: str = "step",
                y_label: str = "", xs: Optional[Dict[str, Sequence[float]]] = None, log_y: bool = False) -> str:
    """Named curves (y values, x = 0, 1, 2, ... or xs[name]) as lines in one PNG at `path`; returns path."""
    if not curves:
        raise ValueError("plot_curves: no curves to plot")
    with _figure("plot_curves", path, (8, 5)) as (_, fig, ax):
        for name, ys in curves.items():
            y = np.asarray(list(ys), dtype=np.float64)
            x = np.asarray(list(xs[name]), dtype=np.float64) if xs is not None and name in xs else np.arange(len(y))
            if len(x) != len(y):
                raise ValueError(f"plot_curves: curve '{name}' has {len(y)} values but {len(x)} x positions")
            ax.plot(x, y, label=name, linewidth=1.6)
        if log_y:
            ax.set_yscale("log")
        ax.set(title=title, xlabel=x_label, ylabel=y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return path


def plot_heatmap(matrix, path: str, title: str = "", *, labels: Optional[Sequence[str]] = None,
                 vmin: Optional[float] = None, vmax: Optional[float] = None, x_label: str = "", y_label: str = "",
                 annotate: Optional[bool] = None, boxes: Sequence[Tuple[int, int, int, int]] = ()) -> str:
    """A 2-D matrix as a heatmap PNG at `path` (NaN cells blank); boxes (r0, c0, r1, c1), inclusive, are
    outlined in red; annotate prints each value (default: up to 16 x 16). Returns path."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"plot_heatmap: the matrix must be 2-D and non-empty: got shape {m.shape}")
    rows, cols = m.shape
    side = min(12.0, 3.0 + 0.35 * max(rows, cols))
    with _figure("plot_heatmap", path, (side + 1.5, side)) as (_, fig, ax):
        from matplotlib.patches import Rectangle  # _figure found matplotlib

        im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        names = list(labels) if labels is not None else [str(i) for i in range(max(rows, cols))]
        step = max(1, max(rows, cols) // 24)
        ax.set_xticks(range(0, cols, step), names[:cols:step])
        ax.set_yticks(range(0, rows, step), names[:rows:step])
        if annotate if annotate is not None else max(rows, cols) <= 16:
            for i in range(rows):
                for j in range(cols):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
        for r0, c0, r1, c1 in boxes:
            ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, edgecolor="red",
                                   linewidth=2))
        ax.set(title=title, xlabel=x_label, ylabel=y_label)
    return path


def plot_bench(rows: Sequence[dict], path: str, title: str = "") -> str:
    """Benchmark rows (benchmarks' JSON: case, impl, ms) as grouped horizontal bars, one group per case, one bar
    per implementation; rows with an error are left out. Returns path."""
    rows = [r for r in rows if r.get("ms") is not None and not r.get("error")]
    if not rows:
        raise ValueError("plot_bench: no timed rows to plot")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    with _figure("plot_bench", path, (10, 1.0 + 0.35 * len(cases) * len(impls))) as (_, fig, ax):
        h = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ms = [next((r["ms"] for r in rows if r["case"] == c and r["impl"] == impl), np.nan) for c in cases]
            ax.barh(np.arange(len(cases)) + j * h, ms, height=h, label=impl)
        ax.set_yticks(np.arange(len(cases)) + 0.4 - h / 2, [c[:60] for c in cases], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set(title=title, xlabel="ms (median, log scale)")
        ax.legend(fontsize=7)
    return path
