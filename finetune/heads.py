"""Necks and heads: a backbone's features → multi-scale features → per-pixel outputs.

- :class:`SimpleFeaturePyramid` (ViTDet, Li et al. 2022): from a plain ViT's last block's
  stride-``p`` map only, deconvolutions and a max-pool build maps at strides p/4, p/2, p, 2p
  (4 levels), each projected to ``neck_channels`` by 1×1 and 3×3 convs with LayerNorm, as in ViTDet.
- :class:`StageFPN`: a hierarchical backbone's own four stage maps (e.g. strides 4…32) through
  torchvision's ``FeaturePyramidNetwork`` (lateral 1×1, top-down sum, 3×3), ``neck_channels`` each.
- Dense heads, all with one interface ``head(levels) -> B×out×h×w`` at the finest level's
  resolution (the task upsamples to the label size):

  ``upernet``  UperNet (Xiao et al. 2018): pyramid pooling on the coarsest level, top-down FPN,
               fuse all levels (the paper's segmentation head);
  ``fpn``      Semantic FPN (Kirillov et al. 2019): each level upsampled to stride p/4 by
               conv+2× steps and summed — light;
  ``dpt``      DPT-style fusion (Ranftl et al. 2021): residual conv units, coarse-to-fine
               fusion blocks, a small output head (depth's default);
  ``linear``   a 1×1 conv on the stride-``p`` map (the linear probe of dense tasks, as DINOv2).

- :class:`LinearClassifier` on the pooled embedding (classification: linear probe when the
  backbone is frozen, full finetuning otherwise).

Norms are GroupNorm, not BatchNorm: finetuning batches are small, and pyramid pooling's 1×1
cell would make BatchNorm fail at batch size 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from base.config import arg


@dataclass(kw_only=True)
class HeadConfig:
    """The dense head and the pyramid under it."""

    name: str = arg("upernet", help="head: upernet, fpn, dpt or linear (segmentation/depth); linear (classification)")
    neck_channels: int = arg(256, help="channels of each simple-feature-pyramid level (ViTDet: 256)")
    channels: int = arg(512, help="channels inside the head (UperNet: 512)")
    pool_scales: tuple[int, ...] = arg((1, 2, 3, 6), help="pyramid pooling bins of UperNet")
    dropout: float = arg(0.1, help="dropout before the final 1x1 classifier")

    def __post_init__(self) -> None:
        if self.neck_channels <= 0 or self.channels <= 0:
            raise ValueError("head channels: must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"head dropout: {self.dropout} is not in [0, 1)")


def _groups(channels: int) -> int:
    """Up to 32 groups of at least 2 channels (pyramid pooling's 1×1 cell needs more than one value)."""
    return math.gcd(32, max(channels // 2, 1))


def conv_norm_act(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(_groups(out_ch), out_ch),
        nn.ReLU(inplace=True),
    )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: strides p/4, p/2, p, 2p from the stride-p map."""

    scales = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        from timm.layers import LayerNorm2d

        half, quarter = max(in_channels // 2, 1), max(in_channels // 4, 1)
        self.stages = nn.ModuleList()
        for scale in self.scales:
            if scale == 4.0:
                layers: list[nn.Module] = [
                    nn.ConvTranspose2d(in_channels, half, 2, stride=2),
                    LayerNorm2d(half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ]
                width = quarter
            elif scale == 2.0:
                layers, width = [nn.ConvTranspose2d(in_channels, half, 2, stride=2)], half
            elif scale == 1.0:
                layers, width = [], in_channels
            else:
                layers, width = [nn.MaxPool2d(2, stride=2, ceil_mode=True)], in_channels
            layers += [
                nn.Conv2d(width, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [stage(features) for stage in self.stages]


class StageFPN(nn.Module):
    """A hierarchical backbone's stage maps (fine → coarse) → FPN levels of ``out_channels``.

    ``extra_max_pool`` adds torchvision's ``LastLevelMaxPool`` level (the detector's RPN uses it).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, *, extra_max_pool: bool = False) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_max_pool else None)

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from collections import OrderedDict

        return list(self.fpn(OrderedDict((str(i), x) for i, x in enumerate(levels))).values())


def make_neck(backbone: nn.Module, out_channels: int) -> nn.Module:
    """The dense neck a backbone needs: ViTDet's simple pyramid for a ViT, an FPN over stages otherwise."""
    if getattr(backbone, "hierarchical", False):
        return StageFPN(backbone.level_channels, out_channels)
    return SimpleFeaturePyramid(backbone.width, out_channels)


def neck_input(backbone: nn.Module, output) -> torch.Tensor | list[torch.Tensor]:
    """What :func:`make_neck`'s neck takes from a backbone output."""
    return output.levels if getattr(backbone, "hierarchical", False) else output.features


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DenseHead(nn.Module):
    """Interface: ``forward(levels: fine→coarse maps) -> B×out_channels×h×w`` (finest size)."""

    uses_pyramid = True


class UperNetHead(DenseHead):
    def __init__(self, in_channels: int, num_outputs: int, cfg: HeadConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_norm_act(in_channels, ch, 1)) for scale in cfg.pool_scales
        )
        self.ppm_bottleneck = conv_norm_act(in_channels + len(cfg.pool_scales) * ch, ch)
        self.lateral = nn.ModuleList(conv_norm_act(in_channels, ch, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_norm_act(ch, ch) for _ in range(3))
        self.fuse = conv_norm_act(4 * ch, ch)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(ch, num_outputs, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        top = levels[-1]
        pooled = [top] + [_resize(branch(top), top.shape[-2:]) for branch in self.ppm]
        laterals = [conv(x) for conv, x in zip(self.lateral, levels[:-1], strict=True)]
        laterals.append(self.ppm_bottleneck(torch.cat(pooled, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(x, size) for x in outs], dim=1))
        return self.classifier(self.dropout(fused))


class SemanticFPNHead(DenseHead):
    def __init__(self, in_channels: int, num_outputs: int, cfg: HeadConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.scale_heads = nn.ModuleList()
        for level in range(4):  # level k has stride 2^k × the finest; k conv+up steps bring it back
            steps: list[nn.Module] = []
            for step in range(max(level, 1)):
                steps.append(conv_norm_act(in_channels if step == 0 else ch, ch))
                if level > 0:
                    steps.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*steps))
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(ch, num_outputs, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        size = levels[0].shape[-2:]
        out = sum(_resize(head(x), size) for head, x in zip(self.scale_heads, levels, strict=True))
        return self.classifier(self.dropout(out))


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels)
        self.unit = ResidualConvUnit(channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = _resize(x, skip.shape[-2:]) + self.skip_unit(skip)
        return self.project(self.unit(x))


class DPTHead(DenseHead):
    def __init__(self, in_channels: int, num_outputs: int, cfg: HeadConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.project = nn.ModuleList(nn.Conv2d(in_channels, ch, 3, padding=1, bias=False) for _ in range(4))
        self.fusion = nn.ModuleList(FusionBlock(ch) for _ in range(4))
        half = max(ch // 2, 1)
        self.output = nn.Sequential(
            nn.Conv2d(ch, half, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(half, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, num_outputs, 1),
        )

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        projected = [conv(x) for conv, x in zip(self.project, levels, strict=True)]
        x = self.fusion[-1](projected[-1])
        for i in range(len(projected) - 2, -1, -1):  # coarse to fine
            x = self.fusion[i](x, projected[i])
        return _resize(self.output(x), projected[0].shape[-2:])


class LinearDenseHead(DenseHead):
    """A 1×1 conv on the backbone's stride-p map, after a BatchNorm-free LayerNorm."""

    uses_pyramid = False

    def __init__(self, in_channels: int, num_outputs: int, cfg: HeadConfig) -> None:
        super().__init__()
        from timm.layers import LayerNorm2d

        self.norm = LayerNorm2d(in_channels)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(in_channels, num_outputs, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(levels[0])))


DENSE_HEADS: dict[str, Callable[[int, int, HeadConfig], DenseHead]] = {
    "upernet": UperNetHead,
    "fpn": SemanticFPNHead,
    "dpt": DPTHead,
    "linear": LinearDenseHead,
}


class FinetuneModel(nn.Module):
    """A backbone under a new head; :meth:`freeze_backbone` makes it a probe of fixed features."""

    backbone: nn.Module
    backbone_frozen = False

    def freeze_backbone(self) -> None:
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # fixed features: no dropout, whatever the mode
        return self

    def features(self, images: torch.Tensor, *, pooled: bool):
        if self.backbone_frozen:
            with torch.no_grad():
                return self.backbone(images, pooled=pooled)
        return self.backbone(images, pooled=pooled)


class DenseModel(FinetuneModel):
    """Backbone → (simple feature pyramid, or FPN over a hierarchical backbone's stages) → dense
    head; output at the input resolution. ``linear`` takes the backbone's ``features`` map (a
    ViT's stride-p tokens; a hierarchical backbone's last stage)."""

    def __init__(self, backbone: nn.Module, head_cfg: HeadConfig, num_outputs: int) -> None:
        super().__init__()
        if head_cfg.name not in DENSE_HEADS:
            raise ValueError(f"head: {head_cfg.name!r} is not a dense head; choose from {sorted(DENSE_HEADS)}")
        self.backbone = backbone
        # The pooled embedding's own parameters (final norm, projection) take no part in a dense
        # loss: frozen, so DDP does not wait for their gradients and AdamW does not decay them.
        for param in backbone.pooling_parameters():
            param.requires_grad_(False)
        factory = DENSE_HEADS[head_cfg.name]
        self.neck = make_neck(backbone, head_cfg.neck_channels) if factory.uses_pyramid else None
        in_channels = head_cfg.neck_channels if self.neck is not None else backbone.width
        self.head = factory(in_channels, num_outputs, head_cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.features(images, pooled=False)
        levels = self.neck(neck_input(self.backbone, output)) if self.neck is not None else [output.features]
        return _resize(self.head(levels), images.shape[-2:])


class LinearClassifier(FinetuneModel):
    """Backbone's pooled embedding → a linear layer (the CLIP linear-probe form)."""

    def __init__(self, backbone: nn.Module, head_cfg: HeadConfig, num_outputs: int) -> None:
        super().__init__()
        if head_cfg.name != "linear":
            raise ValueError(f"head: classification takes the linear head, not {head_cfg.name!r}")
        self.backbone = backbone
        self.dropout = nn.Dropout(head_cfg.dropout)
        self.head = nn.Linear(backbone.embed_dim, num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images, pooled=True).pooled))
