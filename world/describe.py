"""English about scenes: the true description, human-quality captions, and the shared lexicon.

The *true description* states every fact a dense task needs — each group of objects with its
count, size, colour, texture and grid position(s), which object is in front of which where
they overlap, and the background — in one fixed grammar, so the caption oracle
(:mod:`world.oracle`) reads it back exactly (it scores 1.0).

*Clean captions* are the MSCOCO stand-in: several per image, written the way careful
annotators write — varied word order and wording, synonyms, sometimes leaving out the
texture, the background or the sizes — but never wrong.

The lexicon at the end (class synonyms, colour, size, count, texture, position, relation and
background words) is the one vocabulary both the writers here and the oracle's parser use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from world.scenes import Scene

# --------------------------------------------------------------------------------------------
# Lexicon

PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "heart": "hearts",
    "cross": "crosses", "crescent": "crescents", "hexagon": "hexagons", "ring": "rings", "arrow": "arrows",
}
# Other words careful annotators use for a class (singular, plural).
CLASS_SYNONYMS: dict[str, list[tuple[str, str]]] = {
    "circle": [("disc", "discs"), ("disk", "disks")],
    "square": [("block", "blocks")],
    "cross": [("plus sign", "plus signs")],
    "crescent": [("crescent moon", "crescent moons"), ("moon", "moons")],
    "ring": [("donut", "donuts"), ("doughnut", "doughnuts"), ("hoop", "hoops")],
    "arrow": [("pointer", "pointers")],
    "heart": [("heart shape", "heart shapes")],
    "star": [("star shape", "star shapes")],
}
COLOUR_WORDS: dict[str, str] = {"grey": "grey", "gray": "grey"} | {
    c: c for c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
} | {"violet": "purple"}
SIZE_WORDS: dict[str, str] = {
    "small": "small", "little": "small", "tiny": "small",
    "medium": "medium", "medium-sized": "medium", "mid-sized": "medium", "midsize": "medium",
    "large": "large", "big": "large", "huge": "large",
}
COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "2": 2, "3": 3, "4": 4}
TEXTURE_WORDS: dict[str, str] = {
    "solid": "solid", "plain": "solid", "striped": "striped", "stripy": "striped", "dotted": "dotted",
    "spotted": "dotted", "polka-dot": "dotted", "checkered": "checkered", "chequered": "checkered",
    "checked": "checkered",
}
POSITION_WORDS: dict[str, str] = {
    "left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
    "centre": "centre", "center": "centre", "middle": "centre",
}
# Background kinds and the words that name them (checked in this order: "night sky" is night).
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "night": ("night", "starry"),
    "sky": ("sky",),
    "grass": ("grass", "grassy", "lawn"),
    "sand": ("sand", "sandy", "beach"),
    "wood": ("wood", "wooden", "timber", "plank", "planks"),
    "brick": ("brick", "bricks"),
    "studio": ("studio", "backdrop"),
}
# Nouns that are not objects: they end a noun phrase without making a mention.
SCENE_NOUNS = frozenset(
    {"background", "backdrop", "wall", "table", "floor", "surface", "picture", "image", "photo", "scene", "night", "sky",
     "grass", "lawn", "sand", "beach", "wood", "planks", "bricks", "studio", "corner", "side", "shape", "shapes"}
)

COUNT_TEXT = {1: "a", 2: "two", 3: "three", 4: "four"}
POSITION_PHRASE = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
BACKGROUND_PHRASE = {
    "sky": "on a sky background", "grass": "on a grass background", "sand": "on a sand background",
    "wood": "on a wood background", "brick": "on a brick background", "studio": "on a studio background",
    "night": "on a night background",
}


@dataclass(slots=True)
class Group:
    """Objects of one class and colour (they share size and texture by construction)."""

    cls: str
    colour: str
    size: str
    texture: str
    count: int
    positions: list[str]
    members: list[int]  # object indices, nearest first


def group_objects(
    objects: Sequence[tuple[str, str, str, str, str]], relations: Iterable[tuple[int, int]] = ()
) -> tuple[list[Group], list[tuple[int, int]]]:
    """Groups of objects given as ``(cls, colour, size, texture, position)``, nearest first, in
    the order of their nearest member; and the (front group, back group) pairs of the
    overlapping objects ``relations`` (object indices) that lie in different groups,
    deduplicated. The one grouping rule behind descriptions, captions and the oracle."""
    groups: list[Group] = []
    index: dict[tuple[str, str], int] = {}
    owner: list[int] = []  # object index -> group index
    for i, (cls, colour, size, texture, position) in enumerate(objects):
        k = index.setdefault((cls, colour), len(groups))
        if k == len(groups):
            groups.append(Group(cls, colour, size, texture, 0, [], []))
        g = groups[k]
        g.count += 1
        g.members.append(i)
        if position not in g.positions:
            g.positions.append(position)
        owner.append(k)
    pairs: list[tuple[int, int]] = []
    for a, b in relations:
        pair = (owner[a], owner[b])
        if pair[0] != pair[1] and pair not in pairs and (pair[1], pair[0]) not in pairs:
            pairs.append(pair)
    return groups, pairs


def scene_groups(scene: Scene) -> tuple[list[Group], list[tuple[int, int]]]:
    """:func:`group_objects` of a scene: its groups and their overlaps."""
    return group_objects([(o.cls, o.colour, o.size, o.texture, o.position) for o in scene.objects], scene.relations)


def groups_of(scene: Scene) -> list[Group]:
    """The scene's groups, in the order of their nearest member (front to back)."""
    return scene_groups(scene)[0]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(cls: str, count: int) -> str:
    return cls if count == 1 else PLURALS[cls]


def shape_caption(classes: Iterable[str]) -> str:
    """Only the shapes and their counts, nothing else (no colour, size, texture, position or background): "a square
    and two stars", classes in alphabetical order. The caption of ``qcap control-rung --kind shapes``."""
    counts = Counter(classes)
    return " and ".join(f"{article(cls) if n == 1 else COUNT_TEXT.get(n, str(n))} {_noun(cls, n)}"
                        for cls, n in sorted(counts.items()))


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _np(g: Group, *, size=True, colour=True, texture=True, count=True, noun: str | None = None) -> str:
    words = []
    if size:
        words.append(g.size)
    if colour:
        words.append(g.colour)
    if texture and g.texture != "solid":
        words.append(g.texture)
    words.append(noun or _noun(g.cls, g.count))
    if count:
        det = COUNT_TEXT[g.count] if g.count > 1 else article(words[0])
        return f"{det} {' '.join(words)}"
    return " ".join(words)


def _positions(g: Group) -> str:
    return _join([POSITION_PHRASE[p] for p in g.positions])


def describe(scene: Scene) -> str:
    """The true description: every group with all its attributes, the overlaps, the background."""
    groups, relations = scene_groups(scene)
    parts = [f"{_np(g)} {_positions(g)}" for g in groups]
    text = _join(parts)
    text = text[0].upper() + text[1:] + f", {BACKGROUND_PHRASE[scene.background]}."
    for a, b in relations:
        ga, gb = groups[a], groups[b]
        text += f" The {ga.colour} {ga.cls} is in front of the {gb.colour} {gb.cls}."
    return text


# --------------------------------------------------------------------------------------------
# Human-quality captions

_BG_HUMAN = {
    "sky": ["against a blue sky", "in front of a blue sky", "on a sky background"],
    "grass": ["on the grass", "on a grassy lawn", "on a grass background"],
    "sand": ["on the sand", "on a sandy beach", "on a sand background"],
    "wood": ["on a wooden table", "on wooden planks", "on a wood background"],
    "brick": ["in front of a brick wall", "against a brick wall", "on a brick background"],
    "studio": ["in a photo studio", "on a studio backdrop", "on a studio background"],
    "night": ["against the night sky", "on a starry night background", "at night"],
}


def _synonym(rng: np.random.Generator, cls: str, count: int) -> str:
    options = [(cls, PLURALS[cls])] + CLASS_SYNONYMS.get(cls, [])
    sing, plur = options[int(rng.integers(len(options)))] if rng.random() < 0.35 else options[0]
    return sing if count == 1 else plur


def clean_captions(scene: Scene, rng: np.random.Generator, num: int = 5) -> list[str]:
    """``num`` distinct, correct captions of varying detail (the MSCOCO stand-in).

    Each is written by one of several 'annotator styles'; all name every group's class and
    colour, most give counts and positions; sizes, textures, the background and the overlaps
    are mentioned by some styles and not others, as human annotators do.
    """
    groups, relations = scene_groups(scene)
    styles = [_style_full, _style_there_are, _style_positions, _style_short, _style_depth, _style_picture]
    order = list(rng.permutation(len(styles)))
    out: list[str] = []
    attempts = 0
    while len(out) < num and attempts < num * 6:
        style = styles[int(order[attempts % len(styles)])]
        attempts += 1
        text = style(scene, groups, relations, rng)
        text = text[0].upper() + text[1:]
        if text not in out:
            out.append(text)
    return out


def _shuffled(rng, groups: list[Group]) -> list[Group]:
    return [groups[int(i)] for i in rng.permutation(len(groups))]


def _bg(scene: Scene, rng) -> str:
    options = _BG_HUMAN[scene.background]
    return options[int(rng.integers(len(options)))]


def _style_full(scene, groups, relations, rng) -> str:
    parts = [
        f"{_np(g, texture=rng.random() < 0.7, noun=_synonym(rng, g.cls, g.count))} {_positions(g)}"
        for g in _shuffled(rng, groups)
    ]
    return f"{_join(parts)} {_bg(scene, rng)}."


def _style_there_are(scene, groups, relations, rng) -> str:
    ordered = _shuffled(rng, groups)
    parts = [_np(g, size=rng.random() < 0.6, texture=False, noun=_synonym(rng, g.cls, g.count)) for g in ordered]
    verb = "are" if ordered[0].count > 1 else "is"
    text = f"there {verb} {_join(parts)} {_bg(scene, rng)}."
    for a, b in relations[:2]:
        text += f" The {groups[a].colour} {groups[a].cls} is in front of the {groups[b].colour} {groups[b].cls}."
    return text


def _style_positions(scene, groups, relations, rng) -> str:
    clauses = []
    for g in _shuffled(rng, groups):
        noun = _synonym(rng, g.cls, g.count)
        if g.count == 1:
            clauses.append(f"{POSITION_PHRASE[g.positions[0]]} there is {_np(g, texture=False, noun=noun)}")
        else:
            clauses.append(f"{_np(g, texture=False, noun=noun)} sit {_positions(g)}")
    return "; ".join(clauses) + "."


def _style_short(scene, groups, relations, rng) -> str:
    parts = [_np(g, size=False, texture=False) for g in _shuffled(rng, groups)]
    return f"{_join(parts)} {_bg(scene, rng)}."


def _style_depth(scene, groups, relations, rng) -> str:
    if not relations:
        front = groups[0]
        rest = groups[1:]
        text = f"{_np(front, noun=_synonym(rng, front.cls, front.count))} {_positions(front)} is closest to the camera"
        if front.count > 1:
            text = text.replace(" is closest", " are closest")
        if rest:
            text += f", with {_join([f'{_np(g, texture=False)} {_positions(g)}' for g in rest])} further back"
        return text + "."
    a, b = relations[0]
    ga, gb = groups[a], groups[b]
    text = f"{_np(ga)} partly covers {_np(gb)}"
    others = [g for i, g in enumerate(groups) if i not in (a, b)]
    if others:
        text += f", next to {_join([_np(g, size=False, texture=False) for g in others])}"
    return f"{text} {_bg(scene, rng)}."


def _style_picture(scene, groups, relations, rng) -> str:
    lead = ["a picture of", "a photo of", "an image showing", "a drawing of"][int(rng.integers(4))]
    parts = [f"{_np(g, noun=_synonym(rng, g.cls, g.count))} {_positions(g)}" for g in _shuffled(rng, groups)]
    return f"{lead} {_join(parts)} {_bg(scene, rng)}."
