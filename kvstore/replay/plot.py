"""Hit rate vs capacity as a PNG: a line per policy (the default bold), Belady dashed, the ceiling dotted.

Under each workload's panel, when a policy followed others (``adaptive``), a
strip per capacity shows which expert it followed over the trace.

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
    fig, axes = plt.subplots(2, len(reports), figsize=(6.5 * len(reports), 6.8), squeeze=False,
                             gridspec_kw={"height_ratios": [4, 1.3]})
    for ax, strip, report in zip(axes[0], axes[1], reports):
        _plot_followed(strip, report)
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


def _plot_followed(ax, report: CurveReport) -> None:
    """One bar per capacity: the expert followed over the trace's references, by colour."""
    runs = sorted((r for r in report.results if r.followed), key=lambda r: r.capacity)
    if not runs:
        ax.axis("off")
        return
    names = sorted({name for r in runs for _, name in r.followed})
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    for row, r in enumerate(runs):
        ends = [start for start, _ in r.followed[1:]] + [r.num_refs]
        for (start, name), end in zip(r.followed, ends):
            ax.barh(row, end - start, left=start, color=colours[name], height=0.7)
    ax.set_yticks(range(len(runs)), [f"{r.capacity:,}" for r in runs], fontsize=8)
    ax.set_xlim(0, runs[0].num_refs)
    ax.set_xlabel(f"references; expert followed by {runs[0].policy} (rows: capacity)", fontsize=8)
    ax.legend(handles=[_patch(colours[n], n) for n in names], fontsize=7, ncol=len(names),
              loc="upper center", bbox_to_anchor=(0.5, -0.55), frameon=False)


def _patch(colour: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)
