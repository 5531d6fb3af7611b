"""Configs of the world commands (light: imported by ``--help``), with the default rates.

Fault, duplicate and size rates (per pool sample; every one is a ``qcap world`` flag):

- Download faults. Link rot dominates: img2dataset and DataComp users typically fetch 80–90 %
  of a pool's URLs a year or two after the crawl, the rest being mostly 404s and other HTTP
  errors, time-outs and non-image answers (HTML error or login pages served with status
  200). The defaults plant about 9 % failures: http_404 4 %, http_500 1 %, a transient 500
  1 %, stall 0.2 %, corrupt 0.4 %, truncated 0.4 %, not_image 1 %, decompression bomb
  0.05 %, sha256 mismatch 0.4 %, non-http(s) scheme 0.2 %, private/unspecified address 0.1 %.
- Duplicates: Webster et al. ("On the De-duplication of LAION-2B", arXiv 2303.12733) find
  about 30 % of LAION-2B's images duplicated, mostly near-duplicates (re-encoded, resized);
  the defaults plant 4 % exact (same bytes, other uid) and 6 % near duplicates, enough for a
  dedup stage to have real work without gutting a small pool.
- Sizes: of LAION-400M's 413M images only 211M (51 %) have both sides ≥ 256 px and 26M
  (6 %) have a side ≥ 1024 (LAION-400M release notes, Schuhmann et al. 2021); DataComp's basic
  filter drops a smaller side < 200 px and an aspect ratio > 3. Defaults: tiny (smaller side
  < 200 px) 25 %, wide or tall (aspect > 3) 3 %, large (a side ≥ 1024) 6 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from base.config import arg
from base.raykit import RAY_ADDRESS_HELP
from base.stage import PoolConfig

GENERATOR_VERSION = "1"
DEFAULT_BASE_URL = "http://127.0.0.1:8765"

# Faults in the order a sample's draw walks them; "none" takes the rest.
FAULTS: tuple[str, ...] = (
    "http_404", "http_500", "http_500_transient", "stall", "corrupt", "truncated", "not_image", "bomb",
    "sha_mismatch", "bad_scheme", "private_ip",
)
# Faults the server plays out on the wire (the file on disk is the good image), so a test can
# heal them at run time.
HEALABLE_FAULTS: tuple[str, ...] = ("http_500", "http_500_transient", "stall", "truncated")
# Faults with no file behind the URL. (private_ip URLs point at 0.0.0.0, i.e. this machine:
# their image exists, so a downloader whose address guard fails visibly succeeds.)
UNSERVED_FAULTS: tuple[str, ...] = ("http_404", "bad_scheme")
EVAL_TASKS: tuple[str, ...] = ("seg", "depth", "cls", "retrieval")


@dataclass(kw_only=True)
class WorldConfig:
    """Generate an embedded DataComp-style world: pool, truth, clean captions and eval sets."""

    STAGE: ClassVar[str] = "world"  # its name in dataset cards' lineage

    out: Path = arg(shapes_output=False, help="output folder of the world (W)", metavar="DIR")
    num_samples: int = arg(2000, help="pool size N (rows of pool.parquet)")
    seed: int = arg(0, help="world seed: the same arguments give byte-identical files")
    clean_samples: int = arg(1000, help="samples of the clean-caption split (the MSCOCO stand-in), disjoint from the pool")
    clean_captions: int = arg(5, help="human-quality captions per clean sample")
    clean_image_size: int = arg(256, help="longer side in pixels of clean-split images")
    eval_samples: int = arg(400, help="scenes per eval task (seg, depth, cls, retrieval)")
    eval_val_fraction: float = arg(0.25, help="share of each eval task's scenes in its validation split")
    eval_image_size: int = arg(128, help="side in pixels of the (square) eval images")
    seg_labels: Literal["shape", "colour"] = arg(
        "shape", help="what the seg set's class maps label an object's pixels with: its shape (ADE20k-style object "
                      "classes) or its colour (a target the captions name for every object)")
    colours: str | None = arg(
        None, help="the colours objects take, comma-separated (default all 11: red,orange,yellow,green,blue,purple,"
                   "pink,brown,black,white,grey); fewer leave the shapes more of what tells descriptions apart",
        metavar="LIST")
    backgrounds: str | None = arg(
        None, help="the backgrounds scenes stand on, comma-separated (default all 7: sky,grass,sand,wood,brick,studio,"
                   "night)", metavar="LIST")
    det_samples: int = arg(0, help="scenes of the detection set W/eval/det (COCO layout: boxes, RLE masks, categories; "
                           "its own seed stream, so every other file stays the same); 0 = none")
    base_url: str = arg(DEFAULT_BASE_URL, help="URL prefix written into pool.parquet; qcap serve listens on its port")
    noise: Literal["web", "harsh", "clean"] = arg("web", help="alt-text preset: web (realistic), harsh (worse), clean (good text)")
    text_mix: str | None = arg(None, help="override alt-text rates, e.g. 'partial=0.2,seo=0.1' (other kinds share the rest in preset proportions)")
    rate_http_404: float = arg(0.04, help="share of pool URLs that answer 404 (link rot)")
    rate_http_500: float = arg(0.01, help="share that always answer 500")
    rate_http_500_transient: float = arg(0.01, help="share that answer 500 for the first --transient-failures requests, then the image")
    rate_stall: float = arg(0.002, help="share that accept the connection and send nothing for --stall-seconds")
    rate_corrupt: float = arg(0.004, help="share served as undecodable bytes")
    rate_truncated: float = arg(0.004, help="share whose body is cut off at half of the announced Content-Length")
    rate_not_image: float = arg(0.01, help="share that answer 200 with an HTML page")
    rate_bomb: float = arg(0.0005, help="share served as a decompression bomb (small PNG, >400M pixels)")
    rate_sha_mismatch: float = arg(0.004, help="share whose metadata sha256 does not match the served bytes")
    rate_bad_scheme: float = arg(0.002, help="share with a file:// or ftp:// URL")
    rate_private_ip: float = arg(0.001, help="share whose URL host is a literal non-public address (0.0.0.0)")
    rate_exact_dup: float = arg(0.04, help="share that are byte-identical copies of another pool image")
    rate_near_dup: float = arg(0.06, help="share that are resized, re-encoded copies of another pool image")
    rate_tiny: float = arg(0.25, help="share with a smaller side under 200 px")
    rate_wide: float = arg(0.03, help="share with an aspect ratio over 3 (wide or tall)")
    rate_large: float = arg(0.06, help="share with a side of 1024 px or more")
    plant_each: int = arg(1, help="plant at least this many of every fault, duplicate kind and size kind (small worlds then exercise all)")
    transient_failures: int = arg(1, help="requests a http_500_transient URL fails before it serves the image")
    stall_seconds: float = arg(60.0, help="how long a stalled URL holds its connection (the server's shutdown cuts it short)")
    chunk_size: int = arg(500, help="samples per work unit (an image folder, a shard, a Parquet row group)")
    workers: int = arg(0, shapes_output=False, help="processes (0 = one per core); the output does not depend on it")
    ray_address: str | None = arg(None, shapes_output=False, help=RAY_ADDRESS_HELP + "; the output does not depend on it")
    preview: bool = arg(False, shapes_output=False, help="also write W/preview.png: a grid of pool samples, alt-text against truth")
    overwrite: bool = arg(False, shapes_output=False, help="replace an existing world in --out")

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("num_samples: must be >= 1")
        for name in ("clean_samples", "eval_samples", "det_samples", "plant_each", "transient_failures", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.clean_captions < 1:
            raise ValueError("clean_captions: must be >= 1")
        if self.chunk_size < 1:
            raise ValueError("chunk_size: must be >= 1")
        if not 0.0 <= self.eval_val_fraction < 1.0:
            raise ValueError("eval_val_fraction: must be in [0, 1)")
        if self.eval_image_size < 32 or self.clean_image_size < 32:
            raise ValueError("eval_image_size/clean_image_size: must be >= 32")
        if self.stall_seconds <= 0:
            raise ValueError("stall_seconds: must be > 0")
        if not (self.base_url.startswith("http://") or self.base_url.startswith("https://")):
            raise ValueError(f"base_url: must start with http:// or https://, got {self.base_url!r}")
        for name, value in self.fault_rates().items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"rate_{name}: must be in [0, 1]")
        if sum(self.fault_rates().values()) > 1.0:
            raise ValueError("rate_*: the fault rates sum to more than 1")
        if self.rate_exact_dup + self.rate_near_dup > 1.0:
            raise ValueError("rate_exact_dup + rate_near_dup: must be <= 1")
        if self.rate_tiny + self.rate_wide + self.rate_large > 1.0:
            raise ValueError("rate_tiny + rate_wide + rate_large: must be <= 1")
        from world.alttext import parse_text_mix, text_rates

        text_rates(self.noise, parse_text_mix(self.text_mix))  # raises ValueError naming text_mix
        self.palette()  # raises ValueError naming the unknown colour or background

    def palette(self):
        """The :class:`world.scenes.Palette` of ``--colours``/``--backgrounds``."""
        from world.scenes import Palette

        return Palette.parse(self.colours, self.backgrounds)

    def fault_rates(self) -> dict[str, float]:
        return {name: float(getattr(self, f"rate_{name}")) for name in FAULTS}

    def identity(self) -> dict:
        """Every field that changes the output (declared on the fields: not workers, ray_address,
        preview, overwrite or out).

        ``det_samples``, ``seg_labels``, ``colours`` and ``backgrounds`` appear only when not their
        defaults: a world without a detection set, with shape labels and every colour and background
        records exactly what it recorded before the options existed (world.json stays
        byte-identical). A palette is recorded canonically (the names in the generator's order)."""
        from base.config import output_settings

        data = output_settings(self)
        if not data["det_samples"]:
            data.pop("det_samples")
        if data["seg_labels"] == "shape":
            data.pop("seg_labels")
        spec = self.palette().spec()
        data.pop("colours"), data.pop("backgrounds")
        if spec is not None:
            data["colours"], data["backgrounds"] = ",".join(spec["colours"]), ",".join(spec["backgrounds"])
        return data


@dataclass(kw_only=True)
class ServeConfig:
    """Serve a world's pool images over loopback HTTP, faults included (Ctrl-C stops)."""

    world: Path = arg(help="world folder (holds world.json and images/)", positional=True)
    port: int | None = arg(None, help="port to listen on (default: the port of the world's base URL; 0 = any free port)")
    host: str = arg("127.0.0.1", help="loopback address to bind (anything else is refused)")
    stall_seconds: float | None = arg(None, help="override how long stalled URLs hang (default: world.json)")


@dataclass(kw_only=True)
class ScoreConfig(PoolConfig):
    """Score captions against a world's ground truth: objects, attributes, hallucinations."""

    STAGE: ClassVar[str] = "score-captions"  # its name in run records

    world: Path = arg(help="world folder (holds truth.parquet)", metavar="DIR")
    captions: Path = arg(help="Parquet of uid → caption(s) or a shard folder (text and/or syn_text)", metavar="FILE")
    field: str | None = arg(None, help="caption column(s) to score, comma-separated (default: every caption column found)")
    out: Path | None = arg(None, shapes_output=False, help="output folder for summary.json and per_caption.parquet (default: <captions>.scores)", metavar="DIR")
    limit: int | None = arg(None, help="score at most this many captions (a quick look; the shards are then scored here, in order)")


@dataclass(kw_only=True)
class DepthFloorConfig:
    """How well can any model predict the world's depth from its images? The error of the best per-pixel
    prediction (the posterior mean under the world's own depth priors, given each image's exact layout and
    depth order) beside a constant and a per-pixel-position prediction, on the eval depth set's validation split."""

    world: Path = arg(help="world folder (holds world.json and eval/depth)", metavar="DIR")
    out: Path | None = arg(None, help="output folder for depth_floor.json (default: <world>.depth-floor)", metavar="DIR")
    samples: int = arg(256, help="posterior draws kept per image (more: a steadier estimate)")
    seed: int = arg(0, help="seed of the posterior draws")

    def __post_init__(self) -> None:
        if self.samples < 8:
            raise ValueError(f"samples: need at least 8, got {self.samples}")
