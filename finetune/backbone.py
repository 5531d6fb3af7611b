"""The image tower of an open_clip model (or qcap checkpoint) as a dense-prediction backbone.

A backbone turns images into feature maps plus the model's own pooled image embedding, and
exposes what the rest of the stage needs: its blocks (attention distance, layer-wise lr decay),
its size unit and width. Two families, three adapter classes:

- plain ViTs (``hierarchical = False``): ``features`` = the last block's patch tokens as a
  ``B×C×h×w`` map (stride = patch size); the dense neck builds a ViTDet simple feature pyramid
  from it.

  - ``open_clip.transformer.VisionTransformer`` (CLIP, CoCa, DataComp/DFN ViTs, qcap's tiny
    configs) → :class:`OpenClipViT`;
  - ``open_clip.timm_model.TimmModel`` wrapping a timm ``VisionTransformer`` (SigLIP-style
    configs) → :class:`TimmViT`.

- hierarchical towers (``hierarchical = True``): a ``TimmModel`` whose timm trunk has stages at
  strides that double (FastViT/MobileCLIP's MCi, ConvNeXt, ResNet, ...) → :class:`TimmHierarchical`;
  ``levels`` = the last four stages' maps, read with timm's ``forward_intermediates`` at the
  stages its ``feature_info`` lists; the dense neck is an FPN over them. Layer ids for lr decay
  come from timm's ``group_matcher``. They have no ViT attention to measure.

Anything else (open_clip's ModifiedResNet, a timm trunk without feature stages, a text-only
model) is refused with one :class:`BackboneError` line naming the tower and what would work.
ViT positional embeddings are resampled when the finetuning image size differs from the
pretraining one (bicubic, timm's resampler).

Usage::

    source = BackboneSource(checkpoint=Path("runs/clip/final"))
    backbone = load_backbone(source, image_size=64)
    out = backbone(images)          # out.features: B×C×8×8, out.pooled: B×D
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from base.cli import UsageError


class BackboneError(UsageError):
    """The model cannot serve as a backbone (wrong kind of tower, bad image size)."""


@dataclass(frozen=True, slots=True)
class BackboneSource:
    """Where the backbone's weights come from: exactly one of the three."""

    checkpoint: Path | None = None  # a qcap checkpoint folder / run folder / weights file
    pretrained: str | None = None  # open_clip "NAME:TAG", e.g. "ViT-B-16:datacomp_xl_s13b_b90k"
    random: str | None = None  # an open_clip model name, randomly initialised (the baseline)
    model: str | None = None  # architecture for a bare weights file given as checkpoint

    def __post_init__(self) -> None:
        given = [name for name in ("checkpoint", "pretrained", "random") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of --checkpoint, --pretrained NAME:TAG or --random MODEL (got {given or 'none'})"
            )
        if self.pretrained is not None and ":" not in self.pretrained:
            raise ValueError(f"pretrained: {self.pretrained!r} is not NAME:TAG (e.g. ViT-B-16:datacomp_xl_s13b_b90k)")

    @classmethod
    def parse(cls, spec: str) -> BackboneSource:
        """``random:MODEL``, ``pretrained:NAME:TAG`` or a checkpoint path (for ``--compare``)."""
        if spec.startswith("random:"):
            return cls(random=spec.removeprefix("random:"))
        if spec.startswith("pretrained:"):
            return cls(pretrained=spec.removeprefix("pretrained:"))
        return cls(checkpoint=Path(spec))

    def describe(self) -> str:
        if self.checkpoint is not None:
            return str(self.checkpoint)
        if self.pretrained is not None:
            return f"pretrained:{self.pretrained}"
        return f"random:{self.random}"


@dataclass(slots=True)
class BackboneOutput:
    features: torch.Tensor  # B×C×h×w: ViT: the last block's patch tokens (stride = patch size); else the last stage's map
    pooled: torch.Tensor | None  # B×D: the model's own image embedding (CLIP's encode_image); None if not asked
    levels: list[torch.Tensor] | None = None  # hierarchical towers: the stages' maps, fine → coarse


class ViTBackbone(nn.Module, abc.ABC):
    """Common interface of the adapters; ``visual`` keeps open_clip's parameter names."""

    kind: str = ""
    hierarchical = False  # True: multi-scale stage maps in ``levels`` (no ViT blocks/attention)
    size_unit = "patch size"  # what an input side must be a multiple of

    def __init__(self, visual: nn.Module, *, name: str, source: str) -> None:
        super().__init__()
        self.visual = visual
        self.model_name = name
        self.source = source

    # Filled in by the adapters -------------------------------------------------------------
    patch_size: tuple[int, int]
    width: int  # token width (channels of ``features``)
    embed_dim: int  # width of ``pooled``
    num_prefix_tokens: int  # class (and register) tokens before the patch tokens
    native_image_size: tuple[int, int]  # the input size the tower was pretrained at

    @abc.abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order."""

    @abc.abstractmethod
    def attention_modules(self) -> list[nn.Module]:
        """The self-attention module of each block, in order (see finetune.attention)."""

    @abc.abstractmethod
    def layer_id(self, name: str) -> int:
        """0 for the embeddings, i+1 for block i, num_layers+1 for what follows the blocks."""

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, *, pooled: bool = True) -> BackboneOutput:
        """``pooled=False`` skips the pooling head (dense tasks do not use it)."""

    def pooling_parameters(self) -> list[nn.Parameter]:
        """Parameters used only by the pooled embedding (final norm, projection, attention pool)."""
        top = self.num_layers + 1
        return [p for name, p in self.named_parameters() if self.layer_id(name) == top]

    # Shared ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        height, width = image_size
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise BackboneError(
                f"image_size: {height}x{width} is not a multiple of the {self.size_unit} {ph}x{pw} of {self.model_name}"
            )
        return height // ph, width // pw

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "source": self.source,
            "kind": self.kind,
            "patch_size": list(self.patch_size),
            "native_image_size": list(self.native_image_size),
            "width": self.width,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "num_params": sum(p.numel() for p in self.parameters()),
        }

    @property
    def num_heads(self) -> int:
        attn = self.attention_modules()[0]
        return int(getattr(attn, "num_heads"))  # noqa: B009 - every supported attention has it


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class OpenClipViT(ViTBackbone):
    """open_clip's own ``VisionTransformer``."""

    kind = "open_clip"

    def __init__(self, visual: nn.Module, *, name: str, source: str) -> None:
        super().__init__(visual, name=name, source=source)
        self.patch_size = _pair(visual.patch_size)
        self.width = int(visual.conv1.out_channels)
        self.embed_dim = int(visual.output_dim)
        self.num_prefix_tokens = 1
        self.pretrain_grid = tuple(int(g) for g in visual.grid_size)
        self.native_image_size = _pair(visual.image_size)

    def blocks(self) -> list[nn.Module]:
        return list(self.visual.transformer.resblocks)

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.visual.transformer.resblocks]

    def layer_id(self, name: str) -> int:
        name = name.removeprefix("visual.")
        if name.startswith(("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout")):
            return 0
        if name.startswith("transformer.resblocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1

    def _positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.visual.positional_embedding
        if grid == self.pretrain_grid:
            return pos
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos.unsqueeze(0), list(grid), list(self.pretrain_grid), num_prefix_tokens=1)[0]

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Class token + patch tokens after the embeddings, before the first block."""
        visual = self.visual
        grid = self.grid(tuple(images.shape[-2:]))
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid).to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x)

    def forward(self, images: torch.Tensor, *, pooled: bool = True) -> BackboneOutput:
        grid = self.grid(tuple(images.shape[-2:]))
        x = self.visual.transformer(self.tokens(images))
        batch = x.shape[0]
        features = x[:, 1:].reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
        if not pooled:
            return BackboneOutput(features=features, pooled=None)
        embedding, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            embedding = embedding @ self.visual.proj
        return BackboneOutput(features=features, pooled=embedding)


class TimmViT(ViTBackbone):
    """open_clip's ``TimmModel`` around a timm ``VisionTransformer``."""

    kind = "timm"

    def __init__(self, visual: nn.Module, *, name: str, source: str, image_size: tuple[int, int]) -> None:
        super().__init__(visual, name=name, source=source)
        trunk = visual.trunk
        self.patch_size = _pair(trunk.patch_embed.patch_size)
        self.native_image_size = _pair(visual.image_size)  # what open_clip's preprocessing produces
        if tuple(trunk.patch_embed.img_size) != tuple(image_size):
            self.grid(image_size)  # a clear error before timm's assertion
            trunk.set_input_size(img_size=image_size)
        self.width = int(trunk.embed_dim)
        with torch.no_grad():
            self.embed_dim = int(visual.head(trunk.forward_head(torch.zeros(1, 1 + trunk.num_prefix_tokens, self.width))).shape[-1])
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)

    def blocks(self) -> list[nn.Module]:
        return list(self.visual.trunk.blocks)

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.visual.trunk.blocks]

    def layer_id(self, name: str) -> int:
        name = name.removeprefix("visual.").removeprefix("trunk.")
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    def forward(self, images: torch.Tensor, *, pooled: bool = True) -> BackboneOutput:
        self.grid(tuple(images.shape[-2:]))
        trunk = self.visual.trunk
        if not pooled:
            intermediates = trunk.forward_intermediates(images, indices=1, output_fmt="NCHW", intermediates_only=True)
            return BackboneOutput(features=intermediates[-1], pooled=None)
        final, intermediates = trunk.forward_intermediates(images, indices=1, output_fmt="NCHW")
        return BackboneOutput(features=intermediates[-1], pooled=self.visual.head(trunk.forward_head(final)))


class TimmHierarchical(ViTBackbone):
    """open_clip's ``TimmModel`` around a hierarchical timm model (FastViT/MCi, ConvNeXt, ResNet, ...).

    ``levels`` are the last :attr:`NUM_LEVELS` entries of the trunk's ``feature_info`` (strides
    that double, e.g. 4, 8, 16, 32), read with ``forward_intermediates``; ``patch_size`` is the
    coarsest stride (an input side must be a multiple of it). Layer ids are timm's parameter
    groups (``group_matcher(coarse=False)``: stem 0, then blocks/stages in order); the trunk's
    last group (final conv/norm and classifier: the pooled embedding's) and open_clip's head
    are the top id.
    """

    kind = "timm-hierarchical"
    hierarchical = True
    size_unit = "coarsest stride"
    NUM_LEVELS = 4

    def __init__(self, visual: nn.Module, *, name: str, source: str, stages: list[dict[str, Any]]) -> None:
        super().__init__(visual, name=name, source=source)
        from timm.models import group_parameters

        trunk = visual.trunk
        self.level_indices = [len(stages) - self.NUM_LEVELS + i for i in range(self.NUM_LEVELS)]
        chosen = [stages[i] for i in self.level_indices]
        self.level_channels = [int(s["num_chs"]) for s in chosen]
        self.level_strides = [int(s["reduction"]) for s in chosen]
        self.level_modules = [str(s.get("module", "")) for s in chosen]
        self.width = self.level_channels[-1]
        self.patch_size = (self.level_strides[-1], self.level_strides[-1])
        self.native_image_size = _pair(visual.image_size)
        self.num_prefix_tokens = 0
        groups = group_parameters(trunk, trunk.group_matcher(coarse=False))
        self._group_of = {param: int(gid) for gid, names in groups.items() for param in names}
        self._top = max(groups) if groups else 1
        was_training = visual.training
        visual.eval()
        with torch.no_grad():  # eval mode: BatchNorm statistics stay untouched
            side = self.patch_size[0] * 2
            self.embed_dim = int(visual(torch.zeros(1, 3, side, side)).shape[-1])
        visual.train(was_training)

    @property
    def num_layers(self) -> int:
        return self._top - 1

    def blocks(self) -> list[nn.Module]:
        """The stages (no transformer blocks to list)."""
        trunk = self.visual.trunk
        return [trunk.get_submodule(m) for m in self.level_modules if m]

    def attention_modules(self) -> list[nn.Module]:
        return []  # no ViT self-attention: attention-distance refuses hierarchical towers

    @property
    def num_heads(self) -> int:
        return 0

    def layer_id(self, name: str) -> int:
        name = name.removeprefix("visual.")
        if name.startswith("trunk."):
            return min(self._group_of.get(name.removeprefix("trunk."), self._top), self._top)
        return self._top

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"stages": self.level_modules, "strides": self.level_strides,
                                     "channels": self.level_channels}

    def forward(self, images: torch.Tensor, *, pooled: bool = True) -> BackboneOutput:
        self.grid(tuple(images.shape[-2:]))
        trunk = self.visual.trunk
        if not pooled:
            levels = trunk.forward_intermediates(images, indices=self.level_indices, output_fmt="NCHW",
                                                 intermediates_only=True)
            return BackboneOutput(features=levels[-1], pooled=None, levels=list(levels))
        final, levels = trunk.forward_intermediates(images, indices=self.level_indices, output_fmt="NCHW")
        return BackboneOutput(features=levels[-1], pooled=self.visual.head(trunk.forward_head(final)), levels=list(levels))


def _hierarchical_stages(trunk: nn.Module) -> list[dict[str, Any]] | None:
    """The trunk's feature stages when the last four have strides that double, else None."""
    info = getattr(trunk, "feature_info", None)
    if info is None or not hasattr(trunk, "forward_intermediates"):
        return None
    stages = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    if len(stages) < TimmHierarchical.NUM_LEVELS:
        return None
    strides = [int(s["reduction"]) for s in stages[-TimmHierarchical.NUM_LEVELS :]]
    if any(b != 2 * a for a, b in zip(strides, strides[1:], strict=False)):
        return None  # e.g. a plain transformer listing every block at one stride
    return stages


def _adapter_for(visual: nn.Module) -> type[ViTBackbone] | None:
    from open_clip.transformer import VisionTransformer

    registry: dict[type, type[ViTBackbone]] = {VisionTransformer: OpenClipViT}
    try:
        from open_clip.timm_model import TimmModel
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
    except ImportError:  # timm is optional in open_clip; without it only native ViTs exist
        return registry.get(type(visual))
    if isinstance(visual, TimmModel):
        if isinstance(visual.trunk, TimmVisionTransformer):
            return TimmViT
        return TimmHierarchical if _hierarchical_stages(visual.trunk) is not None else None
    return registry.get(type(visual))


def backbone_from_model(model: nn.Module, *, name: str, source: str, image_size: int | tuple[int, int] | None = None) -> ViTBackbone:
    """Wrap the image tower of an open_clip model; refuse anything neither a ViT nor hierarchical."""
    visual = getattr(model, "visual", None)
    if visual is None:
        raise BackboneError(
            f"{name} ({source}) has no image tower (model.visual); finetune needs a CLIP/CoCa model with an image encoder"
        )
    adapter = _adapter_for(visual)
    if adapter is None:
        inner = getattr(visual, "trunk", None)
        what = type(visual).__name__ + (f" around a timm {type(inner).__name__}" if inner is not None else "")
        raise BackboneError(
            f"{name} ({source}) has a {what} image tower, neither a ViT nor a hierarchical timm model with feature "
            "stages; finetune takes ViT towers (e.g. ViT-B-16, qcap-tiny-clip, qcap-tiny-coca) or timm towers with "
            "stages at doubling strides (e.g. qcap-tiny-mci, MobileCLIP-S1, convnext_tiny)"
        )
    if adapter is TimmViT:
        size = _pair(image_size or visual.image_size)
        return TimmViT(visual, name=name, source=source, image_size=size)
    if adapter is TimmHierarchical:
        return TimmHierarchical(visual, name=name, source=source, stages=_hierarchical_stages(visual.trunk))
    return adapter(visual, name=name, source=source)


def load_backbone(source: BackboneSource, *, image_size: int | None = None, device: str = "cpu") -> tuple[ViTBackbone, Any]:
    """Load the open_clip model named by ``source`` and keep its image tower.

    Returns the backbone and the model's eval preprocessing (its normalisation constants are
    the ones the tower was trained with). The text tower is dropped.
    """
    from base.models import load_model

    try:
        if source.random is not None:
            loaded = load_model(source.random, device=device)
        elif source.pretrained is not None:
            name, tag = source.pretrained.split(":", 1)
            loaded = load_model(name, pretrained=tag, device=device)
        else:
            loaded = load_model(source.model, checkpoint=os.fspath(source.checkpoint), device=device)
    except ValueError as err:
        raise BackboneError(str(err)) from err
    except RuntimeError as err:  # open_clip: unknown model name / pretrained tag
        raise BackboneError(f"{source.describe()}: {err}") from err
    backbone = backbone_from_model(loaded.model, name=loaded.name, source=loaded.source, image_size=image_size)
    backbone.train()
    return backbone, loaded.preprocess_val


def normalisation(preprocess: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std of an open_clip preprocessing transform (OpenAI's constants if none found)."""
    for step in getattr(preprocess, "transforms", []):
        if hasattr(step, "mean") and hasattr(step, "std"):
            return tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)
