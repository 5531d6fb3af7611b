"""Parameter groups for finetuning: layer-wise lr decay (BEiT/MAE) and weight-decay exclusions.

With ``L`` blocks, the embeddings get layer id 0, block ``i`` gets ``i + 1``, and everything
after the blocks (final norm, projection, neck, head) gets ``L + 1``; a parameter's learning
rate is ``lr × layer_decay ** (L + 1 − layer_id)``, so the head trains at ``lr`` and each block
below it a factor ``layer_decay`` slower. Biases, norms and the class/position embeddings get
no weight decay. Frozen parameters (``requires_grad=False``) are left out.

Each group carries ``lr_scale`` and ``layer_id`` so a scheduler or a log can read them;
schedulers that scale every group's initial lr (``LambdaLR``) keep the ratios.
"""

from __future__ import annotations

from typing import Any

from torch import nn

NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "pos_embed", "cls_token", "reg_token")


def param_groups(
    model: nn.Module, backbone: Any, *, lr: float, weight_decay: float, layer_decay: float = 1.0, prefix: str = "backbone."
) -> list[dict[str, Any]]:
    """Optimizer groups for ``model`` whose backbone lives under ``prefix``."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay: {layer_decay} is not in (0, 1]")
    top = backbone.num_layers + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = backbone.layer_id(name.removeprefix(prefix)) if name.startswith(prefix) else top
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in NO_DECAY_NAMES)
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (top - layer)
            groups[key] = {
                "params": [],
                "names": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "layer_id": layer,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters (everything is frozen)")
    return [groups[key] for key in sorted(groups)]
