"""Exit hygiene: the light commands never die at exit.

A fresh clone's ``make test`` once failed because ``qcap shards verify`` printed its correct
result and then aborted (exit -6, "terminate called without an active exception"): pyarrow read
a Python file handle with its thread pools, and those threads were still alive while the
interpreter tore down — about one process in seven that read a shard's Parquet. One process
cannot show a one-in-seven fault, so this test starts many, of every light command that reads
shards, uid files or Parquet, and requires every one to exit as it should: 80 in the fast suite
(a one-in-seven fault escapes them with probability (6/7)^80 < 1e-5), 400 in ``make test-all``
(a one-in-fifty fault escapes those with probability 3e-4).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_jpeg, make_uid

QCAP = str(Path(sys.executable).parent / "qcap")


def _folder(root: Path) -> Path:
    from base.shards import Sample, ShardWriter, finalize_folder

    folder = root / "shards"
    for shard in range(3):
        with ShardWriter(folder, shard) as writer:
            for i in range(12):
                n = shard * 100 + i
                meta = {"original_width": 320, "original_height": 240}
                writer.write(Sample(key=f"{n:06d}", uid=make_uid(n), image=make_jpeg(seed=n), text=f"a red circle number {i} on the grass", meta=meta))
            writer.write(Sample(key=f"{shard * 100 + 99:06d}", uid=make_uid(shard * 100 + 99), status="http_404", error_message="404"))
    finalize_folder(folder)
    return folder


@pytest.mark.parametrize("num_processes", [80, pytest.param(400, marks=pytest.mark.slow)])
def test_many_light_processes_exit_cleanly(tmp_path, num_processes):
    folder = _folder(tmp_path)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "QCAP_LOG_LEVEL": "WARNING"}
    first = subprocess.run([QCAP, "filter", "basic", "--shards", str(folder), "--out", str(tmp_path / "basic.npy"),
                            "--no-preview", "--no-histograms", "--no-progress"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    uids = str(tmp_path / "basic.npy")

    commands: list[list[str]] = []
    for n in range(num_processes):
        kind = n % 10
        if kind in (0, 1, 2):
            commands.append([QCAP, "shards", "info", str(folder), "--json"])
        elif kind in (3, 4, 5):
            commands.append([QCAP, "shards", "verify", str(folder)])
        elif kind in (6, 7):
            commands.append([QCAP, "uids", "info", uids, "--shards", str(folder)])
        elif kind == 8:
            commands.append([QCAP, "filter", "basic", "--shards", str(folder), "--out", str(tmp_path / f"b{n}" / "basic.npy"),
                             "--no-preview", "--no-histograms", "--no-progress"])
        else:
            commands.append([QCAP, "reshard", "--shards", str(folder), "--subset", uids, "--out", str(tmp_path / f"r{n}"), "--no-progress"])

    def run(argv: list[str]) -> tuple[list[str], int, str]:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        return argv, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, commands))

    assert len(results) == num_processes
    abnormal = [(argv[1:3], code, err.strip().splitlines()[-1:] if err.strip() else []) for argv, code, err in results
                if code != 0 or "terminate called" in err or "Traceback" in err]
    assert not abnormal, f"{len(abnormal)} of {num_processes} processes exited abnormally: {abnormal[:5]}"
