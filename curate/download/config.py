"""``qcap download``'s config (light: imported by ``--help``).

Defaults follow DataComp's ``download_upstream.py`` (mlfoundations/datacomp): 512 px
``keep_ratio_largest`` resized only if bigger, JPEG, 10,000 samples per shard, 16 processes
× 128 threads, 2 retries, faces in ``face_bboxes`` blurred, img2dataset's 10 s timeout,
sha256 computed but *not* verified (DataComp passes no ``verify_hash``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from base.config import arg


@dataclass(kw_only=True)
class DownloadConfig:
    """Download a DataComp-style pool into raw shards with img2dataset (Ray or multiprocessing).

    Every pool row ends up in exactly one shard's Parquet with a status (success or a failure
    reason); successes also go to the tar. Re-running the same command resumes; --retry-failed
    re-fetches the retryable failures (timeouts, 5xx, connection errors) and merges them in.
    """

    STAGE: ClassVar[str] = "download"  # its name in dataset cards' lineage

    pool: Path = arg(shapes_output=False, help="DataComp-style pool Parquet (a file or a folder of Parquets) with uid, url, text", metavar="POOL")
    out: str = arg(shapes_output=False, help="output folder RAW of the raw shards (a path or an fsspec URL)", metavar="RAW")
    distributor: Literal["multiprocessing", "ray"] = arg("multiprocessing", shapes_output=False, help="run shards in local processes or as Ray tasks")
    ray_address: str | None = arg(None, shapes_output=False, help="Ray: attach to a running cluster ('auto' or HOST:PORT); default: start a local Ray with --processes CPUs")
    processes: int = arg(16, shapes_output=False, help="shards fetched at once (worker processes; with Ray, tasks running at once)")
    threads: int = arg(128, shapes_output=False, help="download threads per shard")
    image_size: int = arg(512, help="target size in pixels for img2dataset's resizer")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = arg(
        "keep_ratio_largest", help="img2dataset resize mode"
    )
    resize_only_if_bigger: bool = arg(True, help="resize only images larger than --image-size (DataComp's choice)")
    encode_format: Literal["jpg", "png", "webp"] = arg("jpg", help="image format in the tar")
    encode_quality: int = arg(95, help="encoder quality (png: compression 0-9)")
    samples_per_shard: int = arg(10000, help="pool rows per shard")
    retries: int = arg(2, shapes_output=False, help="immediate re-tries of a failed fetch inside img2dataset")
    timeout: float = arg(10.0, shapes_output=False, help="seconds without progress before a fetch fails (per socket operation)")
    max_request_seconds: float = arg(60.0, shapes_output=False, help="wall-clock limit on one request, however slowly the server dribbles")
    max_pixels: int = arg(89_478_485, shapes_output=False, help="images with more pixels are refused before decoding (decompression bombs)")
    max_image_bytes: int = arg(64 << 20, shapes_output=False, help="bodies larger than this are refused")
    blur_faces: bool = arg(True, help="blur the boxes in the pool's face_bboxes column, as DataComp does (if the column exists)")
    verify_hash: bool = arg(False, help="fail samples whose bytes do not match the pool's sha256 (status hash_mismatch)")
    extract_exif: bool = arg(True, help="store each image's EXIF as JSON in column exif (img2dataset's default)")
    respect_robots_headers: bool = arg(True, shapes_output=False, help="honour X-Robots-Tag noai/noimageai/noindex/noimageindex (img2dataset's default)")
    user_agent_token: str | None = arg(None, shapes_output=False, help="token added to the User-Agent (img2dataset's user_agent_token)")
    allow_private_addresses: bool = arg(False, shapes_output=False, help="fetch from loopback/private/link-local addresses (the embedded pool needs it)")
    retry_failed: bool = arg(False, shapes_output=False, help="after the download, re-fetch the retryable failures and merge them in")
    retry_rounds: int = arg(3, shapes_output=False, help="--retry-failed: at most this many rounds")
    retry_backoff: float = arg(10.0, shapes_output=False, help="--retry-failed: seconds before the first round, doubling each round")
    shard_retries: int = arg(2, shapes_output=False, help="times a failed shard task (a crash, not a failed sample) is run again")
    max_in_flight: int | None = arg(None, shapes_output=False, help="shard tasks submitted at once (backpressure; default: 2 x --processes)")
    min_success_rate: float = arg(0.5, shapes_output=False, help="warn loudly when the success rate falls below this (usually DNS or rate limiting)")
    progress: bool = arg(True, shapes_output=False, help="show a progress bar")
    overwrite: bool = arg(False, shapes_output=False, help="delete RAW's shards, manifest and config first and start over")

    def __post_init__(self) -> None:
        for name in ("processes", "threads", "image_size", "samples_per_shard", "max_pixels", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        for name in ("retries", "retry_rounds", "shard_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.timeout <= 0:
            raise ValueError("timeout: must be > 0")
        if self.max_request_seconds < self.timeout:
            raise ValueError("max_request_seconds: must be >= timeout")
        if self.retry_backoff < 0:
            raise ValueError("retry_backoff: must be >= 0")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError("max_in_flight: must be >= 1")
        if not 0.0 <= self.min_success_rate <= 1.0:
            raise ValueError("min_success_rate: must be in [0, 1]")
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise ValueError("encode_quality: png compression must be 0-9")
        if self.encode_format != "png" and not 0 <= self.encode_quality <= 100:
            raise ValueError("encode_quality: must be 0-100")
        if self.ray_address is not None and self.distributor != "ray":
            raise ValueError("ray_address: only with --distributor ray")

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or 2 * self.processes
