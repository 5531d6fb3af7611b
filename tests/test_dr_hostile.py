"""``qcap build-dr`` over hostile inputs on both sides: every image success row ends as exactly
one output row — a DR sample, or a row with its status (the reader's, the join's or the
caption side's) — the shard goes on and the summary reconciles. Shards built by hand with
tarfile where ShardWriter would refuse the damage."""

from __future__ import annotations

import io
import json
import tarfile

from conftest import make_jpeg, make_uid
from dr_data import write_qcap_captions
from test_shards_hostile import _add, _good_members, _meta, _qcap, _raw_shard

from base import shards


def _image_shard(folder) -> dict[str, str]:
    """One image shard whose Parquet lists 8 successes; key -> the status build-dr must give it."""
    folder.mkdir(parents=True)
    rows = [{"key": f"k{i}", "uid": make_uid(i), "status": "success", "error_message": None} for i in range(8)]
    rows[4]["uid"] = "not-a-datacomp-uid"
    rows[6]["uid"] = make_uid(5)  # the same image downloaded twice

    def members(tar):
        _good_members(tar, "k0", make_uid(0), 0)
        _add(tar, "k1.jpg", make_jpeg(seed=1))
        _add(tar, "k1.json", b"[1]")  # KEY.json not an object
        _add(tar, "k2.txt", b"no image member")
        _add(tar, "k2.json", _meta("k2", make_uid(2)))
        # k3: listed by the Parquet, absent from the tar
        _good_members(tar, "k4", "not-a-datacomp-uid", 4)
        _good_members(tar, "k5", make_uid(5), 5)
        _good_members(tar, "k6", make_uid(5), 5)
        _good_members(tar, "k7", make_uid(7), 7)

    _raw_shard(folder, 0, rows, members)
    shards.finalize_folder(folder)
    return {"k0": "success", "k1": "bad_json", "k2": "no_image", "k3": "missing_from_tar", "k4": "missing_uid",
            "k5": "success", "k6": "duplicate_uid", "k7": "caption_bad_json"}


def test_build_dr_gives_every_hostile_row_a_status_and_reconciles(tmp_path):
    fate = _image_shard(tmp_path / "img")
    captions = write_qcap_captions(tmp_path / "syn", [[0, 1, 2, 3, 5, 5, 7]])  # uid 5 captioned twice
    tar_path = captions / "00000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:  # the caption sample of image 7: syn.json not an object
        for info, data in members:
            if info.name == "cap000x0006.syn.json":
                data = b"[1, 2]"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "dr"
    proc = _qcap("build-dr", "--images", str(tmp_path / "img"), "--captions", str(captions), "--out", str(out),
                 "--no-progress", "--no-card")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = shards.read_table(str(out / "00000.tar"), require_uid=False).to_pylist()
    assert {r["key"]: r["status"] for r in rows} == fate and len(rows) == len(fate)  # one row each, none lost
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciled"], summary["checks"]
    assert summary["images_kept"] == 2 and summary["images_in"] == 8
    assert summary["images_dropped"] == {s: 1 for s in fate.values() if s != "success"}
    kept = list(shards.iter_samples(str(out)))
    assert [(s.key, s.uid) for s in kept] == [("k0", make_uid(0)), ("k5", make_uid(5))]
    assert all(s.ok and s.image and s.syn_text for s in kept)
    assert _qcap("shards", "verify", str(out)).returncode == 0
