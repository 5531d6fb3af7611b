"""qcap filter basic|dedup on hostile folders, through the real CLI: a decision per row, no traceback.

The folders are built in tmp_path by test_filter_hostile_support (real JPEG shards, then broken
members and Parquet rows). clip-score's Ray runs are in test_filter_hostile_clip.py; its up-front
refusal of a CPU count that cannot run (it needs no Ray) is here.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_uid
from test_filter_hostile_support import hostile_folder, make_image

from base.shards import Sample, ShardWriter, array_to_uids, finalize_folder, read_tables, save_uids
from qcap.cli import main as qcap

QCAP = str(Path(sys.executable).parent / "qcap")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """The qcap entry in this process (run_guarded). base.cli.setup_logging's basicConfig binds the
    root handler to the sys.stderr of the first call — an earlier test's capture, closed since — so
    such a handler is pointed at this test's capture first."""
    loggers = [logging.root, *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for logger in loggers:  # Ray Data's own loggers bind their handlers the same way
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one first
    code = qcap(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def decisions_of(out: Path):
    return pq.read_table(out.with_name(out.stem + ".report") / "decisions.parquet").to_pandas()


def assert_reconciles(report_counts: dict, decisions, folder_rows: int) -> None:
    c = report_counts
    assert c["total"] == c["kept"] + sum(c["dropped"].values()) + sum(c["failed"].values()) == folder_rows
    assert len(decisions) == folder_rows and decisions.kept.sum() == c["kept"]
    for reason, n in c["dropped"].items():
        assert (decisions.reason == reason).sum() == n, reason


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return hostile_folder(tmp_path_factory.mktemp("hostile"))


def test_dedup_on_hostile_folder_decides_every_row(hostile, tmp_path):
    folder, cases = hostile
    out = tmp_path / "dedup.npy"
    proc = subprocess.run([QCAP, "filter", "dedup", "--shards", str(folder), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    decisions = decisions_of(out)
    import json

    report = json.loads((tmp_path / "dedup.report" / "report.json").read_text())
    assert_reconciles(report["counts"], decisions, read_tables(str(folder)).num_rows)
    by_case = decisions.set_index(["shard", "key"])
    expected = {
        "dup_uid_same_shard": "exact_duplicate", "dup_uid_other_shard": "exact_duplicate",
        "bomb": "undecodable_image", "undecodable": "undecodable_image", "json_list": "bad_member",
        "no_image": "no_image", "not_in_tar": "no_image", "bad_uid": "bad_uid", "no_uid": "bad_uid",
        "no_json": None, "no_txt": None, "non_utf8_caption": None, "nul_caption": None,  # dedup needs no caption
    }
    for case, reason in expected.items():
        row = by_case.loc[cases[case]]
        assert row.reason == reason, (case, row.reason, row.error_message)
        assert bool(row.kept) == (reason is None), case
        if reason is not None and reason.endswith("duplicate"):
            assert row.error_message is None
        elif reason is not None:
            assert row.error_message, case  # the detail is recorded
    assert "pixel bound" in by_case.loc[cases["bomb"]].error_message
    # duplicates per row: the repeated uid keeps its first row, and stays in the uid file
    assert by_case.loc[cases["dup_uid_other_shard"]].duplicate_of_sample == "00000.tar 000000003"
    assert by_case.loc[cases["dup_uid_same_shard"]].duplicate_of_sample == "00000.tar 000000000"
    kept = set(array_to_uids(np.load(out)))
    assert {make_uid(0), make_uid(3)} <= kept
    assert kept == set(decisions.uid[decisions.kept])


def test_overlapping_downloads_keep_one_row_of_a_repeated_uid(tmp_path, capsys):
    """The user's case: one pool row in two download folders (both 00000.tar) -> 'kept 0 of 2' before."""
    image = make_image(5)
    for name in ("raw-a", "raw-b"):
        with ShardWriter(tmp_path / name, 0) as writer:
            writer.write(Sample(key="000000000", uid=make_uid(5), image=image, text="a photo of a thing on a table"))
        finalize_folder(tmp_path / name)
    out = tmp_path / "dedup.npy"
    code, stdout, err = run_cli(["filter", "dedup", "--shards", f"{tmp_path / 'raw-a'}::{tmp_path / 'raw-b'}",
                                 "--out", str(out), "--no-progress", "--no-histograms"], capsys)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "kept 1 of 2" in stdout
    assert array_to_uids(np.load(out)) == [make_uid(5)]
    decisions = decisions_of(out)
    assert sorted(decisions.shard) == ["raw-a/00000.tar", "raw-b/00000.tar"]  # the same file name, told apart
    assert decisions.kept.tolist() == [True, False] and decisions.reason.tolist() == [None, "exact_duplicate"]
    # and two rows of one uid with *different* images are no duplicates: both kept
    with ShardWriter(tmp_path / "raw-c", 0) as writer:
        writer.write(Sample(key="000000000", uid=make_uid(5), image=make_image(6), text="another photo of it"))
    finalize_folder(tmp_path / "raw-c")
    code, stdout, err = run_cli(["filter", "dedup", "--shards", f"{tmp_path / 'raw-a'}::{tmp_path / 'raw-c'}",
                                 "--out", str(tmp_path / "two.npy"), "--no-progress", "--no-histograms",
                                 "--no-preview"], capsys)
    assert code == 0 and "kept 2 of 2" in stdout, err[-3000:]


def test_basic_on_hostile_folder_decides_every_row(hostile, tmp_path, capsys):
    folder, cases = hostile
    out = tmp_path / "basic.npy"
    code, stdout, err = run_cli(["filter", "basic", "--shards", str(folder), "--out", str(out), "--no-progress",
                                 "--min-image-side", "0"], capsys)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    decisions = decisions_of(out)
    import json

    report = json.loads((tmp_path / "basic.report" / "report.json").read_text())
    assert_reconciles(report["counts"], decisions, read_tables(str(folder)).num_rows)
    by_case = decisions.set_index(["shard", "key"])
    for case, reason in {"nul_caption": "bad_caption", "bad_uid": "bad_uid", "no_uid": "bad_uid"}.items():
        row = by_case.loc[cases[case]]
        assert row.reason == reason and row.error_message, (case, row.reason)
    assert "NUL" in by_case.loc[cases["nul_caption"]].error_message
    # basic reads only the Parquet: the repeated uid's rows are decided one by one, both kept
    assert by_case.loc[cases["dup_uid_other_shard"]].kept and by_case.loc[("00000.tar", "000000003")].kept
    assert report["num_duplicate_uid_rows"] == 2
    assert set(array_to_uids(np.load(out))) == set(decisions.uid[decisions.kept])


def test_outputs_that_cannot_be_written_are_one_line(hostile, tmp_path, capsys):
    folder, _ = hostile
    (tmp_path / "a-folder.npy").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "clash.report").write_text("x")
    for out, needle in [(tmp_path / "a-folder.npy", "is a folder"), (tmp_path / "a-file" / "x.npy", "is a file"),
                        (tmp_path / "clash.npy", "clash.report: exists and is a file")]:
        for name in ("basic", "dedup"):
            code, _, err = run_cli(["filter", name, "--shards", str(folder), "--out", str(out), "--no-progress"], capsys)
            assert_one_line_error(code, err, needle)
    # dedup's hash folder named where a file is
    (tmp_path / "hashes-file").write_text("x")
    code, _, err = run_cli(["filter", "dedup", "--shards", str(folder), "--out", str(tmp_path / "d.npy"),
                            "--hashes", str(tmp_path / "hashes-file"), "--no-progress"], capsys)
    assert_one_line_error(code, err, "hashes-file")


def test_subset_files_that_are_no_uid_files_are_one_line(hostile, tmp_path, capsys):
    folder, _ = hostile
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("not a numpy file at all")
    with zipfile.ZipFile(tmp_path / "zipped.npy", "w") as archive:
        archive.writestr("arr_0.npy", b"x")
    save_uids(tmp_path / "good.npy", [make_uid(1)])
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:-8])
    np.save(tmp_path / "ints.npy", np.arange(4))
    (tmp_path / "dir.npy").mkdir()
    cases = {"empty.npy": "empty", "text.npy": "not a .npy", "zipped.npy": "not a .npy", "truncated.npy": "truncated.npy",
             "ints.npy": "dtype int64", "dir.npy": "is a folder", "missing.npy": "no such file"}
    for name, needle in cases.items():
        for filt in ("basic", "dedup"):
            code, _, err = run_cli(["filter", filt, "--shards", str(folder), "--out", str(tmp_path / "o.npy"),
                                    "--subset", str(tmp_path / name), "--no-progress"], capsys)
            assert_one_line_error(code, err, needle)
    # a good subset still works: one uid, its row kept, every other row outside_subset
    code, stdout, err = run_cli(["filter", "dedup", "--shards", str(folder), "--out", str(tmp_path / "o.npy"),
                                 "--subset", str(tmp_path / "good.npy"), "--no-progress", "--no-histograms"], capsys)
    assert code == 0 and "kept 1 of 29" in stdout, err[-2000:]


def test_clip_score_refuses_cpus_that_cannot_run_the_pipeline(hostile, tmp_path, capsys):
    """--num-cpus 1 hung forever (the model actor took the only CPU, the read tasks never ran):
    now refused before Ray starts, saying what would work."""
    import torch

    from base.models import load_model, save_checkpoint_dir

    folder, _ = hostile
    torch.manual_seed(0)
    checkpoint = save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", tmp_path / "tiny")
    base = ["filter", "clip-score", "--shards", str(folder), "--checkpoint", str(checkpoint), "--top-fraction", "0.5",
            "--out", str(tmp_path / "c.npy"), "--no-progress"]
    code, _, err = run_cli(base + ["--num-cpus", "1"], capsys)
    assert_one_line_error(code, err, "--num-cpus 1 offers 1 CPU(s)", "give --num-cpus 2 or more")
    code, _, err = run_cli(base + ["--num-cpus", "3", "--num-workers", "2", "--cpus-per-worker", "1.5"], capsys)
    assert_one_line_error(code, err, "need 4", "--num-cpus 4 or more", "--cpus-per-worker 1", "fewer --num-workers")
    assert not (tmp_path / "c.npy").exists()
