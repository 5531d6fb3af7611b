"""The finetune stage's commands (see :mod:`base.cli` for the plumbing).

Run as ``python -m finetune --help`` or ``qcap <command> --help``.
"""

from __future__ import annotations

from collections.abc import Sequence

from base.cli import Command, dispatch

COMMANDS: dict[str, Command] = {
    "finetune": Command("finetune a CLIP image tower on segmentation, depth, classification or detection; write metrics", "finetune.run:main"),
    "attention-distance": Command("mean attention distance per head and block of a ViT (paper 3.4), JSON + plot", "finetune.distance:main"),
    "attention-test": Command("paired test over seeds: DR heads more local in deeper blocks while keeping diversity (paper 3.4)", "finetune.attention_test:main"),
}

DESCRIPTION = "finetune: dense-prediction transfer (segmentation, depth), classification, attention distance."


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m finetune", COMMANDS, argv, DESCRIPTION)
