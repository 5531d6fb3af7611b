"""qcap finetune det end to end: the world's COCO-layout detection set, torchvision's Mask R-CNN on a
tiny ViT (simple feature pyramid) and on a tiny fastvit_mci0 tower (FPN over its stages), the
train stage's Trainer with checkpoints and --resume, COCOeval's metrics in metrics.json."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qcap.cli import main as qcap

FAST = ["--preset", "tiny", "--batch-size", "4", "--num-examples", "2", "--workers", "0"]
METRICS = {f"{kind}_{name}" for kind in ("bbox", "segm") for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")}


@pytest.fixture(scope="module")
def det_data(tmp_path_factory):
    from world.config import WorldConfig
    from world.generate import generate_world

    torch.set_num_threads(1)
    world = tmp_path_factory.mktemp("w") / "world"
    generate_world(WorldConfig(out=world, num_samples=40, clean_samples=2, eval_samples=4, eval_image_size=64,
                               clean_image_size=48, det_samples=12, workers=1), progress=False)
    return world / "eval" / "det"


def _check_metrics(out, model: str, *, steps: int) -> dict:
    result = json.loads((out / "metrics.json").read_text())
    assert result["task"] == "det" and result["head"]["name"] == "maskrcnn" and result["backbone"]["model"] == model
    assert result["config"]["head"] == "maskrcnn" and result["training"]["steps"] == steps
    assert result["data"]["num_train"] == 9 and result["data"]["num_eval"] == 3
    metrics = result["metrics"]
    assert set(metrics) >= METRICS and metrics["num_images"] == 3
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AR100"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["bbox_APl"] is None  # 64-px world: no object is 'large' (COCO's -1, written as null)
    parts = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*parts)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= logged
    with Image.open(out / "examples.png") as picture:
        assert picture.width > picture.height / 2
    assert (out / "final" / "model.safetensors").is_file()
    return result


def test_det_on_a_tiny_vit_reports_coco_metrics_of_its_exported_model(tmp_path, det_data, capsys):
    out = tmp_path / "vit"
    assert qcap(["finetune", "det", "--random", "qcap-tiny-clip", "--data", str(det_data), "--out", str(out),
                 "--steps", "2", *FAST]) == 0
    assert "bbox_AP" in capsys.readouterr().out
    result = _check_metrics(out, "qcap-tiny-clip", steps=2)
    assert result["backbone"]["kind"] == "open_clip" and (out / "step-000002" / "trainer.json").is_file()

    # the exported weights load into the same detector, which predicts in letterboxed pixels
    from safetensors.torch import load_file

    from finetune.backbone import BackboneSource, load_backbone
    from finetune.detection import DetectionModel
    from finetune.heads import HeadConfig

    backbone, _ = load_backbone(BackboneSource(random="qcap-tiny-clip"))
    model = DetectionModel(backbone, HeadConfig(name="maskrcnn", neck_channels=32, channels=32), 10, image_size=64,
                           mean=result["data"]["mean"], std=result["data"]["std"])
    model.load_state_dict(load_file(str(out / "final" / "model.safetensors")))
    model.eval()
    with torch.no_grad():
        (pred,) = model(torch.rand(1, 3, 64, 64))
    assert pred["masks"].shape[1:] == (1, 64, 64) and len(pred["boxes"]) == len(pred["scores"])


def test_det_on_a_tiny_fastvit_mci_tower(tmp_path, det_data):
    out = tmp_path / "mci"
    assert qcap(["finetune", "det", "--random", "qcap-tiny-mci", "--data", str(det_data), "--out", str(out),
                 "--steps", "2", *FAST]) == 0
    result = _check_metrics(out, "qcap-tiny-mci", steps=2)
    assert result["backbone"]["kind"] == "timm-hierarchical" and result["backbone"]["strides"] == [4, 8, 16, 32]


def test_det_refuses_a_head_and_a_folder_that_do_not_fit(tmp_path, det_data, capsys):
    out = str(tmp_path / "bad")
    assert qcap(["finetune", "det", "--random", "qcap-tiny-clip", "--data", str(det_data), "--out", out,
                 "--head", "upernet", *FAST]) == 2
    assert "--head upernet does not fit task det" in capsys.readouterr().err
    assert qcap(["finetune", "det", "--random", "qcap-tiny-clip", "--data", str(det_data.parent / "missing"),
                 "--out", out, *FAST]) == 2
    err = capsys.readouterr().err
    assert "no such dataset folder" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_stopped_det_run_resumes_to_the_same_metrics(tmp_path, det_data, capsys):
    args = ["finetune", "det", "--random", "qcap-tiny-clip", "--data", str(det_data), "--steps", "3", *FAST]
    assert qcap([*args, "--out", str(tmp_path / "whole")]) == 0
    stopped = tmp_path / "stopped"
    assert qcap([*args, "--out", str(stopped), "--checkpoint-every", "1", "--stop-at-step", "2"]) == 0
    assert "--resume" in capsys.readouterr().out and not (stopped / "metrics.json").exists()
    assert qcap([*args, "--out", str(stopped), "--checkpoint-every", "1", "--resume"]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((stopped / "metrics.json").read_text())
    assert resumed["training"]["last"]["loss"] == pytest.approx(whole["training"]["last"]["loss"], rel=1e-5)
    defined = {k: v for k, v in whole["metrics"].items() if v is not None}
    assert {k for k, v in resumed["metrics"].items() if v is not None} == set(defined)
    assert {k: resumed["metrics"][k] for k in defined} == pytest.approx(defined, rel=1e-5)
