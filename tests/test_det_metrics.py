"""Detection metrics: pycocotools' COCOeval through finetune.detection.coco_metrics on hand-made
ground truth and predictions with known answers, and the COCO-layout reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import DatasetError, Preprocess
from finetune.detection import CocoDetectionFolder, coco_metrics, load_coco, to_coco_results

# four squares of one category on two 40x40 images (id 1: three objects, id 2: one)
BOXES = {1: [(2, 2, 10, 10), (20, 4, 12, 12), (6, 24, 14, 14)], 2: [(8, 8, 20, 16)]}


def _mask(box, h=40, w=40):
    x, y, bw, bh = box
    m = np.zeros((h, w), np.uint8)
    m[y : y + bh, x : x + bw] = 1
    return m


def _rle(mask):
    import pycocotools.mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _write_coco(path, *, polygons=False):
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 40} for i in BOXES]
    anns = []
    for image_id, boxes in BOXES.items():
        for box in boxes:
            x, y, w, h = box
            seg = [[x, y, x + w, y, x + w, y + h, x, y + h]] if polygons else _rle(_mask(box))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 7, "bbox": list(box),
                         "area": w * h, "iscrowd": 0, "segmentation": seg})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "square"}]}))
    return path


def _predictions(skip=()):
    out = []
    for image_id, boxes in BOXES.items():
        for k, box in enumerate(boxes):
            if (image_id, k) in skip:
                continue
            out.append({"image_id": image_id, "category_id": 7, "bbox": [float(v) for v in box], "score": 0.9 - 0.1 * k,
                        "segmentation": _rle(_mask(box))})
    return out


def test_perfect_predictions_score_one_and_a_missed_object_costs_its_recall(tmp_path):
    gt = load_coco(_write_coco(tmp_path / "gt.json"))
    perfect = coco_metrics(gt, _predictions())
    for kind in ("bbox", "segm"):
        assert perfect[f"{kind}_AP"] == pytest.approx(1.0) and perfect[f"{kind}_AP50"] == pytest.approx(1.0)
        assert perfect[f"{kind}_AR100"] == pytest.approx(1.0)
    # all four objects are 'small' (area < 32²) or 'medium': COCO reports -1 = NaN for sizes without ground truth
    assert np.isnan(perfect["bbox_APl"]) and perfect["bbox_APs"] == pytest.approx(1.0)

    missed = coco_metrics(gt, _predictions(skip={(1, 2)}))  # one of four objects never predicted
    for kind in ("bbox", "segm"):
        assert missed[f"{kind}_AR100"] == pytest.approx(0.75)
        # precision 1 up to recall 0.75, nothing after: 76 of COCO's 101 recall points
        assert missed[f"{kind}_AP"] == pytest.approx(76 / 101)

    nothing = coco_metrics(gt, [])
    assert nothing["bbox_AP"] == 0.0 and nothing["segm_AR100"] == 0.0 and nothing["num_detections"] == 0

    shifted = [dict(p, bbox=[p["bbox"][0] + p["bbox"][2] / 2, *p["bbox"][1:]]) for p in _predictions()]
    half = coco_metrics(gt, shifted, iou_types=("bbox",))  # IoU 1/3 for every box: below every threshold
    assert half["bbox_AP"] == 0.0 and "segm_AP" not in half


def test_predicted_masks_and_boxes_map_back_to_original_pixels(tmp_path):
    """A letterboxed prediction (scale 64/40) converted by to_coco_results scores 1.0 on the originals."""
    gt = load_coco(_write_coco(tmp_path / "gt.json"))
    scale = 64 / 40
    results = []
    for image_id, boxes in BOXES.items():
        big = torch.tensor([[x * scale, y * scale, (x + w) * scale, (y + h) * scale] for x, y, w, h in boxes])
        masks = torch.stack([torch.from_numpy(_mask(b)) for b in boxes]).float()
        masks = torch.nn.functional.interpolate(masks[:, None], size=(64, 64), mode="nearest")
        output = {"boxes": big, "labels": torch.ones(len(boxes), dtype=torch.int64),
                  "scores": torch.linspace(0.9, 0.5, len(boxes)), "masks": masks}
        results += to_coco_results(output, {"image_id": image_id, "scale": scale, "size": (40, 40)}, [7])
    import pycocotools.mask as mask_utils

    metrics = coco_metrics(gt, results)
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP50"] == pytest.approx(1.0)
    for result in results:  # masks resampled 40 → 64 → 40 px: at most an edge pixel off
        truth = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=result["image_id"]))
                 if a["bbox"] == [round(v) for v in result["bbox"]]][0]
        iou = mask_utils.iou([result["segmentation"]], [truth["segmentation"]], [0])[0, 0]
        assert iou > 0.75, (result["bbox"], iou)


def test_coco_layout_is_read_as_ms_coco_names_it(tmp_path):
    root = tmp_path / "coco"
    _write_coco(root / "annotations" / "instances_train2017.json", polygons=True)
    _write_coco(root / "annotations" / "instances_val2017.json")
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        for image_id in BOXES:
            Image.new("RGB", (40, 40), (90, 90, 90)).save(root / split / f"{image_id}.png")
    pre = Preprocess(64, (0.5,) * 3, (0.5,) * 3)
    train = CocoDetectionFolder(root, "training", pre, train=True)
    val = CocoDetectionFolder(root, "validation", pre, train=False, category_ids=train.category_ids)
    assert train.class_names == ["square"] and len(train) == len(val) == 2
    image, target = val[0]
    assert image.shape == (3, 64, 64) and target["labels"].tolist() == [1, 1, 1]  # label 1 ↔ category id 7
    torch.testing.assert_close(target["boxes"][0], torch.tensor([2.0, 2.0, 12.0, 12.0]) * 1.6)
    assert target["masks"].shape == (3, 64, 64) and int(target["masks"][0].sum()) == 16 * 16
    image, target = train[1]  # polygons decoded by pycocotools
    assert target["masks"].shape == (1, 64, 64)
    assert int(target["masks"][0].sum()) == pytest.approx(20 * 16 * 1.6**2, rel=0.1)  # the 20x16 box, letterboxed

    (root / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        CocoDetectionFolder(root, "validation", pre, train=False)
    with pytest.raises(DatasetError, match="no instances_train"):
        CocoDetectionFolder(tmp_path, "training", pre, train=True)
