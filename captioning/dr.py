"""``qcap build-dr``: join curated images and synthetic captions by uid into DataCompDR shards.

Usage::

    qcap build-dr --images runs/demo/curated --captions runs/demo/syn --out runs/demo/dr
    qcap build-dr --images datacomp12m/shards --apple-syn DataCompDR-12M/ --out dr12m --num-workers 16
    qcap build-dr ... --drop-flags degenerate truncated --min-score 0.2 --min-syn-captions 2

Output shard ``i`` holds the images of image shard ``i`` (same id, same keys, same order), each
with its real caption (``KEY.txt``), its synthetic captions (Apple's ``KEY.syn.json``), qcap's
provenance (``KEY.qcap.json``, with a ``dr`` block: which captions were kept and why others
were dropped) and, from Apple's shards, ``KEY.paug.json``/``KEY.npz``/``KEY.url.txt``. Every
image appears in the output Parquet; the ones that could not be built are rows with a status
(``no_caption``, ``caption_failed``, ``too_few_captions``, ``duplicate_uid``, ``missing_uid``).
Caption-side uids without an image are counted and listed (``captions_without_images.npy``).

The join is by uid only — keys and sha256 do not survive a re-download. It is built for
folders that are large and not co-sorted, in four resumable steps under ``DR/.build-dr/``:

1. **index** (per input shard, in parallel): the image side from each shard's Parquet (uid,
   position among its successes); the caption side from each caption shard — the byte span of
   every sample in the tar (:func:`curate.shards.iter_sample_spans`, which reads only headers
   and ``KEY.json``), or the row of a Parquet side table. Rows are ``(hash(uid), uid, shard,
   locator)``, sorted by the hash, one ``.npy`` per shard (24–45 bytes a sample).
2. **join** (per hash partition): partition ``p`` of ``P`` is the hash range
   ``[p·2⁶⁴/P, (p+1)·2⁶⁴/P)``, a contiguous slice of every index file (memory-mapped, found by
   binary search), so one partition holds about ``N/P`` rows of each side, and ``P`` is chosen
   so that this stays under ``--partition-rows``: memory is bounded whatever ``N`` is. The
   first copy of a uid wins on each side (lowest shard, then position); later copies are
   counted, never written twice. Each partition writes its verdicts sorted by image shard.
3. **write** (per output shard, in parallel): the shard's verdicts are the slices of the ``P``
   partition files for that shard; the image shard is streamed once and each matched caption
   is read by its span (a seek and one read; open caption shards are kept in a small LRU, so
   co-sorted inputs read sequentially and scattered ones cost one seek per sample, never a
   re-read of whole shards). Parquet side tables are read whole per caption shard, cached.
4. **finish**: ``sizes.json``, uid lists of one-sided samples, ``build_dr_summary.json`` with
   counts that reconcile, the dataset card; the work folder is removed.

Why this design: a sort/merge over 100M+ uids is what it takes when neither side is
co-sorted; hash partitions of memory-mappable sorted arrays keep every step's memory at
``O(N/P)`` or ``O(shard)``, every step is resumable by file (atomic writes, the marker last),
and the caption payloads are never copied into an intermediate shuffle: spans let the writer
fetch exactly the bytes it needs. A re-run with the same inputs and settings resumes; other
inputs or settings are refused (``--overwrite`` starts again).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.cli import UsageError
from curate.config import arg, parse_config, to_dict

log = logging.getLogger(__name__)

CONFIG_FILE = "build_dr.json"
SUMMARY_FILE = "build_dr_summary.json"
IMAGES_WITHOUT_CAPTIONS = "images_without_captions.npy"
CAPTIONS_WITHOUT_IMAGES = "captions_without_images.npy"
UIDS_FILE = "uids.npy"
WORK_DIR = ".build-dr"

# Verdicts of the join for each image sample.
MATCHED, NO_CAPTION, CAPTION_FAILED, DUPLICATE = 0, 1, 2, 3
VERDICTS = {NO_CAPTION: "no_caption", CAPTION_FAILED: "caption_failed", DUPLICATE: "duplicate_uid"}

IMAGE_INDEX = np.dtype([("h", "<u8"), ("hi", "<u8"), ("lo", "<u8"), ("shard", "<i4"), ("pos", "<i4")])
CAPTION_INDEX = np.dtype([("h", "<u8"), ("hi", "<u8"), ("lo", "<u8"), ("shard", "<i4"), ("ok", "u1"),
                          ("a", "<i8"), ("b", "<i8")])
PLAN = np.dtype([("shard", "<i4"), ("pos", "<i4"), ("hi", "<u8"), ("lo", "<u8"), ("verdict", "u1"),
                 ("cshard", "<i4"), ("a", "<i8"), ("b", "<i8")])
UID_KEY = np.dtype([("hi", "<u8"), ("lo", "<u8")])
# Severity order: a caption with several flags is counted under the first of these it has.
FLAG_ORDER = ("empty", "no_letters", "repeated_word", "repeated_phrase", "low_diversity", "too_short", "truncated")
# Settings that change what the output holds; a folder is built with one of each.
_FINGERPRINT = ("images", "captions", "apple_syn", "drop_flags", "min_score", "min_syn_captions")


@dataclass(kw_only=True)
class BuildDRConfig:
    """Join curated image shards and synthetic captions by uid into DataCompDR shards (resumable)."""

    images: str = arg(help="curated image shards: folder, brace pattern or glob (tar + Parquet, with uids)")
    captions: str | None = arg(None, help="qcap caption output folder (webdataset or --format parquet side tables)")
    apple_syn: str | None = arg(None, help="instead of --captions: a folder of Apple's DataCompDR caption/embedding tars")
    out: Path = arg(help="output DR shard folder (shard i holds image shard i's samples)", metavar="DR")
    drop_flags: tuple[str, ...] = arg(("degenerate",), help="drop synthetic captions with these flags: "
                                      "'degenerate' (empty, too_short, no_letters, repeated_*, low_diversity), "
                                      "single flags (e.g. too_short truncated), or 'none'")
    min_score: float | None = arg(None, help="drop synthetic captions whose image-text score is below this (unscored ones are kept and counted)")
    min_syn_captions: int = arg(1, help="images left with fewer synthetic captions are dropped (status too_few_captions)")
    partition_rows: int = arg(2_000_000, help="join memory bound: about this many index rows per side per partition")
    num_workers: int = arg(1, help="processes indexing and writing shards")
    open_files: int = arg(16, help="caption shards kept open per writer (LRU)")
    keep_work: bool = arg(False, help=f"keep the index and join files in DR/{WORK_DIR} when done")
    overwrite: bool = arg(False, help="replace a DR folder built from other inputs or settings")
    card: bool = arg(True, help="write the dataset card (README.md, preview.html, card/*.png)")
    progress: bool = arg(True, help="show progress bars")

    def __post_init__(self) -> None:
        from captioning.quality import FLAGS

        if (self.captions is None) == (self.apple_syn is None):
            raise ValueError("captions: give exactly one of --captions (qcap caption output) or --apple-syn (Apple's shards)")
        known = set(FLAGS) | {"degenerate", "none"}
        unknown = [f for f in self.drop_flags if f not in known]
        if unknown:
            raise ValueError(f"drop_flags: unknown flag(s) {unknown}; choose from {sorted(known)}")
        if "none" in self.drop_flags and len(self.drop_flags) > 1:
            raise ValueError("drop_flags: 'none' cannot be combined with other flags")
        for name in ("min_syn_captions", "num_workers", "partition_rows", "open_files"):
            if getattr(self, name) < (0 if name == "min_syn_captions" else 1):
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")

    def dropped_flag_set(self) -> frozenset[str]:
        from captioning.quality import DEGENERATE

        flags: set[str] = set()
        for name in self.drop_flags:
            if name == "degenerate":
                flags |= DEGENERATE
            elif name != "none":
                flags.add(name)
        return frozenset(flags)


# --------------------------------------------------------------------------------------------
# uids and hashes


def uid_halves(uids: list[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid mask, high 64 bits, low 64 bits) of 32-hex uids; None or malformed → invalid."""
    from curate.shards import _UID_RE

    valid = np.array([isinstance(u, str) and bool(_UID_RE.match(u)) for u in uids], dtype=bool)
    good = [u for u, ok in zip(uids, valid, strict=True) if ok]
    hi = np.array([int(u[:16], 16) for u in good], dtype=np.uint64)
    lo = np.array([int(u[16:], 16) for u in good], dtype=np.uint64)
    return valid, hi, lo


def uid_hash(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """A 64-bit mix of a uid (splitmix64 finaliser): uniform even for uids that are not hashes."""
    with np.errstate(over="ignore"):
        z = hi ^ (lo * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uid_strings(hi: np.ndarray, lo: np.ndarray) -> list[str]:
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(hi, lo, strict=True)]


def _uid_array(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    from curate.shards import UID_DTYPE

    out = np.empty(len(hi), dtype=UID_DTYPE)
    out["f0"], out["f1"] = hi, lo
    return out


def partition_bounds(p: int, num_partitions: int) -> tuple[int, int | None]:
    """Hash range of partition ``p``: ``[lo, hi)``; ``hi`` None for the last one (up to 2⁶⁴)."""
    lo = (p << 64) // num_partitions
    hi = None if p == num_partitions - 1 else ((p + 1) << 64) // num_partitions
    return lo, hi


def _slice(array: np.ndarray, lo: int, hi: int | None) -> np.ndarray:
    h = array["h"]
    start = int(np.searchsorted(h, np.uint64(lo), side="left"))
    end = len(array) if hi is None else int(np.searchsorted(h, np.uint64(hi), side="left"))
    return np.asarray(array[start:end])


def _save_npy(path: Path, array: np.ndarray) -> None:
    from curate.shards import atomic_write_bytes

    sink = io.BytesIO()
    np.save(sink, array, allow_pickle=False)
    atomic_write_bytes(path, sink.getvalue())


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    from curate.shards import ShardError

    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable work file ({err}); delete {path.parent.parent} to rebuild it") from err


# --------------------------------------------------------------------------------------------
# Caption sources: qcap's caption shards (tar or Parquet side tables) and Apple's DataCompDR


@dataclass(slots=True)
class CaptionRecord:
    """One sample's synthetic captions as a caption source gives them."""

    uid: str
    syn_text: list[str]
    flags: list[list[str]]  # per caption
    scores: list[float | None]  # per caption
    provenance: dict[str, Any] | None  # qcap's KEY.qcap.json, as written by qcap caption (None: Apple)
    extras: dict[str, bytes]  # members carried into the DR sample (Apple: url.txt, paug.json, npz)
    sha256: str | None  # the caption side's sha256 of the image, if it has one


class CaptionSource:
    """Lists caption shards, indexes one, and reads records back by locator ``(shard, a, b)``."""

    kind = "base"

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.shards = self.list_shards()

    def list_shards(self) -> list[str]:
        raise NotImplementedError

    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def reader(self, open_files: int) -> CaptionReader:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class CaptionReader:
    def read(self, shard: int, a: int, b: int, uid: str) -> CaptionRecord:
        raise NotImplementedError

    def close(self) -> None:
        return None


def _index_rows(uids: list[str | None], ok: list[bool], a: list[int], b: list[int], shard: int) -> tuple[np.ndarray, int]:
    valid, hi, lo = uid_halves(uids)
    rows = np.empty(int(valid.sum()), dtype=CAPTION_INDEX)
    rows["hi"], rows["lo"], rows["shard"] = hi, lo, shard
    rows["ok"] = np.array(ok, dtype=np.uint8)[valid]
    rows["a"] = np.array(a, dtype=np.int64)[valid]
    rows["b"] = np.array(b, dtype=np.int64)[valid]
    rows["h"] = uid_hash(hi, lo)
    rows.sort(order=["h", "hi", "lo"], kind="stable")
    return rows, int((~valid).sum())


def _info_from_provenance(provenance: dict[str, Any] | None, syn_text: list[str]) -> tuple[list[list[str]], list]:
    """Per-caption flags and scores from qcap's provenance; recomputed flags if it has none."""
    from captioning.quality import caption_flags

    captions = (provenance or {}).get("captions")
    if isinstance(captions, list) and len(captions) == len(syn_text) and all(isinstance(c, dict) for c in captions):
        return [list(c.get("flags") or []) for c in captions], [c.get("score") for c in captions]
    return [caption_flags(t) for t in syn_text], [None] * len(syn_text)


class _SpanReader(CaptionReader):
    """Reads caption samples by byte span, keeping up to ``open_files`` shards open (LRU)."""

    def __init__(self, source: CaptionSource, open_files: int) -> None:
        self.source = source
        self.open_files = open_files
        self.handles: OrderedDict[int, Any] = OrderedDict()

    def _handle(self, shard: int):
        import fsspec

        if shard in self.handles:
            self.handles.move_to_end(shard)
            return self.handles[shard]
        if len(self.handles) >= self.open_files:
            _, old = self.handles.popitem(last=False)
            old.close()
        handle = fsspec.open(self.source.shards[shard], "rb").open()
        self.handles[shard] = handle
        return handle

    def sample(self, shard: int, a: int, b: int, uid: str):
        from curate.shards import ShardError, read_sample_span

        path = self.source.shards[shard]
        sample = read_sample_span(path, a, b, handle=self._handle(shard))
        if sample.uid != uid:
            raise ShardError(f"{path}: the sample at byte {a} has uid {sample.uid}, the index says {uid}; "
                             "the caption shard changed since it was indexed (run with --overwrite)")
        return sample

    def close(self) -> None:
        while self.handles:
            self.handles.popitem()[1].close()


class QcapShards(CaptionSource):
    """``qcap caption --format webdataset``: caption-only tars (``syn.json``, ``qcap.json``) with
    Parquets that also list the images that failed captioning."""

    kind = "qcap-webdataset"

    def list_shards(self) -> list[str]:
        from curate.shards import expand_shards

        return expand_shards(self.folder)

    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        from curate.shards import iter_sample_spans, read_table

        path = self.shards[n]
        uids: list[str | None] = []
        ok: list[bool] = []
        a: list[int] = []
        b: list[int] = []
        for span in iter_sample_spans(path):
            uids.append(span.meta.get("uid"))
            ok.append(True)
            a.append(span.start)
            b.append(span.length)
        table = read_table(path, columns=["uid", "status"])
        statuses = Counter(table.column("status").to_pylist())
        failed = [u for u, s in zip(table.column("uid").to_pylist(), table.column("status").to_pylist(), strict=True)
                  if s != "success"]
        if statuses.get("success", 0) != len(uids):
            from curate.shards import ShardError

            raise ShardError(f"{path}: the tar holds {len(uids)} samples, its Parquet lists {statuses.get('success', 0)} "
                             "successes; run 'qcap shards verify' on the caption folder")
        rows, bad = _index_rows(uids + failed, ok + [False] * len(failed), a + [0] * len(failed),
                                b + [0] * len(failed), n)
        return rows, {"rows": len(uids) + len(failed), "status_counts": dict(statuses), "missing_uid": bad}

    def reader(self, open_files: int) -> CaptionReader:
        source = self

        class Reader(_SpanReader):
            def read(self, shard: int, a: int, b: int, uid: str) -> CaptionRecord:
                sample = self.sample(shard, a, b, uid)
                syn = sample.syn_text or []
                flags, scores = _info_from_provenance(sample.syn_provenance, syn)
                return CaptionRecord(uid=uid, syn_text=syn, flags=flags, scores=scores,
                                     provenance=sample.syn_provenance, extras={}, sha256=sample.meta.get("sha256"))

        return Reader(source, open_files)

    def describe(self) -> dict[str, Any]:
        return describe_caption_folder(self.folder, self.kind)


class QcapSideTables(CaptionSource):
    """``qcap caption --format parquet``: one side table per shard (syn_text, flags, scores, qcap)."""

    kind = "qcap-parquet"

    def list_shards(self) -> list[str]:
        from curate.shards import ShardError

        root = Path(self.folder)
        found = sorted(p for p in root.glob("*.parquet") if p.stem.isdigit())
        if not found:
            raise ShardError(f"{self.folder}: no caption shards (.tar or NNNNN.parquet side tables)")
        return [str(p) for p in found]

    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        from curate.shards import read_table

        table = read_table(self.shards[n], columns=["uid", "status"])
        uids = table.column("uid").to_pylist()
        statuses = table.column("status").to_pylist()
        rows, bad = _index_rows(uids, [s == "success" for s in statuses], list(range(len(uids))), [-1] * len(uids), n)
        return rows, {"rows": len(uids), "status_counts": dict(Counter(statuses)), "missing_uid": bad}

    def reader(self, open_files: int) -> CaptionReader:
        return _TableReader(self, open_files)

    def describe(self) -> dict[str, Any]:
        return describe_caption_folder(self.folder, self.kind)


class _TableReader(CaptionReader):
    COLUMNS = ("uid", "status", "sha256", "syn_text", "syn_flags", "syn_scores", "qcap")

    def __init__(self, source: QcapSideTables, open_files: int) -> None:
        self.source = source
        self.cache: OrderedDict[int, dict[str, list]] = OrderedDict()
        self.size = max(1, open_files // 4)  # tables are held whole: keep fewer of them

    def read(self, shard: int, a: int, b: int, uid: str) -> CaptionRecord:
        from curate.shards import ShardError, read_table

        if shard not in self.cache:
            if len(self.cache) >= self.size:
                self.cache.popitem(last=False)
            self.cache[shard] = read_table(self.source.shards[shard], columns=list(self.COLUMNS)).to_pydict()
        self.cache.move_to_end(shard)
        table = self.cache[shard]
        if a >= len(table["uid"]) or table["uid"][a] != uid:
            raise ShardError(f"{self.source.shards[shard]}: row {a} is not uid {uid}; the side table changed since "
                             "it was indexed (run with --overwrite)")
        syn = list(table["syn_text"][a] or [])
        provenance = json.loads(table["qcap"][a]) if table["qcap"][a] else None
        flags = table["syn_flags"][a]
        scores = table["syn_scores"][a]
        if flags is None or len(flags) != len(syn):
            flags, scores_from = _info_from_provenance(provenance, syn)
            scores = scores if scores is not None and len(scores) == len(syn) else scores_from
        if scores is None or len(scores) != len(syn):
            scores = [None] * len(syn)
        return CaptionRecord(uid=uid, syn_text=syn, flags=[list(f or []) for f in flags], scores=list(scores),
                             provenance=provenance, extras={}, sha256=table["sha256"][a])


class AppleShards(CaptionSource):
    """Apple's DataCompDR caption/embedding tars (see :mod:`captioning.apple`)."""

    kind = "apple"

    def list_shards(self) -> list[str]:
        from captioning.apple import list_tars

        return list_tars(self.folder)

    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        from curate.shards import iter_sample_spans

        uids, a, b = [], [], []
        for span in iter_sample_spans(self.shards[n]):
            uids.append(span.meta.get("uid"))
            a.append(span.start)
            b.append(span.length)
        rows, bad = _index_rows(uids, [True] * len(uids), a, b, n)
        return rows, {"rows": len(uids), "status_counts": {"success": len(uids)}, "missing_uid": bad}

    def reader(self, open_files: int) -> CaptionReader:
        from captioning.apple import CARRIED

        source = self

        class Reader(_SpanReader):
            def read(self, shard: int, a: int, b: int, uid: str) -> CaptionRecord:
                from captioning.quality import caption_flags

                sample = self.sample(shard, a, b, uid)
                syn = sample.syn_text or []
                extras = {ext: data for ext, data in sample.extras.items() if ext in CARRIED}
                return CaptionRecord(uid=uid, syn_text=syn, flags=[caption_flags(t) for t in syn], scores=[None] * len(syn),
                                     provenance=None, extras=extras, sha256=sample.meta.get("sha256"))

        return Reader(source, open_files)

    def describe(self) -> dict[str, Any]:
        from captioning.apple import DOCUMENTED, ORIGIN

        return {"kind": self.kind, "folder": str(self.folder), "origin": ORIGIN, **DOCUMENTED,
                "num_shards": len(self.shards)}


SOURCES: dict[str, type[CaptionSource]] = {
    QcapShards.kind: QcapShards,
    QcapSideTables.kind: QcapSideTables,
    AppleShards.kind: AppleShards,
}


def open_source(cfg: BuildDRConfig) -> CaptionSource:
    from curate.shards import ShardError

    if cfg.apple_syn is not None:
        return SOURCES["apple"](cfg.apple_syn)
    folder = str(cfg.captions)
    root = Path(folder)
    if root.is_dir() and not any(root.glob("*.tar")) and any(root.glob("[0-9]*.parquet")):
        return SOURCES["qcap-parquet"](folder)
    try:
        return SOURCES["qcap-webdataset"](folder)
    except ShardError as err:
        raise ShardError(f"{folder}: not a qcap caption folder ({err}); pass Apple's shards with --apple-syn") from err


def describe_caption_folder(folder: str, kind: str) -> dict[str, Any]:
    """Captioner, decoding and scorer from ``caption_config.json``, and ``caption_summary.json``."""
    root = Path(folder)
    out: dict[str, Any] = {"kind": kind, "folder": str(folder)}
    for name, key in (("caption_config.json", "caption_config"), ("caption_summary.json", "caption_summary")):
        path = root / name
        if path.is_file():
            try:
                out[key] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                out[key] = f"{path}: not valid JSON"
    return out


# --------------------------------------------------------------------------------------------
# Step 1: index


def _work(cfg: BuildDRConfig) -> Path:
    return Path(cfg.out) / WORK_DIR


def index_image_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Image shard ``n``: (hash, uid, shard, position among successes) from its Parquet."""
    from curate.shards import read_table

    n, path, work = task["n"], task["path"], Path(task["work"])
    target = work / "index" / "images" / f"{n:06d}.npy"
    counts_path = target.with_suffix(".json")
    if counts_path.is_file():
        return json.loads(counts_path.read_text())
    table = read_table(path, columns=["uid", "status"])
    statuses = table.column("status").to_pylist()
    uids = [u for u, s in zip(table.column("uid").to_pylist(), statuses, strict=True) if s == "success"]
    valid, hi, lo = uid_halves(uids)
    rows = np.empty(len(hi), dtype=IMAGE_INDEX)
    rows["hi"], rows["lo"], rows["shard"] = hi, lo, n
    rows["pos"] = np.flatnonzero(valid).astype(np.int32)
    rows["h"] = uid_hash(hi, lo)
    rows.sort(order=["h", "hi", "lo"], kind="stable")
    target.parent.mkdir(parents=True, exist_ok=True)
    _save_npy(target, rows)
    counts = {"successes": len(uids), "indexed": len(rows), "missing_uid": int((~valid).sum()),
              "failed_rows": len(statuses) - len(uids)}
    from curate.shards import atomic_write_json

    atomic_write_json(counts_path, counts)
    return counts


def index_caption_shard(task: dict[str, Any]) -> dict[str, Any]:
    from curate.shards import atomic_write_json

    n, work, source = task["n"], Path(task["work"]), task["source"]
    target = work / "index" / "captions" / f"{n:06d}.npy"
    counts_path = target.with_suffix(".json")
    if counts_path.is_file():
        return json.loads(counts_path.read_text())
    rows, counts = source.index_shard(n)
    target.parent.mkdir(parents=True, exist_ok=True)
    _save_npy(target, rows)
    counts["indexed_ok"] = int(rows["ok"].sum())
    atomic_write_json(counts_path, counts)
    return counts


# --------------------------------------------------------------------------------------------
# Step 2: join, one hash partition at a time


def join_partition(task: dict[str, Any]) -> dict[str, Any]:
    """Verdicts for every image row of hash partition ``p``, sorted by (image shard, position);
    plus this partition's one-sided uids and counts."""
    from curate.shards import atomic_write_json

    p, num_partitions, work = task["p"], task["num_partitions"], Path(task["work"])
    out = work / "join" / f"{p:05d}"
    counts_path = out.with_suffix(".json")
    if counts_path.is_file():
        return json.loads(counts_path.read_text())
    lo_h, hi_h = partition_bounds(p, num_partitions)
    images = _gather(work / "index" / "images", task["num_images"], lo_h, hi_h, IMAGE_INDEX)
    captions = _gather(work / "index" / "captions", task["num_captions"], lo_h, hi_h, CAPTION_INDEX)

    # images: the first copy of a uid (lowest shard, then position) is canonical
    images = images[np.lexsort((images["pos"], images["shard"], images["lo"], images["hi"]))]
    image_first = _first_of_run(images["hi"], images["lo"])
    # captions: successes before failures, then lowest shard and locator
    captions = captions[np.lexsort((captions["a"], captions["shard"], 1 - captions["ok"].astype(np.int8),
                                    captions["lo"], captions["hi"]))]
    caption_first = _first_of_run(captions["hi"], captions["lo"])
    canon = captions[caption_first]
    caption_keys = _keys(canon["hi"], canon["lo"])

    plan = np.zeros(len(images), dtype=PLAN)
    plan["shard"], plan["pos"], plan["hi"], plan["lo"] = images["shard"], images["pos"], images["hi"], images["lo"]
    plan["verdict"] = DUPLICATE
    plan["cshard"] = -1
    first_idx = np.flatnonzero(image_first)
    image_keys = _keys(images["hi"][first_idx], images["lo"][first_idx])
    found = np.zeros(len(first_idx), dtype=bool)
    where = np.zeros(len(first_idx), dtype=np.int64)
    if len(caption_keys) and len(first_idx):
        where = np.clip(np.searchsorted(caption_keys, image_keys), 0, len(caption_keys) - 1)
        found = caption_keys[where] == image_keys
    ok = np.zeros(len(first_idx), dtype=bool)
    ok[found] = canon["ok"][where[found]] == 1
    verdict = np.where(ok, MATCHED, np.where(found, CAPTION_FAILED, NO_CAPTION)).astype(np.uint8)
    plan["verdict"][first_idx] = verdict
    matched_rows = first_idx[ok]
    plan["cshard"][matched_rows] = canon["shard"][where[ok]]
    plan["a"][matched_rows] = canon["a"][where[ok]]
    plan["b"][matched_rows] = canon["b"][where[ok]]
    plan = plan[np.lexsort((plan["pos"], plan["shard"]))]

    caption_matched = np.zeros(len(canon), dtype=bool)
    caption_matched[where[found]] = True
    canon_ok = canon["ok"] == 1
    only_captions = canon[canon_ok & ~caption_matched]
    only_images = images[first_idx[~ok]]
    num_ok_rows = int((captions["ok"] == 1).sum())
    counts = {
        "image_rows": len(images),
        "image_duplicates": int(len(images) - len(first_idx)),
        "matched": int(ok.sum()),
        "no_caption": int((verdict == NO_CAPTION).sum()),
        "caption_failed": int((verdict == CAPTION_FAILED).sum()),
        "caption_ok_rows": num_ok_rows,
        "caption_ok_uids": int(canon_ok.sum()),
        "caption_duplicates": int(num_ok_rows - canon_ok.sum()),
        "caption_failed_only_uids": int((~canon_ok).sum()),
        "captions_without_images": len(only_captions),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_npy(out.with_suffix(".npy"), plan)
    _save_npy(out.parent / f"{p:05d}.only_images.npy", _uid_array(only_images["hi"], only_images["lo"]))
    _save_npy(out.parent / f"{p:05d}.only_captions.npy", _uid_array(only_captions["hi"], only_captions["lo"]))
    atomic_write_json(counts_path, counts)  # last: the partition's completion marker
    return counts


def _gather(folder: Path, count: int, lo_h: int, hi_h: int | None, dtype: np.dtype) -> np.ndarray:
    parts = [_slice(_load_npy(folder / f"{n:06d}.npy"), lo_h, hi_h) for n in range(count)]
    parts = [part for part in parts if len(part)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _first_of_run(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    first = np.ones(len(hi), dtype=bool)
    if len(hi) > 1:
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    return first


def _keys(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    keys = np.empty(len(hi), dtype=UID_KEY)
    keys["hi"], keys["lo"] = hi, lo
    return keys


def load_shard_plan(work: Path, n: int, num_partitions: int) -> np.ndarray:
    """Image shard ``n``'s verdicts, from its slice of every partition file, by position."""
    parts = []
    for p in range(num_partitions):
        plan = _load_npy(work / "join" / f"{p:05d}.npy")
        shard = plan["shard"]
        start = int(np.searchsorted(shard, n, side="left"))
        end = int(np.searchsorted(shard, n, side="right"))
        if end > start:
            parts.append(np.asarray(plan[start:end]))
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=PLAN)
    return rows[np.argsort(rows["pos"], kind="stable")]


# --------------------------------------------------------------------------------------------
# Step 3: write each output shard


def choose_captions(record: CaptionRecord, drop: frozenset[str], min_score: float | None) -> tuple[list[int], Counter, int]:
    """Indices of the synthetic captions to keep, the dropped ones by reason, and how many
    were kept without a score although --min-score was set."""
    kept: list[int] = []
    dropped: Counter[str] = Counter()
    unscored = 0
    for i, flags in enumerate(record.flags):
        bad = [flag for flag in FLAG_ORDER if flag in drop and flag in flags]
        if bad:
            dropped[bad[0]] += 1
            continue
        score = record.scores[i] if i < len(record.scores) else None
        if min_score is not None:
            if score is None:
                unscored += 1
            elif score < min_score:
                dropped["low_score"] += 1
                continue
        kept.append(i)
    return kept, dropped, unscored


def dr_provenance(record: CaptionRecord, kept: list[int], dropped: Counter, source: str, shard_name: str) -> dict[str, Any]:
    """qcap's provenance for a DR sample: the captioner's (captions index-aligned with the kept
    ``syn_text``), plus a ``dr`` block saying what was kept and why the rest was dropped."""
    if record.provenance is not None:
        provenance = dict(record.provenance)
        captions = provenance.get("captions")
        if isinstance(captions, list) and len(captions) == len(record.syn_text):
            provenance["captions"] = [captions[i] for i in kept]
        else:
            provenance["captions"] = [{"flags": record.flags[i], "score": record.scores[i]} for i in kept]
    else:
        from captioning.apple import provenance as apple_provenance

        provenance = apple_provenance([record.flags[i] for i in kept])
    provenance["dr"] = {"source": source, "caption_shard": shard_name, "num_generated": len(record.syn_text),
                        "kept": kept, "dropped": dict(sorted(dropped.items()))}
    return provenance


def write_output_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Stream image shard ``n`` once and write DR shard ``shard_id``; returns its counts."""
    from curate.card import CaptionStats
    from curate.shards import Sample, ShardError, ShardWriter, iter_samples

    cfg: BuildDRConfig = task["cfg"]
    source: CaptionSource = task["source"]
    n, shard_id, image_tar = task["n"], task["shard_id"], task["path"]
    plan = load_shard_plan(Path(task["work"]), n, task["num_partitions"])
    drop = cfg.dropped_flag_set()
    reader = source.reader(cfg.open_files)
    caption_stats = CaptionStats()
    syn: Counter[str] = Counter()
    syn_dropped: Counter[str] = Counter()
    sha_mismatch = 0
    next_row = 0
    try:
        with ShardWriter(cfg.out, shard_id) as writer:
            for position, sample in enumerate(iter_samples([image_tar])):
                row = plan[next_row] if next_row < len(plan) and int(plan[next_row]["pos"]) == position else None
                meta = dict(sample.meta)
                if row is None:
                    if sample.uid is not None and _valid_uid(sample.uid):
                        raise ShardError(f"{image_tar}: sample {sample.key!r} (uid {sample.uid}) is not in the index; "
                                         "the image shard changed since it was indexed (run with --overwrite)")
                    writer.write(Sample(key=sample.key, uid=None, meta=meta, status="missing_uid",
                                        error_message=f"KEY.json uid is {sample.uid!r}, not a 32-hex DataComp uid"))
                    continue
                next_row += 1
                uid = f"{int(row['hi']):016x}{int(row['lo']):016x}"
                if sample.uid != uid:
                    raise ShardError(f"{image_tar}: sample {position} has uid {sample.uid}, the index says {uid}; "
                                     "the tar and its Parquet disagree or the shard changed (qcap shards verify)")
                verdict = int(row["verdict"])
                if verdict != MATCHED:
                    writer.write(Sample(key=sample.key, uid=uid, meta=meta, status=VERDICTS[verdict],
                                        error_message=_why(verdict)))
                    continue
                cshard = int(row["cshard"])
                record = reader.read(cshard, int(row["a"]), int(row["b"]), uid)
                kept, dropped, unscored = choose_captions(record, drop, cfg.min_score)
                syn["in"] += len(record.syn_text)
                syn["unscored_kept"] += unscored
                syn_dropped.update(dropped)
                if record.sha256 and meta.get("sha256") and record.sha256 != meta["sha256"]:
                    sha_mismatch += 1
                if len(kept) < cfg.min_syn_captions:
                    if kept:
                        syn_dropped["too_few_captions"] += len(kept)
                    writer.write(Sample(key=sample.key, uid=uid, meta=meta, status="too_few_captions",
                                        error_message=f"{len(kept)} of {len(record.syn_text)} synthetic captions kept "
                                                      f"(dropped: {dict(dropped)}); --min-syn-captions {cfg.min_syn_captions}"))
                    continue
                where = f"{source.shards[cshard]} uid {uid}"
                extras = dict(sample.extras)
                if record.extras:
                    from captioning.apple import realign_embeddings

                    extras.update(realign_embeddings(record.extras, kept, len(record.syn_text), where))
                meta["num_syn"] = len(kept)
                out = Sample(key=sample.key, uid=uid, image=sample.image, image_ext=sample.image_ext, text=sample.text,
                             syn_text=[record.syn_text[i] for i in kept],
                             syn_provenance=dr_provenance(record, kept, dropped, source.kind,
                                                          os.path.basename(source.shards[cshard])),
                             meta=meta, extras=extras)
                writer.write(out)
                syn["kept"] += len(kept)
                caption_stats.add(out)
            if next_row != len(plan):
                raise ShardError(f"{image_tar}: {len(plan) - next_row} indexed samples are missing from the tar; "
                                 "the image shard changed since it was indexed (run with --overwrite)")
            extra = {"num_input": writer.stats.count, "syn_in": syn["in"], "syn_kept": syn["kept"],
                     "syn_dropped": dict(sorted(syn_dropped.items())), "syn_unscored_kept": syn["unscored_kept"],
                     "sha256_mismatch": sha_mismatch, "image_shard": image_tar, "caption_stats": caption_stats.as_json()}
            stats = writer.close(extra_stats=extra)
    finally:
        reader.close()
    return {"shard_id": shard_id, "count": stats.count}


def _valid_uid(uid: str) -> bool:
    from curate.shards import _UID_RE

    return bool(_UID_RE.match(uid))


def _why(verdict: int) -> str:
    return {
        NO_CAPTION: "no caption sample has this uid",
        CAPTION_FAILED: "the captioner recorded a failure for this uid (see the caption folder's Parquet)",
        DUPLICATE: "another image sample with this uid was kept (the first: lowest shard, then position)",
    }[verdict]


# --------------------------------------------------------------------------------------------
# The driver


def image_shards(spec: str) -> list[tuple[int, str]]:
    from curate.shards import ShardError, expand_shards, shard_id_of

    tars = expand_shards(spec)
    ids: dict[int, str] = {}
    for path in tars:
        shard_id = shard_id_of(path)
        if shard_id in ids:
            raise ShardError(f"{path} and {ids[shard_id]} share shard id {shard_id}; build one image folder at a time")
        ids[shard_id] = path
    return sorted(ids.items())


def _file_size(path: str) -> int:
    import fsspec

    fs, stripped = fsspec.core.url_to_fs(path)
    return int(fs.size(stripped))


def identity(cfg: BuildDRConfig, images: list[tuple[int, str]], source: CaptionSource) -> dict[str, Any]:
    """What the output depends on: settings, and every input shard's name and size."""
    values = to_dict(cfg)
    return {
        "settings": {key: values[key] for key in _FINGERPRINT},
        "images": [[os.path.basename(p), _file_size(p)] for _, p in images],
        "captions": [[os.path.relpath(p, source.folder) if "://" not in p else p, _file_size(p)] for p in source.shards],
        "caption_kind": source.kind,
    }


def _check_output(cfg: BuildDRConfig, ident: dict[str, Any]) -> None:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder; choose a folder for the DR shards")
    path = out / CONFIG_FILE
    if not path.is_file():
        if out.is_dir() and any(out.glob("*.tar")):
            if not cfg.overwrite:
                raise UsageError(f"{out} holds shards that build-dr did not make; use another --out or --overwrite")
            _clear(out)
        return
    saved = json.loads(path.read_text(encoding="utf-8")).get("identity")
    if saved == ident:
        return
    if not cfg.overwrite:
        changed = [k for k in ident if saved is None or saved.get(k) != ident[k]]
        raise UsageError(f"{out} was built from other inputs or settings (changed: {', '.join(changed)}); "
                         "use another --out, or --overwrite to rebuild it")
    _clear(out)


def _clear(out: Path) -> None:
    """Remove what build-dr writes (and only that) from ``out``."""
    for pattern in ("*.tar", "*.parquet", "*_stats.json", "*.done", "sizes.json", "build_dr*.json", "*.npy",
                    "README.md", "preview.html", ".*.tmp-*"):
        for path in out.glob(pattern):
            path.unlink()
    for folder in (out / WORK_DIR, out / "card"):
        if folder.is_dir():
            shutil.rmtree(folder)


class Workers:
    """``--num-workers`` processes (spawned once per build, reused by every step), or this process."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.pool = None

    def __enter__(self) -> Workers:
        if self.num_workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if exc[0] is not None:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()

    def map(self, func, tasks: list[dict[str, Any]], bar, weight=None, parallel: bool = True) -> list:
        results = []
        if self.pool is not None and parallel and len(tasks) > 1:
            outputs = self.pool.imap_unordered(func, tasks)
        else:
            outputs = (func(task) for task in tasks)
        for result in outputs:
            results.append(result)
            bar.update(weight(result) if weight else 1)
        return results


def build(cfg: BuildDRConfig) -> dict[str, Any]:
    """Build (or finish building) the DR folder; returns the summary (also ``DR/build_dr_summary.json``)."""
    from tqdm import tqdm

    from curate.shards import atomic_write_json, completed_shards, finalize_folder, is_complete, read_sizes

    started = time.time()
    images = image_shards(cfg.images)
    source = open_source(cfg)
    ident = identity(cfg, images, source)
    _check_output(cfg, ident)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_FILE, {"config": to_dict(cfg), "config_class": f"{__name__}.BuildDRConfig",
                                          "identity": ident, "captions": source.describe(), **_versions()})
    ids = {shard_id for shard_id, _ in images}
    stale = sorted(completed_shards(out) - ids)
    if stale:
        raise UsageError(f"{out}: holds shards {stale[:5]} that the image folder has not; use --overwrite")
    pending = [(n, shard_id, path) for n, (shard_id, path) in enumerate(images) if not is_complete(out, shard_id)]
    work = _work(cfg)
    resumed = len(images) - len(pending)
    if pending or not (out / SUMMARY_FILE).is_file():
        # every step resumes from its markers: a finished index or join is only read back
        with Workers(cfg.num_workers) as workers:
            join_counts, index_counts = _index_and_join(cfg, images, source, work, workers)
            num_partitions = len(join_counts)
            sizes = read_sizes(cfg.images) if os.path.isdir(cfg.images) else {}
            total = sum(sizes.get(os.path.basename(p), 0) for _, _, p in pending) or None
            bar = tqdm(total=total, desc="build-dr", unit="img", disable=not cfg.progress or not pending,
                       dynamic_ncols=True)
            tasks = [{"cfg": cfg, "source": source, "n": n, "shard_id": shard_id, "path": path, "work": str(work),
                      "num_partitions": num_partitions} for n, shard_id, path in pending]
            workers.map(write_output_shard, tasks, bar, weight=lambda r: r["count"])
            bar.close()
        _write_uid_lists(out, work, num_partitions)
        join_summary = {"join": _sum_counts(join_counts), "index": index_counts}
    else:  # finished before: the join's counts are in the summary (the work folder is gone)
        previous = json.loads((out / SUMMARY_FILE).read_text())
        join_summary = {"join": previous["join"], "index": previous["index"]}
    finalize_folder(out)
    summary = summarize(cfg, images, source, join_summary, resumed, time.time() - started)
    atomic_write_json(out / SUMMARY_FILE, summary)
    _write_dr_uids(out)
    if cfg.card:
        write_dr_card(cfg, source, summary)
    if summary["reconciled"] and not cfg.keep_work and work.is_dir():
        shutil.rmtree(work)
    return summary


def _index_and_join(cfg: BuildDRConfig, images, source: CaptionSource, work: Path, workers: Workers):
    from tqdm import tqdm

    from curate.shards import atomic_write_json

    (work / "index").mkdir(parents=True, exist_ok=True)
    image_tasks = [{"n": n, "path": path, "work": str(work)} for n, (_, path) in enumerate(images)]
    caption_tasks = [{"n": n, "work": str(work), "source": source} for n in range(len(source.shards))]
    bar = tqdm(total=len(image_tasks) + len(caption_tasks), desc="index", unit="shard", disable=not cfg.progress)
    image_counts = workers.map(index_image_shard, image_tasks, bar)
    caption_counts = workers.map(index_caption_shard, caption_tasks, bar)
    bar.close()
    index_counts = {"images": _sum_counts(image_counts), "captions": _sum_counts(caption_counts)}
    layout = work / "partitions.json"
    if layout.is_file():
        num_partitions = json.loads(layout.read_text())["num_partitions"]
    else:
        largest = max(index_counts["images"].get("indexed", 0), index_counts["captions"].get("indexed_ok", 0)
                      + sum(v for k, v in index_counts["captions"].get("status_counts", {}).items() if k != "success"))
        num_partitions = max(1, math.ceil(largest / cfg.partition_rows))
        atomic_write_json(layout, {"num_partitions": num_partitions, "partition_rows": cfg.partition_rows})
    tasks = [{"p": p, "num_partitions": num_partitions, "work": str(work), "num_images": len(images),
              "num_captions": len(source.shards)} for p in range(num_partitions)]
    bar = tqdm(total=num_partitions, desc="join", unit="part", disable=not cfg.progress)
    # partitions run one at a time: each holds N/P rows of both sides, the memory bound
    join_counts = workers.map(join_partition, tasks, bar, parallel=False)
    bar.close()
    return join_counts, index_counts


def _sum_counts(items: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, dict):
                total.setdefault(key, Counter()).update(value)
            else:
                total[key] = total.get(key, 0) + value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


def _write_uid_lists(out: Path, work: Path, num_partitions: int) -> None:
    from curate.shards import save_uids

    for suffix, name in (("only_images", IMAGES_WITHOUT_CAPTIONS), ("only_captions", CAPTIONS_WITHOUT_IMAGES)):
        parts = [_load_npy(work / "join" / f"{p:05d}.{suffix}.npy", mmap=False) for p in range(num_partitions)]
        save_uids(out / name, np.concatenate(parts) if parts else _uid_array(np.zeros(0, np.uint64), np.zeros(0, np.uint64)))


def _write_dr_uids(out: Path) -> None:
    """``uids.npy``: the DR folder's samples as a DataComp uid file (reshard/subset input)."""
    from curate.shards import expand_shards, read_table, save_uids

    uids: list[np.ndarray] = []
    for tar in expand_shards(str(out)):
        table = read_table(tar, columns=["uid", "status"])
        keep = [u for u, s in zip(table.column("uid").to_pylist(), table.column("status").to_pylist(), strict=True)
                if s == "success"]
        _, hi, lo = uid_halves(keep)
        uids.append(_uid_array(hi, lo))
    save_uids(out / UIDS_FILE, np.concatenate(uids) if uids else _uid_array(np.zeros(0, np.uint64), np.zeros(0, np.uint64)))


def summarize(cfg: BuildDRConfig, images, source: CaptionSource, join_summary: dict[str, Any], resumed: int,
              seconds: float) -> dict[str, Any]:
    """Counts over every output shard, checked three ways: images in = kept + dropped[reason];
    caption uids = matched + without image + duplicates; synthetic captions in = kept + dropped[reason]."""
    from curate.shards import is_complete, shard_name

    statuses: Counter[str] = Counter()
    syn_dropped: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    missing = []
    for shard_id, _ in images:
        if not is_complete(cfg.out, shard_id):
            missing.append(shard_name(shard_id))
            continue
        stats = json.loads((Path(cfg.out) / f"{shard_name(shard_id)}_stats.json").read_text())
        statuses.update(stats["status_dict"])
        syn_dropped.update(stats["syn_dropped"])
        totals.update({"images_in": stats["num_input"], "syn_in": stats["syn_in"], "syn_kept": stats["syn_kept"],
                       "syn_unscored_kept": stats["syn_unscored_kept"], "sha256_mismatch": stats["sha256_mismatch"]})
    join, index = join_summary["join"], join_summary["index"]
    notes = []
    caption_summary = source.describe().get("caption_summary")
    if isinstance(caption_summary, dict) and caption_summary.get("num_shards_done") != caption_summary.get("num_shards"):
        notes.append(f"the caption folder is unfinished ({caption_summary.get('num_shards_done')} of "
                     f"{caption_summary.get('num_shards')} shards captioned): its images count as no_caption")
    if join["caption_duplicates"] or join["image_duplicates"]:
        notes.append(f"duplicate uids: {join['image_duplicates']} image rows, {join['caption_duplicates']} caption rows "
                     "(the first copy of each was used)")
    if join["matched"] and not totals["syn_in"]:
        notes.append(f"none of the {join['matched']} matched caption samples holds synthetic captions (KEY.syn.json): "
                     "is --captions the output of qcap caption?")
    kept = statuses.get("success", 0)
    dropped = {k: v for k, v in sorted(statuses.items()) if k != "success"}
    caption_status = index["captions"].get("status_counts", {})
    checks = {
        "images: in = kept + dropped": totals["images_in"] == kept + sum(dropped.values()),
        "images: in = image shards' successes": totals["images_in"] == index["images"]["successes"],
        "images: matched = kept + too_few_captions": join["matched"] == kept + dropped.get("too_few_captions", 0),
        "captions: uids = matched + without image + duplicates":
            join["caption_ok_rows"] == join["matched"] + join["captions_without_images"] + join["caption_duplicates"],
        "synthetic: in = kept + dropped": totals["syn_in"] == totals["syn_kept"] + sum(syn_dropped.values()),
    }
    return {
        "out": str(cfg.out),
        "images": cfg.images,
        "captions": source.folder,
        "caption_kind": source.kind,
        "num_shards": len(images),
        "num_shards_done": len(images) - len(missing),
        "shards_missing": missing,
        "resumed_shards": resumed,
        "images_in": totals["images_in"],
        "images_kept": kept,
        "images_dropped": dropped,
        "caption_rows": index["captions"].get("rows", 0),
        "caption_rows_by_status": caption_status,
        "caption_rows_missing_uid": index["captions"].get("missing_uid", 0),
        "captions_matched": join["matched"],
        "captions_without_images": join["captions_without_images"],
        "caption_duplicates": join["caption_duplicates"],
        "image_duplicates": join["image_duplicates"],
        "synthetic_in": totals["syn_in"],
        "synthetic_kept": totals["syn_kept"],
        "synthetic_dropped": dict(sorted(syn_dropped.items())),
        "synthetic_unscored_kept": totals["syn_unscored_kept"],
        "sha256_mismatch": totals["sha256_mismatch"],
        "filters": {"drop_flags": sorted(cfg.dropped_flag_set()), "min_score": cfg.min_score,
                    "min_syn_captions": cfg.min_syn_captions},
        "files": {"images_without_captions": IMAGES_WITHOUT_CAPTIONS, "captions_without_images": CAPTIONS_WITHOUT_IMAGES,
                  "uids": UIDS_FILE},
        "notes": notes,
        "checks": checks,
        "reconciled": all(checks.values()) and not missing,
        "join": join,
        "index": index,
        "seconds": round(seconds, 3),
    }


def format_summary(summary: dict[str, Any]) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in summary["images_dropped"].items()) or "none"
    syn_dropped = ", ".join(f"{k} {v}" for k, v in summary["synthetic_dropped"].items()) or "none"
    lines = [
        f"build-dr: {summary['images_kept']} of {summary['images_in']} images with captions in "
        f"{summary['num_shards_done']}/{summary['num_shards']} shards -> {summary['out']} "
        f"({summary['resumed_shards']} shards already done)",
        f"  images dropped: {dropped}",
        f"  caption samples ({summary['caption_kind']}): {summary['captions_matched']} matched, "
        f"{summary['captions_without_images']} without an image, {summary['caption_duplicates']} duplicate uids",
        f"  synthetic captions: {summary['synthetic_kept']} of {summary['synthetic_in']} kept; dropped: {syn_dropped}",
        f"  counts reconcile: {'yes' if summary['reconciled'] else 'NO ' + str(summary['checks'])}",
    ]
    lines += [f"  note: {note}" for note in summary["notes"]]
    if summary["sha256_mismatch"]:
        lines.append(f"  note: {summary['sha256_mismatch']} samples' sha256 differ between the sides (joined by uid)")
    return "\n".join(lines)


def _versions() -> dict[str, Any]:
    import qcap

    return {"qcap_version": qcap.__version__}


def write_dr_card(cfg: BuildDRConfig, source: CaptionSource, summary: dict[str, Any]) -> dict[str, Any]:
    from curate.card import trace_lineage, write_card

    images_folder = cfg.images if os.path.isdir(cfg.images) else os.path.dirname(cfg.images)
    lineage = trace_lineage(images_folder) or [{"step": "images", "title": str(cfg.images),
                                                "note": "no config.json beside the image shards"}]
    lineage.append(_caption_step(source))
    lineage.append({
        "step": "build-dr", "title": "joined by uid, synthetic captions filtered",
        "command": f"qcap build-dr --images {cfg.images} --{'apple-syn' if cfg.apple_syn else 'captions'} "
                   f"{source.folder} --out {cfg.out}",
        "drop synthetic captions flagged": sorted(cfg.dropped_flag_set()) or "nothing",
        "min image-text score": cfg.min_score if cfg.min_score is not None else "none",
        "min synthetic captions per image": cfg.min_syn_captions,
        "real caption": "always kept, unfiltered",
        "join": "by uid only; first copy of a uid wins on each side",
    })
    counts = {
        "images in (image shards)": summary["images_in"],
        **{f"images dropped: {k}": v for k, v in summary["images_dropped"].items()},
        "caption samples without an image": summary["captions_without_images"],
        "duplicate caption uids (not used)": summary["caption_duplicates"],
        "synthetic captions in": summary["synthetic_in"],
        "synthetic captions kept": summary["synthetic_kept"],
        **{f"synthetic captions dropped: {k}": v for k, v in summary["synthetic_dropped"].items()},
    }
    return write_card(
        cfg.out,
        title=f"DataCompDR dataset: {Path(cfg.out).name}",
        description=(f"Images from {cfg.images} with their real (web) caption and synthetic captions from "
                     f"{source.folder} ({source.kind}), joined by uid. Counts reconcile: "
                     f"{'yes' if summary['reconciled'] else 'NO'} (build_dr_summary.json)."),
        lineage=lineage,
        usage=[f"qcap train --data {cfg.out} --caption-source dual ...     # real + synthetic (DataCompDR)",
               f"qcap train --data {cfg.out} --caption-source real ...     # the same images, real captions only",
               f"qcap subset --shards {cfg.out} --fraction 0.1 --seed 0 --out DIR   # nested subsets",
               f"datasets.load_dataset('webdataset', data_files={{'train': sorted(glob('{cfg.out}/*.tar'))}})"],
        summary_counts=counts,
        dropped_captions=summary["synthetic_dropped"],
        progress=cfg.progress,
    )


def _caption_step(source: CaptionSource) -> dict[str, Any]:
    info = source.describe()
    step: dict[str, Any] = {"step": "captions", "title": f"synthetic captions ({source.kind})", "folder": info["folder"]}
    if source.kind == "apple":
        step.update({k: v for k, v in info.items() if k not in ("kind", "folder")})
        return step
    config = info.get("caption_config") or {}
    captioner = config.get("captioner") or {}
    step["captioner"] = {k: captioner.get(k) for k in ("backend", "model", "source", "weights_sha256")}
    step["decoding"] = config.get("decoding") or "unknown (no caption_config.json)"
    settings = config.get("config") or {}
    step["seed"] = settings.get("seed")
    step["postprocess"] = "first sentence" if settings.get("first_sentence", True) else "whole caption"
    step["scorer"] = config.get("scorer") or "none"
    summary = info.get("caption_summary") or {}
    if summary:
        step["caption job"] = {k: summary.get(k) for k in ("images_in", "images_captioned", "images_failed", "captions",
                                                           "captions_degenerate", "reconciled")}
    return step


def main(argv: list[str], prog: str = "qcap build-dr") -> int:
    cfg = parse_config(BuildDRConfig, argv, prog=prog)
    summary = build(cfg)
    print(format_summary(summary))
    return 0 if summary["reconciled"] else 1
