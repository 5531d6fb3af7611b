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
    OUT.report/preview.html       the histograms, and sample images kept and dropped by each reason

The preview shows what the numbers mean: for every outcome (kept, and each drop reason) the
first 8 samples in shard order, with image, caption and the filter's
measurements. It reads ``decisions.parquet`` in batches until every outcome is filled and then
only the tars that hold the chosen samples, so it costs about one shard whatever the pool size.
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

    def empty_like(self) -> Histogram:
        """The same bins and marks, no counts (a shard's histogram, merged later)."""
        return Histogram(self.name, self.title, self.edges, self.cutoffs, self.log_x, self.reason)

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts (same bins) to this one."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError(f"histogram {self.name}: cannot merge counts of other bins")
        self.kept += other.kept
        self.dropped_here += other.dropped_here
        self.dropped_other += other.dropped_other
        self.num_missing += other.num_missing

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

    from base.shards import atomic_write_bytes

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


# Decision columns that say where a sample is and what happened to it (the rest are measurements).
_WHERE = ("uid", "shard", "key", "status", "kept", "reason")


def pick_preview_rows(decisions: str | os.PathLike, wanted: dict[str, int], per_outcome: int) -> dict[str, list[dict]]:
    """The first ``per_outcome`` decision rows of each outcome in ``wanted`` (outcome → how many
    the filter has: ``kept`` or a drop reason), reading ``decisions.parquet`` only as far as needed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    goal = {outcome: min(per_outcome, n) for outcome, n in wanted.items() if n > 0}
    picks: dict[str, list[dict]] = {outcome: [] for outcome in goal}
    for batch in pq.ParquetFile(decisions).iter_batches(batch_size=65536):
        outcome = pc.if_else(batch.column("kept"), pa.scalar("kept"), batch.column("reason"))
        for name, rows in picks.items():
            room = goal[name] - len(rows)
            if room > 0:
                hits = np.flatnonzero(pc.fill_null(pc.equal(outcome, name), False).to_numpy(zero_copy_only=False))
                rows += batch.take(hits[:room]).to_pylist()
        if all(len(picks[name]) >= goal[name] for name in goal):
            break
    return picks


def write_preview(path: Path, decisions: Path, labels: dict[str, str], *, filter_name: str, counts: dict,
                  pictures: Sequence[str], per_outcome: int = 8) -> Path:
    """``preview.html`` at ``path``: the histograms (``pictures``, beside it), then sample images
    per outcome of ``decisions`` with their measurements. ``labels``: tar -> its name in the
    decisions' ``shard`` column. Samples are read with the filters' own reader, so a broken
    member shows as a missing image or caption, never stops the page."""
    import html

    from base.card import thumbnail_b64
    from base.shards import atomic_write_bytes
    from curate.filters.members import SampleProblem, read_wanted

    wanted = {"kept": counts["kept"], **counts["dropped"]}
    wanted.pop("outside_subset", None)  # not this filter's decision
    picks = pick_preview_rows(decisions, wanted, per_outcome)
    by_tar: dict[str, set[str]] = {}
    names = {label: tar for tar, label in labels.items()}
    for rows in picks.values():
        for row in rows:
            by_tar.setdefault(names[row["shard"]], set()).add(row["key"])
    samples: dict[tuple[str, str], tuple[bytes | None, str | None]] = {}
    for tar, keys in by_tar.items():
        left = set(keys)
        for sample in read_wanted(tar, keys):
            try:
                image = sample.image()
            except SampleProblem:
                image = None
            try:
                caption = sample.caption()
            except SampleProblem:
                caption = None
            samples[(labels[tar], sample.key)] = (image, caption)
            left.discard(sample.key)
            if not left:  # the tar is not read past the last wanted sample
                break
    esc = html.escape
    total = counts["total"] - sum(counts["failed"].values())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(filter_name)} filter: preview</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}"
        ".cell{border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px}"
        ".cell img{max-width:100%;display:block;margin:0 auto 4px}.m{color:#666;font-size:11px}"
        "h2.kept{color:#2b8a3e}h2.dropped{color:#c92a2a}</style></head><body>",
        f"<h1>{esc(filter_name)} filter</h1>",
        f"<p>{counts['kept']:,} of {total:,} downloaded samples kept; dropped: "
        + (", ".join(f"{esc(k)} {v:,}" for k, v in counts["dropped"].items()) or "none")
        + f"; failed downloads: {sum(counts['failed'].values()):,}. Counts and settings: report.json; one row per "
        "sample: decisions.parquet.</p>",
    ]
    parts += [f"<p><img src='{esc(name)}' alt='{esc(name)}' style='max-width:100%'></p>" for name in pictures]
    for outcome, rows in picks.items():
        kind = "kept" if outcome == "kept" else "dropped"
        title = "kept" if outcome == "kept" else f"dropped: {outcome}"
        parts.append(f"<h2 class='{kind}'>{esc(title)} ({wanted[outcome]:,}; the first {len(rows)})</h2><div class='grid'>")
        for row in rows:
            image, caption = samples.get((row["shard"], row["key"]), (None, None))
            thumb = thumbnail_b64(image, 200)
            parts.append("<div class='cell'>")
            parts.append(f"<img src='data:image/jpeg;base64,{thumb}' alt='{esc(row['uid'] or '')}'>" if thumb
                         else "<p class='m'>(no decodable image)</p>")
            parts.append(f"<div>{esc(caption) if caption else '<i>(no caption)</i>'}</div>")
            measured = [f"{esc(k)} {_short(v)}" for k, v in row.items() if k not in _WHERE and v is not None]
            parts.append(f"<div class='m'>{' · '.join(measured)}</div>")
            parts.append(f"<div class='m'>{esc(row['shard'])} {esc(row['key'])} · uid {esc(row['uid'] or '-')}</div></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path


def _short(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
