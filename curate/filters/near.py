"""Near-duplicate candidates without every hash in one process: bit-sampling LSH, partitioned.

``pairs_lsh_partitioned`` finds the near-duplicate candidate pairs of ``qcap filter dedup``
(seeded bit positions per table; every pair within ``max_distance`` that shares a bucket in
some table; the nearest distance of each hash among its buckets' members), in two steps of
tasks that a local pool or a Ray cluster runs (:class:`base.workers.Workers`):

1. **bucket** (one task per chunk of ``chunk_rows`` hashes): every hash gets its key in each of
   the ``T`` tables and a partition, ``mix(table, key) mod P``, so a whole bucket lands in one
   partition; the chunk's rows ``(partition, table, key, node, hash)`` are written sorted by
   partition (``work/bucket/CCCCCC.npy``). A task holds its chunk alone.
2. **search** (one task per partition): partition ``p`` is one contiguous slice of every chunk
   file (found by binary search on the memory-mapped files); its rows are sorted by
   ``(table, key)`` and each bucket's pairs are checked. It returns its pairs and the nearest
   distance of each hash it saw. ``P`` is chosen so that a partition holds about
   ``partition_rows`` rows: memory per task is ``O(N·T/P)``, whatever ``N`` is.

The driver merges the pairs (unique) and the nearest distances (minimum); it holds the hashes
only to hand out chunks, as it holds every row's uid already. Work files are written
atomically, each task's result once (a killed task is re-run by the pool; its files are the
same), and the folder is removed when the search is done.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int16)


BUCKET = np.dtype([("p", "<u4"), ("t", "<u4"), ("key", "<u8"), ("node", "<i8"), ("hash", "<u8")])


def table_positions(bits: int, tables: int, seed: int) -> list[np.ndarray]:
    """The sampled bit positions of each table (``bits`` of 64, without repeats), seeded."""
    rng = np.random.default_rng(seed)
    return [rng.choice(64, size=bits, replace=False).astype(np.uint64) for _ in range(tables)]


def table_keys(hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    keys = np.zeros(len(hashes), dtype=np.uint64)
    for k, pos in enumerate(positions):
        keys |= ((hashes >> pos) & np.uint64(1)) << np.uint64(k)
    return keys


def _partition_of(table: int, keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """A bucket's partition: a splitmix64 mix of (table, key), modulo the partition count."""
    with np.errstate(over="ignore"):
        z = keys ^ (np.uint64(table) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z % np.uint64(num_partitions)).astype(np.uint32)


def _save(path: Path, array: np.ndarray) -> None:
    from base.shards import atomic_write_bytes

    sink = io.BytesIO()
    np.save(sink, array, allow_pickle=False)
    atomic_write_bytes(path, sink.getvalue())


def bucket_chunk(task: dict[str, Any]) -> int:
    """Step 1 for one chunk: its rows in every table, sorted by partition; returns the chunk index."""
    nodes, hashes = task["nodes"], task["hashes"]
    parts = []
    for t, positions in enumerate(task["positions"]):
        keys = table_keys(hashes, positions)
        rows = np.empty(len(hashes), dtype=BUCKET)
        rows["p"], rows["t"], rows["key"], rows["node"], rows["hash"] = (
            _partition_of(t, keys, task["num_partitions"]), t, keys, nodes, hashes)
        parts.append(rows)
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=BUCKET)
    rows.sort(order=["p", "t", "key", "node"], kind="stable")
    _save(Path(task["work"]) / "bucket" / f"{task['chunk']:06d}.npy", rows)
    return task["chunk"]


def search_partition(task: dict[str, Any]) -> dict[str, Any]:
    """Step 2 for one partition: every bucket's pairs within ``max_distance``, and the nearest
    distance of each hash in the partition (to another in one of its buckets)."""
    p, work = task["p"], Path(task["work"])
    parts = []
    for chunk in range(task["num_chunks"]):
        rows = np.load(work / "bucket" / f"{chunk:06d}.npy", mmap_mode="r", allow_pickle=False)
        start = int(np.searchsorted(rows["p"], p, side="left"))
        end = int(np.searchsorted(rows["p"], p, side="right"))
        if end > start:
            parts.append(np.asarray(rows[start:end]))
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=BUCKET)
    rows.sort(order=["t", "key", "node"], kind="stable")
    max_distance = task["max_distance"]
    nodes_seen: list[np.ndarray] = []
    nearest_seen: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    if len(rows):
        bucket_id = np.r_[True, (rows["t"][1:] != rows["t"][:-1]) | (rows["key"][1:] != rows["key"][:-1])]
        starts = np.flatnonzero(bucket_id)
        ends = np.r_[starts[1:], len(rows)]
        n = task["num_nodes"]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            members, hashes = rows["node"][s:e], rows["hash"][s:e]
            dist = hamming(hashes[:, None], hashes[None, :])
            np.fill_diagonal(dist, 99)
            nodes_seen.append(members)
            nearest_seen.append(dist.min(axis=1))
            i, j = np.nonzero(np.triu(dist <= max_distance, 1))
            a, b = members[i], members[j]
            codes.append(np.minimum(a, b) * n + np.maximum(a, b))
    return {
        "p": p,
        "codes": np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64),
        "nodes": np.concatenate(nodes_seen) if nodes_seen else np.zeros(0, np.int64),
        "nearest": np.concatenate(nearest_seen).astype(np.int16) if nearest_seen else np.zeros(0, np.int16),
    }


def plan(n: int, tables: int, partition_rows: int, chunk_rows: int) -> tuple[int, int]:
    """(partitions, chunks) for ``n`` hashes in ``tables`` tables."""
    num_partitions = max(1, math.ceil(n * tables / max(1, partition_rows)))
    num_chunks = max(1, math.ceil(n / max(1, chunk_rows)))
    return num_partitions, num_chunks


def pairs_lsh_partitioned(hashes: np.ndarray, max_distance: int, bits: int, tables: int, seed: int, *,
                          work: Path, workers, partition_rows: int, chunk_rows: int,
                          bar=None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Candidate pairs ``(i < j)`` of ``hashes`` (each within ``max_distance`` and sharing a
    bucket of some table) and each hash's nearest distance among its buckets, found by tasks on
    ``workers``; also the plan (partitions, chunks) for the report."""
    import shutil

    n = len(hashes)
    num_partitions, num_chunks = plan(n, tables, partition_rows, chunk_rows)
    positions = table_positions(bits, tables, seed)
    work.mkdir(parents=True, exist_ok=True)
    (work / "bucket").mkdir(exist_ok=True)
    size = math.ceil(n / num_chunks)
    chunk_tasks = [{"chunk": c, "work": str(work), "positions": positions, "num_partitions": num_partitions,
                    "nodes": np.arange(c * size, min(n, (c + 1) * size), dtype=np.int64),
                    "hashes": hashes[c * size:(c + 1) * size]} for c in range(num_chunks)]

    class _Quiet:
        def update(self, _):
            return None

    workers.map(bucket_chunk, chunk_tasks, bar or _Quiet())
    search_tasks = [{"p": p, "work": str(work), "num_chunks": num_chunks, "max_distance": max_distance,
                     "num_nodes": n} for p in range(num_partitions)]
    nearest = np.full(n, 64, dtype=np.int16)
    codes = []
    for result in workers.imap(search_partition, search_tasks):
        codes.append(result["codes"])
        np.minimum.at(nearest, result["nodes"], result["nearest"])
    shutil.rmtree(work, ignore_errors=True)  # this search's own work folder
    unique = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    pairs = np.stack([unique // n, unique % n], axis=1).astype(np.int64) if len(unique) else np.zeros((0, 2), np.int64)
    return pairs, nearest, {"partitions": num_partitions, "chunks": num_chunks}
