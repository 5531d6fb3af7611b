"""``qcap finetune seg|depth|cls|det``: transfer a CLIP image tower to a dense task, classification or detection.

Usage::

    qcap finetune seg --checkpoint runs/clip/final --data world/seg --out runs/ft/seg --preset tiny
    qcap finetune depth --random qcap-tiny-clip --data world/depth --out runs/ft/depth-random --preset tiny
    qcap finetune seg --pretrained ViT-B-16:datacomp_xl_s13b_b90k --data ADEChallengeData2016 \\
        --reduce-zero-label --image-size 512 --out runs/ft/ade-b16        # the MAE-style recipe (defaults)
    qcap finetune cls --checkpoint runs/clip/final --data imagenet --freeze-backbone --out runs/ft/probe
    qcap finetune det --random qcap-tiny-mci --data world/eval/det --out runs/ft/det --preset tiny   # Mask R-CNN
    qcap finetune det --pretrained ViT-B-16:datacomp_xl_s13b_b90k --data coco --image-size 1024 --out runs/ft/coco

The backbone is the ViT or hierarchical image tower (:mod:`finetune.backbone`); the head is a config
(:mod:`finetune.heads`); the loop is :class:`train.loop.Trainer` with Accelerate (launch with
``accelerate launch -m finetune finetune ...`` for several processes), so checkpoints land in
``OUT/step-*/`` and ``--resume`` continues a killed run exactly.

Writes ``OUT/metrics.json`` (the resolved config, backbone facts, final metrics, per-class
numbers), ``OUT/examples.png`` (a few eval images: input | ground truth | prediction),
``OUT/metrics.jsonl`` (the loop's log), ``OUT/eval.json`` and ``OUT/final/model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from base.cli import Command, UsageError, dispatch
from base.config import Settings, arg, parse_config, save_config
from train.loop_config import TrainerConfig

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
EXAMPLES_FILE = "examples.png"


@dataclass(kw_only=True)
class FinetuneConfig:
    """Finetune a CLIP image tower on segmentation, depth, classification or detection and measure it."""

    task: Literal["seg", "depth", "cls", "det"] = arg(
        help="seg (ADE20k layout), depth (NYUv2 layout), cls (ImageFolder) or det (COCO layout, Mask R-CNN)", positional=True)
    checkpoint: Path | None = arg(None, help="qcap/open_clip checkpoint folder, run folder or weights file", metavar="PATH")
    pretrained: str | None = arg(None, help="open_clip NAME:TAG, e.g. ViT-B-16:datacomp_xl_s13b_b90k", metavar="NAME:TAG")
    random: str | None = arg(None, help="open_clip model name, randomly initialised (the baseline)", metavar="MODEL")
    model: str | None = arg(None, help="architecture of a bare weights file given as --checkpoint", metavar="MODEL")
    data: Path = arg(help="dataset folder", metavar="DIR")
    out: Path = arg(help="output folder", metavar="DIR")
    head: Literal["upernet", "fpn", "dpt", "linear", "maskrcnn"] | None = arg(
        None, help="default: upernet for seg, dpt for depth, linear for cls, maskrcnn for det")
    freeze_backbone: bool = arg(False, help="train the head only (a linear probe with --head linear)")
    epochs: int = arg(20, help="passes over the training set")
    steps: int | None = arg(None, help="optimizer steps; overrides --epochs")
    batch_size: int = arg(16, help="training batch size per process")
    eval_batch_size: int | None = arg(None, help="evaluation batch size (default: --batch-size)")
    layer_decay: float = arg(0.65, help="layer-wise lr decay per block, 1 = none (MAE/BEiT: 0.65 for ViT-B)")
    image_size: int | None = arg(None, help="square input side (default: the model's own; positions are resampled)")
    neck_channels: int = arg(256, help="channels of each pyramid level (simple feature pyramid, FPN; det: its mask head too)")
    head_channels: int = arg(512, help="channels inside the head (det: box head MLP = 2x this)")
    dropout: float = arg(0.1, help="dropout before the head's classifier")
    reduce_zero_label: bool | None = arg(None, help="seg: ADE20k's convention, 0 ignored and labels reduced by one (default: classes.json)")
    depth_scale: float | None = arg(None, help="depth: PNG units per metre (default: DATA/depth.json, else 1000 = millimetres)")
    max_depth: float = arg(10.0, help="depth: prediction range and largest valid ground truth (metres)")
    min_depth: float = arg(1e-3, help="depth: smaller ground truth is invalid (metres)")
    max_train_samples: int | None = arg(None, help="use only the first N training items")
    max_eval_samples: int | None = arg(None, help="evaluate only the first N items")
    num_examples: int = arg(4, help="eval images drawn in examples.png")
    workers: int = arg(2, help="data-loading worker processes")
    precision: Literal["fp32", "bf16", "fp16"] = arg("fp32", help="mixed precision (Accelerate)")
    tracker: Literal["tensorboard", "wandb", "none"] = arg("tensorboard", help="experiment tracker")
    trainer: TrainerConfig = arg(factory=lambda: finetune_loop_defaults(), bare_flags=True,
                                 help="the training loop (the head trains at --trainer.lr, blocks at layer-decayed rates; "
                                      "logged at least 4 times a run)")

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "neck_channels", "head_channels")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("steps", "eval_batch_size", "max_train_samples", "max_eval_samples", "image_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay: must lie in (0, 1], got {self.layer_decay}")
        if not 0 <= self.min_depth < self.max_depth:
            raise ValueError(f"min_depth/max_depth: need 0 <= min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        if self.depth_scale is not None and self.depth_scale <= 0:
            raise ValueError(f"depth_scale: must be positive, got {self.depth_scale}")
        if self.num_examples < 0 or self.workers < 0:
            raise ValueError("num_examples, workers: must be >= 0")

    def resolved_head(self) -> str:
        from finetune.tasks import TASKS

        return self.head or TASKS[self.task].default_head


def finetune_loop_defaults() -> TrainerConfig:
    """The MAE/BEiT-style finetuning recipe: AdamW 1e-4, wd 0.05, betas (0.9, 0.999), eps 1e-8, gradients
    clipped at 1, warmup over 5% of the steps, a checkpoint only at the end."""
    return TrainerConfig(lr=1e-4, warmup_fraction=0.05, weight_decay=0.05, beta1=0.9, beta2=0.999, eps=1e-8,
                         grad_clip_norm=1.0)


def tiny_preset() -> Settings[FinetuneConfig]:
    """The embedded world's 64-px eval sets on a 2-core machine: small head, few epochs."""
    return Settings(FinetuneConfig, epochs=4, batch_size=16, trainer=Settings(TrainerConfig, lr=1e-3), layer_decay=0.75,
                    neck_channels=32, head_channels=32, workers=0, tracker="none", num_examples=4)


def base_preset() -> Settings[FinetuneConfig]:
    """ViT-B-scale defaults (MAE/BEiT-style UperNet recipe: AdamW 1e-4, layer decay 0.65, wd 0.05)."""
    return Settings(FinetuneConfig)


PRESETS = {"tiny": tiny_preset, "base": base_preset}


def _require(cfg: FinetuneConfig) -> None:
    from finetune.tasks import TASKS

    head = cfg.resolved_head()
    if head not in TASKS[cfg.task].heads:
        raise UsageError(f"--head {head} does not fit task {cfg.task}; choose from {', '.join(TASKS[cfg.task].heads)}")


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run one finetuning job; returns the metrics.json payload (also written to OUT)."""
    from accelerate.utils import set_seed

    from base.config import to_dict
    from finetune.backbone import BackboneSource, load_backbone, normalisation
    from finetune.data import Preprocess
    from finetune.heads import HeadConfig
    from finetune.plots import save_examples
    from finetune.tasks import TASKS, DataOptions
    from train.loop import MapStream, Trainer, make_accelerator

    _require(cfg)
    started = time.time()
    try:
        source = BackboneSource(checkpoint=cfg.checkpoint, pretrained=cfg.pretrained, random=cfg.random, model=cfg.model)
    except ValueError as err:
        raise UsageError(str(err)) from err
    task_cls = TASKS[cfg.task]
    set_seed(cfg.trainer.seed)  # a --random backbone and every new head start from the same weights for a seed
    backbone, preprocess = load_backbone(source, image_size=cfg.image_size)
    image_size = cfg.image_size or backbone.native_image_size[0]
    backbone.grid((image_size, image_size))  # a clear error for a size the patches do not tile
    mean, std = normalisation(preprocess)
    opts = DataOptions(
        root=cfg.data, pre=Preprocess(image_size, mean, std), max_train_samples=cfg.max_train_samples,
        max_eval_samples=cfg.max_eval_samples, reduce_zero_label=cfg.reduce_zero_label, depth_scale=cfg.depth_scale,
        min_depth=cfg.min_depth, max_depth=cfg.max_depth,
    )
    train_set, eval_set, facts = task_cls.datasets(opts)
    # the config as this run resolved it: what metrics.json and every checkpoint record
    cfg = dataclasses.replace(cfg, head=cfg.resolved_head(), image_size=image_size, **facts["resolved"])
    head_cfg = HeadConfig(name=cfg.head, neck_channels=cfg.neck_channels, channels=cfg.head_channels, dropout=cfg.dropout)
    model = task_cls.build_model(backbone, head_cfg, facts)
    if cfg.freeze_backbone:
        model.freeze_backbone()
    task = task_cls(model, eval_set, facts, opts, layer_decay=1.0 if cfg.freeze_backbone else cfg.layer_decay,
                    eval_batch_size=cfg.eval_batch_size or cfg.batch_size, workers=cfg.workers)

    accelerator = make_accelerator(precision=cfg.precision, tracker=cfg.tracker, out_dir=cfg.out)
    world = accelerator.num_processes
    if len(train_set) < cfg.batch_size * world:
        raise UsageError(
            f"{cfg.data}: {len(train_set)} training items are fewer than one batch ({cfg.batch_size} x {world} "
            "processes); lower --batch-size"
        )
    steps_per_epoch = len(train_set) // (cfg.batch_size * world)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    if cfg.trainer.stop_at_step is not None and cfg.trainer.stop_at_step > total_steps:
        raise UsageError(f"stop_at_step: --stop-at-step {cfg.trainer.stop_at_step} is past the run's {total_steps} steps")
    # logged at least 4 times a run: min(--log-every, steps // 4)
    trainer_cfg = dataclasses.replace(cfg.trainer, log_every=min(cfg.trainer.log_every, max(1, total_steps // 4)))
    stream = MapStream(train_set, batch_size=cfg.batch_size, seed=cfg.trainer.seed, rank=accelerator.process_index,
                       world_size=world, workers=cfg.workers, collate=getattr(task_cls, "collate", None))
    log.info("finetune %s: %s, head %s, %d train / %d eval items, %d steps (%d per epoch)", cfg.task,
             source.describe(), head_cfg.name, len(train_set), len(eval_set), total_steps, steps_per_epoch)
    try:
        trainer = Trainer(task, stream, trainer_cfg, total_steps=total_steps, out_dir=cfg.out, accelerator=accelerator,
                          run_config=cfg)
        result = trainer.train()
    except (FileExistsError, FloatingPointError) as err:
        raise UsageError(str(err)) from err
    if not result.finished:
        return {}
    payload = {
        "task": cfg.task,
        "head": to_dict(head_cfg),
        "backbone": backbone.describe() | {"frozen": cfg.freeze_backbone},
        "data": {"root": str(cfg.data), "num_train": len(train_set), "num_eval": len(eval_set),
                 "image_size": image_size, "mean": list(mean), "std": list(std)},
        "training": {"steps": result.step, "steps_per_epoch": steps_per_epoch, "epochs": result.step / steps_per_epoch,
                     "samples_seen": result.samples_seen, "processes": world, "last": result.last_metrics},
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.eval.items()},
        "details": task.details,
        "final_model": str(result.final_dir) if result.final_dir else None,
        "seconds": round(time.time() - started, 1),
    }
    if accelerator.is_main_process:
        if cfg.num_examples:
            rows = task.examples(trainer.bare_model, cfg.num_examples, accelerator.device)
            save_examples(cfg.out / EXAMPLES_FILE, rows, kind=cfg.task, mean=mean, std=std, class_names=task.display_names,
                          max_depth=cfg.max_depth, title=f"{cfg.task} · {source.describe()} · {head_cfg.name}")
            payload["examples"] = str(cfg.out / EXAMPLES_FILE)
        save_config(cfg, cfg.out / METRICS_FILE, **payload)
    # no barrier here: Trainer.train() ends Accelerate's training (the process group is gone);
    # the other processes have nothing left to write.
    return payload


def run_task(task: str, argv: list[str], prog: str) -> int:
    """``qcap finetune TASK ...``: parse TASK's flags, finetune, print the metrics."""
    cfg = parse_config(FinetuneConfig, argv, prog=prog, presets=PRESETS, fixed={"task": task},
                       description=f"Finetune a CLIP image tower on {TASK_COMMANDS[task].help} and measure it.")
    payload = finetune(cfg)
    if payload:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in payload["metrics"].items() if isinstance(v, float))
        print(f"{cfg.task} on {cfg.data}: {summary} → {cfg.out / METRICS_FILE}")
    else:
        print(f"stopped before the end; run again with --resume to finish ({cfg.out})")
    return 0


def seg(argv: list[str], prog: str) -> int:
    return run_task("seg", argv, prog)


def depth(argv: list[str], prog: str) -> int:
    return run_task("depth", argv, prog)


def cls(argv: list[str], prog: str) -> int:
    return run_task("cls", argv, prog)


def det(argv: list[str], prog: str) -> int:
    return run_task("det", argv, prog)


TASK_COMMANDS: dict[str, Command] = {
    "seg": Command("semantic segmentation (ADE20k layout; UperNet head)", "finetune.run:seg"),
    "depth": Command("monocular depth (NYUv2 layout; DPT head)", "finetune.run:depth"),
    "cls": Command("classification (ImageFolder; a linear head, or a probe with --freeze-backbone)", "finetune.run:cls"),
    "det": Command("detection and instance masks (COCO layout; Mask R-CNN)", "finetune.run:det"),
}


def main(argv: list[str], prog: str = "qcap finetune") -> int:
    return dispatch(prog, TASK_COMMANDS, argv, "Finetune a CLIP image tower on a task and measure it.", noun="task")
