"""``qcap shards info|verify|finalize``: look inside a shard folder, check it, write sizes.json.

Usage::

    qcap shards info runs/demo/raw            # counts per status, columns, samples per shard
    qcap shards verify 'raw/{00000..00003}.tar' # read every member; tar, parquet and stats agree
    qcap shards finalize raw                  # (re)write raw/sizes.json from the shards' stats
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from curate.cli import UsageError
from curate.config import arg, parse_config
from curate.shards import (
    ShardError,
    expand_shards,
    finalize_folder,
    iter_samples,
    read_table,
    shard_size,
)


@dataclass(kw_only=True)
class ShardsConfig:
    """Inspect, verify or finalize a shard folder."""

    action: Literal["info", "verify", "finalize"] = arg(
        help="info: counts and columns; verify: read every member, tar/Parquet/stats agree; finalize: write sizes.json",
        positional=True,
    )
    shards: str = arg(help="shard folder, brace pattern or glob", positional=True)
    json_out: bool = arg(False, help="print the result as JSON", flag="--json")


def info(spec: str) -> dict:
    tars = expand_shards(spec)
    statuses: Counter[str] = Counter()
    per_shard = {}
    columns: set[str] = set()
    for tar in tars:
        table = read_table(tar)
        columns.update(table.schema.names)
        statuses.update(table.column("status").to_pylist())
        per_shard[os.path.basename(tar)] = shard_size(tar)
    total = sum(statuses.values())
    return {
        "num_shards": len(tars),
        "num_rows": total,
        "num_successes": statuses.get("success", 0),
        "success_rate": round(statuses.get("success", 0) / total, 4) if total else 0.0,
        "status_counts": dict(statuses.most_common()),
        "samples_per_shard": per_shard,
        "columns": sorted(columns),
    }


def verify(spec: str) -> dict:
    """Read every sample; check the tar, the Parquet's successes and the stats agree. Every
    shard is checked, so one run lists every broken shard."""
    problems = []
    checked = 0
    for tar in expand_shards(spec):
        try:
            in_tar = [s.key for s in iter_samples([tar], with_image=True)]
            table = read_table(tar, columns=["key", "status"])
        except ShardError as err:
            problems.append(str(err))
            continue
        ok_keys = [k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True) if s == "success"]
        if sorted(in_tar) != sorted(ok_keys):
            problems.append(f"{tar}: tar holds {len(in_tar)} samples, parquet lists {len(ok_keys)} successes")
        if shard_size(tar) != len(in_tar):
            problems.append(f"{tar}: stats say {shard_size(tar)} samples, tar holds {len(in_tar)}")
        checked += len(in_tar)
    return {"num_samples": checked, "problems": problems}


def main(argv: list[str], prog: str = "qcap shards") -> int:
    cfg = parse_config(ShardsConfig, argv, prog=prog)
    if cfg.action == "finalize":
        if not os.path.isdir(cfg.shards):
            raise UsageError(f"{cfg.shards}: finalize takes a shard folder")
        result: dict = {"sizes": finalize_folder(cfg.shards)}
    elif cfg.action == "info":
        result = info(cfg.shards)
    else:
        result = verify(cfg.shards)
    if cfg.json_out:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            if isinstance(value, dict) and len(value) > 12:
                value = f"{len(value)} entries (use --json)"
            print(f"{key}: {value}")
    if cfg.action == "verify" and result["problems"]:
        raise ShardError("; ".join(result["problems"]))
    return 0
