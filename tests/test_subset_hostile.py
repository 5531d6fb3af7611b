"""``qcap subset`` over a hostile shard folder: every selected row ends as a copied sample or a
row with its status (never a stopped shard, never a success without its image), and the summary
reconciles. The hostile folder is the one the reshard test builds by hand."""

from __future__ import annotations

import json
from collections import Counter

from test_shards_hostile import _hostile_raw, _qcap

from base import shards


def test_subset_records_the_rows_it_cannot_copy_and_reconciles(tmp_path):
    raw = tmp_path / "raw"
    fate = _hostile_raw(raw)  # uid -> success | bad_json | no_image | missing_from_tar | uid_mismatch
    out = tmp_path / "all"
    proc = _qcap("subset", "--shards", str(raw), "--fraction", "1.0", "--out", str(out), "--no-progress", "--no-card")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = shards.read_tables(str(out)).to_pylist()
    assert {r["uid"]: r["status"] for r in rows} == fate and len(rows) == len(fate)  # one row per selected uid
    want = Counter(s for s in fate.values() if s != "success")
    assert summary["not_copied"] == dict(want)
    assert summary["num_written"] == sum(s == "success" for s in fate.values()) == sum(shards.read_sizes(out).values())
    assert summary["num_written"] + sum(summary["not_copied"].values()) == summary["num_selected"] == len(fate)
    assert summary["reconciled"], summary["checks"]
    copied = list(shards.iter_samples(str(out)))
    assert all(s.ok and s.image is not None for s in copied) and len(copied) == summary["num_written"]
    uids = set(shards.array_to_uids(shards.load_uids(out / "uids.npy")))
    assert uids == {u for u, s in fate.items() if s == "success"}  # the uid list names only what was copied
    assert _qcap("shards", "verify", str(out)).returncode == 0

    # the real-captions variant of the same folder makes the same choices
    real = tmp_path / "real"
    proc = _qcap("subset", "--shards", str(raw), "--fraction", "1.0", "--captions", "real", "--out", str(real),
                 "--no-progress", "--no-card")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r["uid"]: r["status"] for r in shards.read_tables(str(real)).to_pylist()} == fate
