"""PNG plots (matplotlib, headless Agg backend), written atomically. Readable with many series: each
series gets its own colour, marker and line style, the legend sits outside the axes, seed spread is a band
or error bars."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .artifacts import atomic_write_bytes  # noqa: E402

_MARKERS = "osD^vP*Xh<>p"
_LINES = ("-", "--", "-.", ":")


def _style(i: int) -> dict:
    return {"color": plt.get_cmap("tab10")(i % 10), "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINES[i % len(_LINES)]}


def _legend_outside(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_f1_curves(curves: dict[str, Sequence[tuple]], path: Path, title: str, target: float | None = None,
                   ylabel: str = "macro-F1 (target test split)") -> None:
    """One line per curve name: macro-F1 against training step. Points are (step, f1) or (step, mean, std);
    with a std the band mean ± std is shaded."""
    fig, ax = plt.subplots(figsize=(7.2, 4))
    for i, (name, pts) in enumerate(curves.items()):
        if not pts:
            continue
        style = _style(i)
        steps = [p[0] for p in pts]
        f1 = [p[1] for p in pts]
        ax.plot(steps, f1, label=name, markersize=4, linewidth=1.4, **style)
        if len(pts[0]) > 2 and any(p[2] for p in pts):
            ax.fill_between(steps, [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts], color=style["color"],
                            alpha=0.12, linewidth=0)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target F1 {target:g}")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    _save(fig, path)


def plot_scatter(points: dict[str, tuple], path: Path, xlabel: str, ylabel: str, title: str, logx: bool = True) -> None:
    """One marker per name at (x, y), with a vertical error bar when a third value (std) is given; names are in
    the legend, not written next to the points (they would overlap)."""
    fig, ax = plt.subplots(figsize=(7.2, 4))
    same_x: dict[float, int] = {}
    for i, (name, pt) in enumerate(points.items()):
        style = _style(i)
        # Methods with the same x (full fine-tuning and GaLore both train every weight) are drawn side by side.
        k = same_x[pt[0]] = same_x.get(pt[0], -1) + 1
        x = pt[0] * (1.06 ** k if logx else 1.0) + (0 if logx else 0.01 * k * abs(pt[0]))
        ax.errorbar([x], [pt[1]], yerr=[pt[2]] if len(pt) > 2 and pt[2] else None, fmt=style["marker"],
                    color=style["color"], markersize=7, capsize=3, label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    _save(fig, path)


def plot_lr_grid(grids: dict[str, Sequence[tuple]], chosen: dict[str, float], path: Path, title: str) -> None:
    """Validation F1 against learning rate (log scale), one line per method with ± std error bars; the chosen
    rate is a large filled marker. Points are (lr, mean or None for a diverged rate, std)."""
    fig, ax = plt.subplots(figsize=(7.2, 4))
    for i, (name, pts) in enumerate(grids.items()):
        style = _style(i)
        # Methods are drawn slightly apart along the (log) rate axis so their error bars do not hide each other.
        dodge = 1.0 + 0.025 * (i - (len(grids) - 1) / 2)
        ok = [p for p in pts if p[1] is not None]
        ax.errorbar([p[0] * dodge for p in ok], [p[1] for p in ok], yerr=[p[2] or 0 for p in ok], color=style["color"],
                    marker=style["marker"], linestyle=style["linestyle"], markersize=4, capsize=2, label=name)
        pick = [p for p in ok if p[0] == chosen.get(name)]
        ax.plot([p[0] * dodge for p in pick], [p[1] for p in pick], marker=style["marker"], color=style["color"],
                markersize=11, linestyle="none", markeredgecolor="black")
        diverged = [p[0] * dodge for p in pts if p[1] is None]
        ax.plot(diverged, [0.0] * len(diverged), marker="x", color=style["color"], linestyle="none")
    rates = sorted({p[0] for pts in grids.values() for p in pts})
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final macro-F1 (validation split)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title + "\nlarge marker: chosen rate; x at 0: diverged", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    _save(fig, path)
