"""Scale-out on a real two-node Ray cluster on loopback (a head and a worker node, one CPU each):
each shard-parallel stage run with ``--ray-address`` on the cluster writes what its local run
writes (same uids per shard, the same bytes), and a worker node whose raylet is SIGKILLed mid-run
costs task retries, not data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from dr_data import write_images, write_qcap_captions
from raycluster import BIN, ENV, kill_worker_node_mid_run, two_node_cluster

NUM_SHARDS, PER_SHARD = 12, 6
KILL_SHARDS = 80
# files that hold run facts (wall time, where it ran) rather than data
RUN_RECORDS = {"config.json", "summary.json"}


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster() as running:
        yield running


def qcap(*argv: str, timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "qcap"), *argv], capture_output=True, text=True, env=ENV, timeout=timeout,
                          cwd=cwd)


def digest(folder: Path, skip: set[str] = RUN_RECORDS) -> dict[str, str]:
    """sha256 of every file a stage wrote (its run records aside), by path relative to ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def make_dr_inputs(root: Path, num_shards: int, per_shard: int = PER_SHARD) -> dict[str, Path]:
    layout = [list(range(s * per_shard, (s + 1) * per_shard)) for s in range(num_shards)]
    captions = [[n for n in range(num_shards * per_shard) if n % 3 == k and n % 11] for k in range(3)]
    return {"images": write_images(root / "curated", layout), "syn": write_qcap_captions(root / "syn", captions)}


@pytest.fixture(scope="module")
def dr_inputs(tmp_path_factory) -> dict[str, Path]:
    return make_dr_inputs(tmp_path_factory.mktemp("scaleout-dr"), NUM_SHARDS)


def build_dr(inputs: dict[str, Path], out: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return qcap("build-dr", "--images", str(inputs["images"]), "--captions", str(inputs["syn"]), "--out", str(out),
                "--no-progress", "--no-card", "--partition-rows", "20", *extra, cwd=cwd)


def test_build_dr_on_the_cluster_writes_what_the_local_run_writes(cluster, dr_inputs, tmp_path):
    local = build_dr(dr_inputs, tmp_path / "local", "--num-workers", "2")
    assert local.returncode == 0, local.stderr[-2000:]
    # a relative --out, as a user types it: the tasks on the cluster write where the driver means
    remote = build_dr(dr_inputs, Path("ray"), "--ray-address", cluster.address, cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert "counts reconcile: yes" in remote.stdout
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")
    assert len([p for p in (tmp_path / "ray").glob("*.tar")]) == NUM_SHARDS
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["ran_on"] == f"ray ({cluster.address})"


@pytest.mark.slow  # ~45 s; the fast suite kills a worker node mid-reshard (test_scaleout_stages.py)
def test_a_worker_node_killed_mid_run_costs_retries_not_data(tmp_path):
    # many shards, so that the write step lasts long enough to be cut by the kill, however loaded the machine
    dr_inputs = make_dr_inputs(tmp_path / "inputs", KILL_SHARDS, per_shard=30)
    reference = build_dr(dr_inputs, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "ray"
    with two_node_cluster() as running:
        command = [str(BIN / "qcap"), "build-dr", "--images", str(dr_inputs["images"]), "--captions",
                   str(dr_inputs["syn"]), "--out", str(out), "--no-progress", "--no-card", "--partition-rows", "20",
                   "--ray-address", running.address]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        done_at_kill = kill_worker_node_mid_run(running, proc, out)  # the write step has begun
        stdout, stderr = proc.communicate(timeout=300)
    assert done_at_kill < KILL_SHARDS
    assert proc.returncode == 0, stderr[-3000:]
    assert "counts reconcile: yes" in stdout
    assert digest(out) == digest(tmp_path / "reference")


def comparable_report(path: Path) -> dict:
    """A filter's report without its run facts (wall time, output paths)."""
    report = json.loads(path.read_text())
    report.pop("seconds")
    report.pop("outputs")
    return report


def test_filter_basic_on_the_cluster_decides_what_the_local_run_decides(cluster, tmp_path_factory, tmp_path):
    from test_filter_support import shared_world

    _, raw = shared_world(tmp_path_factory)  # 240 samples of the world in 5 shards, every planted fault
    runs = {}
    for name, extra in (("local", []), ("pool", ["--num-workers", "2"]), ("ray", ["--ray-address", cluster.address])):
        out = tmp_path / name / "basic.npy"
        done = qcap("filter", "basic", "--shards", str(raw), "--out", str(out), "--no-progress", "--no-preview",
                    "--no-histograms", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        report = out.with_name("basic.report")
        runs[name] = (out.read_bytes(), (report / "decisions.parquet").read_bytes(),
                      comparable_report(report / "report.json"))
    assert runs["ray"] == runs["local"] and runs["pool"] == runs["local"]
    assert runs["local"][2]["counts"]["total"] == 240 and runs["local"][2]["settings"]["top_languages"]


def test_dedup_on_the_cluster_hashes_and_searches_partitions_as_the_local_run_does(cluster, tmp_path_factory, tmp_path):
    from test_filter_support import shared_world

    _, raw = shared_world(tmp_path_factory)  # planted exact and near copies in 5 shards
    runs = {}
    for name, extra in (("local", []), ("ray", ["--ray-address", cluster.address])):
        out = tmp_path / name / "dedup.npy"
        # LSH even at this size, its search split into partitions of ~200 (table, hash) rows: many tasks
        done = qcap("filter", "dedup", "--shards", str(raw), "--out", str(out), "--no-progress", "--no-preview",
                    "--no-histograms", "--brute-force-below", "0", "--near-partition-rows", "200", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        report = out.with_name("dedup.report")
        facts = comparable_report(report / "report.json")
        assert facts["settings"].pop("hashes") == str(out.with_name("dedup.hashes"))  # where, not what
        runs[name] = (out.read_bytes(), (report / "decisions.parquet").read_bytes(), facts,
                      digest(out.with_name("dedup.hashes")))
        assert not (report / ".near-search").exists()
    assert runs["ray"] == runs["local"]
    settings = runs["local"][2]["settings"]
    assert settings["candidates_by"] == "lsh" and settings["lsh_partitions"] > 10
    assert runs["local"][2]["counts"]["dropped"].get("near_duplicate", 0) > 0


def test_a_ray_address_nobody_answers_at_is_one_line_at_once(dr_inputs, tmp_path):
    from raycluster import free_port

    started = time.monotonic()
    done = build_dr(dr_inputs, tmp_path / "dr", "--ray-address", f"127.0.0.1:{free_port()}")
    assert done.returncode == 2 and time.monotonic() - started < 60
    assert "no Ray head answers there" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_score_captions_on_the_cluster_scores_what_the_local_run_scores(cluster, tmp_path):
    from test_world import tiny_config

    from world.generate import generate_world

    world = tmp_path / "w"
    generate_world(tiny_config(world, clean_samples=60, chunk_size=16), progress=False)
    shards = sorted((world / "clean").glob("*.tar"))
    assert len(shards) > 1  # several shards: several tasks
    outputs = {}
    for name, extra in (("local", []), ("pool", ["--num-workers", "2"]), ("ray", ["--ray-address", cluster.address])):
        out = tmp_path / name
        done = qcap("score-captions", "--world", str(world), "--captions", str(world / "clean"), "--field", "text",
                    "--out", str(out), *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[name] = digest(out, skip={"config.json"})
    assert outputs["ray"] == outputs["local"] == outputs["pool"]
    summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary["overall"]["num_captions"] == 60


@pytest.mark.slow
def test_caption_and_clip_score_on_the_cluster_write_what_a_local_ray_writes(cluster, tmp_path):
    """The two model stages on Ray (caption: an actor per CoCa; clip-score: Ray Data with a CLIP
    per actor) on the two-node cluster, against the same command on a local Ray."""
    import torch
    from test_caption_job import write_shards

    from base.models import init_coca_decoder, load_model, save_checkpoint_dir
    from base.shards import read_table

    torch.manual_seed(0)
    coca = load_model("qcap-tiny-coca").model
    init_coca_decoder(coca, logit_scale=6.0)
    coca_dir = save_checkpoint_dir(coca, "qcap-tiny-coca", tmp_path / "coca")
    torch.manual_seed(3)
    clip_dir = save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", tmp_path / "clip")
    shards = write_shards(tmp_path / "curated", [4, 3, 3])
    outputs = {}
    for name, extra in (("local", ["--num-workers", "1"]), ("ray", ["--num-workers", "1", "--ray-address", cluster.address])):
        syn = tmp_path / name / "syn"
        done = qcap("caption", "--shards", str(shards), "--out", str(syn), "--checkpoint", str(coca_dir),
                    "--num-captions", "2", "--seq-len", "12", "--batch-size", "4", "--no-progress", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        clip = tmp_path / name / "clip.npy"
        done = qcap("filter", "clip-score", "--shards", str(shards), "--checkpoint", str(clip_dir), "--top-fraction",
                    "0.5", "--out", str(clip), "--no-progress", "--no-preview", "--no-histograms", "--batch-size", "4",
                    *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[name] = (digest(syn, skip={"config.json", "summary.json"}), clip.read_bytes(),
                         read_table(str(clip.with_name("clip.scores.parquet"))).to_pydict())
    assert outputs["ray"] == outputs["local"]
    assert len(outputs["local"][0]) == 4 * 3 + 1  # three shards (tar, Parquet, stats, marker) and sizes.json
