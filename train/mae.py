"""MAE pretraining of the same ViT on the same images: the paper's baseline for dense transfer.

Usage::

    qcap mae --data LADDER/datacomp-100 --out runs/mae --samples-seen 19200 [--seed 0]   # or python -m train.mae
    qcap finetune seg --checkpoint runs/mae --data W/eval/seg --out runs/mae-seg   # like any CLIP run

The model is Hugging Face ``transformers``' ``ViTMAEForPreTraining`` (He et al. 2022, masked
autoencoder: 75% of the patches masked, a light decoder reconstructs their normalised pixels),
with the **encoder shaped as the CLIP rung's image tower** (``--model``'s open_clip
``vision_cfg``: image size, patch size, width, blocks, heads, MLP ratio; GELU; LayerNorm eps
1e-5). It is trained by the same :class:`train.loop.Trainer` as CLIP, on the same shard
loader and augmentation (the CLIP model's ``preprocess_train``), at the same batch size, steps,
learning-rate schedule and samples seen — "the same compute" in samples and optimizer steps
(an MAE step costs less: its encoder sees a quarter of the patches, and it has no text tower).

Every checkpoint (``step-*/``, ``final/``) holds the MAE model (``model.safetensors``, for
``--resume``) and the encoder converted into an open_clip CLIP folder (``open_clip_config.json``
+ ``open_clip_model.safetensors``) so that ``qcap finetune`` and ``qcap attention-distance``
read it as they read a CLIP run. The conversion is exact (``tests/test_mae.py`` checks the
token features match), with one architectural note: HF's ViT has no LayerNorm before the first
block, so the converted config sets open_clip's ``no_ln_pre``; the patch embedding's bias (open_clip
has none) is folded into the positional embedding, the fixed sin-cos positions become
open_clip's learnable ones, ``proj`` is the identity and the text tower stays at its seeded
random initialisation (unused by the dense tasks).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from base.cli import UsageError
from base.config import ConfigError, arg, changed_settings, parse_config, save_config
from train.loop_config import TrainerConfig

log = logging.getLogger(__name__)

MAE_WEIGHTS = "model.safetensors"
MAE_CONFIG = "mae_config.json"


def mae_loop_defaults() -> TrainerConfig:
    """MAE's optimizer (weight decay 0.05, beta2 0.95, eps 1e-8) on the CLIP rungs' lr, warmup and 5 checkpoints."""
    return TrainerConfig(lr=1e-3, warmup=10, weight_decay=0.05, beta1=0.9, beta2=0.95, eps=1e-8, checkpoints_per_run=5)


@dataclass(kw_only=True)
class MaeRunConfig:
    """MAE pretraining (transformers' ViTMAE) of --model's image tower on image shards; the run folder
    reads like a CLIP run's (final/ is an open_clip folder for qcap finetune)."""

    data: str = arg(help="training shards (folder, brace pattern, glob); captions are ignored")
    out: Path = arg(help="run folder")
    model: str = arg("qcap-tiny-clip", help="open_clip model whose image tower the MAE encoder copies (ViT only)")
    samples_seen: int | None = arg(None, help="samples to train on (default: one pass over --data); match the CLIP rungs")
    batch_size: int = arg(64, help="global batch size (the CLIP rungs' --batch-size)")
    trainer: TrainerConfig = arg(factory=mae_loop_defaults, bare_flags=True,
                                 help="the training loop (MAE's recipe: weight decay 0.05, beta2 0.95, eps 1e-8; "
                                      "the tiny CLIP preset's lr 1e-3 and warmup 10, so the steps match the CLIP rungs)")
    mask_ratio: float = arg(0.75, help="share of patches masked (MAE's default)")
    norm_pix_loss: bool = arg(True, help="reconstruct per-patch normalised pixels (MAE's better setting)")
    decoder_width: int = arg(64, help="decoder hidden size")
    decoder_layers: int = arg(2, help="decoder blocks")
    decoder_heads: int = arg(4, help="decoder attention heads")
    precision: Literal["auto", "fp32", "bf16"] = arg("auto", help="bf16 autocast where native, else fp32 (as qcap train)")
    workers: int = arg(1, shapes_output=False, help="loader worker processes")
    threads: int = arg(0, shapes_output=False, help="torch threads (0: the cores left after the loader workers)")

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: must lie in (0, 1), got {self.mask_ratio}")
        for name in ("batch_size", "decoder_width", "decoder_layers", "decoder_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.samples_seen is not None and self.samples_seen <= 0:
            raise ValueError(f"samples_seen: must be positive, got {self.samples_seen}")


def vision_cfg(model_name: str) -> dict[str, Any]:
    """The open_clip ``vision_cfg`` of a ViT model, checked for what the conversion supports."""
    from base.models import model_config

    try:
        cfg = model_config(model_name)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    vision = cfg.get("vision_cfg", {})
    if vision.get("timm_model_name") or vision.get("attentional_pool") or vision.get("layers") is None:
        raise ConfigError(f"model: {model_name!r} is not a plain open_clip ViT; MAE copies a ViT image tower")
    return cfg


def mae_config(model_name: str, cfg: MaeRunConfig):
    """transformers' ``ViTMAEConfig`` whose encoder has --model's image-tower shape."""
    from transformers import ViTMAEConfig

    vision = vision_cfg(model_name)["vision_cfg"]
    width, layers = int(vision["width"]), int(vision["layers"])
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        raise ConfigError(f"model: width {width} is not a multiple of head_width {head_width}")
    image_size = vision["image_size"]
    return ViTMAEConfig(
        image_size=int(image_size if isinstance(image_size, int) else image_size[0]),
        patch_size=int(vision["patch_size"]), num_channels=3, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=width // head_width, intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
        hidden_act="gelu", layer_norm_eps=1e-5, qkv_bias=True, mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss, decoder_hidden_size=cfg.decoder_width,
        decoder_num_hidden_layers=cfg.decoder_layers, decoder_num_attention_heads=cfg.decoder_heads,
        decoder_intermediate_size=4 * cfg.decoder_width,
    )


def converted_model_cfg(model_name: str) -> dict[str, Any]:
    """--model's open_clip config with the image tower as MAE's: no LayerNorm before the first block."""
    cfg = copy.deepcopy(vision_cfg(model_name))
    cfg["vision_cfg"]["no_ln_pre"] = True
    return cfg


def encoder_to_open_clip(vit, visual) -> None:
    """Copy a ``ViTMAEModel``'s encoder into an open_clip ``VisionTransformer`` (built with
    ``no_ln_pre``), in place; exact for the token features (see the module docstring)."""
    import torch

    state = vit.state_dict()
    with torch.no_grad():
        visual.conv1.weight.copy_(state["embeddings.patch_embeddings.projection.weight"])
        pos = state["embeddings.position_embeddings"][0].clone()
        pos[1:] += state["embeddings.patch_embeddings.projection.bias"]  # conv1 has no bias: fold it in
        visual.positional_embedding.copy_(pos)
        visual.class_embedding.copy_(state["embeddings.cls_token"].reshape(-1))
        for i, block in enumerate(visual.transformer.resblocks):
            p = f"layers.{i}."
            block.ln_1.weight.copy_(state[p + "layernorm_before.weight"])
            block.ln_1.bias.copy_(state[p + "layernorm_before.bias"])
            block.attn.in_proj_weight.copy_(torch.cat([state[p + f"attention.{x}_proj.weight"] for x in "qkv"]))
            block.attn.in_proj_bias.copy_(torch.cat([state[p + f"attention.{x}_proj.bias"] for x in "qkv"]))
            block.attn.out_proj.weight.copy_(state[p + "attention.o_proj.weight"])
            block.attn.out_proj.bias.copy_(state[p + "attention.o_proj.bias"])
            block.ln_2.weight.copy_(state[p + "layernorm_after.weight"])
            block.ln_2.bias.copy_(state[p + "layernorm_after.bias"])
            block.mlp.c_fc.weight.copy_(state[p + "mlp.fc1.weight"])
            block.mlp.c_fc.bias.copy_(state[p + "mlp.fc1.bias"])
            block.mlp.c_proj.weight.copy_(state[p + "mlp.fc2.weight"])
            block.mlp.c_proj.bias.copy_(state[p + "mlp.fc2.bias"])
        visual.ln_post.weight.copy_(state["layernorm.weight"])
        visual.ln_post.bias.copy_(state["layernorm.bias"])
        if visual.proj is not None and visual.proj.shape[0] == visual.proj.shape[1]:
            visual.proj.copy_(torch.eye(visual.proj.shape[0]))


def _state_key_map(vit) -> list[str]:  # for the error message of a transformers version that renamed things
    return sorted(vit.state_dict())[:6]


def export_open_clip(mae, model_name: str, folder: Path, *, seed: int, **meta: Any) -> None:
    """Write the MAE encoder as an open_clip ``local-dir:`` folder (config + weights) into ``folder``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from base.models import CONFIG_FILE, WEIGHTS_FILE, register_model_configs
    from base.shards import atomic_write_json

    register_model_configs()
    model_cfg = converted_model_cfg(model_name)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the (unused) text tower's initialisation is a function of the seed
    try:
        clip = open_clip.CLIP(**model_cfg)
    finally:
        torch.random.set_rng_state(generator_state)
    try:
        encoder_to_open_clip(mae.vit, clip.visual)
    except KeyError as err:
        raise ConfigError(f"transformers' ViTMAE has parameters this conversion does not know ({err}; it has "
                          f"{_state_key_map(mae.vit)}...)") from err
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    preprocess = getattr(clip.visual, "preprocess_cfg", None) or {}
    atomic_write_json(folder / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess),
                                             "model_name": f"{model_name}-mae", "pretraining": "mae", **meta})


class MaeTask:
    """``train.loop.Task``: transformers' ViTMAE loss; checkpoints carry both formats."""

    def __new__(cls, *args, **kwargs):  # subclass train.loop.Task lazily (torch is imported inside)
        from train.loop import Task

        class _MaeTask(Task):
            def __init__(self, model, model_name: str, seed: int) -> None:
                self.model = model
                self.model_name = model_name
                self.seed = seed

            def loss(self, model, batch):
                out = model(pixel_values=batch["image"])
                return out.loss, {"reconstruction_loss": out.loss}

            def save_model(self, model, folder: Path, **meta: Any) -> None:
                from safetensors.torch import save_file

                folder.mkdir(parents=True, exist_ok=True)
                state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
                save_file(state, str(folder / MAE_WEIGHTS))
                (folder / MAE_CONFIG).write_text(model.config.to_json_string(), encoding="utf-8")
                export_open_clip(model, self.model_name, folder, seed=self.seed, **{k: str(v) for k, v in meta.items()})

            def num_samples(self, batch) -> int:
                return int(batch["image"].shape[0])

        return _MaeTask(*args, **kwargs)


def check_resume(cfg: MaeRunConfig, out: Path) -> None:
    path = out / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))["config"]  # nested, or flat as older runs wrote it
    changed = changed_settings(MaeRunConfig, saved, cfg)  # all but the fields declared shapes_output=False
    if changed:
        raise ConfigError(f"{path}: --resume must keep the run's settings; changed "
                          + ", ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changed))


def train_mae(cfg: MaeRunConfig) -> dict[str, Any]:
    import torch
    from transformers import ViTMAEForPreTraining

    from base.models import load_model
    from base.shards import ShardError
    from train.captions import parse_caption_source
    from train.loader import ImageTextEncoder, LoaderConfig, ShardStream, peek_sample
    from train.loop import Trainer, latest_checkpoint, make_accelerator, seed_everything
    from train.run import input_side, resolve_precision, resolve_threads

    loop = cfg.trainer
    out = Path(cfg.out)
    latest = latest_checkpoint(out)
    if latest is not None and not loop.resume:
        raise UsageError(f"{out} already holds {latest.name}; add --resume to continue it, or choose another --out")
    if loop.resume:
        check_resume(cfg, out)
    precision = resolve_precision(cfg.precision)
    accelerator = make_accelerator(precision=precision, tracker="none", out_dir=out)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.set_num_threads(resolve_threads(cfg.threads, cfg.workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} (global) does not split over {world} processes")
    seed_everything(loop.seed)
    reference = load_model(cfg.model)  # the CLIP model: its preprocessing and the shape MAE copies
    config = mae_config(cfg.model, cfg)
    model = ViTMAEForPreTraining(config)
    source = parse_caption_source("real")  # the loader's caption slot; MAE ignores the text
    encoder = ImageTextEncoder(reference.preprocess_train, reference.tokenizer, source,
                               draft=2 * input_side(reference.model))
    stream = ShardStream(LoaderConfig(data=cfg.data, batch_size=cfg.batch_size // world, workers=cfg.workers,
                                      seed=loop.seed), encoder, rank=rank, world_size=world)
    first = peek_sample(stream.shards)
    if first is not None and first.image is None:
        raise ShardError(f"{stream.shards[0]}: samples carry no image; MAE trains on image shards")
    samples_seen = cfg.samples_seen or stream.num_samples
    total_steps = max(1, math.ceil(samples_seen / cfg.batch_size))
    if loop.stop_at_step is not None and loop.stop_at_step > total_steps:
        raise UsageError(f"--stop-at-step {loop.stop_at_step} is past the run's {total_steps} steps")
    # the warmup ends before the run does (a run of fewer steps than --warmup still reaches its peak lr)
    trainer_cfg = replace(loop, warmup=min(loop.warmup, total_steps - 1))
    if accelerator.is_main_process:
        import transformers

        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json", world_size=world, total_steps=total_steps, samples_seen=samples_seen,
                    num_samples=stream.num_samples, num_shards=len(stream.shards), task="mae", precision=precision,
                    mae_config=config.to_dict(), versions={"torch": torch.__version__,
                                                           "transformers": transformers.__version__})
    log.info("MAE of %s's image tower: %d steps of %d samples; %d samples in %d shards", cfg.model, total_steps,
             cfg.batch_size, stream.num_samples, len(stream.shards))
    task = MaeTask(model, cfg.model, loop.seed)
    result = Trainer(task, stream, trainer_cfg, total_steps=total_steps, out_dir=out, accelerator=accelerator, run_config=cfg,
                     tracker_project=out.name or "qcap-mae").train()
    return {"step": result.step, "total_steps": total_steps, "samples_seen": result.samples_seen,
            "finished": result.finished, "final_dir": str(result.final_dir) if result.final_dir else None,
            "last_metrics": result.last_metrics}


def main(argv: list[str], prog: str = "qcap mae") -> int:
    cfg = parse_config(MaeRunConfig, argv, prog=prog)
    summary = train_mae(cfg)
    loss = summary["last_metrics"].get("loss")
    print(f"{cfg.out}: step {summary['step']}/{summary['total_steps']}, {summary['samples_seen']} samples seen"
          + (f", reconstruction loss {loss:.4f}" if isinstance(loss, float) else ""))
    if summary["final_dir"]:
        print(f"  final: {summary['final_dir']} (MAE weights + open_clip local-dir: for qcap finetune)")
    return 0


if __name__ == "__main__":
    from base.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:], "python -m train.mae"))
