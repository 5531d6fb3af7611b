"""Decoding parameters shared by the decoder, the backends and the job (no heavy imports).

The fields and defaults are :func:`captioning.decode.generate`'s; ``__post_init__`` checks them
and names the field at fault.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DECODINGS = ("greedy", "top_k", "top_p", "beam")


@dataclass(frozen=True, kw_only=True)
class DecodeParams:
    """How to decode; the fields and defaults of :func:`captioning.decode.generate`."""

    decoding: str = "greedy"  # greedy | top_k | top_p | beam
    num_captions: int = 1  # captions per image (rows of the output per image, image-major)
    seq_len: int = 30  # longest output, start and end tokens included
    top_k: int = 1  # top_k decoding: keep the k best tokens (and ties with the k-th)
    top_p: float = 0.9  # top_p decoding: nucleus mass
    temperature: float = 1.0  # sampling temperature, applied after filtering (as open_clip)
    num_beams: int = 6  # beam decoding: beams per image, all groups together
    num_beam_groups: int = 3  # beam decoding: open_clip's group beam search groups
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the row
    min_seq_len: int = 5  # EOS is banned while the row (start token included) is shorter

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
                raise ValueError("num_captions: beam search is deterministic and returns one caption per image")

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
