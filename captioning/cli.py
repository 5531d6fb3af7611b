"""The captioning stage's commands (see base.cli for the plumbing).

Run as ``python -m captioning --help`` or ``qcap <command> --help``.
"""

from __future__ import annotations

from collections.abc import Sequence

from base.cli import Command, dispatch

COMMANDS: dict[str, Command] = {
    "caption": Command("write N synthetic captions per image of a shard folder (CoCa/HF, DataCompDR), on Ray",
                       "captioning.job:main"),
    "build-dr": Command("join curated images and synthetic captions (qcap's or Apple's DataCompDR) by uid into DR shards",
                        "captioning.dr:main"),
    "fit-vocab": Command("fit a BPE vocabulary to a world's text and write an open_clip captioner config that uses it", "captioning.vocab:main"),
    "reinforce": Command("store N augmentations per image and a teacher ensemble's embeddings of them and every "
                         "caption (DataCompDR reinforcement), on Ray", "captioning.reinforce:main"),
}

DESCRIPTION = "captioning: write synthetic CoCa captions (DataCompDR) and build DR datasets."


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m captioning", COMMANDS, argv, DESCRIPTION)
