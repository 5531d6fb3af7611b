"""The demo's commands: the reports of ``make demo`` and ``make science`` (see :mod:`base.cli`).

They read the folder layout the Makefile writes (``demo/layout.py`` names it once; a test checks
it against the Makefile). Run as ``python -m demo --help`` or ``qcap <command> --help``.
"""

from __future__ import annotations

from collections.abc import Sequence

from base.cli import Command, dispatch

COMMANDS: dict[str, Command] = {
    "report": Command("the ablation's report from a demo folder: table, paper verdicts, figures, stage timings", "demo.report:main"),
    "science-report": Command("make science's report: positive controls first, then DR vs real, data efficiency, vs MAE, attention test", "demo.science:main"),
}

DESCRIPTION = "demo: the reports of make demo and make science, read from the folders the Makefile writes."


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("python -m demo", COMMANDS, argv, DESCRIPTION)
