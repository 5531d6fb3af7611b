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


def _listing(prog: str) -> str:
    width = max(len(name) for name in FILTERS)
    lines = [f"usage: {prog} <filter> --shards RAW --out UIDS.npy [options]", "",
             "Choose samples of raw shards; write a DataComp uid file and a report beside it.", "", "filters:"]
    lines += [f"  {name.ljust(width)}  {entry.help}" for name, entry in FILTERS.items()]
    lines += ["", f"Run '{prog} <filter> --help' for a filter's options."]
    return "\n".join(lines)


def main(argv: list[str], prog: str = "qcap filter") -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_listing(prog))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in FILTERS:
        from base.cli import UsageError

        raise UsageError(f"unknown filter {name!r}; choose from {', '.join(FILTERS)}")
    entry = FILTERS[name]
    cfg = parse_config(entry.config, rest, prog=f"{prog} {name}")
    module, func = entry.target.split(":")
    report = getattr(importlib.import_module(module), func)(cfg)
    print(summary_line(report))
    return 0


def summary_line(report: dict) -> str:
    counts = report["counts"]
    candidates = counts["num_candidates"]
    share = f"{100 * counts['kept'] / candidates:.1f}%" if candidates else "n/a"
    return (
        f"{report['filter']}: kept {counts['kept']} of {candidates} downloaded samples ({share}); "
        f"dropped {json.dumps(counts['dropped'])}; failed downloads {json.dumps(counts['failed'])}\n"
        f"  uids: {report['outputs']['uids']}  report: {report['outputs']['decisions'].rsplit('/', 1)[0]}/report.json"
    )
