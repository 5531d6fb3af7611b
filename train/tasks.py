"""CLIP and CoCa pretraining as :class:`train.loop.Task` s, with open_clip's losses.

``ClipTask``: open_clip's ``ClipLoss`` on image↔text (under the ``dual`` caption source, the
mean of image↔real and image↔synthetic; the text tower runs once on both). ``CoCaTask``:
open_clip's ``CoCaLoss`` (contrastive + weighted captioning loss), as open_clip's trainer
builds it. Both export open_clip ``local-dir:`` folders (``base.models.save_checkpoint_dir``)
and evaluate zero-shot classification and retrieval (:mod:`train.evaluate`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from base.models import WEIGHTS_FILE, save_checkpoint_dir
from train.captions import CaptionSource
from train.evaluate import EvalConfig, evaluate_clip
from train.loop import Task


class ClipTask(Task):
    """Contrastive image–text pretraining of an open_clip model."""

    def __init__(self, *, model, model_name: str, tokenizer, preprocess_val, source: CaptionSource,
                 evaluation: EvalConfig, rank: int = 0, world_size: int = 1, local_loss: bool = False,
                 gather_with_grad: bool = False) -> None:
        from open_clip import ClipLoss

        self.model = model
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.preprocess_val = preprocess_val
        self.source = source
        self.evaluation = evaluation
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                                rank=rank, world_size=world_size)

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        texts = [batch[slot] for slot in self.source.slots]
        out = model(image=batch["image"], text=texts[0] if len(texts) == 1 else torch.cat(texts))
        image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        bias = out.get("logit_bias")
        if len(texts) == 1:
            loss = self.loss_fn(image, text, scale, bias)
            return loss, {"contrastive_loss": loss, "logit_scale": scale}
        real, synthetic = text.split(len(image))
        loss_real = self.loss_fn(image, real, scale, bias)
        loss_synthetic = self.loss_fn(image, synthetic, scale, bias)
        return (loss_real + loss_synthetic) / 2, {
            "contrastive_loss_real": loss_real,
            "contrastive_loss_synthetic": loss_synthetic,
            "logit_scale": scale,
        }

    def after_optimizer_step(self, model) -> None:
        with torch.no_grad():  # open_clip's trainer: the temperature stays in [1, 100]
            model.logit_scale.clamp_(0, math.log(100))

    def evaluate(self, model, accelerator) -> dict[str, float]:
        if not accelerator.is_main_process:
            return {}
        return evaluate_clip(model, self.tokenizer, self.preprocess_val, self.evaluation, accelerator.device)

    def save_model(self, model, folder: Path, **meta: Any) -> None:
        save_checkpoint_dir(model, self.model_name, folder, **meta)

    def load_model(self, model, folder: Path) -> None:
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))

    def num_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["image"].shape[0])


class CoCaTask(ClipTask):
    """CoCa: contrastive plus captioning loss (open_clip's ``CoCaLoss``, pad id 0)."""

    def __init__(self, *, caption_loss_weight: float = 2.0, contrastive_loss_weight: float = 1.0, **kwargs) -> None:
        from open_clip import CoCaLoss

        super().__init__(**kwargs)
        if self.source.slots != ("text",):
            raise ValueError(f"caption_source: CoCa trains on one caption per image; {self.source.name!r} is for CLIP")
        self.loss_fn = CoCaLoss(
            caption_loss_weight=caption_loss_weight,
            clip_loss_weight=contrastive_loss_weight,
            pad_id=0,
            local_loss=self.loss_fn.local_loss,
            gather_with_grad=self.loss_fn.gather_with_grad,
            cache_labels=True,
            rank=self.loss_fn.rank,
            world_size=self.loss_fn.world_size,
        )

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(image=batch["image"], text=batch["text"])
        parts = self.loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                             out["logit_scale"], output_dict=True)
        return sum(parts.values()), {**parts, "logit_scale": out["logit_scale"]}


def is_coca(model_name: str, model) -> bool:
    """CoCa models have a text decoder (open_clip's ``CoCa`` class)."""
    from open_clip import CoCa

    return isinstance(model, CoCa) or "coca" in model_name.lower()


# model kind → task class: the registry run.py picks from
TASKS: dict[str, type[ClipTask]] = {"clip": ClipTask, "coca": CoCaTask}
