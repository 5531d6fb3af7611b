"""``qcap build-dr``: join curated images and synthetic captions by uid into DataCompDR shards.

Usage::

    qcap build-dr --images runs/demo/curated --captions runs/demo/syn --out runs/demo/dr
    qcap build-dr --images datacomp12m/shards --apple-syn DataCompDR-12M/ --out dr12m --num-workers 16
    qcap build-dr ... --drop-flags degenerate truncated --min-score 0.2 --min-syn-captions 2
    qcap build-dr --images curated --captions syn-l14 --tagged-captions coca_b=syn-b coca_dfn=syn-dfn --out dr

Output shard ``i`` holds the images of image shard ``i`` (same id, same keys, same order), each
with its real caption (``KEY.txt``), its synthetic captions (Apple's ``KEY.syn.json``), qcap's
provenance (``KEY.qcap.json``, with a ``dr`` block: which captions were kept and why others
were dropped) and, from Apple's shards, ``KEY.paug.json``/``KEY.npz``/``KEY.url.txt``. Every
image appears in the output Parquet; the ones that could not be built are rows with a status
(``no_caption``, ``caption_failed``, ``too_few_captions``, ``duplicate_uid``, ``missing_uid``).
Caption-side uids without an image are counted and listed (``captions_without_images.npy``).

Several captioners per image (MobileCLIP2): each ``--tagged-captions TAG=DIR`` source is indexed
and joined by uid on its own (``DR/.build-dr/tagged/syn_text_<TAG>/``, the same memory bound) and
its captions of a kept image, after the same caption filters, are stored under
``syn_text_<TAG>`` (``KEY.syn_tags.json``, that source's provenance with its ``dr`` block in
``KEY.qcap_tags.json``; :mod:`base.multicaption`). A source's captions are its ``syn_text``, or
for ``qcap caption --tag`` output its one tagged key. An image a tagged source lacks is kept
(only ``--captions`` decides which images are kept) and counted per source and outcome; the
summary reconciles each source on its own. Training picks keys by regex
(``qcap train --syn-text-key-regex``); run ``qcap reinforce`` after build-dr so the teacher text
embeddings cover every key.

The join is by uid only — keys and sha256 do not survive a re-download. It is built for
folders that are large and not co-sorted, in four resumable steps under ``DR/.build-dr/``,
one module each:

1. **index** and 2. **join** (:mod:`captioning.dr_join`): every input shard becomes a sorted
   ``.npy`` of ``(hash(uid), uid, shard, locator)``; hash partitions of those files, each under
   ``--partition-rows`` rows a side, give every image sample its verdict and caption locator.
   The caption side is read through a source (:mod:`captioning.dr_sources`: qcap's caption
   shards or side tables, Apple's DataCompDR tars).
3. **write** (here, per output shard, in parallel): the shard's verdicts are the slices of the
   ``P`` partition files for that shard; the image shard is streamed once and each matched caption
   is read by its locator (a seek and one read; open caption shards are kept in a small LRU, so
   co-sorted inputs read sequentially and scattered ones cost one seek per sample, never a
   re-read of whole shards). Parquet side tables are read whole per caption shard, cached. The
   caption-quality controls (``--drop-flags``, ``--min-score``, ``--min-syn-captions``) apply here.
4. **finish** (here): ``sizes.json``, uid lists of one-sided samples, ``summary.json``
   with counts that reconcile, the dataset card; the work folder is removed.

The caption payloads are never copied into an intermediate shuffle: locators let the writer
fetch exactly the bytes it needs. A re-run with the same inputs and settings resumes; other
inputs or settings are refused (``--overwrite`` starts again).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from base.card import CaptionStats, trace_lineage, write_card
from base.config import arg, output_settings, parse_config
from base.multicaption import TAGS_MEMBER, TAGS_PROVENANCE_MEMBER, encode_tags, key_of
from base.shards import (
    Sample,
    ShardError,
    ShardWriter,
    expand_shards,
    finalize_folder,
    is_complete,
    is_uid,
    iter_samples,
    read_shard_stats,
    read_sizes,
    read_table,
    save_uids,
    shard_name,
    uid_halves,
)
from base.stage import (
    RUN_RECORDS,
    CardStageConfig,
    claim_output,
    make_folder,
    read_run_record,
    refuse_stale,
    run_record_path,
    shards_by_id,
    write_run_records,
)
from base.workers import Workers
from captioning.apple import provenance as apple_provenance
from captioning.apple import realign_embeddings
from captioning.dr_join import (
    MATCHED,
    NO_CAPTION,
    VERDICT_MESSAGES,
    VERDICTS,
    index_and_join,
    load_npy,
    load_shard_plan,
    sum_counts,
    uid_records,
)
from captioning.dr_sources import CaptionRecord, CaptionSource, open_source
from captioning.quality import DEGENERATE, FLAGS

log = logging.getLogger(__name__)

IMAGES_WITHOUT_CAPTIONS = "images_without_captions.npy"
CAPTIONS_WITHOUT_IMAGES = "captions_without_images.npy"
UIDS_FILE = "uids.npy"
WORK_DIR = ".build-dr"
# Severity order: a caption with several flags is counted under the first of these it has.
FLAG_ORDER = ("empty", "no_letters", "repeated_word", "repeated_phrase", "low_diversity", "too_short", "truncated")


@dataclass(kw_only=True)
class BuildDRConfig(CardStageConfig):
    """Join curated image shards and synthetic captions by uid into DataCompDR shards (resumable)."""

    STAGE: ClassVar[str] = "build-dr"  # its name in dataset cards' lineage

    images: str = arg(help="curated image shards: folder, brace pattern or glob (tar + Parquet, with uids)")
    captions: str | None = arg(None, help="qcap caption output folder (webdataset or --format parquet side tables)")
    apple_syn: str | None = arg(None, help="instead of --captions: a folder of Apple's DataCompDR caption/embedding tars")
    out: Path = arg(shapes_output=False, help="output DR shard folder (shard i holds image shard i's samples)", metavar="DR")
    tagged_captions: tuple[str, ...] = arg(
        (), help="further caption sources, TAG=FOLDER each (qcap caption output of other captioners, MobileCLIP2-style): "
                 "joined by uid like --captions, stored under syn_text_<TAG> (KEY.syn_tags.json, provenance per tag in "
                 "KEY.qcap_tags.json); the caption filters apply to each; an image one of them lacks is kept and counted",
        metavar="TAG=DIR")
    drop_flags: tuple[str, ...] = arg(("degenerate",), help="drop synthetic captions with these flags: "
                                      "'degenerate' (empty, too_short, no_letters, repeated_*, low_diversity), "
                                      "single flags (e.g. too_short truncated), or 'none'")
    min_score: float | None = arg(None, help="drop synthetic captions whose image-text score is below this (unscored ones are kept and counted)")
    min_syn_captions: int = arg(1, help="images left with fewer synthetic captions are dropped (status too_few_captions)")
    partition_rows: int = arg(2_000_000, shapes_output=False, help="join memory bound: about this many index rows per "
                                                                   "side per partition (the join runs in this process, "
                                                                   "partition by partition, on any pool)")
    open_files: int = arg(16, shapes_output=False, help="caption shards kept open per writer (LRU)")
    keep_work: bool = arg(False, shapes_output=False, help=f"keep the index and join files in DR/{WORK_DIR} when done")

    def __post_init__(self) -> None:
        if (self.captions is None) == (self.apple_syn is None):
            raise ValueError("captions: give exactly one of --captions (qcap caption output) or --apple-syn (Apple's shards)")
        self.tagged()  # TAG=FOLDER, valid tags, no tag twice
        known = set(FLAGS) | {"degenerate", "none"}
        unknown = [f for f in self.drop_flags if f not in known]
        if unknown:
            raise ValueError(f"drop_flags: unknown flag(s) {unknown}; choose from {sorted(known)}")
        if "none" in self.drop_flags and len(self.drop_flags) > 1:
            raise ValueError("drop_flags: 'none' cannot be combined with other flags")
        for name in ("min_syn_captions", "num_workers", "partition_rows", "open_files"):
            if getattr(self, name) < (0 if name == "min_syn_captions" else 1):
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        super().__post_init__()  # the run fields (base.stage.CardStageConfig)

    def tagged(self) -> list[tuple[str, str]]:
        """``--tagged-captions`` as (caption key ``syn_text_<TAG>``, folder), in the given order."""
        out: list[tuple[str, str]] = []
        for item in self.tagged_captions:
            tag, sep, folder = item.partition("=")
            if not sep or not folder:
                raise ValueError(f"tagged_captions: {item!r} is not TAG=FOLDER (e.g. coca_l14=runs/syn-l14)")
            try:
                key = key_of(tag)
            except ValueError as err:
                raise ValueError(f"tagged_captions: {err}") from err
            if any(key == k for k, _ in out):
                raise ValueError(f"tagged_captions: tag {tag!r} is given twice")
            out.append((key, folder))
        return out

    def dropped_flag_set(self) -> frozenset[str]:
        flags: set[str] = set()
        for name in self.drop_flags:
            if name == "degenerate":
                flags |= DEGENERATE
            elif name != "none":
                flags.add(name)
        return frozenset(flags)


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

        provenance = apple_provenance([record.flags[i] for i in kept])
    provenance["dr"] = {"source": source, "caption_shard": shard_name, "num_generated": len(record.syn_text),
                        "kept": kept, "dropped": dict(sorted(dropped.items()))}
    return provenance


def write_output_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Stream image shard ``n`` once and write DR shard ``shard_id``; returns its counts."""
    cfg: BuildDRConfig = task["cfg"]
    source: CaptionSource = task["source"]
    n, shard_id, image_tar = task["n"], task["shard_id"], task["path"]
    plan = load_shard_plan(Path(task["work"]), n, task["num_partitions"])
    drop = cfg.dropped_flag_set()
    reader = source.reader(cfg.open_files)
    tagged = [TaggedPlan(key, tsource, load_shard_plan(Path(twork), n, tparts), tsource.reader(cfg.open_files))
              for key, tsource, twork, tparts in task.get("tagged", ())]
    caption_stats = CaptionStats()
    syn: Counter[str] = Counter()
    syn_dropped: Counter[str] = Counter()
    sha_mismatch = 0
    uids = [f"{int(r['hi']):016x}{int(r['lo']):016x}" for r in plan]
    table = read_table(image_tar, columns=["key", "uid", "status"], require_uid=False)
    success = [(k, u) for k, u, st in zip(table.column("key").to_pylist(), table.column("uid").to_pylist(),
                                          table.column("status").to_pylist(), strict=True) if st == "success"]
    row_of_pos = {int(r["pos"]): i for i, r in enumerate(plan)}
    # every success row of the image Parquet is one output row: a plan row (valid uid) or a row
    # whose uid is no DataComp uid (written as missing_uid)
    by_key: dict[str, int] = {}
    for pos, (key, _) in enumerate(success):
        by_key.setdefault(key, pos)
    by_uid: dict[str, list[int]] = {}
    for i, uid in enumerate(uids):
        by_uid.setdefault(uid, []).append(i)
    done = np.zeros(len(success), dtype=bool)  # by position among the successes
    matched_unreadable = 0  # matched to captions, but the image or caption sample could not be read
    unlisted: Counter[str] = Counter()  # tar samples the Parquet does not list (junk members, repeats)

    def claim(order: int, sample: Sample) -> int | None:
        """The success position of a tar sample: the open row with its key, else the open row at
        its place when the uids agree (or the sample has none to trust), else the first open row
        of its uid."""
        trusted = sample.ok and is_uid(sample.uid)
        pos = by_key.get(sample.key)
        if pos is not None and not done[pos]:
            return pos
        if order < len(success) and not done[order] and (success[order][1] == sample.uid or not trusted):
            return order
        if trusted:
            return next((int(plan[j]["pos"]) for j in by_uid.get(sample.uid, ()) if not done[int(plan[j]["pos"])]), None)
        return None

    try:
        with ShardWriter(cfg.out, shard_id) as writer:
            keys_used: set[str] = set()

            def named(pos: int) -> tuple[str, dict[str, Any]]:
                """An output row's key: its image Parquet row's key (the tar may split a dotted key
                otherwise), or a stand-in where that cannot name a sample, the original kept as
                ``source_key``."""
                source = success[pos][0]
                key = source
                if not isinstance(key, str) or not key or "." in key or "/" in key or key in keys_used:
                    key = f"row{pos:06d}"
                keys_used.add(key)
                return key, ({"source_key": source} if key != source else {})

            for order, sample in enumerate(iter_samples([image_tar])):
                pos = claim(order, sample)
                if pos is None:
                    unlisted[sample.status if not sample.ok else "not_in_parquet"] += 1
                    continue
                done[pos] = True
                key, renamed = named(pos)
                meta = {**sample.meta, **renamed}
                i = row_of_pos.get(pos)
                if i is None:  # the Parquet's uid for it is no DataComp uid
                    writer.write(Sample(key=key, uid=None, meta=meta, status="missing_uid",
                                        error_message=f"uid {success[pos][1]!r} is not a 32-hex DataComp uid"))
                    continue
                row = plan[i]
                uid = uids[i]
                matched_unreadable += int(row["verdict"]) == MATCHED and not (
                    sample.ok and sample.image is not None and (sample.uid == uid or not is_uid(sample.uid)))
                if not sample.ok:  # the reader's status: bad_json, bad_member, duplicate_key, truncated
                    writer.write(Sample(key=key, uid=uid, meta=renamed, status=sample.status,
                                        error_message=sample.error_message))
                    continue
                if sample.image is None:
                    writer.write(Sample(key=key, uid=uid, meta=meta, status="no_image",
                                        error_message=f"{image_tar}: sample {sample.key!r} has no image member"))
                    continue
                if is_uid(sample.uid) and sample.uid != uid:
                    writer.write(Sample(key=key, uid=uid, meta=renamed, status="uid_mismatch",
                                        error_message=f"{image_tar}: sample {sample.key!r} has uid {sample.uid}, its "
                                                      f"Parquet says {uid} (qcap shards verify)"))
                    continue
                verdict = int(row["verdict"])
                if verdict != MATCHED:
                    writer.write(Sample(key=key, uid=uid, meta=meta, status=VERDICTS[verdict],
                                        error_message=VERDICT_MESSAGES[verdict]))
                    continue
                cshard = int(row["cshard"])
                record = reader.read(cshard, int(row["a"]), int(row["b"]), uid)
                if record.status != "success":  # its caption sample is hostile: a status, not the shard's end
                    matched_unreadable += 1
                    writer.write(Sample(key=key, uid=uid, meta=meta, status=record.status,
                                        error_message=f"{source.shards[cshard]}: {record.error_message}"))
                    continue
                kept, dropped, unscored = choose_captions(record, drop, cfg.min_score)
                syn["in"] += len(record.syn_text)
                syn["unscored_kept"] += unscored
                syn_dropped.update(dropped)
                if record.sha256 and meta.get("sha256") and record.sha256 != meta["sha256"]:
                    sha_mismatch += 1
                if len(kept) < cfg.min_syn_captions:
                    if kept:
                        syn_dropped["too_few_captions"] += len(kept)
                    writer.write(Sample(key=key, uid=uid, meta=meta, status="too_few_captions",
                                        error_message=f"{len(kept)} of {len(record.syn_text)} synthetic captions kept "
                                                      f"(dropped: {dict(dropped)}); --min-syn-captions {cfg.min_syn_captions}"))
                    continue
                where = f"{source.shards[cshard]} uid {uid}"
                extras = dict(sample.extras)
                if record.extras:

                    extras.update(realign_embeddings(record.extras, kept, len(record.syn_text), where))
                meta["num_syn"] = len(kept)
                if tagged:
                    extras.update(tagged_members(tagged, pos, uid, drop, cfg.min_score))
                out = Sample(key=key, uid=uid, image=sample.image, image_ext=sample.image_ext, text=sample.text,
                             syn_text=[record.syn_text[i] for i in kept],
                             syn_provenance=dr_provenance(record, kept, dropped, source.kind,
                                                          os.path.basename(source.shards[cshard])),
                             meta=meta, extras=extras)
                writer.write(out)
                syn["kept"] += len(kept)
                caption_stats.add(out)
            for pos in np.flatnonzero(~done):  # listed as successes by the Parquet, absent from the tar
                i = row_of_pos.get(int(pos))
                matched_unreadable += i is not None and int(plan[i]["verdict"]) == MATCHED
                key, renamed = named(int(pos))
                writer.write(Sample(key=key, uid=uids[i] if i is not None else None, meta=renamed,
                                    status="missing_from_tar" if i is not None else "missing_uid",
                                    error_message=f"{image_tar}: its Parquet lists this success, the tar does not "
                                                  "hold it (qcap shards verify)"))
            if unlisted:
                log.warning("%s: %d tar sample(s) its Parquet does not list were left out (%s); qcap shards verify "
                            "shows them", image_tar, sum(unlisted.values()), dict(unlisted))
            extra = {"tagged": {t.key: t.as_json() for t in tagged}} if tagged else {}
            extra |= {"num_input": writer.stats.count, "syn_in": syn["in"], "syn_kept": syn["kept"],
                     "syn_dropped": dict(sorted(syn_dropped.items())), "syn_unscored_kept": syn["unscored_kept"],
                     "sha256_mismatch": sha_mismatch, "matched_unreadable": matched_unreadable,
                     "unlisted_tar_samples": dict(unlisted), "image_shard": image_tar, "caption_stats": caption_stats.as_json()}
            stats = writer.close(extra_stats=extra)
    finally:
        reader.close()
        for t in tagged:
            t.reader.close()
    return {"shard_id": shard_id, "count": stats.count}


class TaggedPlan:
    """One ``--tagged-captions`` source within one output shard: its join verdicts by image
    position, its reader, and what became of its captions (counts per outcome)."""

    OUTCOMES = ("with_captions", "all_dropped", "unreadable", "no_caption", "caption_failed")

    def __init__(self, key: str, source: CaptionSource, plan: np.ndarray, reader) -> None:
        self.key, self.source, self.reader = key, source, reader
        self.row_of_pos = {int(r["pos"]): r for r in plan}
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    def as_json(self) -> dict[str, Any]:
        return {**{k: self.counts.get(k, 0) for k in ("images", *self.OUTCOMES, "captions_in", "captions_kept")},
                "dropped": dict(sorted(self.dropped.items()))}


def tagged_members(tagged: list[TaggedPlan], pos: int, uid: str, drop: frozenset[str],
                   min_score: float | None) -> dict[str, bytes]:
    """``KEY.syn_tags.json`` and ``KEY.qcap_tags.json`` of a kept image: each tagged source's
    captions of it (after the caption filters) under its key, with that source's provenance."""
    captions: dict[str, list[str]] = {}
    provenance: dict[str, Any] = {}
    for t in tagged:
        t.counts["images"] += 1
        row = t.row_of_pos.get(pos)
        verdict = int(row["verdict"]) if row is not None else NO_CAPTION
        if verdict != MATCHED:  # a duplicate image was dropped before: only no_caption or caption_failed here
            t.counts[VERDICTS[verdict]] += 1
            continue
        cshard = int(row["cshard"])
        record = t.reader.read(cshard, int(row["a"]), int(row["b"]), uid)
        if record.status != "success":
            t.counts["unreadable"] += 1
            continue
        kept, dropped, _ = choose_captions(record, drop, min_score)
        t.counts["captions_in"] += len(record.syn_text)
        t.counts["captions_kept"] += len(kept)
        t.dropped.update(dropped)
        if not kept:
            t.counts["all_dropped"] += 1
            continue
        t.counts["with_captions"] += 1
        captions[t.key] = [record.syn_text[i] for i in kept]
        provenance[t.key] = dr_provenance(record, kept, dropped, t.source.kind, os.path.basename(t.source.shards[cshard]))
    if not captions:
        return {}
    return {TAGS_MEMBER: encode_tags(captions),
            TAGS_PROVENANCE_MEMBER: json.dumps(provenance, ensure_ascii=False, sort_keys=True).encode("utf-8")}


# --------------------------------------------------------------------------------------------
# The driver


def image_shards(spec: str) -> list[tuple[int, str]]:
    return sorted(shards_by_id(spec).items())


def _file_size(path: str) -> int:
    import fsspec

    fs, stripped = fsspec.core.url_to_fs(path)
    return int(fs.size(stripped))


def _caption_files(source: CaptionSource) -> list[list[Any]]:
    return [[os.path.relpath(p, source.folder) if "://" not in p else p, _file_size(p)] for p in source.shards]


def identity(cfg: BuildDRConfig, images: list[tuple[int, str]], source: CaptionSource,
             tagged: list[tuple[str, CaptionSource]] = ()) -> dict[str, Any]:
    """What the output depends on: settings, and every input shard's name and size (tagged
    sources only when there are any, so a folder built before they existed still resumes)."""
    settings = output_settings(cfg)  # the fields BuildDRConfig declares to shape the output
    if not tagged:
        settings.pop("tagged_captions")
    ident = {
        "settings": settings,
        "images": [[os.path.basename(p), _file_size(p)] for _, p in images],
        "captions": _caption_files(source),
        "caption_kind": source.kind,
    }
    if tagged:
        ident["tagged"] = {key: {"kind": t.kind, "captions": _caption_files(t)} for key, t in tagged}
    return ident


def open_tagged(cfg: BuildDRConfig) -> list[tuple[str, CaptionSource]]:
    """The ``--tagged-captions`` sources, each a qcap caption folder (tars or side tables)."""
    out = []
    for key, folder in cfg.tagged():
        try:
            out.append((key, open_source(folder, None)))
        except ShardError as err:
            raise ShardError(f"--tagged-captions {key.removeprefix('syn_text_')}={folder}: {err}") from err
    return out


# What build-dr writes in --out besides its shards and the card, and so all that --overwrite removes;
# a user's file or folder there stays.
_OWN_FILES = (*RUN_RECORDS, UIDS_FILE, IMAGES_WITHOUT_CAPTIONS, CAPTIONS_WITHOUT_IMAGES)


def _work(cfg: BuildDRConfig) -> Path:
    return Path(cfg.out) / WORK_DIR


def build(cfg: BuildDRConfig) -> dict[str, Any]:
    """Build (or finish building) the DR folder; returns the summary (also ``DR/summary.json``)."""
    from tqdm import tqdm

    started = time.time()
    images = image_shards(cfg.images)
    source = open_source(cfg.captions, cfg.apple_syn)
    tagged = open_tagged(cfg)
    ident = identity(cfg, images, source, tagged)
    out = Path(cfg.out)
    # its own work folder (the index and join files) goes with --overwrite, never the user's
    claim_output(out, stage="build-dr", identity=ident, overwrite=cfg.overwrite, own_files=_OWN_FILES,
                 own_dirs=(WORK_DIR,), card=True, what="the DR shards")
    make_folder(out)
    write_run_records(out, cfg, identity=ident, captions=source.describe(),
                      **({"tagged_captions": {k: t.describe() for k, t in tagged}} if tagged else {}), **_versions())
    refuse_stale(out, {shard_id for shard_id, _ in images})
    pending = [(n, shard_id, path) for n, (shard_id, path) in enumerate(images) if not is_complete(out, shard_id)]
    work = _work(cfg)
    resumed = len(images) - len(pending)
    if pending or run_record_path(out, "summary", "build-dr") is None:
        # every step resumes from its markers: a finished index or join is only read back
        with Workers(cfg.num_workers, ray_address=cfg.ray_address) as workers:
            where = workers.where
            join_counts, index_counts = index_and_join(images, source, work, workers,
                                                       partition_rows=cfg.partition_rows, progress=cfg.progress)
            num_partitions = len(join_counts)
            tag_joins: dict[str, Any] = {}
            tag_tasks = []
            for key, tsource in tagged:  # each tagged source: its own index and join (same memory bound)
                share_image_index(work, work / "tagged" / key)  # the image side is indexed once
                counts, tindex = index_and_join(images, tsource, work / "tagged" / key, workers,
                                                partition_rows=cfg.partition_rows, progress=cfg.progress)
                tag_joins[key] = {"join": sum_counts(counts), "index": tindex["captions"]}
                tag_tasks.append((key, tsource, str(work / "tagged" / key), len(counts)))
            sizes = read_sizes(cfg.images) if os.path.isdir(cfg.images) else {}
            total = sum(sizes.get(os.path.basename(p), 0) for _, _, p in pending) or None
            bar = tqdm(total=total, desc="build-dr", unit="img", disable=not cfg.progress or not pending,
                       dynamic_ncols=True)
            tasks = [{"cfg": cfg, "source": source, "n": n, "shard_id": shard_id, "path": path, "work": str(work),
                      "num_partitions": num_partitions, "tagged": tag_tasks} for n, shard_id, path in pending]
            workers.map(write_output_shard, tasks, bar, weight=lambda r: r["count"])
            bar.close()
        _write_uid_lists(out, work, num_partitions)
        join_summary = {"join": sum_counts(join_counts), "index": index_counts, "tagged": tag_joins}
    else:  # finished before: the join's counts are in the summary (the work folder is gone)
        previous = read_run_record(out, "summary", "build-dr") or {}
        where = previous.get("ran_on", "local")
        join_summary = {"join": previous["join"], "index": previous["index"],
                        "tagged": {k: {"join": v["join"], "index": v["index"]} for k, v in previous.get("tagged", {}).items()}}
    finalize_folder(out)
    summary = summarize(cfg, images, source, join_summary, resumed, time.time() - started)
    summary["ran_on"] = where
    write_run_records(out, summary=summary)
    _write_dr_uids(out)
    if cfg.card:
        write_dr_card(cfg, source, summary)
    if summary["reconciled"] and not cfg.keep_work and work.is_dir():
        shutil.rmtree(work)
    return summary


def share_image_index(work: Path, other: Path) -> None:
    """Give ``other`` (a tagged source's work folder) the image index already made in ``work``:
    hard links (a copy where the filesystem has none), each shard's ``.npy`` before its marker."""
    source, target = work / "index" / "images", other / "index" / "images"
    target.mkdir(parents=True, exist_ok=True)
    for suffix in (".npy", ".json"):
        for path in sorted(source.glob(f"*{suffix}")):
            if not (target / path.name).exists():
                try:
                    os.link(path, target / path.name)
                except OSError:
                    shutil.copyfile(path, target / path.name)


def _write_uid_lists(out: Path, work: Path, num_partitions: int) -> None:
    for suffix, name in (("only_images", IMAGES_WITHOUT_CAPTIONS), ("only_captions", CAPTIONS_WITHOUT_IMAGES)):
        parts = [load_npy(work / "join" / f"{p:05d}.{suffix}.npy", mmap=False) for p in range(num_partitions)]
        save_uids(out / name, np.concatenate(parts) if parts else uid_records(np.zeros(0, np.uint64), np.zeros(0, np.uint64)))


def _write_dr_uids(out: Path) -> None:
    """``uids.npy``: the DR folder's samples as a DataComp uid file (reshard/subset input)."""
    uids: list[np.ndarray] = []
    for tar in expand_shards(str(out)):
        table = read_table(tar, columns=["uid", "status"])
        keep = [u for u, s in zip(table.column("uid").to_pylist(), table.column("status").to_pylist(), strict=True)
                if s == "success"]
        _, hi, lo = uid_halves(keep)
        uids.append(uid_records(hi, lo))
    save_uids(out / UIDS_FILE, np.concatenate(uids) if uids else uid_records(np.zeros(0, np.uint64), np.zeros(0, np.uint64)))


def summarize(cfg: BuildDRConfig, images, source: CaptionSource, join_summary: dict[str, Any], resumed: int,
              seconds: float) -> dict[str, Any]:
    """Counts over every output shard, checked three ways: images in = kept + dropped[reason];
    caption uids = matched + without image + duplicates; synthetic captions in = kept + dropped[reason]."""
    statuses: Counter[str] = Counter()
    syn_dropped: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    missing = []
    tag_totals: dict[str, Counter] = {key: Counter() for key in join_summary.get("tagged", {})}
    tag_dropped: dict[str, Counter] = {key: Counter() for key in join_summary.get("tagged", {})}
    for shard_id, _ in images:
        if not is_complete(cfg.out, shard_id):
            missing.append(shard_name(shard_id))
            continue
        stats = read_shard_stats(f"{cfg.out}/{shard_name(shard_id)}.tar")
        statuses.update(stats["status_dict"])
        syn_dropped.update(stats["syn_dropped"])
        for key, counts in stats.get("tagged", {}).items():
            tag_dropped.setdefault(key, Counter()).update(counts.pop("dropped", {}))
            tag_totals.setdefault(key, Counter()).update(counts)
        totals.update({"images_in": stats["num_input"], "syn_in": stats["syn_in"], "syn_kept": stats["syn_kept"],
                       "syn_unscored_kept": stats["syn_unscored_kept"], "sha256_mismatch": stats["sha256_mismatch"],
                       "matched_unreadable": stats.get("matched_unreadable", 0)})
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
        "images: matched = kept + too_few_captions + unreadable": (
            join["matched"] == kept + dropped.get("too_few_captions", 0) + totals["matched_unreadable"]),
        "captions: uids = matched + without image + duplicates":
            join["caption_ok_rows"] == join["matched"] + join["captions_without_images"] + join["caption_duplicates"],
        "synthetic: in = kept + dropped": totals["syn_in"] == totals["syn_kept"] + sum(syn_dropped.values()),
    }
    tagged: dict[str, Any] = {}
    for key, side in join_summary.get("tagged", {}).items():
        counts, tjoin = tag_totals.get(key, Counter()), side["join"]
        outcomes = {k: counts.get(k, 0) for k in TaggedPlan.OUTCOMES}
        checks[f"{key}: kept images = " + " + ".join(outcomes)] = counts.get("images", 0) == kept == sum(outcomes.values())
        checks[f"{key}: captions in = kept + dropped"] = (
            counts.get("captions_in", 0) == counts.get("captions_kept", 0) + sum(tag_dropped[key].values()))
        checks[f"{key}: caption uids = matched + without image + duplicates"] = (
            tjoin["caption_ok_rows"] == tjoin["matched"] + tjoin["captions_without_images"] + tjoin["caption_duplicates"])
        tagged[key] = {"images": outcomes, "captions_in": counts.get("captions_in", 0),
                       "captions_kept": counts.get("captions_kept", 0),
                       "captions_dropped": dict(sorted(tag_dropped[key].items())),
                       "caption_rows_by_status": side["index"].get("status_counts", {}),
                       "captions_without_images": tjoin["captions_without_images"],
                       "caption_duplicates": tjoin["caption_duplicates"], "join": tjoin, "index": side["index"]}
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
        **({"tagged": tagged} if tagged else {}),
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
    ]
    for key, t in summary.get("tagged", {}).items():
        lost = ", ".join(f"{k} {v}" for k, v in t["images"].items() if k != "with_captions" and v) or "none"
        lines.append(f"  {key}: {t['images']['with_captions']} of {summary['images_kept']} kept images "
                     f"({t['captions_kept']} of {t['captions_in']} captions kept; without: {lost}; "
                     f"{t['captions_without_images']} caption samples without an image)")
    lines += [
        f"  counts reconcile: {'yes' if summary['reconciled'] else 'NO ' + str(summary['checks'])}",
    ]
    lines += [f"  note: {note}" for note in summary["notes"]]
    if summary["sha256_mismatch"]:
        lines.append(f"  note: {summary['sha256_mismatch']} samples' sha256 differ between the sides (joined by uid)")
    return "\n".join(lines)


def _versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version: the stages never import the top package
        return {"qcap_version": version("qcap")}
    except PackageNotFoundError:
        return {"qcap_version": "unknown"}


def write_dr_card(cfg: BuildDRConfig, source: CaptionSource, summary: dict[str, Any]) -> dict[str, Any]:
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
                     f"{'yes' if summary['reconciled'] else 'NO'} (summary.json)."),
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
    step["decoding"] = config.get("decoding") or "unknown (the caption folder records none)"
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

