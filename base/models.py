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

import contextlib
import json
import logging
import os
import re
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


MODEL_CONFIGS_ENV = "QCAP_MODEL_CONFIGS"  # more config files/folders, os.pathsep-separated (captioning.vocab's)


def register_model_configs() -> None:
    """Add qcap's tiny model configs to open_clip's registry (idempotent), and the config files or
    folders named in ``$QCAP_MODEL_CONFIGS`` (e.g. a captioner with a vocabulary fitted to the
    world, ``python -m captioning.vocab``); a named path that does not exist is a ValueError."""
    global _registered
    if _registered:
        return
    import open_clip

    from base.towers import install

    install()  # CoCa with a timm CNN tower (qcap-tiny-coca-resnet10t)
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    for extra in filter(None, os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep)):
        if not os.path.exists(extra):
            raise ValueError(f"{MODEL_CONFIGS_ENV}: {extra}: no such model config file or folder")
        open_clip.add_model_config(extra)
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
            folder, recorded, weights = inspect_checkpoint_dir(path)
            if model is not None and recorded is not None and model != recorded:
                raise ValueError(f"{folder}: checkpoint is a {recorded!r}, not the requested {model!r}")
            name = recorded or model
            model_id = f"local-dir:{folder}"
            check_weights_file(weights)
            source = str(weights)
        elif path.is_file():
            if model is None:
                raise ValueError(f"{path}: a bare weights file needs --model to name its architecture")
            check_weights_file(path)
            model_id, kwargs["pretrained"] = model, str(path)
            source = str(path)
        else:
            raise ValueError(f"{path}: no such checkpoint file or folder")
    else:
        if model is None:
            raise ValueError("name a model (--model) or a checkpoint (--checkpoint)")
        model_id = model
        if pretrained:
            if os.path.isfile(pretrained):
                check_weights_file(pretrained)
            kwargs["pretrained"] = pretrained
            source = pretrained
        elif model.startswith(("hf-hub:", "local-dir:")):  # open_clip loads these ids' weights itself
            source = model
    try:
        with _quiet_random_init(source == "random"):
            net, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_id, **kwargs)
    except RuntimeError as err:
        if "size mismatch" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err):
            raise ValueError(f"checkpoint {source} does not fit model {name!r}: {_squashed(err, 400)}") from err
        if source == "random":
            raise
        raise ValueError(f"{source}: could not be loaded into model {name!r} ({_one_line(err)})") from err
    except (TypeError, KeyError, ValueError) as err:
        if not model_id.startswith("local-dir:"):
            raise
        # the folder's model_cfg was read above; open_clip could not build a model from it
        config_path = Path(model_id.removeprefix("local-dir:"), CONFIG_FILE)
        raise ValueError(f"{config_path}: its model_cfg does not describe an open_clip model "
                         f"({type(err).__name__}: {_one_line(err)}); re-export the folder") from err
    if source == "random":
        init_coca_decoder(net)
    tokenizer = open_clip.get_tokenizer(model_id)
    net.eval()
    return LoadedModel(net, preprocess_train, preprocess_val, tokenizer, name or model_id, source)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init(asked: bool):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" on the root
    logger; when random initialisation is what was asked for (``--random``, a fresh model to
    train) that is no news, and it stood before a command's one-line result."""
    if not asked:
        yield
        return
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    handlers = list(root.handlers)
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


def _one_line(err: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message, shortened: hostile files make long messages."""
    text = str(err).strip().splitlines()
    line = text[0].strip() if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _squashed(err: BaseException, limit: int = 300) -> str:
    """An error's whole message on one line (whitespace runs collapsed), shortened."""
    line = " ".join(str(err).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_checkpoint_config(folder: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint folder's ``open_clip_config.json``, checked: a JSON object whose
    ``model_cfg`` is an object. ValueError naming the file otherwise."""
    path = Path(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON config ({_one_line(err)}); re-export the checkpoint "
                         "folder (base.models.save_checkpoint_dir)") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object (model_cfg, preprocess_cfg), not {type(config).__name__}")
    if not isinstance(config.get("model_cfg"), dict):
        raise ValueError(f"{path}: has no 'model_cfg' object; it is not an open_clip checkpoint folder")
    if not isinstance(config.get("preprocess_cfg", {}), dict):
        raise ValueError(f"{path}: 'preprocess_cfg' must be an object")
    return config


def inspect_checkpoint_dir(path: str | os.PathLike) -> tuple[Path, str | None, Path]:
    """``(folder, recorded model name or None, weights file)`` of a checkpoint folder or run
    (the newest ``step-*/`` or ``final/``), its config checked and its weights file found as
    open_clip will load it — without reading the weights. ValueError (one line) otherwise;
    stages that identify a checkpoint (its name, the sha256 of its weights) use this."""
    folder = resolve_checkpoint_dir(path)
    recorded = read_checkpoint_config(folder).get("model_name")
    if recorded is not None and not isinstance(recorded, str):
        raise ValueError(f"{folder / CONFIG_FILE}: 'model_name' must be a string, not {recorded!r}")
    return folder, recorded, checkpoint_weights_file(folder)


def checkpoint_weights_file(folder: str | os.PathLike) -> Path:
    """The weights file open_clip loads from a ``local-dir:`` folder (its own preference order);
    ValueError when the folder has none (open_clip would silently build random weights)."""
    from open_clip.factory import _find_checkpoint_in_dir

    found = _find_checkpoint_in_dir(Path(folder))
    if found is None:
        raise ValueError(f"{folder}: holds {CONFIG_FILE} but no weights file ({WEIGHTS_FILE}); "
                         "the checkpoint is incomplete")
    return Path(found)


_WHAT_TO_DO = "give a checkpoint qcap or open_clip wrote (safetensors, or torch.save of tensors only)"


def check_weights_file(path: str | os.PathLike) -> None:
    """Open a weights file the safe way and check that it holds a state dict (names → tensors),
    before open_clip reads it: ``.safetensors`` by its header (cheap), anything else with
    ``torch.load(weights_only=True)`` (memory-mapped when the format allows it).

    Every way the file can be unsafe or broken — a pickle whose globals the weights-only
    unpickler refuses (it would run code), a truncated or garbage file, something that is not a
    state dict — becomes one ValueError line naming the file. The file is untrusted input, so
    any exception its parser raises means "not a checkpoint"; nothing is retried unsafely.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({_one_line(err)}); "
                             f"it is truncated or corrupt — {_WHAT_TO_DO}") from err
        if not keys:
            raise ValueError(f"{path}: holds no tensors; {_WHAT_TO_DO}")
        return
    if path.suffix in (".npz", ".npy"):
        return  # open_clip's big_vision loader reads these with numpy (no pickle allowed there)
    state = load_torch_file(path, mmap=True)  # only looked at: no copy of the tensors
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    import torch

    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: holds a {type(state).__name__}{' (empty)' if not state else ''}, "
                         f"not a state dict of named tensors; {_WHAT_TO_DO}")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path}: entry {bad!r} is not a named tensor; not a state dict — {_WHAT_TO_DO}")


def load_torch_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, memory-mapped when the format allows;
    a refused pickle, a truncated or garbage file becomes one ValueError line naming the file
    (never torch's advice to retry with ``weights_only=False``)."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the weights-only unpickler's pickle-protocol notice
            if not mmap:
                return torch.load(path, map_location="cpu", weights_only=True)
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap can only be used" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        # torch's message advises retrying unsafely; only the refused global is worth repeating
        found = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        if found:
            raise ValueError(f"{path}: refused: a pickle that would run code when loaded (it calls "
                             f"{found.group(1)}); qcap loads weights only — {_WHAT_TO_DO}") from err
        raise ValueError(f"{path}: not a readable checkpoint (the weights-only loader refused its contents); "
                         f"it is corrupt or holds more than weights — {_WHAT_TO_DO}") from err
    except Exception as err:  # untrusted bytes: any parser failure means the file is not a checkpoint
        why = _one_line(err, 160)
        if "weights_only" in why:  # never pass on torch's advice to load unsafely
            why = "refused by the weights-only loader"
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {why}); "
                         f"it is truncated or corrupt — {_WHAT_TO_DO}") from err


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

    from base.shards import atomic_write_json

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    visual = getattr(unwrap(model), "visual", None)
    preprocess = getattr(visual, "preprocess_cfg", None) or {}
    cfg = model_config(model_name)
    atomic_write_json(
        tmp / CONFIG_FILE,
        {"model_cfg": cfg, "preprocess_cfg": dict(preprocess), "model_name": model_name, **extra},
    )
    # open_clip loads a local-dir: model's HF tokenizer from the folder itself: carry a local one along
    # (a vocabulary fitted by captioning.vocab); hub tokenizer names are left to open_clip
    tokenizer_dir = cfg.get("text_cfg", {}).get("hf_tokenizer_name") or ""
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for item in sorted(Path(tokenizer_dir).iterdir()):
            if item.is_file() and item.name not in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(item, tmp / item.name)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def has_convolutional_tower(model: Any) -> bool:
    """Whether the image tower convolves beyond a patch embedding: a CNN (timm's resnet10t, MobileCLIP's
    MCi) rather than a ViT, whose one Conv2d is its patch embedding."""
    import torch

    visual = getattr(unwrap(model), "visual", None)
    if visual is None:
        return False
    return sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 1


def resolve_channels_last(mode: str, model: Any) -> bool:
    """``--channels-last`` (auto, on, off): store the image tower's 4-D weights channels-last (NHWC).
    oneDNN and cuDNN then run its convolutions in NHWC (an NCHW input is converted by the first one);
    measured here on a ``qcap-tiny-resnet10t`` CLIP training step: 1.16x under bf16 autocast, 1.06x
    in fp32 (``bench/channels_last.py``). auto: on for a convolutional tower, off for a ViT."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"channels_last: must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and has_convolutional_tower(model))


def unwrap(model: Any) -> Any:
    """The bare model under DDP / Accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
