"""``qcap caption`` killed with SIGKILL, then run again: the output matches an uninterrupted run
(uids per shard, captions with a fixed seed), nothing lost or doubled.

The job runs as the installed ``qcap`` in its own process group and joins the module's local
Ray cluster by address (as on a cluster). Kill points: start-up (Ray joined and the model
loaded, no shard written yet), after the first shard, mid-run; and one Ray worker process
(the captioning actor, found by its ``ray::`` process title) killed mid-shard, which Ray
restarts while the job goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_caption_job import QCAP, ROOT, coca_dir, ray_address, run_cli, write_shards  # noqa: F401 - fixtures

from base.shards import iter_samples
from captioning import job

NUM_SHARDS = 8


def argv_for(shards: Path, out: Path, coca: Path, address: str) -> list[str]:
    return ["caption", "--shards", str(shards), "--out", str(out), "--checkpoint", str(coca), "--num-captions", "2",
            "--seed", "7", "--batch-size", "1", "--num-workers", "1", "--ray-address", address, "--no-progress"]


def output_of(out: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """shard file → [(uid, syn_text)] in order: what a run wrote."""
    return {tar.name: [(s.uid, s.syn_text) for s in iter_samples([str(tar)])] for tar in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_address, coca_dir):  # noqa: F811
    """The input shards and an uninterrupted run's output."""
    root = tmp_path_factory.mktemp("kill")
    shards = write_shards(root / "curated", [3] * NUM_SHARDS, start=700)
    out = root / "uninterrupted"
    proc = subprocess.run([str(QCAP), *argv_for(shards, out, coca_dir, ray_address)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = output_of(out)
    assert len(written) == NUM_SHARDS and sum(len(v) for v in written.values()) == 3 * NUM_SHARDS
    return shards, written


def start(argv: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([str(QCAP), *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)


def wait_for(proc: subprocess.Popen, ready, log_path: Path, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the job ended before {what}: " + log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} in time: " + log_path.read_text()[-3000:]
        time.sleep(0.01)


def check_matches(out: Path, reference_output, capsys, argv) -> None:
    code, _, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert not list(out.glob(".*tmp-*"))  # no temporaries left by the killed run
    assert output_of(out) == reference_output  # same uids per shard, same captions: none lost or twice
    summary = json.loads((out / job.SUMMARY_FILE).read_text())
    assert summary["images_in"] == summary["images_captioned"] == 3 * NUM_SHARDS and summary["reconciled"]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["start-up", "after-one-shard", "mid-run"])
def test_sigkill_of_the_job_then_rerun_matches_an_uninterrupted_run(tmp_path, reference, ray_address, coca_dir,  # noqa: F811
                                                                     capsys, moment):
    shards, reference_output = reference
    out = tmp_path / "syn"
    argv = argv_for(shards, out, coca_dir, ray_address)
    log_path = tmp_path / "killed.log"
    proc = start(argv, log_path)
    ready = {
        "start-up": lambda: (out / job.CONFIG_FILE).is_file(),  # Ray joined, model loaded; nothing written
        "after-one-shard": lambda: len(list(out.glob("*.done"))) >= 1,
        "mid-run": lambda: len(list(out.glob("*.done"))) >= NUM_SHARDS // 2,
    }[moment]
    try:
        wait_for(proc, ready, log_path, moment)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group, started above
        proc.wait()
    done = len(list(out.glob("*.done")))
    assert done < NUM_SHARDS, f"the kill came too late to test resuming ({done} shards done)"
    check_matches(out, reference_output, capsys, argv)


def captioning_worker_pids() -> list[int]:
    """pids of the Ray worker processes running the captioning actor (process title ray::MapWorker(...))."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split(None, 1)[0]) for line in ps.splitlines()
            if "ray::MapWorker" in line]  # Ray Data fuses read, preprocess and caption into one actor


@pytest.mark.slow
def test_sigkill_of_one_ray_worker_mid_shard_is_retried(tmp_path, reference, ray_address, coca_dir, capsys):  # noqa: F811
    shards, reference_output = reference
    out = tmp_path / "syn"
    argv = argv_for(shards, out, coca_dir, ray_address)
    log_path = tmp_path / "job.log"
    before = set(captioning_worker_pids())
    proc = start(argv, log_path)
    try:
        wait_for(proc, lambda: len(list(out.glob("*.done"))) >= 1 and set(captioning_worker_pids()) - before,
                 log_path, "captioning worker")
        victims = sorted(set(captioning_worker_pids()) - before)
        os.kill(victims[0], signal.SIGKILL)  # a worker of this job's actor pool, found above
        assert proc.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert len(list(out.glob("*.done"))) == NUM_SHARDS
    assert output_of(out) == reference_output
    summary = json.loads((out / job.SUMMARY_FILE).read_text())
    assert summary["images_in"] == summary["images_captioned"] == 3 * NUM_SHARDS and summary["reconciled"]
    # a re-run finds every shard done and agrees
    check_matches(out, reference_output, capsys, argv)
