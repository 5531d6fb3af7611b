"""Per-caption quality controls: first sentence, degenerate-output flags, image–text scores.

DataCompDR kept the first sentence of each CoCa caption; :func:`first_sentence` does the same
and tidies the spacing that CLIP's BPE decoding leaves around punctuation ("a dog . " →
"a dog"). :func:`caption_flags` names what is wrong with a caption, so the DR builder (or
anyone reading the shards) can drop or down-weight it:

- ``empty``: nothing left after cleaning;
- ``too_short``: DataComp's text rule fails (at most 2 words, or at most 5 characters);
- ``no_letters``: no alphabetic character at all ("2 2 2", "# # #");
- ``repeated_word``: one word three or more times in a row ("a 2 2 2 2");
- ``repeated_phrase``: a 2- or 3-word phrase three or more times ("on a table on a table on a table");
- ``low_diversity``: six or more words, fewer than half of them distinct;
- ``truncated``: the decoder hit ``seq_len`` before its end token (kept as information: a
  long caption can be fine, but a run-on is often degenerate).

``DEGENERATE`` holds the flags that make a caption unusable; ``truncated`` is not among them.

:class:`ClipScorer` scores each synthetic caption against its image with an open_clip CLIP
(cosine similarity of the normalised embeddings, DataComp's ``clip_*_similarity_score``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

DEGENERATE = frozenset({"empty", "too_short", "no_letters", "repeated_word", "repeated_phrase", "low_diversity"})
FLAGS = (*sorted(DEGENERATE), "truncated")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,;:.!?'])")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?|\d+")


def clean(text: str) -> str:
    """Collapse whitespace and remove the space BPE decoding puts before punctuation."""
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def first_sentence(text: str) -> str:
    """The first sentence of ``text``, without its final punctuation (DataCompDR's rule)."""
    text = clean(text)
    match = _SENTENCE_END.search(text)
    if match is not None:
        text = text[: match.start()]
    return text.strip(" ,;:")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def caption_flags(text: str, *, truncated: bool = False) -> list[str]:
    """Sorted flags for one (cleaned) caption; an empty list means nothing was found."""
    flags: set[str] = set()
    tokens = words(text)
    stripped = text.strip()
    if not tokens:
        flags.add("empty" if not stripped.strip(".,;:!?'\" ") else "no_letters")
    else:
        if len(tokens) <= 2 or len(stripped) <= 5:
            flags.add("too_short")
        if not any(ch.isalpha() for ch in stripped):
            flags.add("no_letters")
        run = longest_run(tokens)
        if run >= 3:
            flags.add("repeated_word")
        if any(count >= 3 for n in (2, 3) for count in _ngram_counts(tokens, n).values()):
            flags.add("repeated_phrase")
        if len(tokens) >= 6 and len(set(tokens)) < len(tokens) / 2:
            flags.add("low_diversity")
    if truncated:
        flags.add("truncated")
    return sorted(flags)


def is_degenerate(flags: list[str]) -> bool:
    return any(flag in DEGENERATE for flag in flags)


def longest_run(tokens: list[str]) -> int:
    best = run = 0
    previous = None
    for token in tokens:
        run = run + 1 if token == previous else 1
        best = max(best, run)
        previous = token
    return best


def _ngram_counts(tokens: list[str], n: int) -> Counter:
    """Counts of non-overlapping-start n-grams whose words are not all one word (that case
    is ``repeated_word``'s)."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return Counter({gram: count for gram, count in grams.items() if len(set(gram)) > 1})


@dataclass(slots=True)
class ProcessedCaption:
    """One synthetic caption after the quality controls."""

    text: str  # what goes into syn_text (first sentence, cleaned)
    raw: str  # the decoder's whole output, decoded
    num_tokens: int  # generated tokens, end token excluded
    flags: list[str]  # see caption_flags
    score: float | None = None  # image–text similarity from the scorer, if one ran

    def as_json(self) -> dict[str, Any]:
        return {"raw": self.raw, "num_tokens": self.num_tokens, "flags": self.flags, "score": self.score}


def process_caption(raw: str, *, num_tokens: int, truncated: bool, keep_first_sentence: bool = True) -> ProcessedCaption:
    text = first_sentence(raw) if keep_first_sentence else clean(raw)
    return ProcessedCaption(text=text, raw=clean(raw), num_tokens=num_tokens, flags=caption_flags(text, truncated=truncated))


class ClipScorer:
    """Cosine similarity between an image and each of its captions, with an open_clip CLIP."""

    def __init__(self, model: str | None, *, pretrained: str | None = None, checkpoint: str | None = None,
                 device: str = "cpu") -> None:
        from base.models import load_model

        loaded = load_model(model, pretrained=pretrained, checkpoint=checkpoint, device=device)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.preprocess = loaded.preprocess_val
        self.device = device
        self.name = loaded.name
        self.source = loaded.source

    def score(self, pixels, captions: list[list[str]], autocast_dtype=None) -> list[list[float]]:
        """``pixels`` ``[B, 3, H, W]`` (this scorer's preprocessing); one list of captions per image."""
        import torch
        import torch.nn.functional as F

        flat = [text for group in captions for text in group]
        if not flat:
            return [[] for _ in captions]
        use_autocast = autocast_dtype is not None and self.device.startswith("cuda")
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, dtype=autocast_dtype, enabled=use_autocast):
            image = F.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1)
            text = F.normalize(self.model.encode_text(self.tokenizer(flat).to(self.device)).float(), dim=-1)
        index = torch.tensor([i for i, group in enumerate(captions) for _ in group], device=image.device)
        sims = (image[index] * text).sum(-1).tolist()
        out, start = [], 0
        for group in captions:
            out.append([round(s, 4) for s in sims[start : start + len(group)]])
            start += len(group)
        return out
