"""uid files: DataComp's dtype and order, set operations, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_uid
from test_filter_support import assert_datacomp_uids

from base.config import load_config
from base.shards import ShardError, array_to_uids, load_uids, save_uids
from curate.uidtool import CombineConfig, combine
from qcap.cli import main as qcap

QCAP = str(Path(sys.executable).parent / "qcap")


def uid_file(path: Path, indices) -> set[str]:
    uids = {make_uid(i) for i in indices}
    save_uids(path, uids)
    return uids


def test_set_operations_through_the_command(tmp_path):
    a = uid_file(tmp_path / "a.npy", range(0, 60))
    b = uid_file(tmp_path / "b.npy", range(40, 100))
    c = uid_file(tmp_path / "c.npy", range(50, 55))
    cases = {
        "intersect": (["a.npy", "b.npy", "c.npy"], a & b & c),
        "union": (["a.npy", "b.npy"], a | b),
        "minus": (["a.npy", "b.npy"], a - b),
    }
    for op, (inputs, expected) in cases.items():
        out = tmp_path / f"{op}.npy"
        assert qcap(["uids", op, *[str(tmp_path / i) for i in inputs], "--out", str(out)]) == 0
        array = assert_datacomp_uids(out)  # plain numpy, DataComp's dtype, sorted
        assert set(array_to_uids(array)) == expected, op
        record = json.loads(Path(f"{out}.json").read_text())
        assert record["count"] == len(expected) and record["operation"] == op
        assert record["inputs"] == [{"path": str(tmp_path / i), "count": len(u)} for i, u in zip(inputs, (a, b, c), strict=False)]
        # the resolved config beside the output, loadable as the command's config
        assert record["config_class"] == "curate.uidtool.CombineConfig"
        assert load_config(CombineConfig, f"{out}.json") == CombineConfig(
            operation=op, inputs=[tmp_path / i for i in inputs], out=out)
    info = subprocess.run([QCAP, "uids", "info", str(tmp_path / "a.npy"), "--json"], capture_output=True, text=True)
    data = json.loads(info.stdout)
    assert data["count"] == 60 and data["sorted"] and data["unique"] and data["first_uid"] == min(a)
    assert data["last_uid"] == max(a)


def test_uid_order_is_datacomps():
    """Sorted by (high 64 bits, low 64 bits) — the same as sorting the 32-hex strings."""
    uids = [make_uid(i) for i in range(200)]
    array = combine("union", [np.array([(int(u[:16], 16), int(u[16:], 16))], dtype="u8,u8") for u in uids])
    assert array_to_uids(array) == sorted(uids)
    assert len(combine("intersect", [array, array[::2]])) == 100
    with pytest.raises(ValueError, match="exactly 2"):
        combine("minus", [array, array, array])


def test_bad_files_are_clear_errors(tmp_path, capsys):
    np.save(tmp_path / "ints.npy", np.arange(4))
    np.save(tmp_path / "unsorted.npy", np.array([(5, 1), (1, 1)], dtype="u8,u8"))
    (tmp_path / "text.npy").write_text("not numpy")
    uid_file(tmp_path / "ok.npy", range(3))
    for name, message in (("ints.npy", "expected DataComp's"), ("unsorted.npy", "not sorted"),
                          ("text.npy", "not a .npy file")):
        with pytest.raises(ShardError, match=message):
            load_uids(tmp_path / name)
        code = qcap(["uids", "intersect", str(tmp_path / "ok.npy"), str(tmp_path / name), "--out", str(tmp_path / "o.npy")])
        err = capsys.readouterr().err
        assert code == 2 and name in err and message in err
    for argv, message in ((["union", "ok.npy"], "inputs: union takes at least 2 uid files, got 1"),
                          (["minus", "ok.npy", "ok.npy", "ok.npy"], "inputs: minus takes exactly 2 uid files, got 3"),
                          (["intersect", "ok.npy", "ok.npy", "--out", "o.npy", "--shards", "x"], "unrecognized arguments"),
                          (["info", "ok.npy", "--out", "o.npy"], "unrecognized arguments")):
        out = [] if "--out" in argv else ["--out", str(tmp_path / "o.npy")]
        with pytest.raises(SystemExit) as exc:
            qcap(["uids", *[str(tmp_path / a) if a.endswith(".npy") else a for a in argv], *out])
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    assert qcap(["uids", "xor", str(tmp_path / "ok.npy")]) == 2
    assert "unknown operation 'xor'" in capsys.readouterr().err
    assert qcap(["uids"]) == 2 and "intersect" in capsys.readouterr().out
    # the console script: one clear line, no traceback
    proc = subprocess.run([QCAP, "uids", "union", str(tmp_path / "ok.npy"), str(tmp_path / "ok.npy"), "--out",
                           str(tmp_path / "o.txt")], capture_output=True, text=True)
    assert proc.returncode == 2 and ".npy" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "o.txt").exists()
