"""Readers for the standard dense-task and classification folder layouts.

The embedded world's eval sets and the public datasets share these layouts:

- segmentation (ADE20k's)::

    DIR/images/{training,validation}/<id>.jpg
    DIR/annotations/{training,validation}/<id>.png   single-channel class map (L, P or 16-bit)
    DIR/classes.json

  ``classes.json`` is either a list of class names or an object with ``classes`` (names by
  index, a list or an ``{"index": name}`` object), ``ignore_index`` (label value left out of
  loss and metrics, default 255), ``reduce_zero_label`` (ADE20k's convention: 0 is "other" and
  ignored, labels 1..K become 0..K-1; default false) and optionally ``background`` (index of
  a background class, recorded in the metrics; ``background_index`` too). With
  ``reduce_zero_label`` the names list the K classes *after* reduction. ``num_classes``, when
  present, must match. Extra keys (palette, note) are allowed.
- depth (NYUv2-style)::

    DIR/images/{training,validation}/<id>.jpg
    DIR/depth/{training,validation}/<id>.png         uint16, millimetres; 0 = invalid
    DIR/depth.json                                   optional: {"scale_to_metres": 0.001}
- classification (ImageFolder)::

    DIR/{train,val}/<class_name>/<id>.jpg            optional DIR/classnames.txt (one per line,
                                                     in sorted folder order)

``train``/``val`` are accepted for the dense layouts too. A file that breaks the layout (a
missing annotation, an RGB mask, a label outside the class range, sizes that differ) raises a
:class:`DatasetError` naming the file and what to do.

Evaluation items keep the label at its original resolution (predictions are resized to it);
training items resize and augment image and label together (torchvision ``transforms.v2``).
"""

from __future__ import annotations

import abc
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import ImageFolder

from base.cli import UsageError
from base.shards import decode_image

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SPLIT_ALIASES = {"training": ("training", "train"), "validation": ("validation", "val")}


class DatasetError(UsageError):
    """A dataset folder or file that does not follow its layout."""


# ---------------------------------------------------------------------------------------------
# Layout helpers


def _split_dir(root: Path, sub: str, split: str) -> Path:
    """``root/sub/<split>``, trying the split's aliases (training/train, validation/val)."""
    for name in SPLIT_ALIASES.get(split, (split,)):
        candidate = root / sub / name if sub else root / name
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(root / sub / n if sub else root / n) for n in SPLIT_ALIASES.get(split, (split,)))
    raise DatasetError(f"{root}: no {split} split folder (tried {tried})")


def _existing_folder(root: str | os.PathLike) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset folder")
    return path


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _read_image(path: Path):
    try:
        return decode_image(path.read_bytes())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from err


def _read_map(path: Path, what: str) -> np.ndarray:
    """A single-channel PNG (8- or 16-bit, greyscale or palette indices) as an integer array."""
    try:
        image = decode_image(path.read_bytes(), mode="")
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read {what} ({err})") from err
    if image.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
        raise DatasetError(f"{path}: {what} must be a single-channel PNG (L, P or 16-bit), not mode {image.mode}")
    return np.asarray(image).astype(np.int64)


def _pair_files(images_dir: Path, targets_dir: Path, what: str) -> list[tuple[Path, Path]]:
    images = _list_images(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no images (.jpg, .jpeg, .png, .webp)")
    pairs, missing = [], []
    for image in images:
        target = targets_dir / f"{image.stem}.png"
        (pairs if target.is_file() else missing).append((image, target))
    if missing:
        examples = ", ".join(str(t) for _, t in missing[:3])
        raise DatasetError(f"{len(missing)} of {len(images)} images in {images_dir} have no {what} (e.g. {examples})")
    return pairs


def _check_same_size(image_path: Path, image_size: tuple[int, int], target_path: Path, target_shape: tuple[int, ...]) -> None:
    if (image_size[1], image_size[0]) != tuple(target_shape):
        raise DatasetError(
            f"{target_path}: {target_shape[1]}x{target_shape[0]} does not match its image {image_path} "
            f"({image_size[0]}x{image_size[1]})"
        )


# ---------------------------------------------------------------------------------------------
# Segmentation


@dataclass(frozen=True, slots=True)
class ClassInfo:
    names: tuple[str, ...]  # class names by (reduced) label index
    ignore_index: int = 255  # label value left out of loss and metrics
    reduce_zero_label: bool = False  # ADE20k: 0 is ignored, 1..K become 0..K-1
    background: int | None = None  # index of a background class, if the dataset names one

    @property
    def num_classes(self) -> int:
        return len(self.names)


def read_classes(path: Path, *, reduce_zero_label: bool | None = None) -> ClassInfo:
    """Read ``classes.json``; ``reduce_zero_label`` (the config option) overrides the file."""
    if not path.is_file():
        raise DatasetError(
            f"{path}: missing; write the class names as JSON, e.g. "
            '{"classes": ["background", "sky", ...], "ignore_index": 255, "reduce_zero_label": false}'
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not readable JSON ({err})") from err
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or not isinstance(data.get("classes", data.get("names")), (list, dict)):
        raise DatasetError(f'{path}: expected a list of class names or an object with "classes" (list or index→name)')
    raw = data.get("classes", data.get("names"))
    if isinstance(raw, dict):
        try:
            indexed = {int(k): str(v) for k, v in raw.items()}
        except ValueError as err:
            raise DatasetError(f'{path}: "classes" keys must be integer indices ({err})') from err
        if sorted(indexed) != list(range(len(indexed))):
            raise DatasetError(f'{path}: "classes" indices must be 0..{len(indexed) - 1} without gaps')
        names = tuple(indexed[i] for i in range(len(indexed)))
    else:
        names = tuple(str(n) for n in raw)
    if not names:
        raise DatasetError(f"{path}: no classes listed")
    reduce = bool(data.get("reduce_zero_label", False)) if reduce_zero_label is None else reduce_zero_label
    ignore = int(data.get("ignore_index", 255))
    if 0 <= ignore < len(names):
        raise DatasetError(f"{path}: ignore_index {ignore} is also a class index (0..{len(names) - 1})")
    if "num_classes" in data and int(data["num_classes"]) != len(names):
        raise DatasetError(f"{path}: num_classes is {data['num_classes']} but {len(names)} classes are listed")
    background = data.get("background", data.get("background_index"))
    return ClassInfo(names, ignore, reduce, None if background is None else int(background))


def prepare_labels(raw: np.ndarray, info: ClassInfo, path: Path) -> np.ndarray:
    """Apply the label convention and check every value is a class or the ignore index."""
    labels = raw.copy()
    if info.reduce_zero_label:
        labels[raw == 0] = info.ignore_index
        shifted = raw != 0
        labels[shifted] = raw[shifted] - 1
        labels[raw == info.ignore_index] = info.ignore_index  # an explicit ignore value stays ignored
    bad = (labels != info.ignore_index) & ((labels < 0) | (labels >= info.num_classes))
    if bad.any():
        values = sorted({int(v) for v in raw[bad]})[:10]
        convention = " after reduce_zero_label" if info.reduce_zero_label else ""
        raise DatasetError(
            f"{path}: label values {values} are outside the {info.num_classes} classes of classes.json "
            f"(0..{info.num_classes - 1}{convention}) and are not the ignore index {info.ignore_index}; "
            "fix the mask, list the missing classes, or set reduce_zero_label"
        )
    return labels


# ---------------------------------------------------------------------------------------------
# Transforms (image + target together)


@dataclass(frozen=True, slots=True)
class Preprocess:
    image_size: int  # square side the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]


def dense_transform(pre: Preprocess, *, train: bool, scale_jitter: bool) -> Callable | None:
    """torchvision v2 pipeline over (Image, Mask); masks are resampled nearest."""
    from torchvision.transforms import v2

    size = (pre.image_size, pre.image_size)
    ops: list[Any] = []
    if train and scale_jitter:
        ops.append(v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True))
    elif train:
        ops.append(v2.Resize(size, antialias=True))
    if train:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops) if ops else None  # evaluation: the label keeps its size


def image_to_tensor(image, pre: Preprocess, *, resize: bool) -> torch.Tensor:
    from torchvision.transforms import v2

    ops: list[Any] = [v2.ToImage()]
    if resize:
        ops.append(v2.Resize((pre.image_size, pre.image_size), antialias=True))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    return v2.Compose(ops)(image)


class DenseFolder(torch.utils.data.Dataset, abc.ABC):
    """Image + per-pixel target pairs; subclasses read the target."""

    target_dir = ""
    what = ""
    scale_jitter = True  # random resized crops in training

    def __init__(self, root: str | os.PathLike, split: str, pre: Preprocess, *, train: bool, limit: int | None = None) -> None:
        self.root = _existing_folder(root)
        self.split = split
        self.pre = pre
        self.train = train
        images_dir = _split_dir(self.root, "images", split)
        targets_dir = self.root / self.target_dir / images_dir.name
        if not targets_dir.is_dir():
            raise DatasetError(f"{targets_dir}: missing ({self.what} for {images_dir})")
        self.pairs = _pair_files(images_dir, targets_dir, self.what)
        if limit is not None:
            self.pairs = self.pairs[:limit]
        self.transform = dense_transform(pre, train=train, scale_jitter=self.scale_jitter)

    def __len__(self) -> int:
        return len(self.pairs)

    @abc.abstractmethod
    def read_target(self, path: Path) -> np.ndarray:
        """The target map of one file, checked (labels in range, depth in metres)."""

    @abc.abstractmethod
    def target_tensor(self, target: np.ndarray) -> torch.Tensor:
        """The target map as the tensor a batch holds."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        image_path, target_path = self.pairs[index]
        image = _read_image(image_path)
        target = self.read_target(target_path)
        _check_same_size(image_path, image.size, target_path, target.shape)
        if not self.train:  # the model sees a resized image; metrics use the original target
            return image_to_tensor(image, self.pre, resize=True), self.target_tensor(target)
        image_t, target_t = self.transform(tv_tensors.Image(image_to_uint8(image)), tv_tensors.Mask(self.target_tensor(target)))
        return image_to_tensor(image_t, self.pre, resize=False), target_t.as_subclass(torch.Tensor)


def image_to_uint8(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class SegmentationFolder(DenseFolder):
    target_dir = "annotations"
    what = "annotation"

    def __init__(self, root, split, pre, *, train, limit=None, reduce_zero_label: bool | None = None) -> None:
        self.classes = read_classes(_existing_folder(root) / "classes.json", reduce_zero_label=reduce_zero_label)
        super().__init__(root, split, pre, train=train, limit=limit)

    def read_target(self, path: Path) -> np.ndarray:
        return prepare_labels(_read_map(path, "annotation"), self.classes, path)

    def target_tensor(self, target: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(target)


class DepthFolder(DenseFolder):
    target_dir = "depth"
    what = "depth map"
    scale_jitter = False  # zooming changes apparent distance; depth keeps geometry

    def __init__(self, root, split, pre, *, train, limit=None, depth_scale: float | None = None) -> None:
        """``depth_scale``: PNG units per metre; None reads ``depth.json`` or assumes millimetres."""
        self.depth_scale = depth_scale if depth_scale is not None else read_depth_scale(_existing_folder(root))
        if self.depth_scale <= 0:
            raise ValueError("depth_scale: must be positive")
        super().__init__(root, split, pre, train=train, limit=limit)

    def read_target(self, path: Path) -> np.ndarray:
        raw = _read_map(path, "depth map")
        if raw.min() < 0:
            raise DatasetError(f"{path}: negative depth values")
        return raw.astype(np.float32) / self.depth_scale  # metres; 0 stays 0 = invalid

    def target_tensor(self, target: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(target)[None]  # 1×H×W


def read_depth_scale(root: Path) -> float:
    """PNG units per metre from ``depth.json`` (``scale_to_metres``), else 1000 (millimetres)."""
    path = root / "depth.json"
    if not path.is_file():
        return 1000.0
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        scale = float(data["scale_to_metres"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DatasetError(f'{path}: expected {{"scale_to_metres": 0.001}} ({err})') from err
    if scale <= 0:
        raise DatasetError(f"{path}: scale_to_metres must be positive, got {scale}")
    return 1.0 / scale


# ---------------------------------------------------------------------------------------------
# Classification


def read_classnames(root: Path, folders: Sequence[str]) -> list[str]:
    path = root / "classnames.txt"
    if not path.is_file():
        return list(folders)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise DatasetError(f"{path}: lists {len(names)} names but {root} has {len(folders)} class folders")
    return names


class ImageFolderSplit(torch.utils.data.Dataset):
    """torchvision's ImageFolder over ``DIR/<split>``, with the class list fixed by ``train``."""

    def __init__(self, root: str | os.PathLike, split: str, pre: Preprocess, *, train: bool, limit: int | None = None,
                 classes: Sequence[str] | None = None) -> None:
        from torchvision.transforms import v2

        self.root = _existing_folder(root)
        folder = _split_dir(self.root, "", "train" if split in ("train", "training") else "val")
        found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise DatasetError(f"{folder}: no class folders (ImageFolder layout: {folder}/<class_name>/<id>.jpg)")
        classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DatasetError(f"{folder}: class folders {unknown[:5]} are not among the training classes")
        self.classes = classes
        self.class_names = read_classnames(self.root, classes)
        size = pre.image_size
        if train:
            ops: list[Any] = [v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            ops = [v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]

        self.folder = FixedClassesImageFolder(str(folder), classes, transform=v2.Compose(ops))
        if not len(self.folder):
            raise DatasetError(f"{folder}: no images in its class folders")
        self.indices = list(range(len(self.folder)))
        if limit is not None:
            self.indices = self.indices[:: max(1, len(self.indices) // limit)][:limit]  # spread over classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.folder[self.indices[index]]


def _load_rgb(path: str):
    return _read_image(Path(path))


class FixedClassesImageFolder(ImageFolder):
    """torchvision's ImageFolder with the class list given (the training split's), not found."""

    def __init__(self, root: str, classes: Sequence[str], **kwargs: Any) -> None:
        self.fixed_classes = list(classes)
        super().__init__(root, loader=_load_rgb, allow_empty=True, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.fixed_classes, {name: i for i, name in enumerate(self.fixed_classes)}


def collate_eval(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    """Stack images; keep per-pixel targets of different sizes as a list."""
    images = torch.stack([item[0] for item in batch])
    targets = [item[1] for item in batch]
    if isinstance(targets[0], torch.Tensor) and all(t.shape == targets[0].shape for t in targets):
        return images, torch.stack(targets)
    if not isinstance(targets[0], torch.Tensor):
        return images, torch.as_tensor(targets)
    return images, targets
