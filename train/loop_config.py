"""The training loop's knobs, declared once: :class:`TrainerConfig` (no heavy imports).

:class:`train.loop.Trainer` runs with one; ``qcap train`` (:class:`train.config.TrainRunConfig`),
``qcap mae`` and ``qcap finetune`` each hold one as their nested ``trainer`` config
(``--trainer.lr``; the bare ``--lr`` stays an alias), their own defaults coming from a function
that returns a TrainerConfig. Its own module so that :mod:`train.config` (light, for ``--help``)
and :mod:`train.loop` (torch) both import it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from base.config import arg


@dataclass(kw_only=True)
class TrainerConfig:
    """How the training loop runs: optimizer, schedule, checkpoints, logging, seed (the run's
    length, ``total_steps``, is the stage's to work out and is given to the Trainer)."""

    lr: float = arg(5e-4, help="peak learning rate")
    warmup: int = arg(0, help="linear warmup steps")
    warmup_fraction: float = arg(0.0, help="warm up over this share of the run's steps instead (0: --warmup steps)")
    schedule: Literal["cosine", "linear", "constant"] = arg("cosine", help="learning-rate decay after warmup (transformers' schedules)")
    weight_decay: float = arg(0.2, help="AdamW weight decay (not on gains, biases, norms, embeddings, logit scale)")
    beta1: float = arg(0.9, help="AdamW beta1")
    beta2: float = arg(0.98, help="AdamW beta2")
    eps: float = arg(1e-6, help="AdamW epsilon")
    grad_clip_norm: float | None = arg(None, help="clip the global gradient norm to this (unset: no clipping)")
    checkpoint_every: int = arg(0, shapes_output=False, help="save RUN/step-NNNNNN/ every this many steps "
                                                             "(0: --checkpoints-per-run of them)")
    checkpoints_per_run: int = arg(0, shapes_output=False, help="with --checkpoint-every 0: this many evenly spaced "
                                                                "checkpoints (DataComp: 5); 0: only at the end")
    keep_checkpoints: int = arg(2, shapes_output=False, help="keep the newest this many step-*/ folders (0: keep all)")
    eval_every: int = arg(0, shapes_output=False, help="evaluate every this many steps (0: only at the end)")
    log_every: int = arg(10, shapes_output=False, help="log to metrics.jsonl and the tracker every this many steps")
    resume: bool = arg(False, shapes_output=False, help="continue the newest RUN/step-*/ checkpoint exactly")
    stop_at_step: int | None = arg(None, shapes_output=False, help="stop after this step with a checkpoint "
                                                                   "(a job's time limit); resume later")
    seed: int = arg(0, help="seed for initialisation, data order, augmentation and sampling (each process adds its rank)")

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        for name in ("warmup", "checkpoint_every", "checkpoints_per_run", "keep_checkpoints", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: must lie in [0, 1), got {self.warmup_fraction}")
        if self.warmup and self.warmup_fraction:
            raise ValueError(f"warmup: give warmup steps ({self.warmup}) or warmup_fraction ({self.warmup_fraction}), "
                             "not both (set the other to 0)")
        if self.log_every <= 0:
            raise ValueError(f"log_every: must be positive, got {self.log_every}")
        if self.stop_at_step is not None and self.stop_at_step <= 0:
            raise ValueError(f"stop_at_step: must be positive, got {self.stop_at_step}")

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``."""
        return int(self.warmup_fraction * total_steps) if self.warmup_fraction else self.warmup

    def checkpoint_interval(self, total_steps: int) -> int:
        """Steps between checkpoints of a run of ``total_steps`` (0: only at the end)."""
        if self.checkpoint_every:
            return self.checkpoint_every
        return max(1, math.ceil(total_steps / self.checkpoints_per_run)) if self.checkpoints_per_run else 0
