"""finetune.attention: recomputed attention weights are the ones the blocks apply, and the mean
attention distance of hand-built patterns is the known value."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.attention import attention_maps, attention_probs, mean_attention_distance
from finetune.backbone import BackboneError, BackboneSource, backbone_from_model, load_backbone


def _mean_pairwise_distance(rows: int, cols: int, patch: int) -> float:
    centres = [(r * patch, c * patch) for r, c in itertools.product(range(rows), range(cols))]
    return float(np.mean([[np.hypot(a[0] - b[0], a[1] - b[1]) for b in centres] for a in centres]))


def test_hand_built_patterns_have_their_known_distance():
    rows, cols, patch = 4, 4, 16
    n = rows * cols
    probs = torch.zeros(2, 4, n + 1, n + 1)  # batch 2, 4 heads, class token first
    for q in range(n):
        r, c = divmod(q, cols)
        probs[:, 0, q + 1, q + 1] = 1.0  # head 0: each patch attends to itself → 0 px
        right = q + 1 if c + 1 < cols else q - 1  # head 1: a horizontal neighbour → 16 px
        probs[:, 1, q + 1, right + 1] = 1.0
        down2 = q + 2 * cols if r + 2 < rows else q - 2 * cols  # head 2: half on CLS, half 2 rows away
        probs[:, 2, q + 1, 0] = 0.5
        probs[:, 2, q + 1, down2 + 1] = 0.5
        probs[:, 3, q + 1, 1:] = 1.0 / n  # head 3: uniform over patches
    probs[:, :, 0, :] = 1.0 / (n + 1)  # the class token's own row is excluded
    got = mean_attention_distance(probs, (rows, cols), (patch, patch))
    want = [0.0, 16.0, 32.0, _mean_pairwise_distance(rows, cols, patch)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="does not fit a 3x3 grid"):
        mean_attention_distance(probs, (3, 3), (patch, patch))


def test_uniform_attention_of_a_real_model_gives_the_mean_pairwise_distance():
    """Zero query/key weights make every head attend uniformly: a known distance end to end."""
    backbone, _ = load_backbone(BackboneSource(random="qcap-tiny-clip"))
    backbone.eval()
    with torch.no_grad():
        for attn in backbone.attention_modules():
            width = attn.embed_dim
            attn.in_proj_weight[: 2 * width] = 0
            attn.in_proj_bias[: 2 * width] = 0
    maps = attention_maps(backbone, torch.randn(2, 3, 64, 64))
    assert len(maps) == 4 and maps[0].shape == (2, 4, 65, 65)
    want = _mean_pairwise_distance(8, 8, 8)
    for layer in maps:
        np.testing.assert_allclose(mean_attention_distance(layer, (8, 8), (8, 8)).numpy(), [want] * 4, rtol=1e-6)


def _output_from_probs(probs: torch.Tensor, v: torch.Tensor, out_proj) -> torch.Tensor:
    batch, heads, length, _ = probs.shape
    mixed = (probs @ v.reshape(batch, length, heads, -1).transpose(1, 2)).transpose(1, 2).reshape(batch, length, -1)
    return out_proj(mixed)


def test_recomputed_weights_reproduce_each_attention_module_output():
    from open_clip.transformer import Attention as OpenClipAttention
    from timm.layers.attention import Attention as TimmAttention

    torch.manual_seed(0)
    x = torch.randn(2, 10, 32)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    probs = attention_probs(mha, x)
    v = F.linear(x, mha.in_proj_weight[64:], mha.in_proj_bias[64:])
    torch.testing.assert_close(_output_from_probs(probs, v, mha.out_proj), mha(x, x, x, need_weights=False)[0])

    for qk_norm in (False, True):
        attn = OpenClipAttention(32, 4, qk_norm=qk_norm).eval()
        if qk_norm:
            torch.nn.init.normal_(attn.ln_q.weight)
        probs = attention_probs(attn, x)
        v = F.linear(x, attn.in_proj_weight[64:], attn.in_proj_bias[64:])
        torch.testing.assert_close(_output_from_probs(probs, v, attn.out_proj), attn(x))

    attn = TimmAttention(32, 4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).eval()
    probs = attention_probs(attn, x)
    v = attn.qkv(x)[..., 64:]
    torch.testing.assert_close(_output_from_probs(probs, v, attn.proj), attn(x))
    assert torch.allclose(probs.sum(-1), torch.ones(()))
    with pytest.raises(TypeError, match="no attention-weight recipe for Linear"):
        attention_probs(torch.nn.Linear(3, 3), x)


def _register_test_configs(tmp_path):
    """A tiny ModifiedResNet CLIP and a timm-ViT CLIP, registered like open_clip's own."""
    import open_clip

    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "test-tiny-rn.json").write_text(json.dumps(
        {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}, "text_cfg": text}))
    (folder / "test-tiny-timm-vit.json").write_text(json.dumps(
        {"embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                         "timm_pool": "", "timm_proj": "linear", "image_size": 64}, "text_cfg": text}))
    open_clip.add_model_config(folder)


def test_non_vit_towers_are_refused_and_timm_vits_work(tmp_path):
    from base.models import save_checkpoint_dir

    _register_test_configs(tmp_path)
    with pytest.raises(BackboneError, match="has a ModifiedResNet image tower, neither a ViT nor a hierarchical timm model"):
        load_backbone(BackboneSource(random="test-tiny-rn"))
    from base.models import load_model

    rn = load_model("test-tiny-rn")
    folder = save_checkpoint_dir(rn.model, "test-tiny-rn", tmp_path / "rn")
    with pytest.raises(BackboneError, match="ModifiedResNet image tower, neither a ViT nor a hierarchical"):
        load_backbone(BackboneSource(checkpoint=folder))
    with pytest.raises(BackboneError, match="has no image tower"):
        backbone_from_model(rn.model.transformer, name="text-only", source="test")
    with pytest.raises(BackboneError, match="no such checkpoint"):
        load_backbone(BackboneSource(checkpoint=tmp_path / "missing"))

    backbone, _ = load_backbone(BackboneSource(random="test-tiny-timm-vit"))
    assert backbone.kind == "timm" and backbone.patch_size == (16, 16) and backbone.num_layers == 12
    backbone.eval()
    images = torch.randn(2, 3, 64, 64)
    out = backbone(images)
    assert out.features.shape == (2, 192, 4, 4) and out.pooled.shape == (2, 32)
    torch.testing.assert_close(out.pooled, backbone.visual(images))  # the model's own image embedding
    maps = attention_maps(backbone, images)
    assert len(maps) == 12 and maps[0].shape == (2, 3, 17, 17)
    assert backbone.layer_id("visual.trunk.pos_embed") == 0 and backbone.layer_id("visual.trunk.blocks.3.attn.qkv.weight") == 4
    assert backbone.layer_id("visual.head.proj.weight") == 13
    with pytest.raises(BackboneError, match="not a multiple of the patch size"):
        backbone(torch.randn(1, 3, 60, 64))
