"""finetune.data: the ADE20k / NYUv2 / ImageFolder layouts, read from real PNG/JPEG files.

The ``make_*`` helpers build tiny datasets in those layouts; the other finetune tests use them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import (
    DatasetError,
    DepthFolder,
    ImageFolderSplit,
    Preprocess,
    SegmentationFolder,
    collate_eval,
    read_classes,
)

COLOURS = [(20, 20, 20), (220, 40, 40), (40, 200, 60), (50, 70, 230)]
PRE = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _scene(rng: np.random.Generator, width: int, height: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of coloured rectangles and its class map (class = colour index)."""
    labels = np.zeros((height, width), dtype=np.uint8)
    for cls in range(1, num_classes):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        labels[y0 : y0 + rng.integers(height // 4, height // 2), x0 : x0 + rng.integers(width // 4, width // 2)] = cls
    image = np.array(COLOURS, dtype=np.uint8)[labels]
    image = np.clip(image.astype(int) + rng.integers(-12, 12, image.shape), 0, 255).astype(np.uint8)
    return image, labels


def make_seg_folder(root: Path, *, num_train: int = 6, num_val: int = 3, num_classes: int = 3, size=(48, 40),
                    ignore_border: bool = True, reduce_zero_label: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, labels = _scene(rng, size[0], size[1], num_classes)
            if reduce_zero_label:
                labels = labels + 1  # ADE20k: 0 is "other", classes start at 1
                labels[:, :2] = 0
            elif ignore_border:
                labels[:2, :] = 255
            Image.fromarray(image).save(root / "images" / split / f"{i:04d}.jpg", quality=95)
            Image.fromarray(labels, mode="L").save(root / "annotations" / split / f"{i:04d}.png")
    names = ["background", "red", "green", "blue"][:num_classes]
    (root / "classes.json").write_text(json.dumps({"classes": names, "ignore_index": 255, "background": 0}))
    return root


def make_depth_folder(root: Path, *, num_train: int = 6, num_val: int = 3, size=(48, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "depth" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            near = rng.uniform(0.8, 2.0)
            rows = np.linspace(near, near + 3.0, size[1], dtype=np.float32)[:, None].repeat(size[0], axis=1)
            depth_mm = (rows * 1000).astype(np.uint16)
            depth_mm[: size[1] // 8, : size[0] // 8] = 0  # invalid pixels
            shade = (255 * (1 - (rows - 0.8) / 4.5)).clip(0, 255).astype(np.uint8)
            image = np.stack([shade, shade // 2, 255 - shade], axis=-1)
            Image.fromarray(image).save(root / "images" / split / f"{i:04d}.jpg", quality=95)
            Image.fromarray(depth_mm).save(root / "depth" / split / f"{i:04d}.png")
    return root


def make_cls_folder(root: Path, *, per_class: int = 4, classes=("n01_cat", "n02_dog"), size=(40, 36), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = np.full((size[1], size[0], 3), COLOURS[c + 1], dtype=np.uint8)
                image = np.clip(image.astype(int) + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i:03d}.jpg", quality=95)
    (root / "classnames.txt").write_text("\n".join(n.split("_", 1)[1] for n in classes) + "\n")
    return root


def test_segmentation_folder_reads_ade_layout(tmp_path):
    root = make_seg_folder(tmp_path / "seg", size=(48, 40))
    train = SegmentationFolder(root, "training", PRE, train=True)
    val = SegmentationFolder(root, "validation", PRE, train=False)
    assert (len(train), len(val)) == (6, 3)
    assert train.classes.names == ("background", "red", "green") and train.classes.background == 0
    image, labels = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert labels.shape == (32, 32) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2, 255}
    # evaluation keeps the label at its original 48x40 resolution, exactly as written
    image, labels = val[1]
    assert image.shape == (3, 32, 32) and labels.shape == (40, 48)
    written = np.asarray(Image.open(root / "annotations" / "validation" / "0001.png"))
    np.testing.assert_array_equal(labels.numpy(), written)
    images, targets = collate_eval([val[0], val[1]])
    assert images.shape == (2, 3, 32, 32) and targets.shape == (2, 40, 48)


def test_reduce_zero_label_follows_ade20k(tmp_path):
    root = make_seg_folder(tmp_path / "ade", reduce_zero_label=True)
    raw = np.asarray(Image.open(root / "annotations" / "validation" / "0000.png")).astype(np.int64)
    # off by default (classes.json does not ask for it): labels 1..3 exceed the 3 classes
    with pytest.raises(DatasetError, match=r"label values \[3\] are outside the 3 classes"):
        SegmentationFolder(root, "validation", PRE, train=False)[0]
    val = SegmentationFolder(root, "validation", PRE, train=False, reduce_zero_label=True)
    labels = val[0][1].numpy()
    np.testing.assert_array_equal(labels[raw == 0], 255)
    np.testing.assert_array_equal(labels[raw > 0], raw[raw > 0] - 1)


def test_classes_json_forms_and_errors(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(["a", "b"]))
    assert read_classes(path).names == ("a", "b")
    path.write_text(json.dumps({"classes": {"1": "b", "0": "a"}, "ignore_index": 0, "reduce_zero_label": True}))
    with pytest.raises(DatasetError, match="ignore_index 0 is also a class index"):
        read_classes(path)
    path.write_text(json.dumps({"classes": {"0": "a", "2": "c"}}))
    with pytest.raises(DatasetError, match="without gaps"):
        read_classes(path)
    path.write_text(json.dumps({"labels": ["a"]}))
    with pytest.raises(DatasetError, match="expected a list of class names"):
        read_classes(path)
    with pytest.raises(DatasetError, match="missing; write the class names"):
        read_classes(tmp_path / "none.json")


def test_bad_segmentation_inputs_name_the_file(tmp_path):
    root = make_seg_folder(tmp_path / "seg", num_classes=3)
    bad = root / "annotations" / "training" / "0002.png"
    labels = np.asarray(Image.open(bad)).copy()
    labels[5, 5] = 7
    Image.fromarray(labels, mode="L").save(bad)
    train = SegmentationFolder(root, "training", PRE, train=True)
    with pytest.raises(DatasetError, match=r"0002\.png: label values \[7\] are outside the 3 classes"):
        train[2]
    Image.new("RGB", (48, 40)).save(bad)
    with pytest.raises(DatasetError, match=r"0002\.png: annotation must be a single-channel PNG"):
        train[2]
    Image.fromarray(np.zeros((20, 20), np.uint8), mode="L").save(bad)
    with pytest.raises(DatasetError, match=r"0002\.png: 20x20 does not match its image"):
        train[2]
    bad.unlink()
    with pytest.raises(DatasetError, match=r"1 of 6 images .* have no annotation"):
        SegmentationFolder(root, "training", PRE, train=True)
    with pytest.raises(DatasetError, match="no such dataset folder"):
        SegmentationFolder(tmp_path / "nope", "training", PRE, train=True)


def test_depth_folder_reads_millimetres(tmp_path):
    root = make_depth_folder(tmp_path / "depth")
    val = DepthFolder(root, "validation", PRE, train=False)
    image, depth = val[0]
    written = np.asarray(Image.open(root / "depth" / "validation" / "0000.png")).astype(np.float32) / 1000
    assert depth.shape == (1, 40, 48)
    np.testing.assert_allclose(depth[0].numpy(), written)
    assert (depth == 0).any() and float(depth.max()) < 5.5
    image, depth = DepthFolder(root, "training", PRE, train=True)[0]
    assert image.shape == (3, 32, 32) and depth.shape == (1, 32, 32) and depth.dtype == torch.float32


def test_image_folder_uses_training_classes_and_classnames(tmp_path):
    root = make_cls_folder(tmp_path / "cls")
    train = ImageFolderSplit(root, "train", PRE, train=True)
    assert train.classes == ["n01_cat", "n02_dog"] and train.class_names == ["cat", "dog"]
    image, label = train[5]
    assert image.shape == (3, 32, 32) and label == 1
    (root / "val" / "n03_extra").mkdir()
    with pytest.raises(DatasetError, match="not among the training classes"):
        ImageFolderSplit(root, "val", PRE, train=False, classes=train.classes)
    (root / "classnames.txt").write_text("cat\n")
    with pytest.raises(DatasetError, match="lists 1 names but"):
        ImageFolderSplit(root, "train", PRE, train=False)
