"""The finetune stage's commands (see curate.cli for the plumbing).

Run as ``python -m finetune --help`` or ``qcap <command> --help``.
"""

from __future__ import annotations

from collections.abc import Sequence

from curate.cli import Command, dispatch

COMMANDS: dict[str, Command] = {
    "finetune": Command("finetune a CLIP image tower on segmentation, depth, classification or detection; write metrics", "finetune.run:main"),
    "attention-distance": Command("mean attention distance per head and block of a ViT (paper 3.4), JSON + plot", "finetune.distance:main"),
    "report": Command("the ablation's report from a demo folder: table, paper verdicts, figures, stage timings", "finetune.report:main"),
    "science-report": Command("make science's report: positive controls first, then DR vs real, data efficiency, vs MAE, attention test", "finetune.science:main"),
    "attention-test": Command("paired test over seeds: DR heads more local in deeper blocks while keeping diversity (paper 3.4)", "finetune.attention_test:main"),
}

DESCRIPTION = "finetune: dense-prediction transfer (segmentation, depth), classification, attention distance."


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m finetune", COMMANDS, argv, DESCRIPTION)
