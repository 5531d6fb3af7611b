"""``qcap``: one command for every stage.

The stages' command tables are merged here; each command's module is imported only when it
runs, so ``qcap --help`` is instant and loads neither torch, ray nor open_clip.
"""

from __future__ import annotations

from collections.abc import Sequence

from base.cli import Command, dispatch
from captioning.cli import COMMANDS as CAPTIONING
from curate.cli import COMMANDS as CURATE
from demo.cli import COMMANDS as DEMO
from finetune.cli import COMMANDS as FINETUNE
from train.cli import COMMANDS as TRAIN
from world.cli import COMMANDS as WORLD

DESCRIPTION = (
    "qcap builds caption-quality ablation datasets for CLIP and trains on them:\n"
    "curate a DataComp-style pool, caption it with CoCa (DataCompDR), build subset ladders,\n"
    "train CLIP with Accelerate and measure transfer to dense tasks."
)


def all_commands() -> dict[str, Command]:
    merged: dict[str, Command] = {}
    for table in (CURATE, WORLD, CAPTIONING, TRAIN, FINETUNE, DEMO):
        for name, command in table.items():
            if name in merged:
                raise RuntimeError(f"command {name!r} is registered by two stages")
            merged[name] = command
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("qcap", all_commands(), argv, DESCRIPTION)
