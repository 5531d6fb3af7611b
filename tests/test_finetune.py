"""qcap finetune / qcap attention-distance end to end: the real CLI, real tiny open_clip models,
the train stage's Trainer, tiny real datasets in the standard layouts."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_finetune_data import make_cls_folder, make_depth_folder, make_seg_folder

from base.models import load_model, save_checkpoint_dir
from qcap.cli import main as qcap

FAST = ["--preset", "tiny", "--batch-size", "4", "--num-examples", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A qcap-tiny-clip checkpoint folder (random weights, saved the way training saves them)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    return save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", folder)


def _load_final(out, task_model):
    from safetensors.torch import load_file

    task_model.load_state_dict(load_file(str(out / "final" / "model.safetensors")))
    return task_model.eval()


def test_segmentation_runs_through_the_trainer_and_reports_true_metrics(tmp_path, checkpoint, capsys):
    data = make_seg_folder(tmp_path / "seg", num_train=8, num_val=3)
    out = tmp_path / "ft"
    code = qcap(["finetune", "seg", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--steps", "3", *FAST])
    assert code == 0
    assert "mIoU" in capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    cfg = result["config"]
    assert cfg["task"] == "seg" and cfg["checkpoint"] == str(checkpoint) and cfg["neck_channels"] == 32  # the preset's
    assert (cfg["head"], cfg["image_size"], cfg["reduce_zero_label"]) == ("upernet", 64, False)  # resolved defaults
    assert result["head"]["name"] == "upernet" and result["backbone"]["model"] == "qcap-tiny-clip"
    assert result["training"]["steps"] == 3 and result["data"]["num_train"] == 8
    metrics = result["metrics"]
    assert set(metrics) >= {"mIoU", "mAcc", "pixel_accuracy", "mIoU_foreground"}
    assert set(result["details"]["per_class_iou"]) == {"background", "red", "green"}
    # checkpoints and logs of the shared loop
    assert (out / "step-000003" / "trainer.json").is_file() and (out / "metrics.jsonl").is_file()
    with Image.open(out / "examples.png") as picture:
        assert picture.width > picture.height / 2  # input | truth | prediction, 2 rows

    # the reported numbers are those of the exported model, measured independently here
    from finetune.backbone import BackboneSource, load_backbone
    from finetune.data import Preprocess, SegmentationFolder
    from finetune.heads import DenseModel, HeadConfig

    backbone, _ = load_backbone(BackboneSource(random="qcap-tiny-clip"))
    model = _load_final(out, DenseModel(backbone, HeadConfig(neck_channels=32, channels=32), 3))
    pre = Preprocess(64, tuple(result["data"]["mean"]), tuple(result["data"]["std"]))
    preds, labels = [], []
    with torch.no_grad():
        for image, label in SegmentationFolder(data, "validation", pre, train=False):
            logits = torch.nn.functional.interpolate(model(image[None]), size=label.shape, mode="bilinear")
            preds.append(logits.argmax(1)[0].numpy())
            labels.append(label.numpy())
    pred, true = np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in labels])
    keep = true != 255
    ious = []
    for c in range(3):
        inter = np.sum((pred[keep] == c) & (true[keep] == c))
        union = np.sum((pred[keep] == c) | (true[keep] == c))
        if union:
            ious.append(inter / union)
    assert metrics["mIoU"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert metrics["pixel_accuracy"] == pytest.approx(np.mean(pred[keep] == true[keep]), abs=1e-6)

    # a second run into the same folder is refused unless it resumes
    assert qcap(["finetune", "seg", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--steps", "3", *FAST]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert qcap(["finetune", "seg", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--steps", "3", "--resume", *FAST]) == 0


def test_every_task_runs_on_the_embedded_worlds_eval_sets(tmp_path, checkpoint):
    """The world's W/eval/{seg,depth,cls} are read as the public layouts are: a few steps of each
    task, with the metrics taken over the world's own classes, depth scale and validation split."""
    from world.config import WorldConfig
    from world.generate import generate_world

    world = tmp_path / "w"
    generate_world(WorldConfig(out=world, num_samples=40, clean_samples=4, eval_samples=12, eval_image_size=48,
                               clean_image_size=48, plant_each=0, workers=1), progress=False)
    results = {}
    for task in ("seg", "depth", "cls"):
        out = tmp_path / task
        assert qcap(["finetune", task, "--checkpoint", str(checkpoint), "--data", str(world / "eval" / task),
                     "--out", str(out), "--steps", "2", *FAST]) == 0
        results[task] = json.loads((out / "metrics.json").read_text())
        assert results[task]["data"]["num_train"] == 9 and results[task]["data"]["num_eval"] == 3
        assert (out / "examples.png").is_file()
    classes = json.loads((world / "eval" / "seg" / "classes.json").read_text())["classes"]
    seg = results["seg"]
    assert set(seg["details"]["per_class_iou"]) == set(classes) and len(classes) == 11
    labelled = sum(int((np.asarray(Image.open(p)) != 255).sum())
                   for p in (world / "eval" / "seg" / "annotations" / "validation").glob("*.png"))
    assert seg["metrics"]["num_pixels"] == labelled == 3 * 48 * 48  # the world never draws the ignore label
    assert 0 <= seg["metrics"]["mIoU"] <= 1 and "mIoU_foreground" in seg["metrics"]
    depth = results["depth"]
    assert depth["config"]["depth_scale"] == 1000.0  # from the world's depth.json (millimetres)
    assert depth["metrics"]["num_images"] == 3 and depth["metrics"]["rmse"] > 0
    cls = results["cls"]
    names = (world / "eval" / "cls" / "classnames.txt").read_text().split()
    assert cls["metrics"]["num_samples"] == 3 and len(names) == 10 and 0 <= cls["metrics"]["top5"] <= 1


@pytest.mark.parametrize(("head", "model"), [("fpn", "qcap-tiny-clip"), ("linear", "qcap-tiny-coca"), ("dpt", "qcap-tiny-clip")])
def test_every_dense_head_trains_on_depth(tmp_path, head, model):
    data = make_depth_folder(tmp_path / "depth", num_train=4, num_val=2)
    out = tmp_path / f"ft-{head}"
    size = 48 if head == "fpn" else 64  # 48 px: a 6x6 grid, position embeddings resampled from 8x8
    assert qcap(["finetune", "depth", "--random", model, "--data", str(data), "--out", str(out),
                 "--head", head, "--steps", "2", "--image-size", str(size), *FAST]) == 0
    result = json.loads((out / "metrics.json").read_text())
    metrics = result["metrics"]
    assert result["data"]["image_size"] == size
    assert result["head"]["name"] == head and result["backbone"]["source"] == "random"
    assert result["backbone"]["model"] == model  # CoCa's image tower is a ViT too
    assert metrics["num_images"] == 2 and 0 < metrics["rmse"] < 10 and 0 <= metrics["delta1"] <= 1
    assert metrics["abs_rel"] > 0 and (out / "examples.png").is_file()


def test_classification_linear_probe_keeps_the_backbone_and_full_finetune_moves_it(tmp_path, checkpoint):
    from safetensors.torch import load_file

    data = make_cls_folder(tmp_path / "cls", per_class=4)
    before = load_file(str(checkpoint / "open_clip_model.safetensors"))
    moved = {}
    for name, extra in (("probe", ["--freeze-backbone", "--workers", "1"]), ("full", [])):  # + a loader worker
        out = tmp_path / name
        assert qcap(["finetune", "cls", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                     "--steps", "2", "--lr", "1e-2", *FAST, *extra]) == 0
        result = json.loads((out / "metrics.json").read_text())
        assert result["metrics"]["num_samples"] == 8 and 0 <= result["metrics"]["top1"] <= 1
        assert result["backbone"]["frozen"] == (name == "probe")
        after = load_file(str(out / "final" / "model.safetensors"))
        moved[name] = max(float((after[f"backbone.visual.{k[len('visual.'):]}"] - v).abs().max())
                          for k, v in before.items() if k.startswith("visual."))
        assert not torch.equal(after["head.weight"], torch.zeros_like(after["head.weight"]))
    assert moved["probe"] == 0.0 and moved["full"] > 0.0


def test_layer_decay_groups(tmp_path):
    from finetune.backbone import BackboneSource, load_backbone
    from finetune.heads import DenseModel, HeadConfig
    from finetune.optim import param_groups

    backbone, _ = load_backbone(BackboneSource(random="qcap-tiny-clip"))
    model = DenseModel(backbone, HeadConfig(name="fpn", neck_channels=16, channels=16), 3)
    groups = param_groups(model, backbone, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {}
    for group in groups:
        for param in group["params"]:
            scale[id(param)] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert scale[id(named["head.classifier.weight"])] == (1.0, 0.05)
    assert scale[id(named["head.classifier.bias"])] == (1.0, 0.0)
    assert scale[id(named["backbone.visual.transformer.resblocks.3.attn.in_proj_weight"])] == (0.5, 0.05)
    assert scale[id(named["backbone.visual.transformer.resblocks.0.mlp.c_fc.weight"])] == (0.5**4, 0.05)
    assert scale[id(named["backbone.visual.positional_embedding"])] == (0.5**5, 0.0)
    assert scale[id(named["backbone.visual.conv1.weight"])] == (0.5**5, 0.05)
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    # the pooled embedding's norm and projection take no part in a dense loss: frozen, left out
    assert not named["backbone.visual.ln_post.weight"].requires_grad and "backbone.visual.proj" not in trainable
    model.freeze_backbone()
    frozen = param_groups(model, backbone, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    assert all(g["layer_id"] == 5 for g in frozen)


def test_bad_inputs_are_clear_errors(tmp_path, checkpoint, capsys):
    import open_clip

    data = make_seg_folder(tmp_path / "seg", num_train=4, num_val=2)
    out = str(tmp_path / "out")
    # a label outside the class range, named with its file
    bad = data / "annotations" / "training" / "0001.png"
    labels = np.asarray(Image.open(bad)).copy()
    labels[3, 3] = 9
    Image.fromarray(labels, mode="L").save(bad)
    assert qcap(["finetune", "seg", "--checkpoint", str(checkpoint), "--data", str(data), "--out", out,
                 "--steps", "2", *FAST]) == 2
    err = capsys.readouterr().err
    assert "0001.png: label values [9] are outside the 3 classes" in err and "Traceback" not in err

    # a checkpoint whose image tower is not a ViT
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "test-ft-rn.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(config_dir)
    rn = save_checkpoint_dir(load_model("test-ft-rn").model, "test-ft-rn", tmp_path / "rn")
    assert qcap(["finetune", "cls", "--checkpoint", str(rn), "--data", str(data), "--out", out, *FAST]) == 2
    assert "ModifiedResNet image tower, neither a ViT nor a hierarchical timm model" in capsys.readouterr().err
    assert qcap(["attention-distance", "--checkpoint", str(rn), "--images", str(data), "--out", out]) == 2
    assert "neither a ViT nor a hierarchical" in capsys.readouterr().err

    # a head that does not fit the task, a missing source, an image size the patches do not tile
    assert qcap(["finetune", "cls", "--random", "qcap-tiny-clip", "--data", str(data), "--out", out, "--head", "upernet", *FAST]) == 2
    assert "--head upernet does not fit task cls" in capsys.readouterr().err
    assert qcap(["finetune", "seg", "--data", str(data), "--out", out, *FAST]) == 2
    assert "exactly one of --checkpoint, --pretrained NAME:TAG or --random MODEL" in capsys.readouterr().err
    assert qcap(["finetune", "seg", "--random", "qcap-tiny-clip", "--data", str(data), "--out", out,
                 "--image-size", "60", *FAST]) == 2
    assert "not a multiple of the patch size 8x8" in capsys.readouterr().err
    assert qcap(["finetune", "depth", "--random", "qcap-tiny-clip", "--data", str(data), "--out", out, *FAST]) == 2
    assert "depth" in capsys.readouterr().err  # a segmentation folder has no depth/ maps


def _mean_pairwise_distance(rows: int, cols: int, patch: int) -> float:
    centres = [(r * patch, c * patch) for r, c in itertools.product(range(rows), range(cols))]
    return float(np.mean([[np.hypot(a[0] - b[0], a[1] - b[1]) for b in centres] for a in centres]))


def test_attention_distance_command_with_a_known_answer_and_a_comparison(tmp_path, checkpoint, capsys):
    """Zeroed query/key weights attend uniformly: the command must report the known distance."""
    from safetensors.torch import load_file, save_file

    images = make_seg_folder(tmp_path / "seg", num_train=3, num_val=2) / "images"
    (images / "training" / "broken.jpg").write_bytes(b"not a jpeg")
    uniform = tmp_path / "uniform"
    uniform.mkdir()
    for name in ("open_clip_config.json",):
        (uniform / name).write_bytes((checkpoint / name).read_bytes())
    state = load_file(str(checkpoint / "open_clip_model.safetensors"))
    for key in [k for k in state if k.startswith("visual.transformer.resblocks.") and k.endswith(("in_proj_weight", "in_proj_bias"))]:
        state[key][: 2 * 128] = 0
    save_file(state, str(uniform / "open_clip_model.safetensors"))

    out = tmp_path / "attn"
    weights = checkpoint / "open_clip_model.safetensors"  # the --pretrained NAME:TAG path, with a local file as TAG
    assert qcap(["attention-distance", "--checkpoint", str(uniform), "--compare", f"pretrained:qcap-tiny-clip:{weights}",
                 "--label", "uniform", "--images", str(images), "--out", str(out), "--batch-size", "2"]) == 0
    result = json.loads((out / "attention_distance.json").read_text())
    first, second = result["models"]
    known = _mean_pairwise_distance(8, 8, 8)
    assert first["label"] == "uniform" and second["source"] == f"pretrained:qcap-tiny-clip:{weights}"
    assert first["num_images"] == 5 and first["num_failed"] == 1 and "broken.jpg" in next(iter(first["failed"]))
    assert np.asarray(first["distance_px"]).shape == (4, 4)
    np.testing.assert_allclose(first["distance_px"], known, rtol=1e-6)
    assert first["uniform_attention_px"] == pytest.approx(known)
    assert np.asarray(second["distance_px"]).shape == (4, 4) and second["patch_size"] == [8, 8]
    with Image.open(out / "attention_distance.png") as picture:
        assert picture.width > 1.5 * picture.height  # two panels side by side
    assert "mean distance per block" in capsys.readouterr().out
    # the resolved config beside the results: what ran, loadable as the command's config
    from base.config import load_config
    from finetune.distance import AttentionDistanceConfig

    saved = load_config(AttentionDistanceConfig, out / "config.json")
    assert saved == AttentionDistanceConfig(checkpoint=uniform, compare=f"pretrained:qcap-tiny-clip:{weights}",
                                            label="uniform", images=images, out=out, batch_size=2)


@pytest.mark.parametrize("head", ["upernet", "fpn", "dpt", "linear"])
def test_dense_heads_take_batch_one_and_grids_that_do_not_halve(head):
    from finetune.backbone import BackboneSource, load_backbone
    from finetune.heads import DenseModel, HeadConfig

    backbone, _ = load_backbone(BackboneSource(random="qcap-tiny-clip"))
    model = DenseModel(backbone, HeadConfig(name=head, neck_channels=32, channels=32), 5).train()
    images = torch.randn(1, 3, 72, 56)  # a 9x7 grid: the 2p level rounds up
    out = model(images)
    assert out.shape == (1, 5, 72, 56)
    out.mean().backward()
    assert backbone.visual.conv1.weight.grad is not None


def test_a_stopped_run_resumes_to_the_same_model(tmp_path, capsys):
    """Stopped at step 2 of 4 (as a job limit would), then --resume: the same weights and metrics
    as a run that never stopped (augmentation RNG and data position come back exactly)."""
    from safetensors.torch import load_file

    data = make_seg_folder(tmp_path / "seg", num_train=6, num_val=2)
    common = ["finetune", "seg", "--random", "qcap-tiny-clip", "--data", str(data), "--head", "linear", "--steps", "4",
              "--batch-size", "2", "--preset", "tiny", "--num-examples", "0"]
    assert qcap([*common, "--out", str(tmp_path / "straight")]) == 0
    assert qcap([*common, "--out", str(tmp_path / "cut"), "--stop-at-step", "2"]) == 0
    assert "run again with --resume" in capsys.readouterr().out
    assert not (tmp_path / "cut" / "metrics.json").exists() and (tmp_path / "cut" / "step-000002").is_dir()
    assert qcap([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text())["metrics"] for run in ("straight", "cut")]
    assert metrics[0] == metrics[1]
    assert qcap([*common, "--out", str(tmp_path / "bad"), "--stop-at-step", "9"]) == 2
    assert "stop_at_step" in capsys.readouterr().err
