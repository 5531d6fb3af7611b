"""One sub-command mechanism (base.cli.dispatch) for qcap and for filter, uids, shards and finetune;
every registered command is ``main(argv: list[str], prog: str) -> int``."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

QCAP = Path(sys.executable).parent / "qcap"

SUBCOMMANDS = {  # command -> (its table, the names it must list)
    "filter": ("curate.filters.cli:COMMANDS", ["basic", "clip-score", "dedup"]),
    "uids": ("curate.uidtool:COMMANDS", ["intersect", "union", "minus", "info"]),
    "shards": ("curate.shardtool:COMMANDS", ["info", "verify", "finalize"]),
    "finetune": ("finetune.run:TASK_COMMANDS", ["seg", "depth", "cls", "det"]),
}


def _table(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(QCAP), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_lists_the_sub_commands_and_an_unknown_one_is_one_line(command):
    spec, names = SUBCOMMANDS[command]
    assert list(_table(spec)) == names
    shown = run(command, "--help")
    assert shown.returncode == 0, shown.stderr
    for name in names:
        assert f"\n  {name} " in shown.stdout, shown.stdout
    assert f"Run 'qcap {command} <" in shown.stdout
    bad = run(command, "nosuch")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"qcap {command}: error: unknown ") and "'nosuch'" in bad.stderr
    one = run(command, names[0], "--help")  # each sub-command has its own flags under its own prog
    assert one.returncode == 0 and one.stdout.startswith(f"usage: qcap {command} {names[0]}"), one.stdout[:300]


def test_unknown_names_suggest_the_close_ones_in_process(capsys):
    from qcap.cli import main

    assert main(["filter", "dedupe"]) == 2
    err = capsys.readouterr().err
    assert err == "qcap filter: error: unknown filter 'dedupe'; did you mean dedup?; choose from basic, clip-score, dedup\n"
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qcap: error: unknown command 'no-such-command'") and err.count("\n") == 1
    assert main(["uids"]) == 2 and "operations:" in capsys.readouterr().out  # no name: the listing, status 2


def test_sub_commands_parse_their_own_flags(tmp_path, capsys):
    from base.shards import save_uids, uids_to_array
    from qcap.cli import main

    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    save_uids(a, uids_to_array(["0" * 31 + "1", "0" * 31 + "2"]))
    save_uids(b, uids_to_array(["0" * 31 + "2"]))
    assert main(["uids", "intersect", str(a), str(b), "--out", str(tmp_path / "c.npy")]) == 0
    assert "intersect:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # a bad flag or count: argparse's usage line and one error line
        main(["uids", "minus", str(a), "--out", str(tmp_path / "d.npy")])
    assert exit_.value.code == 2 and "qcap uids minus: error: inputs: minus takes exactly 2 uid files" in capsys.readouterr().err
    assert main(["shards", "finalize", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("qcap shards finalize: error:")


def test_every_registered_command_is_main_argv_prog_returning_int():
    from qcap.cli import all_commands

    tables = {"qcap": all_commands(), **{name: _table(spec) for name, (spec, _) in SUBCOMMANDS.items()}}
    for where, table in tables.items():
        for name, command in table.items():
            module, func = command.target.split(":")
            sig = inspect.signature(getattr(importlib.import_module(module), func))
            params = list(sig.parameters.values())
            assert [p.name for p in params] == ["argv", "prog"], (where, name, command.target, sig)
            assert [str(p.annotation) for p in params] == ["list[str]", "str"], (where, name, command.target, sig)
            assert str(sig.return_annotation) == "int", (where, name, command.target, sig)
