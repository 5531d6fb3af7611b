"""Captioners behind one interface: open_clip CoCa (qcap's decoder) and Hugging Face image-to-text.

A backend turns a batch of preprocessed images into ``num_captions`` raw captions per image.
The job picks it from :data:`BACKENDS` by name (``--backend``):

- ``open_clip``: any open_clip CoCa (``coca_ViT-L-14`` with ``--pretrained
  mscoco_finetuned_laion2B-s13B-b90k``, a qcap checkpoint folder, ``hf-hub:`` ids), decoded
  with :func:`captioning.decode.generate`; each image's sampling generator is seeded from
  its uid, so its captions do not depend on the batch it lands in.
- ``hf``: a transformers image-to-text model (BLIP, GIT, …: anything
  ``AutoModelForImageTextToText`` and ``AutoProcessor`` load), a hub id or a local folder,
  decoded with the model's own ``generate``. Sampling runs per image under its own seed for
  the same reproducibility; greedy and beam search run batched. transformers 5 has no group
  beam search, so ``num_beam_groups`` does not apply here.

Usage::

    spec = CaptionerSpec(backend="open_clip", model="coca_ViT-L-14", pretrained="mscoco_finetuned_laion2B-s13B-b90k")
    captioner = load_captioner(spec, device="cuda")
    raw = captioner.caption(pixels, DecodeParams(decoding="top_p", num_captions=5), seeds)
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from base.config import ConfigError
from base.models import weights_sha256
from captioning.params import DecodeParams

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CaptionerSpec:
    """Which captioner to load; picklable, so Ray actors can rebuild it."""

    backend: str = "open_clip"  # a key of BACKENDS
    model: str | None = None  # open_clip model name, or HF hub id / folder
    pretrained: str | None = None  # open_clip pretrained tag or weights file
    checkpoint: str | None = None  # qcap/open_clip checkpoint folder or weights file; HF folder

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class RawCaption:
    """One decoded caption before the quality controls."""

    text: str  # decoded text, special tokens removed
    num_tokens: int  # generated tokens, the end token excluded
    truncated: bool  # the length limit ended it, not the model's end token


def image_seed(seed: int, uid: str) -> int:
    """The sampling seed of one image: a function of the run's seed and the image's uid only."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class Captioner(ABC):
    """A loaded captioning model. Subclasses register in :data:`BACKENDS`."""

    backend: ClassVar[str]

    def __init__(self, spec: CaptionerSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device

    @abstractmethod
    def describe(self, *, with_hash: bool = True) -> dict[str, Any]:
        """Provenance: backend, model, weights source, sha256 of the weights file (if any)."""

    @abstractmethod
    def preprocess(self) -> Callable[[Any], Any]:
        """A picklable callable: PIL image → float tensor ``[3, H, W]`` for :meth:`caption`."""

    @abstractmethod
    def caption(self, pixels, params: DecodeParams, seeds: Sequence[int],
                autocast_dtype=None) -> list[list[RawCaption]]:
        """``num_captions`` raw captions for each image of ``pixels`` (``[B, 3, H, W]``)."""

    def effective_decoding(self, params: DecodeParams) -> dict[str, Any]:
        """The decoding parameters as this backend applies them (recorded in provenance)."""
        return params.as_dict()

    @abstractmethod
    def max_positions(self) -> int:
        """The longest ``seq_len`` the model can decode."""


class OpenClipCaptioner(Captioner):
    backend = "open_clip"

    def __init__(self, spec: CaptionerSpec, device: str = "cpu") -> None:
        super().__init__(spec, device)
        from base.models import load_model
        from captioning.decode import check_coca

        loaded = load_model(spec.model, pretrained=spec.pretrained, checkpoint=spec.checkpoint, device=device)
        check_coca(loaded.model)
        self.loaded = loaded
        self.model = loaded.model
        from captioning.vocab import special_token_ids

        try:  # from the model's own tokenizer: CLIP's (49406/49407) or a fitted one (captioning.vocab)
            ids = special_token_ids(loaded.tokenizer)
        except ValueError as err:
            raise ConfigError(f"captioner {loaded.name}: {err}") from err
        self.sot, self.eot = ids["sot"], ids["eot"]
        if loaded.source == "random":
            log.warning("captioner %s has random weights: its captions are noise (give --pretrained or --checkpoint)",
                        loaded.name)

    def describe(self, *, with_hash: bool = True) -> dict[str, Any]:
        source = self.loaded.source
        sha = weights_sha256(source) if with_hash and os.path.isfile(source) else None
        if with_hash and sha is None and source not in ("random",):
            sha = _pretrained_file_sha(self.loaded.name, source)
        return {"backend": self.backend, "model": self.loaded.name, "source": source, "weights_sha256": sha}

    def preprocess(self):
        return self.loaded.preprocess_val

    def max_positions(self) -> int:
        from captioning.decode import max_positions

        return max_positions(self.model)

    def caption(self, pixels, params: DecodeParams, seeds: Sequence[int], autocast_dtype=None) -> list[list[RawCaption]]:
        import torch

        from captioning.decode import generate_with

        pixels = pixels.to(self.device)
        generators = None
        if not params.deterministic:
            generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        tokens = generate_with(self.model, pixels, params, generator=generators, sot_token_id=self.sot,
                               eos_token_id=self.eot, autocast_dtype=autocast_dtype).cpu()
        per_image = 1 if params.decoding == "beam" else params.num_captions
        out: list[list[RawCaption]] = []
        for i in range(pixels.shape[0]):
            out.append([self._raw(tokens[i * per_image + j].tolist(), params.seq_len) for j in range(per_image)])
        return out

    def _raw(self, row: list[int], seq_len: int) -> RawCaption:
        body = row[1:] if row and row[0] == self.sot else row
        end = next((i for i, token in enumerate(body) if token in (self.eot, self.model.pad_id)), None)
        content = body if end is None else body[:end]
        # open_clip forces the end token at the last position: ending there means cut off
        truncated = end is None or end + 2 >= seq_len
        return RawCaption(text=_decode_clip(self.loaded.tokenizer, content), num_tokens=len(content), truncated=truncated)


def _decode_clip(tokenizer, ids: list[int]) -> str:
    if hasattr(tokenizer, "decoder") and hasattr(tokenizer, "byte_decoder"):  # open_clip's SimpleTokenizer
        return tokenizer.decode(ids)
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # open_clip's HFTokenizer wraps a transformers one
    return inner.decode(ids, skip_special_tokens=True)


def _pretrained_file_sha(model: str, tag: str) -> str | None:
    """sha256 of the cached file behind an open_clip pretrained tag (already downloaded by the load)."""
    import open_clip

    try:
        cfg = open_clip.get_pretrained_cfg(model, tag)
    except (KeyError, RuntimeError) as err:
        cfg, why = None, f"open_clip has no pretrained entry for it ({err})"
    else:
        why = "" if cfg else "open_clip has no pretrained entry for it"
    path = open_clip.download_pretrained(cfg) if cfg else None
    if path and os.path.isfile(path):
        return weights_sha256(path)
    # the provenance then names the weights by their tag alone: a resume cannot tell other weights behind it
    log.warning("captioner %s, weights %r: no file to hash (%s); the provenance records weights_sha256 null",
                model, tag, why or f"open_clip gave no file: {path!r}")
    return None


class HFCaptioner(Captioner):
    backend = "hf"

    def __init__(self, spec: CaptionerSpec, device: str = "cpu") -> None:
        super().__init__(spec, device)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if spec.pretrained is not None:
            raise ValueError("--pretrained is an open_clip tag; for --backend hf give --model (hub id or folder)")
        source = spec.checkpoint or spec.model
        if source is None:
            raise ValueError("--backend hf needs --model (a hub id or a folder) or --checkpoint (a folder)")
        self.source = str(source)
        # trust_remote_code=False, always: a folder or hub id whose config names its own Python
        # code is refused, never run, and transformers never stops to ask on the terminal.
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a refused folder is our one line, not transformers' warnings too
        try:
            self.processor = AutoProcessor.from_pretrained(self.source, trust_remote_code=False)
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.source, trust_remote_code=False).to(device).eval()
        except (OSError, ValueError, KeyError, EOFError) as err:
            why = " ".join(str(err).split())
            if "trust_remote_code" in why or "custom code" in why:
                raise ValueError(f"{self.source}: the model asks to run its own Python code (trust_remote_code), "
                                 "which qcap never does; use a model that transformers supports natively") from err
            raise ValueError(f"{self.source}: not a Hugging Face image-to-text model ({why[:300]})") from err
        finally:
            hf_logging.set_verbosity(verbosity)
        config = self.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else self.model.config.get_text_config().eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = config.pad_token_id

    def describe(self, *, with_hash: bool = True) -> dict[str, Any]:
        weights = Path(self.source) / "model.safetensors"
        sha = weights_sha256(weights) if with_hash and weights.is_file() else None
        return {"backend": self.backend, "model": self.model.config.model_type, "source": self.source,
                "weights_sha256": sha}

    def preprocess(self):
        return _HFPreprocess(self.processor.image_processor)

    def max_positions(self) -> int:
        text = self.model.config.get_text_config()
        return int(getattr(text, "max_position_embeddings", None) or 10**6)

    def effective_decoding(self, params: DecodeParams) -> dict[str, Any]:
        out = params.as_dict()
        if params.decoding == "beam":
            out["num_beam_groups"] = 1
        return out

    def _generate_kwargs(self, params: DecodeParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_length": params.seq_len, "min_length": params.min_seq_len,
                                  "repetition_penalty": params.repetition_penalty}
        if params.decoding == "greedy":
            kwargs.update(do_sample=False, num_beams=1)
        elif params.decoding == "beam":
            kwargs.update(do_sample=False, num_beams=params.num_beams)
        elif params.decoding == "top_k":
            kwargs.update(do_sample=True, top_k=params.top_k, top_p=1.0, temperature=params.temperature,
                          num_return_sequences=params.num_captions)
        else:
            kwargs.update(do_sample=True, top_p=params.top_p, top_k=0, temperature=params.temperature,
                          num_return_sequences=params.num_captions)
        return kwargs

    def caption(self, pixels, params: DecodeParams, seeds: Sequence[int], autocast_dtype=None) -> list[list[RawCaption]]:
        import torch

        kwargs = self._generate_kwargs(params)
        pixels = pixels.to(self.device, dtype=self.model.dtype)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        use_autocast = autocast_dtype is not None and device_type == "cuda"
        out: list[list[RawCaption]] = []
        with torch.inference_mode(), torch.autocast(device_type, dtype=autocast_dtype, enabled=use_autocast):
            if params.deterministic:
                sequences = self.model.generate(pixel_values=pixels, **kwargs)
                out = [[self._raw(sequences[i].tolist(), params.seq_len)] for i in range(pixels.shape[0])]
            else:
                for i, seed in enumerate(seeds):
                    torch.manual_seed(int(seed))  # transformers samples from the global generator
                    sequences = self.model.generate(pixel_values=pixels[i : i + 1], **kwargs)
                    out.append([self._raw(row.tolist(), params.seq_len) for row in sequences])
        return out

    def _raw(self, row: list[int], seq_len: int) -> RawCaption:
        special = set(self.processor.tokenizer.all_special_ids)
        end = next((i for i, token in enumerate(row) if i > 0 and token in self.eos_ids), None)
        body = row if end is None else row[:end]
        content = [t for t in body if t not in special]
        text = self.processor.tokenizer.decode(content, skip_special_tokens=True)
        return RawCaption(text=text, num_tokens=len(content), truncated=end is None and len(row) >= seq_len)


class _HFPreprocess:
    """PIL image → ``pixel_values[0]`` of a transformers image processor (picklable)."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image):
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


BACKENDS: dict[str, type[Captioner]] = {
    OpenClipCaptioner.backend: OpenClipCaptioner,
    HFCaptioner.backend: HFCaptioner,
}


def load_captioner(spec: CaptionerSpec, device: str = "cpu") -> Captioner:
    """Build the captioner ``spec`` names; ValueError (with what to do) when it cannot."""
    if spec.backend not in BACKENDS:
        raise ValueError(f"backend: unknown captioner backend {spec.backend!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[spec.backend](spec, device=device)
