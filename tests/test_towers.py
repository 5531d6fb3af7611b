"""base.towers: a CoCa with a timm CNN image tower builds from a config, trains, saves, reloads, decodes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coca():
    from base.models import init_coca_decoder, load_model

    torch.manual_seed(0)
    loaded = load_model("qcap-tiny-coca-resnet10t")
    init_coca_decoder(loaded.model, logit_scale=6.0)
    return loaded


def test_config_builds_a_coca_whose_tower_returns_pooled_and_tokens(coca):
    from open_clip import CoCa

    from base.towers import wants_token_tower

    model = coca.model
    assert isinstance(model, CoCa) and type(model.visual).__name__ == "TimmTokenTower"
    assert type(model.visual.trunk).__name__ == "ResNet"
    pooled, tokens = model._encode_image(torch.randn(3, 3, 64, 64))
    assert pooled.shape == (3, 128) and tokens.shape == (3, 32, 128)  # embed_dim; attn_pooler_queries
    # resnet10t at 64 px: a 2x2 feature map, one position embedding per cell
    assert model.visual.pos_embed.shape == (1, 4, model.visual.trunk.num_features)
    assert wants_token_tower({"timm_model_name": "resnet10t", "output_tokens": True})
    assert not wants_token_tower({"timm_model_name": "resnet10t"})
    assert not wants_token_tower({"width": 128, "output_tokens": True})


def test_other_configs_build_as_before():
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    from base.models import load_model

    assert isinstance(load_model("qcap-tiny-resnet10t").model.visual, TimmModel)  # a CLIP: open_clip's own tower
    assert isinstance(load_model("qcap-tiny-coca").model.visual, VisionTransformer)


def test_where_the_tokens_come_from_matters_to_the_decoder(coca):
    """The position embedding lets the pooled tokens tell the cells apart: moving the content
    of one cell to another changes the tokens (a permutation-invariant pooling would not)."""
    model = coca.model.eval()
    with torch.no_grad():
        cells = torch.randn(1, 4, model.visual.trunk.num_features)
        swapped = cells[:, [1, 0, 2, 3]]
        pos = model.visual.pos_embed
        a = model.visual.attn_pool(cells + pos)
        b = model.visual.attn_pool(swapped + pos)
        c = model.visual.attn_pool(cells)
        d = model.visual.attn_pool(swapped)
    assert not torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(c, d, atol=1e-5)  # without it the pooler sees a set


def test_trains_saves_and_reloads_to_the_same_outputs(tmp_path):
    from open_clip import CoCaLoss

    from base.models import load_model, save_checkpoint_dir

    coca = load_model("qcap-tiny-coca-resnet10t")
    model = coca.model.train()
    images = torch.randn(4, 3, 64, 64)
    text = coca.tokenizer(["a red circle", "two blue squares", "a yellow star on grass", "a ring"])
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        out = model(images, text)
        total = sum(loss_fn(**out, output_dict=True).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < losses[0]
    assert model.visual.pos_embed.grad is not None and model.visual.trunk.conv1[0].weight.grad is not None
    save_checkpoint_dir(model, "qcap-tiny-coca-resnet10t", tmp_path / "ckpt")
    again = load_model(checkpoint=tmp_path / "ckpt")
    model.eval()
    with torch.no_grad():
        for a, b in zip(model._encode_image(images), again.model._encode_image(images), strict=True):
            assert torch.equal(a, b)


def test_greedy_captions_match_open_clips_generate(coca):
    spec = importlib.util.spec_from_file_location("qcap_bench_caption", ROOT / "bench" / "caption.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.patch_open_clip_generate()
    from captioning.decode import generate

    model = coca.model.eval()
    pixels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = bench.reference_generate(model, pixels, seq_len=20, decoding="greedy")
    ours = generate(model, pixels, seq_len=20, decoding="greedy", generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, ref)
    assert len({tuple(row) for row in ours.tolist()}) > 1  # the image changes the caption


def test_unsupported_pooling_is_a_clear_error():
    from base.towers import build_token_tower

    with pytest.raises(ValueError, match="timm_pool"):
        build_token_tower(64, {"timm_model_name": "resnet10t", "timm_pool": "abs_attn", "image_size": 64,
                               "output_tokens": True})
