"""Attention maps of a ViT backbone and the mean attention distance (paper §3.4).

open_clip's blocks call attention with ``need_weights=False`` (or through a fused kernel), so
the weights never leave the module. :func:`attention_maps` hooks each block's attention
module, captures its input, and recomputes the softmax weights from the module's own
parameters — one function per attention class, picked from :func:`attention_recipes`:

- ``torch.nn.MultiheadAttention`` (open_clip's standard blocks): the module itself, called
  again with ``need_weights=True, average_attn_weights=False``;
- ``open_clip.transformer.Attention`` (``block_type="custom"``): q/k from ``in_proj``,
  ``ln_q``/``ln_k`` or scaled-cosine logits, as its forward does;
- timm's ``Attention`` (timm-backed towers): ``qkv``, ``q_norm``/``k_norm``, ``scale``.

Mean attention distance (Dosovitskiy et al. 2021, App. D.7; the paper's §3.4): for a query
patch, the attention-weighted mean of the Euclidean distance, in pixels, between its centre
and each key patch's centre; averaged over query patches and images, per head and layer. The
class (and any register) token is excluded on both sides; each query's weights over the patch
keys are renormalised to sum to one, so a head that parks attention on the class token is
measured by where the rest of its attention goes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _mha_probs(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    if not attn.batch_first:
        x = x.transpose(0, 1)
        _, weights = attn(x, x, x, need_weights=True, average_attn_weights=False)
        return weights
    _, weights = attn(x, x, x, need_weights=True, average_attn_weights=False)
    return weights


def _openclip_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = q.reshape(batch, length, attn.num_heads, -1).transpose(1, 2)
    k = k.reshape(batch, length, attn.num_heads, -1).transpose(1, 2)
    if attn.logit_scale is not None:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = logits * torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp()
    else:
        logits = (attn.ln_q(q) * attn.scale) @ attn.ln_k(k).transpose(-1, -2)
    return logits.softmax(dim=-1)


def _timm_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@functools.cache
def attention_recipes() -> dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    from open_clip.transformer import Attention as OpenClipAttention

    table: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
        nn.MultiheadAttention: _mha_probs,
        OpenClipAttention: _openclip_probs,
    }
    try:
        from timm.layers.attention import Attention as TimmAttention
    except ImportError:  # timm-backed towers need timm; without it there are none
        return table
    table[TimmAttention] = _timm_probs
    return table


def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax weights (B×heads×L×L) that ``attn`` applies to input ``x`` (B×L×C)."""
    table = attention_recipes()
    for cls in type(attn).__mro__:
        if cls in table:
            return table[cls](attn, x)
    raise TypeError(f"no attention-weight recipe for {type(attn).__name__}; known: {[c.__name__ for c in table]}")


@contextlib.contextmanager
def capture_attention_inputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """While active, the input of each module's forward is stored at its index."""
    captured: list[torch.Tensor | None] = [None] * len(modules)
    handles = []
    for index, module in enumerate(modules):

        def hook(_module, args, kwargs, index=index):
            x = args[0] if args else kwargs.get("query", kwargs.get("x", kwargs.get("q_x")))
            captured[index] = x.detach()

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_maps(backbone, images: torch.Tensor) -> list[torch.Tensor]:
    """One B×heads×L×L tensor per block (L includes the prefix tokens)."""
    modules = backbone.attention_modules()
    with capture_attention_inputs(modules) as captured:
        backbone(images)
    maps = []
    for module, x in zip(modules, captured, strict=True):
        if x is None:
            raise RuntimeError(f"attention module {type(module).__name__} was not called in the forward pass")
        maps.append(attention_probs(module, x))
    return maps


def patch_distances(grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """N×N Euclidean distances in pixels between patch centres (row-major patch order)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten() * patch_size[0], cols.flatten() * patch_size[1]], dim=1).double()
    return torch.cdist(centres, centres)


def mean_attention_distance(
    probs: torch.Tensor, grid: tuple[int, int], patch_size: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Per-head mean attention distance in pixels, from B×heads×L×L weights (prefix tokens first).

    Returns a float64 tensor of shape (heads,): the mean over images and query patches.
    """
    num_patches = grid[0] * grid[1]
    if probs.shape[-1] != num_patches + num_prefix_tokens or probs.shape[-2] != probs.shape[-1]:
        raise ValueError(
            f"attention of shape {tuple(probs.shape)} does not fit a {grid[0]}x{grid[1]} grid with {num_prefix_tokens} prefix token(s)"
        )
    patch = probs[..., num_prefix_tokens:, num_prefix_tokens:].double()
    patch = patch / patch.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    distance = patch_distances(grid, patch_size).to(patch.device)
    per_query = (patch * distance).sum(dim=-1)  # B×heads×N
    return per_query.mean(dim=(0, 2))
