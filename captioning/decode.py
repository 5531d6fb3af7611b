"""Fast, exact caption decoding for open_clip CoCa models.

:func:`generate` returns the tokens that open_clip 3.3's ``CoCa.generate`` returns for the
same weights, images and settings — token for token for greedy and top-k = 1 decoding and for
beam search, from the same distribution for top-k / top-p sampling — at a fraction of the
cost:

- each image is encoded once, whatever the number of captions or beams (open_clip encodes
  every image once per beam);
- the causal self-attention of the text tower and of the multimodal decoder keeps a
  key/value cache, so a step costs one token per row instead of the whole prefix (open_clip
  runs the whole prefix, and computes vocabulary logits for every position, at every step);
- the decoder's cross-attention keys and values of the image tokens are computed once per
  image and shared by all of that image's captions;
- ``num_captions`` samples per image are decoded in one batched pass (DataCompDR's generator
  calls open_clip once per caption);
- finished rows leave the batch, so they stop costing compute;
- top-k / top-p filtering looks at a few hundred candidate tokens instead of sorting the
  vocabulary, with a full sort only for rows whose nucleus does not fit (the same kept set).

The logits processing is open_clip's (which borrows transformers' processors): EOS is banned
while the sequence (start token included) is shorter than ``min_seq_len``; the repetition
penalty divides positive and multiplies negative logits of tokens already in the row; top-k
keeps every token scoring at least the k-th best; top-p keeps the smallest set of most likely
tokens whose mass exceeds ``top_p`` (on the untempered distribution); the temperature divides
the filtered logits; the last step before ``seq_len`` forces EOS; a row ends at EOS or at the
pad token (open_clip's pad is token 0, which CLIP's vocabulary spells "!"). Beam search is
open_clip's group beam search: beam scores are sums of *raw* logits (no log-softmax), and
since open_clip adds no diversity penalty its ``num_beam_groups`` groups are identical copies;
qcap decodes one group of ``num_beams // num_beam_groups`` beams and reproduces the
hypothesis bookkeeping of transformers' ``BeamSearchScorer`` (length penalty 1, no early
stopping), which gives the same sequences. None of transformers' generation code is used.

"Token for token" has one honest limit: open_clip's full-prefix recompute itself moves the last
bits of a position's values from step to step (SDPA's result for a row depends on how many
rows the call holds), so no cache is bit-identical to it; qcap's logits agree to a few 1e-6 on
unit-scale logits, and a greedy token can only differ where two logits tie that closely
(tests/test_decode.py checks identity over many images and steps, and the logits themselves).

Models whose text tower is not open_clip's causal ``TextTransformer`` (e.g. an HF text tower)
fall back to a full-prefix step that still encodes each image once and batches the captions.

Usage::

    import open_clip, torch
    from captioning.decode import DecodeParams, generate

    params = DecodeParams(decoding="top_p", top_p=0.9, num_captions=5)
    tokens = generate(model, images, params, generator=torch.Generator().manual_seed(0))  # [B * 5, L], image-major
    texts = [open_clip.decode(t) for t in tokens]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from captioning.params import DECODINGS, DecodeParams

__all__ = ["DECODINGS", "DecodeParams", "generate", "generate_with", "check_coca"]

SOT_TOKEN_ID = 49406  # open_clip's defaults (CLIP tokenizer)
EOS_TOKEN_ID = 49407
# Candidates examined per row before falling back to a full sort (top-k / top-p).
_CANDIDATES = 256


Generator = torch.Generator | Sequence[torch.Generator] | None


def generate(
    model: torch.nn.Module,
    images: torch.Tensor,
    params: DecodeParams | None = None,
    *,
    generator: Generator = None,
    sot_token_id: int = SOT_TOKEN_ID,
    eos_token_id: int = EOS_TOKEN_ID,
    pad_token_id: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    **settings: Any,
) -> torch.LongTensor:
    """Caption ``images`` (preprocessed, ``[B, 3, H, W]``) with open_clip CoCa ``model``.

    ``params`` says how (a :class:`DecodeParams`, where every setting and its default is
    declared); without it, keyword ``settings`` are DecodeParams' fields
    (``generate(model, images, decoding="top_p", num_captions=5)``), checked there.

    Returns ``[B * num_captions, L]`` token ids, image-major (rows ``i * num_captions + j``
    are image ``i``'s captions), each row starting with the start token and ending with EOS
    (or the pad token), padded with the pad token; ``L <= seq_len``. Beam search returns one
    row per image.

    ``generator`` is a ``torch.Generator`` for the whole batch or one per image (then each
    image's captions depend only on its own generator, whatever the batch it is decoded in).
    ``autocast_dtype`` (``torch.bfloat16``/``float16``) runs the model under autocast on GPU.
    """
    if params is None:
        params = DecodeParams(**settings)
    elif settings:
        raise TypeError(f"generate: give a DecodeParams or its fields as keywords, not both ({sorted(settings)})")
    check_coca(model)
    if images.dim() != 4:
        raise ValueError(f"images: expected a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
    pad = int(model.pad_id if pad_token_id is None else pad_token_id)
    tokens = _Tokens(sot=int(sot_token_id), eos=int(eos_token_id), pad=pad)
    max_len = max_positions(model)
    if params.seq_len > max_len:
        raise ValueError(f"seq_len: this model holds at most {max_len} positions, got {params.seq_len}")
    gens = _generators(generator, images.shape[0])
    device = images.device
    use_autocast = autocast_dtype is not None and device.type == "cuda"
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            if images.shape[0] == 0:
                return torch.zeros((0, 1), dtype=torch.long, device=device)
            _, image_embs = model._encode_image(images)  # the very call CoCa.generate makes
            if params.decoding == "beam":
                return _beam_search(model, image_embs, params, tokens)
            return _sample(model, image_embs, params, tokens, gens)
    finally:
        model.train(was_training)


generate_with = generate  # the name the backends call it by: generate_with(model, images, params, ...)


def check_coca(model: Any) -> None:
    """Raise ValueError unless ``model`` is an open_clip CoCa (has a text decoder)."""
    missing = [name for name in ("visual", "text", "text_decoder", "_encode_image") if not hasattr(model, name)]
    if missing:
        kind = type(model).__name__
        raise ValueError(
            f"a {kind} is not an open_clip CoCa captioner (it lacks {', '.join(missing)}); "
            "caption with a CoCa model such as coca_ViT-L-14 or qcap-tiny-coca"
        )


@dataclass(frozen=True)
class _Tokens:
    sot: int
    eos: int
    pad: int


def max_positions(model) -> int:
    text_len = getattr(model.text, "num_pos", None) or getattr(model.text, "context_length", None) or 77
    if getattr(model.text, "cls_emb", None) is not None:
        text_len -= 1
    decoder_len = model.text_decoder.attn_mask.shape[0]
    return int(min(text_len, decoder_len))


def _generators(generator: Generator, num_images: int) -> list[torch.Generator] | torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    if len(gens) != num_images:
        raise ValueError(f"generator: got {len(gens)} generators for {num_images} images (give one, or one per image)")
    return gens


# --------------------------------------------------------------------------------------------
# Steppers: one decoding step for a set of rows, each row tied to an image


class _Rows:
    """Which image (index into the image tensors) and slot each live row belongs to."""

    def __init__(self, row_img: torch.Tensor, row_slot: torch.Tensor, num_slots: int) -> None:
        self.row_img = row_img
        self.row_slot = row_slot
        self.num_slots = num_slots

    @property
    def trivial(self) -> bool:
        """One row per image, in image order: no regrouping needed."""
        return self.num_slots == 1


class _KVStepper:
    """CoCa's text tower and multimodal decoder run one new token per row, with caches.

    Every operation is one open_clip's modules apply, with their parameters: LayerNorms,
    MLPs and LayerScales are called as modules; attention is the packed in-projection,
    scaled dot product attention and out-projection that ``nn.MultiheadAttention`` performs
    (keys and values of the image tokens projected separately, as it does for cross
    attention). The text tower is causal and its appended CLS token comes last, so earlier
    positions never see later ones: cached keys and values are what the full prefix gives,
    and the CLS token, which only the contrastive head reads, is never computed.

    Bit-for-bit equality with open_clip's full-prefix recompute is not possible for any
    cache: SDPA's result for a query row depends (in the last bits) on how many query rows
    the call holds, so open_clip's own values for an early position change from step to
    step. The logits agree to a few 1e-6 (float32, unit-scale logits).
    """

    def __init__(self, model, image_embs: torch.Tensor, rows: _Rows, max_len: int, pad_id: int) -> None:
        self.text = model.text
        self.decoder = model.text_decoder
        self.rows = rows
        self.max_len = max_len
        self.cast_dtype = self.text.transformer.get_cast_dtype()
        self.text_pad_id = getattr(self.text, "pad_id", 0)
        # open_clip's CoCa text mask is shifted by one for the appended CLS token unless
        # correct_cls_mask is set: key j is masked when token j-1 is the text tower's pad.
        self.mask_shift = 0 if getattr(self.text, "correct_cls_mask", False) else 1
        masks_pads = self.text.cls_emb is not None or getattr(self.text, "use_pad_mask", False)
        # A live row never holds the generation pad (it ends the row): with the usual tokens
        # (the text tower's pad is the generation pad) nothing is ever masked for padding.
        self.tracks_pads = masks_pads and self.text_pad_id != pad_id
        self.key_ok: torch.Tensor | None = None  # [rows, max_len + 1] bool, only when pads may appear
        self.text_cache = [_Cache(max_len) for _ in self.text.transformer.resblocks]
        self.decoder_cache = [_Cache(max_len) for _ in self.decoder.resblocks]
        self.image_kv = [self._image_kv(block, image_embs) for block in self.decoder.cross_attn]

    @staticmethod
    def supports(model) -> bool:
        from open_clip.transformer import MultimodalTransformer, ResidualAttentionBlock, TextTransformer

        text, decoder = model.text, getattr(model, "text_decoder", None)
        if not isinstance(text, TextTransformer) or not isinstance(decoder, MultimodalTransformer):
            return False
        if text.attn_mask is None or not text.transformer.batch_first or not decoder.batch_first:
            return False
        blocks = list(text.transformer.resblocks) + list(decoder.resblocks) + list(decoder.cross_attn)
        for block in blocks:
            if type(block) is not ResidualAttentionBlock:
                return False
            attn = block.attn
            if not (attn.batch_first and attn._qkv_same_embed_dim) or attn.bias_k is not None or attn.add_zero_attn:
                return False
        return True

    def _image_kv(self, block, image_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        d = attn.embed_dim
        w, b = attn.in_proj_weight, attn.in_proj_bias
        # ResidualAttentionBlock normalises keys and values separately (two tensors), so
        # multi_head_attention_forward projects them with separate linears: the same here.
        k = F.linear(block.ln_1_kv(image_embs), w[d : 2 * d], None if b is None else b[d : 2 * d])
        v = F.linear(block.ln_1_kv(image_embs), w[2 * d :], None if b is None else b[2 * d :])
        return _heads(k, attn.num_heads), _heads(v, attn.num_heads)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits ``[rows, vocab]`` (float32) for the next token, given each row's token at ``pos``."""
        text = self.text
        x = text.token_embedding(tokens[:, None]).to(self.cast_dtype)
        x = x + text.positional_embedding[pos : pos + 1].to(self.cast_dtype)
        mask = self._pad_mask(tokens, pos)
        for block, cache in zip(text.transformer.resblocks, self.text_cache, strict=True):
            x = self._self_attention_block(block, x, cache, pos, mask)
        if text.cls_emb is None:  # a tower without CLS hands the decoder its final-normed tokens
            x = text.ln_final(x)
        for block, cache, layer in zip(self.decoder.resblocks, self.decoder_cache, range(len(self.image_kv)), strict=True):
            x = self._self_attention_block(block, x, cache, pos, None)
            x = self._cross_attention_block(layer, x)
        out = self.decoder.ln_final(x)
        if self.decoder.text_projection is not None:
            out = out @ self.decoder.text_projection
        return out[:, 0].float()

    def _pad_mask(self, tokens: torch.Tensor, pos: int) -> torch.Tensor | None:
        """The text tower's padding mask for the newest query (True = attend), or None."""
        if not self.tracks_pads:
            return None
        if self.key_ok is None:
            self.key_ok = torch.ones((tokens.shape[0], self.max_len + 1), dtype=torch.bool, device=tokens.device)
        column = pos + self.mask_shift
        if column <= self.max_len:
            self.key_ok[:, column] = tokens != self.text_pad_id
        keep = self.key_ok[:, : pos + 1]
        return None if bool(keep.all()) else keep[:, None, None, :]

    def _self_attention_block(self, block, x: torch.Tensor, cache: _Cache, pos: int, mask) -> torch.Tensor:
        attn = block.attn
        n, _, d = x.shape
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))
        keys, values = cache.append(k, v, pos)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        o = F.linear(o.transpose(1, 2).reshape(n, 1, d), attn.out_proj.weight, attn.out_proj.bias)
        x = x + block.ls_1(o)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _cross_attention_block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.decoder.cross_attn[layer]
        attn = block.attn
        n, _, d = x.shape
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(block.ln_1(x), w[:d], None if b is None else b[:d])  # [n, 1, d]
        keys, values = self.image_kv[layer]
        heads, head_dim = attn.num_heads, d // attn.num_heads
        rows = self.rows
        if rows.trivial:
            o = F.scaled_dot_product_attention(_heads(q, heads), keys, values)
            o = o.transpose(1, 2).reshape(n, 1, d)
        else:
            # the rows of an image query its keys together: [images, heads, slots, head_dim]
            grouped = q.new_zeros((keys.shape[0], rows.num_slots, heads, head_dim))
            grouped[rows.row_img, rows.row_slot] = q.view(n, heads, head_dim)
            o = F.scaled_dot_product_attention(grouped.transpose(1, 2), keys, values)
            o = o.transpose(1, 2)[rows.row_img, rows.row_slot].reshape(n, 1, d)
        o = F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
        x = x + block.ls_1(o)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def select(self, index: torch.Tensor, pos: int, rows: _Rows, image_index: torch.Tensor | None) -> None:
        """Keep rows ``index`` (in that order; repeats allowed) and images ``image_index``."""
        for cache in self.text_cache + self.decoder_cache:
            cache.select(index, pos)
        if self.key_ok is not None:
            self.key_ok = self.key_ok[index]
        if image_index is not None:
            self.image_kv = [(k[image_index], v[image_index]) for k, v in self.image_kv]
        self.rows = rows


class _Cache:
    """Keys and values of one attention layer, ``[rows, heads, max_len, head_dim]``."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            n, h, _, dh = k.shape
            self.keys = k.new_empty((n, h, self.max_len, dh))
            self.values = v.new_empty((n, h, self.max_len, dh))
        self.keys[:, :, pos : pos + 1] = k
        self.values[:, :, pos : pos + 1] = v
        return self.keys[:, :, : pos + 1], self.values[:, :, : pos + 1]

    def select(self, index: torch.Tensor, pos: int) -> None:
        if self.keys is None:
            return
        keys = self.keys.new_empty((index.shape[0], *self.keys.shape[1:]))
        values = self.values.new_empty((index.shape[0], *self.values.shape[1:]))
        keys[:, :, : pos + 1] = self.keys[index, :, : pos + 1]
        values[:, :, : pos + 1] = self.values[index, :, : pos + 1]
        self.keys, self.values = keys, values


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[n, L, d]`` → ``[n, heads, L, d / heads]``."""
    n, length, d = t.shape
    return t.view(n, length, heads, d // heads).transpose(1, 2)


class _PrefixStepper:
    """Any CoCa: the whole prefix through the towers each step (what open_clip does), but
    with the image encoded once and finished rows dropped."""

    def __init__(self, model, image_embs: torch.Tensor, rows: _Rows, max_len: int, pad_id: int) -> None:
        self.model = model
        self.image_embs = image_embs
        self.rows = rows
        self.history: torch.Tensor | None = None

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        column = tokens[:, None]
        self.history = column if self.history is None else torch.cat([self.history, column], dim=1)
        _, token_embs = self.model._encode_text(self.history)
        logits = self.model.text_decoder(self.image_embs[self.rows.row_img], token_embs)
        return logits[:, -1].float()

    def select(self, index: torch.Tensor, pos: int, rows: _Rows, image_index: torch.Tensor | None) -> None:
        self.history = self.history[index]
        if image_index is not None:
            self.image_embs = self.image_embs[image_index]
        self.rows = rows


def _stepper(model, image_embs, rows: _Rows, max_len: int, pad_id: int):
    cls = _KVStepper if _KVStepper.supports(model) else _PrefixStepper
    return cls(model, image_embs, rows, max_len, pad_id)


# --------------------------------------------------------------------------------------------
# Logits processing (open_clip's processors, transformers' semantics)


def _process(scores: torch.Tensor, history: torch.Tensor | None, cur_len: int, params: DecodeParams, eos: int):
    """Min-length and repetition penalty, in open_clip's order; ``history`` (``[rows, cur_len]``,
    the tokens so far, start token included) is needed only for the penalty."""
    if cur_len < params.min_seq_len:
        scores[:, eos] = -math.inf
    if params.repetition_penalty != 1.0:
        seen = scores.gather(1, history)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    return scores


def _candidates(scores: torch.Tensor, params: DecodeParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept tokens per row, best first: ``(values, token_ids, keep_mask)``, each ``[rows, m]``.

    top-k keeps every token scoring at least the k-th best (ties included); top-p keeps a
    token when the mass of all tokens not above it exceeds ``1 - top_p`` (transformers'
    ascending-cumsum rule), always the best one. Rows whose kept set does not fit in the
    first candidates are redone with the whole vocabulary sorted.
    """
    vocab = scores.shape[-1]
    if params.decoding == "top_k":
        m = min(vocab, max(params.top_k, 1) + 1)
    else:
        m = min(vocab, _CANDIDATES)
    values, ids, keep, overflow = _kept(scores, m, params)
    if m < vocab and bool(overflow.any()):
        rows = overflow.nonzero().squeeze(1)
        full_values, full_ids, full_keep, _ = _kept(scores[rows], vocab, params)
        width = int(full_keep.sum(-1).max())
        values = torch.cat([values, values.new_full((values.shape[0], width - m), -math.inf)], dim=1) if width > m else values
        ids = torch.cat([ids, ids.new_zeros((ids.shape[0], width - m))], dim=1) if width > m else ids
        keep = torch.cat([keep, keep.new_zeros((keep.shape[0], width - m))], dim=1) if width > m else keep
        values[rows] = full_values[:, : values.shape[1]]
        ids[rows] = full_ids[:, : ids.shape[1]]
        keep[rows] = full_keep[:, : keep.shape[1]]
    return values, ids, keep


def _kept(scores: torch.Tensor, m: int, params: DecodeParams):
    """The ``m`` best tokens of each row and which of them the filter keeps; ``overflow``
    marks rows whose kept set may extend past the ``m`` candidates."""
    vocab = scores.shape[-1]
    values, ids = scores.topk(m, dim=-1, sorted=True)
    if params.decoding == "top_k":
        k = min(params.top_k, vocab)
        keep = values >= values[:, k - 1 : k]
    else:
        # transformers sorts ascending and drops a token when the float32 cumulative mass up to
        # it (itself and everything less likely) is <= 1 - top_p; that mass is the total minus
        # the mass of the tokens ranked above it.
        probs = scores.softmax(dim=-1)
        total = probs.sum(-1, keepdim=True, dtype=torch.float64)
        top = probs.gather(1, ids).double()
        mass_from_here = (total - (top.cumsum(-1) - top)).float()
        keep = mass_from_here > torch.tensor(1 - params.top_p, dtype=torch.float32)
        keep[:, 0] = True
    overflow = keep[:, -1] if m < vocab else torch.zeros_like(keep[:, -1])
    return values, ids, keep, overflow


def _draw(values: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, uniforms: torch.Tensor, temperature: float):
    """Sample one kept token per row by inverse CDF of softmax(kept values / temperature)."""
    logits = (values / temperature).masked_fill(~keep, -math.inf)
    probs = logits.softmax(dim=-1).double()
    cdf = probs.cumsum(-1)
    target = uniforms.double()[:, None] * cdf[:, -1:]
    # the first slot whose cumulative mass exceeds the target: never a zero-probability slot
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=values.shape[1] - 1)
    return ids.gather(1, choice).squeeze(1)


class _Uniforms:
    """One uniform per row per step, from one generator or from each image's own generator."""

    def __init__(self, gens, num_images: int, per_image: int, device: torch.device) -> None:
        self.gens = gens
        self.num_images = num_images
        self.per_image = per_image
        self.device = device

    def draw(self, live_images: torch.Tensor) -> torch.Tensor:
        """``[num_images, per_image]`` uniforms (only the rows of live images are drawn per image)."""
        if isinstance(self.gens, list):
            out = torch.zeros((self.num_images, self.per_image), dtype=torch.float64)
            for i in live_images.tolist():
                out[i] = torch.rand(self.per_image, generator=self.gens[i], dtype=torch.float64)
            return out.to(self.device)
        gen_device = self.gens.device if self.gens is not None else self.device
        u = torch.rand((self.num_images, self.per_image), generator=self.gens, dtype=torch.float64, device=gen_device)
        return u.to(self.device)


# --------------------------------------------------------------------------------------------
# Greedy and sampling


def _sample(model, image_embs: torch.Tensor, params: DecodeParams, tok: _Tokens, gens) -> torch.Tensor:
    device = image_embs.device
    num_images, per_image = image_embs.shape[0], params.num_captions
    num_rows = num_images * per_image
    out = torch.full((num_rows, params.seq_len), tok.pad, dtype=torch.long, device=device)
    out[:, 0] = tok.sot
    live = torch.arange(num_rows, device=device)  # global row id of each live row
    rows = _Rows(
        torch.arange(num_images, device=device).repeat_interleave(per_image),
        torch.arange(per_image, device=device).repeat(num_images),
        per_image,
    )
    live_images = torch.arange(num_images, device=device)  # global image id of each image slot
    stepper = _stepper(model, image_embs, rows, params.seq_len, tok.pad)
    uniforms = _Uniforms(gens, num_images, per_image, device) if params.decoding != "greedy" else None
    current = out[:, 0].clone()
    width = 1
    for pos in range(params.seq_len - 1):
        cur_len = pos + 1
        logits = stepper.step(current, pos)
        if cur_len + 1 == params.seq_len:
            chosen = torch.full_like(current, tok.eos)
        else:
            history = out[live, :cur_len] if params.repetition_penalty != 1.0 else None
            scores = _process(logits, history, cur_len, params, tok.eos)
            if params.decoding == "greedy":
                chosen = scores.argmax(dim=-1)
            else:
                values, ids, keep = _candidates(scores, params)
                u = uniforms.draw(live_images)  # [num_images, per_image], by global image id
                row_global_image = live // per_image
                chosen = _draw(values, ids, keep, u[row_global_image, live % per_image], params.temperature)
        out[live, cur_len] = chosen
        width = cur_len + 1
        finished = (chosen == tok.eos) | (chosen == tok.pad)
        if bool(finished.all()):
            break
        if bool(finished.any()):
            keep_rows = (~finished).nonzero().squeeze(1)
            live = live[keep_rows]
            kept_img = rows.row_img[keep_rows]
            image_index, new_img = torch.unique(kept_img, return_inverse=True)
            changed_images = image_index.shape[0] != live_images.shape[0]
            live_images = live_images[image_index]
            rows = _Rows(new_img, rows.row_slot[keep_rows], per_image)
            stepper.select(keep_rows, pos, rows, image_index if changed_images else None)
            current = chosen[keep_rows]
        else:
            current = chosen
    return out[:, :width]


# --------------------------------------------------------------------------------------------
# Beam search (open_clip's group beam search with transformers' hypothesis bookkeeping)


class _Hypotheses:
    """Finished hypotheses of one image: the best ``size`` by length-normalised score."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.beams: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def add(self, tokens: list[int], sum_scores: float, length: int) -> None:
        score = sum_scores / length  # length penalty 1.0
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_scores: float, cur_len: int) -> bool:
        if len(self.beams) < self.size:
            return False
        return self.worst_score >= best_sum_scores / cur_len

    def best(self) -> list[int]:
        return sorted(self.beams, key=lambda beam: beam[0])[-1][1]


def _beam_search(model, image_embs: torch.Tensor, params: DecodeParams, tok: _Tokens) -> torch.Tensor:
    device = image_embs.device
    num_images, group = image_embs.shape[0], params.group_size
    rows = _Rows(
        torch.arange(num_images, device=device).repeat_interleave(group),
        torch.arange(group, device=device).repeat(num_images),
        group,
    )
    stepper = _stepper(model, image_embs, rows, params.seq_len, tok.pad)
    hyps = [_Hypotheses(group) for _ in range(num_images)]
    done = [False] * num_images
    live_images = list(range(num_images))  # global image ids, in row-group order
    seqs = torch.full((num_images * group, 1), tok.sot, dtype=torch.long, device=device)
    # the first beam of a group starts at 0, the others at -1e9, so they do not repeat it
    beam_scores = torch.full((num_images, group), -1e9, dtype=torch.float32, device=device)
    beam_scores[:, 0] = 0
    beam_scores = beam_scores.view(-1)
    current = seqs[:, 0]
    vocab = None
    pos = 0
    while True:
        cur_len = pos + 1
        logits = stepper.step(current, pos)
        vocab = logits.shape[-1]
        scores = _process(logits, seqs, cur_len, params, tok.eos)
        totals = (scores + beam_scores[:, None]).view(len(live_images), group * vocab)
        top_scores, top_ids = totals.topk(2 * group, dim=1, largest=True, sorted=True)
        top_beams = torch.div(top_ids, vocab, rounding_mode="floor")
        top_tokens = top_ids % vocab
        next_scores = torch.zeros((len(live_images), group), dtype=torch.float32)
        next_tokens = torch.zeros((len(live_images), group), dtype=torch.long)
        next_rows = torch.zeros((len(live_images), group), dtype=torch.long)
        seqs_cpu = seqs.cpu()
        top_scores_cpu, top_beams_cpu, top_tokens_cpu = top_scores.cpu(), top_beams.cpu().tolist(), top_tokens.cpu().tolist()
        new_len = cur_len + 1
        for local, image in enumerate(live_images):
            filled = 0
            for rank in range(2 * group):
                token, beam = top_tokens_cpu[local][rank], top_beams_cpu[local][rank]
                row = local * group + beam
                if token == tok.eos:
                    if rank >= group:
                        continue
                    hyps[image].add(seqs_cpu[row].tolist(), top_scores_cpu[local, rank].item(), new_len)
                else:
                    next_scores[local, filled] = top_scores_cpu[local, rank]
                    next_tokens[local, filled] = token
                    next_rows[local, filled] = row
                    filled += 1
                if filled == group:
                    break
            done[image] = hyps[image].is_done(top_scores_cpu[local].max().item(), new_len)
        seqs = torch.cat([seqs[next_rows.view(-1).to(device)], next_tokens.view(-1, 1).to(device)], dim=1)
        beam_scores = next_scores.view(-1).to(device)
        at_max = seqs.shape[1] >= params.seq_len
        still = [local for local, image in enumerate(live_images) if not done[image]]
        if not still or at_max:
            break
        keep_local = torch.tensor(still, dtype=torch.long)
        row_index = next_rows[keep_local].view(-1).to(device)
        seq_index = (keep_local[:, None] * group + torch.arange(group)[None, :]).view(-1).to(device)
        image_index = keep_local.to(device) if len(still) != len(live_images) else None
        live_images = [live_images[i] for i in still]
        new_rows = _Rows(
            torch.arange(len(live_images), device=device).repeat_interleave(group),
            torch.arange(group, device=device).repeat(len(live_images)),
            group,
        )
        stepper.select(row_index, pos, new_rows, image_index)
        seqs = seqs[seq_index]
        beam_scores = beam_scores[seq_index]
        current = seqs[:, -1]
        pos += 1
    # open beams of unfinished images join their hypotheses at full length (transformers' finalize)
    seqs_cpu, scores_cpu = seqs.cpu(), beam_scores.cpu()
    for local, image in enumerate(live_images):
        if done[image]:
            continue
        for beam in range(group):
            row = local * group + beam
            hyps[image].add(seqs_cpu[row].tolist(), scores_cpu[row].item(), seqs_cpu.shape[1])
    best = [hyps[image].best() for image in range(num_images)]
    lengths = [len(b) for b in best]
    width = min(max(lengths) + 1, params.seq_len)
    out = torch.full((num_images, width), tok.pad, dtype=torch.long)
    for i, tokens in enumerate(best):
        out[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        if len(tokens) < width:
            out[i, len(tokens)] = tok.eos
    return out.to(device)
