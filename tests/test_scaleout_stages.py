"""Scale-out of reshard, subset and world on a real two-node Ray cluster on loopback (a head and a
worker node, one CPU each): each stage run with ``--ray-address`` writes what its local pool run
writes, file for file and byte for byte (its run records compared without their run facts: wall
time, where it ran, the worker count), and a worker node whose raylet is SIGKILLed while it runs a
reshard task costs retries, not data.

Every run is made in its own working folder with the same relative ``--out``, so the paths the
stages record (config, card, summary) are the same strings in both runs and any byte that differs
is a difference in the data."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import make_uid
from dr_data import write_images
from raycluster import BIN, ENV, kill_worker_node_mid_run, two_node_cluster

from base.shards import iter_samples, save_uids

# JSON run records, and the run facts in them (not data): removed before the records are compared
RUN_RECORDS = {"config.json", "summary.json"}
RUN_FACTS = {"seconds", "ran_on"}
WHERE_IT_RAN = {"num_workers", "ray_address", "workers"}


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster() as running:
        yield running


def start(cwd: Path, *argv: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(BIN / "qcap"), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=cwd)


def finish(proc: subprocess.Popen, timeout: int = 240) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def qcap(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return finish(start(cwd, *argv))


def local_and_ray(tmp_path: Path, argv: list[str], local: list[str], address: str) -> tuple[Path, Path, str]:
    """The stage run locally (``local`` flags) and on the cluster at once, each in its own
    working folder; returns both output folders and the cluster run's stdout."""
    runs = [start(tmp_path / "local", *argv, *local), start(tmp_path / "ray", *argv, "--ray-address", address)]
    done = [finish(proc) for proc in runs]
    for run in done:
        assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path / "local" / "out", tmp_path / "ray" / "out", done[1].stdout


def without_run_facts(record: dict) -> dict:
    kept = {k: v for k, v in record.items() if k not in RUN_FACTS}
    if isinstance(kept.get("config"), dict):
        kept["config"] = {k: v for k, v in kept["config"].items() if k not in WHERE_IT_RAN}
    return kept


def contents(folder: Path) -> dict[str, str | dict]:
    """Every file a stage wrote, by path relative to ``folder``: its sha256, or for a run record
    its JSON without the run facts."""
    found: dict[str, str | dict] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(folder))
        if path.name in RUN_RECORDS and path.parent == folder:
            found[name] = without_run_facts(json.loads(path.read_text()))
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def uids_per_shard(folder: Path) -> dict[str, list[str]]:
    shards: dict[str, list[str]] = {}
    for tar in sorted(folder.glob("*.tar")):
        shards[tar.name] = [s.uid for s in iter_samples([str(tar)])]
    return shards


def ran_on(record: Path) -> str:
    return json.loads(record.read_text())["ran_on"]


# --------------------------------------------------------------------------------------------
# The same output on the cluster as on a local pool

LAYOUT = [list(range(s * 12, (s + 1) * 12)) for s in range(10)]  # 120 images in 10 shards


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scaleout-stages")
    raw = write_images(root / "raw", LAYOUT)  # shard 0 also holds a failed download (uid 99_999)
    # every other image, the failed download and two uids no shard holds
    chosen = [make_uid(n) for n in range(0, 120, 2)] + [make_uid(99_999), make_uid(500_000), make_uid(500_001)]
    save_uids(root / "subset.npy", chosen)
    return {"raw": raw, "subset": root / "subset.npy"}


def test_reshard_on_the_cluster_writes_what_the_local_pool_writes(cluster, images, tmp_path):
    argv = ["reshard", "--shards", str(images["raw"]), "--subset", str(images["subset"]), "--out", "out",
            "--samples-per-shard", "7", "--no-progress"]
    theirs, ours, stdout = local_and_ray(tmp_path, argv, ["--num-workers", "2"], cluster.address)
    assert "wrote 60 samples in 9 shards" in stdout
    assert uids_per_shard(ours) == uids_per_shard(theirs)
    assert contents(ours) == contents(theirs)
    assert ran_on(ours / "summary.json") == f"ray ({cluster.address})"
    assert ran_on(theirs / "summary.json") == "local (2 processes)"
    report = json.loads((ours / "summary.json").read_text())
    assert report["found_failed"] == {"http_404": 1} and report["not_found"] == 2 and report["expected_equals_written"]
    # where it ran is no part of the plan's identity: the local run's folder, resumed on the cluster
    # after losing a shard (as a kill before its marker leaves it), is the same run, finished the same
    for path in theirs.glob("00003*"):
        path.unlink()
    resumed = qcap(tmp_path / "local", *argv, "--ray-address", cluster.address)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(8 already done)" in resumed.stdout
    finished, reference = contents(theirs), contents(ours)
    assert finished.pop("summary.json").pop("resumed_shards") == 8
    assert reference.pop("summary.json").pop("resumed_shards") == 0
    assert finished == reference
    assert ran_on(theirs / "summary.json") == f"ray ({cluster.address})"


@pytest.mark.slow  # ~11 s; the fast suite runs reshard on the cluster (the same pool and Ray tasks) and subset locally
def test_subset_on_the_cluster_writes_what_the_local_pool_writes(cluster, images, tmp_path):
    argv = ["subset", "--shards", str(images["raw"]), "--fraction", "0.4", "--seed", "3", "--samples-per-shard", "10",
            "--out", "out", "--no-progress"]
    theirs, ours, stdout = local_and_ray(tmp_path, argv, ["--num-workers", "2"], cluster.address)
    assert "counts reconcile: yes" in stdout
    summary = json.loads((ours / "summary.json").read_text())
    assert summary["num_selected"] == summary["num_written"] == 48 and summary["num_output_shards"] > 3
    assert uids_per_shard(ours) == uids_per_shard(theirs)
    assert (ours / "README.md").is_file()  # the card too: the same bytes
    assert contents(ours) == contents(theirs)
    assert summary["ran_on"] == f"ray ({cluster.address})"


@pytest.mark.slow  # ~12 s; the fast suite checks the world is the same whatever its worker count (test_world.py)
def test_world_on_the_cluster_is_the_world_of_a_local_pool(cluster, tmp_path):
    """A seeded world is the same whichever pool makes its chunks and in whatever order they finish."""
    argv = ["world", "--out", "out", "--num-samples", "300", "--chunk-size", "64", "--clean-samples", "16",
            "--eval-samples", "8", "--eval-image-size", "32", "--clean-image-size", "48", "--seed", "5"]
    theirs, ours, _ = local_and_ray(tmp_path, argv, ["--workers", "2"], cluster.address)
    assert not (ours / ".parts").exists()
    world = json.loads((ours / "world.json").read_text())
    assert world["counts"]["splits"]["pool"] == 300 and "ray_address" not in world["config"]
    assert len(list((ours / "images").iterdir())) == 5  # one image folder per pool chunk of 64
    assert contents(ours) == contents(theirs)  # world.json included: it holds no run facts
    # where it runs is no part of the world's identity: the local world, asked for on Ray, is complete
    again = qcap(tmp_path / "local", *argv, "--ray-address", cluster.address)
    assert again.returncode == 0, again.stderr[-3000:]
    assert contents(theirs) == contents(ours)


# --------------------------------------------------------------------------------------------
# A worker node lost mid-run

KILL_SHARDS = 100  # output shards of 3 samples: one task each


def test_a_worker_node_killed_mid_reshard_costs_retries_not_data(tmp_path):
    layout = [list(range(s * 4, (s + 1) * 4)) for s in range(KILL_SHARDS)]
    raw = write_images(tmp_path / "raw", layout)
    uids = np.array([make_uid(n) for n in range(0, 4 * KILL_SHARDS) if n % 4 != 3])  # 3 of each input shard's 4
    save_uids(tmp_path / "subset.npy", list(uids))
    argv = ["reshard", "--shards", str(raw), "--subset", str(tmp_path / "subset.npy"), "--out", "out",
            "--samples-per-shard", "3", "--no-progress"]
    reference_run = start(tmp_path / "reference", *argv)  # one local process, while the cluster starts
    work = tmp_path / "ray"
    work.mkdir()
    out = work / "out"
    with two_node_cluster() as running:
        reference = finish(reference_run)
        assert reference.returncode == 0, reference.stderr[-3000:]
        proc = subprocess.Popen([str(BIN / "qcap"), *argv, "--ray-address", running.address], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV, cwd=work)
        done_at_kill = kill_worker_node_mid_run(running, proc, out, timeout=180)  # shards are being written
        stdout, stderr = proc.communicate(timeout=240)
    assert done_at_kill < KILL_SHARDS
    assert proc.returncode == 0, stderr[-3000:]
    assert f"wrote {3 * KILL_SHARDS} samples in {KILL_SHARDS} shards" in stdout
    assert uids_per_shard(out) == uids_per_shard(tmp_path / "reference" / "out")
    assert contents(out) == contents(tmp_path / "reference" / "out")
