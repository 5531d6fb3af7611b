"""train on two machines: two ``accelerate launch`` commands on loopback, one process each.

Each command is one "machine" (``--num_machines 2 --machine_rank 0|1 --main_process_ip
127.0.0.1``); on a CPU-only host ``--multi_gpu`` makes Accelerate start torchrun with
``--nnodes 2`` and static rendezvous, and qcap picks Accelerate's multi-CPU mode (gloo).
They train, checkpoint, are SIGKILLed (every process of both machines) and resumed by a new
pair; every epoch, the two machines together train on every sample exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import assert_resumed_from, losses, make_shards, mark_metrics

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1",
       "RAY_DISABLE_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Machines:
    """Two ``accelerate launch`` commands, machine ranks 0 and 1, rendezvous on 127.0.0.1."""

    def __init__(self, logs: Path, module_args: list[str], *, cwds: tuple[Path, Path] | None = None) -> None:
        port = free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.procs: list[subprocess.Popen] = []
        for rank in (0, 1):
            cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   "--mixed_precision", "no", "--dynamo_backend", "no", *module_args]
            with open(logs / f"machine-{rank}.out", "w") as out, open(logs / f"machine-{rank}.err", "w") as err:
                # a session of its own: the test kills a machine as a whole, and nothing outlives it
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=ENV, start_new_session=True,
                                                   cwd=cwds[rank] if cwds else None))

    def stderr(self, rank: int) -> str:
        return (self.logs / f"machine-{rank}.err").read_text()[-3000:]

    def wait(self, timeout: float = 400) -> list[int]:
        deadline = time.time() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"no end in {timeout} s:\n{self.stderr(0)}\n{self.stderr(1)}") from None
        return [proc.returncode for proc in self.procs]

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def kill(self) -> None:
        """SIGKILL every process of both machines: torchrun starts each training process in a
        session of its own, so each launcher's process group and each descendant's group."""
        import psutil

        groups = set()
        for proc in self.procs:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                groups.add(os.getpgid(proc.pid))
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error, ProcessLookupError):
                        groups.add(os.getpgid(child.pid))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()


@pytest.fixture
def machines():
    started: list[Machines] = []

    def start(*args, **kwargs) -> Machines:
        pair = Machines(*args, **kwargs)
        started.append(pair)
        return pair

    yield start
    for pair in started:  # a failed assertion leaves nothing running
        if any(proc.poll() is None for proc in pair.procs):
            pair.kill()


def train_args(data: Path, out: Path | str, *, batch_size: int, samples_seen: int, checkpoint_every: int) -> list[str]:
    return ["-m", "train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--precision", "fp32",
            "--batch-size", str(batch_size), "--samples-seen", str(samples_seen), "--workers", "1", "--threads", "1",
            "--record-uids", "--tracker", "none", "--log-every", "1", "--checkpoint-every", str(checkpoint_every)]


def read_seen(run: Path) -> dict[int, list[tuple[int, str]]]:
    """Each machine's audit of trained samples: (batch index, uid) in training order."""
    seen = {}
    for rank in (0, 1):
        lines = (run / "seen" / f"rank-{rank}.tsv").read_text().splitlines()
        seen[rank] = [(int(batch), uid) for batch, uid in (line.split("\t") for line in lines)]
    return seen


def epoch_shares(seen: list[str], share: int) -> list[list[str]]:
    """A process's trained uids cut into its epochs: every epoch it reads its own ``share``
    samples (its shards of that epoch's permutation), the next epoch follows at once."""
    return [seen[start : start + share] for start in range(0, len(seen), share)]


@pytest.mark.slow  # ~185 s: three pairs of machines
def test_two_machines_train_checkpoint_are_killed_and_resume_exactly(tmp_path, machines):
    # 4 shards of 4 samples: each epoch, each machine reads 2 shards (8 samples). A global
    # batch of 4 is 2 per machine; 32 samples = 2 epochs = 8 steps, a checkpoint every 2.
    uids = make_shards(tmp_path / "d", num_shards=4, per_shard=4)
    shard_of = {uid: index // 4 for index, uid in enumerate(uids)}
    args = dict(batch_size=4, samples_seen=32, checkpoint_every=2)

    def assert_every_sample_once_per_epoch(run: Path) -> None:
        seen = read_seen(run)
        for rank in (0, 1):
            assert [batch for batch, _ in seen[rank]] == [i // 2 for i in range(16)]  # 8 batches of 2
        epochs = {rank: epoch_shares([uid for _, uid in seen[rank]], 8) for rank in (0, 1)}
        assert len(epochs[0]) == len(epochs[1]) == 2
        for epoch in (0, 1):
            mine, theirs = epochs[0][epoch], epochs[1][epoch]
            assert sorted(mine + theirs) == sorted(uids)  # none twice, none missing
            for share in (mine, theirs):  # the split is by shard: two whole shards per machine
                shards = [shard_of[uid] for uid in share]
                assert len(set(shards)) == 2 and all(shards.count(s) == 4 for s in set(shards))

    whole = tmp_path / "whole"
    pair = machines(tmp_path / "logs-whole", train_args(tmp_path / "d", whole, **args))
    assert pair.wait() == [0, 0], pair.stderr(0) + pair.stderr(1)
    assert_every_sample_once_per_epoch(whole)
    config = json.loads((whole / "config.json").read_text())
    assert config["world_size"] == 2 and config["total_steps"] == 8
    assert sorted(p.name for p in whole.glob("step-*")) == ["step-000006", "step-000008"]  # the newest 2 kept
    for step in (6, 8):
        checkpoint = whole / f"step-{step:06d}"
        assert {p.name for p in checkpoint.glob("data-*.json")} == {"data-0.json", "data-1.json"}
        assert {p.name for p in checkpoint.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
        assert (checkpoint / "open_clip_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
        trainer = json.loads((checkpoint / "trainer.json").read_text())
        assert trainer["step"] == step and trainer["world_size"] == 2 and trainer["samples_seen"] == 4 * step
        for rank in (0, 1):  # each machine's position: its own samples, 2 per step
            assert json.loads((checkpoint / f"data-{rank}.json").read_text())["counts"]["samples"] == 2 * step
    assert not [p.name for p in whole.iterdir() if p.name.startswith(".")]  # no partial folder, no marker left
    assert (whole / "final" / "open_clip_model.safetensors").exists()
    assert sorted(losses(whole)) == list(range(1, 9))

    # The same run, both machines SIGKILLed once a checkpoint exists and they trained past it.
    run = tmp_path / "killed"
    pair = machines(tmp_path / "logs-killed", train_args(tmp_path / "d", run, **args))
    deadline = time.time() + 300
    while True:
        assert pair.alive(), "training ended before it could be killed:\n" + pair.stderr(0) + pair.stderr(1)
        assert time.time() < deadline, "no checkpoint after 300 s"
        if (run / "step-000004" / "trainer.json").exists():
            seen = read_seen(run)  # both machines took a batch past the checkpoint's 4
            if all(seen[rank] and seen[rank][-1][0] >= 4 for rank in (0, 1)):
                break
        time.sleep(0.05)
    pair.kill()
    assert not (run / "final").exists()
    latest = max(int(p.name.removeprefix("step-")) for p in run.glob("step-*") if (p / "trainer.json").exists())
    assert 4 <= latest < 8
    assert all(max(batch for batch, _ in read_seen(run)[rank]) >= latest for rank in (0, 1))  # past the checkpoint
    mark_metrics(run)

    pair = machines(tmp_path / "logs-resumed", [*train_args(tmp_path / "d", run, **args), "--resume"])
    assert pair.wait() == [0, 0], pair.stderr(0) + pair.stderr(1)
    assert_resumed_from(run, latest)  # rows up to the checkpoint are the killed run's, the rest new
    want, got = losses(whole), losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 9))  # ends at the same step
    for step in want:  # gloo's all-reduce of two machines is exact: the uninterrupted losses
        assert abs(got[step] - want[step]) < 1e-5, (step, want[step], got[step])
    # what each machine trained: before the kill up to the checkpoint, then after it
    assert_every_sample_once_per_epoch(run)
    for rank in (0, 1):
        assert (run / "seen" / f"rank-{rank}.tsv").read_text() == (whole / "seen" / f"rank-{rank}.tsv").read_text()
    assert json.loads((run / "eval.json").read_text())["step"] == 8
    assert (run / "final" / "open_clip_model.safetensors").exists()


@pytest.mark.slow  # ~60 s
def test_two_machines_with_shards_that_do_not_split_evenly(tmp_path, machines):
    """9 samples in 3 shards of 3 over 2 machines: the loader splits shards, not samples, so
    machine 0 reads 2 shards (6 samples) every epoch and machine 1 one shard (3). Both train 3
    samples a step, so machine 1 runs through its epochs twice as fast (what the loader documents:
    each process's epochs follow each other at once). Every epoch both finished holds every
    sample exactly once; nothing is dropped or padded, and samples seen follow the step count."""
    uids = make_shards(tmp_path / "d", num_shards=3, per_shard=3)
    shard_of = {uid: index // 3 for index, uid in enumerate(uids)}
    run = tmp_path / "run"
    # 18 samples (two passes' worth) = 3 steps of 6 = 9 samples on each machine
    pair = machines(tmp_path / "logs", train_args(tmp_path / "d", run, batch_size=6, samples_seen=18,
                                                  checkpoint_every=3))
    assert pair.wait() == [0, 0], pair.stderr(0) + pair.stderr(1)
    rows = read_seen(run)
    assert [batch for batch, _ in rows[0]] == [batch for batch, _ in rows[1]] == [i // 3 for i in range(9)]
    seen = {rank: [uid for _, uid in rows[rank]] for rank in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 9
    first, second = epoch_shares(seen[0], 6)  # machine 0: one epoch and half of the next
    assert len(first) == 6 and len(second) == 3
    one, two, three = epoch_shares(seen[1], 3)  # machine 1: three epochs of one shard
    assert sorted(first + one) == sorted(uids)  # epoch 0, finished by both: every sample once
    for share in (one, two, three):
        assert len({shard_of[uid] for uid in share}) == 1 and len(set(share)) == 3  # a whole shard
    assert len({shard_of[uid] for uid in first}) == 2 and len(set(first)) == 6  # two whole shards
    # epoch 1: machine 1's shard and the part of machine 0's two it reached are disjoint
    assert len(set(second)) == 3 and not set(second) & set(two)
    assert {shard_of[uid] for uid in second} <= {0, 1, 2} - {shard_of[two[0]]}
    final = json.loads((run / "step-000003" / "trainer.json").read_text())
    assert final["samples_seen"] == 18


def test_machines_without_a_shared_run_folder_stop_before_training(tmp_path, machines):  # ~40 s, fast suite
    """Each machine resolves the relative --out in its own folder, as machines with a local disk
    each would: the run stops before its first step with one line saying why, not at the first
    checkpoint with a missing partial folder."""
    make_shards(tmp_path / "d", num_shards=4, per_shard=4)
    cwds = (tmp_path / "machine-0", tmp_path / "machine-1")
    for cwd in cwds:
        cwd.mkdir()
    pair = machines(tmp_path / "logs", train_args(tmp_path / "d", "run", batch_size=4, samples_seen=32,
                                                  checkpoint_every=2), cwds=cwds)
    codes = pair.wait()
    assert codes[0] != 0 and codes[1] != 0
    for rank in (0, 1):
        assert "process(es) [1] of 2 do not see the run folder" in pair.stderr(rank)
        assert "internal error" not in pair.stderr(rank)
    main = cwds[0] / "run"
    assert not list(main.glob("step-*")) and not list(main.glob(".step-*")) and not (main / "metrics.jsonl").exists()
    assert not list(main.glob(".shared-*"))  # the marker is removed


@pytest.mark.slow  # ~90 s: two pairs of machines
def test_finetune_on_two_machines_stops_resumes_and_writes_metrics_once(tmp_path, machines):
    """qcap finetune seg on two machines: the same Trainer, a MapStream split by global rank."""
    import numpy as np
    from PIL import Image
    from test_finetune_data import make_seg_folder

    data = make_seg_folder(tmp_path / "seg", num_train=8, num_val=5)  # 5 eval images: shards of 3 and 2
    out = tmp_path / "ft"
    args = ["-m", "finetune", "finetune", "seg", "--random", "qcap-tiny-clip", "--data", str(data), "--out", str(out),
            "--preset", "tiny", "--batch-size", "2", "--steps", "4", "--checkpoint-every", "2", "--workers", "0",
            "--num-examples", "1"]
    pair = machines(tmp_path / "logs-stopped", [*args, "--stop-at-step", "2"])  # as a job time limit would
    assert pair.wait() == [0, 0], pair.stderr(0) + pair.stderr(1)
    checkpoint = out / "step-000002"
    assert {p.name for p in checkpoint.glob("data-*.json")} == {"data-0.json", "data-1.json"}
    assert {p.name for p in checkpoint.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    assert json.loads((checkpoint / "trainer.json").read_text())["world_size"] == 2
    assert not (out / "metrics.json").exists() and not (out / "final").exists()  # not finished: no results yet
    mark_metrics(out)

    pair = machines(tmp_path / "logs-resumed", [*args, "--resume"])
    assert pair.wait() == [0, 0], pair.stderr(0) + pair.stderr(1)
    assert_resumed_from(out, 2)
    assert sorted(losses(out)) == [1, 2, 3, 4]
    result = json.loads((out / "metrics.json").read_text())
    assert result["training"]["steps"] == 4 and result["training"]["processes"] == 2
    assert result["training"]["samples_seen"] == 4 * 2 * 2  # both machines' batches, before and after the stop
    labelled = sum(int((np.asarray(Image.open(p)) != 255).sum()) for p in (data / "annotations" / "validation").glob("*.png"))
    assert result["metrics"]["num_pixels"] == labelled  # both machines' evaluation shards were summed
    assert (out / "final" / "model.safetensors").exists() and (out / "examples.png").exists()
    assert sorted(p.name for p in out.glob("metrics*")) == ["metrics.json", "metrics.jsonl"]  # one, no partial copy
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
