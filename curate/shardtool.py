"""``qcap shards info|verify|finalize``: look inside a shard folder, check it, write sizes.json.

Usage::

    qcap shards info runs/demo/raw            # counts per status, columns, samples per shard
    qcap shards verify 'raw/{00000..00003}.tar' # every member read; tar, Parquet, stats and sizes.json agree
    qcap shards verify --decode raw           # ... and every image decodes within the pixel bound
    qcap shards finalize raw                  # (re)write raw/sizes.json from the shards' stats

``verify`` checks what later stages rely on, for every shard, and lists every problem (grouped
per shard and kind, with examples) before exiting non-zero: the tar reads to its end-of-archive
blocks; every sample reads whole (no broken or non-object JSON, duplicate or unsafe members,
dotted keys, repeated keys; links and other non-files are reported); every ``success`` row of the
Parquet has its sample in the tar, with an image member (caption-only shards excepted), the same
uid, and every tar sample has a ``success`` row; keys are unique and free of '.' and '/';
``_stats.json`` agrees with the Parquet (count, successes, failed, status_dict); ``sizes.json``
names every shard with the number of samples its tar really holds, and nothing else; with
``--decode``, every image decodes within ``--max-pixels``.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Literal

from base.cli import Command, UsageError, dispatch
from base.config import arg, parse_config
from base.shards import (
    SIZES_FILE,
    ShardError,
    decode_image,
    expand_shards,
    finalize_folder,
    iter_samples,
    read_shard_stats,
    read_sizes,
    read_table,
    shard_columns,
    shard_size,
)

EXAMPLES = 3  # examples named per kind of problem in a shard


@dataclass(kw_only=True)
class ShardsConfig:
    """Inspect, verify or finalize a shard folder."""

    action: Literal["info", "verify", "finalize"] = arg(
        help="info: counts and columns; verify: check tar, Parquet, stats and sizes.json agree (every problem listed); "
             "finalize: write sizes.json",
        positional=True,
    )
    shards: str = arg(help="shard folder, brace pattern or glob", positional=True)
    decode: bool = arg(False, help="verify: also decode every image (pixel bound checked before decoding)")
    max_pixels: int = arg(89_478_485, help="verify --decode: an image with more pixels than this is a problem")
    json_out: bool = arg(False, help="print the result as JSON", flag="--json")

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError("max_pixels: must be >= 1")


def info(spec: str) -> dict:
    tars = expand_shards(spec)
    statuses: Counter[str] = Counter()
    per_shard = {}
    columns: set[str] = set()
    for tar in tars:
        columns.update(shard_columns(tar))
        table = read_table(tar, columns=["status"])  # a shard without uids breaks the contract: an error
        statuses.update(str(s) for s in table.column("status").to_pylist())
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


class _Problems:
    """A shard's problems by kind: counted, with the first few examples kept."""

    def __init__(self, tar: str) -> None:
        self.tar = tar
        self.kinds: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter[str] = Counter()

    def add(self, kind: str, example: str | None = None) -> None:
        self.counts[kind] += 1
        if example is not None and len(self.kinds[kind]) < EXAMPLES:
            self.kinds[kind].append(example)

    def lines(self) -> list[str]:
        out = []
        for kind, n in self.counts.items():
            examples = self.kinds.get(kind) or []
            more = f" (e.g. {'; '.join(examples)})" if examples and (n > 1 or len(examples[0]) < 200) else ""
            out.append(f"{self.tar}: {kind}" + (f" x{n}" if n > 1 else "") + more)
        return out


def verify_shard(tar: str, *, decode: bool = False, max_pixels: int = 89_478_485) -> tuple[int, int, list[str]]:
    """Check one shard; returns ``(samples in the tar, successes verified, problems)``."""
    found = _Problems(tar)
    tar_problems: list[str] = []
    skipped: list[str] = []
    in_tar: dict[str, dict[str, Any]] = {}  # first sample of each key: uid, image?, status
    num_in_tar = 0
    has_syn = False
    for sample in iter_samples([tar], with_image=True, problems=tar_problems, skipped=skipped):
        num_in_tar += 1
        has_syn = has_syn or sample.syn_text is not None
        if not sample.ok:
            found.add(f"sample not readable ({sample.status})", f"{sample.key!r}: {_short(sample.error_message, tar)}")
        elif "/" in sample.key:
            found.add("key with '/' (the shard contract forbids it)", repr(sample.key))
        if sample.key not in in_tar:
            in_tar[sample.key] = {"uid": sample.uid, "image": sample.image is not None, "ok": sample.ok}
        if decode and sample.ok and sample.image is not None:
            try:
                decode_image(sample.image, max_pixels=max_pixels)
            except ValueError as err:
                found.add("image does not decode", f"{sample.key!r}: {err}")
    for message in tar_problems:
        found.add("tar not readable to its end", _short(message, tar))
    for name in skipped:
        found.add("member that is not a sample file (skipped by every reader)", name)

    rows: list[dict[str, Any]] | None = None
    try:
        rows = read_table(tar, columns=["key", "uid", "status"]).to_pylist()
    except ShardError as err:
        found.add("Parquet not readable", _short(str(err), tar))
    verified = 0
    caption_only = has_syn and not any(v["image"] for v in in_tar.values())
    if rows is not None:
        keys = Counter(str(r["key"]) for r in rows)
        for key, n in keys.items():
            if n > 1:
                found.add("key on several Parquet rows", f"{key!r} x{n}")
            if not key or "." in key or "/" in key:
                found.add("Parquet key with '.' or '/' or empty (webdataset splits it otherwise)", repr(key))
        successes = {}
        for r in rows:
            if r["status"] == "success":
                successes.setdefault(str(r["key"]), r)
        for key, r in successes.items():
            sample = in_tar.get(key)
            if sample is None:
                found.add("success row without its sample in the tar", f"{key!r} (uid {r['uid']})")
            elif not sample["ok"]:
                continue  # reported above
            elif not sample["image"] and not caption_only:
                found.add("success row whose sample has no image member", repr(key))
            elif sample["uid"] != r["uid"]:
                found.add("uid differs between KEY.json and the Parquet", f"{key!r}: {sample['uid']!r} vs {r['uid']!r}")
            else:
                verified += 1
        for key in in_tar:
            if key not in successes:
                row_status = next((r["status"] for r in rows if str(r["key"]) == key), None)
                found.add("tar sample without a success row in the Parquet",
                          f"{key!r} ({'no row' if row_status is None else f'row status {row_status!r}'})")
        _check_stats(tar, rows, found)
    return num_in_tar, verified, found.lines()


def _check_stats(tar: str, rows: list[dict[str, Any]], found: _Problems) -> None:
    try:
        stats = read_shard_stats(tar)
    except ShardError as err:
        found.add("_stats.json not usable", _short(str(err), tar))
        return
    statuses = Counter(str(r["status"]) for r in rows)
    successes = statuses.get("success", 0)
    want = {"count": len(rows), "successes": successes, "failed": len(rows) - successes}
    for name, value in want.items():
        if name in stats and stats[name] != value:
            found.add(f"_stats.json '{name}' disagrees with the Parquet", f"{stats[name]!r} vs {value}")
    for name in ("count", "successes"):
        if name not in stats:
            found.add(f"_stats.json lacks '{name}'")
    recorded = stats.get("status_dict")
    if recorded is not None and recorded != dict(statuses):
        found.add("_stats.json 'status_dict' disagrees with the Parquet", f"{recorded!r} vs {dict(statuses)!r}")


def _short(message: str | None, tar: str) -> str:
    """A message without the shard path it starts with (the line names the shard already)."""
    text = message or ""
    for prefix in (f"{tar}: ", f"{tar[: -len('.tar')]}"):
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip(":_ .")
            break
    return text[:300]


def _check_sizes(folder: str, counts: dict[str, int], all_tars: list[str]) -> list[str]:
    """sizes.json of ``folder`` against the samples its tars really hold."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    path = f"{folder}/{SIZES_FILE}"
    names = sorted(counts)
    listed = ", ".join(names[:5]) + (f", … ({len(names)} shards)" if len(names) > 5 else "")
    if not fs.exists(f"{root}/{SIZES_FILE}"):
        return [f"{path}: missing, so no count is known for {listed} (qcap shards finalize writes it)"]
    try:
        sizes = read_sizes(folder)
    except ShardError as err:
        return [f"{err} — so no count is known for {listed}"]
    problems = []
    for name in names:
        if name not in sizes:
            problems.append(f"{folder}/{name}: sizes.json has no entry for it (the tar holds {counts[name]} samples)")
        elif sizes[name] != counts[name]:
            problems.append(f"{folder}/{name}: sizes.json says {sizes[name]} samples, the tar holds {counts[name]}")
    present = {os.path.basename(t) for t in all_tars}
    for name in sorted(set(sizes) - present):
        problems.append(f"{path}: lists {name} ({sizes[name]} samples), which is not in the folder")
    return problems


def verify(spec: str, *, decode: bool = False, max_pixels: int = 89_478_485) -> dict:
    """Check every shard of ``spec`` (see the module docstring); every problem is listed."""
    tars = expand_shards(spec)
    problems: list[str] = []
    bad_shards: list[str] = []
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    num_in_tars = num_verified = 0
    for tar in tars:
        in_tar, verified, found = verify_shard(tar, decode=decode, max_pixels=max_pixels)
        counts[os.path.dirname(tar)][os.path.basename(tar)] = in_tar
        num_in_tars += in_tar
        num_verified += verified
        problems += found
        if found:
            bad_shards.append(os.path.basename(tar))
    for folder, folder_counts in counts.items():
        found = _check_sizes(folder, folder_counts, expand_shards(folder) if folder else [])
        problems += found
        for line in found:
            bad_shards += [name for name in folder_counts if name in line and name not in bad_shards]
    return {"num_shards": len(tars), "num_samples": num_verified, "num_tar_samples": num_in_tars,
            "decoded": decode, "num_problems": len(problems), "shards_with_problems": bad_shards,
            "problems": problems}


def run_action(action: str, argv: list[str], prog: str) -> int:
    """``qcap shards info|verify|finalize SHARDS ...``."""
    cfg = parse_config(ShardsConfig, argv, prog=prog, fixed={"action": action},
                       description=f"{ACTIONS[action]} ({action}).")
    if cfg.action == "finalize":
        if not os.path.isdir(cfg.shards):
            raise UsageError(f"{cfg.shards}: finalize takes a shard folder")
        expand_shards(cfg.shards)  # a folder without shards is an error, not an empty sizes.json
        result: dict = {"sizes": finalize_folder(cfg.shards, check=True)}
    elif cfg.action == "info":
        result = info(cfg.shards)
    else:
        result = verify(cfg.shards, decode=cfg.decode, max_pixels=cfg.max_pixels)
    if cfg.json_out:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            if key == "problems":
                continue
            if isinstance(value, dict) and len(value) > 12:
                value = f"{len(value)} entries (use --json)"
            print(f"{key}: {value}")
        for line in result.get("problems", []):
            print(f"problem: {line}")
    if cfg.action == "verify" and result["problems"]:
        problems = result["problems"]
        shards = result["shards_with_problems"]
        named = ", ".join(shards[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")
        raise ShardError(f"{len(problems)} problem(s) in {len(shards)} of {result['num_shards']} shard(s)"
                         + (f" ({named})" if named else "") + f": {problems[0]}"
                         + ("; the rest are listed above" if len(problems) > 1 else ""))
    return 0


def info_command(argv: list[str], prog: str) -> int:
    return run_action("info", argv, prog)


def verify_command(argv: list[str], prog: str) -> int:
    return run_action("verify", argv, prog)


def finalize_command(argv: list[str], prog: str) -> int:
    return run_action("finalize", argv, prog)


ACTIONS = {
    "info": "counts per status, columns and samples per shard of a shard folder",
    "verify": "check that tar, Parquet, stats and sizes.json agree, every problem listed (--decode: images too)",
    "finalize": "(re)write a folder's sizes.json from its shards' stats",
}
# the sub-commands, dispatched by base.cli.dispatch like every qcap command
COMMANDS: dict[str, Command] = {name: Command(text, f"curate.shardtool:{name}_command") for name, text in ACTIONS.items()}


def main(argv: list[str], prog: str = "qcap shards") -> int:
    return dispatch(prog, COMMANDS, argv, "Inspect, verify or finalize (sizes.json) a shard folder.", noun="action")
