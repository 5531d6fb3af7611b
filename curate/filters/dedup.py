"""Deduplication: ``qcap filter dedup --shards RAW --out dedup.npy [--subset UIDS.npy]``.

Two kinds of duplicates, one survivor per group (``--keep smallest_uid``, the default, or
``largest_image``; ties by smallest uid — deterministic whatever the shard order):

- **exact**: the same image bytes under another uid — SHA-256 of the image member of the tar.
  Grouping is a sort by digest.
- **near**: a resized and/or re-encoded copy. Candidates are pairs whose 64-bit perceptual hash
  (``imagehash.phash``: DCT of a 32×32 grey image, bits above the median) lies within
  ``--max-distance`` bits; each candidate pair is then *verified*: the two images must have the
  same shape (``|log(aspect_a / aspect_b)| <= --max-aspect-difference``; resizing keeps it) and,
  with the larger thumbnail resized onto the smaller, no 4×4-pixel block of their blurred (σ = 1)
  thumbnails (longer side 64 px) may differ by more than ``--max-block-difference`` grey levels.
  Verified pairs are joined into groups (union–find).

Why pHash and not embedding cosine: a copy that was only resized and re-encoded is what pHash is
built to survive, it needs no model (the same answer on any machine, no GPU, no weights to pin)
and it is 8 bytes an image, cheap to bucket. Embedding cosine (SemDeDup, Abbas et al. 2023;
Webster et al. 2023 on LAION-2B) also merges *semantic* duplicates — different photos of the
same thing — which is a different curation decision, and its threshold depends on the model. Why the verification: pHash is a
global low-frequency signature, so unrelated images that share a plain background (product
shots on white; the embedded world's studio scenes) collide at small distances — on a 3000-sample
world pool about one image in ten has an unrelated neighbour within 6 bits. Measured on three
world pools (seeds 0–2, 3000 samples each): every planted near copy lies within 10 bits of its
original and has a block difference ≤ 20.2; every unrelated image that pHash puts within 10 bits
of another, with the same shape, differs by ≥ 29.9 — hence the defaults 10 and 25. With them,
dedup found every planted exact and near copy and merged no unrelated images on those pools.

How it scales (100M images):

1. Hashing streams each shard once (``--num-workers`` processes), decoding JPEGs at a reduced
   DCT scale (≥ 128 px), and writes one part per shard (``OUT.hashes/{shard}.parquet`` or
   ``--hashes DIR``: sha256, phash, size, thumbnail ≈ 5–12 kB): resumable, and a later run (other
   settings, another ``--subset``) hashes only what is missing. The thumbnails make the parts
   about a tenth of the images' size.
2. Exact groups: a sort of 32-byte digests — O(N log N).
3. Near candidates never compare all pairs once there are ``--brute-force-below`` images or
   more: bit-sampling LSH over the 64-bit hashes. Each table keys every hash by ``b`` sampled bits
   (default: enough that a bucket holds about 8 hashes — 24 bits at 100M); pairs sharing a key
   in any table are candidates. A pair at distance d shares a table's key with probability
   p = C(64 - d, b) / C(64, b), so ``T`` tables find it with 1 - (1 - p)^T; the default ``T``
   reaches ``--lsh-recall`` at ``--max-distance`` (the report gives the figures). The work is
   T sorts of N keys plus ~8 pair checks per image per table. The radius sets T: at 100M and
   99% recall, ``--max-distance 4`` needs 30 tables, 6 needs 88, 10 needs 821 — at that scale
   choose 4–6 (re-encoded copies mostly land within 4 bits; the world's worst case is 10).
   The search is partitioned (:mod:`curate.filters.near`): every bucket falls in one of ``P``
   partitions, each searched by its own task holding about ``--near-partition-rows`` rows, on
   the ``--num-workers`` pool or the nodes of a Ray cluster (``--ray-address``, as the hashing);
   the pairs found do not depend on ``P`` or on where the tasks ran.
4. Verification reads thumbnails only of images in candidate pairs.

Memory: in the driver, per image the uid, digest, hash and a few integers (~100 bytes: ~10 GB at
100M); thumbnails only for candidates. The LSH search holds no table of every hash: a task holds
its partition.

Per row, not per uid: the same uid can be in a folder twice (two overlapping downloads of one
pool row); each row is a member of the groups on its own, so two rows of one uid with the same
image are an exact group of two that keeps one of them — the uid stays in the uid file — and
two rows of one uid with different images are not duplicates at all. Ties in the survivor
order (same uid) go to the shard label, then the key, then the row: deterministic.

Drop reasons: ``exact_duplicate``, ``near_duplicate``, ``undecodable_image`` (bytes that do not
decode, or a pixel bomb: ``base.shards.decode_image`` checks the pixel bound before decoding),
``no_image`` (no image member, or the tar lacks the sample its Parquet lists), ``bad_member``
(a ``KEY.json`` that is not a JSON object, two members of one kind), ``unreadable_shard`` (the
tar breaks before the sample), and the runner's ``bad_uid``. A sample without ``KEY.json`` is
hashed like any other (the uid comes from the Parquet).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from base.shards import atomic_write_bytes, atomic_write_json, decode_image
from curate.filters.base import BaseFilter, FilterRecord, Keep, candidate_mask, report_dir_of, run_filter
from curate.filters.config import DedupConfig
from curate.filters.members import UNREADABLE_SHARD, SampleProblem, label_stem, read_wanted, shard_labels
from curate.filters.near import hamming, pairs_lsh_partitioned
from curate.filters.report import Histogram, linear_edges

log = logging.getLogger(__name__)

HASH_SIZE = 8  # pHash side: 64 bits, stored in one uint64
DECODE_DRAFT = 128  # JPEGs decode at a DCT scale keeping both sides >= this
THUMB_SIDE = 64  # thumbnails for verification: longer side in pixels, aspect kept
THUMB_BLUR = 1.0  # Gaussian sigma applied to thumbnails (hides re-encoding noise at edges)
BLOCK = 4  # verification block side in thumbnail pixels
UNDECODABLE = "undecodable_image"
HASH_SETTINGS = {"version": 2, "phash_hash_size": HASH_SIZE, "decode_draft": DECODE_DRAFT, "thumb_side": THUMB_SIDE,
                 "thumb_blur": THUMB_BLUR}
SETTINGS_FILE = "settings.json"
NEAR_CHUNK_ROWS = 1_000_000  # hashes per bucketing task of the partitioned LSH search
PART_COLUMNS = ("key", "sha256", "phash", "width", "height", "thumb", "thumb_width", "thumb_height", "reason", "error")


# --------------------------------------------------------------------------------------------
# Hashing


def image_hashes(data: bytes) -> dict[str, Any]:
    """SHA-256 of the bytes, pHash, size and verification thumbnail of one image."""
    import imagehash
    from PIL import Image, ImageFilter

    out: dict[str, Any] = {"sha256": hashlib.sha256(data).digest(), "phash": None, "width": None, "height": None,
                           "thumb": None, "thumb_width": None, "thumb_height": None, "reason": None, "error": None}
    try:
        image = decode_image(data, draft=DECODE_DRAFT)  # the pixel bound first: a bomb never reaches PIL's open
        with Image.open(io.BytesIO(data)) as header:  # the size before any draft scaling
            out["width"], out["height"] = header.size
    except (ValueError, OSError) as err:
        out["reason"], out["error"] = UNDECODABLE, str(err)[:200]
        return out
    bits = imagehash.phash(image, hash_size=HASH_SIZE).hash.flatten()
    out["phash"] = int(np.packbits(bits).view(">u8")[0])
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    thumb = thumb.filter(ImageFilter.GaussianBlur(THUMB_BLUR))
    out["thumb"] = thumb.tobytes()
    out["thumb_width"], out["thumb_height"] = thumb.size
    return out


def _part_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("sha256", pa.binary(32)), ("phash", pa.uint64()),
        ("width", pa.int32()), ("height", pa.int32()), ("thumb", pa.binary()), ("thumb_width", pa.int16()),
        ("thumb_height", pa.int16()), ("reason", pa.string()), ("error", pa.string()),
    ])


def sample_hashes(sample) -> dict[str, Any]:
    """:func:`image_hashes` of one tar sample, or the reason it has none (a row of the part)."""
    try:
        sample.meta()  # a KEY.json that is there must be an object (no KEY.json is fine)
        data = sample.image()
    except SampleProblem as problem:
        return {"sha256": None, "phash": None, "width": None, "height": None, "thumb": None, "thumb_width": None,
                "thumb_height": None, "reason": problem.reason, "error": problem.message[:300]}
    return image_hashes(data)


def hash_shard(task: tuple[str, list[str], str]) -> tuple[str, int, list[dict[str, Any]]]:
    """Hash ``keys`` of one shard into its part (rows already there for other keys are kept).

    Returns (tar, keys done, rows not stored): a sample past the point where the tar breaks is
    not stored in the part (a re-downloaded tar gets hashed again), it is returned instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tar, keys, part = task
    rows, transient = [], []
    for sample in read_wanted(tar, keys):
        row = {"key": sample.key, **sample_hashes(sample)}
        (transient if row["reason"] == UNREADABLE_SHARD else rows).append(row)
    if rows:
        found = {r["key"] for r in rows}
        if os.path.exists(part):
            old = pq.read_table(part).to_pylist()
            rows = [r for r in old if r["key"] not in found] + rows
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=_part_schema()), sink)
        atomic_write_bytes(part, sink.getvalue())
    return tar, len(keys), transient


# --------------------------------------------------------------------------------------------
# Grouping


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def pairs_brute_force(hashes: np.ndarray, max_distance: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) within ``max_distance``, and each hash's nearest distance to another."""
    n = len(hashes)
    nearest = np.full(n, 64, dtype=np.int16)
    found_i, found_j = [], []
    for start in range(0, n, chunk):
        block = hamming(hashes[start:start + chunk, None], hashes[None, :])
        rows = np.arange(start, min(n, start + chunk))
        block[rows - start, rows] = 99  # not oneself
        nearest[rows] = block.min(axis=1)
        i, j = np.nonzero(block <= max_distance)
        keep = rows[i] < j
        found_i.append(rows[i][keep])
        found_j.append(j[keep])
    pairs = np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1) if n else np.zeros((0, 2), np.int64)
    return pairs.astype(np.int64), nearest


def lsh_parameters(n: int, max_distance: int, recall: float, bits: int = 0, tables: int = 0) -> tuple[int, int, float]:
    """(bits per table, tables, recall at max_distance) of bit-sampling LSH over 64-bit hashes."""
    if bits <= 0:
        bits = int(np.clip(math.ceil(math.log2(max(n, 2) / 8)), 8, 64))
    bits = min(bits, 64 - max_distance)
    p = math.comb(64 - max_distance, bits) / math.comb(64, bits)
    if tables <= 0:
        tables = 1 if p >= recall else int(math.ceil(math.log(1 - recall) / math.log(1 - p)))
    return bits, tables, 1 - (1 - p) ** tables


def block_difference(a: tuple[bytes, int, int], b: tuple[bytes, int, int]) -> float:
    """Largest mean difference of a BLOCK×BLOCK block after resizing the larger thumbnail onto the smaller."""
    from PIL import Image

    ia = Image.frombytes("RGB", (a[1], a[2]), a[0])
    ib = Image.frombytes("RGB", (b[1], b[2]), b[0])
    if ia.width * ia.height > ib.width * ib.height:
        ia, ib = ib, ia
    ib = ib.resize(ia.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(ia, np.float32) - np.asarray(ib, np.float32)).mean(axis=-1)
    h, w = diff.shape
    bh, bw = min(BLOCK, h), min(BLOCK, w)
    h2, w2 = h - h % bh, w - w % bw
    return float(diff[:h2, :w2].reshape(h2 // bh, bh, w2 // bw, bw).mean(axis=(1, 3)).max())


# --------------------------------------------------------------------------------------------
# The filter


class DedupFilter(BaseFilter):
    name = "dedup"
    value_types: ClassVar[dict[str, str]] = {
        "sha256": "string", "phash": "string", "duplicate_of": "string", "duplicate_of_sample": "string",
        "group_size": "int32",
        "nearest_phash_distance": "int32", "block_difference": "float32",
    }

    def __init__(self, cfg: DedupConfig) -> None:
        super().__init__(cfg)
        self.cfg: DedupConfig = cfg
        self.result: dict[tuple[str, int], dict[str, Any]] = {}  # (tar, Parquet row) -> reason and measurements
        self.facts: dict[str, Any] = {}

    # ---- hashing
    def hashes_dir(self) -> Path:
        return self.cfg.hashes if self.cfg.hashes is not None else self.cfg.out.with_name(self.cfg.out.stem + ".hashes")

    def output_paths(self) -> list[Path]:
        return [self.hashes_dir() / SETTINGS_FILE]

    def _part(self, label: str) -> Path:
        return self.hashes_dir() / f"{label_stem(label)}.parquet"

    @staticmethod
    def _clear_stale_hashes(folder: Path) -> None:
        """A hash folder made with other hash settings loses dedup's own files (``settings.json``,
        the per-shard ``*.parquet`` parts, their temporaries) and is hashed again; any other file
        stays. A folder holding files but no ``settings.json`` is not dedup's: a UsageError."""
        from base.cli import UsageError

        if not folder.exists():
            return
        if not folder.is_dir():
            raise UsageError(f"--hashes {folder}: is a file; the dedup hashes are a folder")
        settings = folder / SETTINGS_FILE

        def own(path: Path) -> bool:
            return path.is_file() and not path.is_symlink() and (
                path.name == SETTINGS_FILE or path.suffix == ".parquet" or path.name.startswith(".") and ".tmp" in path.name)

        if not settings.exists():
            if any(not (own(p) and p.name.startswith(".")) for p in folder.iterdir()):  # a kill leaves only temporaries
                raise UsageError(f"--hashes {folder}: holds files but no {SETTINGS_FILE}, so dedup did not make it; "
                                 "choose another --hashes (or an empty folder)")
            return
        try:
            same = json.loads(settings.read_text(encoding="utf-8")) == HASH_SETTINGS
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            same = False
        if same:
            return
        log.info("dedup: %s was made with other hash settings; hashing again", folder)
        for path in list(folder.iterdir()):
            if own(path):
                path.unlink()

    def _hash_all(self, shards: Sequence[str], subset: np.ndarray | None, workers
                  ) -> tuple[list[tuple[str, list[int], list[str], list[str]]], dict[tuple[str, str], dict[str, Any]]]:
        """Hash every candidate not hashed yet; returns (tar, candidate rows, their keys, their uids) per
        shard, and the rows of samples the tar broke before (not stored), by (tar, key)."""
        import pyarrow.parquet as pq
        from tqdm import tqdm

        folder = self.hashes_dir()
        self._clear_stale_hashes(folder)
        settings = folder / SETTINGS_FILE
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(settings, HASH_SETTINGS)
        labels = shard_labels(shards)
        per_shard, tasks = [], []
        for tar in shards:
            rows = self.read_rows(tar)
            usable, inside = candidate_mask(rows, subset)
            chosen = [int(i) for i in np.flatnonzero(usable & inside)]
            keys = [rows.keys[i] for i in chosen]
            per_shard.append((tar, chosen, keys, [rows.uids[i] for i in chosen]))
            part = self._part(labels[tar])
            have = set(pq.read_table(part, columns=["key"]).column("key").to_pylist()) if part.exists() else set()
            missing = sorted({k for k in keys if k not in have})  # a key twice in a Parquet is hashed once
            if missing:
                tasks.append((tar, missing, str(part)))
        total = sum(len(t[1]) for t in tasks)
        self.facts["num_hashed_now"] = total
        bar = tqdm(total=total, desc="dedup: hashing", unit="img", disable=not self.cfg.progress or not tasks)
        transient: dict[tuple[str, str], dict[str, Any]] = {}
        for tar, done, unstored in workers.imap(hash_shard, tasks):  # a local pool or Ray tasks
            transient.update({(tar, r["key"]): r for r in unstored})
            bar.update(done)
        bar.close()
        return per_shard, transient

    # ---- grouping
    def prepare(self, shards: Sequence[str], subset: np.ndarray | None) -> None:
        from base.workers import Workers

        cfg = self.cfg
        with Workers(cfg.num_workers, ray_address=cfg.ray_address) as workers:
            self._prepare(shards, subset, workers)

    def _prepare(self, shards: Sequence[str], subset: np.ndarray | None, workers) -> None:
        import pyarrow.parquet as pq

        cfg = self.cfg
        per_shard, transient = self._hash_all(shards, subset, workers)
        labels = shard_labels(shards)
        # one entry per candidate *row* (a uid or a key can repeat): its place and hashes
        places: list[tuple[str, int]] = []  # (tar, row in its Parquet): the result's key
        uids: list[str] = []
        names: list[str] = []  # "label key": what duplicate_of_sample names
        shas: list[bytes] = []
        phashes: list[int] = []
        areas: list[int] = []
        aspects: list[float] = []
        where: list[tuple[int, int]] = []  # (shard index, row in part) for loading thumbnails later
        unusable: Counter = Counter()
        for s, (tar, chosen, keys, row_uids) in enumerate(per_shard):
            if not keys:
                continue
            part_file = self._part(labels[tar])
            part = pq.read_table(part_file, columns=["key", "sha256", "phash", "width", "height", "reason", "error"]
                                 ).to_pydict() if part_file.exists() else {c: [] for c in ("key", "reason")}
            index = {k: r for r, k in enumerate(part["key"])}
            for i, key, uid in zip(chosen, keys, row_uids, strict=True):
                r = index.get(key)
                if r is None:  # not stored: the tar broke before it
                    row = transient[(tar, key)]
                    self.result[(tar, i)] = {"reason": row["reason"], "error": row["error"]}
                    unusable[row["reason"]] += 1
                    continue
                if part["reason"][r] is not None:
                    self.result[(tar, i)] = {"reason": part["reason"][r], "error": part["error"][r]}
                    unusable[part["reason"][r]] += 1
                    continue
                places.append((tar, i))
                uids.append(uid)
                names.append(f"{labels[tar]} {key}")
                shas.append(part["sha256"][r])
                phashes.append(part["phash"][r])
                areas.append(int(part["width"][r]) * int(part["height"][r]))
                aspects.append(math.log(part["width"][r] / part["height"][r]))
                where.append((s, r))
        n = len(uids)
        # preference: smaller rank survives (policy, then uid, then shard label, key and row: rows of one uid)
        if n:
            uid_order = np.lexsort((np.array([p[1] for p in places], dtype=np.int64), np.array(names),
                                    np.array(uids, dtype="U32")))
        else:
            uid_order = np.zeros(0, np.int64)
        uid_rank = np.empty(n, dtype=np.int64)
        uid_rank[uid_order] = np.arange(n)
        if cfg.keep == "largest_image":
            rank_order = np.lexsort((uid_rank, -np.array(areas, dtype=np.int64))) if n else uid_order
        else:
            rank_order = uid_order
        rank = np.empty(n, dtype=np.int64)
        rank[rank_order] = np.arange(n)

        # exact groups: one representative (best rank) per digest
        sha_array = np.array(shas, dtype="S32") if n else np.zeros(0, dtype="S32")
        by_sha = np.lexsort((rank, sha_array)) if n else np.zeros(0, np.int64)
        rep = np.arange(n)
        if n:
            sorted_sha = sha_array[by_sha]
            first = np.r_[True, sorted_sha[1:] != sorted_sha[:-1]]
            heads = by_sha[first]
            group_of_sorted = np.cumsum(first) - 1
            rep[by_sha] = heads[group_of_sorted]
        reps = np.flatnonzero(rep == np.arange(n))
        self.facts.update(num_images=n, num_undecodable=unusable[UNDECODABLE], num_unusable=dict(unusable),
                          num_exact_groups=int(np.sum(np.bincount(rep, minlength=n) > 1)) if n else 0)

        # near groups among representatives
        union = UnionFind(n)
        nearest = np.full(n, -1, dtype=np.int16)
        best_block = np.full(n, np.nan, dtype=np.float32)
        if cfg.near and len(reps) > 1:
            hashes = np.array(phashes, dtype=np.uint64)[reps]
            if len(reps) < cfg.brute_force_below:
                pairs, near_rep = pairs_brute_force(hashes, cfg.max_distance)
                self.facts["candidates_by"] = "all pairs"
            else:
                bits, tables, recall = lsh_parameters(len(reps), cfg.max_distance, cfg.lsh_recall, cfg.lsh_bits, cfg.lsh_tables)
                pairs, near_rep, layout = pairs_lsh_partitioned(
                    hashes, cfg.max_distance, bits, tables, cfg.seed, work=report_dir_of(cfg.out) / ".near-search",
                    workers=workers, partition_rows=cfg.near_partition_rows, chunk_rows=NEAR_CHUNK_ROWS)
                self.facts.update(candidates_by="lsh", lsh_bits=bits, lsh_tables=tables,
                                  lsh_recall_at_max_distance=round(recall, 6), lsh_partitions=layout["partitions"],
                                  lsh_chunks=layout["chunks"])
            nearest[reps] = near_rep
            pairs = reps[pairs]
            aspect = np.array(aspects)
            same_shape = np.abs(aspect[pairs[:, 0]] - aspect[pairs[:, 1]]) <= cfg.max_aspect_difference
            self.facts.update(num_candidate_pairs=len(pairs), num_same_shape_pairs=int(same_shape.sum()))
            pairs = pairs[same_shape]
            thumbs = self._thumbnails(per_shard, [where[i] for i in np.unique(pairs)], np.unique(pairs))
            verified = 0
            for a, b in pairs:
                diff = block_difference(thumbs[a], thumbs[b])
                best_block[a] = np.fmin(best_block[a], diff)
                best_block[b] = np.fmin(best_block[b], diff)
                if diff <= cfg.max_block_difference:
                    union.union(int(a), int(b))
                    verified += 1
            self.facts["num_verified_pairs"] = verified

        # survivors: best rank per near component (components join exact representatives)
        root = np.array([union.find(int(rep[i])) for i in range(n)], dtype=np.int64)
        keeper = {}
        for i in np.argsort(rank):  # best rank first: the first member seen of a component survives
            keeper.setdefault(int(root[i]), int(i))
        sizes = np.bincount(root, minlength=n) if n else np.zeros(0, np.int64)
        exact_size = np.bincount(rep, minlength=n) if n else np.zeros(0, np.int64)
        for i in range(n):
            r, k = int(root[i]), keeper[int(root[i])]
            if i == k:
                reason = None
            else:
                reason = "exact_duplicate" if rep[i] != i else "near_duplicate"
            distance = 0 if exact_size[rep[i]] > 1 else int(nearest[i]) if nearest[i] >= 0 else None
            self.result[places[i]] = {
                "reason": reason, "sha256": shas[i].hex(), "phash": f"{phashes[i]:016x}", "group_size": int(sizes[r]),
                "duplicate_of": uids[k] if i != k else None, "duplicate_of_sample": names[k] if i != k else None,
                "nearest_phash_distance": distance,
                "block_difference": None if np.isnan(best_block[rep[i]]) else float(best_block[rep[i]]),
            }
        reps_per_root = np.bincount(root[reps], minlength=n) if n else np.zeros(0, np.int64)
        self.facts.update(num_groups=int(np.sum(sizes > 1)), num_near_groups=int(np.sum(reps_per_root > 1)),
                          largest_group=int(sizes.max()) if n else 0)

    def _thumbnails(self, per_shard, places: list[tuple[int, int]], nodes: np.ndarray) -> dict[int, tuple[bytes, int, int]]:
        """Thumbnails of the given nodes only, read shard by shard from the parts."""
        import pyarrow.parquet as pq

        labels = shard_labels([tar for tar, *_ in per_shard])
        wanted: dict[int, list[tuple[int, int]]] = {}
        for node, (s, r) in zip(nodes, places, strict=True):
            wanted.setdefault(s, []).append((int(node), r))
        out: dict[int, tuple[bytes, int, int]] = {}
        for s, items in wanted.items():
            part = pq.read_table(self._part(labels[per_shard[s][0]]), columns=["thumb", "thumb_width", "thumb_height"])
            rows = part.take([r for _, r in items]).to_pydict()
            for k, (node, _) in enumerate(items):
                out[node] = (rows["thumb"][k], rows["thumb_width"][k], rows["thumb_height"][k])
        return out

    def annotate(self, shard: str, records: list[FilterRecord]) -> None:
        for record in records:
            found = self.result.get((record.shard, record.row))
            if found is None:  # prepare and the runner read the same rows: a bug here, not the data's fault
                raise RuntimeError(f"dedup: no hash for row {record.row} ({record.key}) of {shard}")
            record.values.update({k: v for k, v in found.items() if k not in ("reason", "error")})
            record.error = found.get("error")

    def keep(self, record: FilterRecord) -> Keep:
        reason = self.result[(record.shard, record.row)]["reason"]
        return (reason is None), reason or ""

    def histograms(self) -> list[Histogram]:
        cfg = self.cfg
        return [
            Histogram("nearest_phash_distance", "pHash distance to the nearest other image (bits of 64)",
                      linear_edges(-0.5, 32.5, 33), cutoffs=[cfg.max_distance + 0.5] if cfg.near else [],
                      reason="near_duplicate"),
            Histogram("block_difference", "thumbnail block difference to the closest pHash candidate (grey levels)",
                      linear_edges(0, 128, 64), cutoffs=[cfg.max_block_difference] if cfg.near else [],
                      reason="near_duplicate"),
        ]

    def summary(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "exact": "sha256 of the image bytes",
            "near": {"hash": f"imagehash.phash, {HASH_SIZE * HASH_SIZE} bits", "max_distance": cfg.max_distance,
                     "max_aspect_difference": cfg.max_aspect_difference,
                     "max_block_difference": cfg.max_block_difference, "thumbnail": HASH_SETTINGS} if cfg.near else None,
            "keep": cfg.keep,
            "hashes": str(self.hashes_dir()),
            **self.facts,
        }


def main(cfg: DedupConfig) -> dict:
    return run_filter(DedupFilter(cfg), cfg)
