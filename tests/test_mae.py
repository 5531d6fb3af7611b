"""train.mae: transformers' ViTMAE on the CLIP rung's image-tower shape, trained by the shared Trainer,
exported as an open_clip folder that qcap finetune reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_jpeg, make_uid

from base.shards import Sample, ShardWriter, finalize_folder
from train.mae import MaeRunConfig, converted_model_cfg, encoder_to_open_clip, mae_config

ROOT = Path(__file__).parents[1]


def test_encoder_converts_exactly_to_open_clip():
    import open_clip
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(0)
    mae = ViTMAEForPreTraining(mae_config("qcap-tiny-clip", MaeRunConfig(data="x", out=Path("x"))))
    with torch.no_grad():  # make every parameter non-trivial (HF zero-initialises biases)
        for p in mae.vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    clip = open_clip.CLIP(**converted_model_cfg("qcap-tiny-clip"))
    encoder_to_open_clip(mae.vit, clip.visual)
    images = torch.randn(2, 3, 64, 64)
    num_patches = (64 // 8) ** 2
    noise = torch.arange(num_patches, dtype=torch.float).expand(2, -1)  # keeps the patch order
    mae.vit.config.mask_ratio = 0.0
    mae.vit.eval()
    clip.eval()
    with torch.no_grad():
        expected = mae.vit(pixel_values=images, noise=noise).last_hidden_state
        visual = clip.visual
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
        got = visual.ln_post(visual.transformer(visual.ln_pre(x)))
    assert isinstance(visual.ln_pre, torch.nn.Identity)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def _shards(folder: Path, n: int = 24) -> Path:
    with ShardWriter(folder, 0) as writer:
        for i in range(n):
            writer.write(Sample(key=f"{i:04d}", uid=make_uid(i), image=make_jpeg(80, 80, seed=i), text=f"a caption {i}"))
    finalize_folder(folder)
    return folder


@pytest.mark.slow  # ~23 s; the export's exactness is test_encoder_converts_exactly_to_open_clip
def test_trains_resumes_and_finetune_reads_the_export(tmp_path):
    data = _shards(tmp_path / "data")
    out = tmp_path / "mae"
    base = [sys.executable, "-m", "train.mae", "--data", str(data), "--out", str(out), "--samples-seen", "48",
            "--batch-size", "8", "--workers", "0", "--threads", "1", "--log-every", "1"]
    stopped = subprocess.run(base + ["--stop-at-step", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    resumed = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step 6/6, 48 samples seen" in resumed.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(v == v and v > 0 for v in losses)
    config = json.loads((out / "final" / "open_clip_config.json").read_text())
    assert config["pretraining"] == "mae" and config["model_cfg"]["vision_cfg"]["no_ln_pre"] is True

    from finetune.backbone import BackboneSource, load_backbone

    backbone, _ = load_backbone(BackboneSource(checkpoint=out))
    assert backbone.num_layers == 4 and list(backbone.describe()["patch_size"]) == [8, 8]
    features = backbone(torch.randn(1, 3, 64, 64), pooled=False).features
    assert features.shape == (1, 128, 8, 8)
    # the exported tower is the trained encoder: its patch embedding equals the MAE weights
    from safetensors.torch import load_file

    mae_state = load_file(str(out / "final" / "model.safetensors"))
    torch.testing.assert_close(backbone.visual.conv1.weight, mae_state["vit.embeddings.patch_embeddings.projection.weight"])


def test_bad_settings_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "train.mae", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                          "--model", "qcap-tiny-mci"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 2 and "not a plain open_clip ViT" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("flag", ["--mask-ratio=1.5", "--batch-size=0"])
def test_config_checks(flag, tmp_path):
    run = subprocess.run([sys.executable, "-m", "train.mae", "--data", "x", "--out", str(tmp_path), flag],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr
