"""Configs of the filter commands (light: ``qcap filter <name> --help`` imports only this).

Every filter shares :class:`FilterConfig` (input shards, output uid file, an optional subset to
start from); each adds its own thresholds. Defaults are DataComp's numbers; the module of each
filter says where they come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from base.config import arg
from base.stage import PoolConfig  # --num-workers, --ray-address: where the shard tasks run


@dataclass(kw_only=True)
class FilterConfig:
    """Fields every filter shares."""

    shards: str = arg(help="raw shards: a folder, brace pattern or glob (tar + Parquet of all samples)", metavar="RAW")
    out: Path = arg(shapes_output=False, help="output uid file (DataComp .npy); the report is written beside it", metavar="UIDS.npy")
    subset: Path | None = arg(None, help="start from this uid file: samples outside it are dropped as outside_subset (chains filters)", metavar="UIDS.npy")
    histograms: bool = arg(True, shapes_output=False, help="write the report's PNG histograms (matplotlib)")
    preview: bool = arg(True, shapes_output=False, help="write the report's preview.html: the histograms and sample images kept and dropped by each reason")
    progress: bool = arg(True, shapes_output=False, help="show progress bars")

    def __post_init__(self) -> None:
        if self.out.suffix != ".npy":
            raise ValueError(f"out: {self.out} must end in .npy (DataComp's uid file format)")


@dataclass(kw_only=True)
class BasicConfig(FilterConfig, PoolConfig):
    """DataComp's basic filter: English caption (fastText lid.176), more than 2 words and 5 characters,
    shorter image side >= 200 px, aspect ratio <= 3 (from the pool's original_width/height)."""

    language: str = arg("en", help="keep captions whose top lid.176 label is this language ('' = no language check)")
    min_language_score: float = arg(0.0, help="and whose lid.176 probability is at least this (DataComp: 0, the top label alone decides)")
    min_words: int = arg(3, help="keep captions with at least this many whitespace-separated words (DataComp: more than 2)")
    min_chars: int = arg(6, help="keep captions with at least this many characters (DataComp: more than 5)")
    min_image_side: int = arg(200, help="keep images whose shorter side is at least this many pixels (DataComp: 200)")
    max_aspect_ratio: float = arg(3.0, help="keep images whose longer/shorter side ratio is at most this (DataComp: 3)")
    text_column: str | None = arg(None, help="caption column of the shards' Parquet (default: 'text', else 'caption')")
    width_column: str = arg("original_width", help="Parquet column with the image width before any resize")
    height_column: str = arg("original_height", help="Parquet column with the image height before any resize")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be at least 1, got {self.num_workers}")
        if not 0.0 <= self.min_language_score <= 1.0:
            raise ValueError("min_language_score: must be in [0, 1]")
        for name in ("min_words", "min_chars", "min_image_side"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.max_aspect_ratio < 1.0:
            raise ValueError("max_aspect_ratio: must be >= 1 (longer side over shorter side)")


@dataclass(kw_only=True)
class ClipScoreConfig(FilterConfig):
    """CLIP-score filter: cosine similarity of image and caption embeddings from any open_clip model;
    keep the top fraction (DataComp: 30% by L/14) or every sample at or above a threshold (B/32: 0.25)."""

    model: str | None = arg(None, help="open_clip model name (e.g. ViT-B-32, qcap-tiny-clip); optional with a checkpoint folder")
    pretrained: str | None = arg(None, help="open_clip pretrained tag or weights file (e.g. datacomp_xl_s13b_b90k)")
    checkpoint: Path | None = arg(None, help="a qcap checkpoint folder, training run or weights file")
    top_fraction: float | None = arg(None, help="keep this fraction of the scored samples, best first (DataComp: 0.3)")
    threshold: float | None = arg(None, help="keep samples whose score is at least this (DataComp B/32: 0.25; LAION: 0.28)")
    scores: Path | None = arg(None, shapes_output=False, help="scores Parquet (uid -> score) to write, or to reuse when it exists (default: OUT.scores.parquet)")
    rescore: bool = arg(False, shapes_output=False, help="recompute the scores even if the scores Parquet or finished parts exist")
    text_column: str | None = arg(None, help="caption column (default: the shard's KEY.txt caption)")
    batch_size: int = arg(256, shapes_output=False, help="images per model forward pass")
    num_workers: int = arg(1, shapes_output=False, help="model replicas (Ray actors), one model each")
    num_cpus: int | None = arg(None, shapes_output=False, help="CPUs of the local Ray instance (default: all); ignored with --ray-address")
    cpus_per_worker: float = arg(1.0, shapes_output=False, help="CPUs Ray reserves per model actor (torch uses that many threads)")
    device: Literal["cpu", "cuda"] = arg("cpu", shapes_output=False, help="where the model runs")
    gpus_per_worker: float = arg(1.0, shapes_output=False, help="GPUs per actor with --device cuda (0.5 puts two replicas on one GPU)")
    precision: Literal["fp32", "fp16", "bf16"] = arg("fp32", help="model precision (fp16/bf16 on GPU)")
    ray_address: str | None = arg(None, shapes_output=False, help="Ray cluster address (default: start a local Ray instance)")
    decode_size: int | None = arg(None, help="decode JPEGs at a reduced DCT scale keeping both sides >= this px (faster; default: full decode, exact)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.top_fraction is None) == (self.threshold is None):
            raise ValueError("top_fraction/threshold: give exactly one of --top-fraction and --threshold")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ValueError("top_fraction: must be in (0, 1]")
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("pretrained/checkpoint: give --pretrained or --checkpoint, not both")
        if self.checkpoint is None and self.model is None:
            raise ValueError("model: name a model (--model) with --pretrained, or give --checkpoint")
        if self.checkpoint is None and self.pretrained is None:
            raise ValueError("pretrained/checkpoint: a CLIP score needs trained weights: --pretrained TAG or --checkpoint PATH")
        for name in ("batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker <= 0:
            raise ValueError("cpus_per_worker/gpus_per_worker: must be > 0")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("num_cpus: must be >= 1")
        if self.decode_size is not None and self.decode_size < 1:
            raise ValueError(f"decode_size: must be >= 1 pixel, got {self.decode_size}")

    def scores_path(self) -> Path:
        return self.scores if self.scores is not None else self.out.with_suffix(".scores.parquet")


@dataclass(kw_only=True)
class DedupConfig(FilterConfig, PoolConfig):
    """Deduplication: exact duplicates by SHA-256 of the image bytes; near duplicates (resized, re-encoded
    copies) by perceptual hash (pHash) candidates verified on small thumbnails; one sample kept per group."""

    near: bool = arg(True, help="also remove near duplicates; --no-near removes byte-identical copies only")
    max_distance: int = arg(10, help="near-duplicate candidates: pHash Hamming distance at most this (of 64 bits)")
    max_aspect_difference: float = arg(0.05, help="verification: |log(aspect_a / aspect_b)| at most this (resized copies keep their shape)")
    max_block_difference: float = arg(25.0, help="verification: no 4x4 block of the blurred 64-px thumbnails differs by more than this (0-255 grey levels)")
    brute_force_below: int = arg(20000, help="compare every pair of hashes exactly when fewer images than this; else LSH")
    lsh_bits: int = arg(0, help="LSH: hash bits sampled per table (0 = from the pool size, buckets of about 8)")
    lsh_tables: int = arg(0, help="LSH: number of tables (0 = enough for --lsh-recall at --max-distance)")
    lsh_recall: float = arg(0.99, help="LSH: wanted chance that a pair at --max-distance shares a bucket somewhere")
    keep: Literal["smallest_uid", "largest_image"] = arg("smallest_uid", help="which member of a duplicate group survives")
    hashes: Path | None = arg(None, shapes_output=False, help="folder of per-shard hash parts, reused across runs and settings (default: OUT.hashes)", metavar="DIR")
    near_partition_rows: int = arg(4_000_000, shapes_output=False, help="LSH search: about this many (table, hash) rows per partition task, "
                                                   "the memory bound of one task (the pairs found do not depend on it)")
    seed: int = arg(0, help="seed of the LSH bit choices")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.max_distance < 64:
            raise ValueError("max_distance: must be in [0, 64)")
        if self.max_aspect_difference < 0 or self.max_block_difference < 0:
            raise ValueError("max_aspect_difference/max_block_difference: must be >= 0")
        if not 0 <= self.lsh_bits <= 64 or self.lsh_tables < 0:
            raise ValueError("lsh_bits/lsh_tables: bits in 0..64 (0 = auto), tables >= 0 (0 = auto)")
        if not 0.0 < self.lsh_recall < 1.0:
            raise ValueError("lsh_recall: must be in (0, 1)")
        if self.num_workers < 1 or self.brute_force_below < 0 or self.near_partition_rows < 1:
            raise ValueError("num_workers, near_partition_rows: must be >= 1; brute_force_below: >= 0")
