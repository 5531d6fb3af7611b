"""Dataset reinforcement's members: stored image augmentations (draw once, re-apply bit for bit)
and teacher embeddings (Apple's ``KEY.npz`` / ``KEY.pth.gz``).

Used by ``qcap reinforce`` (captioning) to write them and by ``qcap train`` to read them.

Apple's DataCompDR stores, per image, the parameters of N augmentations (``KEY.paug.json`` =
``{"param_aug": "<JSON string>"}``), each ``[[i, j, h, w], [[op_index, magnitude], ...]]``: the
RandomResizedCrop box in absolute pixels of the image the parameters were drawn on, then the
RandAugment ops (index into torchvision's RandAugment augmentation space, signed magnitude).
Apple's recipe (ml-mobileclip ``dr/transforms``): random_resized_crop (size 224, bicubic),
rand_augment (p 1.0), to_rgb, to_tensor, OpenAI mean/std.

Drawing uses torchvision's own parameter samplers under a seeded torch generator
(``RandomResizedCrop.get_params``; RandAugment's op and sign draws in the order
``torchvision.transforms.RandAugment.forward`` makes them), so a draw with seed ``s`` gives
the same tensor as torchvision's online pipeline run after ``torch.manual_seed(s)``.
Re-applying uses torchvision's functional ops (``F.resized_crop``,
``torchvision.transforms.autoaugment._apply_op``) on the decoded image: a pure function of
(image, parameters, config), identical wherever it runs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PAUG_MEMBER = "paug.json"
RECORD_MEMBER = "reinforce.json"  # qcap: the image the parameters refer to, the text rows, fingerprints
EMBEDDING_MEMBERS = ("npz", "pth.gz")
REPLACED_MEMBERS = (PAUG_MEMBER, *EMBEDDING_MEMBERS, RECORD_MEMBER)


class AugmentError(ValueError):
    """Stored augmentation parameters that do not fit the image or the config."""


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Apple's augmentation recipe by default; ``size`` is the output side."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults (Apple keeps them)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    rand_augment: bool = True
    rand_augment_p: float = 1.0
    num_ops: int = 2  # torchvision RandAugment defaults
    magnitude: int = 9
    num_magnitude_bins: int = 31
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    recipe: str = field(default="apple-dr")

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size: must be >= 1, got {self.size}")
        if not 0.0 <= self.rand_augment_p <= 1.0:
            raise ValueError(f"rand_augment_p: must be in [0, 1], got {self.rand_augment_p}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interpolation: bicubic, bilinear or nearest, got {self.interpolation!r}")

    def as_json(self) -> dict[str, Any]:
        """Apple's config layout plus every parameter qcap uses."""
        values = asdict(self)
        return {
            "recipe": self.recipe,
            "random_resized_crop": {"size": self.size, "scale": list(self.scale), "ratio": list(self.ratio),
                                    "interpolation": self.interpolation},
            "rand_augment": {"enable": self.rand_augment, "p": self.rand_augment_p, "num_ops": self.num_ops,
                             "magnitude": self.magnitude, "num_magnitude_bins": self.num_magnitude_bins},
            "to_rgb": True,
            "to_tensor": True,
            "normalize": {"mean": list(values["mean"]), "std": list(values["std"])},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AugmentConfig:
        crop, rand, norm = data["random_resized_crop"], data["rand_augment"], data["normalize"]
        return cls(size=int(crop["size"]), scale=tuple(crop["scale"]), ratio=tuple(crop["ratio"]),
                   interpolation=crop["interpolation"], rand_augment=bool(rand["enable"]),
                   rand_augment_p=float(rand["p"]), num_ops=int(rand["num_ops"]), magnitude=int(rand["magnitude"]),
                   num_magnitude_bins=int(rand["num_magnitude_bins"]), mean=tuple(norm["mean"]),
                   std=tuple(norm["std"]), recipe=str(data.get("recipe", "apple-dr")))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:16]


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}[name]


def _space(cfg: AugmentConfig) -> dict[str, Any]:
    """torchvision's RandAugment augmentation space (op name → (magnitudes, signed)), in its order."""
    from torchvision.transforms import RandAugment

    return RandAugment(num_ops=cfg.num_ops, magnitude=cfg.magnitude, num_magnitude_bins=cfg.num_magnitude_bins) \
        ._augmentation_space(cfg.num_magnitude_bins, (cfg.size, cfg.size))


def draw_params(image, cfg: AugmentConfig, seed: int) -> list:
    """One augmentation's parameters ``[[i, j, h, w], [[op_index, magnitude], ...]]`` for a PIL
    image, drawn from torchvision's samplers under ``seed`` (the global torch RNG state is left
    as it was)."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        box = RandomResizedCrop.get_params(image, list(cfg.scale), list(cfg.ratio))
        ops: list[list[float]] = []
        if cfg.rand_augment and (cfg.rand_augment_p >= 1.0 or torch.rand(1).item() < cfg.rand_augment_p):
            space = _space(cfg)
            names = list(space)
            for _ in range(cfg.num_ops):  # torchvision RandAugment.forward's draws, in its order
                index = int(torch.randint(len(space), (1,)).item())
                magnitudes, signed = space[names[index]]
                magnitude = float(magnitudes[cfg.magnitude].item()) if magnitudes.ndim > 0 else 0.0
                if signed and torch.randint(2, (1,)):
                    magnitude *= -1.0
                ops.append([index, magnitude])
    return [[int(v) for v in box], ops]


def augmentation_seed(seed: int, uid: str, index: int) -> int:
    """The seed of augmentation ``index`` of image ``uid``: a pure function, so a redone shard
    draws the same parameters."""
    digest = hashlib.sha256(f"{seed}:{uid}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def draw_many(image, cfg: AugmentConfig, num: int, seed: int, uid: str) -> list:
    """``num`` augmentations of one image; augmentation ``a`` drawn with :func:`augmentation_seed`."""
    return [draw_params(image, cfg, augmentation_seed(seed, uid, a)) for a in range(num)]


def check_params(params: Any, image_size: tuple[int, int], cfg: AugmentConfig) -> tuple[tuple[int, int, int, int], list]:
    """``((i, j, h, w), ops)`` checked against the image (width, height) and the op space."""
    try:
        box, ops = params
        i, j, h, w = (int(v) for v in box)
        ops = [(int(op), float(mag)) for op, mag in ops]
    except (TypeError, ValueError) as err:
        raise AugmentError(f"augmentation parameters {str(params)[:80]!r} are not [[i, j, h, w], [[op, magnitude], ...]]") from err
    width, height = image_size
    if h <= 0 or w <= 0 or i < 0 or j < 0 or i + h > height or j + w > width:
        raise AugmentError(f"crop box (i={i}, j={j}, h={h}, w={w}) does not fit a {width}x{height} image: the "
                           "parameters were drawn on another image")
    num_ops = len(_space(cfg))
    if any(not 0 <= op < num_ops for op, _ in ops):
        raise AugmentError(f"RandAugment op index outside 0..{num_ops - 1}: {ops}")
    return (i, j, h, w), ops


def apply_pil(image, params: Any, cfg: AugmentConfig):
    """The augmented image (PIL, ``cfg.size`` square) before to_tensor/normalize."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    (i, j, h, w), ops = check_params(params, image.size, cfg)
    out = F.resized_crop(image, i, j, h, w, [cfg.size, cfg.size], _interpolation(cfg.interpolation), antialias=True)
    if ops:
        names = list(_space(cfg))
        for op, magnitude in ops:  # RandAugment's own defaults: nearest interpolation, no fill
            out = _apply_op(out, names[op], magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    return out


def to_tensor(image, cfg: AugmentConfig, *, normalize: bool = True):
    import torchvision.transforms.functional as F

    tensor = F.to_tensor(image.convert("RGB"))
    return F.normalize(tensor, list(cfg.mean), list(cfg.std)) if normalize else tensor


def apply_params(image, params: Any, cfg: AugmentConfig, *, normalize: bool = True):
    """Re-apply one stored augmentation to a decoded PIL image: a float tensor [3, size, size]."""
    return to_tensor(apply_pil(image, params, cfg), cfg, normalize=normalize)


def online_transform(cfg: AugmentConfig):
    """torchvision's own online pipeline for ``cfg`` (what :func:`draw_params` reproduces)."""
    from torchvision import transforms as T

    steps = [T.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio,
                                 interpolation=_interpolation(cfg.interpolation), antialias=True)]
    if cfg.rand_augment:
        steps.append(T.RandAugment(num_ops=cfg.num_ops, magnitude=cfg.magnitude,
                                   num_magnitude_bins=cfg.num_magnitude_bins))
    steps += [T.ToTensor(), T.Normalize(list(cfg.mean), list(cfg.std))]
    return T.Compose(steps)


def encode_paug(params: list) -> bytes:
    """``KEY.paug.json`` in Apple's layout: ``{"param_aug": "<JSON string of the list>"}``."""
    return json.dumps({"param_aug": json.dumps(params)}).encode("utf-8")


def decode_paug(data: bytes) -> list:
    """The list of augmentation parameters of a ``KEY.paug.json``; AugmentError when it is not one."""
    try:
        outer = json.loads(data)
        inner = outer["param_aug"]
        params = json.loads(inner) if isinstance(inner, str) else inner
    except (ValueError, KeyError, TypeError) as err:
        raise AugmentError(f"paug.json is not {{'param_aug': '<JSON list>'}} ({type(err).__name__})") from err
    if not isinstance(params, list) or not params:
        raise AugmentError("paug.json holds no augmentation parameters")
    return params


def encode_embeddings(image_emb, text_emb, kind: str) -> bytes:
    """Apple's ``KEY.npz`` (fp32 arrays) or ``KEY.pth.gz`` (bf16 tensors, torch.save, gzip)."""
    import numpy as np
    import torch

    if kind == "npz":
        sink = io.BytesIO()
        np.savez(sink, image_emb=image_emb.float().numpy().astype(np.float32),
                 text_emb=text_emb.float().numpy().astype(np.float32))
        return sink.getvalue()
    sink = io.BytesIO()
    torch.save({"image_emb": image_emb.to(torch.bfloat16).contiguous(),
                "text_emb": text_emb.to(torch.bfloat16).contiguous()}, sink)
    return gzip.compress(sink.getvalue(), mtime=0)


def decode_embeddings(extras: dict[str, bytes]) -> tuple[Any, Any] | None:
    """``(image_emb, text_emb)`` float32 tensors from a sample's ``npz`` or ``pth.gz``; None when it
    has neither; ValueError when the member does not hold both arrays."""
    import numpy as np
    import torch

    if "npz" in extras:
        try:
            with np.load(io.BytesIO(extras["npz"]), allow_pickle=False) as npz:
                return torch.from_numpy(np.array(npz["image_emb"], dtype=np.float32)), \
                    torch.from_numpy(np.array(npz["text_emb"], dtype=np.float32))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"npz without image_emb/text_emb ({type(err).__name__})") from err
    if "pth.gz" in extras:
        try:
            state = torch.load(io.BytesIO(gzip.decompress(extras["pth.gz"])), map_location="cpu", weights_only=True)
            return state["image_emb"].float(), state["text_emb"].float()
        except Exception as err:  # untrusted bytes: any parser failure means "not Apple's pth.gz"
            raise ValueError(f"pth.gz without image_emb/text_emb ({type(err).__name__})") from err
    return None
