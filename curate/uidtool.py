"""``qcap uids``: combine and inspect DataComp uid files (sorted ``.npy`` of ``[('f0','<u8'),('f1','<u8')]``).

Usage::

    qcap uids intersect basic.npy clip.npy dedup.npy --out final.npy   # in every file
    qcap uids union a.npy b.npy --out either.npy                       # in any file
    qcap uids minus all.npy seen.npy --out rest.npy                    # in the first, not the second
    qcap uids info final.npy [--shards runs/raw] [--json]              # count, order, and what a shard folder holds of it

Every file is read with :func:`curate.shards.load_uids` (dtype, shape and order checked, as
DataComp's resharder does) and written with :func:`curate.shards.save_uids` (sorted, unique,
atomic). Beside an output ``C.npy`` goes ``C.npy.json``: the operation, its inputs and counts.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

from curate.cli import UsageError
from curate.shards import UID_DTYPE, array_to_uids, atomic_write_json, load_uids, save_uids

# name -> (help, minimum number of inputs, exact number or None, numpy set operation)
OPERATIONS: dict[str, tuple[str, int, int | None, Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "intersect": ("uids in every input file", 2, None, lambda a, b: np.intersect1d(a, b, assume_unique=True)),
    "union": ("uids in any input file", 2, None, np.union1d),
    "minus": ("uids of the first file that are not in the second", 2, 2,
              lambda a, b: np.setdiff1d(a, b, assume_unique=True)),
}


def combine(operation: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Apply a set operation to DataComp uid arrays; the result is sorted and unique."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; choose from {sorted(OPERATIONS)}")
    _, least, exact, func = OPERATIONS[operation]
    if len(arrays) < least or (exact is not None and len(arrays) != exact):
        wanted = f"exactly {exact}" if exact is not None else f"at least {least}"
        raise ValueError(f"{operation} takes {wanted} uid files, got {len(arrays)}")
    result = reduce(func, [np.unique(np.asarray(a, dtype=UID_DTYPE)) for a in arrays])
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
        from curate.reshard import select
        from curate.shards import expand_shards

        out["in_shards"] = select(expand_shards(shards), array).as_json()
    return out


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Combine and inspect DataComp uid files (.npy).",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="action", required=True, metavar="{intersect,union,minus,info}")
    for name, (help_text, _least, exact, _) in OPERATIONS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.add_argument("inputs", nargs=exact if exact is not None else "+", type=Path, metavar="UIDS.npy",
                       help=f"{'two' if exact == 2 else 'two or more'} uid files")
        p.add_argument("--out", required=True, type=Path, metavar="OUT.npy", help="output uid file")
    p = sub.add_parser("info", help="count, dtype, order; with --shards, what a shard folder holds of them",
                       allow_abbrev=False)
    p.add_argument("path", type=Path, metavar="UIDS.npy", help="uid file")
    p.add_argument("--shards", default=None, metavar="RAW", help="also count how many are successes in these shards")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str], prog: str = "qcap uids") -> int:
    args = _parser(prog).parse_args(argv)
    if args.action == "info":
        result = info(args.path, args.shards)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for key, value in result.items():
                print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
        return 0
    if args.out.suffix != ".npy":
        raise UsageError(f"--out {args.out}: must end in .npy (DataComp's uid file format)")
    arrays = [load_uids(p) for p in args.inputs]
    try:
        result = combine(args.action, arrays)
    except ValueError as err:
        raise UsageError(str(err)) from err
    count = save_uids(args.out, result)
    atomic_write_json(f"{args.out}.json", {
        "operation": args.action, "inputs": [{"path": str(p), "count": int(len(a))} for p, a in zip(args.inputs, arrays, strict=True)],
        "out": str(args.out), "count": count,
    })
    print(f"{args.action}: {' '.join(f'{p} ({len(a)})' for p, a in zip(args.inputs, arrays, strict=True))} -> {args.out} ({count})")
    return 0
