"""Hit rate vs capacity as a PNG: a line per policy (the default bold), Belady dashed, the ceiling dotted.

matplotlib is the optional extra ``plot``; it is imported only here, and only
when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kvstore.eviction import DEFAULT_POLICY
from kvstore.replay.report import BELADY, CurveReport

INSTALL_HINT = "pip install 'kvstore[plot]'"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise PlotUnavailable now rather than after a long replay."""
    _pyplot()


def plot_curves(reports: Sequence[CurveReport], path: str | Path) -> Path:
    """Draw one panel per report (workload) and write a PNG to ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 4.8), squeeze=False)
    for ax, report in zip(axes[0], reports):
        for name in report.policies:
            points = sorted((r.capacity, r.hit_rate) for r in report.results if r.policy == name)
            xs, ys = zip(*points)
            style: dict = {"linewidth": 1.2}
            if name == BELADY:
                style = {"linestyle": "--", "color": "black", "linewidth": 2}
            elif name == DEFAULT_POLICY:
                style = {"linewidth": 3}
            label = f"{name} (default)" if name == DEFAULT_POLICY else name
            ax.plot(xs, ys, marker="o", label=label, **style)
        ax.axhline(report.ideal, linestyle=":", color="grey", label="infinite cache")
        ax.set_xscale("log")
        ax.set_xlabel("capacity (blocks)")
        ax.set_ylabel("prefix hit rate")
        ax.set_title(report.trace, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
