"""``qcap uids``: combine and inspect DataComp uid files (sorted ``.npy`` of ``[('f0','<u8'),('f1','<u8')]``).

Usage::

    qcap uids intersect basic.npy clip.npy dedup.npy --out final.npy   # in every file
    qcap uids union a.npy b.npy --out either.npy                       # in any file
    qcap uids minus all.npy seen.npy --out rest.npy                    # in the first, not the second
    qcap uids info final.npy [--shards runs/raw] [--json]              # count, order, and what a shard folder holds of it

Every file is read with :func:`base.shards.load_uids` (dtype, shape and order checked, as
DataComp's resharder does) and written with :func:`base.shards.save_uids` (sorted, unique,
atomic). Beside an output ``C.npy`` goes ``C.npy.json``: the resolved :class:`CombineConfig`
(:func:`base.config.save_config`) with the operation, its inputs and counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import numpy as np

from base.cli import Command, UsageError, dispatch
from base.config import arg, parse_config, save_config
from base.shards import UID_DTYPE, array_to_uids, load_uids, save_uids


@dataclass(frozen=True)
class Operation:
    help: str  # one line for the listing
    least: int  # fewest input files
    exact: int | None  # the exact number of input files, when there is one
    func: Callable[[np.ndarray, np.ndarray], np.ndarray]  # numpy set operation on two sorted unique arrays

    def check_count(self, name: str, num_inputs: int) -> None:
        if num_inputs < self.least or (self.exact is not None and num_inputs != self.exact):
            wanted = f"exactly {self.exact}" if self.exact is not None else f"at least {self.least}"
            raise ValueError(f"{name} takes {wanted} uid files, got {num_inputs}")


OPERATIONS: dict[str, Operation] = {
    "intersect": Operation("uids in every input file", 2, None, lambda a, b: np.intersect1d(a, b, assume_unique=True)),
    "union": Operation("uids in any input file", 2, None, np.union1d),
    "minus": Operation("uids of the first file that are not in the second", 2, 2,
                       lambda a, b: np.setdiff1d(a, b, assume_unique=True)),
}


@dataclass(kw_only=True)
class CombineConfig:
    """Combine DataComp uid files with a set operation into a new uid file (sorted, unique)."""

    operation: Literal["intersect", "union", "minus"] = arg(
        help="intersect: in every file; union: in any file; minus: in the first file, not the second",
        positional=True,
    )
    inputs: list[Path] = arg(help="uid files (.npy): two or more; minus takes exactly two", positional=True,
                             metavar="UIDS.npy")
    out: Path = arg(help="output uid file (.npy); OUT.npy.json beside it records this config, inputs and counts",
                    metavar="OUT.npy")

    def __post_init__(self) -> None:
        if self.operation not in OPERATIONS:
            raise ValueError(f"operation: unknown {self.operation!r}; choose from {', '.join(OPERATIONS)}")
        OPERATIONS[self.operation].check_count(f"inputs: {self.operation}", len(self.inputs))
        if Path(self.out).suffix != ".npy":
            raise ValueError(f"out: {self.out} must end in .npy (DataComp's uid file format)")


@dataclass(kw_only=True)
class InfoConfig:
    """What a uid file holds (count, dtype, order); with --shards, how much of it a shard folder holds."""

    path: Path = arg(help="uid file (.npy)", positional=True, metavar="UIDS.npy")
    shards: str | None = arg(None, help="also count how many are successes, failures or absent in these shards",
                             metavar="RAW")
    json_out: bool = arg(False, help="print the result as JSON", flag="--json")


def combine(operation: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Apply a set operation to DataComp uid arrays; the result is sorted and unique."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; choose from {sorted(OPERATIONS)}")
    entry = OPERATIONS[operation]
    entry.check_count(operation, len(arrays))
    result = reduce(entry.func, [np.unique(np.asarray(a, dtype=UID_DTYPE)) for a in arrays])
    return np.asarray(result, dtype=UID_DTYPE)


def info(path: str | os.PathLike, shards: str | None = None) -> dict[str, Any]:
    """What a uid file holds; with ``shards``, how much of it those shards hold as successes."""
    array = load_uids(path)  # raises ShardError naming the file for a wrong dtype or order
    uids = array_to_uids(array[:1]) + (array_to_uids(array[-1:]) if len(array) > 1 else [])
    out: dict[str, Any] = {
        "path": str(path), "count": int(len(array)), "dtype": str(array.dtype), "sorted": True,
        "unique": bool(len(np.unique(array)) == len(array)), "bytes": os.path.getsize(path),
        "first_uid": uids[0] if uids else None, "last_uid": uids[-1] if uids else None,
    }
    if shards is not None:
        from base.shards import expand_shards
        from curate.reshard import select

        out["in_shards"] = select(expand_shards(shards), array).as_json()
    return out


def run_combine(cfg: CombineConfig) -> dict[str, Any]:
    """Combine the input files into ``cfg.out``; write ``OUT.npy.json`` beside it; return that record."""
    arrays = [load_uids(p) for p in cfg.inputs]
    try:
        result = combine(cfg.operation, arrays)
    except ValueError as err:
        raise UsageError(str(err)) from err
    count = save_uids(cfg.out, result)
    record = {"operation": cfg.operation,
              "inputs": [{"path": str(p), "count": int(len(a))} for p, a in zip(cfg.inputs, arrays, strict=True)],
              "out": str(cfg.out), "count": count}
    save_config(cfg, f"{cfg.out}.json", **record)
    return record


def combine_command(operation: str, argv: list[str], prog: str) -> int:
    """``qcap uids intersect|union|minus A.npy B.npy ... --out C.npy``."""
    combined = parse_config(CombineConfig, argv, prog=prog, fixed={"operation": operation},
                            description=f"Write the {OPERATIONS[operation].help} as a new uid file (sorted, unique).")
    record = run_combine(combined)
    inputs = " ".join(f"{item['path']} ({item['count']})" for item in record["inputs"])
    print(f"{combined.operation}: {inputs} -> {combined.out} ({record['count']})")
    return 0


def intersect(argv: list[str], prog: str) -> int:
    return combine_command("intersect", argv, prog)


def union(argv: list[str], prog: str) -> int:
    return combine_command("union", argv, prog)


def minus(argv: list[str], prog: str) -> int:
    return combine_command("minus", argv, prog)


def info_command(argv: list[str], prog: str) -> int:
    """``qcap uids info UIDS.npy [--shards RAW] [--json]``."""
    cfg = parse_config(InfoConfig, argv, prog=prog)
    result = info(cfg.path, cfg.shards)
    if cfg.json_out:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    return 0


# the sub-commands, dispatched by base.cli.dispatch like every qcap command
COMMANDS: dict[str, Command] = {
    **{name: Command(f"{entry.help}: A.npy B.npy{'' if entry.exact else ' [...]'} --out C.npy", f"curate.uidtool:{name}")
       for name, entry in OPERATIONS.items()},
    "info": Command("count, dtype, order; with --shards, what a shard folder holds of them", "curate.uidtool:info_command"),
}


def main(argv: list[str], prog: str = "qcap uids") -> int:
    return dispatch(prog, COMMANDS, argv, "Combine and inspect DataComp uid files (.npy).", noun="operation")
