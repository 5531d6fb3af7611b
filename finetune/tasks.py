"""The three finetuning tasks as ``train.loop.Task`` objects: one loop, a head is a config.

Each task owns its datasets (:mod:`finetune.data`), its model (backbone + head,
:mod:`finetune.heads`), its loss, its metric accumulator (:mod:`finetune.metrics`) and the
picture of a few predictions; :class:`train.loop.Trainer` runs all of them the same way. Tasks
are picked from :data:`TASKS`.

- ``seg``: per-pixel cross-entropy (``ignore_index`` left out); mIoU, mAcc, pixel accuracy at
  each label's original resolution.
- ``depth``: the head's output through ``max_depth · sigmoid`` (metres); scale-invariant log
  loss (Eigen et al. 2014, λ = 0.85, ×10 as in BTS) on valid pixels; RMSE, AbsRel, δ<1.25.
- ``cls``: cross-entropy on a linear layer over the pooled embedding; top-1 (and top-5).
- ``det``: torchvision's Mask R-CNN (:mod:`finetune.detection`) on COCO's layout; the loss is the
  sum of its RPN, box and mask losses (each logged); COCOeval's bbox and segm AP, AP50, AP75,
  APs/m/l and AR100 on the validation split's original pixels.

Evaluation is sharded over processes (every ``world_size``-th item) and the metric totals are
summed with ``accelerator.reduce``, so every process returns the same numbers.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data import (
    DepthFolder,
    ImageFolderSplit,
    Preprocess,
    SegmentationFolder,
    collate_eval,
)
from finetune.heads import DENSE_HEADS, DenseModel, FinetuneModel, HeadConfig, LinearClassifier
from finetune.metrics import ClassificationMetrics, DepthMetrics, SegmentationMetrics
from finetune.optim import param_groups
from train.loop import Task


@dataclass(kw_only=True)
class DataOptions:
    """What the task needs to read its data (a slice of the run config)."""

    root: Path  # dataset folder
    pre: Preprocess  # model input size and normalisation
    max_train_samples: int | None = None  # use only the first N training items
    max_eval_samples: int | None = None  # evaluate only the first N items
    reduce_zero_label: bool | None = None  # segmentation: ADE20k's convention (None: classes.json decides)
    depth_scale: float | None = None  # depth PNG units per metre (None: depth.json, else 1000)
    min_depth: float = 1e-3  # depth: smaller ground truth is invalid
    max_depth: float = 10.0  # depth: prediction range and largest valid ground truth


class FinetuneTask(Task):
    """Shared machinery; subclasses fill in the task-specific parts."""

    name: ClassVar[str]
    default_head: ClassVar[str]
    heads: ClassVar[tuple[str, ...]]

    def __init__(self, model: FinetuneModel, eval_set, facts: dict[str, Any], opts: DataOptions, *, layer_decay: float,
                 eval_batch_size: int, workers: int = 0) -> None:
        self.model = model
        self.eval_set = eval_set
        self.layer_decay = layer_decay
        self.eval_batch_size = eval_batch_size
        self.workers = workers
        self.details: dict[str, Any] = {}  # the last evaluation's per-class numbers

    # ---- to fill in ----------------------------------------------------------------------
    display_names: list[str] | None = None  # class names for pictures (None: not a class task)

    @classmethod
    @abc.abstractmethod
    def datasets(cls, opts: DataOptions) -> tuple[Any, Any, dict[str, Any]]:
        """(train set, eval set, facts) for a dataset folder. Facts hold ``num_outputs``, what the
        task needs (class names) and ``resolved``: the data options as the data decided them."""

    @classmethod
    @abc.abstractmethod
    def build_model(cls, backbone, head: HeadConfig, facts: dict[str, Any]) -> FinetuneModel:
        """Backbone + this task's head, with ``facts["num_outputs"]`` outputs."""

    @abc.abstractmethod
    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of :meth:`predict`'s output against a batch's targets."""

    @abc.abstractmethod
    def new_metrics(self):
        """An empty metric accumulator (:mod:`finetune.metrics`)."""

    @abc.abstractmethod
    def update_metrics(self, metrics, output: torch.Tensor, target: torch.Tensor) -> None:
        """Add one eval item's prediction to the accumulator."""

    def summary(self, result: dict[str, Any]) -> dict[str, float]:
        """The scalars to log from a metrics result (the rest goes to :attr:`details`)."""
        return {k: v for k, v in result.items() if isinstance(v, (int, float))}

    # ---- train.loop.Task -------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        images, target = batch
        return self.compute_loss(self.predict(model, images), target), {}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return param_groups(self.model, self.model.backbone, lr=1.0, weight_decay=weight_decay, layer_decay=self.layer_decay)

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The model's output as the loss and the metrics take it (depth: metres)."""
        return model(images)

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        from torch.utils.data import DataLoader, Subset

        rank, world = accelerator.process_index, accelerator.num_processes
        shard = Subset(self.eval_set, list(range(rank, len(self.eval_set), world)))
        loader = DataLoader(shard, batch_size=self.eval_batch_size, num_workers=self.workers, collate_fn=collate_eval)
        metrics = self.new_metrics()
        for images, targets in loader:
            output = self.predict(model, images.to(accelerator.device)).float()
            for i in range(len(images)):
                self.update_metrics(metrics, output[i : i + 1], targets[i][None].to(output.device))
        if world > 1:
            metrics.totals = accelerator.reduce(metrics.totals.to(accelerator.device), reduction="sum").cpu()
        result = metrics.compute()
        self.details = {k: v for k, v in result.items() if not isinstance(v, (int, float))}
        return self.summary(result)

    @torch.no_grad()
    def examples(self, model: nn.Module, count: int, device) -> list[tuple[torch.Tensor, Any, Any]]:
        """(normalised image, target, prediction) for the first ``count`` eval items."""
        model.eval()
        rows = []
        for index in range(min(count, len(self.eval_set))):
            image, target = self.eval_set[index]
            output = self.predict(model, image[None].to(device)).float().cpu()
            rows.append((image, target, self.to_prediction(output, target)))
        return rows

    @abc.abstractmethod
    def to_prediction(self, output: torch.Tensor, target: Any) -> Any:
        """One item's output as the picture shows it (class map, depth map, class index)."""


def _resize_to(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    size = tuple(target.shape[-2:])
    if tuple(output.shape[-2:]) == size:
        return output
    return F.interpolate(output, size=size, mode="bilinear", align_corners=False)


class SegmentationTask(FinetuneTask):
    name = "seg"
    default_head = "upernet"
    heads = tuple(DENSE_HEADS)

    def __init__(self, model, eval_set, facts, opts, **kwargs) -> None:
        super().__init__(model, eval_set, facts, opts, **kwargs)
        self.classes = facts["classes"]
        self.display_names = list(self.classes.names)

    @classmethod
    def datasets(cls, opts: DataOptions):
        kwargs = {"reduce_zero_label": opts.reduce_zero_label}
        train = SegmentationFolder(opts.root, "training", opts.pre, train=True, limit=opts.max_train_samples, **kwargs)
        val = SegmentationFolder(opts.root, "validation", opts.pre, train=False, limit=opts.max_eval_samples, **kwargs)
        return train, val, {"num_outputs": train.classes.num_classes, "classes": train.classes,
                            "resolved": {"reduce_zero_label": train.classes.reduce_zero_label}}

    @classmethod
    def build_model(cls, backbone, head, facts):
        return DenseModel(backbone, head, facts["num_outputs"])

    def compute_loss(self, output, target):
        return F.cross_entropy(_resize_to(output, target), target.long(), ignore_index=self.classes.ignore_index)

    def new_metrics(self):
        return SegmentationMetrics(self.classes.num_classes, self.classes.ignore_index, list(self.classes.names))

    def update_metrics(self, metrics, output, target):
        metrics.update(_resize_to(output, target).argmax(dim=1), target)

    def summary(self, result):
        out = super().summary(result)
        if self.classes.background is not None:  # mIoU over the foreground classes too
            ious = [v for name, v in result["per_class_iou"].items()
                    if v is not None and name != self.classes.names[self.classes.background]]
            out["mIoU_foreground"] = sum(ious) / len(ious) if ious else math.nan
        return out

    def to_prediction(self, output, target):
        return _resize_to(output, target)[0].argmax(dim=0)


class DepthTask(FinetuneTask):
    name = "depth"
    default_head = "dpt"
    heads = tuple(DENSE_HEADS)

    def __init__(self, model, eval_set, facts, opts, **kwargs) -> None:
        super().__init__(model, eval_set, facts, opts, **kwargs)
        self.min_depth = opts.min_depth
        self.max_depth = opts.max_depth

    @classmethod
    def datasets(cls, opts: DataOptions):
        train = DepthFolder(opts.root, "training", opts.pre, train=True, limit=opts.max_train_samples, depth_scale=opts.depth_scale)
        val = DepthFolder(opts.root, "validation", opts.pre, train=False, limit=opts.max_eval_samples, depth_scale=opts.depth_scale)
        return train, val, {"num_outputs": 1, "resolved": {"depth_scale": train.depth_scale}}

    @classmethod
    def build_model(cls, backbone, head, facts):
        return DenseModel(backbone, head, 1)

    def predict(self, model, images):
        return self.max_depth * torch.sigmoid(model(images).float())

    def compute_loss(self, output, target):
        pred = _resize_to(output, target)
        valid = (target > self.min_depth) & (target <= self.max_depth)
        if not valid.any():  # a batch without ground truth teaches nothing, but keeps the graph
            return pred.sum() * 0.0
        g = torch.log(pred[valid].clamp(min=self.min_depth)) - torch.log(target[valid])
        return 10.0 * torch.sqrt((g**2).mean() - 0.85 * g.mean() ** 2 + 1e-8)

    def new_metrics(self):
        return DepthMetrics(self.min_depth, self.max_depth)

    def update_metrics(self, metrics, output, target):
        metrics.update(_resize_to(output, target), target)

    def to_prediction(self, output, target):
        return _resize_to(output, target)[0, 0]


class ClassificationTask(FinetuneTask):
    name = "cls"
    default_head = "linear"
    heads = ("linear",)

    def __init__(self, model, eval_set, facts, opts, **kwargs) -> None:
        super().__init__(model, eval_set, facts, opts, **kwargs)
        self.class_names = facts["class_names"]
        self.display_names = list(self.class_names)

    @classmethod
    def datasets(cls, opts: DataOptions):
        train = ImageFolderSplit(opts.root, "train", opts.pre, train=True, limit=opts.max_train_samples)
        val = ImageFolderSplit(opts.root, "val", opts.pre, train=False, limit=opts.max_eval_samples, classes=train.classes)
        return train, val, {"num_outputs": len(train.classes), "class_names": train.class_names, "resolved": {}}

    @classmethod
    def build_model(cls, backbone, head, facts):
        return LinearClassifier(backbone, head, facts["num_outputs"])

    def compute_loss(self, output, target):
        return F.cross_entropy(output, target.long())

    def new_metrics(self):
        return ClassificationMetrics(len(self.class_names))

    def update_metrics(self, metrics, output, target):
        metrics.update(output, target.reshape(-1))

    def to_prediction(self, output, target):
        return int(output[0].argmax())


class CocoResults:
    """The detection metric accumulator: COCO result entries of the images predicted on."""

    def __init__(self, gt, category_ids: list[int]) -> None:
        self.gt = gt
        self.category_ids = category_ids
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def update(self, output: dict[str, torch.Tensor], target: dict[str, Any]) -> None:
        from finetune.detection import to_coco_results

        self.results += to_coco_results(output, target, self.category_ids)
        self.image_ids.append(int(target["image_id"]))

    def compute(self) -> dict[str, Any]:
        from finetune.detection import coco_metrics

        return coco_metrics(self.gt, self.results, image_ids=self.image_ids)


class DetectionTask(FinetuneTask):
    name = "det"
    default_head = "maskrcnn"
    heads = ("maskrcnn",)

    def __init__(self, model, eval_set, facts, opts, **kwargs) -> None:
        super().__init__(model, eval_set, facts, opts, **kwargs)
        self.category_ids = facts["category_ids"]
        self.display_names = ["background", *facts["class_names"]]

    @staticmethod
    def collate(batch):
        from finetune.detection import collate_detection

        return collate_detection(batch)

    @classmethod
    def datasets(cls, opts: DataOptions):
        from finetune.detection import CocoDetectionFolder

        train = CocoDetectionFolder(opts.root, "training", opts.pre, train=True, limit=opts.max_train_samples)
        val = CocoDetectionFolder(opts.root, "validation", opts.pre, train=False, limit=opts.max_eval_samples,
                                  category_ids=train.category_ids)
        return train, val, {"num_outputs": train.num_classes, "category_ids": train.category_ids,
                            "class_names": train.class_names, "image_size": opts.pre.image_size,
                            "mean": opts.pre.mean, "std": opts.pre.std, "resolved": {}}

    @classmethod
    def build_model(cls, backbone, head, facts):
        from finetune.detection import DetectionModel

        return DetectionModel(backbone, head, facts["num_outputs"], image_size=facts["image_size"], mean=facts["mean"],
                              std=facts["std"])

    def loss(self, model, batch):
        images, targets = batch
        targets = [{k: v.to(images.device) for k, v in t.items() if isinstance(v, torch.Tensor)} for t in targets]
        losses = model(images, targets)
        return self.compute_loss(losses, targets), {name: value.detach() for name, value in losses.items()}

    def compute_loss(self, output, target):
        return sum(output.values())  # Mask R-CNN's five losses, unweighted (torchvision's recipe)

    def new_metrics(self):
        return CocoResults(self.eval_set.coco, self.category_ids)

    def update_metrics(self, metrics, output, target):
        metrics.update(output, target)

    def evaluate(self, model, accelerator):
        from torch.utils.data import DataLoader, Subset

        from finetune.detection import coco_metrics

        rank, world = accelerator.process_index, accelerator.num_processes
        shard = Subset(self.eval_set, list(range(rank, len(self.eval_set), world)))
        loader = DataLoader(shard, batch_size=self.eval_batch_size, num_workers=self.workers, collate_fn=self.collate)
        metrics = self.new_metrics()
        for images, targets in loader:
            outputs = model(images.to(accelerator.device))
            for output, target in zip(outputs, targets, strict=True):
                self.update_metrics(metrics, {k: v.float().cpu() for k, v in output.items()}, target)
        if world > 1:  # every process scores the union of the shards
            from accelerate.utils import gather_object

            results = gather_object([metrics.results])
            image_ids = gather_object([metrics.image_ids])
            result = coco_metrics(self.eval_set.coco, [r for part in results for r in part],
                                  image_ids=[i for part in image_ids for i in part])
        else:
            result = metrics.compute()
        self.details = {}
        return self.summary(result)

    @torch.no_grad()
    def examples(self, model, count, device):
        model.eval()
        rows = []
        for index in range(min(count, len(self.eval_set))):
            image, target = self.eval_set[index]
            output = model(image[None].to(device))[0]
            rows.append((image, target, self.to_prediction(output, target)))
        return rows

    def to_prediction(self, output, target):
        return {k: v.detach().float().cpu() for k, v in output.items()}


TASKS: dict[str, type[FinetuneTask]] = {
    task.name: task for task in (SegmentationTask, DepthTask, ClassificationTask, DetectionTask)
}
