"""The train stage's commands (see curate.cli for the plumbing).

Run as ``python -m train --help`` or ``qcap <command> --help``.
"""

from __future__ import annotations

from collections.abc import Sequence

from curate.cli import Command, dispatch

COMMANDS: dict[str, Command] = {}

DESCRIPTION = "train: CLIP and CoCa pretraining on shards, with Hugging Face Accelerate."


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m train", COMMANDS, argv, DESCRIPTION)
