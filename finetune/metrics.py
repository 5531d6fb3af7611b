"""Evaluation metrics of the three tasks, as accumulators over batches.

Each accumulator keeps its sufficient statistics in one float64 tensor (``totals``), so a
distributed run sums them across processes with one ``accelerator.reduce(totals, "sum")``
before :meth:`compute`.

- :class:`SegmentationMetrics` — a confusion matrix over labelled pixels (``ignore_index``
  pixels are left out); mIoU, mAcc and pixel accuracy as mmsegmentation defines them: a class's
  IoU is TP/(TP+FP+FN) and is *undefined* (left out of the mean) when the class is neither in
  the labels nor predicted; its accuracy TP/(TP+FN) is undefined when it has no labelled
  pixel. Predicted-but-absent classes therefore count as IoU 0.
- :class:`DepthMetrics` — the Eigen et al. measures on valid pixels (``min_depth < gt ≤
  max_depth``), computed per image and averaged over images (the NYUv2 convention): RMSE
  (metres), AbsRel, log10, δ<1.25, δ<1.25², δ<1.25³. Predictions are clamped to
  ``[min_depth, max_depth]`` first. Images without one valid pixel are counted and skipped.
- :class:`ClassificationMetrics` — top-1 (and top-5 when there are at least 5 classes).
"""

from __future__ import annotations

import math
from typing import Any

import torch


class MetricError(ValueError):
    """Predictions and targets that do not fit together (shapes, label range)."""


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


class SegmentationMetrics:
    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError("num_classes: must be at least 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.totals = torch.zeros(num_classes * num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``: class indices or logits (B×K×H×W); ``target``: labels, same H×W."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise MetricError(f"prediction shape {tuple(pred.shape)} does not match label shape {tuple(target.shape)}")
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        bad = (target < 0) | (target >= self.num_classes)
        if bad.any():
            values = sorted(set(target[bad].tolist()))[:10]
            raise MetricError(
                f"label values {values} are outside 0..{self.num_classes - 1} and not the ignore index {self.ignore_index}"
            )
        if ((pred < 0) | (pred >= self.num_classes)).any():
            raise MetricError(f"predicted classes outside 0..{self.num_classes - 1}")
        flat = target * self.num_classes + pred
        self.totals += torch.bincount(flat, minlength=self.num_classes**2).to(torch.float64)

    @property
    def confusion(self) -> torch.Tensor:
        """Rows: true class; columns: predicted class."""
        return self.totals.reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Any]:
        conf = self.confusion
        tp = conf.diag()
        labelled = conf.sum(dim=1)
        predicted = conf.sum(dim=0)
        union = labelled + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.full_like(tp, float("nan")))
        total = float(labelled.sum())
        present = ~torch.isnan(iou)
        return {
            "mIoU": float(iou[present].mean()) if present.any() else float("nan"),
            "mAcc": float(acc[~torch.isnan(acc)].mean()) if (~torch.isnan(acc)).any() else float("nan"),
            "pixel_accuracy": float(tp.sum()) / total if total else float("nan"),
            "num_pixels": int(total),
            "num_classes_present": int(present.sum()),
            "per_class_iou": dict(zip(self.class_names, _nan_to_none(iou.tolist()), strict=True)),
            "per_class_acc": dict(zip(self.class_names, _nan_to_none(acc.tolist()), strict=True)),
        }


class DepthMetrics:
    # totals: [num_images, rmse, abs_rel, log10, d1, d2, d3, num_skipped]
    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0) -> None:
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"depth range: need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.totals = torch.zeros(8, dtype=torch.float64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target``: depth in metres, B×H×W or B×1×H×W; target 0 = invalid."""
        if pred.dim() == 4:
            pred = pred[:, 0]
        if target.dim() == 4:
            target = target[:, 0]
        if pred.shape != target.shape:
            raise MetricError(f"prediction shape {tuple(pred.shape)} does not match depth shape {tuple(target.shape)}")
        pred = pred.detach().double().cpu().clamp(self.min_depth, self.max_depth)
        target = target.detach().double().cpu()
        for p, g in zip(pred, target, strict=True):
            valid = torch.isfinite(g) & (g > self.min_depth) & (g <= self.max_depth)
            if not valid.any():
                self.totals[7] += 1
                continue
            p, g = p[valid], g[valid]
            ratio = torch.maximum(p / g, g / p)
            self.totals[:7] += torch.stack(
                [
                    torch.tensor(1.0, dtype=torch.float64),
                    ((p - g) ** 2).mean().sqrt(),
                    ((p - g).abs() / g).mean(),
                    (torch.log10(p) - torch.log10(g)).abs().mean(),
                    (ratio < 1.25).double().mean(),
                    (ratio < 1.25**2).double().mean(),
                    (ratio < 1.25**3).double().mean(),
                ]
            )

    def compute(self) -> dict[str, Any]:
        n = float(self.totals[0])
        mean = (self.totals[1:7] / n).tolist() if n else [float("nan")] * 6
        keys = ("rmse", "abs_rel", "log10", "delta1", "delta2", "delta3")
        result: dict[str, Any] = dict(zip(keys, mean, strict=True))
        result.update(num_images=int(n), num_images_without_valid_depth=int(self.totals[7]))
        return result


class ClassificationMetrics:
    # totals: [num_samples, top1_correct, top5_correct]
    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.totals = torch.zeros(3, dtype=torch.float64)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
            raise MetricError(f"logits {tuple(logits.shape)} do not fit targets {tuple(target.shape)}")
        logits, target = logits.detach().cpu(), target.cpu().long()
        if ((target < 0) | (target >= self.num_classes)).any():
            raise MetricError(f"class indices outside 0..{self.num_classes - 1}")
        k = min(5, self.num_classes)
        top = logits.topk(k, dim=1).indices
        hits = top == target[:, None]
        self.totals += torch.tensor([len(target), hits[:, 0].sum().item(), hits.any(dim=1).sum().item()], dtype=torch.float64)

    def compute(self) -> dict[str, Any]:
        n = float(self.totals[0])
        result: dict[str, Any] = {"top1": float(self.totals[1]) / n if n else float("nan"), "num_samples": int(n)}
        if self.num_classes >= 5:
            result["top5"] = float(self.totals[2]) / n if n else float("nan")
        return result
