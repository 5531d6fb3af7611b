"""``qcap world --preview``: a PNG grid of pool samples, their alt-text against the truth.

One sample per alt-text kind where the pool has one (then more of the commonest kinds), only
samples whose served file is a decodable image. Each cell shows the image, its ``text_kind``
and fault, the web alt-text (red) and the true description (green).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path


def _pick_rows(world: Path, num: int) -> list[dict]:
    import pyarrow.dataset as ds

    table = ds.dataset(str(world / "truth.parquet"), format="parquet").to_table(
        columns=["uid", "path", "text", "text_kind", "fault", "description", "is_exact_dup", "is_near_dup"],
        filter=(ds.field("split") == "pool") & ds.field("fault").isin(["none", "sha_mismatch", "http_500_transient"]),
    )
    rows = table.slice(0, 4000).to_pylist()
    chosen: list[dict] = []
    seen: set[str] = set()
    for row in rows:  # first one of every kind
        if row["text_kind"] not in seen:
            seen.add(row["text_kind"])
            chosen.append(row)
    for row in rows:  # then fill up in pool order
        if len(chosen) >= num:
            break
        if row not in chosen:
            chosen.append(row)
    return chosen[:num]


def write_preview(world: str | Path, *, num: int = 12, out: str | Path | None = None, columns: int = 4) -> Path:
    """Write the grid to ``out`` (default ``W/preview.png``) and return its path."""
    import matplotlib

    from base.shards import atomic_write_bytes

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    world = Path(world)
    out = Path(out) if out is not None else world / "preview.png"
    rows = _pick_rows(world, num)
    if not rows:
        raise ValueError(f"{world}: no servable pool image to preview")
    nrows = (len(rows) + columns - 1) // columns
    fig, axes = plt.subplots(nrows, columns, figsize=(4.2 * columns, 5.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):
        with Image.open(world / row["path"]) as image:
            image.thumbnail((512, 512))
            ax.imshow(image.convert("RGB"))
        flags = [row["text_kind"]]
        if row["fault"] != "none":
            flags.append(row["fault"])
        if row["is_exact_dup"] or row["is_near_dup"]:
            flags.append("exact dup" if row["is_exact_dup"] else "near dup")
        alt_lines = ["alt: " + line for line in textwrap.wrap(row["text"] or "(empty)", 46)[:3]]
        truth_lines = ["truth: " + line for line in textwrap.wrap(row["description"], 44)[:6]]
        ax.set_title(f"{row['uid'][:8]}  [{', '.join(flags)}]", fontsize=8)
        for offset, lines, colour in ((0, alt_lines, "firebrick"), (len(alt_lines), truth_lines, "darkgreen")):
            ax.annotate("\n".join(lines), (0.0, 0.0), xycoords="axes fraction", xytext=(0, -4 - 10 * offset),
                        textcoords="offset points", va="top", ha="left", fontsize=7.5, color=colour)
    fig.suptitle(f"{world.name}: web alt-text (alt) against the truth", fontsize=12)
    fig.tight_layout(h_pad=6.0)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())
    return out
