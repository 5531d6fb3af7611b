"""The filter base class and the runner every filter shares.

A filter *chooses* samples; it never rewrites images (DataComp's split between choosing and
resharding). datatrove's ``BaseFilter`` is the model: a filter writes one method,
``keep(record) -> bool | (bool, reason)``, and the base class does the rest — it reads the
shards' Parquets (every sample, failures included), counts
``total = kept + dropped[reason] + failed[status]``, writes the kept uids as a DataComp ``.npy``,
one decision row per sample (the rejects with their reason, for inspection), a report and
histograms (:mod:`curate.filters.report`).

Filters that need the whole pool before they can decide (a top-30% score cut, duplicate groups)
do their global work in :meth:`BaseFilter.prepare` and attach per-shard measurements in
:meth:`BaseFilter.annotate`; ``keep`` stays a per-record lookup.

Which samples a filter sees: every row of every shard's Parquet. Rows whose ``status`` is not
``success`` are counted as ``failed[status]`` (there is no image to train on); a success whose
uid is missing or not DataComp's 32 hex is ``dropped[bad_uid]`` (it could not go into a uid
file); with ``--subset``, successes outside the subset are ``dropped[outside_subset]``; the rest
are *candidates* and go through ``keep``.

Rows, not uids: a uid can be in a folder twice (two overlapping downloads of one pool row), so
every decision, score and duplicate group is per *row* — (shard, position in its Parquet) —
and the uid file lists a uid when at least one of its rows is kept. A filter that finds a row
unusable (no image, undecodable bytes, a broken member) drops it with its own reason and puts
the detail in ``record.error`` (decisions' ``error_message``); the run goes on.

Outputs of ``run_filter(filter, cfg)`` for ``cfg.out = DIR/NAME.npy``: ``DIR/NAME.npy`` (written
last: its presence means the run finished), ``DIR/NAME.report/{report.json, config.json,
decisions.parquet, hist_*.png, preview.html}``.
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from base.shards import (
    ShardError,
    expand_shards,
    is_uid,
    load_uids,
    read_table,
    save_uids,
    shard_columns,
    uid_membership,
)
from base.stage import CONFIG_FILE, write_run_records
from curate.filters.config import FilterConfig
from curate.filters.members import SampleProblem, check_caption, shard_labels
from curate.filters.report import Histogram, linear_edges, log_edges, plot_histogram, write_preview

log = logging.getLogger(__name__)

Keep = bool | tuple[bool, str]
REPORT_SUFFIX = ".report"
DECISIONS_FILE = "decisions.parquet"
REPORT_FILE = "report.json"
PREVIEW_FILE = "preview.html"
OUTSIDE_SUBSET = "outside_subset"
BAD_UID = "bad_uid"
# Measurements the runner takes of every candidate (decisions.parquet columns, histograms).
COMMON_VALUES: dict[str, str] = {
    "caption_words": "int32", "caption_chars": "int32", "image_min_side": "int32", "aspect_ratio": "float32",
}


@dataclass(slots=True)
class FilterRecord:
    """One candidate sample as a filter sees it (from the shard's Parquet row)."""

    uid: str  # DataComp's 32-hex uid
    key: str  # sample key within its shard
    shard: str  # path of the shard's tar
    text: str | None  # the caption (pool 'text', else img2dataset's 'caption')
    width: int | None  # original image width (pool 'original_width'), None when unknown
    height: int | None  # original image height
    values: dict[str, Any] = field(default_factory=dict)  # measurements: written to decisions, histogrammed
    failed: list[str] = field(default_factory=list)  # every reason it fails (filters may fill it; else the first)
    row: int = 0  # position in its shard's Parquet: with the shard, the row's identity (uids can repeat)
    caption_problem: SampleProblem | None = None  # the Parquet caption is missing, blank or broken (text is then "")
    error: str | None = None  # why the filter could not use it (decisions' error_message), when it could not


@dataclass(slots=True)
class FilterCounts:
    """``total = kept + sum(dropped) + sum(failed)``, checked before anything is written."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> samples the filter rejected
    failed: Counter = field(default_factory=Counter)  # download status -> samples without an image

    def reconciles(self) -> bool:
        return self.total == self.kept + sum(self.dropped.values()) + sum(self.failed.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total, "kept": self.kept, "dropped": dict(self.dropped.most_common()),
            "failed": dict(self.failed.most_common()), "num_dropped": sum(self.dropped.values()),
            "num_failed": sum(self.failed.values()), "num_candidates": self.total - sum(self.failed.values()),
        }


class BaseFilter(abc.ABC):
    """Subclass, set ``name``, write ``keep``; override the hooks a global filter needs."""

    name: ClassVar[str] = "filter"
    # Extra measurement columns of decisions.parquet: name -> pyarrow type name.
    value_types: ClassVar[dict[str, str]] = {}
    # True: a shard's decisions need nothing of the other shards (no global ``prepare``), so its
    # shards may be decided in other processes or on other nodes (``--num-workers``, ``--ray-address``)
    shard_parallel: ClassVar[bool] = False
    # Counter attributes that ``annotate``/``keep`` add to (for ``summary``): summed over the shards
    state_counters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg

    def prepare(self, shards: Sequence[str], subset: np.ndarray | None) -> None:
        """Global work before any decision (score everything, find duplicate groups)."""
        return None  # a per-record filter has no global work

    def annotate(self, shard: str, records: list[FilterRecord]) -> None:
        """Attach this shard's measurements to its candidates (``record.values``)."""
        return None  # a filter that measures nothing beyond the common values

    def output_paths(self) -> list[Path]:
        """Files or folders the filter writes besides the uid file and report (checked up front)."""
        return []

    def read_rows(self, tar: str) -> ShardRows:
        """The shard's Parquet rows this filter decides on; override to name the caption and size
        columns, or to require them (a missing required column is a ShardError)."""
        return read_shard_rows(tar)

    @abc.abstractmethod
    def keep(self, record: FilterRecord) -> Keep:
        """True to keep ``record``; ``(False, reason)`` to drop it (a bare False drops it as ``name``)."""

    def histograms(self) -> list[Histogram]:
        """Histograms of this filter's measurements, cut-offs marked (called after prepare)."""
        return []

    def summary(self) -> dict[str, Any]:
        """Settings and facts for the report (thresholds, how many each check alone fails, ...)."""
        return {}


def report_dir_of(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + REPORT_SUFFIX)


def default_histograms() -> list[Histogram]:
    return [
        Histogram("caption_words", "caption length (words)", linear_edges(0, 40, 40)),
        Histogram("image_min_side", "image shorter side (px)", log_edges(16, 4096, 48), log_x=True),
    ]


# --------------------------------------------------------------------------------------------
# Reading shards


def resolve_text_column(names: Sequence[str], wanted: str | None, where: str) -> str | None:
    """The caption column: ``wanted``, else the pool's ``text``, else img2dataset's ``caption``."""
    if wanted is not None:
        if wanted not in names:
            raise ShardError(f"{where}: no column {wanted!r} (--text-column); has {sorted(names)}")
        return wanted
    for name in ("text", "caption"):
        if name in names:
            return name
    return None


@dataclass(slots=True)
class ShardRows:
    """A shard's Parquet rows, as plain columns."""

    tar: str
    keys: list[str]
    uids: list[str | None]
    statuses: list[str]
    texts: list[str | None]
    widths: list[int | None]
    heights: list[int | None]
    error_messages: list[str | None] = field(default_factory=list)  # the shard's own, for failed downloads
    label: str = ""  # the shard's name in decisions and score files (see members.shard_labels)


def read_shard_rows(
    tar: str, *, text_column: str | None = None, width_column: str = "original_width",
    height_column: str = "original_height", need_text: bool = False, need_size: bool = False,
) -> ShardRows:
    """Read the columns a filter uses from a shard's Parquet; a required one missing is a ShardError."""
    names = shard_columns(tar)
    where = f"{tar[:-4]}.parquet"
    for column in ("key", "uid", "status"):
        if column not in names:
            raise ShardError(f"{where}: missing column {column!r}; is this an img2dataset/qcap shard folder?")
    text = resolve_text_column(names, text_column, where)
    if need_text and text is None:
        raise ShardError(f"{where}: no caption column ('text' or 'caption'); name one with --text-column")
    has_size = width_column in names and height_column in names
    if need_size and not has_size:
        raise ShardError(
            f"{where}: missing {width_column!r}/{height_column!r} (the pool's image size); "
            "name other columns with --width-column/--height-column"
        )
    has_errors = "error_message" in names
    columns = ["key", "uid", "status"] + ([text] if text else []) + ([width_column, height_column] if has_size else [])
    table = read_table(tar, columns=columns + (["error_message"] if has_errors else []))
    n = table.num_rows
    return ShardRows(
        tar=tar,
        keys=[str(k) for k in table.column("key").to_pylist()],
        uids=table.column("uid").to_pylist(),
        statuses=[str(s) for s in table.column("status").to_pylist()],
        texts=table.column(text).to_pylist() if text else [None] * n,
        widths=_ints(table.column(width_column).to_pylist()) if has_size else [None] * n,
        heights=_ints(table.column(height_column).to_pylist()) if has_size else [None] * n,
        error_messages=[None if e is None else str(e) for e in table.column("error_message").to_pylist()]
        if has_errors else [None] * n,
        label=os.path.basename(tar),
    )


def _ints(values: list) -> list[int | None]:
    out = []
    for v in values:
        try:
            out.append(None if v is None or (isinstance(v, float) and np.isnan(v)) else int(v))
        except (TypeError, ValueError, OverflowError):  # a text, an infinity: no size
            out.append(None)
    return out


def candidate_mask(rows: ShardRows, subset: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(usable, in-subset) masks of a shard's rows: usable = downloaded with a valid uid (a success
    without one is the row's ``bad_uid``, see :func:`uid_problem`); in-subset is True without a subset."""
    success = np.array([s == "success" for s in rows.statuses], dtype=bool)
    valid = np.array([is_uid(u) for u in rows.uids], dtype=bool)
    usable = success & valid
    inside = np.ones(len(rows.keys), dtype=bool)
    if subset is not None and usable.any():
        chosen = np.flatnonzero(usable)
        inside[chosen] = uid_membership([rows.uids[i] for i in chosen], subset)
    return usable, inside


def uid_problem(uid: Any) -> str:
    if uid is None:
        return "the row succeeded but has no uid"
    return f"uid {str(uid)[:80]!r} is not DataComp's uid (32 lowercase hex characters)"


def check_outputs(paths: Sequence[Path]) -> None:
    """Refuse, before any work, output paths that cannot be written: a folder where a file goes,
    a file where a folder goes, a parent that is a file. Creates missing parent folders."""
    from base.cli import UsageError

    for path in paths:
        path = Path(path)
        for parent in reversed(path.parents):
            if parent.exists() and not parent.is_dir():
                raise UsageError(f"{path}: cannot write here, {parent} is a file, not a folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"{path}: cannot create its folder ({err.strerror or err})") from err
        if not os.access(path.parent, os.W_OK):
            raise UsageError(f"{path}: its folder {path.parent} is not writable")


def check_file_output(path: Path) -> None:
    from base.cli import UsageError

    if Path(path).is_dir():
        raise UsageError(f"--out {path}: is a folder; name the uid file to write (e.g. {Path(path) / 'uids.npy'})")


def check_dir_output(path: Path) -> None:
    from base.cli import UsageError

    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{path}: exists and is a file, but the filter writes a folder there; move it or choose "
                         "another --out")


def load_subset(path: Path) -> np.ndarray:
    """``--subset``: a DataComp uid file; anything else is one clear line (base.shards.load_uids
    lets an empty file's EOFError through, and a .npz is no uid file)."""
    from base.cli import UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--subset {path}: {'is a folder' if path.is_dir() else 'no such file'}, not a uid file (.npy)")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if not magic:
        raise UsageError(f"--subset {path}: the file is empty, not a DataComp uid file (.npy)")
    if magic != b"\x93NUMPY":
        raise UsageError(f"--subset {path}: not a .npy file (a DataComp uid file starts with numpy's header)")
    try:
        return load_uids(path)
    except EOFError as err:
        raise UsageError(f"--subset {path}: truncated .npy ({err})") from err


def common_values(text: str | None, width: int | None, height: int | None) -> dict[str, Any]:
    text = text or ""
    values: dict[str, Any] = {"caption_words": len(text.split()), "caption_chars": len(text)}
    if width is not None and height is not None and width > 0 and height > 0:
        values["image_min_side"] = min(width, height)
        values["aspect_ratio"] = max(width, height) / min(width, height)
    else:
        values["image_min_side"] = None
        values["aspect_ratio"] = None
    return values


# --------------------------------------------------------------------------------------------
# The runner


def run_filter(filt: BaseFilter, cfg: FilterConfig) -> dict[str, Any]:
    """Run ``filt`` over ``cfg.shards``; write the uid file, decisions, report and histograms.

    Returns the report (also in ``OUT.report/report.json``). The uid file is written last.
    """
    from tqdm import tqdm

    started = time.time()
    report_dir = report_dir_of(cfg.out)
    check_file_output(cfg.out)
    check_dir_output(report_dir)
    check_outputs([cfg.out, report_dir / CONFIG_FILE, *filt.output_paths()])
    tars = expand_shards(cfg.shards)
    labels = shard_labels(tars)
    subset = load_subset(cfg.subset) if cfg.subset is not None else None
    report_dir.mkdir(parents=True, exist_ok=True)
    write_run_records(report_dir, cfg, filter=filt.name, shards=tars)

    filt.prepare(tars, subset)
    histograms = {h.name: h for h in filt.histograms()}
    for hist in default_histograms():
        histograms.setdefault(hist.name, hist)

    counts = FilterCounts()
    kept_uids: list[str] = []
    writer = DecisionWriter(report_dir / DECISIONS_FILE, {**COMMON_VALUES, **filt.value_types})
    num_workers, ray_address = getattr(cfg, "num_workers", 1), getattr(cfg, "ray_address", None)
    remote = filt.shard_parallel and (num_workers > 1 or ray_address is not None)
    bar = tqdm(total=len(tars), desc=f"filter {filt.name}", unit="shard", disable=not cfg.progress)
    try:
        if remote:  # each shard decided by a task of its own (a fresh filter there); merged here in shard order
            from base.workers import Workers, in_order

            tasks = [FilterShardTask(index=i, filter_class=type(filt), cfg=cfg, tar=tar, label=labels[tar],
                                     subset=str(cfg.subset) if cfg.subset is not None else None)
                     for i, tar in enumerate(tars)]
            with Workers(num_workers, ray_address=ray_address) as workers:
                for result in in_order(workers.imap(decide_shard_task, tasks), lambda r: r.index):
                    _merge(result, filt, counts, kept_uids, histograms, writer, state=True)
                    bar.update(1)
        else:  # this process, with the filter that did the global work
            for i, tar in enumerate(tars):
                rows = filt.read_rows(tar)
                rows.label = labels[tar]
                result = decide_shard(filt, rows, subset, histograms, i)
                _merge(result, filt, counts, kept_uids, histograms, writer, state=False)
                bar.update(1)
        bar.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if not counts.reconciles():  # a bug in the runner, never the data's fault
        raise RuntimeError(f"filter {filt.name}: counts do not reconcile: {counts.as_json()}")

    pictures = []
    if cfg.histograms:
        for hist in histograms.values():
            if hist.total:
                pictures.append(plot_histogram(hist, report_dir / f"hist_{hist.name}.png", filter_name=filt.name).name)
    if cfg.preview:
        write_preview(report_dir / PREVIEW_FILE, report_dir / DECISIONS_FILE, labels, filter_name=filt.name,
                      counts=counts.as_json(), pictures=pictures)
    num_unique = len(set(kept_uids))
    report = {
        "filter": filt.name,
        "shards": cfg.shards,
        "num_shards": len(tars),
        "subset": str(cfg.subset) if cfg.subset is not None else None,
        "counts": counts.as_json(),
        "reconciles": True,
        "kept_fraction_of_candidates": round(counts.kept / max(1, counts.total - sum(counts.failed.values())), 6),
        "num_uids": num_unique,
        "num_duplicate_uid_rows": counts.kept - num_unique,
        "settings": filt.summary(),
        "histograms": {name: hist.as_json() for name, hist in histograms.items()},
        "outputs": {
            "uids": str(cfg.out), "decisions": str(report_dir / DECISIONS_FILE), "config": str(report_dir / CONFIG_FILE),
            "pictures": [str(report_dir / p) for p in pictures],
            "preview": str(report_dir / PREVIEW_FILE) if cfg.preview else None,
        },
        "seconds": round(time.time() - started, 3),
    }
    write_run_records(report_dir, summary=report, summary_name=REPORT_FILE)
    save_uids(cfg.out, kept_uids)
    return report


@dataclass(frozen=True, slots=True)
class FilterShardTask:
    """One shard for a shard-parallel filter: decided by a fresh ``filter_class(cfg)``."""

    index: int
    filter_class: type
    cfg: FilterConfig
    tar: str
    label: str
    subset: str | None  # the --subset uid file, loaded once per process


@dataclass(slots=True)
class ShardDecisions:
    """What one shard's decisions add to the run: decision rows, counts, kept uids (row order),
    histogram counts, and the filter's counters (``state_counters``) as that shard moved them."""

    index: int
    decisions: list[dict[str, Any]]
    counts: FilterCounts
    kept_uids: list[str]
    histograms: dict[str, Histogram]
    state: dict[str, Counter] = field(default_factory=dict)


_SUBSETS: dict[str, np.ndarray] = {}


def decide_shard_task(task: FilterShardTask) -> ShardDecisions:
    """A Ray task or pool process: one shard's decisions."""
    filt = task.filter_class(task.cfg)
    subset = None
    if task.subset is not None:
        if task.subset not in _SUBSETS:
            _SUBSETS.clear()  # one subset per process at a time
            _SUBSETS[task.subset] = load_subset(Path(task.subset))
        subset = _SUBSETS[task.subset]
    histograms = {h.name: h for h in filt.histograms()}
    for hist in default_histograms():
        histograms.setdefault(hist.name, hist)
    rows = filt.read_rows(task.tar)
    rows.label = task.label
    result = decide_shard(filt, rows, subset, histograms, task.index)
    result.state = {name: getattr(filt, name) for name in filt.state_counters}
    return result


def _merge(result: ShardDecisions, filt: BaseFilter, counts: FilterCounts, kept_uids: list[str],
           histograms: dict[str, Histogram], writer: DecisionWriter, *, state: bool) -> None:
    counts.total += result.counts.total
    counts.kept += result.counts.kept
    counts.dropped.update(result.counts.dropped)
    counts.failed.update(result.counts.failed)
    kept_uids.extend(result.kept_uids)
    for name, hist in result.histograms.items():
        histograms[name].merge(hist)
    if state:
        for name, counter in result.state.items():
            getattr(filt, name).update(counter)
    writer.write(result.decisions)


def decide_shard(filt: BaseFilter, rows: ShardRows, subset: np.ndarray | None, templates: dict[str, Histogram],
                 index: int = 0) -> ShardDecisions:
    """One shard's decisions; the histograms' counts are this shard's alone (``templates`` give the bins)."""
    counts = FilterCounts()
    kept_uids: list[str] = []
    histograms = {name: hist.empty_like() for name, hist in templates.items()}
    usable, inside = candidate_mask(rows, subset)
    records: list[FilterRecord] = []
    decisions: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # the candidates' decision rows, in record order
    for i, key in enumerate(rows.keys):
        counts.total += 1
        uid = rows.uids[i]
        row = {"uid": uid if uid is None else str(uid), "shard": rows.label, "key": key, "status": rows.statuses[i],
               "kept": False, "reason": None, "error_message": None}
        decisions.append(row)
        if rows.statuses[i] != "success":
            counts.failed[rows.statuses[i]] += 1
            row["error_message"] = rows.error_messages[i] if rows.error_messages else None
            continue
        if not usable[i]:
            counts.dropped[BAD_UID] += 1
            row["reason"], row["error_message"] = BAD_UID, uid_problem(uid)
            continue
        if not inside[i]:
            counts.dropped[OUTSIDE_SUBSET] += 1
            row["reason"] = OUTSIDE_SUBSET
            continue
        text, problem = check_caption(rows.texts[i], f"{rows.label} {key}")
        record = FilterRecord(uid, key, rows.tar, text if problem is None else "", rows.widths[i], rows.heights[i],
                              row=i, caption_problem=problem)
        record.values.update(common_values(record.text, record.width, record.height))
        records.append(record)
        pending.append(row)
    filt.annotate(rows.tar, records)
    kept_flags: list[bool] = []
    for row, record in zip(pending, records, strict=True):
        ok, reason = _verdict(filt, record)
        row["kept"], row["reason"] = ok, None if ok else reason
        row["error_message"] = None if ok else record.error
        row.update(record.values)
        kept_flags.append(ok)
        if ok:
            counts.kept += 1
            kept_uids.append(record.uid)
        else:
            counts.dropped[reason] += 1
            if not record.failed:
                record.failed.append(reason)
    for name, hist in histograms.items():
        hist.add([r.values.get(name) for r in records], kept_flags, [r.failed for r in records])
    return ShardDecisions(index=index, decisions=decisions, counts=counts, kept_uids=kept_uids, histograms=histograms)


def _verdict(filt: BaseFilter, record: FilterRecord) -> tuple[bool, str]:
    verdict = filt.keep(record)
    if isinstance(verdict, tuple):
        ok, reason = verdict
        return bool(ok), str(reason) if not ok else ""
    return bool(verdict), "" if verdict else filt.name


class DecisionWriter:
    """Streams decision rows into one Parquet (temporary name, renamed on close)."""

    def __init__(self, path: Path, value_types: dict[str, str]) -> None:
        import pyarrow as pa

        self.path = path
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run
            stale.unlink()
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fields = [("uid", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("status", pa.string()),
                  ("kept", pa.bool_()), ("reason", pa.string()), ("error_message", pa.string())]
        fields += [(name, pa.type_for_alias(kind)) for name, kind in value_types.items()]
        self.schema = pa.schema(fields)
        self._writer = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self.tmp), self.schema)
        names = self.schema.names
        self._writer.write_table(pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=self.schema))

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            pq.write_table(pa.Table.from_pylist([], schema=self.schema), str(self.tmp))
        else:
            self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.tmp.exists():
            self.tmp.unlink()
