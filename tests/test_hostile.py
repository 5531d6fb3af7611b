"""Every in-process stage over every class of hostile input (``tests/hostile.py``): the reliability contract.

Per case the real command runs (``base.cli.run_guarded`` on the function ``qcap.cli.all_commands()``
registers) and must either exit 0 with every input row accounted for exactly once and the hostile
samples recorded as non-success in the stage's own accounting (decisions, report, Parquet, summary),
or exit non-zero with a one-line ``error:``; never a Traceback, never an uncaught exception.

The Ray/torch stages (clip-score, caption, train, finetune, attention-distance) and download are
in ``test_hostile_models.py`` and ``test_hostile_download.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hostile import (
    CASES,
    assert_contract,
    build_case,
    input_rows,
    run_cli,
    uid_file,
    write_caption_folder,
    write_npy_variants,
)

from base.shards import is_uid

CASE_IDS = list(CASES)
# a hang is a failure (a tar header claiming 10**12 bytes made a reader spin for minutes), not a stuck suite
pytestmark = pytest.mark.timeout(10)


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    """Every hostile case, written once (stages only read them)."""
    root = tmp_path_factory.mktemp("hostile-cases")
    return {case_id: build_case(case_id, root) for case_id in CASE_IDS}


def _success_uids(case) -> list[str]:
    return [r["uid"] for r in case.success_rows if is_uid(r["uid"])]


def _tar_samples(folder: Path) -> list:
    from base.shards import iter_samples

    return list(iter_samples(str(folder)))


# --------------------------------------------------------------------------------------------
# qcap shards info | verify


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_shards_info(case_id, cases, capfd, caplog):
    case = cases[case_id]
    res = run_cli(["shards", "info", str(case.folder), "--json"], capfd, caplog)
    assert_contract(res)
    if res.code == 0:
        info = json.loads(res.out)
        rows = input_rows(case.folder)
        assert info["num_rows"] == len(rows), (info, len(rows))
        assert sum(info["status_counts"].values()) == info["num_rows"]
        assert info["num_successes"] == sum(r["status"] == "success" for r in case.rows)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_shards_verify(case_id, cases, capfd, caplog):
    """verify REPORTS what breaks the contract (naming the shard), and passes what does not."""
    case = cases[case_id]
    res = run_cli(["shards", "verify", str(case.folder), "--json"], capfd, caplog)
    assert_contract(res)
    if case.problems:
        assert res.code != 0, f"verify passed a folder that breaks the shard contract ({case_id}): {res.out}"
        assert case.problem_shard in res.err, res.err
    else:
        assert res.code == 0, res.err
        assert json.loads(res.out)["num_samples"] == len(case.success_rows)


@pytest.mark.parametrize("case_id", ["bombs-and-undecodable", "images-mixed", "images-every-mode",
                                     "members-json-without-image"])
def test_shards_verify_decode(case_id, cases, capfd, caplog):
    """verify --decode decodes every image: undecodable ones are reported, every mode passes."""
    case = cases[case_id]
    res = run_cli(["shards", "verify", "--decode", str(case.folder), "--json"], capfd, caplog)
    assert_contract(res)
    if case.undecodable:
        assert res.code != 0, f"verify --decode passed undecodable images: {res.out}"
        assert "00001.tar" in res.err
    else:
        assert res.code == 0, res.err


# --------------------------------------------------------------------------------------------
# qcap filter basic | dedup (in-process; clip-score is in test_hostile_models.py)


def check_filter_outputs(case, out: Path, *, decodes: bool) -> None:
    """Every input row has exactly one decision row; counts reconcile; hostile rows are not kept."""
    report = json.loads((out.with_name(out.stem + ".report") / "report.json").read_text())
    decisions = pq.read_table(out.with_name(out.stem + ".report") / "decisions.parquet").to_pylist()
    got = Counter((d["shard"], d["key"]) for d in decisions)
    want = Counter(input_rows(case.folder))
    assert got == want, f"decision rows differ from input rows: missing {want - got}, extra {got - want}"
    counts = report["counts"]
    assert counts["total"] == len(want) == counts["kept"] + counts["num_dropped"] + counts["num_failed"]
    kept = {d["uid"] for d in decisions if d["kept"]}
    assert all(is_uid(u) for u in kept), kept
    from base.shards import array_to_uids, load_uids

    assert set(array_to_uids(load_uids(out))) == kept
    if decodes:
        reasons = {d["uid"]: d["reason"] for d in decisions if d["status"] == "success"}
        for u in case.undecodable:
            assert u not in kept, f"undecodable/missing image {u} was kept"
        for u in case.decodable:
            assert reasons.get(u) != "undecodable_image", f"a decodable image ({u}) was called undecodable"
        # a success whose members are broken must not silently pass as a good image
        for u in case.no_image:
            assert u not in kept


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_filter_basic(case_id, cases, tmp_path, capfd, caplog):
    case = cases[case_id]
    out = tmp_path / "basic.npy"
    res = run_cli(["filter", "basic", "--shards", str(case.folder), "--out", str(out), "--no-histograms",
                   "--no-preview", "--no-progress", "--min-image-side", "1", "--max-aspect-ratio", "100000"],
                  capfd, caplog)
    assert_contract(res)
    if res.code == 0:
        check_filter_outputs(case, out, decodes=False)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_filter_dedup(case_id, cases, tmp_path, capfd, caplog):
    case = cases[case_id]
    out = tmp_path / "dedup.npy"
    res = run_cli(["filter", "dedup", "--shards", str(case.folder), "--out", str(out), "--no-histograms",
                   "--no-preview", "--no-progress", "--hashes", str(tmp_path / "hashes")], capfd, caplog)
    assert_contract(res)
    if res.code == 0:
        check_filter_outputs(case, out, decodes=True)
        if case.duplicate_uids:  # one uid, two rows: the uid file still holds it once (sorted, unique)
            from base.shards import load_uids

            array = load_uids(out)
            assert len({(int(a), int(b)) for a, b in zip(array["f0"], array["f1"], strict=True)}) == len(array)


# --------------------------------------------------------------------------------------------
# qcap reshard, qcap uids, qcap subset, qcap build-dr


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_reshard(case_id, cases, tmp_path, capfd, caplog):
    case = cases[case_id]
    uids = sorted(set(_success_uids(case))) or ["0" * 32]
    subset = uid_file(tmp_path / "subset.npy", uids)
    out = tmp_path / "curated"
    res = run_cli(["reshard", "--shards", str(case.folder), "--subset", str(subset), "--out", str(out),
                   "--samples-per-shard", "4", "--no-progress"], capfd, caplog)
    assert_contract(res)
    if res.code != 0:
        return
    report = json.loads((out / "summary.json").read_text())
    assert report["num_input_rows"] == len(input_rows(case.folder))
    assert report["found_success"] + sum(report["found_failed"].values()) + report["not_found"] == report["num_requested"]
    samples = _tar_samples(out) if list(out.glob("*.tar")) else []
    out_uids = [s.uid for s in samples]
    assert len(out_uids) == len(set(out_uids)) == report["num_written"], "a uid written twice or a count that lies"
    assert set(out_uids) <= set(uids)
    # every requested success uid comes out exactly once: copied, or a row saying why it was not
    assert report["num_written"] + sum(report.get("not_copied", {}).values()) == report["found_success"], report
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == report["found_success"], (len(rows), report)
    assert sorted(r["uid"] for r in rows) == sorted({r["uid"] for r in rows}), "an output row twice"
    copied = {r["uid"] for r in rows if r["status"] == "success"}
    assert copied == set(out_uids), "the output Parquet's successes are not the tar's samples"
    for sample in samples:
        assert sample.image is not None, f"reshard wrote success {sample.uid} without an image member"
    assert not copied & case.no_image, "a success row without an image member was copied as a success"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == len(samples)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_uids_info_with_shards(case_id, cases, tmp_path, capfd, caplog):
    case = cases[case_id]
    uids = sorted(set(_success_uids(case))) + ["f" * 32]  # one uid that no shard holds
    path = uid_file(tmp_path / "u.npy", uids)
    res = run_cli(["uids", "info", str(path), "--shards", str(case.folder), "--json"], capfd, caplog)
    assert_contract(res)
    if res.code == 0:
        info = json.loads(res.out)
        assert info["count"] == len(set(uids))
        got = info["in_shards"]
        assert got["num_input_rows"] == len(input_rows(case.folder))
        assert got["found_success"] + sum(got["found_failed"].values()) + got["not_found"] == info["count"]
        assert got["not_found"] >= 1


NPY_VARIANTS = ["zero-bytes", "wrong-dtype-int64", "strings", "two-d", "unsorted", "object-pickle", "truncated", "text"]


@pytest.fixture(scope="session")
def npy_files(tmp_path_factory):
    return write_npy_variants(tmp_path_factory.mktemp("npy"))


@pytest.mark.parametrize("variant", NPY_VARIANTS)
@pytest.mark.parametrize("operation", ["intersect", "info", "reshard", "filter-subset"])
def test_hostile_uid_files(operation, variant, npy_files, cases, tmp_path, capfd, caplog):
    """A uid file that is not DataComp's (0 bytes, wrong dtype, 2-D, unsorted, pickled objects,
    truncated, text) is a one-line error wherever a uid file is read; nothing is written."""
    bad = npy_files[variant]
    good = uid_file(tmp_path / "good.npy", [f"{i:032x}" for i in range(3)])
    out = tmp_path / "out.npy"
    folder = str(cases["images-every-mode"].folder)
    argv = {
        "intersect": ["uids", "intersect", str(good), str(bad), "--out", str(out)],
        "info": ["uids", "info", str(bad), "--json"],
        "reshard": ["reshard", "--shards", folder, "--subset", str(bad), "--out", str(tmp_path / "c"), "--no-progress"],
        "filter-subset": ["filter", "basic", "--shards", folder, "--subset", str(bad), "--out", str(out),
                          "--no-histograms", "--no-preview", "--no-progress"],
    }[operation]
    res = run_cli(argv, capfd, caplog)
    assert_contract(res)
    assert res.code != 0, f"a hostile uid file ({variant}) was accepted: {res.out}"
    assert bad.name in res.err, res.err
    assert not out.exists() and not (tmp_path / "c" / "00000.tar").exists()


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_subset(case_id, cases, tmp_path, capfd, caplog):
    case = cases[case_id]
    out = tmp_path / "sub"
    res = run_cli(["subset", "--shards", str(case.folder), "--fraction", "1.0", "--out", str(out), "--no-card",
                   "--no-progress"], capfd, caplog)
    assert_contract(res)
    if res.code != 0:
        return
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary["checks"].values()), summary["checks"]
    samples = _tar_samples(out) if list(out.glob("*.tar")) else []
    out_uids = [s.uid for s in samples]
    assert len(out_uids) == len(set(out_uids)), "subset wrote a uid twice"
    valid = set(_success_uids(case))
    assert set(out_uids) <= valid
    # fraction 1.0: every valid success is one output row, copied or with the status saying why not
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    row_uids = Counter(r["uid"] for r in rows)
    assert all(n == 1 for n in row_uids.values()), f"an output row twice: {[u for u, n in row_uids.items() if n > 1]}"
    assert set(row_uids) == valid, f"fraction 1.0 lost successes: {valid - set(row_uids)}; extra {set(row_uids) - valid}"
    assert {r["uid"] for r in rows if r["status"] == "success"} == set(out_uids), "Parquet successes != tar samples"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == len(samples)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_build_dr(case_id, cases, tmp_path, capfd, caplog):
    """Images from the hostile case, captions for every valid success (a good caption folder)."""
    case = cases[case_id]
    syn = tmp_path / "syn"
    write_caption_folder(case.folder, syn)
    out = tmp_path / "dr"
    res = run_cli(["build-dr", "--images", str(case.folder), "--captions", str(syn), "--out", str(out), "--no-card",
                   "--no-progress", "--num-workers", "1"], capfd, caplog)
    assert_contract(res)
    if res.code != 0:
        return
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciled"] and all(summary["checks"].values()), summary
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    # the DR Parquets list every image sample of the input exactly once
    want = Counter(r["key"] for r in case.success_rows)
    got = Counter(r.get("source_key") or r["key"] for r in rows)
    assert got == want, f"DR rows differ from the input's successes: missing {want - got}, extra {got - want}"
    built = {r["uid"] for r in rows if r["status"] == "success"}
    assert not built & case.no_image, "a sample without an image was built"
    statuses = Counter(r["status"] for r in rows)
    assert summary["images_in"] == sum(statuses.values())
    samples = _tar_samples(out) if list(out.glob("*.tar")) else []
    assert len(samples) == statuses["success"]
    assert len({s.uid for s in samples}) == len(samples), "a uid built twice"
    for sample in samples:
        assert sample.image is not None and sample.syn_text


# --------------------------------------------------------------------------------------------
# Bad and clashing paths, empty inputs, impossible settings (every cheap stage)


def _path_cases(tmp: Path, good: Path) -> dict[str, list[str]]:
    a_file = tmp / "a-file.txt"
    a_file.write_text("I am a file\n")
    missing = tmp / "no-such-folder"
    good_uids = uid_file(tmp / "good.npy", [f"{i:032x}" for i in range(3)])
    return {
        "filter-basic-out-is-file": ["filter", "basic", "--shards", str(good), "--out", str(a_file)],
        "filter-basic-out-is-dir": ["filter", "basic", "--shards", str(good), "--out", str(good)],
        "filter-basic-input-missing": ["filter", "basic", "--shards", str(missing), "--out", str(tmp / "o.npy")],
        "filter-dedup-input-missing": ["filter", "dedup", "--shards", str(missing), "--out", str(tmp / "o.npy")],
        "filter-dedup-out-in-input": ["filter", "dedup", "--shards", str(good), "--out", str(good / "00000.tar")],
        "filter-dedup-num-workers-0": ["filter", "dedup", "--shards", str(good), "--out", str(tmp / "o.npy"),
                                       "--num-workers", "0"],
        "reshard-out-is-file": ["reshard", "--shards", str(good), "--subset", str(good_uids), "--out", str(a_file)],
        "reshard-out-is-input": ["reshard", "--shards", str(good), "--subset", str(good_uids), "--out", str(good)],
        "reshard-input-missing": ["reshard", "--shards", str(missing), "--subset", str(good_uids), "--out",
                                  str(tmp / "c")],
        "reshard-subset-missing": ["reshard", "--shards", str(good), "--subset", str(tmp / "nope.npy"), "--out",
                                   str(tmp / "c")],
        "reshard-num-workers-0": ["reshard", "--shards", str(good), "--subset", str(good_uids), "--out",
                                  str(tmp / "c"), "--num-workers", "0"],
        "reshard-samples-per-shard-0": ["reshard", "--shards", str(good), "--subset", str(good_uids), "--out",
                                        str(tmp / "c"), "--samples-per-shard", "0"],
        "subset-out-is-file": ["subset", "--shards", str(good), "--fraction", "0.5", "--out", str(a_file)],
        "subset-out-is-input": ["subset", "--shards", str(good), "--fraction", "0.5", "--out", str(good)],
        "subset-input-missing": ["subset", "--shards", str(missing), "--fraction", "0.5", "--out", str(tmp / "s")],
        "subset-fraction-0": ["subset", "--shards", str(good), "--fraction", "0", "--out", str(tmp / "s")],
        "subset-fraction-nan": ["subset", "--shards", str(good), "--fraction", "nan", "--out", str(tmp / "s")],
        "subset-num-samples-negative": ["subset", "--shards", str(good), "--num-samples", "-3", "--out",
                                        str(tmp / "s")],
        "subset-num-workers-0": ["subset", "--shards", str(good), "--fraction", "0.5", "--out", str(tmp / "s"),
                                 "--num-workers", "0"],
        "build-dr-out-is-file": ["build-dr", "--images", str(good), "--captions", str(good), "--out", str(a_file)],
        "build-dr-out-is-input": ["build-dr", "--images", str(good), "--captions", str(good), "--out", str(good)],
        "build-dr-captions-missing": ["build-dr", "--images", str(good), "--captions", str(missing), "--out",
                                      str(tmp / "dr")],
        "build-dr-images-missing": ["build-dr", "--images", str(missing), "--captions", str(good), "--out",
                                    str(tmp / "dr")],
        "build-dr-num-workers-0": ["build-dr", "--images", str(good), "--captions", str(good), "--out",
                                   str(tmp / "dr"), "--num-workers", "0"],
        "uids-intersect-input-missing": ["uids", "intersect", str(good_uids), str(tmp / "nope.npy"), "--out",
                                         str(tmp / "o.npy")],
        "uids-intersect-out-is-dir": ["uids", "intersect", str(good_uids), str(good_uids), "--out", str(tmp)],
        "uids-info-missing": ["uids", "info", str(tmp / "nope.npy")],
        "shards-info-missing": ["shards", "info", str(missing)],
        "shards-verify-missing": ["shards", "verify", str(missing)],
        "shards-finalize-missing": ["shards", "finalize", str(missing)],
    }


PATH_CASE_IDS = [
    "filter-basic-out-is-file", "filter-basic-out-is-dir", "filter-basic-input-missing", "filter-dedup-input-missing",
    "filter-dedup-out-in-input", "filter-dedup-num-workers-0", "reshard-out-is-file", "reshard-out-is-input",
    "reshard-input-missing", "reshard-subset-missing", "reshard-num-workers-0", "reshard-samples-per-shard-0",
    "subset-out-is-file", "subset-out-is-input", "subset-input-missing", "subset-fraction-0", "subset-fraction-nan",
    "subset-num-samples-negative", "subset-num-workers-0", "build-dr-out-is-file", "build-dr-out-is-input",
    "build-dr-captions-missing", "build-dr-images-missing", "build-dr-num-workers-0", "uids-intersect-input-missing", "uids-intersect-out-is-dir", "uids-info-missing", "shards-info-missing",
    "shards-verify-missing", "shards-finalize-missing",
]


@pytest.mark.parametrize("path_case", PATH_CASE_IDS)
def test_bad_paths_and_settings(path_case, tmp_path, capfd, caplog):
    """A path that clashes (--out = a file, = the input) or is missing, or an impossible setting:
    a one-line error, and the input folder is left as it was."""
    from hostile import write_good_shard, write_sizes

    good = tmp_path / "good"
    write_good_shard(good, 0, 3)
    write_sizes(good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    argv = _path_cases(tmp_path, good)[path_case]
    res = run_cli(argv, capfd, caplog)
    assert_contract(res)
    assert res.code != 0, f"{path_case}: accepted ({res.out})"
    after = {p.name: p.read_bytes() for p in good.iterdir()}
    assert after == before, f"{path_case}: the input folder changed: {sorted(set(after) ^ set(before))}"
    assert (tmp_path / "a-file.txt").read_text() == "I am a file\n"
