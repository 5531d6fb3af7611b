"""The training loop's knobs (:class:`TrainerConfig`), the ``qcap train`` run config and its presets.

:class:`TrainerConfig` (``train/loop_config.py``: light, and below both this module and
:mod:`train.loop`) is declared once for every stage that runs :class:`train.loop.Trainer`
(``qcap train``, ``qcap mae``, ``qcap finetune``): each holds one as its nested ``trainer`` config
(``--trainer.lr``, ``--trainer.warmup``, ...; the old bare flags ``--lr``, ``--warmup`` stay aliases),
with its own defaults given by a function returning a TrainerConfig, not by copies of the fields.

Presets carry DataComp's hyperparameters for its scales, from mlfoundations/datacomp
``scale_configs.py`` and ``train.py`` (commit 4a8df19): global batch size, learning rate,
warmup, model and samples seen per scale; ``train.py`` also passes ``--dataset-resampled``,
``--local-loss``, ``--gather-with-grad``, ``--grad-checkpointing`` and open_clip's defaults
for the rest (``--wd 0.2``; AdamW betas (0.9, 0.98) and eps 1e-6 for ViTs,
``open_clip_train.params.get_default_params``; cosine schedule; 5 checkpoints per run).
A preset is a :class:`base.config.Settings` of TrainRunConfig (``--data`` and ``--out`` are
required and no preset knows them): ``preset("tiny", data=..., out=...)`` builds the config.

Light on purpose: ``qcap train --help`` imports this module and nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

from base.config import ConfigError, Settings, arg, changed_settings
from train.loop_config import TrainerConfig


def train_loop_defaults() -> TrainerConfig:
    """qcap train's loop: the tiny preset's learning rate and warmup, 5 checkpoints per run (DataComp)."""
    return TrainerConfig(lr=1e-3, warmup=10, weight_decay=0.1, checkpoints_per_run=5)


@dataclass(kw_only=True)
class TrainRunConfig:
    """CLIP or CoCa pretraining on shards with Hugging Face Accelerate (one process, or several
    under 'accelerate launch -m train ...'). Writes RUN/config.json, metrics.jsonl, step-*/
    checkpoints, final/ (an open_clip local-dir: model) and eval.json."""

    STAGE: ClassVar[str] = "train"  # its name in dataset cards' lineage

    data: str = arg(help="training shards: 'DIR/{00000..00009}.tar', a folder, a glob or a '::' list")
    out: Path = arg(help="run folder for checkpoints, metrics and the final model")
    model: str = arg("qcap-tiny-clip", help="open_clip model name (CLIP or CoCa; qcap-tiny-clip, ViT-B-16, ...)")
    pretrained: str | None = arg(None, help="initialise from an open_clip pretrained tag or a weights file")
    caption_source: str = arg("real", help="captions to train on: real, synthetic, mix:P (synthetic with prob. P) or dual")
    samples_seen: int | None = arg(None, help="samples to train on in total (default: one pass over --data, from sizes.json)")
    batch_size: int = arg(64, help="global batch size, all processes together (DataComp's convention)")
    trainer: TrainerConfig = arg(factory=train_loop_defaults, bare_flags=True,
                                 help="the training loop: optimizer, schedule, checkpoints, logging, seed")
    precision: Literal["auto", "fp32", "bf16"] = arg(
        "auto", help="bf16 autocast or fp32; auto: bf16 where the hardware computes it natively (bf16 GPUs, AVX512-BF16/AMX CPUs)"
    )
    grad_checkpointing: bool = arg(False, help="recompute activations in backward (less memory, more time)")
    channels_last: Literal["auto", "on", "off"] = arg(
        "auto", shapes_output=False,
        help="image tower weights in channels-last (NHWC) memory: faster convolutions; auto: on for a CNN tower")
    local_loss: bool = arg(False, help="contrastive loss against gathered features of the local batch only (open_clip)")
    gather_with_grad: bool = arg(False, help="all-gather features with gradients (open_clip; use with --local-loss)")
    coca_caption_loss_weight: float = arg(2.0, help="CoCa: weight of the captioning loss (open_clip's default)")
    coca_contrastive_loss_weight: float = arg(1.0, help="CoCa: weight of the contrastive loss (open_clip's default)")
    workers: int = arg(1, help="data loader worker processes per training process (0: load in-process)")
    threads: int = arg(0, shapes_output=False, help="torch threads per training process (0: the cores left after the loader workers)")
    shuffle_buffer: int = arg(1000, help="samples in each loader worker's shuffle buffer")
    chunk_shards: int = arg(4, help="shards a loader worker shuffles together (bounds a resume's replay)")
    resampled: bool = arg(False, help="draw shards with replacement, weighted by size (DataComp's --dataset-resampled)")
    eval_data: Path | None = arg(None, shapes_output=False, help="zero-shot classification folder (ImageFolder + classnames.txt), or W/eval")
    retrieval_data: str | None = arg(None, shapes_output=False, help="held-out shards for image-text retrieval R@1/R@5")
    eval_batch_size: int = arg(64, shapes_output=False, help="images per forward pass in evaluation")
    tracker: Literal["tensorboard", "wandb", "none"] = arg("tensorboard", shapes_output=False, help="Accelerate tracker")
    record_uids: bool = arg(False, shapes_output=False, help="write the uids each process trained on to RUN/seen/rank-R.tsv")
    # DataCompDR (dataset reinforcement): the DR loss on qcap reinforce's output or Apple's DataCompDR
    distill_loss_weights: tuple[float, ...] | None = arg(
        None, help="train with the DR loss w0*CLIP + w1*KD on reinforced shards (Apple's --distill-loss-weights "
                   "0.25 0.75; 0 1: KD only); unset: plain CLIP"
    )
    dr_mode: str = arg("dual", help="DR captions: dual (image with its real and one synthetic caption, Apple's) or "
                                    "mix:R (a synthetic caption instead of the real one with probability R)")
    dr_augmentation: Literal["uniform", "sequential"] = arg(
        "uniform", help="stored augmentation per sample: uniform (a random one) or sequential (epoch %% N)"
    )
    syn_text_key_regex: str = arg(
        r"^syn_text.*$", help="DR: synthetic caption keys to draw from (Apple's "
                              "--dataset-reinforcement-syn-text-key-regex; syn_text, syn_text_<tag>)"
    )
    dr_teacher_dims: tuple[int, ...] | None = arg(
        None, help="DR: each teacher's embedding width (default: the folder's reinforce record, config.json, else equal halves)"
    )
    dr_teacher_logit_scales: tuple[float, ...] | None = arg(
        None, help="DR: each teacher's logit scale (default: the folder's reinforce record, else Apple's 100 100)"
    )
    dr_augment_size: int = arg(224, help="DR: crop side the stored augmentations were drawn for when the folder "
                                         "records none (Apple's DataCompDR: 224)")

    def __post_init__(self) -> None:
        from train.captions import parse_caption_source

        parse_caption_source(self.caption_source)  # raises ValueError naming the field
        for name in ("batch_size", "eval_batch_size", "chunk_shards", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("workers", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.samples_seen is not None and self.samples_seen <= 0:
            raise ValueError(f"samples_seen: must be positive, got {self.samples_seen}")
        if self.distill_loss_weights is not None:
            self.dr_settings()  # raises ValueError naming the field
        if self.dr_augment_size <= 0:
            raise ValueError(f"dr_augment_size: must be positive, got {self.dr_augment_size}")

    def dr_settings(self):
        """The :class:`train.distill.DRSettings` of a DR run (None for plain CLIP/CoCa training).

        Built from fields only (train.distill imports torch: imported here, not at module level)."""
        if self.distill_loss_weights is None:
            return None
        from train.distill import DRSettings

        return DRSettings(weights=tuple(self.distill_loss_weights), mode=self.dr_mode,
                          augmentation=self.dr_augmentation, syn_key_regex=self.syn_text_key_regex,
                          teacher_dims=tuple(self.dr_teacher_dims) if self.dr_teacher_dims else None,
                          teacher_scales=tuple(self.dr_teacher_logit_scales) if self.dr_teacher_logit_scales else None,
                          augment_size=self.dr_augment_size)


def _tiny() -> Settings[TrainRunConfig]:
    """qcap-tiny-clip on this CPU: small batches, a short warmup, one loader worker."""
    return Settings(TrainRunConfig)


def _tiny_coca() -> Settings[TrainRunConfig]:
    """qcap-tiny-coca, the embedded world's captioner, trained on the clean split's human captions."""
    return Settings(TrainRunConfig, model="qcap-tiny-coca", caption_source="real")


def _datacomp(samples_seen: int, batch_size: int, model: str) -> Settings[TrainRunConfig]:
    return Settings(
        TrainRunConfig,
        model=model,
        samples_seen=samples_seen,
        batch_size=batch_size,
        trainer=Settings(TrainerConfig, lr=5e-4, warmup=500, weight_decay=0.2, beta1=0.9, beta2=0.98, eps=1e-6,
                         log_every=100),
        precision="bf16",
        grad_checkpointing=True,
        local_loss=True,
        gather_with_grad=True,
        resampled=True,
        workers=4,
        shuffle_buffer=5000,  # open_clip's _SAMPLE_SHUFFLE_SIZE
        eval_batch_size=256,
    )


PRESETS = {
    "tiny": _tiny,
    "tiny-coca": _tiny_coca,
    "datacomp-small": lambda: _datacomp(12_800_000, 4096, "ViT-B-32"),
    "datacomp-medium": lambda: _datacomp(128_000_000, 4096, "ViT-B-32"),
    "datacomp-large": lambda: _datacomp(1_280_000_000, 8192, "ViT-B-16"),
}


def preset(name: str, **fields) -> TrainRunConfig:
    """Preset ``name`` completed with ``fields`` (``data``, ``out`` and any overrides; ``trainer``
    takes a TrainerConfig or a ``Settings(TrainerConfig, ...)`` of the sub-fields to change)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()(**fields)


def with_trainer(cfg: TrainRunConfig, **trainer_fields) -> TrainRunConfig:
    """``cfg`` with some of its loop's knobs changed."""
    return replace(cfg, trainer=replace(cfg.trainer, **trainer_fields))


def changed_fields(old: dict, new: TrainRunConfig) -> list[tuple[str, object, object]]:
    """``(dotted name, saved, now)`` for each setting that differs between a run's saved config
    (``config.json``'s ``config``, nested or in the flat form of before the loop's knobs were
    nested) and a resume's, other than those a resume may change (declared ``shapes_output=False``
    on TrainRunConfig and TrainerConfig)."""
    return changed_settings(TrainRunConfig, old, new)
