"""A small, generic training loop on Hugging Face Accelerate, with exact resume.

CLIP, CoCa and every finetuning head are *tasks* run by the same :class:`Trainer`; a task says
what the model is, how a batch becomes a loss, and how to evaluate. The data comes from a
*batch stream*: an endless, resumable iterator of batches. Nothing here knows about CLIP.

The API (stable: ``finetune`` builds on it)::

    class MyTask(Task):
        def __init__(self, model): self.model = model            # an nn.Module
        def loss(self, model, batch):                             # model: the prepared (DDP) model
            out = model(batch["image"])
            loss = F.cross_entropy(out, batch["label"])
            return loss, {"acc": (out.argmax(1) == batch["label"]).float().mean()}
        def evaluate(self, model, accelerator):                   # every process; main's dict is logged
            return {"val/top1": ...}
        # optional: parameter_groups(weight_decay), after_optimizer_step(model),
        #           save_model(model, folder, **meta), load_model(model, folder), num_samples(batch)

    class MyStream:                                               # BatchStream protocol
        def __iter__(self): ...                                   # endless batches (dicts/tuples of tensors)
        def state_dict(self) -> dict: ...                          # JSON-able position after the last batch yielded
        def load_state_dict(self, state: dict) -> None: ...        # called before __iter__ on resume
        def metrics(self) -> dict[str, float]: ...                  # optional: additive counters, summed

    accelerator = make_accelerator(precision="bf16", tracker="tensorboard", out_dir=run_dir)
    trainer = Trainer(MyTask(model), MyStream(...), TrainerConfig(lr=1e-3), total_steps=1000,
                      out_dir=run_dir, accelerator=accelerator, run_config=cfg)
    result = trainer.train()          # resumes from run_dir/step-*/ when TrainerConfig.resume
    result.final_dir, result.eval     # RUN/final/ (the task's export), the last evaluation

:class:`MapStream` turns any map-style dataset (a segmentation folder, an ImageFolder) into a
``BatchStream`` with a per-epoch permutation split across processes, for finetuning.

One optimizer step per batch: ``train_step(batch)`` sets the learning rate of the schedule,
runs ``task.loss`` under Accelerate's autocast, backpropagates, clips, steps AdamW and calls
``task.after_optimizer_step``. Parameter groups may carry ``lr_scale`` (a factor on the
schedule's learning rate, e.g. for a new head).

Checkpoint ``RUN/step-{step:06d}/`` (written under a hidden name, renamed when complete):

- the task's model files (``Task.save_model``; for open_clip models an open_clip ``local-dir:``
  folder, ``open_clip_config.json`` + ``open_clip_model.safetensors``),
- ``optimizer.pt``, ``scheduler.pt`` (plain tensors and numbers: loaded with
  ``torch.load(weights_only=True)``, never unpickled),
- ``rng-{rank}.pt`` (python, numpy, torch and CUDA generators, as tensors and numbers),
- ``data-{rank}.json`` (the stream's position), ``trainer.json`` (step, samples seen, world
  size, the run's resolved config).

Accelerate's own ``save_state``/``load_state`` is not used: it restores RNG states inside a
``try/except Exception`` that only logs a failure, and loads custom states with
``weights_only=False`` (arbitrary unpickling).

Logging: ``RUN/metrics.jsonl`` (one JSON object per logged step: step, samples_seen, loss
parts, lr, samples_per_s; evaluation rows carry ``eval/...`` keys), Accelerate's trackers
(tensorboard by default), a tqdm bar on the main process, ``RUN/eval.json`` at the end.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from base.config import ConfigError
from base.shards import atomic_write_json
from train.loop_config import TrainerConfig

log = logging.getLogger(__name__)

STEP_DIR_FORMAT = "step-{step:06d}"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


# --------------------------------------------------------------------------------------------
# What the trainer runs


class CheckpointError(ConfigError):
    """A ``step-*/`` checkpoint that cannot be resumed (missing, damaged, unsafe or another run's);
    a ConfigError, so the command prints it as one line (exit 2)."""


_REDO = ("resume from an intact checkpoint (delete this step-*/ folder to fall back to an older one), "
         "or start over in another --out")


def _first_line(err: BaseException, limit: int = 240) -> str:
    lines = str(err).strip().splitlines()
    line = " ".join(lines[0].split()) if lines else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete — {_REDO}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({_first_line(err)}); {_REDO}") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, not {type(value).__name__}; {_REDO}")
    return value


class Task(abc.ABC):
    """What is trained. Subclasses set ``self.model`` and implement :meth:`loss`."""

    model: torch.nn.Module  # the bare model; the Trainer prepares (wraps) it with Accelerate

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The scalar loss to backpropagate and the parts to log (tensors or floats).

        ``model`` is the prepared model (DDP-wrapped when distributed): call it, not
        ``self.model``, so gradients are synchronised. Runs under Accelerate's autocast.
        """

    def evaluate(self, model: torch.nn.Module, accelerator) -> dict[str, float]:
        """Metrics of the current model (bare, in eval mode, under no_grad and autocast).

        Called on every process, so a task may shard its evaluation; the main process's
        dict is logged. The default evaluates nothing.
        """
        return {}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups; open_clip's rule: no decay on gains, biases, norms, logit_scale."""
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name:
                no_decay.append(param)
            else:
                decay.append(param)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]

    def after_optimizer_step(self, model: torch.nn.Module) -> None:  # noqa: B027 - an optional hook
        """Hook after each optimizer step (CLIP clamps its logit scale here); default: nothing."""

    def save_model(self, model: torch.nn.Module, folder: Path, **meta: Any) -> None:
        """Create ``folder`` holding the model's weights (safetensors); the Trainer adds its files."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={k: str(v) for k, v in meta.items()})

    def load_model(self, model: torch.nn.Module, folder: Path) -> None:
        """Load weights written by :meth:`save_model` into ``model`` (strict)."""
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(folder / "model.safetensors")))

    def num_samples(self, batch: Any) -> int:
        """Samples in a batch (for samples/s): the first dimension of its first tensor."""
        first = _first_tensor(batch)
        return 0 if first is None else int(first.shape[0])


@runtime_checkable
class BatchStream(Protocol):
    """An endless, resumable source of batches (see the module docstring)."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # Optional: ``metrics() -> dict[str, float]`` of additive counters (samples, skips...);
    # the Trainer sums them over processes and logs them with each training row.


# --------------------------------------------------------------------------------------------
# Configuration


# TrainerConfig (the loop's knobs: optimizer, schedule, checkpoints, logging, seed) is declared in
# train.loop_config, light to import; every stage's config holds it as its nested ``trainer``.


def make_accelerator(*, precision: str = "fp32", tracker: str = "tensorboard", out_dir: str | os.PathLike):
    """An Accelerator for a run folder: mixed precision and trackers (``none`` for no tracker).

    Dataloaders are never passed to ``accelerator.prepare``: streams split data across
    processes themselves, and Accelerate would split an IterableDataset a second time
    (``IterableDatasetShard``) or read it all on rank 0 (``dispatch_batches``).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
    if precision not in mixed:
        raise ValueError(f"precision: choose from {sorted(mixed)}, not {precision!r}")
    trackers = {"tensorboard": "tensorboard", "wandb": "wandb", "none": None}
    if tracker not in trackers:
        raise ValueError(f"tracker: choose from {sorted(trackers)}, not {tracker!r}")
    if tracker == "wandb":
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            raise ValueError("tracker: wandb is not installed; pip install wandb, or use --tracker tensorboard")
    project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(Path(out_dir) / "logs"))
    # Launched as several processes on a machine without accelerators: Accelerate only picks its
    # multi-CPU (gloo) mode when told cpu=True; otherwise every process would train alone.
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
    cpu_only = not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())
    if not launched:
        # Accelerate keeps one process-wide state and refuses an Accelerator with another mixed
        # precision; a second run in one process (tests, notebooks, a Python driver) starts clean.
        # (_reset_state is what Accelerate's own test utilities call.)
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed[precision], log_with=trackers[tracker], project_config=project,
                       cpu=launched and cpu_only)


# --------------------------------------------------------------------------------------------
# The trainer


@dataclass(slots=True)
class TrainResult:
    step: int  # last step trained
    samples_seen: int  # samples consumed by all processes together
    finished: bool  # True when total_steps were reached (False after stop_at_step)
    final_dir: Path | None  # the exported model (RUN/final), None when stopped early
    eval: dict[str, float] = field(default_factory=dict)  # the last evaluation's metrics
    last_metrics: dict[str, float] = field(default_factory=dict)  # the last logged training metrics


class Trainer:
    """Runs a :class:`Task` on a :class:`BatchStream` (see the module docstring)."""

    def __init__(
        self,
        task: Task,
        stream: BatchStream,
        config: TrainerConfig,
        *,
        total_steps: int,
        out_dir: str | os.PathLike,
        accelerator=None,
        run_config: Any = None,
        tracker_project: str = "qcap",
    ) -> None:
        from transformers import get_scheduler

        if total_steps <= 0:
            raise ValueError(f"total_steps: must be positive, got {total_steps}")
        if config.stop_at_step is not None and not 0 < config.stop_at_step <= total_steps:
            raise ValueError(f"stop_at_step: must lie in 1..{total_steps}, got {config.stop_at_step}")
        self.task = task
        self.stream = stream
        self.config = config
        self.total_steps = int(total_steps)  # optimizer steps of the whole run (the schedule spans them)
        self.checkpoint_every = config.checkpoint_interval(self.total_steps)
        self.out_dir = Path(out_dir)
        self.accelerator = accelerator if accelerator is not None else make_accelerator(out_dir=out_dir)
        self.run_config = run_config
        self.tracker_project = tracker_project
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.step = 0
        self.samples_seen = 0
        seed_everything(config.seed + self.rank)

        groups = task.parameter_groups(config.weight_decay)
        for group in groups:
            group["lr"] = config.lr * group.get("lr_scale", 1.0)
        betas = (config.beta1, config.beta2)
        try:  # one fused kernel per step: several times faster than the per-parameter loop on CPU
            optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=config.eps, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
            optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=config.eps)
        # The scheduler is stepped by us, once per optimizer step, and not prepared: Accelerate's
        # AcceleratedScheduler would step it num_processes times per step.
        self.scheduler = get_scheduler(
            config.schedule if config.schedule != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=config.warmup_steps(self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.model, self.optimizer = self.accelerator.prepare(task.model, optimizer)
        self._meters: dict[str, list[float]] = {}
        self._last_metrics: dict[str, float] = {}
        self._eval: dict[str, float] = {}

    # ---- state -------------------------------------------------------------------------------

    @property
    def bare_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, in memory (this process's RNG and data position)."""
        return {
            "trainer": {"step": self.step, "samples_seen": self.samples_seen, "world_size": self.world_size},
            "model": self.bare_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "data": self.stream.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        trainer = state["trainer"]
        if int(trainer["world_size"]) != self.world_size:
            raise CheckpointError(
                f"checkpoint was written by {trainer['world_size']} processes, this run has {self.world_size}; "
                "resume with the same number of processes (data positions are per process)"
            )
        self.bare_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.stream.load_state_dict(state["data"])
        self.step = int(trainer["step"])
        self.samples_seen = int(trainer["samples_seen"])

    # ---- checkpoints -------------------------------------------------------------------------

    def checkpoint_dir(self, step: int) -> Path:
        return self.out_dir / STEP_DIR_FORMAT.format(step=step)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def save_checkpoint(self) -> Path:
        """Write ``step-{step:06d}/`` (every process writes its RNG and data position)."""
        acc = self.accelerator
        final = self.checkpoint_dir(self.step)
        partial = final.with_name(f".{final.name}.partial")
        if acc.is_main_process:
            if partial.exists():
                shutil.rmtree(partial)
            self.task.save_model(self.bare_model, partial, step=self.step)
            torch.save(self.optimizer.state_dict(), partial / OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), partial / SCHEDULER_FILE)
        acc.wait_for_everyone()
        torch.save(rng_state(), partial / f"rng-{self.rank}.pt")
        atomic_write_json(partial / f"data-{self.rank}.json", self.stream.state_dict())
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(
                partial / TRAINER_FILE,
                {
                    "step": self.step,
                    "samples_seen": self.samples_seen,
                    "world_size": self.world_size,
                    "total_steps": self.total_steps,
                    "config": _jsonable(self.run_config),
                },
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def check_shared_out_dir(self) -> None:
        """Every process must see the run folder the main process writes, or the run stops now.

        A checkpoint is one ``step-*/`` folder filled by several processes (the main process's
        model and optimizer, every process's ``rng-R.pt`` and ``data-R.json``), and a resume
        reads it back on every process; so on several machines ``--out`` must be one shared
        filesystem (NFS, Lustre, a cloud file share). With a run folder per machine (a local
        disk each) the other machines trained until the first checkpoint and then failed on a
        missing ``.step-*.partial`` folder (an internal error), and a resume would restart them
        from scratch while the main machine resumed. The main process writes a file of a random
        name; every process looks for it; all stop with the same one-line ConfigError if any
        cannot see it.
        """
        if self.world_size <= 1:
            return
        import secrets

        from accelerate.utils import broadcast_object_list, gather_object

        acc = self.accelerator
        name = [f".shared-{secrets.token_hex(8)}" if acc.is_main_process else None]
        if acc.is_main_process:
            (self.out_dir / name[0]).write_text(f"{self.out_dir.resolve()}\n", encoding="utf-8")
        broadcast_object_list(name)  # after the write: the file exists before anyone looks
        marker = self.out_dir / name[0]
        seen = gather_object([(self.rank, marker.is_file())])
        acc.wait_for_everyone()
        if acc.is_main_process:
            marker.unlink(missing_ok=True)
        blind = sorted(rank for rank, ok in seen if not ok)
        if blind:
            raise ConfigError(
                f"{self.out_dir}: process(es) {blind} of {self.world_size} do not see the run folder the main process "
                "writes; on several machines the output folder must be one shared filesystem (NFS, Lustre, a cloud "
                "file share) that every machine mounts at the same path: a checkpoint gathers every process's files"
            )

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore a ``step-*/`` folder written by :meth:`save_checkpoint` (safe loads only).

        A tampered or damaged folder — a file missing, truncated or garbage, a pickle that would
        run code, JSON that is not an object, weights of another shape — raises
        :class:`CheckpointError`: one line naming the file and what to do."""
        from base.models import check_weights_file, load_torch_file

        folder = Path(folder)
        trainer = read_json_object(folder / TRAINER_FILE)
        for key in ("step", "samples_seen", "world_size"):
            if not isinstance(trainer.get(key), int) or isinstance(trainer.get(key), bool):
                raise CheckpointError(f"{folder / TRAINER_FILE}: {key!r} must be an integer; {_REDO}")
        data_file = folder / f"data-{self.rank}.json"
        if not data_file.exists():
            raise CheckpointError(
                f"{folder}: no {data_file.name}; it was written by {trainer['world_size']} processes, "
                f"this run has {self.world_size}"
            )
        data = read_json_object(data_file)
        weights = sorted(folder.glob("*.safetensors"))
        try:
            for path in weights:
                check_weights_file(path)
            loaded = {name: load_torch_file(folder / name)
                      for name in (OPTIMIZER_FILE, SCHEDULER_FILE, f"rng-{self.rank}.pt")}
        except ValueError as err:
            raise CheckpointError(f"{err}; {_REDO}") from err
        from safetensors import SafetensorError

        try:
            self.task.load_model(self.bare_model, folder)
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as err:
            raise CheckpointError(f"{folder}: its model weights do not load into this model "
                                  f"({_first_line(err)}); {_REDO}") from err
        state = {
            "trainer": trainer,
            "model": self.bare_model.state_dict(),  # already loaded by the task
            "optimizer": loaded[OPTIMIZER_FILE],
            "scheduler": loaded[SCHEDULER_FILE],
            "rng": loaded[f"rng-{self.rank}.pt"],
            "data": data,
        }
        try:
            self.load_state_dict(state)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            # load_state_dict checks what it restores (optimizer groups, RNG states, positions)
            raise CheckpointError(f"{folder}: does not match this run ({type(err).__name__}: "
                                  f"{_first_line(err)}); {_REDO}") from err
        log.info("resumed from %s at step %d", folder, self.step)

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        if keep <= 0:
            return
        steps = sorted(p for p in self.out_dir.glob("step-*") if (p / TRAINER_FILE).exists())
        for old in steps[:-keep]:
            shutil.rmtree(old)

    # ---- the loop ----------------------------------------------------------------------------

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step on one batch; returns the loss parts as floats (this process)."""
        acc = self.accelerator
        self.model.train()
        batch = _to_device(batch, acc.device)
        with acc.autocast():
            loss, parts = self.task.loss(self.model, batch)
        acc.backward(loss)
        if self.config.grad_clip_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.config.grad_clip_norm)
        # the schedule's learning rate (groups with an lr_scale train at a multiple of it)
        lr = self.config.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.task.after_optimizer_step(self.bare_model)
        metrics = {"loss": float(loss.detach())}
        _check_finite(metrics["loss"], self.step + 1)
        for name, value in parts.items():
            metrics[name] = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        metrics["lr"] = lr
        return metrics

    def train(self) -> TrainResult:
        """Run (or resume) until ``total_steps`` or ``stop_at_step``; export ``RUN/final/``."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.check_shared_out_dir()
        latest = self.latest_checkpoint()
        if latest is not None and not cfg.resume:
            raise FileExistsError(
                f"{self.out_dir} already holds checkpoint {latest.name}; pass --resume to continue it, "
                "or choose another output folder"
            )
        if latest is not None:
            self.load_checkpoint(latest)
        if acc.is_main_process:
            _truncate_metrics(self.out_dir / METRICS_FILE, self.step)
        acc.init_trackers(self.tracker_project, config=_flat_scalars(self.run_config))
        end = self.total_steps if cfg.stop_at_step is None else cfg.stop_at_step
        interactive = sys.stderr.isatty()  # a log file gets a line every 30 s, not one per step
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_main_process, unit="step",
                   dynamic_ncols=True, desc="train", mininterval=0.5 if interactive else 30.0)
        stream = iter(self.stream)
        window_start, window_samples = time.perf_counter(), 0
        try:
            while self.step < end:
                batch = next(stream)
                num = self.task.num_samples(batch)
                metrics = self.train_step(batch)
                self.step += 1
                step_samples = num * self.world_size
                self.samples_seen += step_samples
                window_samples += step_samples
                for name, value in metrics.items():
                    self._meters.setdefault(name, []).append(value)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    row = self._log_window(window_samples / elapsed)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.0f}")
                    window_start, window_samples = time.perf_counter(), 0
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
                if (self.checkpoint_every and self.step % self.checkpoint_every == 0) or self.step == end:
                    self.save_checkpoint()
        finally:
            bar.close()  # an error is printed on a line of its own, not after the bar
        close = getattr(stream, "close", None)
        if callable(close):  # stop the loader's workers now, not at garbage collection
            close()
        finished = self.step >= self.total_steps
        final_dir = None
        if finished:
            self._eval = self.evaluate()
            final_dir = self.export_final()
            if acc.is_main_process:
                atomic_write_json(self.out_dir / EVAL_FILE, {"step": self.step, "samples_seen": self.samples_seen,
                                                            **self._eval})
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(self.step, self.samples_seen, finished, final_dir, dict(self._eval), dict(self._last_metrics))

    def evaluate(self) -> dict[str, float]:
        """Run ``task.evaluate`` on the bare model; log its metrics under ``eval/``."""
        acc = self.accelerator
        model = self.bare_model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), acc.autocast():
                metrics = self.task.evaluate(model, acc)
        finally:
            model.train(was_training)
        acc.wait_for_everyone()
        if acc.is_main_process and metrics:
            row = {"step": self.step, "samples_seen": self.samples_seen, **{f"eval/{k}": v for k, v in metrics.items()}}
            self._append_metrics(row)
            acc.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.step)
            log.info("eval at step %d: %s", self.step, json.dumps(metrics, sort_keys=True))
        return metrics

    def export_final(self) -> Path:
        """The finished model as ``RUN/final/`` (the task's export format), written atomically."""
        acc = self.accelerator
        final = self.out_dir / FINAL_DIR
        if acc.is_main_process:
            partial = final.with_name(f".{FINAL_DIR}.partial")
            if partial.exists():
                shutil.rmtree(partial)
            self.task.save_model(self.bare_model, partial, step=self.step, samples_seen=self.samples_seen)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        acc.wait_for_everyone()
        return final

    def _log_window(self, samples_per_s: float) -> dict[str, float]:
        """Average the meters since the last log over every process; write metrics.jsonl and trackers."""
        acc = self.accelerator
        names = sorted(self._meters)
        local = torch.tensor([sum(v) / len(v) for v in (self._meters[n] for n in names)], device=acc.device,
                             dtype=torch.float64)
        averaged = acc.reduce(local, reduction="mean") if self.world_size > 1 else local
        row: dict[str, float] = {name: float(value) for name, value in zip(names, averaged.tolist(), strict=True)}
        row["samples_per_s"] = samples_per_s
        extra = getattr(self.stream, "metrics", None)
        if callable(extra):  # the stream's additive counters, summed over processes
            counters = extra()
            if self.world_size > 1:
                from accelerate.utils import gather_object

                gathered = gather_object([counters])
                names = sorted({name for part in gathered for name in part})
                counters = {name: sum(float(part.get(name, 0.0)) for part in gathered) for name in names}
            row.update(counters)
        self._meters.clear()
        self._last_metrics = row
        if acc.is_main_process:
            self._append_metrics({"step": self.step, "samples_seen": self.samples_seen, **row})
            acc.log({f"train/{k}": v for k, v in row.items()}, step=self.step)
        return row

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")



# --------------------------------------------------------------------------------------------
# A stream over any map-style dataset (finetuning data)


class MapStream:
    """Endless batches from a map-style dataset: a seeded permutation per epoch, split by rank.

    Each process takes every ``world_size``-th index of the epoch's permutation (so each sample
    is seen by exactly one process per epoch); ``collate`` builds a batch from a list of
    items (``torch.utils.data.default_collate`` by default). ``workers`` > 0 loads items in
    DataLoader worker processes. The position is ``(epoch, index)``, so a resume is exact.
    """

    def __init__(self, dataset, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int = 0, collate=None, drop_last: bool = True) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        if len(dataset) < world_size:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than the {world_size} processes")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.collate = collate
        self.drop_last = drop_last
        self.epoch = 0
        self.index = 0  # position within this process's share of the epoch

    def _share(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return perm[self.rank :: self.world_size]

    def _index_batches(self) -> Iterator[tuple[list[int], int, int]]:
        epoch, index = self.epoch, self.index
        while True:
            share = self._share(epoch)
            while index < len(share):
                chunk = share[index : index + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    break
                index += len(chunk)
                yield [int(i) for i in chunk], epoch, index
            epoch, index = epoch + 1, 0

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import DataLoader, default_collate

        collate = self.collate or default_collate
        positions: list[tuple[int, int]] = []

        def index_source():
            for indices, epoch, index in self._index_batches():
                positions.append((epoch, index))
                yield indices

        # The loader draws its base seed from this generator, not from torch's global RNG: a resumed
        # run restores the global RNG, and a new iterator's draw would shift it (augmentations, dropout).
        position_seed = np.random.SeedSequence([self.seed, self.rank, self.epoch, self.index]).generate_state(1)[0]
        loader = DataLoader(
            self.dataset,
            batch_sampler=_ListSampler(index_source()),
            num_workers=self.workers,
            collate_fn=collate,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(int(position_seed)),
        )
        for batch in loader:
            self.epoch, self.index = positions.pop(0)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class _ListSampler:
    """A batch sampler over an endless generator of index lists (DataLoader's batch_sampler)."""

    def __init__(self, source: Iterator[list[int]]) -> None:
        self._source = source

    def __iter__(self) -> Iterator[list[int]]:
        return self._source


# --------------------------------------------------------------------------------------------
# Helpers


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``step-*/`` folder of a run, or None."""
    steps = sorted(p for p in Path(out_dir).glob("step-*") if (p / TRAINER_FILE).is_file())
    return steps[-1] if steps else None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (call before building a model, so its init is reproducible)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as tensors and numbers only."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _to_device(batch: Any, device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _jsonable(cfg: Any) -> Any:
    import dataclasses

    from base.config import to_dict

    if cfg is None:
        return None
    return to_dict(cfg) if dataclasses.is_dataclass(cfg) else json.loads(json.dumps(cfg, default=str))


def _flat_scalars(cfg: Any) -> dict[str, Any]:
    """Tracker hyperparameters: scalar fields only (tensorboard's hparams take no None or lists)."""
    from base.config import flatten_settings

    data = flatten_settings(_jsonable(cfg) or {})  # a nested config's fields by dotted name (trainer.lr)
    return {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows after ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if int(row.get("step", 0)) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}; lower --lr or use --grad-clip-norm")
