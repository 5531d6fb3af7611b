"""Hostile shards through the readers and the commands on them: every bad sample a counted status, one line otherwise.

Each test builds its hostile input here (raw ``tarfile`` writes for broken members, ShardWriter
for good shards) and runs the real readers or the real CLI (``.venv/bin/qcap``).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_jpeg, make_uid

from base import shards
from base.shards import Sample, ShardError, ShardWriter

QCAP = str(Path(sys.executable).parent / "qcap")


def _qcap(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([QCAP, *argv], capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _meta(key: str, uid: str) -> bytes:
    return json.dumps({"key": key, "uid": uid, "status": "success"}).encode()


def _good_members(tar: tarfile.TarFile, key: str, uid: str, seed: int) -> None:
    _add(tar, f"{key}.jpg", make_jpeg(seed=seed))
    _add(tar, f"{key}.txt", f"caption {seed}".encode())
    _add(tar, f"{key}.json", _meta(key, uid))


# (key, uid, members as (name, bytes), expected status) — one hostile sample per line
HOSTILE = [
    ("0001", make_uid(1), [("0001.jpg", None), ("0001.json", b"[1, 2]")], shards.BAD_JSON),
    ("0002", make_uid(2), [("0002.jpg", None), ("0002.json", b'{"uid": "' + make_uid(2).encode())], shards.BAD_JSON),
    ("0003", make_uid(3), [("0003.jpg", None), ("0003.json", b"null")], shards.BAD_JSON),
    ("0004", make_uid(4), [("0004.jpg", None), ("0004.json", b'{"uid": 12345}')], shards.BAD_JSON),
    ("0005", make_uid(5), [("0005.jpg", None), ("0005.json", b'{"a": "\xff\xfe"}')], shards.BAD_JSON),
    ("0006", make_uid(6), [("0006.jpg", None), ("0006.syn.json", b'["x"]'), ("0006.json", None)], shards.BAD_JSON),
    ("0007", make_uid(7), [("0007.jpg", None), ("0007.qcap.json", b"{oops"), ("0007.json", None)], shards.BAD_JSON),
    ("a", make_uid(8), [("a.b.jpg", None), ("a.b.json", b"{}")], shards.BAD_MEMBER),  # dotted key
    ("0009", make_uid(9), [("0009.jpg", None), ("0009.jpg", None), ("0009.json", None)], shards.BAD_MEMBER),
    ("../0010", make_uid(10), [("../0010.jpg", None)], shards.BAD_MEMBER),
    ("0000", make_uid(11), [("0000.txt", b"a key used by the first sample")], shards.DUPLICATE_KEY),
]


def _hostile_tar(path: Path) -> dict[str, str]:
    """A tar of good samples with one hostile sample of every kind between them; key → expected status."""
    expected = {}
    with tarfile.open(path, "w") as tar:
        _good_members(tar, "0000", make_uid(0), 0)
        expected["0000"] = "success"
        for n, (key, uid, members, status) in enumerate(HOSTILE):
            for name, data in members:
                if data is None:
                    data = make_jpeg(seed=n) if name.endswith(".jpg") else _meta(key, uid)
                _add(tar, name, data)
            expected.setdefault(key, status)
            good = f"1{n:03d}"
            _good_members(tar, good, make_uid(100 + n), 100 + n)
            expected[good] = "success"
        # captions that are not clean UTF-8 are read robustly: the sample stays a success
        _add(tar, "2000.jpg", make_jpeg(seed=7))
        _add(tar, "2000.txt", b"a \xff\xfe cat\x00 on a sofa")
        _add(tar, "2000.json", _meta("2000", make_uid(2000)))
        expected["2000"] = "success"
    return expected


def test_readers_give_every_hostile_sample_a_status_and_read_on(tmp_path):
    path = tmp_path / "00000.tar"
    expected = _hostile_tar(path)
    samples = list(shards.iter_samples([str(path)]))
    got = [(s.key, s.status) for s in samples]
    # one record per sample group, in tar order, none lost, the repeated key recorded twice
    assert Counter(k for k, _ in got) == Counter({**{k: 1 for k in expected}, "0000": 2})
    for sample in samples:
        if sample.key == "0000" and sample.status == shards.DUPLICATE_KEY:
            assert sample.text == "a key used by the first sample"
            continue
        assert sample.status == expected[sample.key], (sample.key, sample.status, sample.error_message)
        if sample.ok:
            assert sample.image is not None and sample.error_message is None
        else:
            assert str(path) in sample.error_message
            assert sample.image is None and sample.extras == {}  # nothing hostile reaches a trainer
    first = next(s for s in samples if s.key == "0000")
    assert first.ok and first.text == "caption 0"  # the later duplicate never overwrote it
    robust = next(s for s in samples if s.key == "2000")
    assert robust.ok and "\x00" not in robust.text and "\ufffd" in robust.text
    assert next(s for s in samples if s.key == "0009").image is None  # two .jpg: neither is trusted

    # spans read only headers and KEY.json: a bad syn.json/qcap.json shows when the span is read back;
    # read_sample_span cannot see a repeated key (that is the span's verdict)
    spans = list(shards.iter_sample_spans(str(path)))
    index_only = {"0006", "0007"}
    assert [(s.key, "success" if s.key in index_only else s.status) for s in spans] == [
        (k, "success" if k in index_only else st) for k, st in got]
    for span, sample in zip(spans, samples, strict=True):
        back = shards.read_sample_span(str(path), span.start, span.length)
        assert back.key == span.key
        if span.status != shards.DUPLICATE_KEY:
            assert back.status == sample.status, (span, back.status)


@pytest.mark.parametrize("cut", [0, 100, 512, 1024 + 100, 2048, 4096 + 300, 7000, -1, -300, -512])
def test_a_truncated_tar_keeps_the_samples_before_the_cut(tmp_path, cut):
    originals = [Sample(key=f"{i:04d}", uid=make_uid(i), image=make_jpeg(seed=i), text=f"c{i}") for i in range(6)]
    with ShardWriter(tmp_path, 0) as writer:
        writer.write_all(originals)
    whole = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as tar:
        last = tar.getmembers()[-1]
    data_end = last.offset_data + last.size  # negative cuts count back from here (not from the zero padding)
    cut = cut if cut >= 0 else data_end + cut
    cut_path = tmp_path / "cut" / "00000.tar"
    cut_path.parent.mkdir()
    cut_path.write_bytes(whole[:cut])
    problems: list[str] = []
    back = list(shards.iter_samples([str(cut_path)], problems=problems))
    assert len(problems) == 1 and str(cut_path) in problems[0]
    assert len(back) <= len(originals)
    for got, want in zip(back[:-1], originals, strict=False):  # every sample before the cut, intact
        assert got.ok and got.key == want.key and got.image == want.image and got.text == want.text
    if back:
        assert back[-1].status == shards.TRUNCATED or back[-1].image == originals[len(back) - 1].image
        assert back[-1].status == shards.TRUNCATED  # the tar ended right after it: it may lack members
    spans_problems: list[str] = []
    spans = list(shards.iter_sample_spans(str(cut_path), problems=spans_problems))
    assert [(s.key, s.status) for s in spans] == [(s.key, s.status) for s in back] and len(spans_problems) == 1
    # without a problems list, the samples before the cut come first, then one ShardError naming the tar
    seen = []
    with pytest.raises(ShardError, match=str(cut_path)):
        for sample in shards.iter_samples([str(cut_path)]):
            seen.append(sample.key)
    assert seen == [s.key for s in back]


def _raw_shard(folder: Path, shard_id: int, rows: list[dict], write_members) -> None:
    """A shard by hand: tar (``write_members(tar)``), Parquet of ``rows``, honest stats, marker."""
    name = f"{shard_id:05d}"
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        write_members(tar)
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
    statuses = Counter(r["status"] for r in rows)
    (folder / f"{name}_stats.json").write_text(json.dumps({
        "count": len(rows), "successes": statuses["success"], "failed": len(rows) - statuses["success"],
        "status_dict": dict(statuses)}))
    (folder / f"{name}.done").write_text("")


def _hostile_raw(folder: Path) -> dict[str, str]:
    """Shard 0 good (ShardWriter), shard 1 hostile: uid → what reshard must make of it."""
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder, 0) as writer:
        for i in range(3):
            writer.write(Sample(key=f"0000{i:04d}", uid=make_uid(i), image=make_jpeg(seed=i), text=f"good {i}"))
        writer.write(Sample(key="00000003", uid=make_uid(3), status="http_404", error_message="404"))
    fate = {make_uid(i): "success" for i in range(3)}
    rows = [{"key": f"0001{i:04d}", "uid": make_uid(10 + i), "status": "success", "error_message": None}
            for i in range(6)]

    def members(tar):
        _good_members(tar, "00010000", make_uid(10), 10)  # good
        _add(tar, "00010001.jpg", make_jpeg(seed=11))  # KEY.json a list: bad_json
        _add(tar, "00010001.json", b"[1]")
        _add(tar, "00010002.txt", b"no image")  # json + txt, no image member
        _add(tar, "00010002.json", _meta("00010002", make_uid(12)))
        # 00010003: listed as a success, absent from the tar
        _good_members(tar, "00010004", make_uid(999), 14)  # KEY.json names another uid
        _good_members(tar, "00010005", make_uid(15), 15)  # good

    _raw_shard(folder, 1, rows, members)
    fate.update({make_uid(10): "success", make_uid(11): "bad_json", make_uid(12): "no_image",
                 make_uid(13): "missing_from_tar", make_uid(14): "uid_mismatch", make_uid(15): "success"})
    shards.finalize_folder(folder)
    return fate


def test_reshard_records_hostile_rows_and_overwrite_keeps_foreign_files(tmp_path):
    raw = tmp_path / "raw"
    fate = _hostile_raw(raw)
    subset = tmp_path / "subset.npy"
    chosen = [*fate, make_uid(3), "f" * 32, make_uid(10)]  # + a failed download, an absent uid, a repeat
    np.save(subset, np.sort(shards.uids_to_array(chosen, sort=False)))
    out = tmp_path / "curated"
    proc = _qcap("reshard", "--shards", str(raw), "--subset", str(subset), "--out", str(out),
                 "--samples-per-shard", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "summary.json").read_text())
    rows = shards.read_tables(str(out)).to_pylist()
    by_uid = {r["uid"]: r["status"] for r in rows}
    assert by_uid == fate  # one output row per selected uid, with its fate
    assert len(rows) == len(fate) == report["num_selected"]
    want_not_copied = Counter(s for s in fate.values() if s != "success")
    assert report["not_copied"] == dict(want_not_copied)
    assert report["num_written"] == sum(s == "success" for s in fate.values())
    assert report["num_written"] + sum(report["not_copied"].values()) == report["num_selected"]
    assert report["expected_equals_written"] and report["repeated_in_subset"] == 1
    assert report["found_failed"] == {"http_404": 1} and report["not_found"] == 1
    assert report["num_requested"] == report["found_success"] + 1 + report["not_found"]
    copied = list(shards.iter_samples(str(out)))
    assert all(s.ok and s.image is not None for s in copied) and len(copied) == report["num_written"]
    assert sum(shards.read_sizes(out).values()) == report["num_written"]
    assert _qcap("shards", "verify", str(out)).returncode == 0  # the output itself is whole

    # --overwrite removes what reshard wrote and nothing else
    (out / "NOTES.md").write_text("my notes")
    (out / "keep").mkdir()
    (out / "keep" / "00000.tar").write_text("not reshard's")
    fewer = tmp_path / "fewer.npy"
    shards.save_uids(fewer, [make_uid(0)])
    proc = _qcap("reshard", "--shards", str(raw), "--subset", str(fewer), "--out", str(out), "--overwrite", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "keep" / "00000.tar").read_text() == "not reshard's"
    assert shards.read_sizes(out) == {"00000.tar": 1}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("0000")) == [
        "00000.done", "00000.parquet", "00000.tar", "00000_stats.json"]


def test_verify_reports_every_problem_of_a_folder(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    with ShardWriter(good, 0) as writer:
        for i in range(3):
            writer.write(Sample(key=f"k{i}", uid=make_uid(i), image=make_jpeg(seed=i), text="t"))
    shards.finalize_folder(good)
    proc = _qcap("shards", "verify", "--decode", str(good), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_samples"] == 3

    bad = tmp_path / "bad"
    fate = _hostile_raw(bad)
    assert len(fate) == 9
    # shard 2: sizes.json will claim 1000 for a tar holding 1; shard 3: stats lie; shard 4: garbage image
    with ShardWriter(bad, 2) as writer:
        writer.write(Sample(key="k", uid=make_uid(50), image=make_jpeg(seed=50), text="t"))
    with ShardWriter(bad, 3) as writer:
        writer.write(Sample(key="k", uid=make_uid(60), image=make_jpeg(seed=60), text="t"))
    stats = json.loads((bad / "00003_stats.json").read_text())
    (bad / "00003_stats.json").write_text(json.dumps({**stats, "count": 7, "successes": 5}))
    with ShardWriter(bad, 4) as writer:
        writer.write(Sample(key="k", uid=make_uid(70), image=b"\xff\xd8 not really a jpeg", text="t"))
    sizes = json.loads((bad / "sizes.json").read_text())
    (bad / "sizes.json").write_text(json.dumps({**sizes, "00002.tar": 1000, "00003.tar": 1, "00004.tar": 1,
                                                "00009.tar": 4}))
    proc = _qcap("shards", "verify", "--decode", str(bad), "--json")
    _one_line_error(proc)
    result = json.loads(proc.stdout)
    text = "\n".join(result["problems"])
    for needle in ("00001.tar: sample not readable (bad_json)", "00001.tar: success row whose sample has no image member",
                   "00001.tar: success row without its sample in the tar", "00001.tar: uid differs",
                   "00002.tar: sizes.json says 1000 samples, the tar holds 1",
                   "00003.tar: _stats.json 'successes' disagrees", "00003.tar: _stats.json 'count' disagrees",
                   "00004.tar: image does not decode", "lists 00009.tar"):
        assert needle in text, (needle, text)
    assert "00000.tar" not in result["shards_with_problems"]
    assert result["num_problems"] == len(result["problems"]) >= 9
    assert "00001.tar" in proc.stderr and "00002.tar" in proc.stderr
    # finalize refuses to write a sizes.json from stats that disagree with the Parquet
    finalize = _qcap("shards", "finalize", str(bad))
    _one_line_error(finalize)
    assert "00003.tar" in finalize.stderr


def test_one_line_errors_for_hostile_inputs_of_every_command(tmp_path):
    raw = tmp_path / "raw"
    _hostile_raw(raw)
    good_uids = tmp_path / "u.npy"
    shards.save_uids(good_uids, [make_uid(0), make_uid(1)])
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    text = tmp_path / "text.npy"
    text.write_text("not a numpy file\n")
    header_only = tmp_path / "header.npy"
    buffer = io.BytesIO()
    np.save(buffer, shards.uids_to_array([make_uid(0)]))
    header_only.write_bytes(buffer.getvalue()[:-4])
    for bad in (empty, text, header_only):
        for argv in (["uids", "info", str(bad)], ["uids", "union", str(bad), str(good_uids), "--out", str(tmp_path / "o.npy")],
                     ["reshard", "--shards", str(raw), "--subset", str(bad), "--out", str(tmp_path / "r")]):
            proc = _qcap(*argv)
            _one_line_error(proc)
            assert str(bad) in proc.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for argv in (["reshard", "--shards", str(raw), "--subset", str(good_uids), "--out", str(a_file)],
                 ["reshard", "--shards", str(raw), "--subset", str(good_uids), "--out", str(a_file / "sub")],
                 ["subset", "--shards", str(raw), "--fraction", "0.5", "--out", str(a_file), "--no-card"]):
        _one_line_error(_qcap(*argv))
    assert a_file.read_text() == "mine"
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "README.txt").write_text("no shards")
    for argv in (["shards", "info", str(nothing)], ["shards", "verify", str(nothing)], ["shards", "finalize", str(nothing)],
                 ["reshard", "--shards", str(nothing), "--subset", str(good_uids), "--out", str(tmp_path / "r2")],
                 ["subset", "--shards", str(nothing), "--fraction", "0.5", "--out", str(tmp_path / "s2")],
                 ["uids", "info", str(good_uids), "--shards", str(nothing)]):
        _one_line_error(_qcap(*argv))
    assert not (nothing / "sizes.json").exists()
    # sizes.json whose counts are not counts
    (raw / "sizes.json").write_text(json.dumps({"00000.tar": "three", "00001.tar": -1}))
    _one_line_error(_qcap("subset", "--shards", str(raw), "--fraction", "0.5", "--out", str(tmp_path / "s3")))
    (raw / "sizes.json").write_text("[1, 2]")
    _one_line_error(_qcap("subset", "--shards", str(raw), "--fraction", "0.5", "--out", str(tmp_path / "s4")))
    # stats that are not counts
    (raw / "00001_stats.json").write_text(json.dumps({"successes": "many"}))
    _one_line_error(_qcap("shards", "info", str(raw)))
