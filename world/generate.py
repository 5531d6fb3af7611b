"""Generate a world: the pool (DataComp schema) with planted faults, its truth, clean and eval sets.

Layout of a world folder W (a contract: other stages and their tests read it)::

    W/world.json                 generator version, seed, every parameter and rate, counts
    W/pool.parquet               DataComp pool schema: uid, url, text, original_width, original_height,
                                 clip_b32_similarity_score, clip_l14_similarity_score (null),
                                 face_bboxes, sha256
    W/truth.parquet              one row per uid of every split (pool, clean, eval-*): objects,
                                 description, text_kind, fault, dup_of, is_exact_dup, ... (TRUTH_SCHEMA)
    W/images/{chunk:05d}/{uid}.{jpg|png}    what `qcap serve W` serves at base_url/images/...
    W/clean/                     shards: Sample.text = first caption, meta["captions"] = all
    W/eval/seg/{images,annotations}/{training,validation}/<id>.{jpg,png}, classes.json
    W/eval/depth/{images,depth}/{training,validation}/<id>.{jpg,png}   (uint16 mm, 0 = invalid)
    W/eval/cls/{train,val}/<class>/<id>.jpg, classnames.txt, templates.txt
    W/eval/retrieval/            shards: text = true description
    W/eval/det/annotations/instances_{train,val}.json, W/eval/det/{train,val}/<id>.jpg
                                 only with --det-samples: MS COCO's layout (boxes, RLE masks, categories)

Work is cut into chunks of ``chunk_size`` samples; each chunk is made by one process from
per-sample seeds alone (any sample can be re-made by itself), writes its images as it goes and
leaves its rows in ``W/.parts/``. The parent then streams the parts into ``pool.parquet`` and
``truth.parquet`` one row group per chunk, so memory stays flat in N, and writes
``world.json`` last: a world without it is unfinished, and the same command resumes it (done
chunks are skipped). Chunks are made by ``--workers`` local processes or, with
``--ray-address``, as tasks on a Ray cluster; the output depends on neither (nor on the order
chunks finish in), and neither is part of the world's identity.

Usage::

    qcap world --out runs/world --num-samples 20000
    python -c "from world.generate import generate_world; ..."
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image

from base.cli import UsageError
from base.shards import Sample, ShardWriter, atomic_write_bytes, atomic_write_json, finalize_folder
from world.alttext import alt_text, draw_kind, parse_text_mix, text_rates
from world.config import FAULTS, GENERATOR_VERSION, UNSERVED_FAULTS, WorldConfig
from world.describe import clean_captions, describe
from world.scenes import (
    CLASSES,
    COLOURS,
    SEG_BACKGROUND,
    SEG_IGNORE,
    STREAM_EXTRA,
    STREAM_PLAN,
    STREAM_SCENE,
    STREAM_TEXT,
    Scene,
    render,
    sample_rng,
    sample_scene,
    sample_uid,
)

log = logging.getLogger(__name__)

PARTS = ".parts"
WORLD_FILE = "world.json"
POOL_FILE = "pool.parquet"
TRUTH_FILE = "truth.parquet"
DUP_KINDS = ("exact_dup", "near_dup")
SIZE_KINDS = ("tiny", "wide", "large")
# (width, height) ratios of ordinary web images and how common each is
ASPECTS = ((1.0, 0.25), (4 / 3, 0.25), (3 / 2, 0.2), (16 / 9, 0.1), (3 / 4, 0.1), (2 / 3, 0.1))
CLS_TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "a drawing of a {}.", "a {} shape.", "an image of a {}.",
    "a photo of a small {}.", "a photo of a large {}.", "a {} on a background.",
)


# --------------------------------------------------------------------------------------------
# Schemas


def pool_schema():
    import pyarrow as pa

    return pa.schema([
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("clip_b32_similarity_score", pa.float64()),
        ("clip_l14_similarity_score", pa.float64()),
        ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
        ("sha256", pa.string()),
    ])


def object_type():
    import pyarrow as pa

    return pa.struct([
        ("cls", pa.string()), ("colour", pa.string()), ("size", pa.string()), ("texture", pa.string()),
        ("position", pa.string()), ("cx", pa.float32()), ("cy", pa.float32()), ("extent", pa.float32()),
        ("angle", pa.float32()), ("depth_m", pa.float32()), ("depth_rank", pa.int32()),
        ("group_count", pa.int32()), ("visible_fraction", pa.float32()),
    ])


def truth_schema():
    import pyarrow as pa

    return pa.schema([
        ("uid", pa.string()),
        ("split", pa.string()),  # pool | clean | eval-seg | eval-depth | eval-cls | eval-retrieval
        ("index", pa.int64()),  # position within the split
        ("path", pa.string()),  # file path relative to W (pool: the URL path under base_url)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("background", pa.string()),
        ("objects", pa.list_(object_type())),  # nearest first
        ("relations", pa.list_(pa.struct([("front", pa.int32()), ("back", pa.int32())]))),  # overlapping pairs
        ("num_objects", pa.int32()),
        ("description", pa.string()),  # the true description
        ("text", pa.string()),  # pool: the alt-text; clean: first caption; eval: the description
        ("text_kind", pa.string()),  # alt-text kind (alttext.TEXT_KINDS), "clean" or "description"
        ("lang", pa.string()),  # language the text was written in ("und": none)
        ("fault", pa.string()),  # "none" or one of config.FAULTS
        ("dup_of", pa.string()),  # uid of the original for exact/near duplicates
        ("is_exact_dup", pa.bool_()),
        ("is_near_dup", pa.bool_()),
        ("is_tiny", pa.bool_()),  # smaller side < 200 px
        ("is_wide", pa.bool_()),  # aspect ratio > 3 (either orientation)
        ("image_format", pa.string()),  # jpg | png of the good image
        ("served_sha256", pa.string()),  # sha256 of the file the server holds (null: nothing served)
    ])


# --------------------------------------------------------------------------------------------
# Per-sample plans (cheap: no drawing), so duplicates can name clean originals


@dataclass(slots=True)
class Plan:
    fault: str
    dup: str  # "", "exact_dup" or "near_dup"
    original: int  # pool index of the original for duplicates, else -1
    width: int
    height: int
    quality: int
    fmt: str
    text_kind: str


class Planner:
    """Draws every pool sample's plan from (seed, index) alone, plus the planted 'each kind' set."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        self.n = cfg.num_samples
        self.fault_rates = cfg.fault_rates()
        self.text_rates = text_rates(cfg.noise, parse_text_mix(cfg.text_mix))
        self.forced = forced_kinds(cfg)

    def _base(self, i: int) -> tuple[str, str, str]:
        """(fault, dup kind, size kind) of sample i before originals are resolved."""
        forced = self.forced.get(i)
        rng = sample_rng(self.cfg.seed, "pool", i, STREAM_PLAN)
        u_fault, u_dup, u_size = rng.random(3)
        fault, acc = "none", 0.0
        for name in FAULTS:
            acc += self.fault_rates[name]
            if u_fault < acc:
                fault = name
                break
        dup = ""
        if fault == "none":
            if u_dup < self.cfg.rate_exact_dup:
                dup = "exact_dup"
            elif u_dup < self.cfg.rate_exact_dup + self.cfg.rate_near_dup:
                dup = "near_dup"
        size = ""
        if u_size < self.cfg.rate_tiny:
            size = "tiny"
        elif u_size < self.cfg.rate_tiny + self.cfg.rate_wide:
            size = "wide"
        elif u_size < self.cfg.rate_tiny + self.cfg.rate_wide + self.cfg.rate_large:
            size = "large"
        if forced is not None:
            kind = forced
            if kind in FAULTS:
                fault, dup = kind, ""
            elif kind in DUP_KINDS:
                fault, dup = "none", kind
            else:
                size = kind
        return fault, dup, size

    def _is_clean_original(self, j: int) -> bool:
        if j in self.forced:
            return False
        fault, dup, _ = self._base(j)
        return fault == "none" and dup == ""

    def plan(self, i: int) -> Plan:
        fault, dup, size = self._base(i)
        rng = sample_rng(self.cfg.seed, "pool", i, STREAM_PLAN)
        rng.random(3)  # the draws _base used
        original = -1
        if dup:
            for _ in range(64):
                j = int(rng.integers(self.n))
                if j != i and self._is_clean_original(j):
                    original = j
                    break
            if original < 0:  # no clean original found (tiny pool): a plain sample instead
                dup = ""
        width, height = _web_size(rng, size)
        quality = int(rng.integers(70, 96))
        fmt = "png" if rng.random() < 0.03 else "jpg"
        text_kind = draw_kind(rng, self.text_rates)
        return Plan(fault, dup, original, width, height, quality, fmt, text_kind)


def forced_kinds(cfg: WorldConfig) -> dict[int, str]:
    """Pool indices planted with one kind each (``plant_each`` of every fault, dup and size kind)."""
    kinds = [k for k in FAULTS if cfg.fault_rates()[k] > 0]
    kinds += [k for k in DUP_KINDS if getattr(cfg, f"rate_{k}") > 0]
    kinds += [k for k in SIZE_KINDS if getattr(cfg, f"rate_{k}") > 0]
    need = len(kinds) * cfg.plant_each
    if need == 0:
        return {}
    # duplicates need clean originals: keep at least as many ordinary samples as planted ones
    if 2 * need > cfg.num_samples:
        raise ValueError(
            f"plant_each: planting {cfg.plant_each} of each of {len(kinds)} kinds needs num_samples >= {2 * need} "
            f"(got {cfg.num_samples}); raise --num-samples or set --plant-each 0"
        )
    rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0x504C414E])
    positions = rng.choice(cfg.num_samples, size=need, replace=False)
    return {int(p): kinds[k % len(kinds)] for k, p in enumerate(positions)}


def _web_size(rng: np.random.Generator, kind: str) -> tuple[int, int]:
    """A web image size for a size kind: '' (ordinary), tiny, wide or large."""
    ratio = ASPECTS[int(rng.choice(len(ASPECTS), p=[p for _, p in ASPECTS]))][0]
    if kind == "wide":
        ratio = float(rng.uniform(3.2, 6.0))
        long_side = float(rng.uniform(300, 1200))
        landscape = rng.random() < 0.75
        w, h = (long_side, long_side / ratio) if landscape else (long_side / ratio, long_side)
        return max(24, round(w)), max(24, round(h))
    if kind == "tiny":
        short = float(rng.uniform(40, 199))
    elif kind == "large":
        long_side = float(rng.uniform(1024, 1400))
        short = long_side / max(ratio, 1 / ratio)
    else:
        # log-uniform 240..720 px: LAION-400M has only 16 % of images with both sides >= 512
        long_side = float(10 ** rng.uniform(np.log10(240), np.log10(720)))
        short = max(200.0, long_side / max(ratio, 1 / ratio))
    long_side = short * max(ratio, 1 / ratio)
    if kind == "tiny":
        long_side = min(long_side, 199 * 1.5)
    w, h = (long_side, short) if ratio >= 1 else (short, long_side)
    w, h = min(round(w), 1999), min(round(h), 1999)
    if kind == "":  # an ordinary image keeps its smaller side >= 200 and both sides < 1024
        w, h = min(max(w, 200), 1023), min(max(h, 200), 1023)
    return int(w), int(h)


# --------------------------------------------------------------------------------------------
# Bytes


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    """Fixed encoder settings, so the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=int(quality), subsampling=2, optimize=False, progressive=False)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _corrupt(data: bytes, rng: np.random.Generator) -> bytes:
    """A JPEG signature followed by noise: looks like a JPEG, decodes to nothing."""
    return data[:3] + rng.bytes(max(len(data) - 3, 64))


BOMB_SIZE = (21000, 20500)  # 430.5M pixels: over PIL's 179M-pixel bomb limit and any sane bound


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@lru_cache(maxsize=1)
def _bomb_base() -> bytes:
    """A one-bit all-black PNG of BOMB_SIZE: about 50 kB on disk, 430M pixels decoded.

    Written chunk by chunk with zlib, streaming identical rows, because drawing it with PIL
    would first allocate the whole 54 MB bitmap.
    """
    width, height = BOMB_SIZE
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    block = row * 256
    data = [compressor.compress(block) for _ in range(height // 256)]
    data.append(compressor.compress(row * (height % 256)))
    data.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(data)) + _png_chunk(b"IEND", b"")


def _bomb(uid: str) -> bytes:
    """The bomb with a tEXt chunk naming the sample, so no two bombs share bytes."""
    base = _bomb_base()
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length and type, IHDR data, CRC
    return base[:ihdr_end] + _png_chunk(b"tEXt", b"qcap-uid\x00" + uid.encode()) + base[ihdr_end:]


def _html(uid: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Page not found</title></head>\n"
        f"<body><h1>Sorry, this image is no longer available</h1><p>Reference {uid}.</p>"
        "<p><a href=\"/\">Back to the home page</a></p></body></html>\n"
    ).encode()


def _write(path: Path, data: bytes) -> None:
    """Write one image file. Not atomic on purpose (a rename per image costs more than the
    image on some file systems): a chunk interrupted mid-way has no part file, so a re-run
    makes the whole chunk again and overwrites whatever was half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _object_rows(scene: Scene) -> list[dict]:
    return [
        {
            "cls": o.cls, "colour": o.colour, "size": o.size, "texture": o.texture, "position": o.position,
            "cx": o.cx, "cy": o.cy, "extent": o.extent, "angle": o.angle, "depth_m": o.depth_m,
            "depth_rank": o.depth_rank, "group_count": o.group_count, "visible_fraction": o.visible_fraction,
        }
        for o in scene.objects
    ]


def _truth_row(uid, split, index, path, scene: Scene, width, height, *, description: str | None = None, **extra) -> dict:
    """A truth.parquet row; ``description`` when the caller already has ``describe(scene)``."""
    row = {
        "uid": uid, "split": split, "index": index, "path": path, "width": int(width), "height": int(height),
        "background": scene.background, "objects": _object_rows(scene),
        "relations": [{"front": a, "back": b} for a, b in scene.relations], "num_objects": len(scene.objects),
        "description": describe(scene) if description is None else description, "text": None, "text_kind": None, "lang": "en", "fault": "none",
        "dup_of": None, "is_exact_dup": False, "is_near_dup": False,
        "is_tiny": min(width, height) < 200, "is_wide": max(width, height) > 3 * min(width, height),
        "image_format": "jpg", "served_sha256": None,
    }
    row.update(extra)
    return row


# --------------------------------------------------------------------------------------------
# Pool chunks


class PoolMaker:
    def __init__(self, cfg: WorldConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.planner = Planner(cfg)
        self.base_url = cfg.base_url.rstrip("/")
        self.palette = cfg.palette()

    def scene_of(self, i: int, plan: Plan | None = None) -> tuple[Scene, Plan]:
        """Sample i's scene as drawn at its own size (a duplicate: its original's)."""
        plan = plan or self.planner.plan(i)
        if plan.dup:
            scene, _ = self.scene_of(plan.original)
            return scene, plan
        rng = sample_rng(self.cfg.seed, "pool", i, STREAM_SCENE)
        scene = sample_scene(rng, plan.width, plan.height, palette=self.palette)
        scene.quality, scene.fmt = plan.quality, plan.fmt
        return scene, plan

    def image_of(self, i: int) -> tuple[Scene, Plan, bytes, int, int, str]:
        """(scene, plan, good image bytes, width, height, format) of pool sample i."""
        plan = self.planner.plan(i)
        if plan.dup == "exact_dup":
            orig_scene, _, orig_bytes, w, h, fmt = self.image_of(plan.original)
            return orig_scene, plan, orig_bytes, w, h, fmt
        if plan.dup == "near_dup":
            orig_scene, _ = self.scene_of(plan.original)
            rng = sample_rng(self.cfg.seed, "pool", i, STREAM_EXTRA)
            factor = float(rng.uniform(0.5, 0.9))
            nw, nh = max(16, round(orig_scene.width * factor)), max(16, round(orig_scene.height * factor))
            image = render(orig_scene).image.resize((nw, nh), Image.Resampling.BILINEAR)
            return orig_scene, plan, encode(image, "jpg", int(rng.integers(55, 81))), nw, nh, "jpg"
        scene, _ = self.scene_of(i, plan)
        data = encode(render(scene).image, scene.fmt, scene.quality)
        return scene, plan, data, scene.width, scene.height, scene.fmt

    def make_chunk(self, chunk: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        start = chunk * self.cfg.chunk_size
        stop = min(self.cfg.num_samples, start + self.cfg.chunk_size)
        folder = self.out / "images" / f"{chunk:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        pool_rows, truth_rows = [], []
        for i in range(start, stop):
            pool_row, truth_row = self._sample(i, chunk, folder)
            pool_rows.append(pool_row)
            truth_rows.append(truth_row)
        parts = self.out / PARTS
        for name, rows, schema in (("pool", pool_rows, pool_schema()), ("truth-pool", truth_rows, truth_schema())):
            sink = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
            atomic_write_bytes(parts / f"{name}-{chunk:05d}.parquet", sink.getvalue())

    def _sample(self, i: int, chunk: int, folder: Path) -> tuple[dict, dict]:
        uid = sample_uid(self.cfg.seed, "pool", i)
        scene, plan, good, width, height, fmt = self.image_of(i)
        text_rng = sample_rng(self.cfg.seed, "pool", i, STREAM_TEXT)
        other = None
        if plan.text_kind == "mismatch":
            k = int(text_rng.integers(self.cfg.num_samples - 1)) if self.cfg.num_samples > 1 else 0
            k = k + 1 if k >= i and self.cfg.num_samples > 1 else k
            other, _ = self.scene_of(k)
        text, lang = alt_text(plan.text_kind, scene, text_rng, other, colours=self.palette.colours)

        fault = plan.fault
        ext = "png" if fault == "bomb" else fmt
        rel = f"images/{chunk:05d}/{uid}.{ext}"
        url = f"{self.base_url}/{rel}"
        extra_rng = sample_rng(self.cfg.seed, "pool", i, STREAM_EXTRA)
        served: bytes | None = good
        if fault == "corrupt":
            served = _corrupt(good, extra_rng)
        elif fault == "not_image":
            served = _html(uid)
        elif fault == "bomb":
            served = _bomb(uid)
        elif fault in UNSERVED_FAULTS:
            served = None
        if fault == "bad_scheme":
            url = "file:///etc/passwd" if i % 2 == 0 else f"ftp://127.0.0.1/{rel}"
        elif fault == "private_ip":  # 0.0.0.0 reaches this machine: a guard must refuse it, not us
            base = urlsplit(self.base_url)
            url = urlunsplit(("http", f"0.0.0.0:{base.port or 80}", f"{base.path}/{rel}", "", ""))
        if served is not None:
            _write(folder / f"{uid}.{ext}", served)
        meta_sha = sha256(served if served is not None else good)
        if fault == "sha_mismatch":
            meta_sha = sha256(good + b"\x00stale")  # the image changed since the metadata was collected
        pool_row = {
            "uid": uid, "url": url, "text": text, "original_width": width, "original_height": height,
            "clip_b32_similarity_score": None, "clip_l14_similarity_score": None, "face_bboxes": [],
            "sha256": meta_sha,
        }
        truth_row = _truth_row(
            uid, "pool", i, rel, scene, width, height, text=text, text_kind=plan.text_kind, lang=lang, fault=fault,
            dup_of=sample_uid(self.cfg.seed, "pool", plan.original) if plan.dup else None,
            is_exact_dup=plan.dup == "exact_dup", is_near_dup=plan.dup == "near_dup", image_format=fmt,
            served_sha256=sha256(served) if served is not None else None,
        )
        return pool_row, truth_row


# --------------------------------------------------------------------------------------------
# Clean and eval chunks


def _square_scene(seed: int, split: str, index: int, size: int, **kwargs) -> Scene:
    return sample_scene(sample_rng(seed, split, index, STREAM_SCENE), size, size, **kwargs)


def make_clean_chunk(cfg: WorldConfig, out: Path, chunk: int) -> None:
    start = chunk * cfg.chunk_size
    stop = min(cfg.clean_samples, start + cfg.chunk_size)
    palette = cfg.palette()
    rows = []
    with ShardWriter(out / "clean", chunk) as writer:
        for i in range(start, stop):
            rng = sample_rng(cfg.seed, "clean", i, STREAM_PLAN)
            ratio = (1.0, 4 / 3, 3 / 4, 3 / 2)[int(rng.integers(4))]
            long_side = cfg.clean_image_size
            w, h = (long_side, round(long_side / ratio)) if ratio >= 1 else (round(long_side * ratio), long_side)
            scene = sample_scene(sample_rng(cfg.seed, "clean", i, STREAM_SCENE), w, h, palette=palette)
            captions = clean_captions(scene, sample_rng(cfg.seed, "clean", i, STREAM_TEXT), cfg.clean_captions)
            uid = sample_uid(cfg.seed, "clean", i)
            data = encode(render(scene).image, "jpg", 90)
            writer.write(Sample(
                key=f"{i:09d}", uid=uid, image=data, text=captions[0],
                meta={"captions": captions, "width": w, "height": h, "split": "clean", "sha256": sha256(data)},
            ))
            rows.append(_truth_row(
                uid, "clean", i, f"clean/{chunk:05d}.tar#{i:09d}", scene, w, h, text=captions[0], text_kind="clean",
                served_sha256=sha256(data),
            ))
    _write_truth_part(out, f"truth-clean-{chunk:05d}", rows)


def _write_truth_part(out: Path, name: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=truth_schema()), sink)
    atomic_write_bytes(out / PARTS / f"{name}.parquet", sink.getvalue())


def _eval_split(cfg: WorldConfig, index: int) -> bool:
    """True when eval scene ``index`` is in the validation split (the last share of the scenes)."""
    return index >= cfg.eval_samples - round(cfg.eval_samples * cfg.eval_val_fraction)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def make_eval_chunk(cfg: WorldConfig, out: Path, task: str, chunk: int) -> None:
    start = chunk * cfg.chunk_size
    stop = min(cfg.eval_samples, start + cfg.chunk_size)
    split = f"eval-{task}"
    size = cfg.eval_image_size
    palette = cfg.palette()
    rows = []
    # the retrieval task writes shards (closed whole, or aborted on an error); the others write files
    shard = ShardWriter(out / "eval" / "retrieval", chunk) if task == "retrieval" else contextlib.nullcontext()
    with shard as writer:
        for i in range(start, stop):
            uid = sample_uid(cfg.seed, split, i)
            val = _eval_split(cfg, i)
            if task == "cls":
                cls = CLASSES[i % len(CLASSES)]
                scene = _square_scene(cfg.seed, split, i, size, num_objects=1, classes=(cls,), palette=palette)
            else:
                scene = _square_scene(cfg.seed, split, i, size, palette=palette)
            colour_labels = task == "seg" and cfg.seg_labels == "colour"
            rendered = render(scene, with_maps=task in ("seg", "depth"), with_instances=colour_labels)
            jpeg = encode(rendered.image, "jpg", 95)
            description = describe(scene)
            name = f"{task}_{i:06d}"
            if task in ("seg", "depth"):
                sub = "validation" if val else "training"
                root = out / "eval" / task
                rel = f"eval/{task}/images/{sub}/{name}.jpg"
                _write(out / rel, jpeg)
                if task == "seg":
                    labels = colour_class_map(scene, rendered.instance_map) if colour_labels else rendered.class_map
                    _write(root / "annotations" / sub / f"{name}.png", _png(labels))
                else:
                    _write(root / "depth" / sub / f"{name}.png", _png(depth_png_array(rendered)))
            elif task == "cls":
                rel = f"eval/cls/{'val' if val else 'train'}/{scene.objects[0].cls}/{name}.jpg"
                _write(out / rel, jpeg)
            else:
                rel = f"eval/retrieval/{chunk:05d}.tar#{i:09d}"
                writer.write(Sample(
                    key=f"{i:09d}", uid=uid, image=jpeg, text=description,
                    meta={"captions": [description], "width": size, "height": size, "split": split, "sha256": sha256(jpeg)},
                ))
            rows.append(_truth_row(
                uid, split, i, rel, scene, size, size, description=description, text=description, text_kind="description",
                served_sha256=sha256(jpeg),
            ))
    _write_truth_part(out, f"truth-{split}-{chunk:05d}", rows)


def colour_class_map(scene: Scene, instance_map: np.ndarray) -> np.ndarray:
    """The seg class map by colour: 0 background, 1 + COLOURS index where an object is seen."""
    colours = list(COLOURS)
    labels = np.full(instance_map.shape, SEG_BACKGROUND, dtype=np.uint8)
    for k, obj in enumerate(scene.objects):
        labels[instance_map == k + 1] = 1 + colours.index(obj.colour)
    return labels


def seg_class_names(seg_labels: str) -> list[str]:
    """The seg set's classes.json names by index: the background, then shapes or colours."""
    return ["background", *(CLASSES if seg_labels == "shape" else COLOURS)]


DET_PART = "det-{chunk:05d}.json"  # a chunk's COCO images and annotations, merged by _write_det_annotations


def _det_split(cfg: WorldConfig, index: int) -> bool:
    """True when detection scene ``index`` is in the validation split (the last share)."""
    return index >= cfg.det_samples - round(cfg.det_samples * cfg.eval_val_fraction)


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a binary H×W mask: run lengths in column-major order, starting
    with the background run (pycocotools reads it as ``{"size": [h, w], "counts": [...]}``)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def det_annotations(scene: Scene, instance_map: np.ndarray, image_id: int) -> list[dict]:
    """COCO annotations of a scene's objects as seen: each object's visible pixels (nearer objects
    hide it) as its RLE mask, their tight box and area; category id = 1 + class index (the seg
    map's value). Objects with no visible pixel are left out."""
    anns = []
    for k, obj in enumerate(scene.objects):
        mask = instance_map == k + 1
        area = int(mask.sum())
        if not area:
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x0, y0 = int(cols[0]), int(rows[0])
        anns.append({
            "id": image_id * 16 + k + 1, "image_id": image_id, "category_id": 1 + CLASSES.index(obj.cls),
            "bbox": [x0, y0, int(cols[-1]) - x0 + 1, int(rows[-1]) - y0 + 1], "area": area, "iscrowd": 0,
            "segmentation": rle_encode(mask), "depth_rank": obj.depth_rank, "colour": obj.colour,
        })
    return anns


def make_det_chunk(cfg: WorldConfig, out: Path, chunk: int) -> None:
    """Detection scenes ``chunk``: images, their COCO entries (a part file) and truth rows."""
    start = chunk * cfg.chunk_size
    stop = min(cfg.det_samples, start + cfg.chunk_size)
    split = "eval-det"
    size = cfg.eval_image_size
    palette = cfg.palette()
    rows, images, annotations = [], {"train": [], "val": []}, {"train": [], "val": []}
    for i in range(start, stop):
        uid = sample_uid(cfg.seed, split, i)
        sub = "val" if _det_split(cfg, i) else "train"
        scene = _square_scene(cfg.seed, split, i, size, palette=palette)
        rendered = render(scene, with_instances=True)
        jpeg = encode(rendered.image, "jpg", 95)
        name = f"det_{i:06d}.jpg"
        rel = f"eval/det/{sub}/{name}"
        _write(out / rel, jpeg)
        images[sub].append({"id": i, "file_name": name, "width": size, "height": size})
        annotations[sub] += det_annotations(scene, rendered.instance_map, i)
        description = describe(scene)
        rows.append(_truth_row(uid, split, i, rel, scene, size, size, description=description, text=description,
                               text_kind="description", served_sha256=sha256(jpeg)))
    atomic_write_bytes(out / PARTS / DET_PART.format(chunk=chunk), _compact_json({"images": images, "annotations": annotations}))
    _write_truth_part(out, f"truth-{split}-{chunk:05d}", rows)


def _write_det_annotations(cfg: WorldConfig, out: Path, jobs: list) -> None:
    """Merge the chunks' parts into ``eval/det/annotations/instances_{train,val}.json``."""
    categories = [{"id": 1 + k, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    merged: dict[str, dict[str, list]] = {sub: {"images": [], "annotations": []} for sub in ("train", "val")}
    for job in jobs:
        if job.kind == "eval" and job.task == "det":
            part = json.loads((out / PARTS / DET_PART.format(chunk=job.chunk)).read_text())
            for sub in merged:
                merged[sub]["images"] += part["images"][sub]
                merged[sub]["annotations"] += part["annotations"][sub]
    for sub, data in merged.items():
        (out / "eval" / "det" / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "eval" / "det" / "annotations" / f"instances_{sub}.json", _compact_json({
            "info": {"description": "qcap world detection set", "version": GENERATOR_VERSION, "seed": cfg.seed},
            "licenses": [], "categories": categories, **data,
        }))


def _compact_json(obj) -> bytes:
    """One line, as COCO's own files (RLE counts would take a line each when indented)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def depth_png_array(rendered) -> np.ndarray:
    """Depth in uint16 millimetres, NYUv2-style; 0 (invalid) along object outlines, where a
    structured-light sensor loses the depth edge."""
    depth_mm = np.clip(np.round(rendered.depth_m * 1000.0), 1, 65535).astype(np.uint16)
    cmap = rendered.class_map
    edge = np.zeros(cmap.shape, dtype=bool)
    edge[:, 1:] |= cmap[:, 1:] != cmap[:, :-1]
    edge[1:, :] |= cmap[1:, :] != cmap[:-1, :]
    depth_mm[edge] = 0
    return depth_mm


# --------------------------------------------------------------------------------------------
# Orchestration


@dataclass(slots=True)
class Job:
    kind: str  # pool | clean | eval
    chunk: int
    task: str = ""

    @property
    def part(self) -> str:
        if self.kind == "pool":
            return f"truth-pool-{self.chunk:05d}"
        if self.kind == "clean":
            return f"truth-clean-{self.chunk:05d}"
        return f"truth-eval-{self.task}-{self.chunk:05d}"


def jobs_of(cfg: WorldConfig) -> list[Job]:
    def chunks(n: int) -> range:
        return range((n + cfg.chunk_size - 1) // cfg.chunk_size)

    jobs = [Job("pool", c) for c in chunks(cfg.num_samples)]
    jobs += [Job("clean", c) for c in chunks(cfg.clean_samples)]
    for task in ("seg", "depth", "cls", "retrieval"):
        jobs += [Job("eval", c, task) for c in chunks(cfg.eval_samples)]
    jobs += [Job("eval", c, "det") for c in chunks(cfg.det_samples)]  # after the others: their order is unchanged
    return jobs


def run_job(cfg: WorldConfig, out: Path, job: Job) -> str:
    if job.kind == "pool":
        PoolMaker(cfg, out).make_chunk(job.chunk)
    elif job.kind == "clean":
        make_clean_chunk(cfg, out, job.chunk)
    elif job.task == "det":
        make_det_chunk(cfg, out, job.chunk)
    else:
        make_eval_chunk(cfg, out, job.task, job.chunk)
    return job.part


def _worker(args: tuple[dict, str, Job]) -> str:
    from base.config import from_dict

    cfg_dict, out, job = args
    cfg = from_dict(WorldConfig, cfg_dict)
    return run_job(cfg, Path(out), job)


# What a world writes in W, and so all that --overwrite removes: these names at the top of W
# (images/, clean/, eval/ and .parts/ are the world's own folders, made whole by it); any other
# file or folder in W is the user's and stays.
GENERATED = ("world.json", "pool.parquet", "truth.parquet", "images", "clean", "eval", PARTS, "preview.png")


def _remove_generated(out: Path) -> None:
    """Remove the world's own entries (:data:`GENERATED`) from ``out``; a symlink under one of
    those names is unlinked, never followed."""
    for name in GENERATED:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or path.exists():
            path.unlink()
    for path in out.glob(".*.tmp*"):  # temporaries: _stream's .pool.parquet.tmp, atomic_write_*'s .world.json.tmp-ID
        if path.name[1:].partition(".tmp")[0] in GENERATED and path.is_file() and not path.is_symlink():
            path.unlink()


def _prepare(cfg: WorldConfig, out: Path) -> bool:
    """Check ``out``; returns True when the world there is already complete and identical.

    A folder holding a world made with other parameters (finished or not) is refused with a
    UsageError, like every stage's output folder, unless ``--overwrite``, which removes only
    the world's own entries (:data:`GENERATED`)."""
    from base.stage import read_record, refuse_mismatch

    identity = {"generator": "qcap-world", "version": GENERATOR_VERSION, "config": cfg.identity()}
    world_file = out / WORLD_FILE
    if cfg.overwrite:
        _remove_generated(out)
    if world_file.exists():
        existing = read_record(world_file)
        recorded = {k: existing.get(k) for k in identity}
        if recorded != identity:
            refuse_mismatch(out, "world", recorded, identity)
        if (out / PARTS).exists():  # killed after world.json, before the parts were removed
            shutil.rmtree(out / PARTS)
        return True
    parts = out / PARTS
    stamp = parts / "identity.json"
    if stamp.exists():
        recorded = read_record(stamp)
        if recorded != identity:
            refuse_mismatch(out, "world (unfinished)", recorded, identity)
    else:
        if out.exists() and any(p.name in GENERATED for p in out.iterdir()):
            raise UsageError(f"{out}: holds world files but no {PARTS}/identity.json; pass --overwrite to replace them")
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stamp, identity)
    return False


def generate_world(cfg: WorldConfig, *, progress: bool = True) -> dict:
    """Make (or finish) the world described by ``cfg``; returns the contents of world.json."""
    from base.stage import make_folder

    out = make_folder(cfg.out, "the world")
    if _prepare(cfg, out):
        log.info("%s: world already complete", out)
        return json.loads((out / WORLD_FILE).read_text())
    jobs = jobs_of(cfg)
    todo = [j for j in jobs if not (out / PARTS / f"{j.part}.parquet").exists()]
    if len(todo) < len(jobs):
        log.info("%s: resuming, %d of %d chunks already made", out, len(jobs) - len(todo), len(jobs))
    workers = cfg.workers or (os.cpu_count() or 1)
    _run(cfg, out, todo, workers, progress)
    info = _assemble(cfg, out, jobs)
    if cfg.preview:
        from world.preview import write_preview

        write_preview(out)
    return info


def _run(cfg: WorldConfig, out: Path, todo: list[Job], workers: int, progress: bool) -> None:
    """Make the chunks of ``todo``: in this process, on ``workers`` local (spawned) processes or
    as tasks on the Ray cluster at ``cfg.ray_address`` (:mod:`base.workers`). Every chunk is
    made from per-sample seeds alone and written under its own names, and the parts are merged
    in job order (:func:`_assemble`), so neither the pool nor the completion order changes a
    byte; a chunk lost with its worker or node is made again by the retry."""
    from dataclasses import replace

    from base.config import to_dict
    from base.stage import run_pool

    cfg_dict = to_dict(replace(cfg, workers=1, ray_address=None, preview=False, overwrite=False))
    tasks = [(cfg_dict, os.path.abspath(out), job) for job in todo]  # a Ray worker's working folder is not ours
    # a local pool forks where it can: workers need no re-import of the caller's __main__ (spawn would
    # re-run an unguarded script), and the driver runs no threads of its own here
    run_pool(_worker, tasks, num_workers=workers, ray_address=cfg.ray_address, total=len(todo), desc="world chunks",
             unit="chunk", progress=progress, start_method="fork")


def _assemble(cfg: WorldConfig, out: Path, jobs: list[Job]) -> dict:
    """Stream the parts into pool.parquet and truth.parquet, write the eval metadata and
    world.json (last), and remove the parts."""
    parts = out / PARTS
    counts: dict[str, Counter] = {"splits": Counter(), "faults": Counter(), "text_kinds": Counter(), "pool_flags": Counter()}

    def count(table) -> None:
        data = table.select(["split", "fault", "text_kind", "is_exact_dup", "is_near_dup", "is_tiny", "is_wide"]).to_pydict()
        counts["splits"].update(data["split"])
        for k, split in enumerate(data["split"]):
            if split != "pool":
                continue
            counts["faults"][data["fault"][k]] += 1
            counts["text_kinds"][data["text_kind"][k]] += 1
            for flag in ("is_exact_dup", "is_near_dup", "is_tiny", "is_wide"):
                counts["pool_flags"][flag] += int(data[flag][k])

    _stream(out / POOL_FILE, pool_schema(), [parts / f"pool-{j.chunk:05d}.parquet" for j in jobs if j.kind == "pool"])
    _stream(out / TRUTH_FILE, truth_schema(), [parts / f"{j.part}.parquet" for j in jobs], each=count)
    if cfg.clean_samples:
        finalize_folder(out / "clean")
    if cfg.eval_samples:
        finalize_folder(out / "eval" / "retrieval")
        _write_eval_metadata(out, cfg.seg_labels)
    if cfg.det_samples:
        _write_det_annotations(cfg, out, jobs)
    info = {
        "generator": "qcap-world",
        "version": GENERATOR_VERSION,
        "config": cfg.identity(),
        "seed": cfg.seed,
        "base_url": cfg.base_url.rstrip("/"),
        "text_rates": text_rates(cfg.noise, parse_text_mix(cfg.text_mix)),
        "fault_rates": cfg.fault_rates(),
        "dup_rates": {k: getattr(cfg, f"rate_{k}") for k in DUP_KINDS},
        "size_rates": {k: getattr(cfg, f"rate_{k}") for k in SIZE_KINDS},
        "planted": dict(sorted(Counter(forced_kinds(cfg).values()).items())),
        "transient_failures": cfg.transient_failures,
        "stall_seconds": cfg.stall_seconds,
        "counts": {
            "splits": dict(sorted(counts["splits"].items())),
            "pool_faults": dict(sorted(counts["faults"].items())),
            "pool_text_kinds": dict(sorted(counts["text_kinds"].items())),
            "pool_flags": {k: counts["pool_flags"][k] for k in ("is_exact_dup", "is_near_dup", "is_tiny", "is_wide")},
        },
        "files": {
            "pool": POOL_FILE, "truth": TRUTH_FILE, "images": "images/", "clean": "clean/",
            "seg": "eval/seg/", "depth": "eval/depth/", "cls": "eval/cls/", "retrieval": "eval/retrieval/",
        } | ({"det": "eval/det/"} if cfg.det_samples else {}),
    }
    atomic_write_json(out / WORLD_FILE, info)
    shutil.rmtree(parts)
    return info


def _stream(target: Path, schema, sources: list[Path], each=None) -> None:
    """Concatenate Parquet parts into one file, one row group per part, atomically;
    ``each(table)`` sees every part as it passes (counts without a second read)."""
    import pyarrow.parquet as pq

    tmp = target.with_name(f".{target.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for source in sources:
            table = pq.read_table(source, schema=schema)
            if each is not None:
                each(table)
            if table.num_rows:
                writer.write_table(table)
    os.replace(tmp, target)


def _write_eval_metadata(out: Path, seg_labels: str = "shape") -> None:
    seg = out / "eval" / "seg"
    seg.mkdir(parents=True, exist_ok=True)
    names = seg_class_names(seg_labels)
    atomic_write_json(seg / "classes.json", {
        "classes": names,
        "background_index": SEG_BACKGROUND,
        "ignore_index": SEG_IGNORE,
        "num_classes": len(names),
        "note": "annotation PNGs hold uint8 class indices into 'classes'; 0 is the background (a real class here), "
        "255 is reserved for ignore and never drawn",
    })
    depth = out / "eval" / "depth"
    depth.mkdir(parents=True, exist_ok=True)
    atomic_write_json(depth / "depth.json", {
        "format": "uint16 PNG, millimetres", "invalid_value": 0, "scale_to_metres": 0.001,
        "note": "0 marks invalid pixels (object outlines, as on a structured-light sensor)",
    })
    cls = out / "eval" / "cls"
    cls.mkdir(parents=True, exist_ok=True)
    names = sorted(CLASSES)
    atomic_write_bytes(cls / "classnames.txt", ("\n".join(names) + "\n").encode())
    atomic_write_bytes(cls / "templates.txt", ("\n".join(CLS_TEMPLATES) + "\n").encode())
    for sub in ("train", "val"):  # every class folder exists, so ImageFolder's label order is fixed
        for name in names:
            (cls / sub / name).mkdir(parents=True, exist_ok=True)
