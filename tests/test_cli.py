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
    [["-m", "qcap", "--help"], ["-m", "curate", "--help"], ["-m", "captioning", "--help"], ["-m", "train", "--help"], ["-m", "finetune", "--help"],
     ["-m", "world", "--help"], ["-m", "demo", "--help"]],
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


# The floors, bottom up: a package may import only those named for it (DESIGN.md, "Packages").
# ``qcap`` is the top: it dispatches to every stage, and no stage imports it.
FLOORS = {"base": set(), "curate": {"base"}, "world": {"base", "curate"}, "captioning": {"base"}, "train": {"base"},
          "finetune": {"base", "train"}, "demo": {"base", "train", "finetune"},
          "qcap": {"base", "curate", "world", "captioning", "train", "finetune", "demo"}}
# Import circles being removed now, each named with who removes it; empty when none is left.
KNOWN_CIRCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    """Every module of every package (each subpackage included), by dotted name."""
    found = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _import_graph(*, command_targets: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: line}, from every import statement in the file.

    Every import counts — at module level, inside a function, under ``if TYPE_CHECKING``: a
    function-level import is still a dependency, only a later one (``fetch`` imported ``merge``
    inside a function while ``merge`` imported ``fetch`` at the top: a circle all the same).
    ``from package import name`` is an edge to ``package.name`` when that is a module.
    ``command_targets``: a command table's ``"package.module:function"`` strings count too (the
    dispatcher imports them when the command runs): for the floors, not for circles — a
    stage's ``cli`` names its commands' modules, and they import the shared CLI plumbing back."""
    import ast
    import re

    modules = _modules()
    target = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+)*):[a-z_0-9]+$")
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package the file is in (or is)
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif command_targets and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and target.match(node.value):
                names = [node.value.split(":")[0]]
            for imported in names:
                while imported and imported not in modules:  # import a.b.c of a non-module name: its module
                    imported = imported.rpartition(".")[0]
                if imported and imported != name:
                    graph[name].setdefault(imported, node.lineno)
    return graph


def _circles(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_stage_imports_flow_one_way():
    """Each package imports only the floors below it: curate no other stage, nothing finetune,
    no stage the top-level qcap package (its version comes from the package metadata)."""
    modules = _modules()
    assert {"base.shards", "curate.download.fetch", "world.generate", "captioning.job", "train.loop", "finetune.run",
            "demo.report", "qcap.cli"} <= set(modules)
    # every package at the root is a floor: a new one must be given its place here
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "tools"}
    assert packages == set(FLOORS), f"packages without a floor: {sorted(packages - set(FLOORS))}"
    wrong = []
    for name, imported in _import_graph(command_targets=True).items():
        floor = name.split(".")[0]
        for other, line in imported.items():
            if other.split(".")[0] not in FLOORS[floor] | {floor}:
                wrong.append(f"{modules[name].relative_to(ROOT)}:{line} imports {other}")
    assert not wrong, "imports against the floors:\n" + "\n".join(wrong)


def test_no_import_circles():
    """No two modules import each other, directly or around a longer circle."""
    graph = _import_graph()
    circles = [c for c in _circles(graph) if c not in KNOWN_CIRCLES]
    described = [" <-> ".join(sorted(c)) + ": " + ", ".join(
        f"{a} imports {b} (line {graph[a][b]})" for a in sorted(c) for b in sorted(graph[a]) if b in c) for c in circles]
    assert not circles, "import circles:\n" + "\n".join(described)


def test_the_import_graph_sees_a_circle_and_a_function_level_import(tmp_path, monkeypatch):
    """The checks above can fail: a circle through a function-level import, and an import of
    qcap from a lower floor, are both found in a planted copy of a package."""
    import shutil

    fake = tmp_path / "root"
    for package in FLOORS:
        shutil.copytree(ROOT / package, fake / package, ignore=shutil.ignore_patterns("__pycache__"))
    (fake / "base" / "shards.py").write_text((ROOT / "base" / "shards.py").read_text(encoding="utf-8")
                                              + "\n\ndef _planted():\n    from curate.reshard import select\n\n"
                                              "    import qcap\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    graph = _import_graph()
    assert "qcap" in graph["base.shards"] and "curate.reshard" in graph["base.shards"]
    assert any({"base.shards", "curate.reshard"} <= c for c in _circles(graph))
    with pytest.raises(AssertionError, match="base/shards.py:.* imports qcap"):
        test_stage_imports_flow_one_way()


def test_shards_command_reports_a_folder(tmp_path):
    from conftest import make_jpeg, make_uid

    from base.shards import Sample, ShardWriter

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
    from base.cli import INTERNAL_ERROR, TRACEBACK_ENV, UsageError, run_guarded

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
        "from base.cli import run_guarded\n"
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

    from base.cli import run_guarded

    def command(argv, prog):
        logging.getLogger("qcap.test").warning("hello from %s", argv[0])
        return 0

    assert run_guarded(command, ["first"], "qcap x") == 0
    assert "hello from first" in capsys.readouterr().err
    assert run_guarded(command, ["second"], "qcap x") == 0  # capsys has swapped sys.stderr meanwhile
    err = capsys.readouterr().err
    assert "hello from second" in err and "hello from first" not in err


def test_a_library_handler_left_on_a_closed_stream_logs_to_the_current_stderr(capsys):
    """Commands run one after another in one process (a notebook, the tests): a library that bound
    its console handler to an earlier command's stderr (Ray Data does) must not print a
    "--- Logging error ---" traceback once that stream is closed; its line goes to stderr."""
    import io
    import logging

    from base.cli import run_guarded

    old = io.StringIO()
    handler = logging.StreamHandler(old)
    library = logging.getLogger("qcap_test_library")
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False
    old.close()

    def command(argv: list[str], prog: str) -> int:
        library.warning("from the library")
        return 0

    try:
        assert run_guarded(command, [], "qcap test") == 0
    finally:
        library.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert "from the library" in err
