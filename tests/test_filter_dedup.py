"""Deduplication on the embedded world: every planted exact and near copy found, one kept per group."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_filter_support import assert_datacomp_uids, shared_world, truth_table

from base.shards import array_to_uids, save_uids
from base.workers import Workers
from curate.filters.config import DedupConfig
from curate.filters.dedup import block_difference, image_hashes, lsh_parameters, main, pairs_brute_force
from curate.filters.near import pairs_lsh_partitioned


def run(raw: Path, out: Path, **overrides) -> dict:
    return main(DedupConfig(shards=str(raw), out=out, progress=False, histograms=False, **overrides))


def shared_hashes(out: Path) -> Path:
    return out.with_name("dedup.hashes")


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory):
    world, raw = shared_world(tmp_path_factory)
    out = tmp_path_factory.mktemp("dedup") / "dedup.npy"
    from qcap.cli import main as qcap

    assert qcap(["filter", "dedup", "--shards", str(raw), "--out", str(out), "--no-progress", "--num-workers", "2"]) == 0
    return world, raw, out


def groups(decisions):
    """uid -> the uid its group keeps (itself when it is kept or alone)."""
    return decisions.duplicate_of.where(decisions.duplicate_of.notna(), decisions.index.to_series())


def test_every_planted_duplicate_found_and_one_kept(dedup_run):
    world, _, out = dedup_run
    truth = truth_table(world)
    decisions = pq.read_table(out.with_name("dedup.report") / "decisions.parquet").to_pandas().set_index("uid")
    ok = decisions[decisions.status == "success"]
    keeper = groups(ok)
    planted = truth[(truth.is_exact_dup | truth.is_near_dup) & truth.index.isin(ok.index) & truth.dup_of.isin(ok.index)]
    assert planted.is_exact_dup.sum() >= 2 and planted.is_near_dup.sum() >= 2
    for uid, row in planted.iterrows():
        assert keeper[uid] == keeper[row.dup_of], f"{'exact' if row.is_exact_dup else 'near'} copy {uid} of {row.dup_of} missed"
    # one survivor per group, deterministically the smallest uid; reasons follow the kind
    for kept_uid, members in ok.groupby(keeper):
        assert members.kept.sum() == 1 and members.kept[kept_uid] and kept_uid == min(members.index)
    # an exact drop shares its bytes with a survivor of its group; a near drop has bytes of its own
    for uid in ok.index[ok.reason == "exact_duplicate"]:
        assert ok.sha256[uid] in set(ok.sha256[(keeper == keeper[uid]) & (ok.index != uid)])
    # nothing unrelated was merged: every group is one original and its copies
    root = truth.dup_of.where(truth.dup_of.notna(), truth.index.to_series())
    mixed = [k for k, members in ok.groupby(keeper) if root[members.index].nunique() > 1]
    assert mixed == []
    kept = set(array_to_uids(assert_datacomp_uids(out)))
    assert kept == set(ok.index[ok.kept])
    report = json.loads((out.with_name("dedup.report") / "report.json").read_text())
    c = report["counts"]
    assert c["total"] == c["kept"] + sum(c["dropped"].values()) + sum(c["failed"].values()) == len(truth)
    assert c["dropped"]["exact_duplicate"] == planted.is_exact_dup.sum()
    assert c["dropped"]["near_duplicate"] == planted.is_near_dup.sum()
    assert report["settings"]["candidates_by"] == "all pairs"
    for name in ("nearest_phash_distance", "block_difference", "caption_words", "image_min_side"):
        assert (out.with_name("dedup.report") / f"hist_{name}.png").exists(), name
    page = (out.with_name("dedup.report") / "preview.html").read_text()
    for reason in ("exact_duplicate", "near_duplicate"):
        n = c["dropped"][reason]
        assert f">dropped: {reason} ({n:,}; the first {min(8, n)})</h2>" in page
    assert "duplicate_of " in page and "nearest_phash_distance " in page  # each sample's measurements


def test_rerun_reuses_hashes_and_lsh_finds_what_brute_force_finds(dedup_run, tmp_path):
    _, raw, out = dedup_run
    reference = set(array_to_uids(np.load(out)))
    again = run(raw, out.with_name("lsh.npy"), brute_force_below=0, hashes=shared_hashes(out))
    assert again["settings"]["num_hashed_now"] == 0
    assert again["settings"]["candidates_by"] == "lsh" and again["settings"]["lsh_recall_at_max_distance"] >= 0.99
    assert set(array_to_uids(np.load(out.with_name("lsh.npy")))) == reference
    # the same hashes folder: nothing hashed twice
    rerun = run(raw, out)
    assert rerun["settings"]["num_hashed_now"] == 0 and set(array_to_uids(np.load(out))) == reference


def test_subset_exact_only_and_largest_image(dedup_run, tmp_path):
    world, raw, out = dedup_run
    truth = truth_table(world)
    exact = run(raw, tmp_path / "exact.npy", near=False, hashes=shared_hashes(out))
    assert set(exact["counts"]["dropped"]) == {"exact_duplicate"}
    largest = run(raw, tmp_path / "largest.npy", keep="largest_image", hashes=shared_hashes(out))
    decisions = pq.read_table(tmp_path / "largest.report" / "decisions.parquet").to_pandas().set_index("uid")
    ok = decisions[decisions.status == "success"]
    sizes = truth.width * truth.height
    for kept_uid, members in ok.groupby(groups(ok)):
        assert sizes[kept_uid] == sizes[members.index].max()
    assert largest["counts"]["kept"] == len(np.load(out))
    # a subset: the copies left out of it are outside_subset, and an original alone is no duplicate
    originals = truth.dup_of.dropna().unique()
    save_uids(tmp_path / "originals.npy", originals)
    sub = run(raw, tmp_path / "sub.npy", subset=tmp_path / "originals.npy", hashes=shared_hashes(out))
    assert "exact_duplicate" not in sub["counts"]["dropped"] and "near_duplicate" not in sub["counts"]["dropped"]
    assert sub["counts"]["kept"] == len(set(originals) & set(ok.index))


def test_hash_and_verification_units(tmp_path):
    from PIL import Image, ImageDraw

    def scene(colour, box, size=(240, 160)):
        image = Image.new("RGB", size, (200, 200, 210))
        ImageDraw.Draw(image).ellipse(box, fill=colour)
        return image

    def jpeg(image, quality=90):
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    a = image_hashes(jpeg(scene((200, 30, 30), (150, 20, 190, 60))))
    copy = image_hashes(jpeg(scene((200, 30, 30), (150, 20, 190, 60)).resize((168, 112)), quality=60))
    other = image_hashes(jpeg(scene((30, 30, 200), (40, 90, 80, 130))))
    assert a["width"] == 240 and a["thumb_width"] == 64 and copy["thumb_width"] == 64
    thumbs = [(h["thumb"], h["thumb_width"], h["thumb_height"]) for h in (a, copy, other)]
    assert block_difference(thumbs[0], thumbs[1]) < 25 < block_difference(thumbs[0], thumbs[2])
    broken = image_hashes(b"\xff\xd8\xff not a jpeg")
    assert broken["error"] and broken["phash"] is None and len(broken["sha256"]) == 32
    # LSH against brute force on random 64-bit hashes with planted close pairs
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=400, dtype=np.uint64)
    flips = np.array([np.uint64(sum(1 << int(b) for b in rng.choice(64, 3, replace=False))) for _ in range(50)],
                     dtype=np.uint64)
    hashes = np.concatenate([base, base[:50] ^ flips])
    exact, nearest = pairs_brute_force(hashes, 4)
    bits, tables, recall = lsh_parameters(len(hashes), 4, 0.999)
    assert recall >= 0.999 and {tuple(p) for p in exact} >= {(i, 400 + i) for i in range(50)}
    # the partitioned search (one process; then 37 partitions of 3 chunks): the same pairs as brute force
    with Workers(1) as workers:
        found, near_found, layout = pairs_lsh_partitioned(hashes, 4, bits, tables, seed=1, work=tmp_path / "a",
                                                          workers=workers, partition_rows=10**9, chunk_rows=10**9)
        split, near_split, split_layout = pairs_lsh_partitioned(hashes, 4, bits, tables, seed=1, work=tmp_path / "b",
                                                                workers=workers, partition_rows=len(hashes) * tables // 37,
                                                                chunk_rows=160)
    assert layout == {"partitions": 1, "chunks": 1} and split_layout["chunks"] == 3 and split_layout["partitions"] >= 37
    assert {tuple(p) for p in found} == {tuple(p) for p in exact}
    assert np.array_equal(split, found) and np.array_equal(near_split, near_found)
    close = nearest <= 4  # a hash with a neighbour within the radius shares a bucket with it: the same nearest
    assert np.array_equal(near_found[close], nearest[close]) and np.all(near_found >= nearest)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # the work folders are removed
    # few tables: a subset of the exact pairs, whatever the partitioning
    few = [pairs_lsh_partitioned(hashes, 4, bits, 2, seed=1, work=tmp_path / f"c{k}", workers=Workers(1),
                                 partition_rows=rows, chunk_rows=chunks)[0] for k, (rows, chunks) in
           enumerate([(10**9, 10**9), (50, 100)])]
    assert np.array_equal(few[0], few[1]) and {tuple(p) for p in few[0]} < {tuple(p) for p in exact}


def test_config_errors():
    with pytest.raises(ValueError, match="max_distance"):
        DedupConfig(shards="x", out=Path("o.npy"), max_distance=64)
    with pytest.raises(ValueError, match="lsh_recall"):
        DedupConfig(shards="x", out=Path("o.npy"), lsh_recall=1.0)
