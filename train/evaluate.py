"""Zero-shot classification and image–text retrieval of an open_clip model.

Classification folders (ImageNet-style; the embedded world's ``W/eval/cls``)::

    DIR/val/<class_folder>/<id>.jpg     # or DIR/<class_folder>/... (the folder is the split)
    DIR/classnames.txt                  # optional: display name per label, labels = sorted folders
    DIR/templates.txt                   # optional: one prompt template per line, with '{}'

Without ``classnames.txt`` the folder names are the class names (``_`` read as a space;
1000 WordNet-id folders get open_clip's ImageNet class names); without ``templates.txt``
open_clip's OpenAI ImageNet templates are used. The classifier is open_clip's
``build_zero_shot_classifier``.

Retrieval data is a shard folder (image + ``text``; several references in ``meta["captions"]``
count as several texts of one image, MSCOCO's protocol). ``--eval-data W/eval`` finds both
``W/eval/cls`` and ``W/eval/retrieval``.

Undecodable evaluation images are skipped and counted (``num_skipped``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from base.shards import ShardError, decode_image, expand_shards, iter_samples
from train.captions import real_captions

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_WNID = re.compile(r"^n\d{8}$")


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate at the end of training (and every --eval-every steps)."""

    classification: Path | None = None  # zero-shot classification folder
    retrieval: str | None = None  # retrieval shard list
    batch_size: int = 64  # images per forward pass
    workers: int = 0  # DataLoader workers for evaluation images

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"eval_batch_size: must be positive, got {self.batch_size}")


def resolve_eval_data(path: str | os.PathLike | None, retrieval: str | None = None) -> tuple[Path | None, str | None]:
    """``--eval-data``/``--retrieval-data`` → (classification folder, retrieval shard spec)."""
    if path is None:
        return None, retrieval
    root = Path(path)
    if not root.is_dir():
        raise ShardError(f"{root}: --eval-data must be a folder (classification folder, or one holding cls/)")
    cls: Path | None = root
    if (root / "cls").is_dir():
        cls = root / "cls"
        if retrieval is None and (root / "retrieval").is_dir():
            retrieval = str(root / "retrieval")
    elif (root / "retrieval").is_dir() and not _class_dirs(root / "val" if (root / "val").is_dir() else root):
        cls = None
        retrieval = retrieval or str(root / "retrieval")
    return cls, retrieval


@dataclass(slots=True)
class ClassificationSet:
    split_dir: Path  # the folder holding one sub-folder per class
    class_dirs: list[str]  # sorted folder names; index = label
    classnames: list[str]  # display names, one per label
    templates: list[Any]  # format strings with '{}' or callables (open_clip's templates)
    files: list[tuple[Path, int]]  # (image path, label)


def _class_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_classification(folder: str | os.PathLike) -> ClassificationSet:
    """Read a classification folder (see the module docstring); ShardError on a broken one."""
    import open_clip

    root = Path(folder)
    split = root / "val" if (root / "val").is_dir() else root
    class_dirs = _class_dirs(split)
    if not class_dirs:
        raise ShardError(f"{split}: no class folders (expected {split}/<class>/<image>.jpg)")
    names_file = next((p for p in (root / "classnames.txt", split / "classnames.txt") if p.is_file()), None)
    if names_file is not None:
        classnames = _read_lines(names_file)
        if len(classnames) != len(class_dirs):
            raise ShardError(
                f"{names_file}: {len(classnames)} class names for {len(class_dirs)} class folders in {split}; "
                "it needs one display name per folder, in sorted folder order"
            )
    elif len(class_dirs) == 1000 and all(_WNID.match(d) for d in class_dirs):
        classnames = list(open_clip.IMAGENET_CLASSNAMES)
    else:
        classnames = [d.replace("_", " ") for d in class_dirs]
    templates_file = next((p for p in (root / "templates.txt", split / "templates.txt") if p.is_file()), None)
    if templates_file is not None:
        templates: list[Any] = _read_lines(templates_file)
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            raise ShardError(f"{templates_file}: every template needs a '{{}}' for the class name; bad: {bad[:3]}")
    else:
        templates = list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    files = []
    for label, name in enumerate(class_dirs):
        for path in sorted((split / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append((path, label))
    if not files:
        raise ShardError(f"{split}: class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return ClassificationSet(split, class_dirs, classnames, templates, files)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[tuple[Path, int]], preprocess) -> None:
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path, label = self.files[index]
        try:
            image = decode_image(path.read_bytes())
        except (ValueError, OSError):
            return None, label
        return self.preprocess(image), label


def _collate_images(items):
    kept = [(image, label) for image, label in items if image is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return None, None, skipped
    return torch.stack([i for i, _ in kept]), torch.tensor([label for _, label in kept]), skipped


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the top-k logits, per k (k capped at the class count)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return {k: int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks}


def zero_shot(model, tokenizer, preprocess, folder: str | os.PathLike, *, batch_size: int = 64, workers: int = 0,
              device: torch.device | str = "cpu") -> dict[str, float]:
    """Zero-shot top-1/top-5 accuracy of ``model`` on a classification folder."""
    from open_clip import build_zero_shot_classifier

    data = load_classification(folder)
    classifier = build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=data.classnames,
                                            templates=data.templates, num_classes_per_batch=10, device=device)
    loader = torch.utils.data.DataLoader(_ImageFiles(data.files, preprocess), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate_images)
    correct = {1: 0, 5: 0}
    total = skipped = 0
    for images, labels, num_skipped in loader:
        skipped += num_skipped
        if images is None:
            continue
        features = model.encode_image(images.to(device), normalize=True)
        logits = features.float() @ classifier.float()
        for k, hits in topk_accuracy(logits, labels.to(device)).items():
            correct[k] += hits
        total += len(labels)
    if total == 0:
        raise ShardError(f"{data.split_dir}: no decodable evaluation image")
    return {
        "zeroshot/top1": correct[1] / total,
        "zeroshot/top5": correct[5] / total,
        "zeroshot/num_images": float(total),
        "zeroshot/num_classes": float(len(data.class_dirs)),
        "zeroshot/num_skipped": float(skipped),
    }


def recall_at_k(similarity: torch.Tensor, text_to_image: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Image→text and text→image recall@k from an images×texts similarity matrix.

    ``text_to_image[j]`` is the image of text ``j``. An image counts as retrieved at k when any
    of its texts is in its top k; a text when its image is in its top k.
    """
    num_images, num_texts = similarity.shape
    out: dict[str, float] = {}
    text_rank = similarity.argsort(dim=1, descending=True)  # per image: texts, best first
    image_rank = similarity.t().argsort(dim=1, descending=True)  # per text: images, best first
    owner_of_ranked_text = text_to_image[text_rank]  # image id of each ranked text
    image_ids = torch.arange(num_images, device=similarity.device).view(-1, 1)
    for k in ks:
        k_t, k_i = min(k, num_texts), min(k, num_images)
        i2t = (owner_of_ranked_text[:, :k_t] == image_ids).any(dim=1).float().mean().item()
        t2i = (image_rank[:, :k_i] == text_to_image.view(-1, 1)).any(dim=1).float().mean().item()
        out[f"image_to_text_R@{k}"] = i2t
        out[f"text_to_image_R@{k}"] = t2i
    return out


def retrieval(model, tokenizer, preprocess, shards: str, *, batch_size: int = 64,
              device: torch.device | str = "cpu") -> dict[str, float]:
    """Image–text retrieval R@1/R@5 on a shard list."""
    image_features, text_features, owners = [], [], []
    images: list[torch.Tensor] = []
    texts: list[str] = []
    text_owner: list[int] = []
    num_images = skipped = 0

    def flush_images() -> None:
        if images:
            image_features.append(model.encode_image(torch.stack(images).to(device), normalize=True).float())
            images.clear()

    def flush_texts() -> None:
        if texts:
            text_features.append(model.encode_text(tokenizer(texts).to(device), normalize=True).float())
            owners.extend(text_owner)
            texts.clear()
            text_owner.clear()

    for sample in iter_samples(expand_shards(shards)):
        captions = real_captions(sample)
        if sample.image is None or not captions:
            skipped += 1
            continue
        try:
            image = decode_image(sample.image)
        except ValueError:
            skipped += 1
            continue
        images.append(preprocess(image))
        texts.extend(captions)
        text_owner.extend([num_images] * len(captions))
        num_images += 1
        if len(images) >= batch_size:
            flush_images()
        if len(texts) >= batch_size:
            flush_texts()
    flush_images()
    flush_texts()
    if num_images == 0:
        raise ShardError(f"{shards}: no decodable image with a caption for retrieval")
    similarity = torch.cat(image_features) @ torch.cat(text_features).t()
    result = {f"retrieval/{k}": v for k, v in recall_at_k(similarity, torch.tensor(owners, device=similarity.device)).items()}
    result.update({"retrieval/num_images": float(num_images), "retrieval/num_texts": float(len(owners)),
                   "retrieval/num_skipped": float(skipped)})
    return result


def evaluate_clip(model, tokenizer, preprocess, config: EvalConfig, device) -> dict[str, float]:
    """Every evaluation that ``config`` names, as one flat dict."""
    out: dict[str, float] = {}
    if config.classification is not None:
        out.update(zero_shot(model, tokenizer, preprocess, config.classification, batch_size=config.batch_size,
                             workers=config.workers, device=device))
    if config.retrieval is not None:
        out.update(retrieval(model, tokenizer, preprocess, config.retrieval, batch_size=config.batch_size,
                             device=device))
    return {k: float(np.float64(v)) for k, v in out.items()}
