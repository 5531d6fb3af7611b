"""The filters' own tar reader: one sample's bad member is that sample's problem, never the run's.

``base.shards.iter_samples`` turns a shard into :class:`~base.shards.Sample` records and
raises on what breaks the shard contract (a ``KEY.json`` that is not JSON, two members of one
kind) — right for a stage that writes shards, wrong for a filter, which must give each row of a
hostile folder its own decision and go on. So the filters read members with
``base.shards.iter_members`` (which keeps the tar-level guards: unsafe paths, member size
bounds, truncated tars) and interpret each sample here, lazily and per member:

- ``image()``: the image bytes, or the reason there are none (``no_image``);
- ``caption(column)``: ``KEY.txt`` (strict UTF-8) or a ``KEY.json`` field: ``no_caption`` when it
  is missing, empty or blank, ``bad_caption`` when it is not UTF-8, not text or holds a NUL;
- ``meta()``: ``KEY.json`` as a dict (``{}`` without one), ``bad_member`` when it is not a JSON object.

A shard that cannot be read to its end (truncated, an unsafe member) gives every wanted key not
read yet the problem ``unreadable_shard`` with the tar's error, and a key the tar does not hold
at all gets ``no_image`` — so every row still gets a decision.

Also here: :func:`shard_labels`, the name each shard goes by in decisions, score files and hash
parts (its file name; a longer path only when two shards of a run share a file name, as two
overlapping download folders do).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from base.shards import IMAGE_EXTS, ShardError, iter_members

NO_IMAGE = "no_image"
NO_CAPTION = "no_caption"
BAD_CAPTION = "bad_caption"
BAD_MEMBER = "bad_member"
UNREADABLE_SHARD = "unreadable_shard"


class SampleProblem(Exception):
    """Why one sample cannot be used: ``reason`` (a decision reason) and a message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class TarSample:
    """The members of one key of a tar, interpreted on demand."""

    tar: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: SampleProblem | None = None  # a problem of the whole sample (unreadable shard, not in the tar)

    def _check(self) -> None:
        if self.problem is not None:
            raise self.problem

    def image(self) -> bytes:
        self._check()
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return self.members[ext]
        raise SampleProblem(NO_IMAGE, f"{self.key} has no image member (.{', .'.join(IMAGE_EXTS)})")

    def meta(self) -> dict[str, Any]:
        self._check()
        data = self.members.get("json")
        if data is None:
            return {}
        try:
            meta = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SampleProblem(BAD_MEMBER, f"{self.key}.json is not valid JSON ({err})") from err
        if not isinstance(meta, dict):
            raise SampleProblem(BAD_MEMBER, f"{self.key}.json is a JSON {type(meta).__name__}, not an object")
        return meta

    def caption(self, column: str | None = None) -> str:
        """The caption, checked: ``KEY.txt`` when ``column`` is None, else ``KEY.json[column]``."""
        self._check()
        if column is None:
            data = self.members.get("txt")
            if data is None:
                raise SampleProblem(NO_CAPTION, f"{self.key} has no .txt caption")
            where = f"{self.key}.txt"
            value: Any = data
        else:
            value = self.meta().get(column)
            where = f"{self.key}.json[{column!r}]"
        text, problem = check_caption(value, where)
        if problem is not None:
            raise problem
        return text


def check_caption(value: Any, where: str) -> tuple[str, SampleProblem | None]:
    """(text, None) for a usable caption; (``""``, the problem) for a missing, blank or broken one."""
    if value is None:
        return "", SampleProblem(NO_CAPTION, f"{where}: no caption")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            return "", SampleProblem(BAD_CAPTION, f"{where}: caption is not UTF-8 ({err})")
    if not isinstance(value, str):
        return "", SampleProblem(BAD_CAPTION, f"{where}: caption is a {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: no tokenizer or language model takes them
        return "", SampleProblem(BAD_CAPTION, f"{where}: caption is not valid Unicode ({err})")
    if "\x00" in value:
        return "", SampleProblem(BAD_CAPTION, f"{where}: caption holds a NUL character")
    if not value.strip():
        return "", SampleProblem(NO_CAPTION, f"{where}: caption is empty or blank")
    return value, None


def read_wanted(tar: str, keys: Iterable[str]) -> Iterator[TarSample]:
    """Each of ``keys`` once: the ones the tar holds in tar order (a key's first run of members),
    then the rest, each with its problem (``no_image``: not in the tar; ``unreadable_shard``:
    the tar broke before it)."""
    wanted = set(keys)
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, bytes] = {}
    clash: str | None = None
    broken: ShardError | None = None

    def finished() -> TarSample:
        seen.add(current)
        problem = SampleProblem(BAD_MEMBER, f"{current} has two .{clash} members") if clash else None
        return TarSample(tar, current, members, problem)

    try:
        for key, ext, data in iter_members(tar):
            if key != current:
                if current is not None and current in wanted and current not in seen:
                    yield finished()
                current, members, clash = key, {}, None
            if key not in wanted or key in seen:
                continue
            if ext in members:
                clash = ext
            members[ext] = data
        if current is not None and current in wanted and current not in seen:
            yield finished()
    except ShardError as err:
        broken = err
    for key in sorted(wanted - seen):
        if broken is not None:
            problem = SampleProblem(UNREADABLE_SHARD, f"the tar could not be read up to this sample: {broken}")
        else:
            problem = SampleProblem(NO_IMAGE, f"{os.path.basename(tar)} holds no sample {key!r} (its Parquet lists it)")
        yield TarSample(tar, key, {}, problem)


def shard_labels(tars: Sequence[str]) -> dict[str, str]:
    """tar -> the name it goes by: its file name, or, where two shards share one, its path from
    the shards' common folder (``raw-a/00000.tar``) — stable for the same shard list."""
    repeated = sorted(t for t, n in Counter(tars).items() if n > 1)
    if repeated:
        raise ShardError(f"the shard list names these shards more than once: {repeated[:5]}")
    names = [os.path.basename(t) for t in tars]
    if len(set(names)) == len(names):
        return dict(zip(tars, names, strict=True))
    try:
        common = os.path.commonpath([os.path.dirname(t) for t in tars])
    except ValueError:  # local and remote paths mixed
        common = ""
    return {tar: os.path.relpath(tar, common) if common else tar for tar in tars}


def label_stem(label: str) -> str:
    """A file-name stem for a shard's label (``raw-a/00000.tar`` -> ``raw-a__00000``)."""
    stem = label[:-4] if label.endswith(".tar") else label
    return stem.replace("://", "__").replace("/", "__")
