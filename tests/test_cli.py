"""The command line: every entry point answers --help without loading heavy libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "ray", "open_clip", "transformers", "accelerate", "img2dataset")
ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=ROOT)
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return proc, modules


@pytest.mark.parametrize(
    "args",
    [["-m", "qcap", "--help"], ["-m", "curate", "--help"], ["-m", "captioning", "--help"], ["-m", "train", "--help"], ["-m", "finetune", "--help"]],
)
def test_help_is_light(args):
    proc, modules = _imported_modules(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "commands:" in proc.stdout
    assert not modules & set(HEAVY), f"--help imported {sorted(modules & set(HEAVY))}"


def test_every_command_help_is_light():
    from qcap.cli import all_commands

    for name in all_commands():
        proc, modules = _imported_modules(["-m", "qcap", name, "--help"])
        assert proc.returncode == 0, f"qcap {name} --help failed: {proc.stderr[-2000:]}"
        assert "usage:" in proc.stdout
        assert not modules & set(HEAVY), f"qcap {name} --help imported {sorted(modules & set(HEAVY))}"


def test_console_script_and_unknown_command():
    qcap = Path(sys.executable).parent / "qcap"
    proc = subprocess.run([str(qcap), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "shards" in proc.stdout
    bad = subprocess.run([str(qcap), "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'no-such-command'" in bad.stderr


def test_stage_imports_flow_one_way():
    """curate imports no other stage; nothing imports finetune (DESIGN.md, "Packages")."""
    allowed = {"curate": set(), "captioning": {"curate"}, "train": {"curate"}, "finetune": {"curate", "train"}}
    for stage, ok in allowed.items():
        for path in (ROOT / stage).rglob("*.py"):
            text = path.read_text()
            for other in set(allowed) - {stage} - ok:
                assert f"from {other}" not in text and f"import {other}" not in text.replace(f"import {other}_", ""), (
                    f"{path.relative_to(ROOT)} imports {other}"
                )


def test_shards_command_reports_a_folder(tmp_path):
    from conftest import make_jpeg, make_uid

    from curate.shards import Sample, ShardWriter

    with ShardWriter(tmp_path, 0) as writer:
        writer.write(Sample(key="0", uid=make_uid(0), image=make_jpeg(), text="a"))
        writer.write(Sample(key="1", uid=make_uid(1), status="http_404", error_message="404"))
    qcap = Path(sys.executable).parent / "qcap"
    proc = subprocess.run([str(qcap), "shards", "finalize", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = subprocess.run([str(qcap), "shards", "info", str(tmp_path), "--json"], capture_output=True, text=True)
    assert '"num_rows": 2' in info.stdout and '"http_404": 1' in info.stdout
    verify = subprocess.run([str(qcap), "shards", "verify", str(tmp_path)], capture_output=True, text=True)
    assert verify.returncode == 0 and "problems: []" in verify.stdout
    missing = subprocess.run([str(qcap), "shards", "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    for shard_id in (1, 2):  # two broken shards: verify names both
        (tmp_path / f"{shard_id:05d}.tar").write_bytes((tmp_path / "00000.tar").read_bytes()[:700])
        (tmp_path / f"{shard_id:05d}.parquet").write_bytes((tmp_path / "00000.parquet").read_bytes())
    broken = subprocess.run([str(qcap), "shards", "verify", str(tmp_path)], capture_output=True, text=True)
    assert broken.returncode == 2 and "00001.tar" in broken.stderr and "00002.tar" in broken.stderr
    assert "Traceback" not in broken.stderr


def _raises(error: BaseException):
    def command(argv, prog):
        raise error

    return command


def test_an_unexpected_error_is_one_line_that_says_it_is_a_bug(capsys, monkeypatch):
    from curate.cli import INTERNAL_ERROR, TRACEBACK_ENV, UsageError, run_guarded

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert run_guarded(_raises(UsageError("--out: no such folder")), [], "qcap x") == 2
    assert capsys.readouterr().err.strip() == "qcap x: error: --out: no such folder"
    assert run_guarded(_raises(KeyError("status\nsecond line")), [], "qcap x") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and INTERNAL_ERROR in err and "KeyError" in err and "Traceback" not in err
    assert run_guarded(_raises(MemoryError()), [], "qcap x") == 1
    assert "out of memory" in capsys.readouterr().err
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(KeyError):
        run_guarded(_raises(KeyError("status")), [], "qcap x")


def test_output_piped_into_head_is_not_an_error():
    """`qcap ... | head`: the reader leaves early; the command ends quietly with status 0."""
    script = (
        "import sys\n"
        "from curate.cli import run_guarded\n"
        "def command(argv, prog):\n"
        "    for i in range(200_000):\n"
        "        print('row', i)\n"
        "sys.exit(run_guarded(command, [], 'qcap x'))\n"
    )
    proc = subprocess.run(f"set -o pipefail; '{sys.executable}' -c \"$SCRIPT\" | head -c 20", shell=True, cwd=ROOT,
                          capture_output=True, text=True, executable="/bin/bash", env={**os.environ, "SCRIPT": script})
    assert proc.stdout.startswith("row 0"), proc.stderr
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def _prose(path: Path) -> str:
    """What a file says to its reader: all of a document, a Python file's docstrings and comments."""
    import ast
    import io
    import tokenize

    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".py":
        return text
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node) or "")
    return "\n".join(parts)


def test_the_repository_stands_alone():
    """Every document the repository cites is in it; nothing points outside the checkout."""
    import re

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    texts = [p for p in tracked if p.endswith((".md", ".py", ".toml", ".cfg", ".txt")) or p in ("Makefile", ".ci/run")]
    cited: dict[str, str] = {}
    for name in texts:
        full = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        assert "../" + "shared" not in full, f"{name} points outside the repository"
        for doc in re.findall(r"\b[A-Z][A-Z_]+\.md\b", _prose(ROOT / name)):
            cited.setdefault(doc, name)
    missing = {doc: where for doc, where in cited.items() if not (ROOT / doc).is_file()}
    assert cited and not missing, f"cited but not in the repository: {missing}"


def test_commands_run_one_after_another_log_to_the_current_stderr(capsys):
    """A second command in one process logs to the stderr of its own time, not to the first's."""
    import logging

    from curate.cli import run_guarded

    def command(argv, prog):
        logging.getLogger("qcap.test").warning("hello from %s", argv[0])
        return 0

    assert run_guarded(command, ["first"], "qcap x") == 0
    assert "hello from first" in capsys.readouterr().err
    assert run_guarded(command, ["second"], "qcap x") == 0  # capsys has swapped sys.stderr meanwhile
    err = capsys.readouterr().err
    assert "hello from second" in err and "hello from first" not in err
