"""finetune.metrics agrees with a direct NumPy computation on hand-made predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.metrics import ClassificationMetrics, DepthMetrics, MetricError, SegmentationMetrics


def _numpy_seg(preds: list[np.ndarray], labels: list[np.ndarray], num_classes: int, ignore: int) -> dict:
    """Per-class IoU/accuracy straight from the definitions, pixel by pixel."""
    pred = np.concatenate([p.ravel() for p in preds])
    true = np.concatenate([t.ravel() for t in labels])
    keep = true != ignore
    pred, true = pred[keep], true[keep]
    ious, accs = [], []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        accs.append(tp / (tp + fn) if tp + fn else np.nan)
    return {"mIoU": np.nanmean(ious), "mAcc": np.nanmean(accs), "pixel_accuracy": np.mean(pred == true), "iou": ious}


def test_segmentation_metrics_match_numpy_with_ignore_and_empty_classes():
    rng = np.random.default_rng(0)
    num_classes, ignore = 6, 255
    # class 4 never appears in labels or predictions (undefined, left out of the means);
    # class 5 is predicted but never labelled (IoU 0, accuracy undefined)
    labels = [rng.choice([0, 1, 2, 3], size=(7, 9)) for _ in range(3)]
    preds = [np.where(rng.random((7, 9)) < 0.6, t, rng.choice([0, 1, 2, 3, 5], size=(7, 9))) for t in labels]
    labels[0][0, :] = ignore
    preds[0][0, :] = 4  # class 4 predicted only on ignored pixels: must stay undefined
    labels[1][:, 0] = ignore
    metrics = SegmentationMetrics(num_classes, ignore_index=ignore)
    metrics.update(torch.from_numpy(np.stack(preds[:2])), torch.from_numpy(np.stack(labels[:2])))
    # logits work too: one-hot scores whose argmax is the prediction
    logits = torch.nn.functional.one_hot(torch.from_numpy(preds[2]), num_classes).permute(2, 0, 1)[None].float()
    metrics.update(logits, torch.from_numpy(labels[2])[None])
    got = metrics.compute()
    want = _numpy_seg(preds, labels, num_classes, ignore)
    assert got["mIoU"] == pytest.approx(want["mIoU"], abs=1e-12)
    assert got["mAcc"] == pytest.approx(want["mAcc"], abs=1e-12)
    assert got["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"], abs=1e-12)
    assert got["per_class_iou"]["4"] is None and got["per_class_iou"]["5"] == 0.0
    assert got["per_class_acc"]["5"] is None
    assert got["num_classes_present"] == 5
    assert got["num_pixels"] == sum(int((t != ignore).sum()) for t in labels)
    for c in range(4):
        assert got["per_class_iou"][str(c)] == pytest.approx(want["iou"][c], abs=1e-12)


def test_segmentation_metrics_hand_computed_case():
    # 2x3 labels with one ignored pixel; written out by hand
    labels = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 0]])
    metrics = SegmentationMetrics(3, class_names=["a", "b", "c"])
    metrics.update(pred[None], labels[None])
    got = metrics.compute()
    # class a: tp 1, fp 1 (c→a), fn 1 (a→b): IoU 1/3, acc 1/2
    # class b: tp 2, fp 1, fn 0: IoU 2/3, acc 1; class c: tp 0, fn 1: IoU 0, acc 0
    assert got["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 0.0})
    assert got["mIoU"] == pytest.approx(1 / 3)
    assert got["mAcc"] == pytest.approx(0.5)
    assert got["pixel_accuracy"] == pytest.approx(3 / 5)


def test_segmentation_metrics_reject_labels_outside_the_class_range():
    metrics = SegmentationMetrics(3)
    with pytest.raises(MetricError, match=r"label values \[3, 9\] are outside 0..2"):
        metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 3], [9, 255]]]))
    with pytest.raises(MetricError, match="does not match label shape"):
        metrics.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))


def test_depth_metrics_match_numpy_per_image_with_invalid_pixels():
    rng = np.random.default_rng(1)
    gts = rng.uniform(0.5, 8.0, size=(3, 6, 5))
    gts[0, :2] = 0  # invalid
    gts[2] = 0  # an image without a single valid pixel
    gts[1, 0, 0] = 12.0  # beyond max_depth: invalid
    preds = gts * rng.uniform(0.7, 1.4, size=gts.shape) + 0.01
    preds[1, 1, 1] = 50.0  # clamped to max_depth
    metrics = DepthMetrics(max_depth=10.0)
    metrics.update(torch.from_numpy(preds[:, None]), torch.from_numpy(gts[:, None]))
    got = metrics.compute()
    per_image = []
    for p, g in zip(preds, gts, strict=True):
        valid = (g > 1e-3) & (g <= 10.0)
        if not valid.any():
            continue
        p, g = np.clip(p[valid], 1e-3, 10.0), g[valid]
        ratio = np.maximum(p / g, g / p)
        per_image.append(
            [np.sqrt(np.mean((p - g) ** 2)), np.mean(np.abs(p - g) / g), np.mean(np.abs(np.log10(p) - np.log10(g))),
             np.mean(ratio < 1.25), np.mean(ratio < 1.25**2), np.mean(ratio < 1.25**3)]
        )
    want = np.mean(per_image, axis=0)
    for key, value in zip(("rmse", "abs_rel", "log10", "delta1", "delta2", "delta3"), want, strict=True):
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got["num_images"] == 2 and got["num_images_without_valid_depth"] == 1
    assert DepthMetrics().compute()["num_images"] == 0 and math.isnan(DepthMetrics().compute()["rmse"])


def test_classification_top1_top5():
    logits = torch.tensor([[0.1, 0.9, 0, 0, 0, 0], [0.8, 0.1, 0, 0, 0, 0], [0, 0, 0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([1, 1, 2])
    metrics = ClassificationMetrics(6)
    metrics.update(logits, target)
    got = metrics.compute()
    assert got["top1"] == pytest.approx(1 / 3)
    assert got["top5"] == pytest.approx(1.0)  # label 1 ranks 2nd in row 2; label 2 ranks 4th in row 3
    with pytest.raises(MetricError, match="outside 0..5"):
        metrics.update(logits, torch.tensor([1, 6, 0]))
