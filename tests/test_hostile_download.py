"""``qcap download`` over a hostile pool, against the real loopback server of ``tests/conftest.py``:
non-http schemes and private addresses are refused as rows (``refused_url``/``bad_url``), an IDN host
is a row with a known status, every pool row is accounted for exactly once (manifest reconciles,
each uid in exactly one shard Parquet row); empty or unreadable pools and clashing paths are one line.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hostile import HOSTILE_URLS, assert_contract, good_jpeg, run_cli, uid, write_pool

pytestmark = pytest.mark.timeout(120)

FAST = ["--distributor", "multiprocessing", "--processes", "1", "--threads", "4", "--timeout", "2", "--retries", "0",
        "--max-request-seconds", "5", "--image-size", "32", "--no-progress", "--samples-per-shard", "8"]
PRIVATE = {"private-10", "private-192", "link-local-metadata", "zero-address", "ipv6-loopback", "decimal-loopback",
           "userinfo-trick"}
SCHEMES = {"ftp-scheme", "file-scheme", "javascript-scheme", "data-scheme", "gopher-scheme", "no-scheme", "empty-url"}


def _pool_rows(base_url: str, names: list[str]) -> list[dict]:
    rows = [{"uid": uid(1000), "url": f"{base_url}/good.jpg", "text": "a good picture", "original_width": 40,
             "original_height": 30},
            {"uid": uid(1001), "url": f"{base_url}/missing.jpg", "text": "a 404", "original_width": 40,
             "original_height": 30}]
    for i, name in enumerate(names):
        rows.append({"uid": uid(1100 + i), "url": HOSTILE_URLS[name], "text": name, "original_width": 40,
                     "original_height": 30})
    return rows


def _check_accounting(out: Path, rows: list[dict]) -> dict[str, str]:
    """Every pool row is one shard Parquet row (by uid), the manifest reconciles; uid -> status."""
    from curate.download.status import STATUSES

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reconciles"], manifest.get("reconciliation")
    parquet_rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    got = Counter(r["uid"] for r in parquet_rows)
    want = Counter(r["uid"] for r in rows)
    assert got == want, f"pool rows lost or doubled: missing {want - got}, extra {got - want}"
    assert manifest["num_samples"] == len(rows)
    assert manifest["num_success"] + manifest["num_failed"] + manifest["not_attempted"] == len(rows)
    statuses = {r["uid"]: r["status"] for r in parquet_rows}
    assert set(statuses.values()) <= set(STATUSES), set(statuses.values()) - set(STATUSES)
    return statuses


def test_download_refuses_private_addresses_and_schemes(http_dir, tmp_path, capfd, caplog):
    """Without --allow-private-addresses: loopback and every private address is refused, as a row."""
    folder, base_url = http_dir
    (folder / "good.jpg").write_bytes(good_jpeg(1))
    names = sorted(PRIVATE | SCHEMES | {"idn-host", "huge-url"})
    rows = _pool_rows(base_url, names)
    pool = write_pool(tmp_path / "pool.parquet", rows)
    out = tmp_path / "raw"
    res = run_cli(["download", "--pool", str(pool), "--out", str(out), *FAST], capfd, caplog)
    assert_contract(res)
    assert res.code == 0, res.err
    statuses = _check_accounting(out, rows)
    assert statuses[uid(1000)] == statuses[uid(1001)] == "refused_url", "loopback fetched without the flag"
    for i, name in enumerate(names):
        status = statuses[uid(1100 + i)]
        if name in PRIVATE or name in SCHEMES:
            assert status in {"refused_url", "bad_url"}, f"{name}: {status}"
        assert status != "success" and status != "error", f"{name}: {status}"


def test_download_with_private_addresses_allowed_still_refuses_schemes(http_dir, tmp_path, capfd, caplog):
    folder, base_url = http_dir
    (folder / "good.jpg").write_bytes(good_jpeg(2))
    names = sorted(SCHEMES | {"idn-host", "zero-address"})
    rows = _pool_rows(base_url, names)
    pool = write_pool(tmp_path / "pool.parquet", rows)
    out = tmp_path / "raw"
    res = run_cli(["download", "--pool", str(pool), "--out", str(out), "--allow-private-addresses", *FAST],
                  capfd, caplog)
    assert_contract(res)
    assert res.code == 0, res.err
    statuses = _check_accounting(out, rows)
    assert statuses[uid(1000)] == "success" and statuses[uid(1001)] == "http_404", statuses
    for i, name in enumerate(names):
        status = statuses[uid(1100 + i)]
        if name in SCHEMES or name == "zero-address":
            assert status in {"refused_url", "bad_url"}, f"{name}: {status}"
        assert status not in {"success", "error"}, f"{name}: {status}"
    # the one success is a real sample in the tar
    from base.shards import iter_samples

    assert [s.uid for s in iter_samples(str(out))] == [uid(1000)]


def _hostile_pool(kind: str, tmp_path: Path) -> Path:
    import pyarrow as pa

    if kind == "zero-rows":
        return write_pool(tmp_path / "pool.parquet", [])
    if kind == "folder-with-non-parquet":
        (tmp_path / "pool").mkdir()
        (tmp_path / "pool" / "part-0.parquet.txt").write_text("uid,url,text\n")
        return tmp_path / "pool"
    if kind == "folder-empty":
        (tmp_path / "pool").mkdir()
        return tmp_path / "pool"
    if kind == "not-parquet":
        (tmp_path / "pool.parquet").write_bytes(b"PAR1 not really PAR1")
        return tmp_path / "pool.parquet"
    if kind == "missing":
        return tmp_path / "nope.parquet"
    if kind == "missing-url-column":
        pq.write_table(pa.table({"uid": [uid(1)], "text": ["a"]}), tmp_path / "pool.parquet")
        return tmp_path / "pool.parquet"
    if kind == "malformed-uids":
        return write_pool(tmp_path / "pool.parquet", [
            {"uid": "Z" * 32, "url": "http://10.0.0.1/a.jpg", "text": "a"},
            {"uid": uid(2)[:31], "url": "http://10.0.0.1/b.jpg", "text": "b"},
            {"uid": None, "url": "http://10.0.0.1/c.jpg", "text": "c"}])
    if kind == "duplicate-uids":
        return write_pool(tmp_path / "pool.parquet", [
            {"uid": uid(3), "url": "http://10.0.0.1/a.jpg", "text": "a"},
            {"uid": uid(3), "url": "http://10.0.0.1/b.jpg", "text": "b"}])
    if kind == "url-column-not-string":
        pq.write_table(pa.table({"uid": [uid(4)], "url": [12345], "text": ["a"]}), tmp_path / "pool.parquet")
        return tmp_path / "pool.parquet"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["zero-rows", "folder-with-non-parquet", "folder-empty", "not-parquet", "missing",
                                  "missing-url-column", "malformed-uids", "duplicate-uids", "url-column-not-string"])
def test_download_hostile_pools(kind, tmp_path, capfd, caplog):
    """A pool that cannot be planned is a one-line error; one that can is accounted for row by row."""
    pool = _hostile_pool(kind, tmp_path)
    out = tmp_path / "raw"
    res = run_cli(["download", "--pool", str(pool), "--out", str(out), *FAST], capfd, caplog)
    assert_contract(res)
    if kind in {"zero-rows", "folder-with-non-parquet", "folder-empty", "not-parquet", "missing", "missing-url-column"}:
        assert res.code != 0, f"download accepted a {kind} pool"
        assert not (out.exists() and list(out.glob("*.tar"))), "shards written from a pool that cannot be planned"
    elif res.code == 0:
        rows = pq.read_table(pool).to_pylist()
        parquet_rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
        assert len(parquet_rows) == len(rows), "pool rows lost or doubled"
        assert not [r for r in parquet_rows if r["status"] == "success"]


@pytest.mark.parametrize("clash", ["out-is-file", "out-is-pool-file", "processes-0", "threads-0",
                                   "samples-per-shard-0", "timeout-0"])
def test_download_bad_paths_and_settings(clash, tmp_path, capfd, caplog):
    pool = write_pool(tmp_path / "pool.parquet", [{"uid": uid(5), "url": "http://10.0.0.1/a.jpg", "text": "a"}])
    before = pool.read_bytes()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    out, extra = tmp_path / "raw", []
    if clash == "out-is-file":
        out = a_file
    elif clash == "out-is-pool-file":
        out = pool
    else:
        flag, value = clash.rsplit("-", 1)
        extra = [f"--{flag}", value]
    argv = ["download", "--pool", str(pool), "--out", str(out), *FAST, *extra]
    res = run_cli(argv, capfd, caplog)
    assert_contract(res)
    assert res.code != 0, f"download accepted {clash}"
    assert pool.read_bytes() == before and a_file.read_text() == "keep me\n"
