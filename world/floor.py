"""The depth floor: how well can any model predict the world's depth from its images?

A world's depth map is the background plane's depth (near at the bottom edge, far at the top,
a sideways tilt) with each object's card standing at a share of the plane's distance behind it
(``world.scenes``: NEAR_RANGE_M, FAR_RANGE_M, TILT_RANGE, OBJECT_DEPTH_SHARE). None of those four
draws shows in the image: the background texture is pasted at one scale and the cards' sizes do
not depend on their distance. So a part of every depth map's error is beyond any backbone, and a
finetune that reaches it has nothing left to gain from better features.

This module measures that part on the eval depth set's validation split, with the metric of
``qcap finetune depth`` (per-image RMSE, abs rel, δ1, averaged over images):

- ``constant``: the training split's mean depth everywhere;
- ``position``: the training split's mean depth at each pixel (what a model that sees only where a
  pixel is can learn);
- ``floor``: the posterior mean of each pixel's depth given everything the image shows and more:
  the exact layout (which object each pixel shows, where each object stands) and the full depth
  order of the objects, under the world's own priors. Draws of (near, far, tilt, shares) from the
  priors are kept when they give the scene's depth order (rejection sampling), and the kept maps
  are averaged. Conditioning on more than an image shows can only lower the error, so no model
  beats the floor's mean squared error in expectation; the floor is a lower bound of the best
  achievable per-pixel MSE (the RMSE printed is the metric's per-image mean of it).

Each scene is regenerated from world.json's seed and rendered again; a depth map that differs
from the world's PNG (a world from another generator version) is refused, so the floor is always
of the images on disk.

Usage::

    qcap depth-floor --world runs/demo/world --out runs/demo/depth-floor   # -> depth_floor.json
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from base.cli import UsageError

log = logging.getLogger(__name__)
FLOOR_FILE = "depth_floor.json"
MAX_DRAW_ROUNDS = 64  # rounds of candidate draws per scene before giving up on more kept draws


@dataclass(frozen=True, slots=True)
class Layout:
    """What one scene fixes for the floor: the visible object per pixel and each object's anchor."""

    instance_map: np.ndarray  # H×W uint8: 0 background, k + 1 where object k (nearest first) is seen
    anchor_x: np.ndarray  # per object: x of the plane point it stands in front of (fraction of the width)
    anchor_y: np.ndarray  # per object: y of that point (its bottom edge, fraction of the height)
    width: int
    height: int


def layout_of(scene, rendered=None) -> Layout:
    """``rendered``: the scene's render with instances, when the caller has one already."""
    from world.scenes import render

    if rendered is None or rendered.instance_map is None:
        rendered = render(scene, with_maps=True, with_instances=True)
    short = min(scene.width, scene.height)
    anchor_x = np.array([o.cx for o in scene.objects], dtype=np.float64)
    anchor_y = np.array([min(o.cy + o.extent * short / 2 / scene.height, 1.0) for o in scene.objects], dtype=np.float64)
    return Layout(rendered.instance_map, anchor_x, anchor_y, scene.width, scene.height)


def _inverse_plane(near, far, tilt, x, y):
    """Inverse depth of the background plane; broadcasts over draws (leading axis) and points."""
    return 1.0 / far + (1.0 / near - 1.0 / far) * y + tilt * (x - 0.5)


def depth_map(layout: Layout, near, far, tilt, depths) -> np.ndarray:
    """Depth maps (K×H×W) for K draws of the plane (near, far, tilt: K each) and object depths (K×objects)."""
    near, far, tilt = (np.asarray(v, dtype=np.float64).reshape(-1, 1, 1) for v in (near, far, tilt))
    ys = np.linspace(0.0, 1.0, layout.height, dtype=np.float64)[None, :, None]
    xs = np.linspace(0.0, 1.0, layout.width, dtype=np.float64)[None, None, :]
    maps = 1.0 / np.maximum(_inverse_plane(near, far, tilt, xs, ys), 1e-3)
    depths = np.asarray(depths, dtype=np.float64).reshape(maps.shape[0], -1)
    for k in range(depths.shape[1]):
        seen = layout.instance_map == k + 1
        maps[:, seen] = depths[:, k : k + 1]
    return maps


def posterior_mean(layout: Layout, rng: np.random.Generator, samples: int) -> tuple[np.ndarray, int]:
    """The mean depth map over prior draws that keep the scene's depth order; and how many were kept."""
    from world.scenes import FAR_RANGE_M, NEAR_RANGE_M, OBJECT_DEPTH_SHARE, TILT_RANGE

    n = len(layout.anchor_x)
    kept: list[tuple[np.ndarray, ...]] = []
    have = 0
    batch = max(4 * samples, 1024)
    for _ in range(MAX_DRAW_ROUNDS):
        near = rng.uniform(*NEAR_RANGE_M, batch)
        far = rng.uniform(*FAR_RANGE_M, batch)
        tilt = rng.uniform(*TILT_RANGE, batch)
        share = rng.uniform(*OBJECT_DEPTH_SHARE, (batch, n))
        inv = _inverse_plane(near[:, None], far[:, None], tilt[:, None], layout.anchor_x[None], layout.anchor_y[None])
        depths = share / np.maximum(inv, 1e-3)
        ok = np.all(np.diff(depths, axis=1) >= 0, axis=1) if n > 1 else np.ones(batch, dtype=bool)
        take = np.flatnonzero(ok)[: samples - have]
        kept.append((near[take], far[take], tilt[take], depths[take]))
        have += len(take)
        if have >= samples:
            break
    if not have:
        raise RuntimeError("no prior draw gave the scene's depth order")  # not reached: the scene itself is one
    near, far, tilt, depths = (np.concatenate(parts) for parts in zip(*kept, strict=True))
    return depth_map(layout, near, far, tilt, depths).mean(axis=0), have


def _depth_items(world: Path, sub: str) -> list[tuple[int, Path, Path]]:
    root = world / "eval" / "depth"
    items = []
    for png in sorted((root / "depth" / sub).glob("depth_*.png")):
        index = int(png.stem.split("_")[1])
        items.append((index, root / "images" / sub / f"{png.stem}.jpg", png))
    return items


def _read_png_m(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float64) * 0.001  # the world's depth PNGs: uint16 millimetres, 0 = invalid


class _DepthScore:
    """Running means of ``qcap finetune depth``'s per-image metrics (finetune.metrics.DepthMetrics: RMSE, abs rel
    and delta1 over the valid pixels, clamped to its default range, averaged over images); the world package sits
    below finetune, so it keeps this numpy copy, and tests/test_depth_floor.py checks that the two agree."""

    MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0

    def __init__(self) -> None:
        self.sums = np.zeros(3)
        self.count = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        valid = np.isfinite(target) & (target > self.MIN_DEPTH) & (target <= self.MAX_DEPTH)
        if not valid.any():
            return
        p, g = np.clip(pred[valid], self.MIN_DEPTH, self.MAX_DEPTH), target[valid]
        self.sums += [np.sqrt(np.mean((p - g) ** 2)), np.mean(np.abs(p - g) / g), np.mean(np.maximum(p / g, g / p) < 1.25)]
        self.count += 1

    def compute(self) -> dict[str, float]:
        return dict(zip(("rmse", "abs_rel", "delta1"), (self.sums / max(self.count, 1)).tolist(), strict=True))


def measure(world: Path, *, samples: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """The floor, position and constant predictions' metrics on ``world``'s depth validation split."""
    from tqdm import tqdm

    from base.config import from_dict
    from world.config import WorldConfig
    from world.generate import WORLD_FILE, _square_scene, depth_png_array
    from world.scenes import render

    info_path = world / WORLD_FILE
    if not info_path.exists():
        raise UsageError(f"{info_path}: missing; make a world first with `qcap world --out {world}`")
    info = json.loads(info_path.read_text())
    cfg = from_dict(WorldConfig, {**info["config"], "out": str(world)})
    palette = cfg.palette()
    train, val = _depth_items(world, "training"), _depth_items(world, "validation")
    if not train or not val:
        raise UsageError(f"{world}/eval/depth: needs depth PNGs in depth/training and depth/validation "
                         f"(found {len(train)} and {len(val)})")
    sums = counts = None
    total = 0.0
    total_n = 0
    for _, _, png in train:
        depth = _read_png_m(png)
        valid = depth > 0
        if sums is None:
            sums, counts = np.zeros_like(depth), np.zeros_like(depth)
        if depth.shape != sums.shape:
            raise UsageError(f"{png}: {depth.shape[1]}x{depth.shape[0]} px, unlike the split's first map "
                             f"({sums.shape[1]}x{sums.shape[0]}); the position prediction needs one size")
        sums[valid] += depth[valid]
        counts[valid] += 1
        total += float(depth[valid].sum())
        total_n += int(valid.sum())
    constant = total / max(total_n, 1)
    position = np.where(counts > 0, sums / np.maximum(counts, 1), constant)
    metrics = {name: _DepthScore() for name in ("constant", "position", "floor")}
    rng = np.random.default_rng(seed)
    kept_min = samples
    for index, _, png in tqdm(val, desc="depth floor", unit="image", disable=not progress):
        target = _read_png_m(png)
        scene = _square_scene(cfg.seed, "eval-depth", index, cfg.eval_image_size, palette=palette)
        rendered = render(scene, with_maps=True, with_instances=True)
        if not np.array_equal(depth_png_array(rendered).astype(np.float64) * 0.001, target):
            raise UsageError(f"{png}: the world's generator does not redraw this depth map (a world from another "
                             f"qcap version?); regenerate {world} with this version")
        floor, kept = posterior_mean(layout_of(scene, rendered), rng, samples)
        kept_min = min(kept_min, kept)
        for name, pred in (("constant", np.full_like(target, constant)), ("position", position), ("floor", floor)):
            if pred.shape != target.shape:
                raise UsageError(f"{png}: {target.shape[1]}x{target.shape[0]} px, unlike the training maps")
            metrics[name].update(pred, target)
    result = {name: m.compute() for name, m in metrics.items()}
    return {
        "world": str(world),
        "split": "validation",
        "num_images": len(val),
        "num_training_images": len(train),
        "samples_per_image": samples,
        "fewest_samples_kept": kept_min,
        "seed": seed,
        "metric": "qcap finetune depth's: per-image RMSE (m), abs rel and delta1 over valid pixels, averaged over images",
        "predictions": result,
        "headroom_m": result["position"]["rmse"] - result["floor"]["rmse"],
        "method": "floor = posterior mean under the world's depth priors given each image's layout and full depth order "
                  "(rejection sampling); position = training mean per pixel; constant = training mean",
    }


def main(argv: list[str], prog: str = "qcap depth-floor") -> int:
    from base.config import parse_config
    from base.shards import atomic_write_json
    from world.config import DepthFloorConfig

    cfg = parse_config(DepthFloorConfig, argv, prog=prog)
    out = cfg.out or cfg.world.with_name(cfg.world.name + ".depth-floor")
    result = measure(cfg.world, samples=cfg.samples, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / FLOOR_FILE, result)
    p = result["predictions"]
    print(f"depth RMSE on {result['num_images']} validation images: floor {p['floor']['rmse']:.3f} m, "
          f"position only {p['position']['rmse']:.3f} m, constant {p['constant']['rmse']:.3f} m "
          f"(headroom over position: {result['headroom_m']:.3f} m) -> {out / FLOOR_FILE}")
    return 0
