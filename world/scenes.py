"""Procedural scenes with exact ground truth: objects, class map, metric depth.

A scene is 1–4 flat objects (shapes with distinct silhouettes) standing in front of a
background plane. Every object has a class, a named colour, an apparent size, a texture, a
position in the 3×3 grid of the image and a metric depth; nearer objects are painted later and
hide farther ones, so the depth order is also the occlusion order. The background is a plane
whose depth grows from the bottom of the image (near) to the top (far), with a random sideways
tilt, so a depth map is never a constant.

Geometry is resolution-free (centres and extents are fractions of the image), but visibility
and overlap are measured on the pixels of the size the scene is drawn at, so the truth is exact
for that image.

Usage::

    rng = sample_rng(seed=0, split="pool", index=7, stream=STREAM_SCENE)
    scene = sample_scene(rng, width=320, height=240)
    image = render(scene).image                      # PIL RGB
    maps = render(scene, with_maps=True)             # + class map (uint8) and depth (metres)
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw

# --------------------------------------------------------------------------------------------
# Vocabulary: the closed world every caption is about

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross", "crescent", "hexagon", "ring", "arrow",
)
# Named colours and their sRGB values; chosen so no two are confusable after JPEG.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 25),
    "green": (35, 150, 55),
    "blue": (35, 85, 215),
    "purple": (125, 45, 175),
    "pink": (240, 125, 185),
    "brown": (120, 72, 35),
    "black": (18, 18, 18),
    "white": (248, 248, 248),
    "grey": (128, 128, 128),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Object extent (bounding square side) as a fraction of the image's shorter side, per size.
SIZE_EXTENT: dict[str, tuple[float, float]] = {"small": (0.14, 0.22), "medium": (0.27, 0.36), "large": (0.42, 0.55)}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
TEXTURE_PROBS: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)
BACKGROUNDS: tuple[str, ...] = ("sky", "grass", "sand", "wood", "brick", "studio", "night")
# Mean colour of each background, used to keep objects visible against it.
BACKGROUND_MEAN: dict[str, tuple[int, int, int]] = {
    "sky": (120, 170, 235), "grass": (70, 140, 55), "sand": (215, 195, 150), "wood": (150, 105, 65),
    "brick": (160, 75, 55), "studio": (215, 215, 215), "night": (20, 25, 50),
}


@dataclass(frozen=True)
class Palette:
    """The colours and backgrounds a world's scenes draw from (``qcap world --colours/--backgrounds``).

    The default is every one of :data:`COLOURS` and :data:`BACKGROUNDS`, drawn exactly as before the
    palette existed. A smaller palette leaves fewer things that tell one description from another, so
    what is left (the shapes, their counts, sizes and positions) carries more of a caption.
    """

    colours: tuple[str, ...] = tuple(COLOURS)
    backgrounds: tuple[str, ...] = BACKGROUNDS

    @classmethod
    def parse(cls, colours: str | None, backgrounds: str | None) -> Palette:
        """A palette from comma-separated names (None: all); ValueError names what is wrong."""
        chosen_c = _names(colours, tuple(COLOURS), "colour")
        chosen_b = _names(backgrounds, BACKGROUNDS, "background")
        if len(chosen_c) < 2:
            raise ValueError("--colours needs at least two colours (a wrong attribute names another one)")
        for bg in chosen_b:
            if not any(_colour_ok(c, bg) for c in chosen_c):
                raise ValueError(f"no colour of --colours {','.join(chosen_c)} stands out on the {bg} background; "
                                 f"add one, e.g. {', '.join(c for c in COLOURS if _colour_ok(c, bg))[:60]}")
        return cls(colours=chosen_c, backgrounds=chosen_b)

    def spec(self) -> dict[str, list[str]] | None:
        """What world.json records: None for the default palette."""
        if self == Palette():
            return None
        return {"colours": list(self.colours), "backgrounds": list(self.backgrounds)}


_DEFAULT_PALETTE = Palette()


def _names(text: str | None, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if text is None or not text.strip():
        return known
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a {what} is named twice in {text!r}")
    return tuple(n for n in known if n in names)  # the canonical order: the same palette draws the same scenes


# The 3×3 grid cells; an object's position is the cell holding its centre.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right",
)
NUM_OBJECTS_PROBS = (0.3, 0.3, 0.25, 0.15)  # P(1), P(2), P(3), P(4) objects
# Uneven lighting of the background: a LIGHT_GRID × LIGHT_GRID field of brightness factors in
# LIGHT_RANGE, bilinearly stretched over the image. Without it every studio or sky picture
# would share one low-frequency layout, and perceptual hashes would call distinct images
# near-duplicates.
LIGHT_GRID = 4
LIGHT_RANGE = (0.55, 1.0)
MIN_VISIBLE = 0.5  # an object less visible than this (occluded or cut) makes the scene re-drawn
# The depth priors, none of which an image shows: the background plane's depth at the bottom and top
# edges, its sideways slope of inverse depth (keeps every depth under 10 m, NYUv2's range), and
# where an object stands between the camera and the plane behind it (a share of that distance).
# world.floor reads them to say how well any model can predict depth from the images.
NEAR_RANGE_M = (1.5, 3.0)
FAR_RANGE_M = (6.0, 9.0)
TILT_RANGE = (-0.02, 0.02)
OBJECT_DEPTH_SHARE = (0.45, 0.85)
SEG_BACKGROUND = 0  # class-map index of the background; objects are 1 + CLASSES.index(cls)
SEG_IGNORE = 255  # class-map value reserved for "ignore" (never drawn by the generator)

STREAM_PLAN, STREAM_SCENE, STREAM_TEXT, STREAM_EXTRA = 0, 1, 2, 3


def sample_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """The generator for one (seed, split, index, stream): independent of every other sample,
    so any sample can be re-made alone (duplicates re-draw their original this way)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(split.encode()), index, stream])


def sample_uid(seed: int, split: str, index: int) -> str:
    """DataComp-style 32-hex uid, a pure function of (seed, split, index)."""
    return hashlib.md5(f"qcap-world/{seed}/{split}/{index}".encode()).hexdigest()


def position_of(cx: float, cy: float) -> str:
    col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "")
    row = "top" if cy < 1 / 3 else ("bottom" if cy > 2 / 3 else "")
    return f"{row} {col}".strip() or "centre"


@dataclass(slots=True)
class SceneObject:
    cls: str  # one of CLASSES
    colour: str  # one of COLOURS
    size: str  # small | medium | large (apparent size)
    texture: str  # solid | striped | dotted | checkered
    cx: float  # centre x, fraction of the width
    cy: float  # centre y, fraction of the height
    extent: float  # side of the bounding square, fraction of the shorter image side
    angle: float  # rotation in degrees
    depth_m: float  # distance from the camera in metres (the object is a flat card)
    position: str = ""  # 3×3 cell of the centre (POSITIONS)
    depth_rank: int = 0  # 0 = nearest object
    group_count: int = 1  # objects in the scene with this class and colour
    visible_fraction: float = 1.0  # share of the silhouette not hidden by nearer objects


@dataclass(slots=True)
class Scene:
    width: int
    height: int
    background: str
    objects: list[SceneObject]  # in depth order, nearest first
    relations: list[tuple[int, int]] = field(default_factory=list)  # (front, back) object indices that overlap
    near_m: float = 2.0  # background depth at the bottom edge
    far_m: float = 8.0  # background depth at the top edge
    tilt: float = 0.0  # sideways slope of the background's inverse depth
    bg_phase: tuple[int, int] = (0, 0)  # offset into the background texture
    light: tuple[float, ...] = ()  # LIGHT_GRID² brightness factors of the background, smoothly interpolated
    quality: int = 90  # JPEG quality the image is published with
    fmt: str = "jpg"  # jpg | png


# --------------------------------------------------------------------------------------------
# Silhouettes


def _polygon(cls: str) -> list[tuple[float, float]] | None:
    """Unit-square outline (coordinates in [-1, 1]) of the polygonal classes."""
    if cls == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if cls == "triangle":
        return [(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)]
    if cls == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if cls == "hexagon":
        return [(0.95 * math.cos(k * math.pi / 3), 0.95 * math.sin(k * math.pi / 3)) for k in range(6)]
    if cls == "cross":
        a, b = 0.3, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if cls == "arrow":
        return [(-0.95, -0.22), (0.2, -0.22), (0.2, -0.6), (0.95, 0.0), (0.2, 0.6), (0.2, 0.22), (-0.95, 0.22)]
    if cls == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -(y + 2.5) / 15.5))
        return pts
    return None


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def silhouette(cls: str, side: int, angle: float) -> np.ndarray:
    """Boolean mask (side × side) of a class's silhouette, rotated by ``angle`` degrees."""
    side = max(int(side), 4)
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    half = (side - 1) / 2.0

    def to_px(points):
        return [(half + x * half, half + y * half) for x, y in points]

    poly = _polygon(cls)
    if poly is not None:
        draw.polygon(to_px(_rotate(poly, angle)), fill=255)
    elif cls == "circle":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
    elif cls == "ring":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
        inner = 0.52 * half
        draw.ellipse([half - inner, half - inner, half + inner, half + inner], fill=0)
    elif cls == "crescent":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
        (ox, oy), = _rotate([(0.5, -0.1)], angle)
        r = 0.82 * half
        cx, cy = half + ox * half, half + oy * half
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
    else:
        raise ValueError(f"unknown class {cls!r}")
    return np.asarray(canvas) > 127


# --------------------------------------------------------------------------------------------
# Sampling


def _pick(rng: np.random.Generator, items, probs=None):
    return items[int(rng.choice(len(items), p=probs))]


def _colour_ok(colour: str, background: str) -> bool:
    """The colour stands out from the background under any of its lighting."""
    a = np.array(COLOURS[colour], dtype=float)
    b = np.array(BACKGROUND_MEAN[background], dtype=float)
    lo, hi = LIGHT_RANGE
    return all(float(np.linalg.norm(a - f * b)) > 80.0 for f in (lo, (lo + hi) / 2, hi))


def _group_sizes(rng: np.random.Generator, n: int) -> list[int]:
    """Split n objects into groups that share class and colour (so captions carry counts)."""
    options = {
        1: [([1], 1.0)],
        2: [([1, 1], 0.65), ([2], 0.35)],
        3: [([1, 1, 1], 0.55), ([2, 1], 0.3), ([3], 0.15)],
        4: [([1, 1, 1, 1], 0.4), ([2, 1, 1], 0.25), ([2, 2], 0.15), ([3, 1], 0.1), ([4], 0.1)],
    }[n]
    k = int(rng.choice(len(options), p=[p for _, p in options]))
    return list(options[k][0])


def sample_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    num_objects: int | None = None,
    classes: tuple[str, ...] | None = None,
    background: str | None = None,
    max_tries: int = 20,
    palette: Palette | None = None,
) -> Scene:
    """Draw a scene for an image of ``width`` × ``height`` pixels.

    ``num_objects`` and ``classes`` pin the count or the classes (the classification set uses
    one object of a given class). A draw in which some object ends up less than
    :data:`MIN_VISIBLE` visible is re-drawn; after ``max_tries`` the least-occluded draw is kept.
    ``palette`` limits the colours and backgrounds drawn (default: all of them).
    """
    palette = palette or _DEFAULT_PALETTE
    best: Scene | None = None
    best_vis = -1.0
    for _ in range(max_tries):
        scene = _draw_scene(rng, width, height, num_objects=num_objects, classes=classes, background=background,
                            palette=palette)
        min_vis = min(o.visible_fraction for o in scene.objects)
        if min_vis >= MIN_VISIBLE:
            return scene
        if min_vis > best_vis:
            best, best_vis = scene, min_vis
    assert best is not None
    return best


def _draw_scene(rng, width, height, *, num_objects, classes, background, palette: Palette) -> Scene:
    bg = background or _pick(rng, palette.backgrounds)
    n = num_objects or 1 + int(rng.choice(4, p=NUM_OBJECTS_PROBS))
    groups = _group_sizes(rng, n) if classes is None else [1] * n
    cells = list(rng.permutation(9))
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    for g, count in enumerate(groups):
        if classes is not None:
            cls = classes[g]
        else:
            cls = _pick(rng, CLASSES)
            # mostly distinct classes; sometimes a second group of a class in another colour
            while any(c == cls for c, _ in used) and rng.random() < 0.85:
                cls = _pick(rng, CLASSES)
        if not any(_colour_ok(c, bg) and (cls, c) not in used for c in palette.colours):
            # a small palette can run out of colours for a repeated class: take a class still free
            # (never reached with the default palette, so its scenes are drawn as before)
            cls = _pick(rng, tuple(c for c in CLASSES if all((c, k) not in used for k in palette.colours)))
        colour = _pick(rng, palette.colours)
        while not _colour_ok(colour, bg) or (cls, colour) in used:
            colour = _pick(rng, palette.colours)
        used.add((cls, colour))
        size = _pick(rng, SIZES) if classes is None else _pick(rng, ("medium", "large"))
        texture = _pick(rng, TEXTURES, TEXTURE_PROBS)
        lo, hi = SIZE_EXTENT[size]
        extent = float(rng.uniform(lo, hi))
        for _ in range(count):
            cell = int(cells.pop()) if cells else int(rng.integers(9))
            row, col = divmod(cell, 3)
            cx = (col + 0.5 + rng.uniform(-0.3, 0.3)) / 3.0
            cy = (row + 0.5 + rng.uniform(-0.3, 0.3)) / 3.0
            if classes is not None:  # classification images: the object near the middle
                cx, cy = 0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12)
            max_angle = 180.0 if cls in ("star", "hexagon", "cross", "circle", "ring") else 25.0
            objects.append(
                SceneObject(
                    cls=cls, colour=colour, size=size, texture=texture, cx=cx, cy=cy, extent=extent,
                    angle=float(rng.uniform(-max_angle, max_angle)), depth_m=0.0, group_count=count,
                )
            )
    near_m = float(rng.uniform(*NEAR_RANGE_M))
    far_m = float(rng.uniform(*FAR_RANGE_M))
    tilt = float(rng.uniform(*TILT_RANGE))
    scene = Scene(
        width=int(width), height=int(height), background=bg, objects=objects, near_m=near_m, far_m=far_m,
        tilt=tilt, bg_phase=(int(rng.integers(0, 4096)), int(rng.integers(0, 4096))),
        light=tuple(round(float(v), 4) for v in rng.uniform(*LIGHT_RANGE, LIGHT_GRID * LIGHT_GRID)),
    )
    short = min(width, height)
    for obj in scene.objects:
        # keep the whole silhouette inside the image
        half_w = obj.extent * short / 2 / width
        half_h = obj.extent * short / 2 / height
        obj.cx = float(np.clip(obj.cx, min(half_w, 0.5), max(1 - half_w, 0.5)))
        obj.cy = float(np.clip(obj.cy, min(half_h, 0.5), max(1 - half_h, 0.5)))
        obj.position = position_of(obj.cx, obj.cy)
        # in front of the background plane behind it, at 45–85 % of its distance
        obj.depth_m = float(background_depth_at(scene, obj.cx, min(obj.cy + half_h, 1.0)) * rng.uniform(*OBJECT_DEPTH_SHARE))
    scene.objects.sort(key=lambda o: o.depth_m)
    for rank, obj in enumerate(scene.objects):
        obj.depth_rank = rank
    _measure_occlusion(scene)
    return scene


def background_depth_at(scene: Scene, x: float, y: float) -> float:
    """Depth in metres of the background plane at fractional image position (x, y)."""
    inv = 1.0 / scene.far_m + (1.0 / scene.near_m - 1.0 / scene.far_m) * y + scene.tilt * (x - 0.5)
    return 1.0 / max(inv, 1e-3)


def _boxes(scene: Scene) -> list[tuple[int, int, int]]:
    """Per object: (x0, y0, side) in pixels of its bounding square."""
    short = min(scene.width, scene.height)
    out = []
    for obj in scene.objects:
        side = max(4, int(round(obj.extent * short)))
        x0 = int(round(obj.cx * scene.width - side / 2))
        y0 = int(round(obj.cy * scene.height - side / 2))
        out.append((x0, y0, side))
    return out


def _masks(scene: Scene) -> list[np.ndarray]:
    return [silhouette(o.cls, side, o.angle) for o, (_, _, side) in zip(scene.objects, _boxes(scene), strict=True)]


def _clip_mask(mask: np.ndarray, x0: int, y0: int, width: int, height: int):
    """The part of a mask placed at (x0, y0) that falls inside the image, and its image box."""
    side = mask.shape[0]
    ax0, ay0 = max(x0, 0), max(y0, 0)
    ax1, ay1 = min(x0 + side, width), min(y0 + side, height)
    if ax1 <= ax0 or ay1 <= ay0:
        return None, (ax0, ay0, ax0, ay0)
    return mask[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0], (ax0, ay0, ax1, ay1)


def _measure_occlusion(scene: Scene) -> None:
    """Visible fraction of each object and the (front, back) pairs whose silhouettes overlap."""
    boxes = _boxes(scene)
    masks = _masks(scene)
    clipped = [_clip_mask(m, x0, y0, scene.width, scene.height) for m, (x0, y0, _) in zip(masks, boxes, strict=True)]
    relations = []
    for b, (mask_b, box_b) in enumerate(clipped):
        total = int(masks[b].sum())
        if mask_b is None or total == 0:
            scene.objects[b].visible_fraction = 0.0
            continue
        covered = np.zeros_like(mask_b)
        for a in range(b):  # nearer objects come first
            mask_a, box_a = clipped[a]
            if mask_a is None:
                continue
            ix0, iy0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
            ix1, iy1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            part_a = mask_a[iy0 - box_a[1] : iy1 - box_a[1], ix0 - box_a[0] : ix1 - box_a[0]]
            part_b = mask_b[iy0 - box_b[1] : iy1 - box_b[1], ix0 - box_b[0] : ix1 - box_b[0]]
            overlap = part_a & part_b
            if overlap.any():
                relations.append((a, b))
                covered[iy0 - box_b[1] : iy1 - box_b[1], ix0 - box_b[0] : ix1 - box_b[0]] |= overlap
        visible = int((mask_b & ~covered).sum())
        scene.objects[b].visible_fraction = round(visible / total, 4)
    scene.relations = sorted(relations)


# --------------------------------------------------------------------------------------------
# Drawing


TILE = 256  # side of the repeating texture tiles; every periodic pattern divides it


@lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """A fixed, smooth-ish, seamless noise tile (TILE × TILE float32 in about [-1, 1])."""
    rng = np.random.default_rng(20240513)
    raw = rng.standard_normal((TILE, TILE)).astype(np.float32)
    smooth = (raw + np.roll(raw, 1, 0) + np.roll(raw, 1, 1) + np.roll(np.roll(raw, 1, 0), 1, 1)) / 4.0
    return np.clip(smooth / 1.2, -1.0, 1.0)


@cache
def _texture_tile(kind: str) -> Image.Image:
    """The repeating RGB tile of a textured background kind (made once per process)."""
    base = np.array(BACKGROUND_MEAN[kind], dtype=np.float32)
    noise = _noise_tile()[..., None]
    yy = np.arange(TILE, dtype=np.float32)[:, None, None]
    if kind == "grass":
        img = base * (1.0 + 0.22 * noise)
    elif kind == "sand":
        img = base * (1.0 + 0.1 * noise)
    elif kind == "wood":
        grain = np.sin(yy * (2 * np.pi * 8 / TILE))
        img = base * (1.0 + 0.12 * grain + 0.08 * noise)
    elif kind == "brick":
        bh, bw, m = 16, 32, 2
        y = np.arange(TILE)[:, None]
        x = np.arange(TILE)[None, :] + ((y // bh) % 2) * (bw // 2)
        mortar = ((y % bh) < m) | ((x % bw) < m)
        img = base * (1.0 + 0.1 * noise)
        img[mortar] = (200, 195, 185)
    elif kind == "night":
        img = np.broadcast_to(base, (TILE, TILE, 3)).copy()
        img[_noise_tile() > 0.93] = (230, 230, 210)
    else:
        raise ValueError(f"{kind!r} is not a textured background")
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def background_image(scene: Scene) -> Image.Image:
    """The background as a PIL RGB image (gradients are stretched columns, textures tiled)."""
    h, w, kind = scene.height, scene.width, scene.background
    if kind in ("sky", "studio"):
        y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        if kind == "sky":
            top, bottom = np.array((60, 120, 215), np.float32), np.array((185, 215, 245), np.float32)
            column = top + (bottom - top) * y
        else:
            column = np.array(BACKGROUND_MEAN[kind], np.float32) * (0.88 + 0.14 * y)
        return Image.fromarray(np.clip(column, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)
    tile = _texture_tile(kind)
    image = Image.new("RGB", (w, h))
    py, px = scene.bg_phase[0] % TILE, scene.bg_phase[1] % TILE
    for y in range(-py, h, TILE):
        for x in range(-px, w, TILE):
            image.paste(tile, (x, y))
    return image


def _lit(image: Image.Image, scene: Scene) -> Image.Image:
    """The background under the scene's uneven lighting (see LIGHT_GRID)."""
    if not scene.light:
        return image
    grid = np.array(scene.light, dtype=np.float32).reshape(LIGHT_GRID, LIGHT_GRID)
    field = Image.fromarray(np.round(grid * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    return ImageChops.multiply(image, Image.merge("RGB", (field, field, field)))


def background_rgb(scene: Scene) -> np.ndarray:
    """The background as an H×W×3 uint8 array."""
    return np.asarray(_lit(background_image(scene), scene))


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second colour of a pattern: darker for light colours, lighter for dark ones."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum > 110:
        return tuple(int(c * 0.6) for c in rgb)
    return tuple(int(c + (255 - c) * 0.45) for c in rgb)


def _pattern(texture: str, side: int) -> np.ndarray | None:
    """side × side boolean pattern of a texture (None for solid)."""
    if texture == "solid":
        return None
    period = max(4, side // 6)
    idx = np.arange(side, dtype=np.int32)
    if texture == "striped":
        return ((np.add.outer(idx, idx) // max(2, period // 2)) % 2) == 1
    if texture == "dotted":
        d = (idx % period) - period / 2.0
        d2 = d * d
        return np.add.outer(d2, d2) < (period * 0.28) ** 2
    if texture == "checkered":
        return (np.add.outer(idx // period, idx // period) % 2) == 1
    raise ValueError(f"unknown texture {texture!r}")


@dataclass(slots=True)
class Rendered:
    image: Image.Image  # RGB
    class_map: np.ndarray | None = None  # H×W uint8: SEG_BACKGROUND or 1 + class index
    depth_m: np.ndarray | None = None  # H×W float32 metres
    instance_map: np.ndarray | None = None  # H×W uint8: 0 background, k + 1 where object k (depth order) is seen


def render(scene: Scene, *, with_maps: bool = False, with_instances: bool = False) -> Rendered:
    """Paint the scene (far objects first); optionally its exact class map and depth map, and
    its instance map (which object each pixel shows: occlusion as painted)."""
    image = _lit(background_image(scene), scene)
    class_map = depth = instances = None
    if with_instances:
        instances = np.zeros((scene.height, scene.width), dtype=np.uint8)
    if with_maps:
        class_map = np.full((scene.height, scene.width), SEG_BACKGROUND, dtype=np.uint8)
        ys = np.linspace(0.0, 1.0, scene.height, dtype=np.float64)[:, None]
        xs = np.linspace(0.0, 1.0, scene.width, dtype=np.float64)[None, :]
        inv = 1.0 / scene.far_m + (1.0 / scene.near_m - 1.0 / scene.far_m) * ys + scene.tilt * (xs - 0.5)
        depth = (1.0 / np.maximum(inv, 1e-3)).astype(np.float32)
    boxes = _boxes(scene)
    masks = _masks(scene)
    for idx in reversed(range(len(scene.objects))):  # farthest first
        obj = scene.objects[idx]
        x0, y0, side = boxes[idx]
        mask, (ax0, ay0, ax1, ay1) = _clip_mask(masks[idx], x0, y0, scene.width, scene.height)
        if mask is None:
            continue
        mask_image = Image.fromarray(mask.view(np.uint8) * np.uint8(255))
        image.paste(COLOURS[obj.colour], (ax0, ay0, ax1, ay1), mask_image)
        pattern = _pattern(obj.texture, side)
        if pattern is not None:
            both = pattern[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] & mask
            image.paste(_shade(COLOURS[obj.colour]), (ax0, ay0, ax1, ay1), Image.fromarray(both.view(np.uint8) * np.uint8(255)))
        if with_maps:
            class_map[ay0:ay1, ax0:ax1][mask] = 1 + CLASSES.index(obj.cls)
            depth[ay0:ay1, ax0:ax1][mask] = obj.depth_m
        if with_instances:
            instances[ay0:ay1, ax0:ax1][mask] = idx + 1
    return Rendered(image=image, class_map=class_map, depth_m=depth, instance_map=instances)
