"""Mobile/hierarchical image towers end to end: a CLIP whose image tower is timm's fastvit_mci0
(qcap-tiny-mci) trains with qcap train, saves, loads in open_clip alone, and finetunes on dense
tasks over its own stages; so does timm's resnet10t (qcap-tiny-resnet10t, make science's ladder
tower); attention-distance and towers that are neither ViT nor hierarchical are refused with one
line."""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune_data import make_depth_folder, make_seg_folder
from test_train import make_shards

from finetune.backbone import BackboneError, BackboneSource, load_backbone
from qcap.cli import main as qcap

FAST = ["--preset", "tiny", "--batch-size", "4", "--num-examples", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def mci_run(tmp_path_factory):
    """qcap train of qcap-tiny-mci: 4 steps on tiny shards (the real CLI, one thread)."""
    root = tmp_path_factory.mktemp("mci")
    make_shards(root / "d", num_shards=2, per_shard=8)
    run = root / "run"
    assert qcap(["train", "--threads", "1", "--preset", "tiny", "--model", "qcap-tiny-mci", "--data",
                 f"{root}/d/{{00000..00001}}.tar", "--out", str(run), "--batch-size", "4", "--samples-seen", "16",
                 "--workers", "0", "--tracker", "none"]) == 0
    return run


def test_a_clip_with_an_mci_tower_trains_saves_and_loads_in_open_clip(mci_run):
    import open_clip

    rows = [json.loads(line) for line in (mci_run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{mci_run / 'final'}")
    model.eval()
    assert type(model.visual).__name__ == "TimmModel" and type(model.visual.trunk).__name__ == "FastVit"
    step_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{mci_run / 'step-000004'}")
    step_model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedding = model.encode_image(images)
        torch.testing.assert_close(embedding, step_model.encode_image(images))  # the last step is the final model
    assert embedding.shape == (2, 128) and torch.isfinite(embedding).all()
    assert preprocess.transforms[0].size in (64, (64, 64))


def test_mci_backbone_gives_its_stages_and_timm_layer_groups():
    torch.set_num_threads(1)
    backbone, _ = load_backbone(BackboneSource(random="qcap-tiny-mci"))
    backbone.eval()
    images = torch.randn(2, 3, 64, 64)
    out = backbone(images)
    assert [tuple(x.shape[1:]) for x in out.levels] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    torch.testing.assert_close(out.pooled, backbone.visual(images))  # the model's own image embedding
    assert backbone.hierarchical and backbone.attention_modules() == [] and backbone.patch_size == (32, 32)
    top = backbone.num_layers + 1
    assert backbone.layer_id("visual.trunk.stem.0.conv_kxk.0.conv.weight") == 0
    ids = [backbone.layer_id(n) for n, _ in backbone.named_parameters() if ".stages." in n]
    assert ids == sorted(ids) and min(ids) > 0 and max(ids) < top  # stages in order, below the head
    assert backbone.layer_id("visual.head.proj.weight") == top
    with pytest.raises(BackboneError, match="not a multiple of the coarsest stride 32x32"):
        backbone(torch.randn(1, 3, 48, 64))


def test_dense_tasks_finetune_a_trained_mci_tower_and_attention_distance_refuses_it(mci_run, tmp_path, capsys):
    seg = make_seg_folder(tmp_path / "seg", num_train=4, num_val=2, size=(64, 64))
    out = tmp_path / "ft-seg"
    assert qcap(["finetune", "seg", "--checkpoint", str(mci_run / "final"), "--data", str(seg), "--out", str(out),
                 "--steps", "2", *FAST]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["backbone"]["kind"] == "timm-hierarchical" and 0 <= result["metrics"]["mIoU"] <= 1
    depth = make_depth_folder(tmp_path / "depth", num_train=4, num_val=2, size=(64, 64))
    assert qcap(["finetune", "depth", "--random", "qcap-tiny-mci", "--data", str(depth), "--out", str(tmp_path / "d"),
                 "--head", "fpn", "--steps", "1", *FAST]) == 0
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["metrics"]["rmse"] > 0
    capsys.readouterr()
    assert qcap(["attention-distance", "--checkpoint", str(mci_run / "final"), "--images", str(seg / "images"),
                 "--out", str(tmp_path / "attn")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no ViT attention maps to measure" in err and "FastVit" in err and len(err.splitlines()) == 1


def test_a_tower_neither_vit_nor_hierarchical_is_refused_in_one_line(tmp_path, capsys):
    import open_clip

    folder = tmp_path / "configs"
    folder.mkdir()
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    (folder / "test-tiny-eva.json").write_text(json.dumps(  # timm's Eva: every block at stride 14
        {"embed_dim": 32, "vision_cfg": {"timm_model_name": "eva02_tiny_patch14_224", "timm_model_pretrained": False,
                                         "timm_pool": "avg", "timm_proj": "linear", "image_size": 56}, "text_cfg": text}))
    open_clip.add_model_config(folder)
    seg = make_seg_folder(tmp_path / "seg", num_train=4, num_val=2)
    assert qcap(["finetune", "seg", "--random", "test-tiny-eva", "--data", str(seg), "--out", str(tmp_path / "o"),
                 *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "test-tiny-eva (random) has a TimmModel around a timm Eva image tower, neither a ViT nor a hierarchical" in err


def test_a_clip_with_a_resnet10t_tower_trains_and_finetunes_over_its_four_stages(tmp_path):
    """qcap-tiny-resnet10t: make science's ladder tower (README, calibration log) -- the real CLI, 4 steps."""
    make_shards(tmp_path / "d", num_shards=2, per_shard=8)
    run = tmp_path / "run"
    assert qcap(["train", "--threads", "1", "--preset", "tiny", "--model", "qcap-tiny-resnet10t", "--data",
                 f"{tmp_path}/d/{{00000..00001}}.tar", "--out", str(run), "--batch-size", "4", "--samples-seen", "16",
                 "--workers", "0", "--tracker", "none"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    seg = make_seg_folder(tmp_path / "seg", num_train=4, num_val=2, size=(64, 64))
    out = tmp_path / "ft-seg"
    assert qcap(["finetune", "seg", "--checkpoint", str(run / "final"), "--data", str(seg), "--out", str(out),
                 "--steps", "2", *FAST]) == 0
    result = json.loads((out / "metrics.json").read_text())
    backbone = result["backbone"]
    assert backbone["kind"] == "timm-hierarchical" and backbone["model"] == "qcap-tiny-resnet10t"
    assert backbone["channels"] == [64, 128, 256, 512] and backbone["strides"] == [4, 8, 16, 32]
    assert backbone["source"].endswith("open_clip_model.safetensors") and 0 <= result["metrics"]["mIoU"] <= 1
