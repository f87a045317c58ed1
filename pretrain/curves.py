"""A run's curves as PNGs (loss, online k-NN against the step), drawn one way."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shards.atomic import atomic_path


def curve_png(steps: Sequence[float], values: Sequence[float], out: Path, *, ylabel: str, title: str,
              baseline: tuple[str, float] | None = None, marker: str | None = None) -> Path:
    """`values` against the step, with an optional dashed, labelled horizontal baseline; written atomically."""
    from matplotlib.figure import (
        Figure,  # not pyplot: no global state, safe off the main thread; lazy: a slow import
    )

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, values, marker=marker, markersize=3)
    if baseline is not None:
        ax.axhline(baseline[1], linestyle="--", color="gray", linewidth=1, label=baseline[0])
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
