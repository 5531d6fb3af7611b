"""qcap finetune under ``accelerate launch`` with two CPU processes: one loop, sharded evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_finetune_data import make_seg_folder

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.mark.slow
def test_two_processes_train_and_sum_their_evaluation(tmp_path):
    data = make_seg_folder(tmp_path / "seg", num_train=8, num_val=5)  # 5 eval images: shards of 3 and 2
    out = tmp_path / "ft"
    proc = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "finetune", "finetune", "seg", "--random", "qcap-tiny-clip",
         "--data", str(data), "--out", str(out), "--preset", "tiny", "--batch-size", "2", "--steps", "3",
         "--num-examples", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "metrics.json").read_text())
    assert result["training"]["processes"] == 2 and result["training"]["samples_seen"] == 3 * 2 * 2
    labelled = sum(int((np.asarray(Image.open(p)) != 255).sum()) for p in (data / "annotations" / "validation").glob("*.png"))
    assert result["metrics"]["num_pixels"] == labelled  # both processes' shards were summed
    assert {p.name for p in (out / "step-000003").glob("data-*.json")} == {"data-0.json", "data-1.json"}
