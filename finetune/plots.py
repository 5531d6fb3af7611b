"""Pictures: predictions next to ground truth, and the paper's attention-distance plot.

matplotlib runs headless (Agg); every figure is written atomically (temporary name, rename).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from base.shards import atomic_write_bytes

IGNORE_COLOUR = (0, 0, 0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def denormalise(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised C×H×W tensor back to H×W×3 uint8."""
    array = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    array = array * np.asarray(std) + np.asarray(mean)
    return (array.clip(0, 1) * 255).round().astype(np.uint8)


def palette(num_classes: int) -> np.ndarray:
    """A fixed, well-spread colour per class (golden-ratio hues)."""
    import colorsys

    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95) for i in range(num_classes)]
    return (np.asarray(colours) * 255).round().astype(np.uint8).reshape(num_classes, 3)


def colour_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    valid = (labels >= 0) & (labels < num_classes)
    out[valid] = palette(num_classes)[labels[valid]]
    out[~valid] = IGNORE_COLOUR
    return out


def save_examples(
    path: str | os.PathLike,
    rows: list[tuple[Any, Any, Any]],
    *,
    kind: str,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    max_depth: float | None = None,
    title: str = "",
) -> None:
    """One row per example: input | ground truth | prediction (segmentation, depth, detection:
    instance masks and boxes, predictions with score >= 0.5), or the input with its true and
    predicted class (classification). Detection inputs are in [0, 1] (the detector normalises)."""
    plt = _pyplot()
    if not rows:
        raise ValueError("no examples to draw")
    columns = 1 if kind == "cls" else 3
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.4 * len(rows)), squeeze=False)
    for r, (image, target, pred) in enumerate(rows):
        picture = denormalise(image, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) if kind == "det" else denormalise(image, mean, std)
        if kind == "det":
            names = list(class_names or [])
            _detection_panel(axes[r][0], picture, None, names)
            _detection_panel(axes[r][1], picture, target, names)
            keep = pred["scores"] >= 0.5
            _detection_panel(axes[r][2], picture, {k: pred[k][keep] for k in ("boxes", "labels", "masks")}, names)
            if r == 0:
                for c, name in enumerate(("input", "ground truth", "prediction")):
                    axes[r][c].set_title(name, fontsize=9)
            continue
        if kind == "cls":
            ax = axes[r][0]
            ax.imshow(picture)
            names = class_names or []
            truth, guess = int(target), int(pred)
            ok = "✓" if truth == guess else "✗"
            ax.set_title(f"{ok} true: {names[truth] if names else truth}\npred: {names[guess] if names else guess}", fontsize=8)
            ax.axis("off")
            continue
        target_np = np.asarray(target.detach().cpu()).squeeze()
        pred_np = np.asarray(pred.detach().cpu()).squeeze()
        picture = _resize_picture(picture, target_np.shape)  # the model saw a square; show the label's shape
        if kind == "seg":
            k = len(class_names or []) or int(max(target_np.max(), pred_np.max())) + 1
            panels = [picture, colour_labels(target_np, k), colour_labels(pred_np, k)]
            kwargs: list[dict[str, Any]] = [{}, {}, {}]
        else:
            top = max_depth or float(max(target_np.max(), pred_np.max(), 1e-3))
            masked = np.ma.masked_where(target_np <= 0, target_np)
            panels = [picture, masked, pred_np]
            kwargs = [{}, {"cmap": "magma_r", "vmin": 0, "vmax": top}, {"cmap": "magma_r", "vmin": 0, "vmax": top}]
        for c, (panel, extra) in enumerate(zip(panels, kwargs, strict=True)):
            ax = axes[r][c]
            ax.imshow(panel, interpolation="nearest", **extra)
            ax.axis("off")
            if r == 0:
                ax.set_title(("input", "ground truth", "prediction")[c], fontsize=9)
    if kind == "seg" and class_names and len(class_names) <= 24:
        from matplotlib.patches import Patch

        colours = palette(len(class_names)) / 255.0
        handles = [Patch(color=colours[i], label=name) for i, name in enumerate(class_names)]
        fig.legend(handles=handles, loc="upper center", ncol=min(6, len(handles)), fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, 0.1))
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _detection_panel(ax, picture: np.ndarray, instances: dict | None, names: Sequence[str]) -> None:
    """The picture with each instance's mask tinted by its class and its box outlined."""
    from matplotlib.patches import Rectangle

    panel = picture.astype(np.float32)
    colours = palette(max(len(names), 2))
    boxes: list[tuple[list[float], int]] = []
    if instances is not None:
        masks = np.asarray(instances["masks"].detach().cpu().float())
        if masks.ndim == 4:  # predictions: N×1×H×W probabilities
            masks = masks[:, 0]
        labels = [int(v) for v in instances["labels"].tolist()]
        for mask, label in zip(masks, labels, strict=True):
            on = mask >= 0.5
            panel[on] = 0.5 * panel[on] + 0.5 * colours[label % len(colours)]
        boxes = list(zip(instances["boxes"].tolist(), labels, strict=True))
    ax.imshow(panel.round().astype(np.uint8), interpolation="nearest")
    for (x0, y0, x1, y1), label in boxes:
        colour = colours[label % len(colours)] / 255.0
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1))
        if names and label < len(names):
            ax.text(x0, y0, names[label], color=colour, fontsize=6, va="bottom")
    ax.axis("off")


def _resize_picture(picture: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    if picture.shape[:2] == tuple(shape[:2]):
        return picture
    return np.asarray(Image.fromarray(picture).resize((shape[1], shape[0]), Image.BILINEAR))


def plot_attention_distance(
    path: str | os.PathLike, panels: list[tuple[str, list[list[float]], float | None]], *, patch_size: int | None = None
) -> None:
    """The paper's figure: one point per head, blocks on the x axis; one panel per model
    (label, block × head distances, uniform-attention reference), sharing the y axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (label, per_layer, uniform) in zip(axes[0], panels, strict=True):
        if uniform is not None:
            ax.axhline(uniform, color="grey", ls="--", lw=0.8, label="uniform attention")
        for layer, heads in enumerate(per_layer, start=1):
            ax.scatter([layer] * len(heads), heads, s=14, alpha=0.8, color="tab:blue")
        ax.plot(range(1, len(per_layer) + 1), [float(np.mean(h)) for h in per_layer], color="tab:orange", lw=1,
                label="mean over heads")
        ax.set_xlabel("block")
        ax.set_xticks(range(1, len(per_layer) + 1))
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean attention distance (pixels)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    if patch_size:
        fig.suptitle(f"patch size {patch_size} px; class token excluded", fontsize=8)
    _save(fig, path)
