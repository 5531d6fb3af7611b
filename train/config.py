"""The ``qcap train`` run config (flat: it is the command line) and its named presets.

Presets carry DataComp's hyperparameters for its scales, from mlfoundations/datacomp
``scale_configs.py`` and ``train.py`` (commit 4a8df19): global batch size, learning rate,
warmup, model and samples seen per scale; ``train.py`` also passes ``--dataset-resampled``,
``--local-loss``, ``--gather-with-grad``, ``--grad-checkpointing`` and open_clip's defaults
for the rest (``--wd 0.2``; AdamW betas (0.9, 0.98) and eps 1e-6 for ViTs,
``open_clip_train.params.get_default_params``; cosine schedule; 5 checkpoints per run).

Light on purpose: ``qcap train --help`` imports this module and nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from base.config import arg, run_fields


@dataclass(kw_only=True)
class TrainRunConfig:
    """CLIP or CoCa pretraining on shards with Hugging Face Accelerate (one process, or several
    under 'accelerate launch -m train ...'). Writes RUN/config.json, metrics.jsonl, step-*/
    checkpoints, final/ (an open_clip local-dir: model) and eval.json."""

    STAGE: ClassVar[str] = "train"  # its name in dataset cards' lineage

    data: str = arg("", help="training shards: 'DIR/{00000..00009}.tar', a folder, a glob or a '::' list (required)")
    out: Path | None = arg(None, help="run folder for checkpoints, metrics and the final model (required)")
    model: str = arg("qcap-tiny-clip", help="open_clip model name (CLIP or CoCa; qcap-tiny-clip, ViT-B-16, ...)")
    pretrained: str | None = arg(None, help="initialise from an open_clip pretrained tag or a weights file")
    caption_source: str = arg("real", help="captions to train on: real, synthetic, mix:P (synthetic with prob. P) or dual")
    samples_seen: int | None = arg(None, help="samples to train on in total (default: one pass over --data, from sizes.json)")
    batch_size: int = arg(64, help="global batch size, all processes together (DataComp's convention)")
    lr: float = arg(1e-3, help="peak learning rate")
    warmup: int = arg(10, help="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = arg("cosine", help="learning-rate decay after warmup")
    weight_decay: float = arg(0.1, help="AdamW weight decay (not on gains, biases, logit scale)")
    beta1: float = arg(0.9, help="AdamW beta1")
    beta2: float = arg(0.98, help="AdamW beta2")
    eps: float = arg(1e-6, help="AdamW epsilon")
    grad_clip_norm: float | None = arg(None, help="clip the gradient norm to this")
    precision: Literal["auto", "fp32", "bf16"] = arg(
        "auto", help="bf16 autocast or fp32; auto: bf16 where the hardware computes it natively (bf16 GPUs, AVX512-BF16/AMX CPUs)"
    )
    grad_checkpointing: bool = arg(False, help="recompute activations in backward (less memory, more time)")
    local_loss: bool = arg(False, help="contrastive loss against gathered features of the local batch only (open_clip)")
    gather_with_grad: bool = arg(False, help="all-gather features with gradients (open_clip; use with --local-loss)")
    coca_caption_loss_weight: float = arg(2.0, help="CoCa: weight of the captioning loss (open_clip's default)")
    coca_contrastive_loss_weight: float = arg(1.0, help="CoCa: weight of the contrastive loss (open_clip's default)")
    workers: int = arg(1, help="data loader worker processes per training process (0: load in-process)")
    threads: int = arg(0, shapes_output=False, help="torch threads per training process (0: the cores left after the loader workers)")
    shuffle_buffer: int = arg(1000, help="samples in each loader worker's shuffle buffer")
    chunk_shards: int = arg(4, help="shards a loader worker shuffles together (bounds a resume's replay)")
    resampled: bool = arg(False, help="draw shards with replacement, weighted by size (DataComp's --dataset-resampled)")
    seed: int = arg(0, help="seed for initialisation, data order, augmentation and caption draws")
    checkpoint_every: int = arg(0, shapes_output=False, help="save RUN/step-NNNNNN/ every this many steps (0: 5 per run, as DataComp)")
    keep_checkpoints: int = arg(2, shapes_output=False, help="keep the newest this many step-*/ folders (0: keep all)")
    eval_data: Path | None = arg(None, shapes_output=False, help="zero-shot classification folder (ImageFolder + classnames.txt), or W/eval")
    retrieval_data: str | None = arg(None, shapes_output=False, help="held-out shards for image-text retrieval R@1/R@5")
    eval_every: int = arg(0, shapes_output=False, help="evaluate every this many steps (0: only at the end)")
    eval_batch_size: int = arg(64, shapes_output=False, help="images per forward pass in evaluation")
    log_every: int = arg(10, shapes_output=False, help="log to metrics.jsonl and the tracker every this many steps")
    tracker: Literal["tensorboard", "wandb", "none"] = arg("tensorboard", shapes_output=False, help="Accelerate tracker")
    resume: bool = arg(False, shapes_output=False, help="continue the newest RUN/step-*/ checkpoint exactly")
    stop_at_step: int | None = arg(None, shapes_output=False, help="stop after this step with a checkpoint (a job's time limit); resume later")
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
        None, help="DR: each teacher's embedding width (default: the folder's reinforce_config.json, else equal halves)"
    )
    dr_teacher_logit_scales: tuple[float, ...] | None = arg(
        None, help="DR: each teacher's logit scale (default: reinforce_config.json, else Apple's 100 100)"
    )
    dr_augment_size: int = arg(224, help="DR: crop side the stored augmentations were drawn for when the folder "
                                         "records none (Apple's DataCompDR: 224)")

    def __post_init__(self) -> None:
        from train.captions import parse_caption_source

        parse_caption_source(self.caption_source)  # raises ValueError naming the field
        for name in ("batch_size", "log_every", "eval_batch_size", "chunk_shards", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("warmup", "workers", "threads", "checkpoint_every", "keep_checkpoints", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.samples_seen is not None and self.samples_seen <= 0:
            raise ValueError(f"samples_seen: must be positive, got {self.samples_seen}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
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


def _tiny() -> TrainRunConfig:
    """qcap-tiny-clip on this CPU: small batches, a short warmup, one loader worker."""
    return TrainRunConfig()


def _tiny_coca() -> TrainRunConfig:
    """qcap-tiny-coca, the embedded world's captioner, trained on the clean split's human captions."""
    return TrainRunConfig(model="qcap-tiny-coca", caption_source="real")


def _datacomp(samples_seen: int, batch_size: int, model: str) -> TrainRunConfig:
    return TrainRunConfig(
        model=model,
        samples_seen=samples_seen,
        batch_size=batch_size,
        lr=5e-4,
        warmup=500,
        weight_decay=0.2,
        beta1=0.9,
        beta2=0.98,
        eps=1e-6,
        precision="bf16",
        grad_checkpointing=True,
        local_loss=True,
        gather_with_grad=True,
        resampled=True,
        workers=4,
        shuffle_buffer=5000,  # open_clip's _SAMPLE_SHUFFLE_SIZE
        eval_batch_size=256,
        log_every=100,
    )


PRESETS = {
    "tiny": _tiny,
    "tiny-coca": _tiny_coca,
    "datacomp-small": lambda: _datacomp(12_800_000, 4096, "ViT-B-32"),
    "datacomp-medium": lambda: _datacomp(128_000_000, 4096, "ViT-B-32"),
    "datacomp-large": lambda: _datacomp(1_280_000_000, 8192, "ViT-B-16"),
}


def changed_fields(old: TrainRunConfig, new: TrainRunConfig) -> list[str]:
    """Fields that differ between a run's saved config and a resume's, other than those a resume
    may change (declared ``shapes_output=False`` on TrainRunConfig)."""
    resumable = set(run_fields(TrainRunConfig))
    return [
        f.name
        for f in dataclasses.fields(TrainRunConfig)
        if f.name not in resumable and getattr(old, f.name) != getattr(new, f.name)
    ]
