"""Object detection and instance segmentation: COCO's layout in, torchvision's Mask R-CNN, COCO's metrics out.

- :class:`CocoDetectionFolder` reads MS COCO's layout unchanged::

    DIR/annotations/instances_{train,val}*.json      (e.g. instances_train2017.json)
    DIR/{train,val}*/<file_name>                       (the json's stem without "instances_",
                                                        e.g. train2017/; or DIR/images/<that>/)

  Masks are read with pycocotools (polygons and RLE alike); crowd regions are left out of the
  training targets (COCOeval treats them itself). Every image is letterboxed: resized so its
  longer side is ``image_size`` and padded right/bottom to a square, so every batch has one
  shape (a ViT's position embeddings are resampled once) and predictions map back to the
  original pixels by one scale factor. Training adds a horizontal flip (torchvision ``v2``).
- :class:`DetectionModel` is ``torchvision.models.detection.MaskRCNN`` (its RPN, RoI heads, box
  and mask heads) on :class:`DetectionFeatures`: a ViT's last block through ViTDet's simple
  feature pyramid, or a hierarchical backbone's stages through an FPN, each plus torchvision's
  ``LastLevelMaxPool`` level for the RPN. Anchors are 8 × each level's stride (32 px at stride 4,
  as torchvision's and ViTDet's defaults), aspect ratios 0.5, 1, 2.
- :func:`coco_metrics` runs pycocotools' ``COCOeval`` for ``bbox`` and ``segm``: AP
  (IoU .50:.95), AP50, AP75, APs/m/l and AR100 (recall with 100 detections per image); a value
  COCOeval reports as -1 (no ground truth of that size) is NaN.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.data import DatasetError, Preprocess, _existing_folder, _read_image, image_to_uint8
from finetune.heads import FinetuneModel, HeadConfig, SimpleFeaturePyramid, StageFPN

SPLITS = {"training": ("train", "training"), "validation": ("val", "validation")}
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
AR_INDEX = 8  # COCOeval.stats[8]: AR with 100 detections per image
IOU_TYPES = ("bbox", "segm")


def _quiet():
    """pycocotools prints progress on stdout; keep the command's output to its summary."""
    return contextlib.redirect_stdout(io.StringIO())


def load_coco(path: str | os.PathLike):
    """A pycocotools ``COCO`` of an annotation file, with one clear line when it is not one."""
    import json

    from pycocotools.coco import COCO

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not readable JSON ({err})") from err
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file (no list {', '.join(missing)})")
    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------------------------
# Layout


def find_annotation_file(root: Path, split: str) -> Path:
    """``root/annotations/instances_<train|val>*.json`` (exactly one)."""
    folder = root / "annotations"
    found: list[Path] = []
    for alias in SPLITS.get(split, (split,)):
        found += [p for p in sorted(folder.glob(f"instances_{alias}*.json")) if p not in found]
    if not found:
        names = " or ".join(f"instances_{a}*.json" for a in SPLITS.get(split, (split,)))
        raise DatasetError(f"{folder}: no {names} (COCO layout: annotations/instances_train2017.json, train2017/)")
    if len(found) > 1:
        raise DatasetError(f"{folder}: several {split} annotation files ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def find_image_folder(root: Path, annotation_file: Path) -> Path:
    """The image folder named like the annotation file: ``instances_val2017.json`` → ``val2017/``."""
    name = annotation_file.stem.removeprefix("instances_")
    for candidate in (root / name, root / "images" / name):
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"{annotation_file}: no image folder {root / name} (or {root / 'images' / name})")


def categories_of(coco) -> tuple[list[int], list[str]]:
    """COCO category ids in ascending order and their names (label k+1 ↔ ids[k]; 0 = background)."""
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    if not cats:
        raise DatasetError("the annotation file lists no categories")
    return [int(c["id"]) for c in cats], [str(c["name"]) for c in cats]


# ---------------------------------------------------------------------------------------------
# Dataset


class CocoDetectionFolder(torch.utils.data.Dataset):
    """Letterboxed images and Mask R-CNN targets from a COCO-layout folder.

    An item is ``(image, target)``: ``image`` 3×S×S float in [0, 1] (the detector normalises),
    ``target`` a dict of ``boxes`` (N×4 xyxy, letterboxed pixels), ``labels`` (N, 1..K),
    ``masks`` (N×S×S uint8) and, for evaluation, ``image_id``, ``scale`` and ``size`` (H, W).
    """

    def __init__(self, root: str | os.PathLike, split: str, pre: Preprocess, *, train: bool,
                 limit: int | None = None, category_ids: Sequence[int] | None = None) -> None:
        self.root = _existing_folder(root)
        self.pre = pre
        self.train = train
        self.annotation_file = find_annotation_file(self.root, split)
        self.image_folder = find_image_folder(self.root, self.annotation_file)
        self.coco = load_coco(self.annotation_file)
        ids, names = categories_of(self.coco)
        if category_ids is not None and list(category_ids) != ids:
            raise DatasetError(f"{self.annotation_file}: its categories {ids[:10]} differ from the training split's")
        self.category_ids, self.class_names = ids, names
        self.label_of = {cat: k + 1 for k, cat in enumerate(ids)}
        self.image_ids = sorted(int(i) for i in self.coco.getImgIds())
        if not self.image_ids:
            raise DatasetError(f"{self.annotation_file}: lists no images")
        if limit is not None:
            self.image_ids = self.image_ids[:limit]
        first = self.image_folder / self.coco.imgs[self.image_ids[0]]["file_name"]
        if not first.is_file():
            raise DatasetError(f"{first}: missing (named by {self.annotation_file})")

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = _read_image(self.image_folder / info["file_name"])
        width, height = image.size
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0 and a["category_id"] in self.label_of]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        if (info.get("height"), info.get("width")) != (height, width):
            if "height" in info or "width" in info:
                raise DatasetError(f"{self.annotation_file}: image {image_id} is {info.get('width')}x{info.get('height')} "
                                   f"there but {width}x{height} in {info['file_name']}")
            info.update(height=height, width=width)  # annToMask reads the size from the image entry
        masks = np.stack([self.coco.annToMask(a) if a.get("segmentation") else _box_mask(a["bbox"], height, width)
                          for a in anns]) if anns else np.zeros((0, height, width), np.uint8)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)

        side = self.pre.image_size
        scale = side / max(width, height)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        img = TF.resize(tv_tensors.Image(image_to_uint8(image)), [new_h, new_w], antialias=True)
        bbs = TF.resize(tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)), [new_h, new_w])
        msk = TF.resize(tv_tensors.Mask(torch.from_numpy(masks)), [new_h, new_w])
        if self.train and torch.rand(()) < 0.5:
            img, bbs, msk = TF.horizontal_flip(img), TF.horizontal_flip(bbs), TF.horizontal_flip(msk)
        pad = [0, 0, side - new_w, side - new_h]  # left, top, right, bottom
        img, bbs, msk = TF.pad(img, pad), TF.pad(bbs, pad), TF.pad(msk, pad)
        boxes = bbs.as_subclass(torch.Tensor)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # torchvision refuses flat boxes
        target = {"boxes": boxes[keep], "labels": labels[keep], "masks": msk.as_subclass(torch.Tensor)[keep].to(torch.uint8)}
        if not self.train:
            target |= {"image_id": image_id, "scale": scale, "size": (height, width)}
        return img.as_subclass(torch.Tensor).float() / 255.0, target


def _box_mask(bbox: Sequence[float], height: int, width: int) -> np.ndarray:
    """An annotation without a segmentation: its box as the mask."""
    x, y, w, h = bbox
    mask = np.zeros((height, width), np.uint8)
    mask[int(math.floor(y)) : int(math.ceil(y + h)), int(math.floor(x)) : int(math.ceil(x + w))] = 1
    return mask


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack the (equal-size, letterboxed) images; keep the targets a list of dicts."""
    return torch.stack([item[0] for item in batch]), [item[1] for item in batch]


# ---------------------------------------------------------------------------------------------
# Model


class DetectionFeatures(nn.Module):
    """The detector's backbone: our backbone + its neck → torchvision's ordered feature maps."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = body
        self.out_channels = channels
        self.frozen = False
        if body.hierarchical:
            self.neck = StageFPN(body.level_channels, channels, extra_max_pool=True)
            self.strides = [*body.level_strides, 2 * body.level_strides[-1]]
            self.extra = None
        else:
            self.neck = SimpleFeaturePyramid(body.width, channels)
            stride = body.patch_size[0]
            self.strides = [int(stride / s) for s in SimpleFeaturePyramid.scales] + [4 * stride]
            self.extra = LastLevelMaxPool()
        self.names = [str(i) for i in range(4)] + ["pool"]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            output = self.body(images, pooled=False)
        if self.body.hierarchical:
            levels = self.neck(output.levels)
        else:
            levels = self.neck(output.features)
            levels, _ = self.extra(levels, [], self.names[:4])
        return OrderedDict(zip(self.names, levels, strict=True))


class DetectionModel(FinetuneModel):
    """torchvision's Mask R-CNN on a qcap backbone. ``forward(images, targets)``: the loss dict in
    training, the detections (letterboxed pixels) in eval mode."""

    def __init__(self, backbone: nn.Module, head_cfg: HeadConfig, num_classes: int, *, image_size: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.ops import MultiScaleRoIAlign

        if head_cfg.name != "maskrcnn":
            raise ValueError(f"head: detection takes the maskrcnn head, not {head_cfg.name!r}")
        for param in backbone.pooling_parameters():  # the pooled embedding takes no part in detection
            param.requires_grad_(False)
        channels = head_cfg.neck_channels
        features = DetectionFeatures(backbone, channels)
        anchors = AnchorGenerator(sizes=tuple((8 * s,) for s in features.strides),
                                  aspect_ratios=((0.5, 1.0, 2.0),) * len(features.strides))
        representation = 2 * head_cfg.channels  # torchvision's 1024 at the default 512
        self.detector = MaskRCNN(
            features, num_classes=None, min_size=image_size, max_size=image_size, image_mean=list(mean),
            image_std=list(std), rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(features.names[:4], output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes + 1),
            mask_roi_pool=MultiScaleRoIAlign(features.names[:4], output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1),
        )
        self.detector.transform.size_divisible = backbone.patch_size[0]  # letterboxed squares: no extra padding

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.detector.backbone.body

    def freeze_backbone(self) -> None:
        super().freeze_backbone()
        self.detector.backbone.frozen = True

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        return self.detector(list(images), targets)


# ---------------------------------------------------------------------------------------------
# Predictions → COCO results → COCOeval


def to_coco_results(output: dict[str, torch.Tensor], target: dict[str, Any], category_ids: Sequence[int],
                    *, mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """One image's detections as COCO result entries in its original pixels (box xywh + RLE mask)."""
    import pycocotools.mask as mask_utils
    import torch.nn.functional as F

    height, width = target["size"]
    scale = float(target["scale"])
    boxes = (output["boxes"].float().cpu() / scale)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    results = []
    masks = output.get("masks")
    if masks is not None and len(masks):
        probs = F.interpolate(masks[:, :, :new_h, :new_w].float().cpu(), size=(height, width), mode="bilinear",
                              align_corners=False)[:, 0]
        binary = np.asfortranarray((probs > mask_threshold).numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_utils.encode(binary)
    else:
        rles = []
    for k, (box, label, score) in enumerate(zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist(),
                                                strict=True)):
        entry = {"image_id": int(target["image_id"]), "category_id": int(category_ids[int(label) - 1]),
                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)}
        if k < len(rles):
            rle = dict(rles[k])
            rle["counts"] = rle["counts"].decode("ascii")
            entry["segmentation"] = rle
        results.append(entry)
    return results


def coco_metrics(gt, results: list[dict[str, Any]], *, image_ids: Sequence[int] | None = None,
                 iou_types: Sequence[str] = IOU_TYPES) -> dict[str, float]:
    """COCOeval of ``results`` (COCO result entries) against the ``gt`` COCO: ``<type>_AP`` … ``<type>_AR100``.

    Segm results need a ``segmentation`` in each entry. No result at all scores 0 where there is
    ground truth. ``image_ids`` restricts the evaluation to the images predicted on.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = sorted(int(i) for i in (image_ids if image_ids is not None else gt.getImgIds()))
    out: dict[str, float] = {"num_images": float(len(ids)), "num_detections": float(len(results))}
    for iou_type in iou_types:
        entries = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if entries:
            with _quiet():
                dt = gt.loadRes([dict(r) for r in entries])
        else:  # loadRes refuses an empty list; an empty result set scores 0
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                          "annotations": []}
            with _quiet():
                dt.createIndex()
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.imgIds = ids
        with _quiet():
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [float(v) for v in evaluator.stats]
        for name, value in zip(STAT_NAMES, stats[:6], strict=True):
            out[f"{iou_type}_{name}"] = math.nan if value < 0 else value
        out[f"{iou_type}_AR100"] = math.nan if stats[AR_INDEX] < 0 else stats[AR_INDEX]
    return out
