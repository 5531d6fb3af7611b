"""``qcap filter <name>``: the filters, picked from a registry.

Usage::

    qcap filter basic --shards runs/raw --out runs/filters/basic.npy
    qcap filter clip-score --shards runs/raw --checkpoint runs/dfn/final --top-fraction 0.3 \\
        --subset runs/filters/basic.npy --out runs/filters/clip.npy
    qcap filter dedup --shards runs/raw --subset runs/filters/clip.npy --out runs/filters/dedup.npy

Each writes ``OUT.npy`` (DataComp's sorted uid file) and ``OUT.report/`` (report.json with the
counts by reason, decisions.parquet, histograms, the resolved config). Only configs are imported
here, so ``--help`` loads neither torch nor ray.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

from base.cli import Command, dispatch
from base.config import parse_config
from curate.filters.config import BasicConfig, ClipScoreConfig, DedupConfig


@dataclass(frozen=True)
class FilterEntry:
    help: str  # one line for the listing
    config: type  # the filter's config dataclass
    target: str  # "module:function" taking the config, returning the report


FILTERS: dict[str, FilterEntry] = {
    "basic": FilterEntry("DataComp's basic filter: English (lid.176), caption length, image size and aspect",
                         BasicConfig, "curate.filters.basic:main"),
    "clip-score": FilterEntry("image-text cosine similarity of an open_clip model (Ray Data); top fraction or threshold",
                              ClipScoreConfig, "curate.filters.clip_score:main"),
    "dedup": FilterEntry("exact (SHA-256) and near (pHash) duplicates; one sample kept per group",
                         DedupConfig, "curate.filters.dedup:main"),
}


def run_filter(name: str, argv: list[str], prog: str) -> int:
    """``qcap filter NAME ...``: parse the filter's config, run it, print the summary line."""
    entry = FILTERS[name]
    cfg = parse_config(entry.config, argv, prog=prog)
    module, func = entry.target.split(":")
    report = getattr(importlib.import_module(module), func)(cfg)
    print(summary_line(report))
    return 0


def basic(argv: list[str], prog: str) -> int:
    return run_filter("basic", argv, prog)


def clip_score(argv: list[str], prog: str) -> int:
    return run_filter("clip-score", argv, prog)


def dedup(argv: list[str], prog: str) -> int:
    return run_filter("dedup", argv, prog)


# the sub-commands, dispatched by base.cli.dispatch like every qcap command
COMMANDS: dict[str, Command] = {name: Command(entry.help, f"curate.filters.cli:{name.replace('-', '_')}")
                                for name, entry in FILTERS.items()}
DESCRIPTION = "Choose samples of raw shards; write a DataComp uid file and a report beside it."


def main(argv: list[str], prog: str = "qcap filter") -> int:
    return dispatch(prog, COMMANDS, argv, DESCRIPTION, noun="filter")


def summary_line(report: dict) -> str:
    counts = report["counts"]
    candidates = counts["num_candidates"]
    share = f"{100 * counts['kept'] / candidates:.1f}%" if candidates else "n/a"
    return (
        f"{report['filter']}: kept {counts['kept']} of {candidates} downloaded samples ({share}); "
        f"dropped {json.dumps(counts['dropped'])}; failed downloads {json.dumps(counts['failed'])}\n"
        f"  uids: {report['outputs']['uids']}  report: {report['outputs']['decisions'].rsplit('/', 1)[0]}/report.json"
    )
