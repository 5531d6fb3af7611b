"""A timm image tower that CoCa can caption from: pooled embedding and image tokens.

open_clip builds a CoCa's image tower with ``_build_vision_tower``; for a ``timm_model_name``
that is :class:`open_clip.timm_model.TimmModel`, which returns the pooled embedding only, while
CoCa's decoder cross-attends to image *tokens* (``image_latent, tokens = self.visual(images)``).
So a CoCa with a CNN tower cannot be built from a config today. On the embedded world that is
the tower that matters: the tiny ViT captioner does not learn the world's shapes at this compute,
a resnet10t does (README, "make science").

:class:`TimmTokenTower` is the timm trunk with open_clip's own parts around it: the feature map's
cells (plus a learned position embedding, so the decoder knows where a cell is) go through
open_clip's ``AttentionalPooler`` to ``attn_pooler_queries`` tokens for the decoder, exactly as
open_clip's ViT CoCa pools its patch tokens; the contrastive embedding is the cells' mean through a
linear projection, as ``TimmModel`` with ``timm_pool="avg", timm_proj="linear"``.

:func:`install` wraps the builder that ``open_clip.coca_model`` calls, and only for a CoCa config
whose ``vision_cfg`` has both ``timm_model_name`` and ``"output_tokens": true`` (a combination
open_clip cannot run today); every other config builds exactly as before. Checkpoint folders of
such a model load with ``local-dir:`` in any process that imported qcap's model registry
(:func:`base.models.register_model_configs` installs it).
"""

from __future__ import annotations

import functools
from typing import Any


def wants_token_tower(vision_cfg: Any) -> bool:
    get = vision_cfg.get if isinstance(vision_cfg, dict) else (lambda k, d=None: getattr(vision_cfg, k, d))
    return bool(get("timm_model_name")) and bool(get("output_tokens", False))


@functools.cache
def _token_tower_class():  # defined on first use: torch and open_clip are heavy imports
    import torch
    from open_clip.transformer import AttentionalPooler
    from torch import nn

    class TimmTokenTower(nn.Module):
        """timm trunk -> (pooled embedding [B, embed_dim], tokens [B, queries, embed_dim])."""

        def __init__(self, model_name: str, embed_dim: int, image_size: int | tuple[int, int], *,
                     pretrained: bool = False, n_queries: int = 256, n_heads: int = 8,
                     drop_path: float | None = None):
            super().__init__()
            import timm

            self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            kwargs = {"drop_path_rate": drop_path} if drop_path is not None else {}
            self.trunk = timm.create_model(model_name, pretrained=pretrained, num_classes=0, global_pool="", **kwargs)
            width = int(self.trunk.num_features)
            with torch.no_grad():  # the feature grid at this image size, for the position embedding
                was_training = self.trunk.training
                probe = self.trunk.eval().forward_features(torch.zeros(1, 3, *self.image_size))
                self.trunk.train(was_training)
            if probe.ndim != 4:
                raise ValueError(f"{model_name}: forward_features gives shape {tuple(probe.shape)}, not a feature map "
                                 "[B, C, H, W]; a token tower needs a convolutional trunk")
            cells = int(probe.shape[2] * probe.shape[3])
            self.pos_embed = nn.Parameter(torch.randn(1, cells, width) * 0.02)
            self.proj = nn.Linear(width, embed_dim, bias=False)
            self.attn_pool = AttentionalPooler(embed_dim, width, n_head=n_heads, n_queries=n_queries)
            self.output_tokens = True

        def forward(self, images):
            features = self.trunk.forward_features(images)  # [B, C, H, W]
            cells = features.flatten(2).transpose(1, 2)  # [B, H*W, C]
            pooled = self.proj(cells.mean(dim=1))
            return pooled, self.attn_pool(cells + self.pos_embed.to(cells.dtype))

        def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
            if unlocked_groups:
                raise ValueError("a token tower locks its whole trunk or nothing (unlocked_groups must be 0)")
            for param in self.trunk.parameters():
                param.requires_grad = False
            if freeze_bn_stats:
                from open_clip.utils import freeze_batch_norm_2d

                freeze_batch_norm_2d(self.trunk)

        @torch.jit.ignore
        def set_grad_checkpointing(self, enable: bool = True) -> None:
            self.trunk.set_grad_checkpointing(enable)

    return TimmTokenTower


def build_token_tower(embed_dim: int, vision_cfg: Any):
    """The tower for a CoCa ``vision_cfg`` (dict or open_clip ``CLIPVisionCfg``) with a timm trunk."""
    from open_clip.model import CLIPVisionCfg

    cfg = CLIPVisionCfg(**vision_cfg) if isinstance(vision_cfg, dict) else vision_cfg
    if cfg.timm_pool not in ("avg", None, "") or cfg.timm_proj not in ("linear", None):
        raise ValueError(f"{cfg.timm_model_name}: a CoCa token tower pools by the cells' mean and a linear "
                         f"projection; timm_pool={cfg.timm_pool!r}, timm_proj={cfg.timm_proj!r} are not supported")
    return _token_tower_class()(cfg.timm_model_name, embed_dim, cfg.image_size,
                                pretrained=cfg.timm_model_pretrained, n_queries=cfg.attn_pooler_queries,
                                n_heads=cfg.attn_pooler_heads, drop_path=cfg.timm_drop_path)


@functools.cache  # once per process: a second call would wrap the wrapper
def install() -> None:
    """Let open_clip build a CoCa whose ``vision_cfg`` names a timm trunk with ``output_tokens``."""
    from open_clip import coca_model

    original = coca_model._build_vision_tower

    def build_vision_tower(embed_dim, vision_cfg, quick_gelu=False, cast_dtype=None):
        if wants_token_tower(vision_cfg):
            return build_token_tower(embed_dim, vision_cfg)
        return original(embed_dim, vision_cfg, quick_gelu, cast_dtype)

    build_vision_tower.__wrapped__ = original
    coca_model._build_vision_tower = build_vision_tower
