"""build-dr's uid join, out of core: index files, hash partitions, per-shard plans.

Steps 1 and 2 of ``qcap build-dr`` (:mod:`captioning.dr` runs them, under ``DR/.build-dr/``):

1. **index** (per input shard, in parallel): the image side from each shard's Parquet (uid,
   position among its successes); the caption side from each caption shard, by the source's
   ``index_shard`` (:mod:`captioning.dr_sources`: the byte span of every sample in a tar, or the
   row of a Parquet side table). Rows are ``(hash(uid), uid, shard, locator)``, sorted by the
   hash, one ``.npy`` per shard (24–45 bytes a sample).
2. **join** (per hash partition): partition ``p`` of ``P`` is the hash range
   ``[p·2⁶⁴/P, (p+1)·2⁶⁴/P)``, a contiguous slice of every index file (memory-mapped, found by
   binary search), so one partition holds about ``N/P`` rows of each side, and ``P`` is chosen
   so that this stays under ``--partition-rows``: memory is bounded whatever ``N`` is. The
   first copy of a uid wins on each side (lowest shard, then position); later copies are
   counted, never written twice. Each partition writes its verdicts sorted by image shard, so
   the writer of image shard ``n`` reads one slice of each partition file
   (:func:`load_shard_plan`).

Why this design: a sort/merge over 100M+ uids is what it takes when neither side is
co-sorted; hash partitions of memory-mappable sorted arrays keep every step's memory at
``O(N/P)`` or ``O(shard)``, and every step is resumable by file (atomic writes, a JSON marker
last: a finished index or partition is only read back).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from base.shards import UID_DTYPE, ShardError, atomic_write_bytes, atomic_write_json, read_table, uid_halves

if TYPE_CHECKING:
    from base.workers import Workers


class IndexedSource(Protocol):
    """What the join needs of a caption source (:class:`captioning.dr_sources.CaptionSource`):
    its shards, and one shard's index rows (:func:`caption_index_rows`) with its counts."""

    shards: list[str]

    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]: ...

# Verdicts of the join for each image sample, and what they mean.
MATCHED, NO_CAPTION, CAPTION_FAILED, DUPLICATE = 0, 1, 2, 3
VERDICTS = {NO_CAPTION: "no_caption", CAPTION_FAILED: "caption_failed", DUPLICATE: "duplicate_uid"}
VERDICT_MESSAGES = {
    NO_CAPTION: "no caption sample has this uid",
    CAPTION_FAILED: "the captioner recorded a failure for this uid (see the caption folder's Parquet)",
    DUPLICATE: "another image sample with this uid was kept (the first: lowest shard, then position)",
}

IMAGE_INDEX = np.dtype([("h", "<u8"), ("hi", "<u8"), ("lo", "<u8"), ("shard", "<i4"), ("pos", "<i4")])
CAPTION_INDEX = np.dtype([("h", "<u8"), ("hi", "<u8"), ("lo", "<u8"), ("shard", "<i4"), ("ok", "u1"),
                          ("a", "<i8"), ("b", "<i8")])
PLAN = np.dtype([("shard", "<i4"), ("pos", "<i4"), ("hi", "<u8"), ("lo", "<u8"), ("verdict", "u1"),
                 ("cshard", "<i4"), ("a", "<i8"), ("b", "<i8")])
UID_KEY = np.dtype([("hi", "<u8"), ("lo", "<u8")])


# --------------------------------------------------------------------------------------------
# uids, hashes and work files


def uid_hash(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """A 64-bit mix of a uid (splitmix64 finaliser): uniform even for uids that are not hashes."""
    with np.errstate(over="ignore"):
        z = hi ^ (lo * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uid_records(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """DataComp uid records (``UID_DTYPE``) from the high and low halves, in order."""
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


def save_npy(path: Path, array: np.ndarray) -> None:
    """A work file, atomically (no pickle)."""
    sink = io.BytesIO()
    np.save(sink, array, allow_pickle=False)
    atomic_write_bytes(path, sink.getvalue())


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """A work file, memory-mapped by default; an unreadable one says how to rebuild it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable work file ({err}); delete {path.parent.parent} to rebuild it") from err


# --------------------------------------------------------------------------------------------
# Step 1: index


def caption_index_rows(uids: list[str | None], ok: list[bool], a: list[int], b: list[int],
                       shard: int) -> tuple[np.ndarray, int]:
    """A caption shard's index rows (``CAPTION_INDEX``, sorted by hash) from its samples' uids,
    success flags and locators ``(a, b)``; and how many rows had no valid uid (left out)."""
    valid, hi, lo = uid_halves(uids)
    rows = np.empty(int(valid.sum()), dtype=CAPTION_INDEX)
    rows["hi"], rows["lo"], rows["shard"] = hi, lo, shard
    rows["ok"] = np.array(ok, dtype=np.uint8)[valid]
    rows["a"] = np.array(a, dtype=np.int64)[valid]
    rows["b"] = np.array(b, dtype=np.int64)[valid]
    rows["h"] = uid_hash(hi, lo)
    rows.sort(order=["h", "hi", "lo"], kind="stable")
    return rows, int((~valid).sum())


def index_image_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Image shard ``n``: (hash, uid, shard, position among successes) from its Parquet."""
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
    save_npy(target, rows)
    counts = {"successes": len(uids), "indexed": len(rows), "missing_uid": int((~valid).sum()),
              "failed_rows": len(statuses) - len(uids)}
    atomic_write_json(counts_path, counts)
    return counts


def index_caption_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Caption shard ``n`` of ``task['source']`` (a :class:`captioning.dr_sources.CaptionSource`)."""
    n, work, source = task["n"], Path(task["work"]), task["source"]
    target = work / "index" / "captions" / f"{n:06d}.npy"
    counts_path = target.with_suffix(".json")
    if counts_path.is_file():
        return json.loads(counts_path.read_text())
    rows, counts = source.index_shard(n)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_npy(target, rows)
    counts["indexed_ok"] = int(rows["ok"].sum())
    atomic_write_json(counts_path, counts)
    return counts


# --------------------------------------------------------------------------------------------
# Step 2: join, one hash partition at a time


def join_partition(task: dict[str, Any]) -> dict[str, Any]:
    """Verdicts for every image row of hash partition ``p``, sorted by (image shard, position);
    plus this partition's one-sided uids and counts."""
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
    save_npy(out.with_suffix(".npy"), plan)
    save_npy(out.parent / f"{p:05d}.only_images.npy", uid_records(only_images["hi"], only_images["lo"]))
    save_npy(out.parent / f"{p:05d}.only_captions.npy", uid_records(only_captions["hi"], only_captions["lo"]))
    atomic_write_json(counts_path, counts)  # last: the partition's completion marker
    return counts


def _gather(folder: Path, count: int, lo_h: int, hi_h: int | None, dtype: np.dtype) -> np.ndarray:
    parts = [_slice(load_npy(folder / f"{n:06d}.npy"), lo_h, hi_h) for n in range(count)]
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


def index_and_join(images: list[tuple[int, str]], source: IndexedSource, work: Path, workers: Workers, *,
                   partition_rows: int, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Steps 1 and 2 over every input shard and partition (each resumes from its marker);
    returns the partitions' counts and the summed index counts."""
    from tqdm import tqdm

    (work / "index").mkdir(parents=True, exist_ok=True)
    image_tasks = [{"n": n, "path": path, "work": str(work)} for n, (_, path) in enumerate(images)]
    caption_tasks = [{"n": n, "work": str(work), "source": source} for n in range(len(source.shards))]
    bar = tqdm(total=len(image_tasks) + len(caption_tasks), desc="index", unit="shard", disable=not progress)
    image_counts = workers.map(index_image_shard, image_tasks, bar)
    caption_counts = workers.map(index_caption_shard, caption_tasks, bar)
    bar.close()
    index_counts = {"images": sum_counts(image_counts), "captions": sum_counts(caption_counts)}
    layout = work / "partitions.json"
    if layout.is_file():
        num_partitions = json.loads(layout.read_text())["num_partitions"]
    else:
        largest = max(index_counts["images"].get("indexed", 0), index_counts["captions"].get("indexed_ok", 0)
                      + sum(v for k, v in index_counts["captions"].get("status_counts", {}).items() if k != "success"))
        num_partitions = max(1, math.ceil(largest / partition_rows))
        atomic_write_json(layout, {"num_partitions": num_partitions, "partition_rows": partition_rows})
    tasks = [{"p": p, "num_partitions": num_partitions, "work": str(work), "num_images": len(images),
              "num_captions": len(source.shards)} for p in range(num_partitions)]
    bar = tqdm(total=num_partitions, desc="join", unit="part", disable=not progress)
    # partitions run one at a time: each holds N/P rows of both sides, the memory bound
    join_counts = workers.map(join_partition, tasks, bar, parallel=False)
    bar.close()
    return join_counts, index_counts


def sum_counts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of several shards or partitions added up (nested dicts added key by key)."""
    total: dict[str, Any] = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, dict):
                total.setdefault(key, Counter()).update(value)
            else:
                total[key] = total.get(key, 0) + value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


def load_shard_plan(work: Path, n: int, num_partitions: int) -> np.ndarray:
    """Image shard ``n``'s verdicts, from its slice of every partition file, by position."""
    parts = []
    for p in range(num_partitions):
        plan = load_npy(work / "join" / f"{p:05d}.npy")
        shard = plan["shard"]
        start = int(np.searchsorted(shard, n, side="left"))
        end = int(np.searchsorted(shard, n, side="right"))
        if end > start:
            parts.append(np.asarray(plan[start:end]))
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=PLAN)
    return rows[np.argsort(rows["pos"], kind="stable")]

