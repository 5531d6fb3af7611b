"""``qcap train`` on hostile input: bad samples are skipped and counted, a broken shard or a
tampered ``--resume`` checkpoint is ONE line (exit 2), also from inside DataLoader workers
(the default ``--workers 1``), and a pickle in a checkpoint never runs.

Everything is real: shards written with ShardWriter and then damaged with tarfile, the tiny
open_clip CLIP, the command's own entry point (``run_guarded`` as ``qcap`` dispatches it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import make_jpeg, make_uid

from base.shards import Sample, ShardWriter, finalize_folder

FORBIDDEN = ("Traceback", "DataLoader worker", "weights_only=False", "Original Traceback")


def good_shard(folder: Path, shard_id: int, n: int, start: int) -> None:
    with ShardWriter(folder, shard_id) as writer:
        for k in range(n):
            index = start + k
            writer.write(Sample(key=f"{shard_id:05d}{k:04d}", uid=make_uid(index), image=make_jpeg(40, 32, seed=index),
                                text=f"web alt text {index}"))


def rewrite_members(tar_path: Path, replace: dict[str, bytes | None]) -> None:
    """Rewrite a tar with some members' bytes replaced (None: member dropped)."""
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for info, data in members:
            if info.name in replace:
                data = replace[info.name]
                if data is None:
                    continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    from base.cli import run_guarded
    from train.run import main

    code = run_guarded(main, ["--threads", "1", *argv], "qcap train")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("qcap train: error:")]
    assert len(lines) == 1, err
    assert not any(word in err for word in FORBIDDEN), err
    return lines[0]


def test_bad_samples_are_skipped_and_counted_in_workers(tmp_path, capsys):
    data = tmp_path / "data"
    good_shard(data, 0, 6, 0)
    good_shard(data, 1, 6, 100)
    finalize_folder(data)
    # shard 1: an undecodable image, a sample without its image, a KEY.json that is a list
    rewrite_members(data / "00001.tar", {"000010000.jpg": b"\xff\xd8 not a jpeg", "000010001.jpg": None,
                                         "000010002.json": b"[1, 2, 3]"})
    code, out, err = run(["--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--workers", "2",
                          "--batch-size", "3", "--samples-seen", "18", "--log-every", "1", "--tracker", "none"], capsys)
    assert code == 0, err
    assert not any(word in err for word in FORBIDDEN), err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "loss" in row][-1]
    skipped = {k.removeprefix("data/skipped_"): v for k, v in last.items() if k.startswith("data/skipped_")}
    # the stream is endless (epochs repeat): each pass over shard 1 meets each bad sample once
    assert set(skipped) == {"undecodable", "no_image", "bad_json"} and all(v >= 1 for v in skipped.values())
    assert last["data/samples"] == 18
    drawn = 18 + int(sum(skipped.values()))
    assert f"samples drawn {drawn} = trained 18 + skipped" in out  # every draw counted


@pytest.mark.parametrize("workers", [0, 1])
def test_a_broken_shard_is_one_line_from_inside_loader_workers(tmp_path, capsys, workers):
    data = tmp_path / "data"
    good_shard(data, 0, 4, 0)
    good_shard(data, 1, 4, 100)
    finalize_folder(data)
    raw = (data / "00001.tar").read_bytes()
    (data / "00001.tar").write_bytes(raw[: len(raw) // 2 + 100])  # cut inside the tar
    code, _, err = run(["--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--workers",
                        str(workers), "--batch-size", "2", "--samples-seen", "16", "--tracker", "none",
                        "--chunk-shards", "2"], capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert "00001.tar" in line and "the samples after it are lost" in line


def test_the_worker_error_unwrap_keeps_the_original_message():
    from torch.utils.data import DataLoader, IterableDataset

    from base.shards import ShardError
    from train.loader import _unwrapped

    class Raises(IterableDataset):
        def __iter__(self):
            raise ShardError("shard x.tar: the original message")
            yield  # a generator

    with pytest.raises(ShardError) as info:
        list(_unwrapped(DataLoader(Raises(), batch_size=None, num_workers=1)))
    assert str(info.value) == "shard x.tar: the original message"


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.command = f"echo pwned > {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_tampered_resume_checkpoint_is_one_line_and_runs_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    for shard in range(2):
        good_shard(data, shard, 4, 100 * shard)
    finalize_folder(data)
    base = ["--preset", "tiny", "--data", str(data), "--batch-size", "2", "--samples-seen", "16", "--tracker",
            "none", "--workers", "0", "--checkpoint-every", "2"]
    code, _, err = run([*base, "--out", str(tmp_path / "run"), "--stop-at-step", "2"], capsys)
    assert code == 0, err
    step = tmp_path / "run" / "step-000002"
    assert step.is_dir()
    marker = tmp_path / "MARKER"
    evil = io.BytesIO()
    torch.save({"state": RunsShell(marker)}, evil)
    weights = next(step.glob("*.safetensors"))
    tampers = {
        "optimizer.pt": (evil.getvalue(), "would run code"),
        "rng-0.pt": (b"garbage, not a torch file", "not a readable checkpoint"),
        "scheduler.pt": (b"", "not a readable checkpoint"),
        weights.name: (weights.read_bytes()[:200], "truncated or corrupt"),
        "trainer.json": (b"[1, 2]", "must hold a JSON object"),
        "data-0.json": (b"{not json", "not readable JSON"),
    }
    pristine = tmp_path / "pristine"
    shutil.copytree(step, pristine)
    for name, (payload, message) in tampers.items():
        (step / name).write_bytes(payload)  # the run records its --out: tamper in place, then restore
        code, _, err = run([*base, "--out", str(tmp_path / "run"), "--resume"], capsys)
        assert code == 2, (name, err)
        line = one_error_line(err)
        assert message in line and name in line, (name, line)
        assert not marker.exists(), f"{name}: resuming ran the pickle's code"
        shutil.copy(pristine / name, step / name)
    # an intact copy still resumes and finishes
    code, _, err = run([*base, "--out", str(tmp_path / "run"), "--resume"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "final").is_dir()


def test_a_sizes_json_that_lies_stops_training_with_one_line(tmp_path, capsys):
    """sizes.json sets the epoch and the default samples seen: one that claims 1000 samples for a
    tar of 4 once trained on 1000 copies of them and exited 0."""
    data = tmp_path / "data"
    good_shard(data, 0, 4, 0)
    good_shard(data, 1, 4, 100)
    finalize_folder(data)
    (data / "sizes.json").write_text(json.dumps({"00000.tar": 1000, "00001.tar": 4}))
    code, _, err = run(["--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--workers", "1",
                        "--batch-size", "2", "--samples-seen", "12", "--tracker", "none", "--chunk-shards", "1"], capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert "00000.tar" in line and "sizes.json says 1000 samples" in line and "hold 4" in line
