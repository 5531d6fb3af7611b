"""The world's detection set (``--det-samples``): MS COCO's layout, read by pycocotools, masks that
are the scenes' visible silhouettes, and no change to any other world file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from world.config import WorldConfig
from world.generate import _square_scene, generate_world
from world.scenes import CLASSES, _masks, render


def _world(out: Path, **overrides) -> Path:
    params = {"num_samples": 40, "clean_samples": 2, "eval_samples": 4, "eval_image_size": 64,
              "clean_image_size": 48, "workers": 1} | overrides
    generate_world(WorldConfig(out=out, **params), progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def det_world(tmp_path_factory) -> Path:
    return _world(tmp_path_factory.mktemp("w") / "det", det_samples=12)


def test_det_set_is_coco_and_its_masks_are_the_visible_silhouettes(det_world):
    import pycocotools.mask as mask_utils
    from pycocotools.coco import COCO

    det = det_world / "eval" / "det"
    sizes = {}
    for sub in ("train", "val"):
        coco = COCO(str(det / "annotations" / f"instances_{sub}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        ids = sorted(coco.getImgIds())
        sizes[sub] = len(ids)
        for image_id in ids:
            info = coco.imgs[image_id]
            assert (det / sub / info["file_name"]).is_file() and (info["width"], info["height"]) == (64, 64)
            # the same scene drawn with its class map: every labelled pixel is exactly one object's mask
            scene = _square_scene(0, "eval-det", image_id, 64)
            class_map = render(scene, with_maps=True).class_map
            painted = np.zeros((64, 64), dtype=np.int64)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert anns and len(anns) <= len(scene.objects)
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                assert not (painted[mask] != 0).any()  # occlusion: no pixel belongs to two objects
                painted[mask] = ann["category_id"]
                assert ann["area"] == int(mask.sum()) and ann["iscrowd"] == 0
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                assert ann["bbox"] == mask_utils.toBbox(rle).tolist()
            np.testing.assert_array_equal(painted, class_map)
            # each mask is its object's visible part: area / whole silhouette = the truth's visible fraction
            silhouettes = _masks(scene)
            for ann in anns:
                k = (ann["id"] - 1) % 16
                assert CLASSES[ann["category_id"] - 1] == scene.objects[k].cls
                assert ann["area"] / silhouettes[k].sum() == pytest.approx(scene.objects[k].visible_fraction, abs=1e-4)
    assert sizes == {"train": 9, "val": 3}  # eval_val_fraction 0.25 of 12
    truth = pq.read_table(det_world / "truth.parquet").to_pandas()
    rows = truth[truth["split"] == "eval-det"]
    assert len(rows) == 12 and all((det_world / p).is_file() for p in rows["path"])
    info = json.loads((det_world / "world.json").read_text())
    assert info["config"]["det_samples"] == 12 and info["files"]["det"] == "eval/det/"


def test_det_set_changes_no_other_world_file(det_world, tmp_path):
    plain = _world(tmp_path / "plain")
    with_det, without = _files(det_world), _files(plain)
    changed = {"world.json", "truth.parquet"}
    assert {k for k in with_det if not k.startswith("eval/det/")} - changed == set(without) - changed
    for name, data in without.items():
        if name not in changed:
            assert with_det[name] == data, name
    info = json.loads((plain / "world.json").read_text())
    assert "det_samples" not in info["config"] and "det" not in info["files"]  # as before the option existed
    det_truth = pq.read_table(det_world / "truth.parquet").to_pandas()
    plain_truth = pq.read_table(plain / "truth.parquet").to_pandas()
    kept = det_truth[det_truth["split"] != "eval-det"].reset_index(drop=True)
    assert kept.drop(columns=["objects", "relations"]).equals(plain_truth.drop(columns=["objects", "relations"]))
    assert kept["uid"].tolist() == plain_truth["uid"].tolist()
