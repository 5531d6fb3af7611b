"""Several captioners per image: synthetic captions stored per captioner tag.

Apple's generator stores each captioner's captions under its own key, ``syn_text{suffix}``
(``syn_text`` for the first, e.g. ``syn_text_dfn_mscoco38k`` for another), and MobileCLIP2
trains with a key regex (``--dataset-reinforcement-syn-text-key-regex``, default
``^syn_text.*$``). qcap keeps Apple's ``KEY.syn.json`` = ``{"syn_text": [...]}`` for the first
captioner and stores the others in ``KEY.syn_tags.json`` = ``{"syn_text_<tag>": [...], ...}``
with their provenance in ``KEY.qcap_tags.json`` = ``{"syn_text_<tag>": <qcap.json of that
captioner>}`` — members that :mod:`base.shards` carries verbatim (``Sample.extras``). An
Apple-layout multi-captioner ``syn.json`` (``{"syn_text": [...], "syn_text_<suffix>": [...]}``)
keeps its further keys in ``Sample.syn_keys``, written back as they were; :func:`tagged_captions`
reads both.

Row layout of the teacher text embeddings (``text_emb``) when several keys are present:
``[real, syn_text..., then each tagged key's captions in sorted key order]``; ``qcap reinforce``
records the ranges per key in ``KEY.reinforce.json`` (``text_rows``).
"""

from __future__ import annotations

import json
import re
from typing import Any

TAGS_MEMBER = "syn_tags.json"
TAGS_PROVENANCE_MEMBER = "qcap_tags.json"
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")
BASE_KEY = "syn_text"


def key_of(tag: str | None) -> str:
    """The caption key of a captioner tag: ``syn_text`` for none, ``syn_text_<tag>`` otherwise."""
    if not tag:
        return BASE_KEY
    if not TAG_RE.match(tag):
        raise ValueError(f"captioner tag {tag!r}: lower-case letters, digits and '_', at most 64 characters")
    return f"{BASE_KEY}_{tag}"


def tagged_captions(sample: Any) -> dict[str, list[str]]:
    """``syn_text_<tag>`` → captions of a sample: the further keys of Apple's multi-captioner
    ``KEY.syn.json`` (``Sample.syn_keys``), then qcap's ``KEY.syn_tags.json`` (a key in both:
    qcap's); a member that is not a JSON object of lists gives nothing."""
    found = {k: [str(t) for t in v] for k, v in (getattr(sample, "syn_keys", None) or {}).items()
             if isinstance(k, str) and k.startswith(BASE_KEY + "_") and isinstance(v, list)}
    data = (getattr(sample, "extras", None) or {}).get(TAGS_MEMBER)
    if not data:
        return found
    try:
        value = json.loads(data)
    except ValueError:
        return found
    if not isinstance(value, dict):
        return found
    found.update((k, [str(t) for t in v]) for k, v in value.items()
                 if isinstance(k, str) and k.startswith(BASE_KEY + "_") and isinstance(v, list))
    return found


def all_captions(sample: Any) -> dict[str, list[str]]:
    """Every synthetic caption key of a sample: ``syn_text`` then the tagged keys, sorted."""
    keys = {BASE_KEY: list(sample.syn_text)} if getattr(sample, "syn_text", None) else {}
    keys.update(sorted(tagged_captions(sample).items()))
    return keys


def encode_tags(captions: dict[str, list[str]]) -> bytes:
    return json.dumps({k: list(v) for k, v in sorted(captions.items())}, ensure_ascii=False).encode("utf-8")


def text_layout(keys: dict[str, list[str]]) -> dict[str, Any]:
    """``text_emb`` rows per key: ``{"real": 0, key: [start, end], ...}`` for ``all_captions``' order."""
    layout: dict[str, Any] = {"real": 0}
    at = 1
    for key, captions in keys.items():
        layout[key] = [at, at + len(captions)]
        at += len(captions)
    return layout
