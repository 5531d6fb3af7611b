"""``qcap attention-distance``: mean attention distance per head and block (the paper's §3.4).

Usage::

    qcap attention-distance --checkpoint runs/clip-dr/final --images world/seg/images/validation --out runs/attn/dr
    qcap attention-distance --checkpoint runs/clip-dr/final --compare runs/clip-web/final \\
        --label "DataCompDR captions" --compare-label "web captions" --images DIR --out runs/attn/dr-vs-web
    qcap attention-distance --random qcap-tiny-clip --images DIR --out runs/attn/random

``--compare`` takes a checkpoint path, ``random:MODEL`` or ``pretrained:NAME:TAG``.

Writes ``OUT/attention_distance.json`` (per model: the distance in pixels for every block ×
head, the per-block mean, the images used, and ``uniform_attention_px``, the distance a head
that attends uniformly would have — where a random-init model sits), ``OUT/attention_distance.png`` (one point per
head, blocks on the x axis; side by side when ``--compare`` is given) and ``OUT/config.json``
(the resolved config). The definition is in
:mod:`finetune.attention`: attention-weighted mean distance between query and key patch
centres, class token excluded, averaged over query patches and images. Images are prepared by
the model's own eval preprocessing (resize, centre crop, normalise) at its native size unless
``--image-size`` says otherwise. Unreadable images are skipped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from base.cli import UsageError
from base.config import arg, parse_config, save_config

log = logging.getLogger(__name__)
JSON_FILE = "attention_distance.json"
PLOT_FILE = "attention_distance.png"
CONFIG_FILE = "config.json"
DEFINITION = (
    "attention-weighted mean Euclidean distance in pixels between the centre of each query patch and the centres of "
    "the key patches (class/prefix tokens excluded, each query's patch weights renormalised), averaged over query "
    "patches and images; per block and head"
)


@dataclass(kw_only=True)
class AttentionDistanceConfig:
    """Mean attention distance per head and block of a ViT image tower, as JSON and a plot."""

    checkpoint: Path | None = arg(None, help="qcap/open_clip checkpoint folder, run folder or weights file", metavar="PATH")
    pretrained: str | None = arg(None, help="open_clip NAME:TAG", metavar="NAME:TAG")
    random: str | None = arg(None, help="open_clip model name, randomly initialised (the baseline)", metavar="MODEL")
    model: str | None = arg(None, help="architecture of a bare weights file given as --checkpoint", metavar="MODEL")
    images: Path = arg(help="folder of images (searched recursively)", metavar="DIR")
    out: Path = arg(help="output folder", metavar="DIR")
    compare: str | None = arg(None, help="a second model for a side-by-side plot: PATH, random:MODEL or pretrained:NAME:TAG", metavar="SOURCE")
    label: str | None = arg(None, help="panel title of the model (default: its source)")
    compare_label: str | None = arg(None, help="panel title of the --compare model")
    num_images: int = arg(128, help="images to average over (the first N in sorted order)")
    batch_size: int = arg(16, help="images per forward pass")
    image_size: int | None = arg(None, help="square input side (default: the model's own)")
    seed: int = arg(0, help="seed of a random:MODEL initialisation")

    def __post_init__(self) -> None:
        if self.num_images <= 0 or self.batch_size <= 0:
            raise ValueError("num_images, batch_size: must be positive")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError("image_size: must be positive")


def list_images(folder: Path, limit: int) -> list[Path]:
    from finetune.data import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise UsageError(f"{folder}: no such image folder")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise UsageError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found[:limit]


def measure(backbone, transform, paths: list[Path], *, batch_size: int) -> dict[str, Any]:
    """Mean attention distance of ``backbone`` over the images at ``paths``."""
    import torch
    from tqdm.auto import tqdm

    from base.shards import decode_image
    from finetune.attention import attention_maps, mean_attention_distance

    backbone.eval()
    totals: torch.Tensor | None = None
    used: list[str] = []
    failed: dict[str, str] = {}
    grid = None
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    for batch_paths in tqdm(batches, desc="attention distance", unit="batch", leave=False):
        tensors = []
        for path in batch_paths:
            try:
                tensors.append(transform(decode_image(path.read_bytes())))
            except (OSError, ValueError) as err:
                failed[str(path)] = str(err)
                continue
            used.append(str(path))
        if not tensors:
            continue
        images = torch.stack(tensors)
        grid = backbone.grid(tuple(images.shape[-2:]))
        maps = attention_maps(backbone, images)
        per_layer = torch.stack(
            [mean_attention_distance(m, grid, backbone.patch_size, backbone.num_prefix_tokens) for m in maps]
        )  # layers × heads, mean over this batch
        totals = per_layer * len(tensors) if totals is None else totals + per_layer * len(tensors)
    if totals is None:
        raise UsageError(f"none of the {len(paths)} images could be read (e.g. {next(iter(failed.items()))})")
    distance = (totals / len(used)).tolist()
    return {
        "distance_px": distance,
        "mean_per_layer": [sum(h) / len(h) for h in distance],
        "num_images": len(used),
        "num_failed": len(failed),
        "failed": failed,
        "grid": list(grid),
        "images": used,
    }


def _transform(preprocess, image_size: int | None, mean, std):
    if image_size is None:
        return preprocess
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def run(cfg: AttentionDistanceConfig) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from base.shards import atomic_write_json
    from finetune.attention import patch_distances
    from finetune.backbone import BackboneError, BackboneSource, load_backbone, normalisation
    from finetune.plots import plot_attention_distance

    try:
        sources = [(BackboneSource(checkpoint=cfg.checkpoint, pretrained=cfg.pretrained, random=cfg.random, model=cfg.model),
                    cfg.label)]
        if cfg.compare:
            sources.append((BackboneSource.parse(cfg.compare), cfg.compare_label))
    except ValueError as err:
        raise UsageError(str(err)) from err
    paths = list_images(cfg.images, cfg.num_images)
    results = []
    for source, label in sources:
        set_seed(cfg.seed)
        backbone, preprocess = load_backbone(source, image_size=cfg.image_size)
        if not backbone.attention_modules():
            trunk = type(getattr(backbone.visual, "trunk", backbone.visual)).__name__
            raise BackboneError(
                f"{backbone.model_name} ({source.describe()}) has a hierarchical {trunk} image tower: no ViT attention maps "
                "to measure; attention-distance takes ViT image towers (e.g. qcap-tiny-clip, ViT-B-16)"
            )
        mean, std = normalisation(preprocess)
        measured = measure(backbone, _transform(preprocess, cfg.image_size, mean, std), paths, batch_size=cfg.batch_size)
        facts = backbone.describe()
        grid = tuple(measured["grid"])
        uniform = float(patch_distances(grid, backbone.patch_size).mean())
        results.append({**facts, "label": label or source.describe(), "source": source.describe(),
                        "image_size": [g * p for g, p in zip(grid, backbone.patch_size, strict=True)],
                        "uniform_attention_px": uniform, **measured})
        log.info("%s: mean attention distance per block %s px", results[-1]["label"],
                 ", ".join(f"{d:.1f}" for d in measured["mean_per_layer"]))
    cfg.out.mkdir(parents=True, exist_ok=True)
    payload = {"definition": DEFINITION, "images_folder": str(cfg.images), "models": results}
    atomic_write_json(cfg.out / JSON_FILE, payload)
    save_config(cfg, cfg.out / CONFIG_FILE)
    patch = results[0]["patch_size"][0]
    plot_attention_distance(cfg.out / PLOT_FILE, [(r["label"], r["distance_px"], r["uniform_attention_px"]) for r in results],
                            patch_size=patch)
    return payload


def main(argv: list[str], prog: str = "qcap attention-distance") -> int:
    cfg = parse_config(AttentionDistanceConfig, argv, prog=prog)
    payload = run(cfg)
    for model in payload["models"]:
        per_layer = ", ".join(f"{d:.1f}" for d in model["mean_per_layer"])
        print(f"{model['label']}: {model['num_images']} images, mean distance per block (px): {per_layer}")
    print(f"→ {cfg.out / JSON_FILE}, {cfg.out / PLOT_FILE}, {cfg.out / CONFIG_FILE}")
    return 0
