"""``qcap subset``: nested, seeded subsets of a shard folder (the data-efficiency ladder).

Usage::

    qcap subset --shards runs/demo/dr --fraction 0.1 --seed 0 --out runs/ladder/dr-10
    qcap subset --shards runs/demo/dr --fraction 0.1 --seed 0 --captions real --out runs/ladder/datacomp-10
    qcap subset --shards runs/demo/dr --num-samples 5000 --seed 0 --out runs/ladder/dr-5k

**Nested by construction.** Every sample gets the rank key ``(hash(seed, uid), uid)``; a subset
of ``N`` samples is the ``N`` smallest keys. With one seed, the ``N`` smallest are among the
``M`` smallest for every ``M >= N``: the 1% subset ⊂ the 10% subset ⊂ the full set, whatever
the shard layout. ``N`` is exact: ``round(fraction × total)`` (halves up) or ``--num-samples``.
The key depends on the uid alone, so the same seed picks the same images from the DR folder,
from its real-captions-only twin, or from the curated images they came from.

**Caption variants.** ``--captions keep`` (default) copies samples as they are (a DR folder's
subset keeps its synthetic captions); ``--captions real`` writes the *DataComp* variant of the
same images: ``KEY.syn.json``, ``KEY.qcap.json``, the tagged captioners' ``KEY.syn_tags.json`` /
``KEY.qcap_tags.json``, Apple's teacher data (``npz``, ``pth.gz``, ``paug.json``) and qcap
reinforce's ``KEY.reinforce.json`` are left out, so nothing but the real caption can be trained on. (Training the
DR folder with ``qcap train --caption-source real`` reads the same captions; the separate folder
makes each rung of the ladder its own dataset, with its own card and uid list, that cannot be
trained on synthetic captions by mistake.)

**Scale.** The selection reads only the Parquets (uid, status): one pass counts keys in 65,536
bins of their top 16 bits, a second collects the one bin that holds the ``N``-th key and finds
the exact threshold; memory stays ``O(bins + N/65536)``. The copy then streams the input shards
once, packed whole into output shards of about ``--samples-per-shard`` samples (default: the
largest input shard), resumable per output shard; the shards are written by ``--num-workers``
local processes or, with ``--ray-address``, as tasks on a Ray cluster (:mod:`base.workers`):
the same bytes either way, and where they ran is no part of the settings a resume checks.

``DIR/`` holds the shards with ``sizes.json``, ``uids.npy`` (DataComp's sorted uid file of the
subset), ``config.json`` (settings, the threshold, the plan), ``summary.json`` (counts
that reconcile: selected = N exactly) and the dataset card. A folder written before these names
holds ``subset.json`` and ``subset_summary.json``; it is resumed as it was.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from base.card import CaptionStats, read_card, write_card
from base.cli import UsageError
from base.config import arg, output_settings, parse_config
from base.shards import (
    Sample,
    ShardError,
    ShardWriter,
    expand_shards,
    finalize_folder,
    iter_samples,
    num_samples,
    read_sizes,
    read_table,
    save_uids,
    shard_columns,
    shard_folder,
    shard_name,
    uid_halves,
    uids_to_array,
)
from base.stage import (
    CONFIG_FILE,
    RUN_RECORDS,
    CardStageConfig,
    claim_output,
    make_folder,
    pending_shards,
    refuse_stale,
    run_pool,
    run_record_path,
    write_run_records,
)

log = logging.getLogger(__name__)

UIDS_FILE = "uids.npy"
BIN_BITS = 16
# Members that belong to the synthetic captions (and Apple's teacher data); --captions real drops them.
SYNTHETIC_MEMBERS = ("npz", "pth.gz", "paug.json", "reinforce.json", "syn_tags.json", "qcap_tags.json")
_MASK = (1 << 64) - 1


@dataclass(kw_only=True)
class SubsetConfig(CardStageConfig):
    """Write a nested, seeded subset of a shard folder (DR or curated) as a new shard folder."""

    STAGE: ClassVar[str] = "subset"  # its name in dataset cards' lineage

    shards: str = arg(help="input shards: folder, brace pattern or glob (a DR folder, or any shard folder)", metavar="DR")
    out: Path = arg(shapes_output=False, help="output shard folder", metavar="DIR")
    fraction: float | None = arg(None, help="share of the input's samples to keep, in (0, 1]")
    num_samples: int | None = arg(None, help="number of samples to keep (instead of --fraction)")
    seed: int = arg(0, help="ranking seed: with one seed, smaller subsets are nested in larger ones")
    captions: Literal["keep", "real"] = arg("keep", help="keep: copy samples as they are; real: the DataComp variant "
                                                         "(drop syn.json, qcap.json, the tagged captioners' "
                                                         "syn_tags.json/qcap_tags.json, Apple's npz/pth.gz/paug.json "
                                                         "and qcap reinforce's reinforce.json)")
    samples_per_shard: int | None = arg(None, help="about this many samples per output shard (default: the largest input shard)")

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.num_samples is None):
            raise ValueError("fraction: give exactly one of --fraction or --num-samples")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction: must be in (0, 1], got {self.fraction}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError("samples_per_shard: must be >= 1")
        super().__post_init__()  # the run fields (base.stage.CardStageConfig)


# --------------------------------------------------------------------------------------------
# Ranking


def rank_keys(seed: int, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """64-bit rank of each uid under ``seed`` (splitmix64 over seed, high and low halves)."""
    with np.errstate(over="ignore"):
        z = np.full(len(hi), np.uint64((0x9E3779B97F4A7C15 + (seed & _MASK)) & _MASK), dtype=np.uint64)
        for part in (hi, lo):
            z = z ^ part
            z = z + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        return z


def target_size(cfg: SubsetConfig, total: int) -> int:
    if cfg.num_samples is not None:
        if cfg.num_samples > total:
            raise UsageError(f"--num-samples {cfg.num_samples} is more than the {total} samples of {cfg.shards}")
        return cfg.num_samples
    n = math.floor(cfg.fraction * total + 0.5 + 1e-9)  # halves up; 1e-9 absorbs 0.1 * 1000 = 100.00000000000001
    if n < 1:
        raise UsageError(f"--fraction {cfg.fraction} of {total} samples selects none; use a larger fraction")
    return min(n, total)


@dataclass(slots=True)
class ShardKeys:
    """The rank keys of one input shard's successes, in Parquet order (position = index)."""

    rank: np.ndarray  # u8
    hi: np.ndarray
    lo: np.ndarray
    valid: np.ndarray  # bool: the success has a valid uid (others are never selected)
    keys: list[str]  # each success's sample key: the tar's samples are matched to rows by key
    duplicates: int = 0  # later rows of a uid already listed in this shard (never selected: the first copy is)

    @property
    def missing_uid(self) -> int:
        return int((~self.valid).sum()) - self.duplicates


def shard_keys(tar: str, seed: int) -> ShardKeys:
    names = set(shard_columns(tar))
    table = read_table(tar, columns=["uid", "status", *(["key"] if "key" in names else [])])
    statuses = table.column("status").to_pylist()
    rows = [i for i, s in enumerate(statuses) if s == "success"]
    all_uids = table.column("uid").to_pylist()
    uids = [all_uids[i] for i in rows]
    all_keys = table.column("key").to_pylist() if "key" in names else [None] * len(statuses)
    keys = [all_keys[i] for i in rows]
    valid, valid_hi, valid_lo = uid_halves(uids)
    hi = np.zeros(len(uids), dtype=np.uint64)  # 0 where the uid is missing: never selected (valid is False)
    lo = np.zeros(len(uids), dtype=np.uint64)
    hi[valid], lo[valid] = valid_hi, valid_lo
    # a uid twice in one shard: the first row is the sample, later ones are never selected
    where = np.flatnonzero(valid)
    pairs = np.rec.fromarrays([hi[where], lo[where]], names="hi,lo")
    _, first = np.unique(pairs, return_index=True)
    repeat = np.ones(len(where), dtype=bool)
    repeat[first] = False
    valid[where[repeat]] = False
    return ShardKeys(rank=rank_keys(seed, hi, lo), hi=hi, lo=lo, valid=valid, keys=keys, duplicates=int(repeat.sum()))


@dataclass(frozen=True)
class Threshold:
    """The largest selected key ``(rank, hi, lo, shard, position)``; None selects everything."""

    rank: int
    hi: int
    lo: int
    shard: int
    pos: int

    def as_json(self) -> dict[str, Any]:
        return {"rank": f"{self.rank:016x}", "uid": f"{self.hi:016x}{self.lo:016x}", "shard": self.shard, "pos": self.pos}


def selected_mask(keys: ShardKeys, shard: int, threshold: Threshold | None) -> np.ndarray:
    if threshold is None:
        return keys.valid.copy()
    rank, t = keys.rank, threshold
    below = rank < np.uint64(t.rank)
    equal = rank == np.uint64(t.rank)
    hi_lt = keys.hi < np.uint64(t.hi)
    hi_eq = keys.hi == np.uint64(t.hi)
    lo_lt = keys.lo < np.uint64(t.lo)
    lo_eq = keys.lo == np.uint64(t.lo)
    pos = np.arange(len(rank))
    tail = (shard < t.shard) | ((shard == t.shard) & (pos <= t.pos))
    return keys.valid & (below | (equal & (hi_lt | (hi_eq & (lo_lt | (lo_eq & tail))))))


def select(tars: list[str], seed: int, size: Callable[[int], int], progress: bool
           ) -> tuple[Threshold | None, list[int], dict[str, int]]:
    """The threshold key selecting exactly ``size(number of rankable samples)`` samples, and the
    selected count per shard. The count comes from the Parquets' successes (one per uid and
    shard), not from sizes.json, so a lying sizes.json cannot shrink a 100% subset."""
    from tqdm import tqdm

    shift = np.uint64(64 - BIN_BITS)
    histogram = np.zeros(1 << BIN_BITS, dtype=np.int64)
    valid_per_shard = []
    missing = duplicates = 0
    for tar in tqdm(tars, desc="rank", unit="shard", disable=not progress):
        keys = shard_keys(tar, seed)
        ok = keys.valid
        histogram += np.bincount((keys.rank[ok] >> shift).astype(np.int64), minlength=1 << BIN_BITS)
        valid_per_shard.append(int(ok.sum()))
        missing += keys.missing_uid
        duplicates += keys.duplicates
    total = int(histogram.sum())
    n = size(total)
    counts = {"num_input": total + missing + duplicates, "num_ranked": total, "missing_uid": missing,
              "duplicate_uid_rows": duplicates, "num_selected": n}
    if n > total:
        raise UsageError(f"{n} samples asked for, but only {total} input samples have a uid")
    if n == total:
        return None, valid_per_shard, counts
    cumulative = np.cumsum(histogram)
    target_bin = int(np.searchsorted(cumulative, n, side="left"))
    below = int(cumulative[target_bin - 1]) if target_bin else 0
    # second pass: the keys of the bin holding the n-th key, and the counts below it per shard
    candidates = []
    per_shard = []
    for index, tar in enumerate(tqdm(tars, desc="threshold", unit="shard", disable=not progress)):
        keys = shard_keys(tar, seed)
        bins = (keys.rank >> shift).astype(np.int64)
        ok = keys.valid
        per_shard.append(int((ok & (bins < target_bin)).sum()))
        where = np.flatnonzero(ok & (bins == target_bin))
        if len(where):
            candidates.append(np.rec.fromarrays(
                [keys.rank[where], keys.hi[where], keys.lo[where], np.full(len(where), index), where],
                names="rank,hi,lo,shard,pos"))
    pool = np.concatenate(candidates)
    pool = pool[np.lexsort((pool["pos"], pool["shard"], pool["lo"], pool["hi"], pool["rank"]))]
    take = pool[: n - below]
    last = take[-1]
    threshold = Threshold(int(last["rank"]), int(last["hi"]), int(last["lo"]), int(last["shard"]), int(last["pos"]))
    for shard, count in Counter(take["shard"].tolist()).items():
        per_shard[shard] += count
    return threshold, per_shard, counts


def pack(per_shard: list[int], target: int) -> list[list[int]]:
    """Input shards, in order, packed whole into output shards of at most ``target`` selected
    samples (an input shard larger than that gets one of its own): the full set keeps the
    input's layout, a 10% subset joins about ten input shards into one."""
    plan: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index, count in enumerate(per_shard):
        if filled and filled + count > target:
            plan.append(current)
            current, filled = [], 0
        current.append(index)
        filled += count
    if current:
        if filled == 0 and plan:  # trailing shards that contribute nothing
            plan[-1].extend(current)
        else:
            plan.append(current)
    return plan


# --------------------------------------------------------------------------------------------
# Writing


def strip_synthetic(sample) -> None:
    """The DataComp variant of a sample: its real caption only."""
    sample.syn_text = None
    sample.syn_provenance = None
    sample.syn_keys = None  # Apple's further captioners' keys in syn.json
    sample.extras = {ext: data for ext, data in sample.extras.items() if ext not in SYNTHETIC_MEMBERS}
    sample.meta = {k: v for k, v in sample.meta.items() if k != "num_syn"}


def write_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Output shard ``shard_id``: the selected samples of its input shards, in order.

    The tar's samples are matched to their Parquet rows by key (by position only in a shard
    whose Parquet has no key column). A selected sample the tar cannot give — missing from it,
    unreadable (the reader's status: bad_json, bad_member, truncated, ...), without an image
    member, or with another uid than its row — is written as a Parquet-only row with that status, so it is
    counted and the shard goes on: written + not copied = selected.
    """
    threshold = Threshold(**task["threshold"]) if task["threshold"] else None
    stats = CaptionStats()
    written = 0
    not_copied: Counter[str] = Counter()
    with ShardWriter(task["out"], task["shard_id"]) as writer:
        for index in task["inputs"]:
            tar = task["tars"][index]
            keys = shard_keys(tar, task["seed"])
            mask = selected_mask(keys, index, threshold)
            expected = int(mask.sum())
            by_key = {k: i for i, k in enumerate(keys.keys)} if all(k is not None for k in keys.keys) else None
            seen: set[int] = set()
            problems: list[str] = []
            got = 0
            dropped: list[tuple[int, str, str, str | None]] = []  # (position, status, message, key)
            for order, sample in enumerate(iter_samples([tar], problems=problems)):
                position = by_key.get(sample.key) if by_key is not None else (order if order < len(mask) else None)
                if position is None or position in seen:
                    continue  # not a success row of the Parquet (or a repeat of one): nothing was selected here
                seen.add(position)
                if not mask[position]:
                    continue
                uid = f"{int(keys.hi[position]):016x}{int(keys.lo[position]):016x}"
                if not sample.ok:
                    dropped.append((position, sample.status, sample.error_message or "unreadable sample", sample.key))
                    continue
                if sample.image is None:
                    dropped.append((position, "no_image", f"{tar}: sample {sample.key} has no image member", sample.key))
                    continue
                if sample.uid != uid:
                    dropped.append((position, "uid_mismatch",
                                    f"{tar}: sample {sample.key} has uid {sample.uid}, its Parquet says {uid}", sample.key))
                    continue
                if task["captions"] == "real":
                    strip_synthetic(sample)
                writer.write(sample)
                stats.add(sample)
                got += 1
            cut = f" ({problems[0]})" if problems else ""
            dropped += [(int(p), "missing_from_tar", f"{tar}: its Parquet lists this success, the tar does not hold it{cut}", None)
                        for p in np.flatnonzero(mask) if int(p) not in seen]
            for position, status, message, key in dropped:
                uid = f"{int(keys.hi[position]):016x}{int(keys.lo[position]):016x}"
                writer.write(Sample(key=key or keys.keys[position] or f"{index:05d}{position:06d}", uid=uid,
                                    status=status, error_message=message))
                not_copied[status] += 1
            if got + len(dropped) != expected or expected != task["expected"][str(index)]:
                raise ShardError(f"{tar}: {expected} samples selected from its Parquet, {task['expected'][str(index)]} "
                                 "planned; the input changed (run with --overwrite)")
            written += got
        writer.close(extra_stats={"inputs": [task["tars"][i] for i in task["inputs"]], "caption_stats": stats.as_json(),
                                  "not_copied": dict(not_copied)})
    return {"shard_id": task["shard_id"], "count": written + sum(not_copied.values())}


# --------------------------------------------------------------------------------------------
# The driver


def _identity(cfg: SubsetConfig, tars: list[str]) -> dict[str, Any]:
    import fsspec

    sizes = []
    for tar in tars:
        fs, path = fsspec.core.url_to_fs(tar)
        sizes.append([os.path.basename(tar), int(fs.size(path))])
    settings = output_settings(cfg)  # the fields SubsetConfig declares to shape the output
    return {"settings": settings, "inputs": sizes}


# What subset writes in --out besides its shards and the card, and so all that --overwrite removes
# (base.stage.remove_stage_files); a user's my.tar, notes.npy or folder stays.
_OWN_FILES = (*RUN_RECORDS, UIDS_FILE)


def subset(cfg: SubsetConfig, *, control: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the subset (or finish writing it); returns the summary (also ``DIR/summary.json``).

    ``control``: what a stage that runs subset as its whole work (``qcap control-rung --kind
    clean``) records of itself; the folder's run records are subset's, with it under ``control``
    in both (the first run's, in the config), so no two stages write one file."""
    started = time.time()
    tars = expand_shards(cfg.shards)
    claimed = num_samples(cfg.shards)  # sizes.json: checked against the Parquets below
    ident = _identity(cfg, tars)
    out = Path(cfg.out)
    saved = claim_output(out, stage="subset", identity=ident, overwrite=cfg.overwrite, own_files=_OWN_FILES,
                         card=True, what="the subset's shards")
    plan_path = run_record_path(out, "config", "subset") or out / CONFIG_FILE
    if saved is not None:  # resuming: the plan is the one already chosen
        try:
            threshold_json, per_shard, counts, plan = saved["threshold"], saved["per_shard"], saved["counts"], saved["plan"]
            n, total = int(saved["num_selected"]), int(saved["num_input"])
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"{plan_path}: lacks {err}; use --overwrite to start over") from err
    else:
        threshold, per_shard, counts = select(tars, cfg.seed, lambda ranked: target_size(cfg, ranked), cfg.progress)
        n, total = counts["num_selected"], counts["num_ranked"]
        if total != claimed:
            log.warning("subset: sizes.json of %s claims %d samples, the Parquets list %d with a uid (the subset "
                        "follows the Parquets; 'qcap shards verify' names the wrong entries)", cfg.shards, claimed, total)
        threshold_json = None if threshold is None else {
            "rank": threshold.rank, "hi": threshold.hi, "lo": threshold.lo, "shard": threshold.shard, "pos": threshold.pos}
        target = cfg.samples_per_shard or max(1, max(_read_sizes(tars).values(), default=1))
        plan = pack(per_shard, target)
        make_folder(out)
        write_run_records(out, cfg, identity=ident, num_input=total, num_selected=n,
                          counts=counts, threshold=threshold_json, per_shard=per_shard, plan=plan,
                          rule="the N smallest keys (hash(seed, uid), uid, shard, position)",
                          **({"control": dict(control)} if control is not None else {}))
    refuse_stale(out, range(len(plan)))
    # the task's paths are absolute: a Ray worker's working folder is not this process's
    todo = [{"tars": tars, "inputs": inputs, "shard_id": j, "out": os.path.abspath(out), "seed": cfg.seed,
             "threshold": threshold_json, "captions": cfg.captions, "expected": {str(i): per_shard[i] for i in inputs}}
            for j, inputs in pending_shards(out, dict(enumerate(plan)))]
    # one task per output shard, on a local pool or a Ray cluster
    ran_on = run_pool(write_shard, todo, num_workers=cfg.num_workers, ray_address=cfg.ray_address,
                      total=sum(sum(t["expected"].values()) for t in todo), desc="subset", unit="img",
                      progress=cfg.progress, weight=lambda result: result["count"])
    sizes = finalize_folder(out)
    expected = {f"{shard_name(j)}.tar": sum(per_shard[i] for i in inputs) for j, inputs in enumerate(plan)}
    arrays, not_copied, rows = [], Counter(), {}
    for tar in expand_shards(str(out)):
        table = read_table(tar, columns=["uid", "status"])
        statuses = table.column("status").to_pylist()
        not_copied.update(s for s in statuses if s != "success")
        rows[os.path.basename(tar)] = len(statuses)
        success = [u for u, s in zip(table.column("uid").to_pylist(), statuses, strict=True) if s == "success"]
        arrays.append(uids_to_array(success, sort=False))  # 16 bytes a sample, not Python strings
    uids = np.concatenate(arrays)
    num_unique = save_uids(out / UIDS_FILE, uids)
    if num_unique != len(uids):  # a uid in two input shards (one shard's repeats are dropped when ranking)
        values, counts_of = np.unique(uids, return_counts=True)
        twice = values[counts_of > 1][0]
        raise ShardError(f"{cfg.shards}: uid {int(twice['f0']):016x}{int(twice['f1']):016x} is a sample of two input "
                         "shards, so the subset holds it twice; make one row per uid first (qcap reshard or build-dr keep "
                         "the first copy) and run subset again with --overwrite")
    num_not_copied = sum(not_copied.values())
    if num_not_copied:
        log.warning("subset: %d selected samples could not be copied (%s); they are rows with that status in %s",
                    num_not_copied, dict(not_copied), out)
    checks = {"selected = written + not copied": sum(sizes.values()) + num_not_copied == n,
              "written + not copied = planned per shard": rows == expected,
              "uids unique": num_unique == len(uids) == n - num_not_copied}
    summary = {
        "shards": cfg.shards, "out": str(out), "seed": cfg.seed, "fraction": cfg.fraction, "captions": cfg.captions,
        "num_input": total, "num_selected": n, "num_written": sum(sizes.values()), "not_copied": dict(not_copied),
        "num_output_shards": len(plan),
        "resumed_shards": len(plan) - len(todo), "input_counts": counts, "threshold": threshold_json,
        "uids_file": UIDS_FILE, "checks": checks, "reconciled": all(checks.values()), "ran_on": ran_on,
        "seconds": round(time.time() - started, 3),
    }
    if control is not None:
        summary["control"] = dict(control)
    write_run_records(out, summary=summary)
    if cfg.card:
        write_subset_card(cfg, summary)
    return summary


def _read_sizes(tars: list[str]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for folder in sorted({os.path.dirname(t) for t in tars}):
        sizes.update(read_sizes(folder))
    names = {os.path.basename(t) for t in tars}
    return {k: v for k, v in sizes.items() if k in names}


def write_subset_card(cfg: SubsetConfig, summary: dict[str, Any]) -> dict[str, Any]:
    source_folder = shard_folder(cfg.shards)
    source_card = read_card(source_folder) or {}
    lineage = list(source_card.get("lineage") or [{"step": "source", "title": "input shards", "folder": source_folder}])
    share = f"{summary['num_selected'] / summary['num_input']:.2%}" if summary["num_input"] else "-"
    size = f"{100 * cfg.fraction:.4g}%" if cfg.fraction is not None else f"{cfg.num_samples:,} samples"
    variant = "real captions only (DataComp)" if cfg.captions == "real" else "captions as in the input"
    lineage.append({
        "step": "subset", "title": f"{summary['num_selected']:,} of {summary['num_input']:,} samples ({share}), {variant}",
        "command": f"qcap subset --shards {cfg.shards} "
                   + (f"--fraction {cfg.fraction}" if cfg.fraction is not None else f"--num-samples {cfg.num_samples}")
                   + f" --seed {cfg.seed} --captions {cfg.captions} --out {cfg.out}",
        "rule": "the N smallest (hash(seed, uid), uid): nested across sizes for one seed",
        "seed": cfg.seed,
        "captions": ("synthetic captions, qcap provenance and Apple's npz/paug.json removed" if cfg.captions == "real"
                     else "kept as in the input"),
        "uid list": f"{UIDS_FILE} ({summary['num_selected']:,} uids, DataComp format)",
    })
    kind = "DataComp (real captions)" if cfg.captions == "real" else (
        "DataCompDR" if source_card.get("title", "").startswith("DataCompDR") else "subset")
    source_name = Path(source_folder).name
    usage = ([f"qcap train --data {cfg.out} --caption-source real ..."] if cfg.captions == "real" else
             [f"qcap train --data {cfg.out} --caption-source dual ...   # real + synthetic",
              f"qcap train --data {cfg.out} --caption-source real ...   # real only"])
    return write_card(
        cfg.out,
        title=f"{kind}: {size} of {source_name} ({summary['num_selected']:,} of {summary['num_input']:,} samples, seed {cfg.seed})",
        description=(f"A seeded subset of {source_folder}: {summary['num_selected']:,} of {summary['num_input']:,} samples, "
                     f"{variant}. The same seed and size give the same uids from any folder of these images."),
        lineage=lineage,
        usage=usage,
        summary_counts={"input samples": summary["num_input"], "selected": summary["num_selected"],
                        "output shards": summary["num_output_shards"]},
        progress=cfg.progress,
    )


def format_summary(summary: dict[str, Any]) -> str:
    return (f"subset: {summary['num_written']} of {summary['num_input']} samples (seed {summary['seed']}, captions "
            f"{summary['captions']}) in {summary['num_output_shards']} shards -> {summary['out']} "
            f"({summary['resumed_shards']} already done); uids: {summary['out']}/{summary['uids_file']}; "
            f"counts reconcile: {'yes' if summary['reconciled'] else 'NO ' + str(summary['checks'])}")


def main(argv: list[str], prog: str = "qcap subset") -> int:
    cfg = parse_config(SubsetConfig, argv, prog=prog)
    summary = subset(cfg)
    print(format_summary(summary))
    return 0 if summary["reconciled"] else 1
