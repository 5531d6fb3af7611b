"""The caption-quality oracle: score any caption against a world's exact truth.

:func:`score_caption` reads a caption with the world's closed lexicon (class names and
synonyms, colours, sizes, counts, textures, grid positions, "in front of"/"behind", background
words), matches each mentioned object to the truth, and reports:

- object recall / precision over classes, and the hallucinated classes (named, not present);
- per attribute (colour, size, count, texture, position, relation, background): how many
  statements the caption makes and how many are right (*accuracy*), and how many of the
  truth's facts it states correctly (*coverage*);
- ``fact_precision``, ``fact_recall`` and ``score`` (their F1) over all facts: the true
  description scores exactly 1.0; a caption of another image scores near 0;
- ``belongs``: the caption is about this image at all (it names something, at least half of
  what it names is there, and at least half of its attribute statements are right).

A fact is a statement about a group of objects of one class and colour: its class, colour,
size, count, texture (when not solid), each grid position of its members, which group is in
front of which where they overlap, and the background. Text the lexicon cannot read (file
names, other languages, boilerplate) states no fact: it scores 0 and does not belong.

Usage::

    from world.oracle import score_caption
    result = score_caption(truth_row, "a large red star on the left")   # truth_row: truth.parquet row
    result["score"], result["object_recall"], result["hallucinated"], result["belongs"]

    qcap score-captions --world runs/world --captions runs/world/pool.parquet
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from base.cli import UsageError
from world.describe import (
    BACKGROUND_WORDS,
    CLASS_SYNONYMS,
    COLOUR_WORDS,
    COUNT_WORDS,
    PLURALS,
    POSITION_WORDS,
    SCENE_NOUNS,
    SIZE_WORDS,
    TEXTURE_WORDS,
    Group,
    group_objects,
)

log = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "size", "count", "texture", "position", "relation", "background")
_TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*|[.;!?,]", re.UNICODE)
_SENTENCE_END = {".", ";", "!", "?"}


def _noun_lexicon() -> dict[tuple[str, ...], tuple[str, bool]]:
    """Token sequence → (class, plural)."""
    lexicon: dict[tuple[str, ...], tuple[str, bool]] = {}
    for cls, plural in PLURALS.items():
        lexicon[(cls,)] = (cls, False)
        lexicon[(plural,)] = (cls, True)
        for sing, plur in CLASS_SYNONYMS.get(cls, []):
            lexicon[tuple(sing.split())] = (cls, False)
            lexicon[tuple(plur.split())] = (cls, True)
    return lexicon


NOUNS = _noun_lexicon()
_MAX_NOUN = max(len(k) for k in NOUNS)
# relation markers: tokens → True when the subject is in front of the object
RELATIONS: dict[tuple[str, ...], bool] = {
    ("in", "front", "of"): True, ("partly", "covers"): True, ("covers",): True, ("hides",): True,
    ("partly", "hides"): True, ("behind",): False, ("hidden", "by"): False, ("covered", "by"): False,
    ("partly", "hidden", "by"): False,
}
_BACKGROUND_LOOKUP = {word: kind for kind, words in BACKGROUND_WORDS.items() for word in words}


@dataclass(slots=True)
class Mention:
    cls: str
    colour: str | None = None
    size: str | None = None
    count: int | str | None = None  # 1..4, "many" (a bare plural) or None (not said)
    texture: str | None = None
    positions: list[frozenset[str]] = field(default_factory=list)


@dataclass(slots=True)
class Parsed:
    mentions: list[Mention]
    relations: list[tuple[int, int]]  # (front mention, back mention)
    background: str | None


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def parse_caption(text: str) -> Parsed:
    """Read a caption with the world's lexicon (see the module doc)."""
    tokens = tokenize(text or "")
    mentions: list[Mention] = []
    relations: list[tuple[int, int]] = []
    background = None
    for token in tokens:
        if token in _BACKGROUND_LOOKUP:
            kind = _BACKGROUND_LOOKUP[token]
            # "night" outranks "sky" ("night sky"); otherwise the first background named wins
            if background is None or (kind == "night" and background == "sky"):
                background = kind

    pending: dict[str, Any] = {}
    pending_positions: list[frozenset[str]] = []
    last: int | None = None  # the sentence's latest mention
    relation: tuple[bool, int] | None = None  # (subject in front, subject mention) awaiting its object
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in _SENTENCE_END:
            pending, pending_positions, last, relation = {}, [], None, None
            i += 1
            continue
        noun = _match(tokens, i, NOUNS, _MAX_NOUN)
        if noun is not None:
            length, (cls, plural) = noun
            count = pending.get("count")
            if count is None and plural:
                count = "many"
            new = Mention(cls, pending.get("colour"), pending.get("size"), count, pending.get("texture"), list(pending_positions))
            index = _merge(mentions, new, definite=pending.get("definite", False))
            if relation is not None:
                front, subject = relation
                if subject != index:
                    relations.append((subject, index) if front else (index, subject))
                relation = None
            last = index
            pending, pending_positions = {}, []
            i += length
            continue
        marker = _match(tokens, i, RELATIONS, 3)
        if marker is not None:
            length, front = marker
            if last is not None:
                relation = (front, last)
            i += length
            continue
        if token in POSITION_WORDS:
            words = set()
            while i < len(tokens) and tokens[i] in POSITION_WORDS:
                words.add(POSITION_WORDS[tokens[i]])
                i += 1
            if words == {"centre"} or not words & {"centre"}:
                phrase = frozenset(words)
            else:  # "centre left" and the like: the side is what is meant
                phrase = frozenset(words - {"centre"})
            if last is not None:
                if phrase not in mentions[last].positions:
                    mentions[last].positions.append(phrase)
            else:
                pending_positions.append(phrase)
            continue
        if token in COLOUR_WORDS:
            pending["colour"] = COLOUR_WORDS[token]
        elif token in SIZE_WORDS:
            pending["size"] = SIZE_WORDS[token]
        elif token in TEXTURE_WORDS:
            pending["texture"] = TEXTURE_WORDS[token]
        elif token in COUNT_WORDS:
            pending["count"] = COUNT_WORDS[token]
            pending.pop("definite", None)
        elif token == "the":
            pending["definite"] = True
            pending.pop("count", None)
        elif token in SCENE_NOUNS or token in _BACKGROUND_LOOKUP:
            pending = {}
            relation = None
        i += 1
    return Parsed(mentions, relations, background)


def _match(tokens: list[str], i: int, table: dict, longest: int):
    for length in range(min(longest, len(tokens) - i), 0, -1):
        key = tuple(tokens[i : i + length])
        if key in table:
            return length, table[key]
    return None


def _merge(mentions: list[Mention], new: Mention, *, definite: bool) -> int:
    """Index of the mention ``new`` refers to: an earlier compatible one, or itself appended."""
    for index in range(len(mentions) - 1, -1, -1):
        old = mentions[index]
        if old.cls != new.cls:
            continue
        if old.colour is not None and new.colour is not None and old.colour != new.colour:
            continue
        if not definite and new.count not in (None, "many") and old.count not in (None, "many") and old.count != new.count:
            continue
        for name in ("colour", "size", "count", "texture"):
            if getattr(old, name) is None or (name == "count" and old.count == "many" and new.count is not None):
                setattr(old, name, getattr(new, name))
        for phrase in new.positions:
            if phrase not in old.positions:
                old.positions.append(phrase)
        return index
    mentions.append(new)
    return len(mentions) - 1


# --------------------------------------------------------------------------------------------
# Truth side


def truth_groups(row: dict) -> tuple[list[Group], list[tuple[int, int]]]:
    """Groups (class + colour) of a truth row and the overlapping (front, back) group pairs."""
    objects = [(o["cls"], o["colour"], o["size"], o["texture"], o["position"]) for o in row["objects"]]
    return group_objects(objects, [(r["front"], r["back"]) for r in row.get("relations") or []])


def _assign(mentions: list[Mention], groups: list[Group]) -> list[int | None]:
    """The truth group each mention is about (None: the class is not in the image)."""
    out: list[int | None] = []
    used: set[int] = set()
    for m in mentions:
        candidates = [k for k, g in enumerate(groups) if g.cls == m.cls]
        if not candidates:
            out.append(None)
            continue
        same_colour = [k for k in candidates if groups[k].colour == m.colour]
        free = [k for k in candidates if k not in used]
        choice = (same_colour or free or candidates)[0]
        used.add(choice)
        out.append(choice)
    return out


def score_caption(truth_row: dict, caption: str) -> dict[str, Any]:
    """Score one caption against one truth row (a dict with ``objects``, ``relations``,
    ``background``, as in truth.parquet). See the module doc for the fields."""
    parsed = parse_caption(caption)
    groups, group_pairs = truth_groups(truth_row)

    def ranks(k: int) -> list[int]:  # depth ranks of group k's objects
        return [int(truth_row["objects"][m]["depth_rank"]) for m in groups[k].members]
    assignment = _assign(parsed.mentions, groups)

    stated: Counter[str] = Counter()
    right: Counter[str] = Counter()
    covered: set[tuple] = set()

    truth_facts: set[tuple] = {("cls", g.cls) for g in groups}
    for k, g in enumerate(groups):
        truth_facts |= {("colour", k), ("size", k), ("count", k)}
        if g.texture != "solid":
            truth_facts.add(("texture", k))
        truth_facts |= {("position", k, p) for p in g.positions}
    truth_facts |= {("relation", a, b) for a, b in group_pairs}
    truth_facts.add(("background",))
    attribute_truth = Counter(f[0] for f in truth_facts if f[0] != "cls")

    mentioned = sorted({m.cls for m in parsed.mentions})
    present = {g.cls for g in groups}
    hallucinated = [c for c in mentioned if c not in present]
    covered |= {("cls", c) for c in mentioned if c in present}
    wrong_facts = len(hallucinated)
    hallucinated_statements = 0

    def judge(kind: str, ok: bool, fact: tuple | None = None) -> None:
        stated[kind] += 1
        if ok:
            right[kind] += 1
            if fact is not None and fact in truth_facts:
                covered.add(fact)

    for m, k in zip(parsed.mentions, assignment, strict=True):
        if k is None:  # attributes of an object that is not there: wrong facts, not attribute errors
            hallucinated_statements += sum(x is not None for x in (m.colour, m.size, m.count, m.texture)) + len(m.positions)
            continue
        g = groups[k]
        if m.colour is not None:
            judge("colour", m.colour == g.colour, ("colour", k))
        if m.size is not None:
            judge("size", m.size == g.size, ("size", k))
        if m.count is not None:
            judge("count", g.count >= 2 if m.count == "many" else m.count == g.count, None if m.count == "many" else ("count", k))
        if m.texture is not None:
            judge("texture", m.texture == g.texture, ("texture", k))
        for phrase in m.positions:
            exact = next((p for p in g.positions if frozenset(p.split()) == phrase), None)
            ok = exact is not None or any(phrase <= frozenset(p.split()) for p in g.positions)
            judge("position", ok, ("position", k, exact) if exact else None)
    for front, back in parsed.relations:
        ka, kb = assignment[front], assignment[back]
        ok = ka is not None and kb is not None and ka != kb and min(ranks(ka)) < max(ranks(kb))
        judge("relation", ok, ("relation", ka, kb) if ok else None)
    if parsed.background is not None:
        judge("background", parsed.background == truth_row["background"], ("background",))

    num_stated = sum(stated.values()) + len(mentioned) + hallucinated_statements
    num_right = sum(right.values()) + len(mentioned) - wrong_facts
    fact_precision = num_right / num_stated if num_stated else 0.0
    fact_recall = len(covered) / len(truth_facts)
    score = 2 * fact_precision * fact_recall / (fact_precision + fact_recall) if fact_precision + fact_recall else 0.0
    attribute_kinds = ("colour", "size", "count", "position")
    attr_stated = sum(stated[a] for a in attribute_kinds)
    attr_right = sum(right[a] for a in attribute_kinds)
    object_precision = (len(mentioned) - len(hallucinated)) / len(mentioned) if mentioned else None
    attribute_accuracy = attr_right / attr_stated if attr_stated else None
    result: dict[str, Any] = {
        "score": round(score, 6),
        "fact_precision": round(fact_precision, 6),
        "fact_recall": round(fact_recall, 6),
        "num_objects_mentioned": len(mentioned),
        "object_recall": round(len(present & set(mentioned)) / len(present), 6),
        "object_precision": None if object_precision is None else round(object_precision, 6),
        "hallucinated": hallucinated,
        "num_hallucinated": len(hallucinated),
        "attribute_accuracy": None if attribute_accuracy is None else round(attribute_accuracy, 6),
        "belongs": bool(mentioned) and object_precision >= 0.5 and (attribute_accuracy is None or attribute_accuracy >= 0.5),
    }
    for kind in ATTRIBUTES:
        result[f"{kind}_stated"] = stated[kind]
        result[f"{kind}_correct"] = right[kind]
        result[f"{kind}_accuracy"] = round(right[kind] / stated[kind], 6) if stated[kind] else None
        covered_kind = sum(1 for f in covered if f[0] == kind)
        result[f"{kind}_coverage"] = round(covered_kind / attribute_truth[kind], 6) if attribute_truth[kind] else None
    return result


# --------------------------------------------------------------------------------------------
# Scoring files


PER_CAPTION_FIELDS = (
    "score", "fact_precision", "fact_recall", "object_recall", "object_precision", "num_objects_mentioned",
    "num_hallucinated", "attribute_accuracy", "belongs",
)


class Aggregate:
    """Running totals over many captions (memory flat in the number of captions)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()

    def add(self, result: dict[str, Any]) -> None:
        self.n += 1
        for name in ("score", "fact_precision", "fact_recall", "object_recall", "num_hallucinated"):
            self.sums[name] += result[name]
        if result["object_precision"] is not None:
            self.sums["object_precision"] += result["object_precision"]
            self.counts["object_precision"] += 1
        self.sums["no_object"] += result["num_objects_mentioned"] == 0
        self.sums["hallucinating"] += result["num_hallucinated"] > 0
        self.sums["belongs"] += bool(result["belongs"])
        for kind in ATTRIBUTES:
            self.sums[f"{kind}_stated"] += result[f"{kind}_stated"]
            self.sums[f"{kind}_correct"] += result[f"{kind}_correct"]
            if result[f"{kind}_coverage"] is not None:
                self.sums[f"{kind}_coverage"] += result[f"{kind}_coverage"]
                self.counts[f"{kind}_coverage"] += 1

    def merge(self, other: Aggregate) -> None:
        """Add another part's totals (parts merged in a fixed order give the same sums on any pool)."""
        self.n += other.n
        self.sums.update(other.sums)
        self.counts.update(other.counts)

    def summary(self) -> dict[str, Any]:
        n = max(self.n, 1)
        out: dict[str, Any] = {
            "num_captions": self.n,
            "score": round(self.sums["score"] / n, 4),
            "fact_precision": round(self.sums["fact_precision"] / n, 4),
            "fact_recall": round(self.sums["fact_recall"] / n, 4),
            "object_recall": round(self.sums["object_recall"] / n, 4),
            "object_precision": round(self.sums["object_precision"] / max(self.counts["object_precision"], 1), 4),
            "share_no_object": round(self.sums["no_object"] / n, 4),
            "share_hallucinating": round(self.sums["hallucinating"] / n, 4),
            "hallucinated_per_caption": round(self.sums["num_hallucinated"] / n, 4),
            "belongs_rate": round(self.sums["belongs"] / n, 4),
        }
        for kind in ATTRIBUTES:
            stated = self.sums[f"{kind}_stated"]
            out[f"{kind}_accuracy"] = round(self.sums[f"{kind}_correct"] / stated, 4) if stated else None
            out[f"{kind}_statements_per_caption"] = round(stated / n, 4)
            covered = self.counts[f"{kind}_coverage"]
            out[f"{kind}_coverage"] = round(self.sums[f"{kind}_coverage"] / covered, 4) if covered else None
        return out


def load_truth(world: str | Path) -> dict[str, dict]:
    """uid → truth row (objects, relations, background, split, text_kind)."""
    import pyarrow.parquet as pq

    path = Path(world) / "truth.parquet"
    if not path.exists():
        raise UsageError(f"{path}: missing; is {world} a world folder (made by `qcap world`)?")
    table = pq.read_table(path, columns=["uid", "split", "objects", "relations", "background", "text_kind", "description"])
    return {row["uid"]: row for row in table.to_pylist()}


CAPTION_COLUMNS = ("text", "caption", "syn_text", "captions")


def iter_captions(source: str | Path, fields: list[str] | None) -> Iterator[tuple[str, str, int, str]]:
    """(uid, field, index within the field, caption) from a Parquet file or a shard folder."""
    source = Path(source)
    if source.is_dir() or str(source).endswith(".tar") or "{" in str(source):
        yield from _iter_shard_captions(source, fields)
        return
    if not source.exists():
        raise UsageError(f"{source}: no such caption file or shard folder")
    yield from _iter_parquet_captions(source, fields)


def _iter_parquet_captions(path: Path, fields: list[str] | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UsageError(f"{path}: not a readable Parquet file ({err})") from err
    names = parquet.schema_arrow.names
    if "uid" not in names:
        raise UsageError(f"{path}: has no 'uid' column; captions are joined to the truth by uid")
    chosen = fields or [c for c in CAPTION_COLUMNS if c in names]
    missing = [c for c in chosen if c not in names]
    if missing or not chosen:
        raise UsageError(f"{path}: caption column(s) {missing or list(CAPTION_COLUMNS)} not found; has {names}")
    for batch in parquet.iter_batches(columns=["uid", *chosen], batch_size=4096):
        data = batch.to_pydict()
        for row, uid in enumerate(data["uid"]):
            for name in chosen:
                yield from _expand(uid, name, data[name][row])


def _iter_shard_captions(source: Path, fields: list[str] | None):
    from base.shards import iter_samples

    chosen = fields or ["text", "syn_text"]
    for sample in iter_samples(str(source), with_image=False):
        for name in chosen:
            if name == "text":
                value = sample.text
            elif name == "syn_text":
                value = sample.syn_text
            else:
                value = sample.meta.get(name)
            yield from _expand(sample.uid, name, value)


def _expand(uid, name, value):
    if value is None:
        return
    if isinstance(value, str):
        yield uid, name, 0, value
    else:
        for index, caption in enumerate(value):
            if caption is not None:
                yield uid, name, index, str(caption)


def default_out(captions: str | Path) -> Path:
    """Where scores go without ``--out``: ``<captions>.scores`` beside the captions."""
    return Path(str(captions).rstrip("/") + ".scores")


def per_caption_schema():
    import pyarrow as pa

    return pa.schema([
        ("uid", pa.string()), ("field", pa.string()), ("caption_index", pa.int32()), ("caption", pa.string()),
        ("split", pa.string()), ("text_kind", pa.string()),
        *[(name, pa.bool_() if name == "belongs" else (pa.int32() if name.startswith("num_") else pa.float64()))
          for name in PER_CAPTION_FIELDS],
        ("hallucinated", pa.list_(pa.string())),
        *[(f"{kind}_accuracy", pa.float64()) for kind in ATTRIBUTES],
    ])


_TRUTH: dict[str, dict[str, dict]] = {}


def _truth_of(world: str) -> dict[str, dict]:
    """The world's truth, loaded once per process (a pool worker or Ray task scores many parts)."""
    if world not in _TRUTH:
        _TRUTH.clear()
        _TRUTH[world] = load_truth(world)
    return _TRUTH[world]


@dataclass(frozen=True, slots=True)
class ScorePart:
    """One part of the captions to score: a shard of a folder, or the whole of a Parquet file."""

    index: int
    world: str
    source: str
    fields: list[str] | None
    limit: int | None = None  # score at most this many of its captions (--limit; the parts run in order then)


@dataclass(slots=True)
class ScoredPart:
    index: int
    rows: Any  # pyarrow Table of per_caption rows (per_caption_schema)
    overall: Aggregate
    by_field: dict[str, Aggregate]
    by_kind: dict[str, Aggregate]
    unknown: int


def score_part(part: ScorePart) -> ScoredPart:
    """A task: every caption of one part scored against the truth, with its aggregates."""
    import pyarrow as pa

    truth = _truth_of(part.world)
    overall, by_field, by_kind, unknown = Aggregate(), defaultdict(Aggregate), defaultdict(Aggregate), 0
    rows: list[dict] = []
    for uid, name, index, caption in iter_captions(part.source, part.fields):
        if part.limit is not None and overall.n >= part.limit:
            break
        row = truth.get(uid)
        if row is None:
            unknown += 1
            continue
        result = score_caption(row, caption)
        overall.add(result)
        by_field[name].add(result)
        by_kind[row["text_kind"] or row["split"]].add(result)
        rows.append({
            "uid": uid, "field": name, "caption_index": index, "caption": caption, "split": row["split"],
            "text_kind": row["text_kind"], **{k: result[k] for k in PER_CAPTION_FIELDS},
            "hallucinated": result["hallucinated"], **{f"{k}_accuracy": result[f"{k}_accuracy"] for k in ATTRIBUTES},
        })
    return ScoredPart(index=part.index, rows=pa.Table.from_pylist(rows, schema=per_caption_schema()), overall=overall,
                      by_field=dict(by_field), by_kind=dict(by_kind), unknown=unknown)


def caption_parts(world: str | Path, captions: str | Path, fields: list[str] | None) -> list[ScorePart]:
    """A shard folder's shards (each a part), or one part for a Parquet file."""
    from base.shards import ShardError, expand_shards

    source = Path(captions)
    world = os.path.abspath(world)  # a Ray worker's working folder may not be ours
    if source.is_dir() or str(source).endswith(".tar") or "{" in str(source):
        try:
            tars = expand_shards(str(captions))
        except ShardError as err:
            raise UsageError(f"{captions}: {err}") from err
        return [ScorePart(i, world, os.path.abspath(tar) if "://" not in tar else tar, fields)
                for i, tar in enumerate(tars)]
    if not source.exists():
        raise UsageError(f"{source}: no such caption file or shard folder")
    return [ScorePart(0, world, os.path.abspath(source), fields)]


def score_file(world: str | Path, captions: str | Path, *, fields: list[str] | None = None, out: str | Path | None = None,
               limit: int | None = None, progress: bool = True, num_workers: int = 1,
               ray_address: str | None = None) -> dict[str, Any]:
    """Score every caption of a file or shard folder; writes summary.json and
    per_caption.parquet into ``out`` and returns the summary.

    Each shard is a task (a local pool of ``num_workers`` or Ray tasks at ``ray_address``); the
    parts are merged in shard order, so the files are the same bytes on any pool. With ``limit``
    the parts run here, in order, until that many captions are scored."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from base.stage import write_run_records
    from base.workers import Workers, in_order

    _truth_of(os.path.abspath(world))  # a missing truth is one line here, before any task (kept for in-process parts)
    parts = caption_parts(world, captions, fields)
    out = Path(out) if out is not None else default_out(captions)
    out.mkdir(parents=True, exist_ok=True)
    overall = Aggregate()
    by_field: dict[str, Aggregate] = defaultdict(Aggregate)
    by_kind: dict[str, Aggregate] = defaultdict(Aggregate)
    unknown = 0
    tmp = out / ".per_caption.parquet.tmp"
    bar = tqdm(total=len(parts), desc="scoring", unit="part", disable=not progress)

    def merge(scored: ScoredPart) -> None:
        nonlocal unknown
        writer.write_table(scored.rows)
        overall.merge(scored.overall)
        for name, agg in scored.by_field.items():
            by_field[name].merge(agg)
        for name, agg in scored.by_kind.items():
            by_kind[name].merge(agg)
        unknown += scored.unknown
        bar.update(1)

    with pq.ParquetWriter(tmp, per_caption_schema()) as writer:
        if limit is not None:  # a quick look: parts in order, here, until the limit
            for part in parts:
                if overall.n >= limit:
                    break
                merge(score_part(ScorePart(part.index, part.world, part.source, part.fields, limit - overall.n)))
        else:
            with Workers(num_workers, ray_address=ray_address) as workers:
                for scored in in_order(workers.imap(score_part, parts), lambda r: r.index):
                    merge(scored)
    bar.close()
    tmp.replace(out / "per_caption.parquet")
    if overall.n == 0:
        raise UsageError(f"{captions}: no caption matched a uid of {world}'s truth ({unknown} unknown uids)")
    summary = {
        "world": str(world), "captions": str(captions), "num_unknown_uids": unknown,
        "overall": overall.summary(),
        "by_field": {k: v.summary() for k, v in sorted(by_field.items())},
        "by_text_kind": {k: v.summary() for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1].n)},
    }
    write_run_records(out, summary=summary)  # summary.json
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    o = summary["overall"]
    lines = [
        f"{o['num_captions']} captions from {summary['captions']} scored against {summary['world']}"
        + (f" ({summary['num_unknown_uids']} with unknown uids skipped)" if summary["num_unknown_uids"] else ""),
        f"  caption quality (fact F1, 1.0 = the true description): {o['score']:.3f}"
        f"   precision {o['fact_precision']:.3f}  recall {o['fact_recall']:.3f}",
        f"  about the image at all (belongs): {100 * o['belongs_rate']:.1f}%   names no object: "
        f"{100 * o['share_no_object']:.1f}%   names an absent object: {100 * o['share_hallucinating']:.1f}%",
        f"  objects: recall {o['object_recall']:.3f}  precision {o['object_precision']:.3f}"
        f"  hallucinated per caption {o['hallucinated_per_caption']:.3f}",
    ]
    parts = []
    for kind in ("colour", "size", "count", "position", "relation", "background"):
        acc, cov = o[f"{kind}_accuracy"], o[f"{kind}_coverage"]
        parts.append(f"{kind} {'-' if acc is None else f'{acc:.2f}'}/{'-' if cov is None else f'{cov:.2f}'}")
    lines.append("  attributes (accuracy of what is said / share of the truth said): " + ", ".join(parts))
    if len(summary["by_text_kind"]) > 1:
        lines.append("  by text kind:      n   score  belongs  obj.recall  colour acc")
        for kind, s in summary["by_text_kind"].items():
            colour = "-" if s["colour_accuracy"] is None else f"{s['colour_accuracy']:.2f}"
            lines.append(
                f"    {kind:<12} {s['num_captions']:>6}  {s['score']:.3f}  {100 * s['belongs_rate']:5.1f}%"
                f"   {s['object_recall']:.3f}      {colour}"
            )
    verdict = "good" if o["score"] >= 0.6 else ("mediocre" if o["score"] >= 0.3 else "poor")
    lines.append(f"  verdict: {verdict} captions — {100 * (1 - o['belongs_rate']):.0f}% do not describe their image")
    return "\n".join(lines)


def _refuse_others_records(out: Path) -> None:
    """Every stage names its run records config.json and summary.json: an ``--out`` holding another
    stage's (the caption folder itself, say) is refused before they are replaced."""
    from base.cli import UsageError
    from base.stage import CONFIG_FILE, read_record

    path = out / CONFIG_FILE
    if not path.is_file():
        return
    saved = read_record(path)
    written_by = saved.get("stage")
    if written_by in (None, "score-captions") and str(saved.get("config_class", "")).endswith(".ScoreConfig"):
        return  # a scoring run's own (one from before its records named the stage has no stage)
    raise UsageError(f"--out {out}: holds the run records of {f'qcap {written_by}' if written_by else 'another run'} "
                     f"({CONFIG_FILE}); scoring would replace them; choose another --out")


def run_scoring(cfg) -> dict[str, Any]:
    """The ``qcap score-captions`` command body (``cfg``: config.ScoreConfig); the resolved
    config goes to ``config.json`` beside the scores."""
    from base.stage import write_run_records

    fields = [f.strip() for f in cfg.field.split(",") if f.strip()] if cfg.field else None
    out = cfg.out or default_out(cfg.captions)
    _refuse_others_records(Path(out))
    summary = score_file(cfg.world, cfg.captions, fields=fields, out=out, limit=cfg.limit,
                         num_workers=cfg.num_workers, ray_address=cfg.ray_address)
    write_run_records(out, cfg)  # config.json
    print(format_summary(summary))
    print(f"  wrote {out}/summary.json, {out}/per_caption.parquet and {out}/config.json")
    log.debug("summary: %s", json.dumps(summary["overall"]))
    return summary
