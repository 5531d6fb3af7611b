"""``qcap train``: CLIP or CoCa pretraining on shards, with Hugging Face Accelerate.

Usage::

    qcap train --preset tiny --data 'W/dr/{00000..00009}.tar' --out runs/clip-real
    qcap train --preset tiny --data W/dr --out runs/clip-syn --caption-source synthetic --eval-data W/eval
    qcap train --preset tiny-coca --data W/clean --out runs/coca          # the world's captioner
    qcap train --preset tiny --data W/dr --out runs/clip-real --resume    # continue exactly
    accelerate launch --multi_gpu --num_processes 8 -m train --preset datacomp-large --data 'dr/{00000..12799}.tar' --out runs/L

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2 -m train ...``
starts two processes and qcap picks Accelerate's multi-CPU mode (gloo); Accelerate's
``--cpu --num_processes 2`` starts a single process unless MPI is configured.

Several machines: the same command on each, ``--num_processes`` counting the processes of all
machines together, ``--machine_rank`` 0 on the main machine::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 2 --machine_rank R \
        --main_process_ip HOST0 --main_process_port 29500 -m train ... --out /shared/runs/x

``--out`` must be one folder that every machine mounts at the same path (NFS, Lustre, a cloud
file share): a checkpoint gathers every process's files in one ``step-*/`` folder and a resume
reads them back everywhere; a run whose machines do not all see the main process's folder
stops before its first step. (tests/test_train_multinode.py runs two machines on loopback.)

The run folder gets ``config.json`` (the resolved config), ``metrics.jsonl``, ``logs/`` (the
tracker), ``step-NNNNNN/`` checkpoints, ``final/`` (an open_clip ``local-dir:`` model:
``open_clip.create_model_and_transforms("local-dir:RUN/final")``) and ``eval.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from base.cli import UsageError
from base.config import ConfigError, parse_config, save_config
from train.config import PRESETS, TrainRunConfig, changed_fields, preset  # noqa: F401 - preset: for Python callers

log = logging.getLogger(__name__)


def resolve_threads(requested: int, workers: int, local_processes: int) -> int:
    """Torch threads per training process: the cores left after its loader workers, at least 1."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes) - workers)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    Training allocates the same large tensors every step (CoCa's vocabulary logits: hundreds
    of MB); by default glibc serves each from a fresh mmap and unmaps it when freed, so every
    step page-faults it in again (measured here: 40% of qcap-tiny-coca's CPU time, 10% of
    qcap-tiny-clip's). Heap-only allocation with no trimming keeps the peak resident and reused
    (the process holds its peak memory until it exits),
    the effect PyTorch's CPU tuning guide gets from jemalloc/tcmalloc. No-op off glibc.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from <malloc.h>
    # no mmap for large blocks, and no trimming of the heap's top (-1 disables it): a 1 GB
    # threshold still returned CoCa's per-step peak to the system every step
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def resolve_precision(requested: str) -> str:
    """``auto`` → ``bf16`` on hardware with native bf16 math, else ``fp32``.

    On this project's CPU (AVX512-BF16) bf16 autocast cut a tiny CLIP step by a fifth and a
    tiny CoCa step by a third; on CPUs without it bf16 is emulated and slower than fp32.
    """
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = {flag for line in handle if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:  # not Linux: no cheap way to tell, stay exact
        return "fp32"
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"


def input_side(model) -> int:
    """The longer side of a model's input images (open_clip's preprocess config)."""
    visual = model.visual
    size = (getattr(visual, "preprocess_cfg", None) or {}).get("size") or getattr(visual, "image_size", 224)
    return int(max(size)) if isinstance(size, (tuple, list)) else int(size)


def check_resume_config(cfg: TrainRunConfig, out: Path) -> None:
    """A resume must keep every field that shapes the run (model, data, batch, schedule, seed...)."""
    path = out / "config.json"
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)["config"]  # nested, or flat as runs before the loop's knobs were nested wrote it
    changed = changed_fields(saved, cfg)
    if changed:
        details = ", ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changed)
        raise ConfigError(f"{path}: --resume must keep the run's settings; changed {details}")


def train(cfg: TrainRunConfig) -> dict:
    """Run (or resume) one training run; returns a summary dict. Heavy imports happen here."""
    import torch

    from base.models import load_model, resolve_channels_last
    from base.shards import ShardError
    from train.captions import parse_caption_source
    from train.evaluate import EvalConfig, resolve_eval_data
    from train.loader import ImageTextEncoder, LoaderConfig, ShardStream, peek_sample
    from train.loop import EVAL_FILE, Trainer, latest_checkpoint, make_accelerator, seed_everything
    from train.tasks import TASKS, is_coca

    loop = cfg.trainer
    out = Path(cfg.out)
    latest = latest_checkpoint(out)
    if latest is not None and not loop.resume:
        raise UsageError(f"{out} already holds {latest.name}; add --resume to continue it, or choose another --out")
    if loop.resume:
        check_resume_config(cfg, out)
    source = parse_caption_source(cfg.caption_source)

    precision = resolve_precision(cfg.precision)
    accelerator = make_accelerator(precision=precision, tracker=cfg.tracker, out_dir=out)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(resolve_threads(cfg.threads, cfg.workers, local))
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} (global) does not split over {world} processes")

    record = None
    if cfg.record_uids:
        (out / "seen").mkdir(parents=True, exist_ok=True)
        record = out / "seen" / f"rank-{rank}.tsv"
        if latest is None and record.exists():  # a run killed before its first checkpoint starts over
            record.unlink()
    seed_everything(loop.seed)  # the same initial weights on every process and every run
    try:
        loaded = load_model(cfg.model, pretrained=cfg.pretrained)  # a fresh CoCa's decoder initialised there
    except ValueError as err:  # an unsafe, damaged or mismatched --pretrained file: one line
        raise ConfigError(f"pretrained: {err}") from err
    except RuntimeError as err:  # open_clip: an unknown model name or pretrained tag
        raise ConfigError(f"model: {' '.join(str(err).split())[:300]}") from err
    loader_cfg = LoaderConfig(data=cfg.data, batch_size=cfg.batch_size // world, workers=cfg.workers,
                              shuffle_buffer=cfg.shuffle_buffer, chunk_shards=cfg.chunk_shards,
                              resampled=cfg.resampled, seed=loop.seed)
    dr_settings = cfg.dr_settings()  # None: plain CLIP/CoCa; else the DR loss on reinforced shards
    teachers: tuple[list[int], list[float]] | None = None
    if dr_settings is not None:
        from train.distill import reinforced_stream

        if is_coca(cfg.model, loaded.model):
            raise ConfigError(f"distill_loss_weights: the DR loss trains CLIP students; {cfg.model!r} is a CoCa model")
        source = dr_settings.caption_source()
        stream, dims, scales = reinforced_stream(loader_cfg, loaded, dr_settings, rank=rank, world_size=world,
                                                 record_uids=record)
        teachers = (dims, scales)
    else:
        # JPEGs decode at no less than twice the model's input side: a 64-pixel model does not pay
        # for full-size decodes, and the crop still downsamples (no upsampling blur).
        encoder = ImageTextEncoder(loaded.preprocess_train, loaded.tokenizer, source,
                                   draft=2 * input_side(loaded.model))
        stream = ShardStream(loader_cfg, encoder, rank=rank, world_size=world, record_uids=record)
    first = peek_sample(stream.shards)
    if first is not None and first.image is None:
        raise ShardError(
            f"{stream.shards[0]}: samples carry no image (a caption-only folder, such as qcap caption's output?); "
            "train on image shards: curated shards, or DR shards from qcap build-dr"
        )
    if dr_settings is not None and source.needs_synthetic and first is not None:
        import re

        from base.multicaption import all_captions

        pattern = re.compile(dr_settings.syn_key_regex)
        keys = sorted(all_captions(first))
        if not any(pattern.match(key) for key in keys):
            raise ShardError(
                f"{stream.shards[0]}: no synthetic caption key matches --syn-text-key-regex "
                f"{dr_settings.syn_key_regex!r} (the sample holds {keys or 'none'}); --dr-mode {dr_settings.mode} "
                "needs one"
            )
    elif source.needs_synthetic and first is not None and not first.syn_text:
        raise ShardError(
            f"{stream.shards[0]}: samples carry no synthetic captions (KEY.syn.json); --caption-source "
            f"{source.name} needs DR shards (qcap build-dr), or use --caption-source real"
        )
    samples_seen = cfg.samples_seen or stream.num_samples
    total_steps = max(1, math.ceil(samples_seen / cfg.batch_size))
    if loop.stop_at_step is not None and loop.stop_at_step > total_steps:
        raise UsageError(f"--stop-at-step {loop.stop_at_step} is past the run's {total_steps} steps")

    if loop.resume and latest is not None and (out / EVAL_FILE).exists():
        from train.loop import TRAINER_FILE, read_json_object

        step = read_json_object(latest / TRAINER_FILE).get("step")  # CheckpointError (one line) if damaged
        if not isinstance(step, int):
            raise ConfigError(f"{latest / TRAINER_FILE}: 'step' must be an integer; resume from an intact checkpoint")
        if step >= total_steps:
            log.info("%s: already complete (%d steps); nothing to do", out, total_steps)
            eval_result = read_json_object(out / EVAL_FILE)
            return {"step": total_steps, "already_complete": True, "eval": eval_result}

    model = loaded.model
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    channels_last = resolve_channels_last(cfg.channels_last, model)
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
    classification, retrieval = resolve_eval_data(cfg.eval_data, cfg.retrieval_data)
    evaluation = EvalConfig(classification=classification, retrieval=retrieval, batch_size=cfg.eval_batch_size)
    kind = "coca" if is_coca(cfg.model, model) else "clip"
    task_kwargs = dict(model=model, model_name=loaded.name, tokenizer=loaded.tokenizer,
                       preprocess_val=loaded.preprocess_val, source=source, evaluation=evaluation, rank=rank,
                       world_size=world, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad)
    if kind == "coca":
        task_kwargs.update(caption_loss_weight=cfg.coca_caption_loss_weight,
                           contrastive_loss_weight=cfg.coca_contrastive_loss_weight)
    try:
        if teachers is not None:
            from train.distill import DistillTask

            task_kwargs.pop("source")  # DistillTask's captions follow --dr-mode
            kind = "clip-dr"
            task = DistillTask(settings=dr_settings, dims=teachers[0], scales=teachers[1], **task_kwargs)
        else:
            task = TASKS[kind](**task_kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from err

    if accelerator.is_main_process:
        import accelerate
        import open_clip

        save_config(cfg, out / "config.json", world_size=world, total_steps=total_steps, samples_seen=samples_seen,
                    num_shards=len(stream.shards), num_samples=stream.num_samples, task=kind,
                    loader_workers=stream.num_workers, torch_threads=torch.get_num_threads(), precision=precision,
                    channels_last=channels_last,
                    versions={"torch": torch.__version__, "open_clip": open_clip.__version__,
                              "accelerate": accelerate.__version__},
                    **({"dr_teachers": {"dims": teachers[0], "logit_scales": teachers[1]}} if teachers else {}))
    log.info("training %s (%s) for %d steps of %d samples on %d process(es); %d samples in %d shards",
             loaded.name, kind, total_steps, cfg.batch_size, world, stream.num_samples, len(stream.shards))
    trainer = Trainer(task, stream, loop, total_steps=total_steps, out_dir=out, accelerator=accelerator, run_config=cfg,
                      tracker_project=out.name or "qcap-train")
    result = trainer.train()
    counts = stream.metrics()
    return {
        "rank": rank,
        "step": result.step,
        "total_steps": total_steps,
        "samples_seen": result.samples_seen,
        "finished": result.finished,
        "final_dir": str(result.final_dir) if result.final_dir else None,
        "eval": result.eval,
        "last_metrics": result.last_metrics,
        "data": counts,
    }


def main(argv: list[str], prog: str = "qcap train") -> int:
    cfg = parse_config(TrainRunConfig, argv, prog=prog, presets=PRESETS)
    keep_freed_memory()  # process-wide, so set by the command, not by train() (a library call)
    summary = train(cfg)
    if summary.get("already_complete"):
        print(f"{cfg.out}: already complete at step {summary['step']}; eval: {json.dumps(summary['eval'])}")
        return 0
    if summary["rank"] != 0:
        return 0
    data = summary["last_metrics"]  # the last logged row: counters summed over every process
    skipped = {k.removeprefix("data/skipped_"): int(v) for k, v in data.items() if k.startswith("data/skipped_")}
    trained = int(data.get("data/samples", 0))
    print(f"{cfg.out}: step {summary['step']}/{summary['total_steps']}, {summary['samples_seen']} samples seen")
    print(f"  samples drawn {trained + sum(skipped.values())} = trained {trained} + skipped {skipped}")
    if summary["final_dir"]:
        print(f"  final model: {summary['final_dir']} (open_clip local-dir:)")
    else:
        print(f"  stopped at step {summary['step']}; continue with --resume")
    if summary["eval"]:
        print("  eval: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary["eval"].items())))
    return 0
