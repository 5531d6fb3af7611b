"""``qcap reshard``: write the successful samples of a uid list into new shards.

Usage::

    qcap reshard --shards runs/raw --subset runs/filters/final.npy --out runs/curated [--samples-per-shard 10000]

Choosing is the filters' job (:mod:`curate.filters`); this is the only stage that rewrites
images (DataComp's split, and its ``resharder.py``'s job). It reads the raw shards' Parquets
(every sample, failures included), keeps the rows that are ``success`` and whose uid is in the
subset, and assigns them, in input order (shard by shard, row by row), to output shard
``i // samples_per_shard``. The assignment depends on the inputs alone, so a re-run after a
kill (SIGKILL, any moment) recomputes the same plan, skips output shards whose completion
marker exists and redoes the others; a half-written shard never becomes visible
(:class:`base.shards.ShardWriter`). Output shards are written by ``--num-workers`` local
processes or, with ``--ray-address``, as tasks on a Ray cluster (:mod:`base.workers`): the
same bytes either way, and a task lost with its worker or node is retried.

Samples are copied verbatim (image bytes, caption, extra members) under a new key
``{shard:05d}{index:04d}``; ``KEY.json`` records where each came from (``source_shard``,
``source_key``), and every column of the input Parquet row is carried into the output Parquet.

``CURATED/`` holds the shards, ``sizes.json``, ``config.json`` (the resolved config, the
inputs' identity and the plan's size; where it runs is no part of the identity, so a run resumed
with or without Ray is accepted) and ``summary.json`` (with ``ran_on``): the subset's uids found as successes, as failures (by status), not found
at all, repeated (a uid appearing twice: the first copy is kept); expected and written counts
per shard, checked equal. Output from other inputs is refused unless ``--overwrite``, which
removes only what reshard writes (shard files, ``sizes.json``, ``config.json``,
``summary.json``, temporaries; a folder from before these names: ``reshard.json`` and
``report.json``, which it still resumes) and leaves every other file in the folder.

Hostile input is counted per row, never copied as a success and never a traceback: a selected
``success`` row whose sample the tar lacks (``missing_from_tar``; also the rows a truncated tar
lost), has no image member (``no_image``), carries another uid in its ``KEY.json``
(``uid_mismatch``) or cannot be read (the reader's ``bad_json``, ``bad_member``,
``duplicate_key``, ``truncated``) becomes a Parquet-only row of that status in the output
shard, counted in ``summary.json``'s ``not_copied``. A uid twice in the subset file counts once
(``repeated_in_subset``); a key on two success rows of one Parquet keeps the first
(``repeated_key_rows``); rows whose uid is not DataComp's are counted (``malformed_uid_rows``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from base.config import arg, parse_config
from base.shards import (
    SIZES_FILE,
    Sample,
    ShardError,
    ShardWriter,
    expand_shards,
    finalize_folder,
    is_uid,
    iter_samples,
    load_uids,
    read_table,
    shard_name,
    uid_membership,
)
from base.stage import (
    RUN_RECORDS,
    ShardStageConfig,
    claim_output,
    make_folder,
    pending_shards,
    refuse_stale,
    run_pool,
    write_run_records,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ReshardConfig(ShardStageConfig):
    """Write the successful samples whose uid is in a DataComp uid file into new shards (with sizes.json)."""

    STAGE: ClassVar[str] = "reshard"  # its name in dataset cards' lineage

    shards: str = arg(help="raw shards: folder, brace pattern or glob (tar + Parquet of all samples)", metavar="RAW")
    subset: Path = arg(help="DataComp uid file (.npy, sorted u8,u8) of the samples to keep", metavar="UIDS.npy")
    out: Path = arg(shapes_output=False, help="output shard folder", metavar="CURATED")
    samples_per_shard: int = arg(10000, help="samples per output shard (DataComp's resharder: 10000)")

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard: must be >= 1")
        super().__post_init__()  # the run fields (base.stage.ShardStageConfig)


@dataclass(slots=True)
class Selection:
    """What a subset picks out of a shard list."""

    items: list[tuple[int, str, str]] = field(default_factory=list)  # (input shard index, key, uid) kept, in order
    num_requested: int = 0  # distinct uids in the subset file
    repeated_in_subset: int = 0  # extra copies of a uid in the subset file
    num_rows: int = 0  # rows of the input Parquets
    found_success: int = 0  # subset uids present as successful samples (first copies)
    failed: Counter = field(default_factory=Counter)  # subset uids present only as failures, by status
    repeated: int = 0  # extra successful copies of a uid already kept
    repeated_keys: int = 0  # success rows whose key an earlier success row of the same Parquet has
    malformed_uid_rows: int = 0  # input rows whose uid is not DataComp's (never selected)
    not_found: int = 0  # subset uids in no input Parquet

    def as_json(self) -> dict[str, Any]:
        return {
            "num_requested": self.num_requested, "repeated_in_subset": self.repeated_in_subset,
            "num_input_rows": self.num_rows, "num_selected": len(self.items),
            "found_success": self.found_success, "found_failed": dict(self.failed.most_common()),
            "repeated_uid_rows": self.repeated, "repeated_key_rows": self.repeated_keys,
            "malformed_uid_rows": self.malformed_uid_rows, "not_found": self.not_found,
        }


def select(tars: list[str], subset: np.ndarray) -> Selection:
    """The successful samples of ``tars`` whose uid is in ``subset``, in input order.

    ``subset`` may hold a uid more than once (counted in ``repeated_in_subset``, selected once)."""
    unique = np.unique(np.asarray(subset))
    sel = Selection(num_requested=len(unique), repeated_in_subset=len(subset) - len(unique))
    seen: set[str] = set()
    failed_uids: dict[str, str] = {}
    for index, tar in enumerate(tars):
        table = read_table(tar, columns=["key", "uid", "status"])
        keys = [str(k) for k in table.column("key").to_pylist()]
        uids = table.column("uid").to_pylist()
        statuses = [str(s) for s in table.column("status").to_pylist()]
        sel.num_rows += len(keys)
        valid = [i for i, u in enumerate(uids) if is_uid(u)]
        sel.malformed_uid_rows += len(keys) - len(valid)
        member = np.zeros(len(keys), dtype=bool)
        if valid:
            member[valid] = uid_membership([uids[i] for i in valid], unique)
        success_keys: set[str] = set()
        for i in np.flatnonzero(member):
            uid = uids[i]
            if statuses[i] != "success":
                failed_uids.setdefault(uid, statuses[i])
                continue
            if keys[i] in success_keys:
                sel.repeated_keys += 1
                continue
            success_keys.add(keys[i])
            if uid in seen:
                sel.repeated += 1
                continue
            seen.add(uid)
            sel.items.append((index, keys[i], uid))
    sel.found_success = len(seen)
    for uid, status in failed_uids.items():
        if uid not in seen:
            sel.failed[status] += 1
    sel.not_found = sel.num_requested - sel.found_success - sum(sel.failed.values())
    return sel


def _identity(cfg: ReshardConfig, tars: list[str]) -> dict[str, Any]:
    digest = hashlib.sha256(Path(cfg.subset).read_bytes()).hexdigest()
    inputs = []
    for tar in tars:
        parquet = tar[: -len(".tar")] + ".parquet"
        inputs.append({"shard": tar, "parquet_bytes": os.path.getsize(parquet) if os.path.exists(parquet) else None})
    return {"subset_sha256": digest, "samples_per_shard": cfg.samples_per_shard, "inputs": inputs}


# What reshard writes in --out, and so all that --overwrite removes (anything else is the user's):
# its shards (base.shards.remove_own_files) and these.
_OWN_FILES = RUN_RECORDS


def write_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Write output shard ``task['shard_id']`` from its planned (input index, key, uid) items.

    Every planned item becomes one row: a copied success, or (Parquet only) the status saying
    why it could not be copied. Returns ``{"written": successes, "not_copied": {status: n}}``."""
    tars: list[str] = task["tars"]
    items: list[tuple[int, str, str]] = task["items"]
    shard_id: int = task["shard_id"]
    width: int = task["key_width"]
    by_input: dict[int, dict[str, str]] = {}
    for index, key, uid in items:
        by_input.setdefault(index, {})[key] = uid
    written = 0
    not_copied: Counter[str] = Counter()
    with ShardWriter(task["out"], shard_id) as writer:
        position = 0

        def put(sample: Sample | None, key: str, uid: str, index: int, problems: list[str], row: dict) -> None:
            nonlocal position, written
            new_key = f"{shard_name(shard_id)}{position:0{width}d}"
            position += 1
            source = os.path.basename(tars[index])
            status, error = _why_not_copied(sample, uid, tars[index], key, problems)
            if status is None:
                writer.write(_relabel(sample, row, new_key, source))
                written += 1
                return
            not_copied[status] += 1
            meta = {name: value for name, value in row.items() if name not in ("key", "uid", "status", "error_message")}
            meta.update(source_shard=source, source_key=key)
            writer.write(Sample(key=new_key, uid=uid, meta=meta, status=status, error_message=error))

        for index in sorted(by_input):
            wanted = by_input[index]
            rows: dict[str, dict[str, Any]] = {}
            for r in read_table(tars[index]).to_pylist():
                rows.setdefault(str(r["key"]), r)  # select() kept the first success row of a key
            done: set[str] = set()
            problems: list[str] = []
            for sample in iter_samples([tars[index]], problems=problems):  # streamed: one image in memory
                if sample.key in wanted and sample.key not in done:
                    done.add(sample.key)
                    put(sample, sample.key, wanted[sample.key], index, problems, rows.get(sample.key, {}))
            for key, uid in wanted.items():  # what the tar did not hold, in Parquet order
                if key not in done:
                    put(None, key, uid, index, problems, rows.get(key, {}))
    return {"written": written, "not_copied": dict(not_copied)}


def _why_not_copied(sample: Sample | None, uid: str, tar: str, key: str, problems: list[str]
                    ) -> tuple[str | None, str | None]:
    """``(None, None)`` when ``sample`` can be copied as a success; else its status and why."""
    if sample is None:
        cut = f" ({problems[0]})" if problems else ""
        return "missing_from_tar", f"{tar}: the Parquet lists {key!r} as a success, the tar has no such sample{cut}"
    if not sample.ok:
        return sample.status, sample.error_message
    if sample.image is None:
        return "no_image", f"{tar}: sample {key!r} has no image member"
    if sample.uid != uid:
        return "uid_mismatch", f"{tar}: sample {key!r} has uid {sample.uid!r} in its KEY.json, the Parquet {uid!r}"
    return None, None


def _relabel(sample: Sample, row: dict[str, Any], key: str, source: str) -> Sample:
    meta = dict(sample.meta)
    for name, value in row.items():  # Parquet-only columns are carried along too
        if name not in meta and name not in ("key", "status", "error_message"):
            meta[name] = value
    meta.update(key=key, source_shard=source, source_key=sample.key)
    sample.meta = meta
    sample.key = key
    return sample


def reshard(cfg: ReshardConfig) -> dict[str, Any]:
    """Run the resharder; returns the report (also ``CURATED/summary.json``)."""
    started = time.time()
    tars = expand_shards(cfg.shards)
    subset = load_uids(cfg.subset)
    identity = _identity(cfg, tars)
    claim_output(cfg.out, stage="reshard", identity=identity, overwrite=cfg.overwrite, own_files=_OWN_FILES,
                 what="the curated shards")
    selection = select(tars, subset)
    n = cfg.samples_per_shard
    plan = [selection.items[i:i + n] for i in range(0, len(selection.items), n)]
    make_folder(cfg.out)
    write_run_records(cfg.out, cfg, identity=identity, num_shards=len(plan), num_samples=len(selection.items))
    refuse_stale(cfg.out, range(len(plan)))
    width = max(4, len(str(n - 1)))
    # the task's paths are absolute (expand_shards gives local shards so): a Ray worker's working
    # folder is not this process's
    todo = [
        {"tars": tars, "items": items, "shard_id": j, "out": os.path.abspath(cfg.out), "key_width": width}
        for j, items in pending_shards(cfg.out, dict(enumerate(plan)))
    ]
    # one task per output shard, on a local pool or a Ray cluster
    ran_on = run_pool(write_shard, todo, num_workers=cfg.num_workers, ray_address=cfg.ray_address, total=len(plan),
                      initial=len(plan) - len(todo), desc="reshard", unit="shard", progress=cfg.progress)
    sizes = finalize_folder(cfg.out)
    # every planned item is one output row: a success, or the status saying why it was not copied
    not_copied: Counter[str] = Counter()
    wrong = {}
    for j, items in enumerate(plan):
        statuses = Counter(str(s) for s in read_table(str(cfg.out / f"{shard_name(j)}.tar"),
                                                      columns=["status"]).column("status").to_pylist())
        successes = statuses.pop("success", 0)
        not_copied.update(statuses)
        name = f"{shard_name(j)}.tar"
        if successes + sum(statuses.values()) != len(items) or sizes.get(name) != successes:
            wrong[name] = {"planned": len(items), "rows": successes + sum(statuses.values()),
                           "successes": successes, "sizes.json": sizes.get(name)}
    extra = sorted(set(sizes) - {f"{shard_name(j)}.tar" for j in range(len(plan))})
    if wrong or extra:
        raise ShardError(f"{cfg.out}: written counts differ from the plan: {wrong}; extra shards: {extra}")
    report = {
        "subset": str(cfg.subset), "shards": cfg.shards, "out": str(cfg.out), **selection.as_json(),
        "num_output_shards": len(plan), "num_written": sum(sizes.values()),
        "not_copied": dict(not_copied.most_common()),
        "expected_equals_written": sum(sizes.values()) + sum(not_copied.values()) == len(selection.items),
        "resumed_shards": len(plan) - len(todo), "sizes_file": str(cfg.out / SIZES_FILE),
        "ran_on": ran_on, "seconds": round(time.time() - started, 3),
    }
    write_run_records(cfg.out, summary=report)
    return report


def main(argv: list[str], prog: str = "qcap reshard") -> int:
    cfg = parse_config(ReshardConfig, argv, prog=prog)
    report = reshard(cfg)
    failed = sum(report["found_failed"].values())
    print(
        f"reshard: wrote {report['num_written']} samples in {report['num_output_shards']} shards to {cfg.out} "
        f"({report['resumed_shards']} already done); of {report['num_requested']} uids: {report['found_success']} "
        f"downloaded, {failed} failed downloads, {report['not_found']} not in the shards"
        + (f", {report['repeated_uid_rows']} repeated rows skipped" if report["repeated_uid_rows"] else "")
        + (f"; not copied (selected successes the tar could not give): {report['not_copied']}"
           if report["not_copied"] else "")
    )
    return 0 if report["expected_equals_written"] else 1
