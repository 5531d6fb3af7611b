"""train, slow end to end: two processes under ``accelerate launch``; a SIGKILL mid-run, then --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import QCAP, assert_resumed_from, losses, make_shards, mark_metrics

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.mark.slow
def test_two_processes_see_disjoint_samples(tmp_path):
    uids = make_shards(tmp_path / "d", num_shards=4, per_shard=8)
    run = tmp_path / "run"
    # --multi_gpu makes Accelerate start the processes with torchrun; on a CPU-only machine
    # qcap then picks Accelerate's multi-CPU mode (gloo). Batches of 8 = 4 per process.
    proc = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "train", "--preset", "tiny", "--data", f"{tmp_path}/d/{{00000..00003}}.tar",
         "--out", str(run), "--batch-size", "8", "--samples-seen", "32", "--workers", "1", "--threads", "1",
         "--record-uids", "--tracker", "none", "--log-every", "1", "--checkpoint-every", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = {}
    for rank in (0, 1):
        lines = (run / "seen" / f"rank-{rank}.tsv").read_text().splitlines()
        seen[rank] = [line.split("\t")[1] for line in lines]
        assert len(seen[rank]) == 16 and len(set(seen[rank])) == 16  # 4 steps x 4 samples, no repeats
    assert not set(seen[0]) & set(seen[1])  # Accelerate did not re-split or duplicate the streams
    assert sorted(seen[0] + seen[1]) == sorted(uids)  # one epoch: every sample exactly once
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    checkpoint = run / "step-000004"
    assert {p.name for p in checkpoint.glob("data-*.json")} == {"data-0.json", "data-1.json"}
    assert {p.name for p in checkpoint.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    assert (run / "final" / "open_clip_model.safetensors").exists()
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert last["data/samples"] == 32 and last["samples_seen"] == 32  # counters summed over both processes


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path):
    make_shards(tmp_path / "d", num_shards=4, per_shard=8, bad=(5,))
    args = ["train", "--preset", "tiny", "--data", str(tmp_path / "d"), "--batch-size", "8", "--samples-seen", "240",
            "--workers", "2", "--threads", "1", "--tracker", "none", "--log-every", "1", "--checkpoint-every", "4",
            "--caption-source", "mix:0.5", "--record-uids"]
    whole = subprocess.run([QCAP, *args, "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "b"
    proc = subprocess.Popen([QCAP, *args, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run / "step-000012" / "trainer.json").exists():  # a few checkpoints in, mid-training
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)  # the training process only; its loader workers notice and exit
    proc.wait()
    assert not (run / "final").exists()
    latest = max(int(p.name.removeprefix("step-")) for p in run.glob("step-*") if (p / "trainer.json").exists())
    assert 12 <= latest < 30
    mark_metrics(run)
    resumed = subprocess.run([QCAP, *args, "--out", str(run), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = losses(tmp_path / "a"), losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 31))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5, (step, want[step], got[step])
    assert_resumed_from(run, latest)
    # the audit of trained samples is the same too: lines after the checkpoint were dropped
    assert (tmp_path / "a" / "seen" / "rank-0.tsv").read_text() == (run / "seen" / "rank-0.tsv").read_text()
