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
(:class:`curate.shards.ShardWriter`).

Samples are copied verbatim (image bytes, caption, extra members) under a new key
``{shard:05d}{index:04d}``; ``KEY.json`` records where each came from (``source_shard``,
``source_key``), and every column of the input Parquet row is carried into the output Parquet.

``CURATED/`` holds the shards, ``sizes.json``, ``reshard.json`` (config, inputs, plan identity)
and ``report.json``: the subset's uids found as successes, as failures (by status), not found
at all, repeated (a uid appearing twice: the first copy is kept); expected and written counts
per shard, checked equal. Output from other inputs is refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curate.cli import UsageError
from curate.config import arg, parse_config, save_config, to_dict
from curate.shards import (
    SIZES_FILE,
    Sample,
    ShardError,
    ShardWriter,
    atomic_write_json,
    completed_shards,
    expand_shards,
    finalize_folder,
    is_complete,
    iter_samples,
    load_uids,
    read_table,
    shard_name,
    uid_membership,
)

log = logging.getLogger(__name__)
PLAN_FILE = "reshard.json"
REPORT_FILE = "report.json"


@dataclass(kw_only=True)
class ReshardConfig:
    """Write the successful samples whose uid is in a DataComp uid file into new shards (with sizes.json)."""

    shards: str = arg(help="raw shards: folder, brace pattern or glob (tar + Parquet of all samples)", metavar="RAW")
    subset: Path = arg(help="DataComp uid file (.npy, sorted u8,u8) of the samples to keep", metavar="UIDS.npy")
    out: Path = arg(help="output shard folder", metavar="CURATED")
    samples_per_shard: int = arg(10000, help="samples per output shard (DataComp's resharder: 10000)")
    num_workers: int = arg(1, help="processes writing output shards")
    overwrite: bool = arg(False, help="replace an output folder made from other inputs")
    progress: bool = arg(True, help="show a progress bar")

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard: must be >= 1")
        if self.num_workers < 1:
            raise ValueError("num_workers: must be >= 1")


@dataclass(slots=True)
class Selection:
    """What a subset picks out of a shard list."""

    items: list[tuple[int, str]] = field(default_factory=list)  # (input shard index, key) of kept samples, in order
    num_requested: int = 0  # uids in the subset file
    num_rows: int = 0  # rows of the input Parquets
    found_success: int = 0  # subset uids present as successful samples (first copies)
    failed: Counter = field(default_factory=Counter)  # subset uids present only as failures, by status
    repeated: int = 0  # extra successful copies of a uid already kept
    not_found: int = 0  # subset uids in no input Parquet

    def as_json(self) -> dict[str, Any]:
        return {
            "num_requested": self.num_requested, "num_input_rows": self.num_rows, "num_selected": len(self.items),
            "found_success": self.found_success, "found_failed": dict(self.failed.most_common()),
            "repeated_uid_rows": self.repeated, "not_found": self.not_found,
        }


def select(tars: list[str], subset: np.ndarray) -> Selection:
    """The successful samples of ``tars`` whose uid is in ``subset``, in input order."""
    sel = Selection(num_requested=len(subset))
    seen: set[str] = set()
    failed_uids: dict[str, str] = {}
    for index, tar in enumerate(tars):
        table = read_table(tar, columns=["key", "uid", "status"])
        keys = [str(k) for k in table.column("key").to_pylist()]
        uids = table.column("uid").to_pylist()
        statuses = [str(s) for s in table.column("status").to_pylist()]
        sel.num_rows += len(keys)
        valid = [i for i, u in enumerate(uids) if isinstance(u, str) and len(u) == 32]
        member = np.zeros(len(keys), dtype=bool)
        if valid:
            member[valid] = uid_membership([uids[i] for i in valid], subset)
        for i in np.flatnonzero(member):
            uid = uids[i]
            if statuses[i] != "success":
                failed_uids.setdefault(uid, statuses[i])
                continue
            if uid in seen:
                sel.repeated += 1
                continue
            seen.add(uid)
            sel.items.append((index, keys[i]))
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


def _check_output(cfg: ReshardConfig, identity: dict[str, Any]) -> None:
    """Refuse to mix runs: an existing output must come from the same inputs (or --overwrite)."""
    plan = cfg.out / PLAN_FILE
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UsageError(f"--out {cfg.out}: is a file, not a folder; choose a folder for the curated shards")
    if cfg.out.exists() and cfg.overwrite:
        shutil.rmtree(cfg.out)
    if plan.exists():
        recorded = json.loads(plan.read_text()).get("identity")
        if recorded != identity:
            raise UsageError(
                f"{cfg.out}: holds shards resharded from other inputs or another subset ({plan}); "
                "pass --overwrite to replace them, or choose another --out"
            )
    elif cfg.out.exists() and any(cfg.out.glob("*.tar")):
        raise UsageError(f"{cfg.out}: already holds shards not written by qcap reshard; pass --overwrite or another --out")


def write_shard(task: dict[str, Any]) -> int:
    """Write output shard ``task['shard_id']`` from its planned (input index, key) items."""
    tars: list[str] = task["tars"]
    items: list[tuple[int, str]] = task["items"]
    shard_id: int = task["shard_id"]
    width: int = task["key_width"]
    by_input: dict[int, set[str]] = {}
    for index, key in items:
        by_input.setdefault(index, set()).add(key)
    written = 0
    with ShardWriter(task["out"], shard_id) as writer:
        for index in sorted(by_input):
            wanted = by_input[index]
            rows = {str(r["key"]): r for r in read_table(tars[index]).to_pylist()}
            found = 0
            for sample in iter_samples([tars[index]]):
                if sample.key not in wanted:
                    continue
                found += 1
                writer.write(_relabel(sample, rows.get(sample.key, {}), f"{shard_name(shard_id)}{written:0{width}d}",
                                      os.path.basename(tars[index])))
                written += 1
            if found != len(wanted):
                raise ShardError(
                    f"{tars[index]}: its Parquet lists {len(wanted)} successful samples of the subset, the tar holds {found}"
                )
    return written


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
    """Run the resharder; returns the report (also ``CURATED/report.json``)."""
    from tqdm import tqdm

    started = time.time()
    tars = expand_shards(cfg.shards)
    subset = load_uids(cfg.subset)
    identity = _identity(cfg, tars)
    _check_output(cfg, identity)
    selection = select(tars, subset)
    n = cfg.samples_per_shard
    plan = [selection.items[i:i + n] for i in range(0, len(selection.items), n)]
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out / PLAN_FILE, {"config": to_dict(cfg), "identity": identity, "num_shards": len(plan),
                                            "num_samples": len(selection.items)})
    save_config(cfg, cfg.out / "config.json")
    stale = sorted(s for s in completed_shards(cfg.out) if s >= len(plan))
    if stale:
        raise ShardError(f"{cfg.out}: completed shards {stale[:5]} beyond the plan's {len(plan)}; pass --overwrite")
    width = max(4, len(str(n - 1)))
    todo = [
        {"tars": tars, "items": items, "shard_id": j, "out": str(cfg.out), "key_width": width}
        for j, items in enumerate(plan) if not is_complete(cfg.out, j)
    ]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="reshard", unit="shard", disable=not cfg.progress)
    if cfg.num_workers > 1 and len(todo) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(cfg.num_workers, len(todo))) as pool:
            for _ in pool.imap_unordered(write_shard, todo):
                bar.update(1)
    else:
        for task in todo:
            write_shard(task)
            bar.update(1)
    bar.close()
    sizes = finalize_folder(cfg.out)
    expected = {f"{shard_name(j)}.tar": len(items) for j, items in enumerate(plan)}
    if sizes != expected:
        wrong = {k: (sizes.get(k), v) for k, v in expected.items() if sizes.get(k) != v}
        extra = sorted(set(sizes) - set(expected))
        raise ShardError(f"{cfg.out}: written counts differ from the plan (written, expected): {wrong}; extra: {extra}")
    report = {
        "subset": str(cfg.subset), "shards": cfg.shards, "out": str(cfg.out), **selection.as_json(),
        "num_output_shards": len(plan), "num_written": sum(sizes.values()), "expected_equals_written": True,
        "resumed_shards": len(plan) - len(todo), "sizes_file": str(cfg.out / SIZES_FILE),
        "seconds": round(time.time() - started, 3),
    }
    atomic_write_json(cfg.out / REPORT_FILE, report)
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
    )
    return 0
