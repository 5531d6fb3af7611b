"""Training on reinforced data (DataCompDR): the DR loss, the stored augmentation re-applied, the
teacher embeddings read beside each sample.

The loss is Apple's ``DRClipLoss`` (ml-mobileclip): ``w0 · CLIP + w1 · KD``, where CLIP is
open_clip's ``ClipLoss`` on the student's features and KD the cross-entropy between the
teachers' image–text similarity softmax and the student's logits, both directions averaged::

    p_t = mean_k softmax(s_k · T_img,k @ T_txt,k^T)       # each teacher k with its own logit scale
    KD  = ½ [CE(p_t, S_i2t) + CE(p_t2i, S_t2i)],  CE(p, z) = -Σ_j p_j log_softmax(z)_j, mean over rows

(the teachers are averaged *after* the softmax). Under ``dual`` (Apple's default) each image
is paired with its real caption and one synthetic caption and the loss is the mean of the
image↔real and image↔synthetic terms; ``mix:r`` replaces the real caption with a synthetic one
with probability ``r`` and keeps one term.

Per sample (:class:`ReinforcedEncoder`): an augmentation index drawn uniformly (or
``epoch % n``, "sequential"), its stored parameters (``KEY.paug.json``) re-applied to the
decoded image (:mod:`base.augment`, bit for bit), one synthetic caption from the keys
matching ``syn_key_regex`` (Apple's ``--dataset-reinforcement-syn-text-key-regex``, default
``^syn_text.*$``), and the teacher embeddings at the same indices (``KEY.npz`` or
``KEY.pth.gz``). A sample whose image bytes no longer match the sha256/size recorded by
``qcap reinforce`` (``KEY.reinforce.json``) is skipped and counted (``image_changed``); for
Apple's shards, which record no such thing, a crop box that does not fit the decoded image is
(``augmentation_mismatch``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from base.shards import Sample
from train.captions import REAL, SYNTHETIC, CaptionSource, uniform
from train.loader import ImageTextEncoder, SkipSample
from train.tasks import ClipTask

DEFAULT_SYN_KEY_REGEX = r"^syn_text.*$"
APPLE_TEACHER_SCALES = (100.0, 100.0)  # ViT-L-14 openai + datacomp_xl_s13b_b90k


# --------------------------------------------------------------------------------------------
# The loss


def teacher_probabilities(image: torch.Tensor, text: torch.Tensor, dims: list[int], scales: list[float]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers' image→text and text→image similarity softmax, averaged after the softmax;
    ``image``/``text``: [N, Σ dims] concatenated teacher embeddings (each slice L2-normalised)."""
    if sum(dims) != image.shape[-1] or image.shape[-1] != text.shape[-1]:
        raise ValueError(f"teacher embeddings of width {image.shape[-1]}/{text.shape[-1]} do not split into dims {dims}")
    if len(scales) != len(dims):
        raise ValueError(f"{len(scales)} teacher logit scales for {len(dims)} teachers")
    i2t = t2i = None
    for image_k, text_k, scale in zip(image.split(dims, dim=-1), text.split(dims, dim=-1), scales, strict=True):
        logits = scale * image_k.float() @ text_k.float().T
        p_i2t, p_t2i = logits.softmax(dim=1), logits.T.softmax(dim=1)
        i2t = p_i2t if i2t is None else i2t + p_i2t
        t2i = p_t2i if t2i is None else t2i + p_t2i
    return i2t / len(dims), t2i / len(dims)


def soft_cross_entropy(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``-Σ_j p_j log_softmax(z)_j`` averaged over rows (Apple's ``dist_loss``)."""
    return -(target * logits.float().log_softmax(dim=1)).sum(dim=1).mean()


def kd_loss(student_image: torch.Tensor, student_text: torch.Tensor, student_scale: torch.Tensor,
            teacher_image: torch.Tensor, teacher_text: torch.Tensor, dims: list[int], scales: list[float]
            ) -> torch.Tensor:
    """The KD term on one (image, text) batch: rows are pairs, the other rows the negatives."""
    logits = student_scale * student_image @ student_text.T
    p_i2t, p_t2i = teacher_probabilities(teacher_image, teacher_text, dims, scales)
    return (soft_cross_entropy(p_i2t, logits) + soft_cross_entropy(p_t2i, logits.T)) / 2


class DRLoss(torch.nn.Module):
    """``w0 · ClipLoss + w1 · KD`` (Apple's DRClipLoss). Over several processes the features of
    every process are gathered (open_clip's ``gather_features``) so KD sees the global batch."""

    def __init__(self, *, weights: tuple[float, float], dims: list[int], scales: list[float], rank: int = 0,
                 world_size: int = 1, local_loss: bool = False, gather_with_grad: bool = False) -> None:
        from open_clip import ClipLoss

        super().__init__()
        self.weights, self.dims, self.scales = tuple(weights), list(dims), list(scales)
        self.rank, self.world_size = rank, world_size
        self.gather_with_grad = gather_with_grad
        self.clip = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True, rank=rank,
                             world_size=world_size)

    def forward(self, image, text, scale, teacher_image, teacher_text, bias=None) -> dict[str, torch.Tensor]:
        w0, w1 = self.weights
        zero = image.new_zeros(())
        contrastive = self.clip(image, text, scale, bias) if w0 else zero
        if w1:
            if self.world_size > 1:
                from open_clip.loss import gather_features

                image, text = gather_features(image, text, gather_with_grad=self.gather_with_grad, rank=self.rank,
                                              world_size=self.world_size)
                teacher_image, teacher_text = gather_features(teacher_image, teacher_text, rank=self.rank,
                                                              world_size=self.world_size)
            distill = kd_loss(image, text, scale, teacher_image, teacher_text, self.dims, self.scales)
        else:
            distill = zero
        return {"contrastive_loss": contrastive, "distill_loss": distill, "loss": w0 * contrastive + w1 * distill}


# --------------------------------------------------------------------------------------------
# Reading reinforced samples


@dataclass(frozen=True, kw_only=True)
class DRSettings:
    """How reinforced samples are trained on."""

    weights: tuple[float, float] = (0.0, 1.0)  # DataCompDR-12M: KD only
    mode: str = "dual"  # "dual" or "mix:r"
    augmentation: str = "uniform"  # or "sequential" (epoch % n)
    syn_key_regex: str = DEFAULT_SYN_KEY_REGEX
    teacher_dims: tuple[int, ...] | None = None  # None: from the folder's reinforce record, or equal halves (Apple)
    teacher_scales: tuple[float, ...] | None = None
    augment_size: int = 224  # output side of the stored crops when the folder records none (Apple: 224)

    def __post_init__(self) -> None:
        if len(self.weights) != 2 or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"distill_loss_weights: two non-negative weights, not both 0, got {self.weights}")
        if self.augmentation not in ("uniform", "sequential"):
            raise ValueError(f"dr_augmentation: uniform or sequential, got {self.augmentation!r}")
        self.mix_ratio()
        try:
            re.compile(self.syn_key_regex)
        except re.error as err:
            raise ValueError(f"syn_key_regex: {err}") from err

    def mix_ratio(self) -> float | None:
        if self.mode == "dual":
            return None
        name, _, value = self.mode.partition(":")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if name != "mix" or not 0 <= ratio <= 1:
            raise ValueError(f"dr_mode: dual or mix:R with R in [0, 1], got {self.mode!r}")
        return ratio

    def caption_source(self) -> CaptionSource:
        ratio = self.mix_ratio()
        if ratio is None:
            return CaptionSource("dr-dual", ("text", "text_syn"), needs_synthetic=True, synthetic_prob=0.0)
        return CaptionSource(f"dr-mix:{ratio:g}", ("text",), needs_synthetic=ratio > 0, synthetic_prob=ratio)


def reinforce_record(data_folder: str | Path) -> Path | None:
    """The ``config.json`` qcap reinforce left in ``data_folder`` (a folder reinforced before the
    shared names: ``reinforce_config.json``); None for another stage's folder or Apple's."""
    from base.stage import run_record_path

    return run_record_path(data_folder, "config", "reinforce")


def resolve_teachers(data_folder: str | Path | None, settings: DRSettings, width: int) -> tuple[list[int], list[float]]:
    """Teacher dims and logit scales: the flags, else the folder's qcap reinforce config record
    (:func:`reinforce_record`), else Apple's two equal teachers at scale 100."""
    dims, scales = settings.teacher_dims, settings.teacher_scales
    if (dims is None or scales is None) and data_folder is not None:
        path = reinforce_record(data_folder)
        if path is not None:
            saved = json.loads(path.read_text(encoding="utf-8"))
            dims = dims or tuple(saved.get("teacher_dims") or ())
            scales = scales or tuple(saved.get("teacher_logit_scales") or ())
    scales = tuple(scales or APPLE_TEACHER_SCALES)
    dims = tuple(dims or [width // len(scales)] * len(scales))
    if sum(dims) != width or len(dims) != len(scales):
        raise ValueError(f"teacher dims {list(dims)} and logit scales {list(scales)} do not describe embeddings of "
                         f"width {width}; give --dr-teacher-dims and --dr-teacher-logit-scales")
    return list(dims), list(scales)


def caption_keys(sample: Sample) -> dict[str, list[str]]:
    """The synthetic captions of a sample by key: ``syn_text`` (Apple's) plus the per-captioner
    keys ``syn_text_<tag>`` (:mod:`base.multicaption`)."""
    from base.multicaption import all_captions

    return all_captions(sample)


def text_rows(sample: Sample, record: dict[str, Any] | None, keys: dict[str, list[str]]) -> dict[str, int]:
    """Caption key → the ``text_emb`` row of its first caption (row 0 is the real caption)."""
    if record and isinstance(record.get("text_rows"), dict):
        return {k: int(v[0]) for k, v in record["text_rows"].items() if k != "real" and isinstance(v, list)}
    rows, at = {}, 1  # Apple's layout: [real, syn_text...], further keys after it in sorted order
    for key in ["syn_text", *sorted(k for k in keys if k != "syn_text")]:
        if key in keys:
            rows[key], at = at, at + len(keys[key])
    return rows


class ReinforcedEncoder(ImageTextEncoder):
    """Sample → (augmented image, texts, kinds, uid, teacher image row, teacher text rows).

    ``size``/``mean``/``std``: the student's input; the stored augmentation is re-applied at its
    recorded size and resized to the student's when they differ.
    """

    def __init__(self, tokenizer, settings: DRSettings, augment, *, size: int, mean, std,
                 max_pixels: int = 89_478_485) -> None:
        super().__init__(None, tokenizer, settings.caption_source(), max_pixels=max_pixels)
        self.settings = settings
        self.augment = augment  # base.augment.AugmentConfig of the stored parameters
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.key_regex = re.compile(settings.syn_key_regex)

    def encode(self, sample: Sample, seed: int, epoch: int = 0):
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        from base.augment import RECORD_MEMBER, AugmentError, apply_pil, decode_embeddings, decode_paug, to_tensor
        from base.shards import decode_image

        if not sample.ok:
            raise SkipSample(sample.status)
        if sample.image is None:
            raise SkipSample("no_image")
        if "paug.json" not in sample.extras:
            raise SkipSample("no_reinforcement")
        record = None
        if RECORD_MEMBER in sample.extras:
            try:
                record = json.loads(sample.extras[RECORD_MEMBER])
            except ValueError as err:
                raise SkipSample("bad_reinforcement") from err
            if (len(sample.image) != record.get("image_bytes")
                    or hashlib.sha256(sample.image).hexdigest() != record.get("image_sha256")):
                raise SkipSample("image_changed")
        try:
            params = decode_paug(sample.extras["paug.json"])
            embeddings = decode_embeddings(sample.extras)
        except ValueError as err:
            raise SkipSample("bad_reinforcement") from err
        if embeddings is None:
            raise SkipSample("no_reinforcement")
        image_emb, text_emb = embeddings
        if image_emb.shape[0] < len(params):
            raise SkipSample("embedding_mismatch")
        try:
            image = decode_image(sample.image, max_pixels=self.max_pixels)  # full size: the boxes are in its pixels
        except ValueError as err:
            raise SkipSample("too_large" if "exceeds" in str(err) else "undecodable") from err
        if record is not None and list(image.size) != list(record.get("image_size", [])):
            raise SkipSample("image_changed")
        n = len(params)
        index = epoch % n if self.settings.augmentation == "sequential" else min(int(uniform(seed, 3) * n), n - 1)
        try:
            augmented = apply_pil(image, params[index], self.augment)
        except AugmentError as err:
            raise SkipSample("augmentation_mismatch") from err
        if augmented.size != (self.size, self.size):
            augmented = TF.resize(augmented, [self.size, self.size], InterpolationMode.BICUBIC, antialias=True)
        pixels = TF.normalize(to_tensor(augmented, self.augment, normalize=False), list(self.mean), list(self.std))

        real = sample.text if sample.text and sample.text.strip() else None
        keys = {k: v for k, v in caption_keys(sample).items() if self.key_regex.match(k) and v}
        rows = text_rows(sample, record, caption_keys(sample))
        pool = [(k, j) for k in sorted(keys) if k in rows for j in range(len(keys[k]))]
        synthetic = None
        if pool:
            key, j = pool[min(int(uniform(seed, 2) * len(pool)), len(pool) - 1)]
            synthetic = (keys[key][j], rows[key] + j)
        ratio = self.settings.mix_ratio()
        if ratio is None:
            if real is None or synthetic is None:
                raise SkipSample("no_caption")
            texts, kinds, text_index = [real, synthetic[0]], [REAL, SYNTHETIC], [0, synthetic[1]]
        else:
            use_synthetic = synthetic is not None and (ratio >= 1 or (ratio > 0 and uniform(seed, 0) < ratio))
            if use_synthetic:
                texts, kinds, text_index = [synthetic[0]], [SYNTHETIC], [synthetic[1]]
            elif real is not None:
                texts, kinds, text_index = [real], [REAL], [0]
            else:
                raise SkipSample("no_caption")
        if max(text_index) >= text_emb.shape[0]:
            raise SkipSample("embedding_mismatch")
        return pixels, texts, kinds, sample.uid, image_emb[index], [text_emb[i] for i in text_index]

    def collate(self, items):
        batch = super().collate(items)
        batch["teacher_image"] = torch.stack([item[4] for item in items])
        for slot_index, slot in enumerate(self.source.slots):
            batch[f"teacher_{slot}"] = torch.stack([item[5][slot_index] for item in items])
        return batch


# --------------------------------------------------------------------------------------------
# The task


class DistillTask(ClipTask):
    """CLIP pretraining with the DR loss on reinforced batches (``teacher_*`` keys)."""

    def __init__(self, *, settings: DRSettings, dims: list[int], scales: list[float], **kwargs) -> None:
        super().__init__(source=settings.caption_source(), **kwargs)
        self.settings = settings
        self.dr_loss = DRLoss(weights=settings.weights, dims=dims, scales=scales, rank=self.loss_fn.rank,
                              world_size=self.loss_fn.world_size, local_loss=self.loss_fn.local_loss,
                              gather_with_grad=self.loss_fn.gather_with_grad)

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        slots = self.source.slots
        texts = [batch[slot] for slot in slots]
        out = model(image=batch["image"], text=texts[0] if len(texts) == 1 else torch.cat(texts))
        image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        bias = out.get("logit_bias")
        parts: dict[str, Any] = {"logit_scale": scale}
        total = None
        for slot, slot_text in zip(slots, text.split(len(image)), strict=True):
            result = self.dr_loss(image, slot_text, scale, batch["teacher_image"], batch[f"teacher_{slot}"], bias)
            suffix = "" if len(slots) == 1 else ("_real" if slot == "text" else "_synthetic")
            parts[f"contrastive_loss{suffix}"] = result["contrastive_loss"]
            parts[f"distill_loss{suffix}"] = result["distill_loss"]
            total = result["loss"] if total is None else total + result["loss"]
        return total / len(slots), parts


def reinforced_augment_config(data_folder: str | Path | None, size: int):
    """The augmentation config the stored parameters were drawn with: the folder's
    qcap reinforce config record (:func:`reinforce_record`), else Apple's recipe at ``size`` (224
    for Apple's shards)."""
    from base.augment import AugmentConfig

    if data_folder is not None:
        path = reinforce_record(data_folder)
        if path is not None:
            return AugmentConfig.from_json(json.loads(path.read_text(encoding="utf-8"))["augmentation"])
    return AugmentConfig(size=size)


def embedding_width(sample: Sample) -> int:
    from base.augment import decode_embeddings

    found = decode_embeddings(sample.extras)
    if found is None:
        raise ValueError(f"sample {sample.key!r} carries no teacher embeddings (KEY.npz or KEY.pth.gz); "
                         "train with the DR loss on qcap reinforce's output or Apple's DataCompDR joined by build-dr")
    return int(found[0].shape[-1])


def peek_reinforced(shards: list[str]) -> Sample | None:
    """The first sample of the shards that carries stored augmentations."""
    from base.shards import iter_samples

    for tar in shards:
        for sample in iter_samples([tar]):
            if sample.ok and "paug.json" in sample.extras:
                return sample
    return None


def reinforced_stream(loader_cfg, loaded, settings: DRSettings, *, rank: int = 0, world_size: int = 1,
                      record_uids=None, input_size: int | None = None):
    """``(stream, dims, scales)`` for DR training on ``loader_cfg.data`` with the student ``loaded``
    (a :class:`base.models.LoadedModel`): the folder's augmentation config and teachers, the
    student's input size and normalisation. ShardError when the shards carry no reinforcement."""
    from base.shards import ShardError, shard_folder
    from train.loader import ShardStream

    model = loaded.model
    visual = model.visual
    pre = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = input_size or pre.get("size") or getattr(visual, "image_size", 224)
    size = int(max(size)) if isinstance(size, (tuple, list)) else int(size)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean, std = pre.get("mean", OPENAI_DATASET_MEAN), pre.get("std", OPENAI_DATASET_STD)
    try:
        folder = shard_folder(loader_cfg.data)
    except (ShardError, ValueError):
        folder = None
    augment = reinforced_augment_config(folder, settings.augment_size)
    encoder = ReinforcedEncoder(loaded.tokenizer, settings, augment, size=size, mean=mean, std=std)
    stream = ShardStream(loader_cfg, encoder, rank=rank, world_size=world_size, record_uids=record_uids)
    first = peek_reinforced(stream.shards)
    if first is None:
        raise ShardError(f"{stream.shards[0]}: no sample carries stored augmentations (KEY.paug.json); the DR loss "
                         "needs reinforced shards: qcap reinforce's output, or Apple's DataCompDR joined by "
                         "qcap build-dr --apple-syn")
    try:
        dims, scales = resolve_teachers(folder, settings, embedding_width(first))
    except ValueError as err:
        raise ShardError(f"{stream.shards[0]}: {err}") from err
    return stream, dims, scales
