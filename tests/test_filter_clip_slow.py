"""CLIP score: SIGKILL the command (driver, Ray and all) mid-run; the re-run scores only unfinished shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_filter_clip import save_random_clip
from test_filter_support import shared_world

QCAP = str(Path(sys.executable).parent / "qcap")


@pytest.mark.slow
def test_killed_clip_score_resumes_from_its_parts(tmp_path_factory, tmp_path):
    _, raw = shared_world(tmp_path_factory)
    checkpoint = save_random_clip(tmp_path / "tiny-clip", seed=0)
    out = tmp_path / "clip.npy"
    argv = [QCAP, "filter", "clip-score", "--shards", str(raw), "--checkpoint", str(checkpoint), "--top-fraction", "0.3",
            "--out", str(out), "--batch-size", "4", "--num-cpus", "2", "--decode-size", "64", "--no-progress"]
    parts = tmp_path / "clip.scores.parquet.parts"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(parts.glob("*.parquet")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a part was written; nothing to resume"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    done = sorted(p.name for p in parts.glob("*.parquet"))
    assert done and not out.exists() and not (tmp_path / "clip.scores.parquet").exists()
    finished = {p: pq.read_table(parts / p).num_rows for p in done}

    resumed = subprocess.run(argv, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((tmp_path / "clip.report" / "report.json").read_text())
    # every candidate row is computed once: in the killed run (its parts) or now — rows that get a
    # status instead of a score (no_caption, undecodable) included, which num_scored leaves out
    total = report["counts"]["num_candidates"]
    assert report["settings"]["num_computed_now"] == total - sum(finished.values())
    assert report["settings"]["num_scored"] <= total
    assert not parts.exists()  # folded into the scores file

    # the same scores as one uninterrupted run
    clean = tmp_path / "clean" / "clip.npy"
    subprocess.run([*argv[:argv.index("--out")], "--out", str(clean), *argv[argv.index("--out") + 2:]], check=True,
                   capture_output=True)
    a = pq.read_table(tmp_path / "clip.scores.parquet").to_pandas().set_index("uid").score.sort_index()
    b = pq.read_table(clean.with_name("clip.scores.parquet")).to_pandas().set_index("uid").score.sort_index()
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-6)
    assert np.load(out).tolist() == np.load(clean).tolist()
