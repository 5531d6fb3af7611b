"""Caption sources of ``qcap build-dr``: where the synthetic captions come from.

A source lists its caption shards, indexes one shard for the uid join (uid, success, and a
locator to read the sample back: see :mod:`captioning.dr_join`), and reads one sample's
captions back by locator as a :class:`CaptionRecord`. Sources, picked from :data:`SOURCES`:

- ``qcap-webdataset`` (:class:`QcapShards`): ``qcap caption --format webdataset`` — caption-only
  tars (``syn.json``, ``qcap.json``) with Parquets that also list the images whose captioning
  failed; located by byte span (:func:`base.shards.iter_sample_spans`), read back with one seek;
- ``qcap-parquet`` (:class:`QcapSideTables`): ``qcap caption --format parquet`` — one side table
  per shard; located by row;
- ``apple`` (:class:`AppleShards`): Apple's released DataCompDR tars (:mod:`captioning.apple`),
  found recursively, without Parquet; located by byte span; their captions are flagged here
  (:func:`captioning.quality.caption_flags`) and their ``url.txt``, ``paug.json``, ``npz``
  carried along.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from base.multicaption import TAGS_PROVENANCE_MEMBER, tagged_captions
from base.shards import ShardError, expand_shards, iter_sample_spans, read_sample_span, read_table
from captioning.apple import CARRIED, DOCUMENTED, ORIGIN, list_tars
from captioning.dr_join import caption_index_rows
from captioning.quality import caption_flags


@dataclass(slots=True)
class CaptionRecord:
    """One sample's synthetic captions as a caption source gives them."""

    uid: str
    syn_text: list[str]
    flags: list[list[str]]  # per caption
    scores: list[float | None]  # per caption
    provenance: dict[str, Any] | None  # qcap's KEY.qcap.json, as written by qcap caption (None: Apple)
    extras: dict[str, bytes]  # members carried into the DR sample (Apple: url.txt, paug.json, npz)
    sha256: str | None  # the caption side's sha256 of the image, if it has one
    status: str = "success"  # else the reader's status for a caption sample that cannot be read (bad_json, ...)
    error_message: str | None = None


class CaptionSource(ABC):
    """Lists caption shards, indexes one, and reads records back by locator ``(shard, a, b)``."""

    kind = "base"  # the registry name (SOURCES), recorded in the DR provenance and summary

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.shards = self.list_shards()

    @abstractmethod
    def list_shards(self) -> list[str]:
        """The caption shards, in a stable order (index ``n`` names one); none is a ShardError."""

    @abstractmethod
    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Shard ``n``'s index rows (:func:`captioning.dr_join.caption_index_rows`) and its counts
        (``rows``, ``status_counts``, ``missing_uid``)."""

    @abstractmethod
    def reader(self, open_files: int) -> CaptionReader:
        """A reader for one writer process (it may keep up to ``open_files`` shards open)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What made the captions (captioner, decoding, scorer), for build-dr's config.json and the card."""


class CaptionReader(ABC):
    """Reads one sample's captions back by the locator its source indexed."""

    @abstractmethod
    def read(self, shard: int, a: int, b: int, uid: str) -> CaptionRecord:
        """The record at locator ``(shard, a, b)``; a ShardError when its uid is not ``uid``."""

    def close(self) -> None:
        return None  # a reader that holds nothing open


def _info_from_provenance(provenance: dict[str, Any] | None, syn_text: list[str]) -> tuple[list[list[str]], list]:
    """Per-caption flags and scores from qcap's provenance; recomputed flags if it has none."""
    captions = (provenance or {}).get("captions")
    if isinstance(captions, list) and len(captions) == len(syn_text) and all(isinstance(c, dict) for c in captions):
        return [list(c.get("flags") or []) for c in captions], [c.get("score") for c in captions]
    return [caption_flags(t) for t in syn_text], [None] * len(syn_text)


def unreadable(uid: str, sample) -> CaptionRecord:
    """The record of a caption sample the reader could not read (its status and message kept)."""
    return CaptionRecord(uid=uid, syn_text=[], flags=[], scores=[], provenance=None, extras={}, sha256=None,
                         status=f"caption_{sample.status}", error_message=sample.error_message)


class _SpanReader(CaptionReader):
    """Reads caption samples by byte span, keeping up to ``open_files`` shards open (LRU)."""

    def __init__(self, source: CaptionSource, open_files: int) -> None:
        self.source = source
        self.open_files = open_files
        self.handles: OrderedDict[int, Any] = OrderedDict()

    def _handle(self, shard: int):
        import fsspec

        if shard in self.handles:
            self.handles.move_to_end(shard)
            return self.handles[shard]
        if len(self.handles) >= self.open_files:
            _, old = self.handles.popitem(last=False)
            old.close()
        handle = fsspec.open(self.source.shards[shard], "rb").open()
        self.handles[shard] = handle
        return handle

    def sample(self, shard: int, a: int, b: int, uid: str):
        path = self.source.shards[shard]
        sample = read_sample_span(path, a, b, handle=self._handle(shard))
        if sample.ok and sample.uid != uid:
            raise ShardError(f"{path}: the sample at byte {a} has uid {sample.uid}, the index says {uid}; "
                             "the caption shard changed since it was indexed (run with --overwrite)")
        return sample

    def close(self) -> None:
        while self.handles:
            self.handles.popitem()[1].close()


class _QcapSpanReader(_SpanReader):
    """qcap caption shards: flags and scores from each sample's provenance (``KEY.qcap.json``)."""

    def read(self, shard: int, a: int, b: int, uid: str) -> CaptionRecord:
        sample = self.sample(shard, a, b, uid)
        if not sample.ok:
            return unreadable(uid, sample)
        syn, provenance = sample.syn_text or [], sample.syn_provenance
        if not syn:  # qcap caption --tag: the captioner's one key in KEY.syn_tags.json
            syn, provenance = _tagged_only(sample)
        flags, scores = _info_from_provenance(provenance, syn)
        return CaptionRecord(uid=uid, syn_text=syn, flags=flags, scores=scores,
                             provenance=provenance, extras={}, sha256=sample.meta.get("sha256"))


def _tagged_only(sample) -> tuple[list[str], dict[str, Any] | None]:
    """The captions and provenance of a sample written by ``qcap caption --tag`` (no ``syn.json``,
    one ``syn_text_<tag>`` key): a source's captions, whichever key its captioner wrote them under."""
    tagged = tagged_captions(sample)
    if len(tagged) != 1:
        return [], None
    (key, captions), = tagged.items()
    provenance = None
    data = sample.extras.get(TAGS_PROVENANCE_MEMBER)
    if data:
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get(key), dict):
            provenance = value[key]
    return captions, provenance


class _AppleSpanReader(_SpanReader):
    """Apple's shards: captions flagged here (they carry none), Apple's own members carried along."""

    def read(self, shard: int, a: int, b: int, uid: str) -> CaptionRecord:
        sample = self.sample(shard, a, b, uid)
        if not sample.ok:
            return unreadable(uid, sample)
        syn = sample.syn_text or []
        extras = {ext: data for ext, data in sample.extras.items() if ext in CARRIED}
        return CaptionRecord(uid=uid, syn_text=syn, flags=[caption_flags(t) for t in syn], scores=[None] * len(syn),
                             provenance=None, extras=extras, sha256=sample.meta.get("sha256"))


class QcapShards(CaptionSource):
    """``qcap caption --format webdataset``: caption-only tars (``syn.json``, ``qcap.json``) with
    Parquets that also list the images that failed captioning."""

    kind = "qcap-webdataset"

    def list_shards(self) -> list[str]:
        return expand_shards(self.folder)

    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        path = self.shards[n]
        uids: list[str | None] = []
        ok: list[bool] = []
        a: list[int] = []
        b: list[int] = []
        for span in iter_sample_spans(path):
            uids.append(span.meta.get("uid"))
            ok.append(True)
            a.append(span.start)
            b.append(span.length)
        table = read_table(path, columns=["uid", "status"])
        statuses = Counter(table.column("status").to_pylist())
        failed = [u for u, s in zip(table.column("uid").to_pylist(), table.column("status").to_pylist(), strict=True)
                  if s != "success"]
        if statuses.get("success", 0) != len(uids):
            raise ShardError(f"{path}: the tar holds {len(uids)} samples, its Parquet lists {statuses.get('success', 0)} "
                             "successes; run 'qcap shards verify' on the caption folder")
        rows, bad = caption_index_rows(uids + failed, ok + [False] * len(failed), a + [0] * len(failed),
                                       b + [0] * len(failed), n)
        return rows, {"rows": len(uids) + len(failed), "status_counts": dict(statuses), "missing_uid": bad}

    def reader(self, open_files: int) -> CaptionReader:
        return _QcapSpanReader(self, open_files)

    def describe(self) -> dict[str, Any]:
        return describe_caption_folder(self.folder, self.kind)


class QcapSideTables(CaptionSource):
    """``qcap caption --format parquet``: one side table per shard (syn_text, flags, scores, qcap)."""

    kind = "qcap-parquet"

    def list_shards(self) -> list[str]:
        root = Path(self.folder)
        found = sorted(p for p in root.glob("*.parquet") if p.stem.isdigit())
        if not found:
            raise ShardError(f"{self.folder}: no caption shards (.tar or NNNNN.parquet side tables)")
        return [str(p) for p in found]

    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        table = read_table(self.shards[n], columns=["uid", "status"])
        uids = table.column("uid").to_pylist()
        statuses = table.column("status").to_pylist()
        rows, bad = caption_index_rows(uids, [s == "success" for s in statuses], list(range(len(uids))),
                                       [-1] * len(uids), n)
        return rows, {"rows": len(uids), "status_counts": dict(Counter(statuses)), "missing_uid": bad}

    def reader(self, open_files: int) -> CaptionReader:
        return _TableReader(self, open_files)

    def describe(self) -> dict[str, Any]:
        return describe_caption_folder(self.folder, self.kind)


class _TableReader(CaptionReader):
    """Side tables are read whole per caption shard and kept in a small LRU."""

    COLUMNS = ("uid", "status", "sha256", "syn_text", "syn_flags", "syn_scores", "qcap")

    def __init__(self, source: QcapSideTables, open_files: int) -> None:
        self.source = source
        self.cache: OrderedDict[int, dict[str, list]] = OrderedDict()
        self.size = max(1, open_files // 4)  # tables are held whole: keep fewer of them

    def read(self, shard: int, a: int, b: int, uid: str) -> CaptionRecord:
        if shard not in self.cache:
            if len(self.cache) >= self.size:
                self.cache.popitem(last=False)
            self.cache[shard] = read_table(self.source.shards[shard], columns=list(self.COLUMNS)).to_pydict()
        self.cache.move_to_end(shard)
        table = self.cache[shard]
        if a >= len(table["uid"]) or table["uid"][a] != uid:
            raise ShardError(f"{self.source.shards[shard]}: row {a} is not uid {uid}; the side table changed since "
                             "it was indexed (run with --overwrite)")
        syn = list(table["syn_text"][a] or [])
        provenance = json.loads(table["qcap"][a]) if table["qcap"][a] else None
        flags = table["syn_flags"][a]
        scores = table["syn_scores"][a]
        if flags is None or len(flags) != len(syn):
            flags, scores_from = _info_from_provenance(provenance, syn)
            scores = scores if scores is not None and len(scores) == len(syn) else scores_from
        if scores is None or len(scores) != len(syn):
            scores = [None] * len(syn)
        return CaptionRecord(uid=uid, syn_text=syn, flags=[list(f or []) for f in flags], scores=list(scores),
                             provenance=provenance, extras={}, sha256=table["sha256"][a])


class AppleShards(CaptionSource):
    """Apple's DataCompDR caption/embedding tars (see :mod:`captioning.apple`)."""

    kind = "apple"

    def list_shards(self) -> list[str]:
        return list_tars(self.folder)

    def index_shard(self, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        uids, a, b = [], [], []
        for span in iter_sample_spans(self.shards[n]):
            uids.append(span.meta.get("uid"))
            a.append(span.start)
            b.append(span.length)
        rows, bad = caption_index_rows(uids, [True] * len(uids), a, b, n)
        return rows, {"rows": len(uids), "status_counts": {"success": len(uids)}, "missing_uid": bad}

    def reader(self, open_files: int) -> CaptionReader:
        return _AppleSpanReader(self, open_files)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder), "origin": ORIGIN, **DOCUMENTED,
                "num_shards": len(self.shards)}


SOURCES: dict[str, type[CaptionSource]] = {
    QcapShards.kind: QcapShards,
    QcapSideTables.kind: QcapSideTables,
    AppleShards.kind: AppleShards,
}


def open_source(captions: str | None, apple_syn: str | None) -> CaptionSource:
    """The source of ``--apple-syn``, or of ``--captions`` (a folder of side tables, else tars)."""
    if apple_syn is not None:
        return SOURCES["apple"](apple_syn)
    folder = str(captions)
    root = Path(folder)
    if root.is_dir() and not any(root.glob("*.tar")) and any(root.glob("[0-9]*.parquet")):
        return SOURCES["qcap-parquet"](folder)
    try:
        return SOURCES["qcap-webdataset"](folder)
    except ShardError as err:
        raise ShardError(f"{folder}: not a qcap caption folder ({err}); pass Apple's shards with --apple-syn") from err


def describe_caption_folder(folder: str, kind: str) -> dict[str, Any]:
    """Captioner, decoding and scorer from the caption folder's run records (``config.json``,
    ``summary.json``; a folder captioned before those names: ``caption_config.json``,
    ``caption_summary.json``)."""
    from base.stage import run_record_path

    root = Path(folder)
    out: dict[str, Any] = {"kind": kind, "folder": str(folder)}
    for kind_of_record, key in (("config", "caption_config"), ("summary", "caption_summary")):
        path = run_record_path(root, kind_of_record, "caption")
        if path is not None:
            try:
                out[key] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                out[key] = f"{path}: not valid JSON"
    return out

