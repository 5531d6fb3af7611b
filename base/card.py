"""Dataset cards: ``README.md``, ``preview.html`` and PNGs that let a data engineer judge a folder.

Every dataset folder qcap builds (``qcap build-dr``, ``qcap subset``) gets a card::

    DIR/README.md        counts, how it was made (lineage: each step's inputs and settings,
                         captioner and decoding with provenance), caption length statistics
                         for real vs synthetic captions, how to use it
    DIR/preview.html     the same, plus a grid of samples: image, real caption, synthetic captions
    DIR/card/*.png       caption_lengths.png, preview_grid.png, and quality.png / scores.png
                         when the captions carry flags or scores
    DIR/card/card.json   every number of the card, machine-readable

Caption statistics are exact and cheap: the stage that writes a shard counts its captions with
:class:`CaptionStats` and stores the counts in the shard's ``_stats.json`` (``caption_stats``);
the card merges them. A folder whose shards lack them is recounted by streaming its samples.
Lengths are words (whitespace-separated tokens) and characters of each caption.

Usage::

    from base.card import write_card
    write_card("runs/demo/dr", title="DataCompDR: demo", lineage=[...], summary=build_summary)
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from base.shards import (
    Sample,
    ShardError,
    atomic_write_bytes,
    decode_image,
    expand_shards,
    iter_samples,
    read_shard_stats,
    read_sizes,
    read_table,
)

log = logging.getLogger(__name__)

CARD_DIR = "card"
CARD_JSON = "card.json"
STATS_KEY = "caption_stats"  # where a shard's _stats.json keeps its CaptionStats
NUM_PREVIEW = 12


class CaptionStats:
    """Exact caption counts of a set of samples, mergeable across shards.

    Lengths are kept as sparse histograms (length → count), so means, medians and percentiles
    are exact; image–text scores are binned to 0.01 (their mean, min and max stay exact).
    """

    def __init__(self) -> None:
        self.num_samples = 0
        self.num_without_real = 0  # samples whose real caption is missing or empty
        self.real_words: Counter[int] = Counter()
        self.real_chars: Counter[int] = Counter()
        self.syn_words: Counter[int] = Counter()
        self.syn_chars: Counter[int] = Counter()
        self.syn_per_sample: Counter[int] = Counter()
        self.syn_flags: Counter[str] = Counter()  # flags of the synthetic captions (qcap provenance)
        self.num_syn_flagged = 0  # synthetic captions with at least one flag
        self.score_bins: Counter[str] = Counter()  # "0.31" → captions whose score rounds there
        self.score_sum = 0.0
        self.score_min: float | None = None
        self.score_max: float | None = None

    def add(self, sample: Sample) -> None:
        self.num_samples += 1
        text = (sample.text or "").strip()
        if text:
            self.real_words[len(text.split())] += 1
            self.real_chars[len(text)] += 1
        else:
            self.num_without_real += 1
        syn = sample.syn_text or []
        self.syn_per_sample[len(syn)] += 1
        captions = (sample.syn_provenance or {}).get("captions")
        aligned = isinstance(captions, list) and len(captions) == len(syn)
        for i, caption in enumerate(syn):
            self.syn_words[len(caption.split())] += 1
            self.syn_chars[len(caption)] += 1
            if not aligned or not isinstance(captions[i], dict):
                continue
            flags = captions[i].get("flags") or []
            self.syn_flags.update(flags)
            self.num_syn_flagged += bool(flags)
            score = captions[i].get("score")
            if isinstance(score, (int, float)) and math.isfinite(score):
                self.score_bins[f"{round(score, 2) + 0.0:.2f}"] += 1  # + 0.0: no "-0.00" bin
                self.score_sum += float(score)
                self.score_min = score if self.score_min is None else min(self.score_min, score)
                self.score_max = score if self.score_max is None else max(self.score_max, score)

    def add_all(self, samples: Iterable[Sample]) -> CaptionStats:
        for sample in samples:
            self.add(sample)
        return self

    @property
    def num_scored(self) -> int:
        return sum(self.score_bins.values())

    def merge(self, other: CaptionStats) -> CaptionStats:
        self.num_samples += other.num_samples
        self.num_without_real += other.num_without_real
        for name in ("real_words", "real_chars", "syn_words", "syn_chars", "syn_per_sample", "syn_flags", "score_bins"):
            getattr(self, name).update(getattr(other, name))
        self.num_syn_flagged += other.num_syn_flagged
        self.score_sum += other.score_sum
        for name, pick in (("score_min", min), ("score_max", max)):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else mine if theirs is None else pick(mine, theirs))
        return self

    def as_json(self) -> dict[str, Any]:
        def sparse(counter: Counter) -> dict[str, int]:
            return {str(k): v for k, v in sorted(counter.items(), key=lambda kv: _sort_key(kv[0]))}

        return {
            "num_samples": self.num_samples,
            "num_without_real": self.num_without_real,
            "real_words": sparse(self.real_words),
            "real_chars": sparse(self.real_chars),
            "syn_words": sparse(self.syn_words),
            "syn_chars": sparse(self.syn_chars),
            "syn_per_sample": sparse(self.syn_per_sample),
            "syn_flags": sparse(self.syn_flags),
            "num_syn_flagged": self.num_syn_flagged,
            "score_bins": sparse(self.score_bins),
            "score_sum": self.score_sum,
            "score_min": self.score_min,
            "score_max": self.score_max,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaptionStats:
        stats = cls()
        try:
            stats.num_samples = int(data["num_samples"])
            stats.num_without_real = int(data["num_without_real"])
            for name in ("real_words", "real_chars", "syn_words", "syn_chars", "syn_per_sample"):
                setattr(stats, name, Counter({int(k): int(v) for k, v in data[name].items()}))
            stats.syn_flags = Counter({str(k): int(v) for k, v in data["syn_flags"].items()})
            stats.score_bins = Counter({str(k): int(v) for k, v in data["score_bins"].items()})
            stats.num_syn_flagged = int(data["num_syn_flagged"])
            stats.score_sum = float(data["score_sum"])
            stats.score_min, stats.score_max = data["score_min"], data["score_max"]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ShardError(f"caption statistics are malformed ({err!r})") from err
        return stats

    def summary(self) -> dict[str, Any]:
        """The numbers a card shows: per kind (real, synthetic) length statistics, and more."""
        num_syn = sum(self.syn_words.values())
        out: dict[str, Any] = {
            "num_samples": self.num_samples,
            "real": {"num_captions": sum(self.real_words.values()), "num_samples_without": self.num_without_real,
                     "words": describe(self.real_words), "chars": describe(self.real_chars)},
            "synthetic": {"num_captions": num_syn, "words": describe(self.syn_words), "chars": describe(self.syn_chars),
                          "per_sample": {str(k): v for k, v in sorted(self.syn_per_sample.items())},
                          "flags": dict(self.syn_flags.most_common()), "num_flagged": self.num_syn_flagged},
        }
        if self.num_scored:
            scores = Counter({float(k): v for k, v in self.score_bins.items()})
            out["synthetic"]["scores"] = {
                "num_scored": self.num_scored, "mean": round(self.score_sum / self.num_scored, 4),
                "min": self.score_min, "max": self.score_max,
                "median": _quantile(scores, 0.5), "p5": _quantile(scores, 0.05), "p95": _quantile(scores, 0.95),
            }
        return out


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def describe(histogram: Counter) -> dict[str, Any]:
    """count, mean, min, p5, median, p95, max of a histogram of integer values (exact)."""
    count = sum(histogram.values())
    if not count:
        return {"count": 0}
    total = sum(k * v for k, v in histogram.items())
    return {"count": count, "mean": round(total / count, 3), "min": min(histogram), "p5": _quantile(histogram, 0.05),
            "median": _quantile(histogram, 0.5), "p95": _quantile(histogram, 0.95), "max": max(histogram)}


def _quantile(histogram: Counter, q: float):
    """The smallest value whose cumulative share reaches ``q`` (nearest-rank; exact on integers)."""
    count = sum(histogram.values())
    rank = max(1, math.ceil(q * count))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    return max(histogram)


# --------------------------------------------------------------------------------------------
# Collecting a folder's numbers


def collect(folder: str | os.PathLike, *, progress: bool = False) -> dict[str, Any]:
    """The counts of a shard folder: shards, samples (sizes.json), Parquet statuses, and the
    merged caption statistics of its shards (recounted from the samples where a shard's stats
    lack them)."""
    from tqdm import tqdm

    tars = expand_shards(str(folder))
    sizes = read_sizes(folder)
    statuses: Counter[str] = Counter()
    stats = CaptionStats()
    recounted = []
    for tar in tqdm(tars, desc="card", unit="shard", disable=not progress):
        table = read_table(tar, columns=["status"], require_uid=False)
        statuses.update(table.column("status").to_pylist())
        shard_stats = _shard_caption_stats(tar)
        if shard_stats is None:
            shard_stats = CaptionStats().add_all(iter_samples([tar], with_image=False))
            recounted.append(os.path.basename(tar))
        stats.merge(shard_stats)
    num_samples = sum(sizes.get(os.path.basename(t), 0) for t in tars)
    if stats.num_samples != num_samples:
        raise ShardError(f"{folder}: sizes.json counts {num_samples} samples, the shards' caption statistics "
                         f"{stats.num_samples}; re-run the stage that wrote the folder")
    return {
        "folder": str(folder),
        "num_shards": len(tars),
        "num_samples": num_samples,
        "num_rows": sum(statuses.values()),
        "status_counts": dict(statuses.most_common()),
        "captions": stats.summary(),
        "caption_histograms": stats.as_json(),
        "recounted_shards": recounted,
    }


def _shard_caption_stats(tar: str) -> CaptionStats | None:
    """The caption statistics kept in a shard's stats; None when the stage that wrote the shard
    kept none, or its stats cannot be read (logged), so that the caller recounts."""
    try:
        data = read_shard_stats(tar, missing_ok=True)
    except ShardError as err:
        log.warning("%s; recounting that shard's captions from its samples", err)
        return None
    if data is None or STATS_KEY not in data:
        return None
    return CaptionStats.from_json(data[STATS_KEY])


def preview_samples(folder: str | os.PathLike, num: int = NUM_PREVIEW) -> list[Sample]:
    """Up to ``num`` samples spread over the folder: the first ones of evenly spaced shards."""
    tars = expand_shards(str(folder))
    if not tars or num <= 0:
        return []
    picks = sorted({round(i * (len(tars) - 1) / max(1, min(num, len(tars)) - 1)) for i in range(min(num, len(tars)))})
    per_shard = math.ceil(num / len(picks))
    out: list[Sample] = []
    for index in picks:
        out.extend(_first(iter_samples([tars[index]]), per_shard))
    if len(out) < num:  # small shards: top up from the start
        seen = {(s.key, s.uid) for s in out}
        for sample in iter_samples(tars):
            if len(out) >= num:
                break
            if (sample.key, sample.uid) not in seen:
                out.append(sample)
    return out[:num]


def _first(samples: Iterator[Sample], n: int) -> list[Sample]:
    out = []
    for sample in samples:
        out.append(sample)
        if len(out) >= n:
            break
    return out


# --------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import warnings

    sink = io.BytesIO()
    with warnings.catch_warnings():  # captions may hold characters the font lacks: drawn as boxes
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        fig.savefig(sink, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, sink.getvalue())


REAL_COLOUR, SYN_COLOUR = "#1f77b4", "#d95f02"


def plot_lengths(stats: dict[str, Any], path: Path) -> None:
    """Words and characters per caption, real vs synthetic, as shares of each kind's captions."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, unit, cap in ((axes[0], "words", 60), (axes[1], "chars", 300)):
        capped = False
        for kind, colour, label in (("real", REAL_COLOUR, "real (web)"), ("syn", SYN_COLOUR, "synthetic")):
            hist = {int(k): v for k, v in stats[f"{kind}_{unit}"].items()}
            total = sum(hist.values())
            if not total:
                continue
            step = 1 if unit == "words" else 10
            capped = capped or max(hist) > cap
            bins: Counter[int] = Counter()
            for value, count in hist.items():
                bins[min(value, cap) // step * step] += count
            xs = sorted(bins)
            ax.bar([x + step / 2 for x in xs], [100 * bins[x] / total for x in xs], width=step * 0.9, alpha=0.55,
                   color=colour, label=f"{label}: {total:,} captions, median {_quantile(Counter(hist), 0.5)}")
        ax.set_xlabel(f"{'words' if unit == 'words' else 'characters'} per caption" + (f" (last bar: {cap}+)" if capped else ""))
        ax.set_ylabel("% of captions of that kind")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_title("caption length in words")
    axes[1].set_title("caption length in characters")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_scores(stats: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    bins: Counter[float] = Counter()
    for key, count in stats["score_bins"].items():
        bins[float(key)] += count
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(list(bins), list(bins.values()), width=0.009, color=SYN_COLOUR)
    ax.set_xlabel("image-text score of each synthetic caption (cosine similarity, bins of 0.01)")
    ax.set_ylabel("captions")
    ax.set_title(f"synthetic caption scores: {sum(bins.values()):,} scored")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_quality(kept_flags: dict[str, int], dropped: dict[str, int], num_kept: int, path: Path) -> None:
    """Synthetic captions dropped by reason (at build time) and flags among those kept."""
    plt = _pyplot()
    rows = [(f"dropped: {k}", v, "#c0392b") for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])]
    rows += [(f"kept, flagged {k}", v, "#7f8c8d") for k, v in sorted(kept_flags.items(), key=lambda kv: -kv[1])]
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.38 * max(1, len(rows))))
    labels = [r[0] for r in rows][::-1]
    values = [r[1] for r in rows][::-1]
    ax.barh(labels, values, color=[r[2] for r in rows][::-1])
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:,}", va="center", fontsize=8)
    ax.set_xlabel("synthetic captions")
    ax.set_title(f"synthetic caption quality: {num_kept:,} kept, {sum(dropped.values()):,} dropped")
    ax.margins(x=0.15)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _wrap(text: str, width: int, lines: int) -> str:
    wrapped = textwrap.wrap(text, width=width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def plot_grid(samples: list[Sample], path: Path, *, columns: int = 4, num_syn: int = 2) -> None:
    """Images with their real caption (blue) and first synthetic captions (orange)."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(samples) / columns))
    fig = plt.figure(figsize=(3.3 * columns, 4.1 * rows))
    grid = fig.add_gridspec(rows * 2, columns, height_ratios=[2.1, 2.0] * rows, hspace=0.08, wspace=0.08)
    for index, sample in enumerate(samples):
        row, col = divmod(index, columns)
        ax_image = fig.add_subplot(grid[2 * row, col])
        ax_text = fig.add_subplot(grid[2 * row + 1, col])
        for ax in (ax_image, ax_text):
            ax.set_axis_off()
        try:
            image = decode_image(sample.image) if sample.image else None
        except ValueError:
            image = None
        if image is not None:
            ax_image.imshow(image)
        else:
            ax_image.text(0.5, 0.5, "(no image)", ha="center", va="center")
        ax_image.set_title(f"{sample.uid or sample.key}"[:18], fontsize=7, color="#555555")
        y = 1.0
        real = _wrap("real: " + (sample.text or "(none)"), 44, 3)
        ax_text.text(0, y, real, va="top", fontsize=7.5, color=REAL_COLOUR, transform=ax_text.transAxes)
        y -= 0.075 * (real.count("\n") + 1) + 0.03
        for j, caption in enumerate((sample.syn_text or [])[:num_syn]):
            line = _wrap(f"syn {j + 1}: {caption}", 44, 3)
            ax_text.text(0, y, line, va="top", fontsize=7.5, color=SYN_COLOUR, transform=ax_text.transAxes)
            y -= 0.075 * (line.count("\n") + 1) + 0.03
        more = len(sample.syn_text or []) - num_syn
        if more > 0:
            ax_text.text(0, y, f"(+{more} more synthetic)", va="top", fontsize=7, color="#777777",
                         transform=ax_text.transAxes)
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: Any, nested: bool = False) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        text = ", ".join(_fmt(v, True) for v in value) if value else "—"
        return f"[{text}]" if nested else text
    if isinstance(value, dict):
        if nested:
            return "{" + ", ".join(f"{k}: {_fmt(v, True)}" for k, v in value.items()) + "}"
        return ", ".join(f"{k}={_fmt(v, True)}" for k, v in value.items()) if value else "—"
    return "—" if value is None else str(value)


def _length_table(captions: dict[str, Any]) -> list[str]:
    lines = ["| captions | count | words: mean | min | p5 | median | p95 | max | chars: mean | median | p95 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, key in (("real (web)", "real"), ("synthetic", "synthetic")):
        part = captions[key]
        words, chars = part["words"], part["chars"]
        if not words.get("count"):
            lines.append(f"| {label} | 0 | | | | | | | | | |")
            continue
        lines.append(f"| {label} | {_fmt(part['num_captions'])} | {_fmt(words['mean'])} | {words['min']} | {words['p5']} | "
                     f"{words['median']} | {words['p95']} | {words['max']} | {_fmt(chars['mean'])} | {chars['median']} | "
                     f"{chars['p95']} |")
    return lines


def render_markdown(card: dict[str, Any]) -> str:
    caps = card["captions"]
    lines = [f"# {card['title']}", "", card["description"], ""]
    lines += ["## Counts", "", "| | |", "|---|---:|", f"| shards | {_fmt(card['num_shards'])} |",
              f"| samples (in the tars) | {_fmt(card['num_samples'])} |"]
    for status, count in card["status_counts"].items():
        if status != "success":
            lines.append(f"| rows dropped here: `{status}` (Parquet only) | {_fmt(count)} |")
    lines.append(f"| real captions | {_fmt(caps['real']['num_captions'])} |")
    lines.append(f"| synthetic captions | {_fmt(caps['synthetic']['num_captions'])} |")
    per = caps["synthetic"]["per_sample"]
    if per:
        lines.append(f"| synthetic captions per sample (count → samples) | {_fmt(per)} |")
    for key, value in (card.get("summary_counts") or {}).items():
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "## How it was made", ""]
    for step in card["lineage"]:
        lines.append(f"### {step.get('step', 'step')}: {step.get('title', '')}".rstrip(": "))
        lines.append("")
        for key, value in step.items():
            if key in ("step", "title"):
                continue
            lines.append(f"- **{key}**: {_fmt(value) if not isinstance(value, str) else value}")
        lines.append("")
    lines += ["## Captions", "", *_length_table(caps), ""]
    syn = caps["synthetic"]
    if syn.get("flags"):
        lines.append(f"Flags among the synthetic captions here: {_fmt(syn['flags'])} "
                     f"({_fmt(syn['num_flagged'])} captions flagged).")
        lines.append("")
    if syn.get("scores"):
        s = syn["scores"]
        lines.append(f"Image-text scores of the synthetic captions: {s['num_scored']:,} scored, mean {s['mean']}, "
                     f"p5 {s['p5']}, median {s['median']}, p95 {s['p95']}, range [{s['min']}, {s['max']}].")
        lines.append("")
    for name, alt in card["figures"].items():
        lines.append(f"![{alt}]({CARD_DIR}/{name})")
        lines.append("")
    lines += ["Open `preview.html` for a grid of samples with all their captions.", "", "## Use it", ""]
    lines += ["```", *card["usage"], "```", ""]
    lines += [f"Numbers: `{CARD_DIR}/{CARD_JSON}`. Card written by qcap {card['qcap_version']}.", ""]
    return "\n".join(lines)


def thumbnail_b64(data: bytes | None, size: int = 224) -> str | None:
    """A JPEG thumbnail (longer side ``size``) of encoded image bytes, base64 for an inline
    ``data:`` URI; None when there is no image or it does not decode."""
    if not data:
        return None
    try:
        image = decode_image(data)
    except ValueError:
        return None
    image.thumbnail((size, size))
    sink = io.BytesIO()
    image.save(sink, format="JPEG", quality=85)
    return base64.b64encode(sink.getvalue()).decode("ascii")


def render_html(card: dict[str, Any], samples: list[Sample]) -> str:
    esc = html.escape
    caps = card["captions"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(card['title'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}"
        ".cell{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}"
        ".cell img{max-width:100%;display:block;margin:0 auto 6px}"
        ".real{color:#1f5f99}.syn{color:#a04000}.flag{color:#b00;font-size:11px}.uid{color:#888;font-size:11px}"
        "</style></head><body>",
        f"<h1>{esc(card['title'])}</h1><p>{esc(card['description'])}</p>",
        "<h2>Counts</h2><table>",
        f"<tr><td>shards</td><td>{card['num_shards']:,}</td></tr>",
        f"<tr><td>samples</td><td>{card['num_samples']:,}</td></tr>",
        f"<tr><td>real captions</td><td>{caps['real']['num_captions']:,}</td></tr>",
        f"<tr><td>synthetic captions</td><td>{caps['synthetic']['num_captions']:,}</td></tr>",
    ]
    for key, value in (card.get("summary_counts") or {}).items():
        parts.append(f"<tr><td>{esc(str(key))}</td><td>{esc(_fmt(value))}</td></tr>")
    parts.append("</table><h2>How it was made</h2>")
    for step in card["lineage"]:
        parts.append(f"<h3>{esc(str(step.get('step', 'step')))}: {esc(str(step.get('title', '')))}</h3><ul>")
        for key, value in step.items():
            if key not in ("step", "title"):
                parts.append(f"<li><b>{esc(key)}</b>: {esc(value if isinstance(value, str) else _fmt(value))}</li>")
        parts.append("</ul>")
    parts.append("<h2>Caption lengths</h2><table><tr>" + "".join(
        f"<th>{esc(h)}</th>" for h in ("captions", "count", "words mean", "median", "p95", "max", "chars mean", "chars median"))
        + "</tr>")
    for label, key in (("real (web)", "real"), ("synthetic", "synthetic")):
        words, chars = caps[key]["words"], caps[key]["chars"]
        cells = [label, caps[key]["num_captions"], words.get("mean"), words.get("median"), words.get("p95"),
                 words.get("max"), chars.get("mean"), chars.get("median")]
        parts.append("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    for name, alt in card["figures"].items():
        if name != "preview_grid.png":
            parts.append(f"<p><img src='{CARD_DIR}/{name}' alt='{esc(alt)}' style='max-width:100%'></p>")
    parts.append(f"<h2>Samples ({len(samples)})</h2><div class='grid'>")
    for sample in samples:
        thumb = thumbnail_b64(sample.image)
        parts.append("<div class='cell'>")
        if thumb:
            parts.append(f"<img src='data:image/jpeg;base64,{thumb}' alt='{esc(sample.uid or sample.key)}'>")
        parts.append(f"<div class='uid'>uid {esc(sample.uid or '-')} · key {esc(sample.key)}</div>")
        parts.append(f"<div class='real'><b>real:</b> {esc(sample.text or '(none)')}</div><ol class='syn'>")
        provenance = (sample.syn_provenance or {}).get("captions") or []
        for i, caption in enumerate(sample.syn_text or []):
            extra = ""
            if i < len(provenance) and isinstance(provenance[i], dict):
                flags = provenance[i].get("flags") or []
                score = provenance[i].get("score")
                extra = (f" <span class='flag'>{esc(' '.join(flags))}</span>" if flags else "") + (
                    f" <span class='uid'>score {score:.3f}</span>" if isinstance(score, (int, float)) else "")
            parts.append(f"<li>{esc(caption)}{extra}</li>")
        parts.append("</ol></div>")
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write_card(
    folder: str | os.PathLike,
    *,
    title: str,
    description: str,
    lineage: list[dict[str, Any]],
    usage: list[str],
    summary_counts: dict[str, Any] | None = None,
    dropped_captions: dict[str, int] | None = None,
    num_preview: int = NUM_PREVIEW,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``README.md``, ``preview.html``, ``card/*.png`` and ``card/card.json`` for a shard
    folder; returns the card's numbers. ``lineage``: one dict per step that made the folder
    (``step``, ``title`` and any facts); ``dropped_captions``: synthetic captions dropped by
    reason when the folder was built (shown in quality.png)."""
    from base.versions import qcap_version

    folder = Path(folder)
    figures_dir = folder / CARD_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    numbers = collect(folder, progress=progress)
    histograms = numbers["caption_histograms"]
    figures: dict[str, str] = {}
    plot_lengths(histograms, figures_dir / "caption_lengths.png")
    figures["caption_lengths.png"] = "caption lengths, real vs synthetic"
    syn = numbers["captions"]["synthetic"]
    if syn["flags"] or dropped_captions:
        plot_quality(syn["flags"], dropped_captions or {}, syn["num_captions"], figures_dir / "quality.png")
        figures["quality.png"] = "synthetic caption quality: dropped by reason, flags among kept"
    if syn.get("scores"):
        plot_scores(histograms, figures_dir / "scores.png")
        figures["scores.png"] = "image-text scores of the synthetic captions"
    samples = preview_samples(folder, num_preview)
    if samples:
        plot_grid(samples, figures_dir / "preview_grid.png")
        figures["preview_grid.png"] = "samples with their real and synthetic captions"
    card = {
        "title": title,
        "description": description,
        **numbers,
        "summary_counts": summary_counts or {},
        "dropped_captions": dropped_captions or {},
        "lineage": lineage,
        "usage": usage,
        "figures": figures,
        "preview": [{"uid": s.uid, "key": s.key, "text": s.text, "syn_text": s.syn_text} for s in samples],
        "qcap_version": qcap_version(),
    }
    # not sorted: the lineage's facts keep their order in the cards of folders made from this one
    atomic_write_bytes(figures_dir / CARD_JSON, json.dumps(card, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    atomic_write_bytes(folder / "README.md", render_markdown(card).encode("utf-8"))
    atomic_write_bytes(folder / "preview.html", render_html(card, samples).encode("utf-8"))
    return card


CARD_FIGURES = ("caption_lengths.png", "quality.png", "scores.png", "preview_grid.png")


def remove_card(folder: str | os.PathLike) -> list[str]:
    """Remove what :func:`write_card` writes in ``folder`` (``README.md``, ``preview.html``,
    ``card/card.json``, ``card/*.png`` of its figures, and their temporaries), and ``card/``
    itself when that leaves it empty; any other file stays. Returns the paths removed,
    relative to ``folder``."""
    folder = Path(folder)
    removed = []
    for where, names in ((folder, ("README.md", "preview.html")), (folder / CARD_DIR, (CARD_JSON, *CARD_FIGURES))):
        if not where.is_dir() or where.is_symlink():
            continue
        for path in sorted(where.iterdir()):
            own = path.name in names or any(path.name.startswith(f".{name}.tmp-") for name in names)
            if own and path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(str(path.relative_to(folder)))
    cards = folder / CARD_DIR
    if cards.is_dir() and not cards.is_symlink() and not any(cards.iterdir()):
        cards.rmdir()
    return removed


def read_card(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A folder's ``card/card.json`` (its lineage feeds the cards of folders made from it)."""
    path = Path(folder) / CARD_DIR / CARD_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from err


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object that a stage left beside its output; None when there is none. One that is
    there but unreadable is logged, since the lineage then goes without that step's facts."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or the output is a file, not a folder)
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("%s: unreadable (%s); the card's lineage goes without it", path, err)
        return None
    if not isinstance(data, dict):
        log.warning("%s: not a JSON object; the card's lineage goes without it", path)
        return None
    return data


def _scalars(data: dict[str, Any], limit: int = 14) -> dict[str, Any]:
    """The short, scalar facts of a report (counts, rates), at most ``limit`` of them."""
    out = {}
    for key, value in data.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) or (isinstance(value, dict) and value and len(value) <= 12
                                                and all(isinstance(v, (int, float)) for v in value.values())):
            out[key] = value
        if len(out) >= limit:
            break
    return out


def _resolve(reference: Any, near: Path) -> Path | None:
    """A path from a stage's config: as written (relative to where that stage ran), else beside ``near``."""
    if not isinstance(reference, str) or not reference or "://" in reference or "{" in reference or "*" in reference:
        return None
    for candidate in (Path(reference), near.parent / Path(reference).name, near / Path(reference).name):
        if candidate.exists():
            return candidate
    return None


def _pool_step(path: Path, seen: set[str]) -> list[dict[str, Any]]:
    """A DataComp pool Parquet; the embedded world's ``world.json`` beside it says how it was drawn."""
    if str(path.resolve()) in seen:
        return []
    seen.add(str(path.resolve()))
    step: dict[str, Any] = {"step": "pool", "title": str(path)}
    world = _read_json(path.parent / "world.json")
    if world:
        step["generator"] = f"{world.get('generator')} {world.get('version', '')}".strip()
        step["seed"] = world.get("seed")
        counts = world.get("counts") or {}
        step["pool"] = {k: v for k, v in (counts.get("splits") or {}).items() if k == "pool"}
        step["text kinds"] = counts.get("pool_text_kinds")
    return [step]


def trace_lineage(path: str | os.PathLike, *, seen: set[str] | None = None, depth: int = 0) -> list[dict[str, Any]]:
    """The steps that made a shard folder (or a filter's uid file), oldest first, followed
    through the configs qcap stages leave beside their outputs: a folder's ``config.json``
    (``config_class`` names the stage) and summary (``summary.json``; ``report.json`` of a
    reshard from before that name; download's ``manifest.json``), a uid
    file's ``NAME.report/`` (the filter that wrote it) or ``NAME.npy.json`` (the ``qcap uids``
    operation that combined other uid files), and from each the inputs it read (``shards``,
    ``subset``, ``pool``; a uid operation's ``inputs``)."""
    seen = set() if seen is None else seen
    path = Path(path)
    key = str(path.resolve())
    if key in seen or depth > 8:
        return []
    seen.add(key)
    if path.suffix == ".npy":
        config_dir, report_name = path.with_suffix(".report"), "report.json"
    else:
        config_dir, report_name = path, None
    config = _read_json(config_dir / "config.json")
    if config is None and path.suffix == ".npy":
        operation = _read_json(Path(f"{path}.json"))
        if operation is not None and isinstance(operation.get("inputs"), list):
            return _uid_operation_steps(path, operation, seen, depth)
    if config is None or not isinstance(config.get("config"), dict):
        return [{"step": "input", "title": "made outside qcap (no config.json beside it)", "path": str(path)}] if depth else []
    settings = config["config"]
    class_name = str(config.get("config_class") or "").rsplit(".", 1)[-1]
    name = f"filter {config['filter']}" if config.get("filter") else str(config.get("stage") or class_name or "step")
    upstream: list[dict[str, Any]] = []
    for field in ("pool", "shards", "subset"):
        target = _resolve(settings.get(field), config_dir)
        if target is not None and target.suffix == ".parquet":
            upstream += _pool_step(target, seen)
        elif target is not None:
            upstream += trace_lineage(target, seen=seen, depth=depth + 1)
    step: dict[str, Any] = {"step": name, "title": f"{path}", "config": config.get("config_class")}
    run_only = set(config.get("run_only") or ()) | {"out"}  # as the stage declared its fields (base.config.arg)
    step["settings"] = {k: v for k, v in settings.items() if k not in run_only and v not in (None, False, "", [])}
    # a stage's summary (base.stage.SUMMARY_FILE; the card sits below the stage kit, which imports it)
    for report in ([report_name] if report_name else ["summary.json", "report.json", "manifest.json"]):
        data = _read_json(config_dir / report)
        if data:
            step[report] = _scalars(data.get("counts") if isinstance(data.get("counts"), dict) else data)
            break
    return [*upstream, step]


def _uid_operation_steps(path: Path, operation: dict[str, Any], seen: set[str], depth: int) -> list[dict[str, Any]]:
    """A uid file that ``qcap uids intersect|union|minus`` wrote (``NAME.npy.json``), after the
    steps that made each of its inputs (usually the filters)."""
    upstream: list[dict[str, Any]] = []
    counts: dict[str, Any] = {}
    for item in operation["inputs"]:
        reference = item.get("path") if isinstance(item, dict) else None
        counts[str(reference)] = item.get("count") if isinstance(item, dict) else None
        target = _resolve(reference, path)
        if target is not None:
            upstream += trace_lineage(target, seen=seen, depth=depth + 1)
    step = {"step": f"uids {operation.get('operation', 'combine')}", "title": str(path), "inputs (uids)": counts,
            "uids": operation.get("count")}
    return [*upstream, step]
