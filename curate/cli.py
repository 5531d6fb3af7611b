"""The curate stage's commands (see :mod:`base.cli` for the plumbing).

Run as ``python -m curate --help`` or ``qcap <command> --help``.
"""

from __future__ import annotations

from collections.abc import Sequence

from base.cli import Command, dispatch

COMMANDS: dict[str, Command] = {
    "shards": Command("inspect, verify or finalize (sizes.json) a shard folder", "curate.shardtool:main"),
    "download": Command("download a pool into raw shards with img2dataset (Ray or processes): retries, resume, URL guard", "curate.download.run:main"),
    "filter": Command("choose samples: DataComp's basic, CLIP-score and dedup filters -> uid file + report", "curate.filters.cli:main"),
    "uids": Command("intersect, union, subtract or inspect DataComp uid files (.npy)", "curate.uidtool:main"),
    "reshard": Command("write the successful samples of a uid file into new shards (sizes.json, resumable)", "curate.reshard:main"),
    "subset": Command("nested seeded subsets of a shard folder (1% < 10% < 100%), DR or real-captions-only, with uid list and card", "curate.subset:main"),
}

DESCRIPTION = "curate: download, filter, dedup, reshard and subset a DataComp-style pool (and inspect shards)."


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m curate", COMMANDS, argv, DESCRIPTION)
