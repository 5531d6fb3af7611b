"""open_clip models for every stage: qcap's tiny configs, safe loading, checkpoint folders.

Models always come from open_clip's registry. qcap's tiny CPU-sized configs
(``model_configs/*.json``) are registered the way open_clip registers its own, so
``open_clip.create_model_and_transforms("qcap-tiny-clip")`` works after
:func:`register_model_configs`.

A *qcap checkpoint folder* is what open_clip calls a ``local-dir:`` model:
``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``, plus qcap's ``model_name``)
and ``open_clip_model.safetensors``. Users load it with open_clip alone::

    open_clip.create_model_and_transforms("local-dir:runs/clip/final")
    open_clip.create_model_and_transforms("qcap-tiny-clip", pretrained="runs/clip/final/open_clip_model.safetensors")

Weights are read with safetensors, or ``torch.load(weights_only=True)``; never pickle.
:func:`weights_sha256` identifies a weights file in provenance records.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
_registered = False
log = logging.getLogger(__name__)


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a weights file, read in 4 MiB blocks: the identity that provenance and
    score files record for the exact weights a model was loaded from."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def register_model_configs() -> None:
    """Add qcap's tiny model configs to open_clip's registry (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def tiny_model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


@dataclass(slots=True)
class LoadedModel:
    model: Any  # the open_clip model (CLIP, CustomTextCLIP or CoCa), in eval mode
    preprocess_train: Any  # open_clip's training transform
    preprocess_val: Any  # open_clip's eval transform
    tokenizer: Any  # open_clip's tokenizer for this model
    name: str  # model name (registry name, or the folder's recorded name)
    source: str  # where the weights came from: "random", a pretrained tag, or a file


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return Path(path, CONFIG_FILE).is_file()


def load_model(
    model: str | None = None,
    *,
    pretrained: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> LoadedModel:
    """Build an open_clip model from one of:

    - ``checkpoint``: a qcap checkpoint folder (``local-dir:``), a ``step-*/`` training
      checkpoint, or a weights file (``.safetensors``; ``.pt``/``.bin`` load with
      ``weights_only=True``) — then ``model`` names the architecture;
    - ``model`` + ``pretrained``: an open_clip pretrained tag (downloads) or a weights file;
    - ``model`` alone: random initialisation (``hf-hub:`` ids work too, and load their weights).

    A randomly initialised CoCa gets its multimodal decoder initialised by
    :func:`init_coca_decoder` (open_clip leaves part of it as ``torch.empty``).

    Raises ValueError with what to do when the arguments do not fit together.
    """
    import open_clip

    register_model_configs()
    if checkpoint is not None and pretrained is not None:
        raise ValueError("give --checkpoint or --pretrained, not both")
    kwargs: dict[str, Any] = {"device": device, "precision": precision, "output_dict": True}
    name = model
    source = "random"
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir():
            folder = resolve_checkpoint_dir(path)
            with open(folder / CONFIG_FILE, encoding="utf-8") as handle:
                recorded = json.load(handle).get("model_name")
            if model is not None and recorded is not None and model != recorded:
                raise ValueError(f"{folder}: checkpoint is a {recorded!r}, not the requested {model!r}")
            name = recorded or model
            model_id = f"local-dir:{folder}"
            source = str(folder / WEIGHTS_FILE)
        elif path.is_file():
            if model is None:
                raise ValueError(f"{path}: a bare weights file needs --model to name its architecture")
            model_id, kwargs["pretrained"] = model, str(path)
            source = str(path)
        else:
            raise ValueError(f"{path}: no such checkpoint file or folder")
    else:
        if model is None:
            raise ValueError("name a model (--model) or a checkpoint (--checkpoint)")
        model_id = model
        if pretrained:
            kwargs["pretrained"] = pretrained
            source = pretrained
        elif model.startswith(("hf-hub:", "local-dir:")):  # open_clip loads these ids' weights itself
            source = model
    try:
        net, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_id, **kwargs)
    except RuntimeError as err:
        if "size mismatch" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err):
            raise ValueError(f"checkpoint {source} does not fit model {name!r}: {str(err)[:400]}") from err
        raise
    if source == "random":
        init_coca_decoder(net)
    tokenizer = open_clip.get_tokenizer(model_id)
    net.eval()
    return LoadedModel(net, preprocess_train, preprocess_val, tokenizer, name or model_id, source)


def init_coca_decoder(model: Any, *, logit_scale: float = 1.0) -> None:
    """Initialise a fresh CoCa's multimodal decoder as open_clip means to; no-op for other models.

    open_clip 3.3 never calls ``MultimodalTransformer.init_parameters`` (which would fail: it
    reads ``self.transformer``, an attribute the class lacks), so the decoder keeps PyTorch's
    default layer inits and its ``text_projection`` (width x vocabulary) stays ``torch.empty``:
    uninitialised memory, zeros only when the allocator happens to hand out fresh pages, NaN
    losses and noise captions when it reuses freed memory. This applies that method's stds
    (those of open_clip's text tower). :func:`load_model` calls it for every randomly
    initialised model; never call it on trained weights.

    ``logit_scale`` multiplies the vocabulary projection's std (``logit_scale / sqrt(width)``):
    1 is open_clip's init (unit-scale logits); tests and benchmarks use about 6 for next-token
    distributions as peaked as a trained captioner's.
    """
    import torch

    decoder = getattr(unwrap(model), "text_decoder", None)
    if decoder is None or getattr(decoder, "text_projection", None) is None:
        return
    width, layers = decoder.width, decoder.layers
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    with torch.no_grad():
        for block in [*decoder.resblocks, *decoder.cross_attn]:
            torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        torch.nn.init.normal_(decoder.text_projection, std=logit_scale * width**-0.5)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the newest ``step-*/`` or ``final/`` folder inside a run."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    if is_checkpoint_dir(path / "final"):
        return path / "final"
    steps = sorted(p for p in path.glob("step-*") if is_checkpoint_dir(p))
    if steps:
        return steps[-1]
    raise ValueError(f"{path}: not a checkpoint folder (no {CONFIG_FILE}) and holds no step-*/ or final/ checkpoint")


def model_config(name: str) -> dict[str, Any]:
    """The registry config of a model name (qcap's tiny ones included)."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}; known: {', '.join(open_clip.list_models())}")
    return cfg


def save_checkpoint_dir(model: Any, model_name: str, folder: str | os.PathLike, **extra: Any) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` folder (config + safetensors), atomically.

    The folder appears under its final name only when complete. ``extra`` goes into the config
    JSON (e.g. training step, data hash).
    """
    import shutil

    from safetensors.torch import save_file

    from curate.shards import atomic_write_json

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    visual = getattr(unwrap(model), "visual", None)
    preprocess = getattr(visual, "preprocess_cfg", None) or {}
    atomic_write_json(
        tmp / CONFIG_FILE,
        {"model_cfg": model_config(model_name), "preprocess_cfg": dict(preprocess), "model_name": model_name, **extra},
    )
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def unwrap(model: Any) -> Any:
    """The bare model under DDP / Accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
