"""Over-generate, then select: decode K candidate captions per image, keep the best N.

LAION-COCO's recipe: BLIP L/14 writes 40 captions per image, CLIP L/14 ranks them and keeps 5.
``qcap caption --num-candidates K --num-captions N --select score|diverse`` decodes K, scores
each against its image with the CLIP scorer (``--scorer-model``) and keeps N:

- ``score``: the N highest image–text similarities (ties: the earlier candidate), best first;
  degenerate candidates (``captioning.quality.DEGENERATE`` flags) rank after every clean one;
- ``diverse``: greedy maximal marginal relevance — the best-scoring candidate first, then
  repeatedly the candidate maximising ``score − λ · max word-overlap (Jaccard) with those kept``
  (without scores: overlap alone), so near-duplicate samples of one caption are not all kept.

Every candidate, its score and flags stay in the provenance (``KEY.qcap.json``: ``overgenerate``
= ``{num_candidates, select, diversity, kept, candidates: [{text, raw, num_tokens, flags,
score}]}``), so :func:`reselect` redoes the choice with another rule or N without decoding again.
"""

from __future__ import annotations

import re
from typing import Any

RULES = ("score", "diverse")
_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def select(texts: list[str], scores: list[float | None], keep: int, *, rule: str = "score",
           flags: list[list[str]] | None = None, diversity: float = 0.5) -> list[int]:
    """Indices of the ``keep`` candidates to keep, in the order chosen (best first)."""
    from captioning.quality import is_degenerate

    if rule not in RULES:
        raise ValueError(f"select: choose from {', '.join(RULES)}, not {rule!r}")
    if len(scores) != len(texts):
        raise ValueError(f"{len(scores)} scores for {len(texts)} candidates")
    keep = min(keep, len(texts))
    bad = [bool(flags and is_degenerate(flags[i])) for i in range(len(texts))]

    def base(i: int) -> tuple[int, float]:
        score = scores[i]
        return (0 if bad[i] else 1, float("-inf") if score is None else float(score))

    order = sorted(range(len(texts)), key=lambda i: (base(i)[0], base(i)[1], -i), reverse=True)
    if rule == "score":
        return order[:keep]
    chosen = [order[0]] if keep else []
    while len(chosen) < keep:
        def gain(i: int) -> tuple[int, float, int]:
            clean, score = base(i)
            overlap = max(jaccard(texts[i], texts[j]) for j in chosen)
            value = (0.0 if score == float("-inf") else score) - diversity * overlap
            return clean, value, -i

        chosen.append(max((i for i in range(len(texts)) if i not in chosen), key=gain))
    return chosen


def overgenerate_record(candidates: list[dict[str, Any]], kept: list[int], *, rule: str, diversity: float
                        ) -> dict[str, Any]:
    """The provenance of one image's selection; ``candidates``: ``{text, raw, num_tokens, flags, score}``."""
    return {"num_candidates": len(candidates), "select": rule, "diversity": diversity, "kept": list(kept),
            "candidates": candidates}


def reselect(record: dict[str, Any], keep: int, *, rule: str | None = None, diversity: float | None = None
             ) -> tuple[list[str], list[int]]:
    """Redo a selection from a provenance record (no decoding): ``(captions kept, indices)``."""
    candidates = record["candidates"]
    rule = rule or record["select"]
    diversity = record.get("diversity", 0.5) if diversity is None else diversity
    kept = select([c["text"] for c in candidates], [c.get("score") for c in candidates], keep, rule=rule,
                  flags=[c.get("flags") or [] for c in candidates], diversity=diversity)
    return [candidates[i]["text"] for i in kept], kept


def overgenerate(captioner, scorer, pixels, scorer_pixels, params, seeds, *, keep: int, rule: str = "score",
                 diversity: float = 0.5, first_sentence: bool = True, autocast_dtype=None
                 ) -> list[tuple[list[Any], dict[str, Any]]]:
    """Decode ``params.num_captions`` candidates per image with ``captioner``, score them with
    ``scorer`` (a :class:`captioning.quality.ClipScorer`, or None for the diversity rule alone),
    keep ``keep``. Per image: (the kept :class:`~captioning.quality.ProcessedCaption` s, best
    first; the provenance record of every candidate)."""
    from captioning.quality import process_caption

    raw = captioner.caption(pixels, params, seeds, autocast_dtype=autocast_dtype)
    processed = [[process_caption(r.text, num_tokens=r.num_tokens, truncated=r.truncated,
                                  keep_first_sentence=first_sentence) for r in group] for group in raw]
    if scorer is not None:
        scores = scorer.score(scorer_pixels, [[c.text for c in group] for group in processed],
                              autocast_dtype=autocast_dtype)
        for group, group_scores in zip(processed, scores, strict=True):
            for caption, score in zip(group, group_scores, strict=True):
                caption.score = score
    elif rule == "score":
        raise ValueError("select score: ranking candidates needs a scorer (--scorer-model); or use --select diverse")
    out = []
    for group in processed:
        kept = select([c.text for c in group], [c.score for c in group], keep, rule=rule,
                      flags=[c.flags for c in group], diversity=diversity)
        candidates = [{"text": c.text, **c.as_json()} for c in group]
        out.append(([group[i] for i in kept], overgenerate_record(candidates, kept, rule=rule, diversity=diversity)))
    return out
