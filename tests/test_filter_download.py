"""The filters on real ``qcap download`` output: the world served over loopback, downloaded, filtered, resharded."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from test_filter_support import shared_world, truth_table

from base.cli import run_guarded
from base.shards import array_to_uids, iter_samples, load_uids, read_tables
from curate.download.run import main as download_main
from world.server import WorldServer


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    world, helper_raw = shared_world(tmp_path_factory)
    base = tmp_path_factory.mktemp("dl")
    with WorldServer(world, stall_seconds=2) as srv:
        pool = srv.localize_pool(base / "pool.parquet")
        code = run_guarded(download_main, [
            "--pool", str(pool), "--out", str(base / "raw"), "--allow-private-addresses", "--processes", "2",
            "--threads", "16", "--samples-per-shard", "120", "--timeout", "1", "--retries", "1",
            "--max-request-seconds", "3", "--retry-backoff", "0", "--no-progress",
        ], "qcap download")
    assert code == 0
    return world, helper_raw, base


def qcap(*argv: str) -> None:
    """The real command line, in this process (the CLI's own tests run it as a subprocess)."""
    from qcap.cli import main

    assert main(list(argv)) == 0, argv


def test_basic_dedup_reshard_on_downloaded_shards(downloaded):
    world, helper_raw, base = downloaded
    raw, f = base / "raw", base / "filters"
    qcap("filter", "basic", "--shards", str(raw), "--out", str(f / "basic.npy"), "--no-progress", "--no-histograms")
    qcap("filter", "dedup", "--shards", str(raw), "--subset", str(f / "basic.npy"), "--out", str(f / "dedup.npy"),
         "--no-progress", "--no-histograms")
    qcap("uids", "intersect", str(f / "basic.npy"), str(f / "dedup.npy"), "--out", str(f / "final.npy"))
    qcap("reshard", "--shards", str(raw), "--subset", str(f / "final.npy"), "--out", str(base / "curated"),
         "--samples-per-shard", "16", "--no-progress")

    table = read_tables(str(raw)).to_pandas().set_index("uid")
    truth = truth_table(world)
    # the basic filter decides from the pool's metadata: the same verdicts as on the helper's shards
    mine = pq.read_table(f / "basic.report" / "decisions.parquet").to_pandas().set_index("uid")
    helper_run = base / "helper_basic.npy"
    qcap("filter", "basic", "--shards", str(helper_raw), "--out", str(helper_run), "--no-progress", "--no-histograms")
    theirs = pq.read_table(base / "helper_basic.report" / "decisions.parquet").to_pandas().set_index("uid")
    both = mine.index[(mine.status == "success") & (theirs.status[mine.index] == "success")]
    assert len(both) > 150 and (mine.kept[both] == theirs.kept[both]).all()
    report = json.loads((f / "basic.report" / "report.json").read_text())
    assert report["counts"]["failed"] == table.status[table.status != "success"].value_counts().to_dict()
    # dedup among the basic survivors: every planted copy whose original also survived is grouped
    dedup = pq.read_table(f / "dedup.report" / "decisions.parquet").to_pandas().set_index("uid")
    ok = dedup[(dedup.status == "success") & (dedup.reason != "outside_subset")]
    keeper = ok.duplicate_of.where(ok.duplicate_of.notna(), ok.index.to_series())
    copies = truth[(truth.is_exact_dup | truth.is_near_dup) & truth.index.isin(ok.index) & truth.dup_of.isin(ok.index)]
    for uid, row in copies.iterrows():
        assert keeper[uid] == keeper[row.dup_of], uid
    assert all(members.kept.sum() == 1 for _, members in ok.groupby(keeper))
    # the curated shards hold exactly the final list's downloaded samples
    final = set(array_to_uids(load_uids(f / "final.npy")))
    curated = [s.uid for s in iter_samples(str(base / "curated"))]
    assert sorted(curated) == sorted(final & set(table.index[table.status == "success"]))
    sizes = json.loads((base / "curated" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(curated)
