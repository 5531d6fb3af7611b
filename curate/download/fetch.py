"""The worker side: one shard fetched by img2dataset's own Downloader, written by qcap.

img2dataset's ``Downloader.download_shard`` does the work it is good at — a thread pool of
``urllib`` fetches with its retries, X-Robots-Tag checks, sha256, EXIF, its ``Resizer`` (and
DataComp's face blurring) — and hands each sample to a *sample writer*. qcap passes its own
writer (:class:`_ShardSink`), which:

- files each sample under a clean status (:mod:`curate.download.status`), raw message kept;
- carries every pool column under its own name, and puts what img2dataset measured under
  names of its own (``downloaded_width``/``downloaded_height``: the decoded size before
  resizing; ``downloaded_sha256``: sha256 of the bytes received; ``sha256_match``), so the
  pool's ``original_width``/``original_height``/``sha256`` are never overwritten;
- writes through :class:`base.shards.ShardWriter` (atomic; ``.done`` last) straight into the
  final folder, while img2dataset's own scratch (its input feather and ``_stats.json``) lives
  in a temporary folder that never touches RAW;
- checks at the end that every input row came back exactly once, and fails the shard (to be
  retried) otherwise.

Before any fetch the worker installs the URL guard (:mod:`curate.download.guard`), and the
resizer is wrapped so an image whose header announces more than ``max_pixels`` pixels is
refused before cv2 decodes it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from base.shards import SHARD_DIGITS, Sample, ShardError, ShardWriter
from curate.download.guard import UrlGuard, install_guard
from curate.download.plan import JOB_COLUMNS
from curate.download.status import SUCCESS, classify, qcap_tag

# X-Robots-Tag directives img2dataset honours by default.
ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
# Failure statuses img2dataset would have counted as failed_to_resize.
RESIZE_STATUSES = frozenset({"decode_error", "resize_error"})
PROGRESS_SECONDS = 0.5  # how often a shard reports its progress

ProgressFn = Callable[[tuple[int, str, int, int]], None]  # (shard_id, run_id, ok, failed) deltas


@dataclass(frozen=True, slots=True)
class FetchSettings:
    """What one worker needs to fetch a shard (a slice of DownloadConfig)."""

    threads: int  # download threads per shard
    timeout: float  # per socket operation
    retries: int  # immediate re-tries inside img2dataset
    image_size: int  # img2dataset resizer target
    resize_mode: str  # img2dataset resize mode
    resize_only_if_bigger: bool  # DataComp: True
    encode_format: str  # jpg, png or webp
    encode_quality: int  # encoder quality
    samples_per_shard: int  # the plan's shard size (img2dataset's key arithmetic)
    blur_faces: bool  # blur face_bboxes when the pool has them
    verify_hash: bool  # fail on sha256 mismatch
    extract_exif: bool  # EXIF as JSON
    robots_directives: tuple[str, ...] | None  # X-Robots-Tag directives that forbid use; None: ignore
    user_agent_token: str | None  # img2dataset's user agent token
    max_pixels: int  # pixel bound checked on the header
    guard: UrlGuard  # URL/address policy and per-request bounds

    @classmethod
    def from_config(cls, cfg) -> FetchSettings:
        from curate.download.guard import AddressPolicy

        return cls(
            threads=cfg.threads, timeout=cfg.timeout, retries=cfg.retries, image_size=cfg.image_size,
            resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            encode_format=cfg.encode_format, encode_quality=cfg.encode_quality,
            samples_per_shard=cfg.samples_per_shard, blur_faces=cfg.blur_faces, verify_hash=cfg.verify_hash,
            extract_exif=cfg.extract_exif, robots_directives=ROBOTS_DIRECTIVES if cfg.respect_robots_headers else None,
            user_agent_token=cfg.user_agent_token, max_pixels=cfg.max_pixels,
            guard=UrlGuard(
                AddressPolicy(allow_private=cfg.allow_private_addresses),
                max_bytes=cfg.max_image_bytes, max_request_seconds=cfg.max_request_seconds,
            ),
        )


@dataclass(slots=True)
class ShardJob:
    """One unit of work: fetch a shard's rows (``download``) or re-fetch and merge (``retry``)."""

    kind: Literal["download", "retry"]
    shard_id: int
    table: Any  # pyarrow Table: pool columns + key + download_attempts
    out: str  # the RAW folder
    settings: FetchSettings


@dataclass(slots=True)
class ShardResult:
    """What a job did (the manifest is recomputed from the shards; this feeds progress and logs)."""

    shard_id: int
    kind: str
    fetched: int  # rows fetched by this job
    successes: int  # of those, successes
    status_counts: dict[str, int] = field(default_factory=dict)  # of those, per status
    seconds: float = 0.0
    shard_rows: int = 0  # rows in the shard written
    shard_successes: int = 0  # successes in the shard written


# --------------------------------------------------------------------------------------------
# Output schema


def pool_schema_of(job_schema):
    """The pool's own columns of a job table (the job columns removed)."""
    import pyarrow as pa

    return pa.schema([f for f in job_schema if f.name not in JOB_COLUMNS])


def output_schema(pool_schema, *, extract_exif: bool):
    """Parquet schema of a raw shard: base columns, every pool column, then what qcap measured."""
    import pyarrow as pa

    fields = [
        pa.field("key", pa.string()), pa.field("uid", pa.string()),
        pa.field("status", pa.string()), pa.field("error_message", pa.string()),
    ]
    fields += [f for f in pool_schema if f.name != "uid"]
    if "caption" not in pool_schema.names:
        fields.append(pa.field("caption", pa.string()))  # img2dataset's name for the caption
    fields += [
        pa.field("width", pa.int32()), pa.field("height", pa.int32()),
        pa.field("downloaded_width", pa.int32()), pa.field("downloaded_height", pa.int32()),
        pa.field("downloaded_sha256", pa.string()), pa.field("sha256_match", pa.bool_()),
        pa.field("download_attempts", pa.int32()),
    ]
    if extract_exif:
        fields.append(pa.field("exif", pa.string()))
    return pa.schema(fields)


def img2dataset_counters(status_counts: dict[str, int]) -> dict[str, int]:
    """img2dataset's own failure counters, for tools that read its ``_stats.json``."""
    failures = sum(n for s, n in status_counts.items() if s != SUCCESS)
    resize = sum(n for s, n in status_counts.items() if s in RESIZE_STATUSES)
    return {"failed_to_download": failures - resize, "failed_to_resize": resize}


# --------------------------------------------------------------------------------------------
# The worker process


_PREPARED: set[str] = set()


def prepare_process(settings: FetchSettings) -> None:
    """Once per process: pixel bound for cv2, quiet libraries, the URL guard."""
    if "env" not in _PREPARED:
        # cv2's own bound (read when cv2 first decodes): a second line behind the header check.
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(settings.max_pixels))
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        logging.getLogger("exifread").setLevel(logging.CRITICAL)
        from PIL import Image

        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we bound pixels ourselves
        _PREPARED.add("env")
    install_guard(settings.guard)


class _PixelBound:
    """img2dataset's resizer behind a pixel bound read from the image header (no decoding)."""

    def __init__(self, resizer, max_pixels: int) -> None:
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        from PIL import Image, UnidentifiedImageError

        img_stream.seek(0)
        size = None
        try:
            with Image.open(img_stream) as image:
                size = image.size
        except Image.DecompressionBombError as err:
            return None, None, None, None, None, f"{qcap_tag('too_large')} {err}"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            size = None  # PIL cannot read the header; cv2 gets its turn (and usually fails to decode)
        if size is not None and size[0] * size[1] > self.max_pixels:
            return None, None, None, None, None, (
                f"{qcap_tag('too_large')} image of {size[0]}x{size[1]} pixels exceeds the {self.max_pixels}-pixel bound"
            )
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


def make_resizer(settings: FetchSettings, *, blur: bool):
    from img2dataset.blurrer import BoundingBoxBlurrer
    from img2dataset.resizer import Resizer

    resizer = Resizer(
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        resize_only_if_bigger=settings.resize_only_if_bigger,
        encode_quality=settings.encode_quality,
        encode_format=settings.encode_format,
        blurrer=BoundingBoxBlurrer() if blur else None,
    )
    return _PixelBound(resizer, settings.max_pixels)


def fetch_into(table, folder: str, shard_id: int, settings: FetchSettings, progress: ProgressFn | None = None) -> ShardResult:
    """Fetch every row of ``table`` with img2dataset and write shard ``shard_id`` of ``folder``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    prepare_process(settings)
    from img2dataset.downloader import Downloader

    blur = settings.blur_faces and "face_bboxes" in table.column_names
    columns = ["uid", "caption"] + (["sha256"] if settings.verify_hash else []) + (["face_bboxes"] if blur else []) + ["url"]
    if settings.verify_hash and "sha256" not in table.column_names:
        raise ShardError("verify_hash: the pool has no sha256 column to verify against")
    feed = pa.table({
        "uid": table.column("uid"),
        "caption": table.column("text"),
        **({"sha256": table.column("sha256")} if settings.verify_hash else {}),
        **({"face_bboxes": table.column("face_bboxes")} if blur else {}),
        # a missing URL becomes "", which urllib refuses as an unknown url type (refused_url)
        "url": pc.fill_null(table.column("url").cast(pa.string()), ""),
    }).select(columns)
    resizer = make_resizer(settings, blur=blur)  # imports cv2/albumentations before the shard's clock starts
    sink = _ShardSink(folder, shard_id, table, settings, progress)
    try:
        with tempfile.TemporaryDirectory(prefix="qcap-i2d-") as scratch:
            feather = os.path.join(scratch, f"{shard_id}.feather")
            with pa.OSFile(feather, "wb") as handle, pa.ipc.new_file(handle, feed.schema) as writer:
                writer.write_table(feed)
            downloader = Downloader(
                sample_writer_class=lambda *_args: sink,  # img2dataset builds its writer; ours is ready
                resizer=resizer,
                thread_count=settings.threads,
                save_caption=True,
                extract_exif=settings.extract_exif,
                output_folder=scratch,  # img2dataset's _stats.json lands here, never in RAW
                column_list=columns,
                timeout=settings.timeout,
                number_sample_per_shard=settings.samples_per_shard,
                oom_shard_count=SHARD_DIGITS,
                compute_hash="sha256",
                verify_hash_type="sha256" if settings.verify_hash else None,
                encode_format=settings.encode_format,
                retries=settings.retries,
                user_agent_token=settings.user_agent_token,
                disallowed_header_directives=list(settings.robots_directives) if settings.robots_directives else None,
                blurring_bbox_col="face_bboxes" if blur else None,
            )
            downloader.download_shard((shard_id, feather))
    except BaseException:
        sink.abort()
        raise
    if sink.result is None:
        raise ShardError(f"shard {shard_id}: img2dataset finished without closing its writer")
    return sink.result


class _ShardSink:
    """img2dataset's sample writer interface (``write``/``close``), writing a qcap shard."""

    def __init__(self, folder: str, shard_id: int, table, settings: FetchSettings, progress: ProgressFn | None) -> None:
        self.shard_id = shard_id
        self.settings = settings
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:12]
        pool_schema = pool_schema_of(table.schema)
        self.pool_columns = [n for n in pool_schema.names if n != "uid"]
        self.add_caption = "caption" not in pool_schema.names
        self.rows: dict[str, dict[str, Any]] = {}
        for row in table.to_pylist():
            if row["uid"] in self.rows:
                raise ShardError(f"shard {shard_id}: uid {row['uid']} appears twice in its input")
            self.rows[row["uid"]] = row
        self.num_rows = len(self.rows)
        self.writer = ShardWriter(folder, shard_id, schema=output_schema(pool_schema, extract_exif=settings.extract_exif))
        self.status_counts: dict[str, int] = {}
        self.start = time.time()
        self.result: ShardResult | None = None
        self._pending = [0, 0]
        self._last_report = time.monotonic()

    def write(self, img_str, key, caption, meta) -> None:  # img2dataset's signature
        uid = meta.get("uid")
        row = self.rows.pop(uid, None)
        if row is None:
            raise ShardError(f"shard {self.shard_id}: img2dataset returned uid {uid!r} twice or unasked")
        if img_str is not None:
            status, message = SUCCESS, None
        else:
            message = meta.get("error_message")
            status = classify(meta.get("status"), message)
        downloaded_sha256 = meta.get("sha256")
        pool_sha256 = row.get("sha256")
        if status == "hash_mismatch":
            sha256_match = False
        elif downloaded_sha256 and isinstance(pool_sha256, str) and pool_sha256:
            sha256_match = downloaded_sha256 == pool_sha256.lower()
        else:
            sha256_match = None
        record = {name: row[name] for name in self.pool_columns}
        if self.add_caption:
            record["caption"] = row["text"]
        record.update(
            width=meta.get("width"), height=meta.get("height"),
            downloaded_width=meta.get("original_width"), downloaded_height=meta.get("original_height"),
            downloaded_sha256=downloaded_sha256, sha256_match=sha256_match,
            download_attempts=row["download_attempts"],
        )
        if self.settings.extract_exif:
            record["exif"] = meta.get("exif")
        self.writer.write(Sample(
            key=row["key"], uid=uid, image=img_str, image_ext=self.settings.encode_format,
            text=row["text"], meta=record, status=status, error_message=message,
        ))
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        self._pending[0 if status == SUCCESS else 1] += 1
        if self.progress is not None and time.monotonic() - self._last_report >= PROGRESS_SECONDS:
            self._report()

    def _report(self) -> None:
        ok, failed = self._pending
        self._pending = [0, 0]
        self._last_report = time.monotonic()
        if self.progress is not None and (ok or failed):
            self.progress((self.shard_id, self.run_id, ok, failed))

    def close(self) -> None:  # img2dataset's signature
        if self.rows:
            missing = list(self.rows)[:3]
            self.abort()
            raise ShardError(
                f"shard {self.shard_id}: img2dataset returned no result for {len(self.rows)} of {self.num_rows} "
                f"samples (e.g. {missing}); the shard is not written and will be retried"
            )
        seconds = time.time() - self.start
        successes = self.status_counts.get(SUCCESS, 0)
        extra = {
            **img2dataset_counters(self.status_counts),
            "start_time": self.start, "end_time": self.start + seconds, "duration": round(seconds, 3),
        }
        stats = self.writer.close(extra_stats=extra)
        self._report()
        self.result = ShardResult(
            shard_id=self.shard_id, kind="download", fetched=self.num_rows, successes=successes,
            status_counts=dict(self.status_counts), seconds=seconds,
            shard_rows=stats.count, shard_successes=stats.successes,
        )

    def abort(self) -> None:
        self.writer.abort()
