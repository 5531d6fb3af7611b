"""A teacher ensemble for dataset reinforcement: several open_clip CLIPs whose normalised
embeddings are concatenated, as Apple's DataCompDR stores them.

``--teachers`` lists teachers separated by commas; each is one of

- ``MODEL:TAG`` — an open_clip model with a pretrained tag or a weights file
  (``ViT-L-14:openai``, ``ViT-L-14:datacomp_xl_s13b_b90k``, ``qcap-tiny-clip:/path/w.safetensors``);
- ``hf-hub:ORG/NAME`` or ``local-dir:PATH`` — ids open_clip loads itself
  (``hf-hub:apple/DFN2B-CLIP-ViT-L-14``);
- ``PATH`` — a checkpoint folder or a training run (``base.models.load_model(checkpoint=...)``);
- ``MODEL`` alone — random weights (tests only).

Every teacher goes through :func:`base.models.load_model` (safe loading, one line per failure).
Apple's DataCompDR-12M teachers are ``ViT-L-14:openai,ViT-L-14:datacomp_xl_s13b_b90k`` (768-d
each, 1536-d concatenated, logit scale 100 each); MobileCLIP2 uses DFN teachers in bf16.

Each teacher sees the augmented image (Apple: 224 px) resized to its own input side when that
differs, normalised with its own mean/std; texts go through its own tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


class TeacherError(ValueError):
    """A teacher that cannot be loaded or used; the message names it."""


@dataclass(frozen=True)
class TeacherSpec:
    model: str | None
    pretrained: str | None = None
    checkpoint: str | None = None

    @property
    def label(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        return f"{self.model}:{self.pretrained}" if self.pretrained else str(self.model)


def parse_teachers(spec: str) -> list[TeacherSpec]:
    """``"A:tag,B:tag2,run/folder"`` → teacher specs (ValueError for an empty list)."""
    specs = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item.startswith(("hf-hub:", "local-dir:")):
            specs.append(TeacherSpec(model=item))
        elif os.path.exists(item):
            specs.append(TeacherSpec(model=None, checkpoint=item))
        elif ":" in item:
            model, tag = item.split(":", 1)
            specs.append(TeacherSpec(model=model, pretrained=tag or None))
        else:
            specs.append(TeacherSpec(model=item))
    if not specs:
        raise ValueError(f"teachers: name at least one teacher (MODEL:TAG, hf-hub:ID or a checkpoint), got {spec!r}")
    return specs


def _weights_identity(source: str) -> str | None:
    from base.models import weights_sha256

    return weights_sha256(source) if os.path.isfile(source) else None


@dataclass
class Teacher:
    spec: TeacherSpec
    model: Any
    tokenizer: Any
    name: str
    source: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dim: int
    logit_scale: float

    def identity(self, weights_sha256: str | None) -> dict[str, Any]:
        return {"spec": self.spec.label, "model": self.name, "source": self.source, "weights_sha256": weights_sha256,
                "dim": self.dim, "logit_scale": self.logit_scale, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std)}


def load_teacher(spec: TeacherSpec, *, device: str = "cpu", precision: str = "fp32") -> Teacher:
    """One teacher, loaded the safe way; TeacherError (one line naming it) when it cannot be."""
    import torch

    from base.models import load_model

    try:
        loaded = load_model(spec.model, pretrained=spec.pretrained, checkpoint=spec.checkpoint, device=device,
                            precision=precision)
    except (ValueError, RuntimeError, OSError) as err:
        raise TeacherError(f"teacher {spec.label}: {' '.join(str(err).split())[:300]}") from err
    model = loaded.model
    if not hasattr(model, "encode_image") or not hasattr(model, "encode_text"):
        raise TeacherError(f"teacher {spec.label}: {loaded.name} is not an image-text model (no encode_image/encode_text)")
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size") or getattr(visual, "image_size", 224)
    size = int(max(size)) if isinstance(size, (tuple, list)) else int(size)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = tuple(float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", OPENAI_DATASET_STD))
    with torch.no_grad():
        probe = model.encode_image(torch.zeros(1, 3, size, size, device=device,
                                               dtype=next(model.parameters()).dtype))
        scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
    return Teacher(spec=spec, model=model, tokenizer=loaded.tokenizer, name=loaded.name, source=loaded.source,
                   image_size=size, mean=mean, std=std, dim=int(probe.shape[-1]), logit_scale=scale)


class TeacherEnsemble:
    """The teachers of one reinforcement run: embeddings concatenated in the order given."""

    def __init__(self, specs: list[TeacherSpec], *, device: str = "cpu", precision: str = "fp32",
                 logit_scales: list[float] | None = None) -> None:
        self.teachers = [load_teacher(spec, device=device, precision=precision) for spec in specs]
        if logit_scales is not None:
            if len(logit_scales) != len(self.teachers):
                raise TeacherError(f"teacher_logit_scales: {len(logit_scales)} scales for {len(self.teachers)} teachers")
            for teacher, scale in zip(self.teachers, logit_scales, strict=True):
                teacher.logit_scale = float(scale)
        self.device = device

    @property
    def dims(self) -> list[int]:
        return [t.dim for t in self.teachers]

    @property
    def logit_scales(self) -> list[float]:
        return [t.logit_scale for t in self.teachers]

    def identities(self) -> list[dict[str, Any]]:
        return [t.identity(_weights_identity(t.source)) for t in self.teachers]

    def encode_images(self, images, *, autocast_dtype=None):
        """``images``: float tensor [N, 3, S, S] in [0, 1] (the augmented images, not normalised)
        → [N, Σ dims] float32, each teacher's slice L2-normalised."""
        import torch
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        parts = []
        with torch.inference_mode(), torch.autocast(self.device, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            for teacher in self.teachers:
                pixels = images
                if pixels.shape[-1] != teacher.image_size or pixels.shape[-2] != teacher.image_size:
                    pixels = F.resize(pixels, [teacher.image_size, teacher.image_size],
                                      InterpolationMode.BICUBIC, antialias=True)
                pixels = F.normalize(pixels, list(teacher.mean), list(teacher.std)).to(self.device)
                features = teacher.model.encode_image(pixels, normalize=True)
                parts.append(features.float().cpu())
        return torch.cat(parts, dim=1)

    def encode_texts(self, texts: list[str], *, autocast_dtype=None):
        """Texts → [N, Σ dims] float32, each teacher's slice L2-normalised."""
        import torch

        parts = []
        with torch.inference_mode(), torch.autocast(self.device, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            for teacher in self.teachers:
                tokens = teacher.tokenizer(texts).to(self.device)
                parts.append(teacher.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(parts, dim=1)
