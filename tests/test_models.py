"""base.models: tiny configs in open_clip's registry, checkpoint folders that open_clip loads."""

from __future__ import annotations

import pytest
import torch

from base.models import WEIGHTS_FILE, load_model, save_checkpoint_dir


def test_tiny_models_build_and_checkpoint_round_trips_through_open_clip(tmp_path):
    import open_clip

    loaded = load_model("qcap-tiny-clip")
    assert loaded.source == "random"
    folder = save_checkpoint_dir(loaded.model, "qcap-tiny-clip", tmp_path / "final", step=3)
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", WEIGHTS_FILE]

    images = torch.randn(2, 3, 64, 64)
    want = loaded.model.encode_image(images)
    # open_clip alone loads the folder, both ways a user would
    via_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    via_file, _, _ = open_clip.create_model_and_transforms("qcap-tiny-clip", pretrained=str(folder / WEIGHTS_FILE))
    for net in (via_dir, via_file):
        net.eval()
        torch.testing.assert_close(net.encode_image(images), want)
    again = load_model(checkpoint=tmp_path)  # a run folder: finds final/
    assert again.name == "qcap-tiny-clip"
    torch.testing.assert_close(again.model.encode_image(images), want)


def test_wrong_architecture_and_bad_arguments_are_clear(tmp_path):
    coca = load_model("qcap-tiny-coca")
    folder = save_checkpoint_dir(coca.model, "qcap-tiny-coca", tmp_path / "coca")
    with pytest.raises(ValueError, match="is a 'qcap-tiny-coca', not the requested 'qcap-tiny-clip'"):
        load_model("qcap-tiny-clip", checkpoint=folder)
    with pytest.raises(ValueError, match="does not fit model"):
        load_model("qcap-tiny-clip", checkpoint=folder / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_model("qcap-tiny-clip", checkpoint=tmp_path / "missing")
    with pytest.raises(ValueError, match="not both"):
        load_model("qcap-tiny-clip", checkpoint=folder, pretrained="laion2b_s34b_b79k")


def test_weights_sha256_is_the_sha256_of_the_whole_file(tmp_path):
    import hashlib
    import os

    from base.models import weights_sha256

    for size in (0, 1 << 22, (1 << 22) * 2 + 12345):  # empty, one whole 4 MiB block, several blocks and a tail
        data = os.urandom(size)
        path = tmp_path / f"{size}.safetensors"
        path.write_bytes(data)
        assert weights_sha256(path) == weights_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        weights_sha256(tmp_path / "missing.safetensors")
