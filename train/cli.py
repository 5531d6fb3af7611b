"""The train stage's commands (see base.cli for the plumbing).

Run as ``qcap train ...``, ``python -m train train ...`` or, for several processes,
``accelerate launch [--num_processes N ...] -m train ...``: when the first argument is a flag
(``--preset``, ``--data``, ...) ``python -m train`` runs the ``train`` command, so the launcher
line needs no command name. ``python -m train --help`` lists the commands.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from base.cli import Command, dispatch

COMMANDS: dict[str, Command] = {
    "train": Command("train CLIP or CoCa on shards with Accelerate (checkpoints, exact resume, eval)", "train.run:main"),
    "mae": Command("MAE pretraining (transformers' ViTMAE) of a CLIP model's image tower; exports an open_clip folder", "train.mae:main"),
}

DESCRIPTION = "train: CLIP and CoCa pretraining on shards, with Hugging Face Accelerate."
DEFAULT_COMMAND = "train"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = [DEFAULT_COMMAND, *argv]  # 'accelerate launch -m train --preset tiny ...'
    return dispatch("python -m train", COMMANDS, argv, DESCRIPTION)
