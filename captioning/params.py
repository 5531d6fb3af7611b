"""Decoding parameters shared by the decoder, the backends and the job (no heavy imports).

Declared once, here: :func:`captioning.decode.generate` takes a :class:`DecodeParams`, and
``qcap caption`` holds one as its nested ``decode`` config (``--decode.top-p``, also ``--top-p``).
``__post_init__`` checks the fields and names the field at fault.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from base.config import arg

DECODINGS = ("greedy", "top_k", "top_p", "beam")


@dataclass(frozen=True, kw_only=True)
class DecodeParams:
    """How to decode: the decoder's settings, as :func:`captioning.decode.generate` applies them."""

    decoding: Literal["greedy", "top_k", "top_p", "beam"] = arg("greedy", help="greedy, top_k, top_p or beam")
    num_captions: int = arg(1, help="captions per image (rows of the output per image, image-major)")
    seq_len: int = arg(30, help="longest caption in tokens, start and end included")
    top_k: int = arg(1, help="top_k: keep the k best tokens (and ties with the k-th)")
    top_p: float = arg(0.9, help="top_p: nucleus mass")
    temperature: float = arg(1.0, help="sampling temperature, applied after filtering (as open_clip does)")
    num_beams: int = arg(6, help="beam: beams per image, all groups together")
    num_beam_groups: int = arg(3, help="beam: open_clip's group beam search groups")
    repetition_penalty: float = arg(1.0, help="> 1 discourages tokens already in the row")
    min_seq_len: int = arg(5, help="the end token is banned while the row (start token included) is shorter")

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding: must be one of {', '.join(DECODINGS)}, not {self.decoding!r}")
        if self.num_captions < 1:
            raise ValueError(f"num_captions: must be >= 1, got {self.num_captions}")
        if self.min_seq_len < 0:
            raise ValueError(f"min_seq_len: must be >= 0, got {self.min_seq_len}")
        if self.seq_len <= self.min_seq_len:
            raise ValueError(f"seq_len: must be larger than min_seq_len ({self.min_seq_len}), got {self.seq_len}")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        if self.decoding == "beam":
            if self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups:
                raise ValueError(
                    f"num_beams: must be a multiple of num_beam_groups ({self.num_beam_groups}), got {self.num_beams}"
                )
            if self.num_beams < 2:
                raise ValueError(f"num_beams: beam search needs at least 2 beams, got {self.num_beams}")
            if self.num_captions != 1:
                raise ValueError("num_captions: beam search gives one caption per image (it is deterministic); "
                                 "give num_captions 1 (--num-captions 1)")

    @property
    def deterministic(self) -> bool:
        """Greedy, beam and top-k = 1 always give the same tokens for the same logits."""
        return self.decoding in ("greedy", "beam") or (self.decoding == "top_k" and self.top_k == 1)

    @property
    def group_size(self) -> int:
        return self.num_beams // self.num_beam_groups

    def as_dict(self) -> dict[str, Any]:
        """The parameters that matter for this decoding (recorded in provenance)."""
        out = asdict(self)
        if self.decoding != "beam":
            out.pop("num_beams")
            out.pop("num_beam_groups")
        if self.decoding != "top_k":
            out.pop("top_k")
        if self.decoding != "top_p":
            out.pop("top_p")
        if self.decoding in ("greedy", "beam"):
            out.pop("temperature")
        return out
