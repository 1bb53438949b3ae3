"""PNG plots (matplotlib, headless Agg backend), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .artifacts import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_f1_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str, target: float | None = None) -> None:
    """One line per curve name: macro-F1 on the target test split against training step."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target F1 {target:g}")
    ax.set_xlabel("training step")
    ax.set_ylabel("macro-F1 (target test split)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_scatter(points: dict[str, tuple[float, float]], path: Path, xlabel: str, ylabel: str, title: str, logx: bool = True) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, (x, y) in points.items():
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)
