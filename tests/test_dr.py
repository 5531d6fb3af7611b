"""``qcap build-dr``: the uid join (one-sided samples, duplicates, keys that differ between sides,
several hash partitions), caption-quality controls, Parquet side tables, Apple's DataCompDR
layout, kill-and-resume, and byte spans in tars. Real shards, the real CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_uid
from dr_data import (
    apple_npz,
    image_sample,
    syn_captions,
    write_apple,
    write_images,
    write_qcap_captions,
    write_qcap_side_tables,
)

from base.shards import (
    Sample,
    ShardError,
    ShardWriter,
    array_to_uids,
    expand_shards,
    iter_sample_spans,
    iter_samples,
    load_uids,
    read_sample_span,
    read_tables,
)
from captioning.dr import WORK_DIR

ROOT = Path(__file__).resolve().parents[1]
QCAP = Path(sys.executable).parent / "qcap"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from qcap.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(argv: list[str], capsys) -> str:
    """A bad flag exits with argparse's status 2; returns the message after 'error: '."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(argv, capsys)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.rsplit("error: ", 1)[1].split(";")[0].strip()


def by_uid(folder: Path) -> dict[str, Sample]:
    samples = list(iter_samples(str(folder)))
    uids = [s.uid for s in samples]
    assert len(uids) == len(set(uids)), Counter(uids).most_common(3)
    return {s.uid: s for s in samples}


@pytest.fixture
def scattered(tmp_path):
    """Images 0..23 in 3 shards, plus an image-side duplicate across shards (number 5 again in
    shard 2), one within a shard (number 9 twice in shard 1) and a sample without uid. Captions
    in 2 shards, in another order, with other keys: missing 3 and 17, a failure for 20, extra
    uids 100 and 101 (no image), uid 12 twice (shards 0 and 1)."""
    images = write_images(tmp_path / "curated", [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))],
                          extra={1: [image_sample("", 9)], 2: [image_sample("", 5), image_sample("", 50, with_uid=False)]})
    numbers = [n for n in range(24) if n not in (3, 17)] + [100, 101]
    order = list(reversed(numbers))
    captions = write_qcap_captions(tmp_path / "syn", [order[:13], order[13:] + [12]], failed={20: "decode_error"})
    return images, captions


def test_join_is_by_uid_counts_one_sided_samples_and_never_duplicates(tmp_path, scattered, capsys):
    images, captions = scattered
    out = tmp_path / "dr"
    code, stdout, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(captions), "--out", str(out),
                                    "--partition-rows", "7", "--keep-work", "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    assert "counts reconcile: yes" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["join"]["image_rows"] == 26 and summary["index"]["images"]["missing_uid"] == 1
    # 26 image rows, 25 caption rows, at most 7 a partition: 4 hash partitions joined one by one
    assert json.loads((out / ".build-dr" / "partitions.json").read_text())["num_partitions"] == 4
    assert len(list((out / ".build-dr" / "join").glob("0000?.npy"))) == 4

    dr = by_uid(out)
    kept = {n for n in range(24) if n not in (3, 17, 20)}
    assert set(dr) == {make_uid(n) for n in kept}  # every uid once, none twice
    for n in kept:
        sample = dr[make_uid(n)]
        # keys differ between the sides: the caption came by uid (its text names the image number)
        assert sample.syn_text == syn_captions(n) and sample.text == f"web text of image {n}"
        assert sample.key.startswith("0000") and sample.image is not None
        assert sample.syn_provenance["captioner"]["model"] == "qcap-tiny-coca"
        assert sample.syn_provenance["dr"]["kept"] == [0, 1, 2] and sample.meta["num_syn"] == 3
        assert sample.meta["url"] == f"http://example.com/{n}.jpg"  # the image's KEY.json carried
    # the canonical copies: the first shard (5 stays in shard 0), then the first position (9)
    table = read_tables(str(out)).to_pylist()
    statuses = Counter(row["status"] for row in table)
    assert statuses == {"success": 21, "no_caption": 2, "caption_failed": 1, "duplicate_uid": 2, "missing_uid": 1}
    dups = [row for row in table if row["status"] == "duplicate_uid"]
    assert sorted(row["key"] for row in dups) == ["000019000", "000029000"]
    assert {row["uid"] for row in table if row["status"] == "no_caption"} == {make_uid(3), make_uid(17)}

    assert summary["images_in"] == 27 and summary["images_kept"] == 21
    assert summary["images_dropped"] == {"caption_failed": 1, "duplicate_uid": 2, "missing_uid": 1, "no_caption": 2}
    assert summary["captions_without_images"] == 2 and summary["caption_duplicates"] == 1
    assert summary["captions_matched"] == 21 and summary["image_duplicates"] == 2
    assert summary["caption_rows_by_status"] == {"success": 24, "decode_error": 1}
    assert summary["synthetic_in"] == summary["synthetic_kept"] == 63 and summary["reconciled"]
    assert all(summary["checks"].values())
    # one-sided samples as DataComp uid files, and the folder's own uid list
    assert set(array_to_uids(load_uids(out / "images_without_captions.npy"))) == {make_uid(n) for n in (3, 17, 20)}
    assert set(array_to_uids(load_uids(out / "captions_without_images.npy"))) == {make_uid(100), make_uid(101)}
    assert set(array_to_uids(load_uids(out / "uids.npy"))) == set(dr)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 7, "00001.tar": 8, "00002.tar": 6}
    assert not list(out.glob(".*tmp-*"))

    # the same build with one partition gives the same bytes: partitioning changes nothing
    one = tmp_path / "dr1"
    code, _, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(captions), "--out", str(one),
                               "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    assert not (one / ".build-dr").exists()  # work folder removed once the counts reconcile
    for tar in ("00000.tar", "00001.tar", "00002.tar"):
        assert (one / tar).read_bytes() == (out / tar).read_bytes()

    # a finished folder: a re-run does nothing; other settings are refused in one line
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    code, stdout, _ = run_cli(["build-dr", "--images", str(images), "--captions", str(captions), "--out", str(out),
                               "--partition-rows", "7", "--no-progress", "--no-card"], capsys)
    assert code == 0 and "3 shards already done" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps
    code, _, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(captions), "--out", str(out),
                               "--min-syn-captions", "2", "--no-progress"], capsys)
    assert code == 2 and "other inputs or settings" in stderr and "Traceback" not in stderr


def test_caption_quality_controls_drop_by_flag_and_score_and_keep_the_real_caption(tmp_path, capsys):
    images = write_images(tmp_path / "curated", [list(range(6))])
    good = "a red cube on a wooden table"
    captions = {
        0: ([good, "a cube", "cube cube cube cube"], [[], ["too_short"], ["repeated_word", "too_short"]], [0.4, 0.3, 0.2]),
        1: ([good, "a blue ball near a wall", "a red cube"], [[], [], ["truncated"]], [0.1, 0.35, 0.3]),
        2: (["# # #", "2 2"], [["no_letters"], ["no_letters", "too_short"]], [0.3, 0.3]),
        3: ([good, "the cube", good], [["truncated"], ["too_short"], []], [None, 0.2, 0.5]),
    }
    syn = write_qcap_captions(tmp_path / "syn", [list(range(6))], captions=captions)
    out = tmp_path / "dr"
    code, stdout, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(syn), "--out", str(out),
                                    "--min-score", "0.25", "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    dr = by_uid(out)
    # 0: too_short and repeated_word dropped; 1: score 0.1 dropped; 2: nothing left -> image dropped;
    # 3: too_short dropped, the unscored one kept and counted
    assert dr[make_uid(0)].syn_text == [good]
    assert dr[make_uid(1)].syn_text == ["a blue ball near a wall", "a red cube"]
    assert make_uid(2) not in dr
    assert dr[make_uid(3)].syn_text == [good, good]
    assert dr[make_uid(4)].syn_text == syn_captions(4)
    for n in (0, 1, 3):
        assert dr[make_uid(n)].text == f"web text of image {n}"  # the real caption is never filtered
    prov = dr[make_uid(1)].syn_provenance
    assert [c["score"] for c in prov["captions"]] == [0.35, 0.3]  # index-aligned with syn_text
    assert prov["dr"] == {"source": "qcap-webdataset", "caption_shard": "00000.tar", "num_generated": 3,
                          "kept": [1, 2], "dropped": {"low_score": 1}}
    assert dr[make_uid(0)].syn_provenance["dr"]["dropped"] == {"repeated_word": 1, "too_short": 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthetic_in"] == 3 + 3 + 2 + 3 + 3 + 3
    assert summary["synthetic_kept"] == 1 + 2 + 0 + 2 + 3 + 3
    assert summary["synthetic_dropped"] == {"low_score": 1, "no_letters": 2, "repeated_word": 1, "too_short": 2}
    assert summary["synthetic_unscored_kept"] == 1 + 3 + 3 and summary["images_dropped"] == {"too_few_captions": 1}
    assert summary["reconciled"]

    # keep everything: flags and scores are information only
    keep = tmp_path / "keep"
    code, _, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(syn), "--out", str(keep),
                               "--drop-flags", "none", "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    assert {u: s.syn_text for u, s in by_uid(keep).items()} == {
        make_uid(n): captions[n][0] if n in captions else syn_captions(n) for n in range(6)}
    assert usage_error(["build-dr", "--images", str(images), "--captions", str(syn), "--out", str(tmp_path / "x"),
                        "--drop-flags", "degenrate"], capsys) == "drop_flags: unknown flag(s) ['degenrate']"


def test_parquet_side_tables_join_like_caption_shards(tmp_path, capsys):
    images = write_images(tmp_path / "curated", [[0, 1, 2, 3], [4, 5, 6]])
    side = write_qcap_side_tables(tmp_path / "side", [[6, 5, 4, 9], [3, 2, 1]], failed={2: "decode_error"})
    out = tmp_path / "dr"
    code, stdout, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(side), "--out", str(out),
                                    "--min-score", "0.3", "--min-syn-captions", "0", "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    dr = by_uid(out)
    assert set(dr) == {make_uid(n) for n in (1, 3, 4, 5, 6)}
    assert all(s.syn_text == [] for s in dr.values())  # every caption scored 0.25 < 0.3; zero allowed
    code, stdout, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(side), "--out",
                                    str(tmp_path / "dr2"), "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    dr = by_uid(tmp_path / "dr2")
    assert {u: s.syn_text for u, s in dr.items()} == {make_uid(n): syn_captions(n) for n in (1, 3, 4, 5, 6)}
    assert dr[make_uid(4)].syn_provenance["dr"]["source"] == "qcap-parquet"
    summary = json.loads((tmp_path / "dr2" / "summary.json").read_text())
    assert summary["images_dropped"] == {"caption_failed": 1, "no_caption": 1} and summary["captions_without_images"] == 1


def test_apple_datacompdr_layout_joins_with_image_shards(tmp_path, capsys):
    images = write_images(tmp_path / "datacomp", [list(range(0, 5)), list(range(5, 10))])
    degenerate = {7: ["a photo of a dog on grass", "dog dog dog dog", "a dog running on a lawn",
                      "a brown dog outside", "a dog"]}
    apple = write_apple(tmp_path / "DataCompDR", {"00/00000003.tar": [9, 8, 7, 6, 42], "01/00000011.tar": [1, 0, 2, 3]},
                        captions=degenerate)
    out = tmp_path / "dr"
    code, stdout, stderr = run_cli(["build-dr", "--images", str(images), "--apple-syn", str(apple), "--out", str(out),
                                    "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    dr = by_uid(out)
    assert set(dr) == {make_uid(n) for n in (0, 1, 2, 3, 6, 7, 8, 9)}
    for n in (0, 1, 2, 3, 6, 8, 9):
        sample = dr[make_uid(n)]
        assert sample.syn_text == syn_captions(n, 5) and sample.text == f"web text of image {n}"
        # Apple's members carried unchanged
        assert sample.extras["npz"] == apple_npz(5, n)
        assert json.loads(sample.extras["paug.json"])["param_aug"]
        assert sample.extras["url.txt"] == f"http://example.com/{n}.jpg".encode()
        assert sample.syn_provenance["origin"] == "apple/DataCompDR" and sample.syn_provenance["dr"]["source"] == "apple"
    # image 7: two degenerate captions dropped, text_emb re-indexed (real caption still at 0)
    seven = dr[make_uid(7)]
    assert seven.syn_text == [degenerate[7][0], degenerate[7][2], degenerate[7][3]]
    original = np.load(io.BytesIO(apple_npz(5, 7)))
    realigned = np.load(io.BytesIO(seven.extras["npz"]))
    np.testing.assert_array_equal(realigned["text_emb"], original["text_emb"][[0, 1, 3, 4]])
    np.testing.assert_array_equal(realigned["image_emb"], original["image_emb"])
    assert [c["flags"] for c in seven.syn_provenance["captions"]] == [[], [], []]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["caption_kind"] == "apple" and summary["images_dropped"] == {"no_caption": 2}
    assert summary["captions_without_images"] == 1 and summary["synthetic_dropped"] == {"repeated_word": 1, "too_short": 1}
    assert summary["sha256_mismatch"] == 8  # Apple's sha256 is of the original download; we joined by uid
    assert summary["reconciled"]
    # its DataComp rung keeps the images and real captions, and none of Apple's caption or teacher data
    code, _, stderr = run_cli(["subset", "--shards", str(out), "--fraction", "1", "--captions", "real", "--out",
                               str(tmp_path / "rung"), "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    for sample in iter_samples(str(tmp_path / "rung")):
        assert sample.syn_text is None and sample.syn_provenance is None and set(sample.extras) == {"url.txt"}
        assert sample.image == dr[sample.uid].image and sample.text == dr[sample.uid].text
    # and the DR folder reads in Hugging Face datasets with Apple's columns
    import datasets

    ds = datasets.load_dataset("webdataset", data_files={"train": sorted(str(p) for p in out.glob("*.tar"))},
                               split="train")
    assert {"jpg", "txt", "json", "syn.json", "qcap.json", "npz", "paug.json", "url.txt"} <= set(ds.column_names)
    assert len(ds) == 8


def test_bad_inputs_are_one_clear_line(tmp_path, capsys):
    images = write_images(tmp_path / "curated", [[0, 1]])
    assert "exactly one of --captions" in usage_error(["build-dr", "--images", str(images), "--out",
                                                       str(tmp_path / "dr")], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = run_cli(["build-dr", "--images", str(images), "--apple-syn", str(empty), "--out",
                               str(tmp_path / "dr")], capsys)
    assert code == 2 and "no .tar shards found" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(empty), "--out",
                               str(tmp_path / "dr")], capsys)
    assert code == 2 and "not a qcap caption folder" in stderr
    # the image folder passed as captions by mistake: every image matches, none has a synthetic caption
    code, stdout, _ = run_cli(["build-dr", "--images", str(images), "--captions", str(images), "--out",
                               str(tmp_path / "mistake"), "--no-progress", "--no-card"], capsys)
    assert "images dropped: too_few_captions 2" in stdout and "is --captions the output of qcap caption?" in stdout
    (tmp_path / "taken").write_text("not a folder")
    write_qcap_captions(tmp_path / "syn", [[0, 1]])
    code, _, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(tmp_path / "syn"), "--out",
                               str(tmp_path / "taken"), "--no-progress"], capsys)
    assert code == 2 and "is a file, not a folder" in stderr and "Traceback" not in stderr
    assert (tmp_path / "taken").read_text() == "not a folder"


def kill_when(argv: list[str], log_path: Path, condition) -> None:
    """Run ``qcap`` with ``argv`` in its own process group; SIGKILL it once ``condition()`` holds."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(QCAP), *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not condition():
            assert proc.poll() is None, "finished before the kill: " + log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the moment to kill never came: " + log_path.read_text()[-3000:]
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_build_dr_resumes_after_sigkill(tmp_path, capsys):
    layout = [list(range(i * 3, i * 3 + 3)) for i in range(24)]
    images = write_images(tmp_path / "curated", layout)
    captions = write_qcap_captions(tmp_path / "syn", [sum(layout[12:], []), sum(layout[:12], [])])
    reference = tmp_path / "reference"
    code, _, stderr = run_cli(["build-dr", "--images", str(images), "--captions", str(captions), "--out", str(reference),
                               "--no-progress", "--no-card"], capsys)
    assert code == 0, stderr
    out = tmp_path / "dr"
    argv = ["build-dr", "--images", str(images), "--captions", str(captions), "--out", str(out), "--no-progress",
            "--no-card", "--partition-rows", "20"]
    # killed first while indexing, then again once the first output shard is done
    kill_when(argv, tmp_path / "killed-1.log", lambda: any((out / WORK_DIR / "index" / "images").glob("*.json")))
    assert not list(out.glob("*.done"))
    # the second run writes with two worker processes: its shards must equal the one-process ones
    kill_when([*argv, "--num-workers", "2"], tmp_path / "killed-2.log", lambda: any(out.glob("*.done")))
    done_before = sorted(p.stem for p in out.glob("*.done"))
    assert 1 <= len(done_before) < 24, f"the kill came too late to test resuming: {done_before}"
    assert (out / ".build-dr").is_dir() and not (out / "summary.json").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.stem in done_before}

    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert f"({len(done_before)} shards already done)" in stdout
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name  # finished shards untouched
    assert not list(out.glob(".*tmp-*")) and not (out / ".build-dr").exists()
    for tar in sorted(reference.glob("*.tar")):
        assert (out / tar.name).read_bytes() == tar.read_bytes(), tar.name  # as if never killed
    assert json.loads((out / "summary.json").read_text())["images_kept"] == 72


def test_sample_spans_read_one_sample_back(tmp_path):
    with ShardWriter(tmp_path, 0) as writer:
        writer.write(Sample(key="plain", uid=make_uid(0), text="a", syn_text=["x"], extras={"npz": b"\0" * 1000}))
        writer.write(Sample(key="caf\u00e9", uid=make_uid(1), text="\u00e9t\u00e9", meta={"n": 1}))  # PAX headers
        writer.write(Sample(key="big", uid=make_uid(2), image=b"\xff" * 5000, text="b"))
    tar = str(tmp_path / "00000.tar")
    spans = list(iter_sample_spans(tar))
    assert [s.key for s in spans] == ["plain", "caf\u00e9", "big"]
    assert [s.meta["uid"] for s in spans] == [make_uid(i) for i in range(3)]
    with open(tar, "rb") as handle:
        for span, expected in zip(reversed(spans), reversed(list(iter_samples(tar))), strict=True):
            got = read_sample_span(tar, span.start, span.length, handle=handle)
            assert (got.key, got.uid, got.text, got.syn_text, got.image, got.extras, got.meta) == (
                expected.key, expected.uid, expected.text, expected.syn_text, expected.image, expected.extras, expected.meta)
    assert spans[0].start == 0 and spans[-1].start + spans[-1].length <= os.path.getsize(tar)
    with pytest.raises(ShardError, match="holds two samples"):
        read_sample_span(tar, spans[0].start, spans[0].length + spans[1].length)
    with pytest.raises(ShardError, match="runs past the end"):
        read_sample_span(tar, spans[-1].start, spans[-1].length + 10**6)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(tar).read_bytes()[: spans[2].start + 700])
    with pytest.raises(ShardError, match="truncated|not a readable|unreadable after byte"):
        list(iter_sample_spans(str(cut)))
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as handle:
        info = tarfile.TarInfo("../escape.json")
        info.size = 2
        handle.addfile(info, io.BytesIO(b"{}"))
    (hostile,) = list(iter_sample_spans(str(evil)))  # a status for the sample; the member is never followed
    assert hostile.status == "bad_member" and "unsafe path" in hostile.error_message and not hostile.ok
    assert expand_shards(str(tmp_path / "00000.tar"))
