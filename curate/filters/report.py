"""What a filter did, for a person: counts by reason, and histograms with the cut-offs marked.

A :class:`Histogram` accumulates kept and dropped samples in fixed bins while the filter
streams over the shards (constant memory whatever the pool size); :func:`plot_histogram`
draws it as stacked bars — kept below, dropped above — with each cut-off as a dashed line, so
a data engineer sees what a threshold takes away before training on the result.

Files a filter writes beside ``OUT.npy`` (see :mod:`curate.filters.base`)::

    OUT.report/report.json        counts (total = kept + dropped[reason] + failed[status]), settings
    OUT.report/config.json        the resolved config
    OUT.report/decisions.parquet  one row per sample: uid, shard, key, status, kept, reason, measurements
    OUT.report/hist_<name>.png    one histogram per measurement (caption length, image size, score, ...)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(slots=True)
class Histogram:
    """Kept/dropped counts of one measurement in fixed bins; values outside fall in the end bins."""

    name: str  # file stem and key: hist_<name>.png
    title: str  # x-axis label
    edges: np.ndarray  # bin edges, increasing
    cutoffs: Sequence[float] = ()  # thresholds to mark (dashed lines); they become bin edges
    log_x: bool = False  # draw the x axis in log scale (image sizes)
    reason: str | None = None  # the drop reason this measurement decides: such drops are drawn apart
    kept: np.ndarray = field(init=False)
    dropped_here: np.ndarray = field(init=False)  # dropped, and failing this histogram's check
    dropped_other: np.ndarray = field(init=False)  # dropped for other reasons only
    num_missing: int = 0  # samples without this measurement

    def __post_init__(self) -> None:
        edges = np.asarray(self.edges, dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"histogram {self.name}: edges must be increasing, at least two")
        inside = [c for c in self.cutoffs if c is not None and edges[0] < c < edges[-1]]
        self.edges = np.union1d(edges, np.asarray(inside, dtype=np.float64))  # no bin straddles a cut-off
        self.kept = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.dropped_here = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.dropped_other = np.zeros(len(self.edges) - 1, dtype=np.int64)

    def add(self, values: Sequence[float | None], kept: Sequence[bool], failed: Sequence[Sequence[str]] | None = None) -> None:
        """Count samples: ``failed[i]`` lists every reason sample i fails (not only the first)."""
        values = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        kept = np.asarray(kept, dtype=bool)
        here = np.zeros(len(values), dtype=bool)
        if failed is not None and self.reason is not None:
            here = np.array([self.reason in f for f in failed], dtype=bool)
        present = ~np.isnan(values)
        self.num_missing += int((~present).sum())
        index = np.clip(np.searchsorted(self.edges, values, side="right") - 1, 0, len(self.edges) - 2)
        np.add.at(self.kept, index[present & kept], 1)
        np.add.at(self.dropped_here, index[present & ~kept & here], 1)
        np.add.at(self.dropped_other, index[present & ~kept & ~here], 1)

    @property
    def dropped(self) -> np.ndarray:
        return self.dropped_here + self.dropped_other

    @property
    def total(self) -> int:
        return int(self.kept.sum() + self.dropped.sum())

    def as_json(self) -> dict:
        return {
            "title": self.title, "edges": self.edges.tolist(), "kept": self.kept.tolist(),
            "dropped_here": self.dropped_here.tolist(), "dropped_other": self.dropped_other.tolist(),
            "reason": self.reason, "cutoffs": list(self.cutoffs), "num_missing": self.num_missing,
        }


def linear_edges(low: float, high: float, bins: int) -> np.ndarray:
    return np.linspace(low, high, bins + 1)


def log_edges(low: float, high: float, bins: int) -> np.ndarray:
    return np.geomspace(low, high, bins + 1)


def score_edges(values: np.ndarray, cutoffs: Sequence[float] = (), bins: int = 60) -> np.ndarray:
    """Bins spanning the observed scores (and the cut-offs), a little margin either side."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    points = np.concatenate([values, np.asarray(list(cutoffs), dtype=np.float64)])
    if len(points) == 0:
        return linear_edges(-1.0, 1.0, bins)
    low, high = float(points.min()), float(points.max())
    margin = max((high - low) * 0.02, 1e-3)
    return linear_edges(low - margin, high + margin, bins)


def plot_histogram(hist: Histogram, path: str | os.PathLike, *, filter_name: str) -> Path:
    """Stacked kept/dropped bars with the cut-offs marked; written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curate.shards import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    left, widths = hist.edges[:-1], np.diff(hist.edges)
    ax.bar(left, hist.kept, width=widths, align="edge", color="#2b8a3e", label=f"kept ({int(hist.kept.sum())})")
    if hist.reason is not None:
        ax.bar(left, hist.dropped_here, width=widths, align="edge", bottom=hist.kept, color="#e8590c",
               label=f"dropped: {hist.reason} ({int(hist.dropped_here.sum())})")
    ax.bar(left, hist.dropped_other, width=widths, align="edge", bottom=hist.kept + hist.dropped_here, color="#c0c0c0",
           label=f"dropped{' (other reasons)' if hist.reason else ''} ({int(hist.dropped_other.sum())})")
    for cut in hist.cutoffs:
        if cut is not None and math.isfinite(cut):
            ax.axvline(cut, color="#c92a2a", linestyle="--", linewidth=1.5)
            ax.annotate(f"cut-off {cut:g}", (cut, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", color="#c92a2a", fontsize=8)
    if hist.log_x:
        ax.set_xscale("log")
    ax.set_xlabel(hist.title)
    ax.set_ylabel("samples")
    missing = f", {hist.num_missing} without a value" if hist.num_missing else ""
    ax.set_title(f"{filter_name}: {hist.title} ({hist.total} samples{missing})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside: never over a bar
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
