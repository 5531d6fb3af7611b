"""The resharder: counts equal the list ∩ the successes, everything carried verbatim, SIGKILL then resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_filter_support import shared_world

from base.shards import (
    expand_shards,
    iter_samples,
    num_samples,
    read_tables,
    save_uids,
    shard_size,
)
from curate.reshard import ReshardConfig, reshard

QCAP = str(Path(sys.executable).parent / "qcap")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    world, raw = shared_world(tmp_path_factory)
    table = read_tables(str(raw)).to_pandas()
    folder = tmp_path_factory.mktemp("reshard")
    # every other pool uid, failures included, plus uids that no shard holds
    pool = sorted(table.uid)
    chosen = pool[::2] + [f"{i:032x}" for i in range(5)]
    save_uids(folder / "subset.npy", chosen)
    return raw, table, folder, set(chosen)


def test_counts_equal_the_list_intersected_with_the_successes(inputs):
    raw, table, folder, chosen = inputs
    out = folder / "curated"
    proc = subprocess.run([QCAP, "reshard", "--shards", str(raw), "--subset", str(folder / "subset.npy"), "--out", str(out),
                           "--samples-per-shard", "16", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    successes = set(table.uid[table.status == "success"])
    expected = chosen & successes
    written = list(iter_samples(str(out)))
    assert sorted(s.uid for s in written) == sorted(expected)
    assert num_samples(str(out)) == len(expected)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == len(expected) and all(v == 16 for v in list(sizes.values())[:-1])
    report = json.loads((out / "summary.json").read_text())
    failed = chosen & set(table.uid[table.status != "success"])
    assert report["found_success"] == len(expected) and sum(report["found_failed"].values()) == len(failed)
    assert report["not_found"] == 5 and report["expected_equals_written"]
    assert f"wrote {len(expected)} samples" in proc.stdout
    # every sample is copied verbatim under a new key, with where it came from
    originals = {s.uid: s for s in iter_samples(str(raw))}
    for sample in written:
        source = originals[sample.uid]
        assert sample.image == source.image and sample.text == source.text
        assert sample.meta["source_key"] == source.key and sample.meta["key"] == sample.key
        assert sample.meta["original_width"] == source.meta["original_width"]
    # the output is a shard folder like any other: Parquet of the same pool columns, stats, markers
    out_table = read_tables(str(out))
    assert {"uid", "text", "original_width", "original_height", "sha256", "url", "source_shard"} <= set(out_table.column_names)
    assert set(out_table.column("status").to_pylist()) == {"success"}
    verify = subprocess.run([QCAP, "shards", "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0 and "problems: []" in verify.stdout
    # a second run finds everything done and changes nothing
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    again = reshard(ReshardConfig(shards=str(raw), subset=folder / "subset.npy", out=out, samples_per_shard=16,
                                  progress=False))
    assert again["resumed_shards"] == len(before)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


def test_other_inputs_are_refused_unless_overwrite(inputs, tmp_path):
    raw, table, folder, chosen = inputs
    out = tmp_path / "curated"
    reshard(ReshardConfig(shards=str(raw), subset=folder / "subset.npy", out=out, samples_per_shard=64, progress=False))
    successes = set(table.uid[table.status == "success"])
    three = sorted(chosen & successes)[:3]
    save_uids(tmp_path / "other.npy", three)
    argv = [QCAP, "reshard", "--shards", str(raw), "--subset", str(tmp_path / "other.npy"), "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([*argv, "--overwrite", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert num_samples(str(out)) == 3
    assert len(expand_shards(str(out))) == 1


def test_bad_uid_files_are_clear_errors(inputs, tmp_path):
    raw, _, _, _ = inputs
    wrong_dtype = tmp_path / "wrong.npy"
    np.save(wrong_dtype, np.arange(10, dtype=np.int64))
    unsorted = tmp_path / "unsorted.npy"
    np.save(unsorted, np.array([(2, 0), (1, 0)], dtype="u8,u8"))
    for path, message in ((wrong_dtype, "expected DataComp's"), (unsorted, "not sorted"),
                          (tmp_path / "missing.npy", "not a readable .npy")):
        proc = subprocess.run([QCAP, "reshard", "--shards", str(raw), "--subset", str(path), "--out", str(tmp_path / "o")],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and str(path) in proc.stderr, proc.stderr[-1000:]
        assert "Traceback" not in proc.stderr
    # an --out that is a file (a typo for a folder): one line, the file untouched
    (tmp_path / "taken").write_text("not a folder")
    proc = subprocess.run([QCAP, "reshard", "--shards", str(raw), "--subset", str(inputs[2] / "subset.npy"), "--out",
                           str(tmp_path / "taken"), "--overwrite"], capture_output=True, text=True)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_sigkill_then_resume_gives_the_same_shards(inputs, tmp_path):
    """Kill the resharder (SIGKILL) while it writes, several times, then finish: byte-identical output."""
    raw, _, folder, _ = inputs
    reference = tmp_path / "reference"
    reshard(ReshardConfig(shards=str(raw), subset=folder / "subset.npy", out=reference, samples_per_shard=2,
                          progress=False))
    out = tmp_path / "killed"
    argv = [QCAP, "reshard", "--shards", str(raw), "--subset", str(folder / "subset.npy"), "--out", str(out),
            "--samples-per-shard", "2", "--no-progress"]
    total = len(list(reference.glob("*.tar")))
    partial_states = 0
    rng = random.Random(0)
    for _ in range(4):
        done_before = len(list(out.glob("*.done")))
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.done"))) <= done_before:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))  # land anywhere: between shards or in the middle of one
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = len(list(out.glob("*.done")))
        if done < total:
            partial_states += 1
            assert not (out / "sizes.json").exists() or json.loads((out / "sizes.json").read_text()) != {}
            # every visible tar is whole (its Parquet went first; a kill before its marker only means a redo)
            for tar in out.glob("*.tar"):
                assert tar.with_suffix(".parquet").exists()
                assert len(list(iter_samples([str(tar)]))) == shard_size(str(reference / tar.name))
        else:
            break
    assert partial_states >= 2, "the resharder finished before any kill landed; the test proved nothing"
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already done" in proc.stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in reference.iterdir() if not p.name.startswith("."))
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    for tar in reference.glob("*.tar"):
        assert (out / tar.name).read_bytes() == tar.read_bytes(), tar.name
        assert pq.read_table(out / f"{tar.stem}.parquet").equals(pq.read_table(reference / f"{tar.stem}.parquet"))
        assert shard_size(str(out / tar.name)) == shard_size(str(tar))
    assert json.loads((out / "sizes.json").read_text()) == json.loads((reference / "sizes.json").read_text())
