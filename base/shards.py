"""The one way qcap reads and writes data: webdataset shards in img2dataset's layout.

A shard folder holds, per shard ``{shard:05d}``:

- ``00000.tar``: one group of members per *successful* sample: ``KEY.jpg`` (or png/webp),
  ``KEY.txt`` (real caption), ``KEY.json`` (url, caption, key, status, sizes, sha256, uid, …),
  and optionally ``KEY.syn.json`` (``{"syn_text": [...]}``, Apple's DataCompDR layout),
  ``KEY.qcap.json`` (qcap's provenance for the synthetic captions), ``KEY.paug.json``,
  ``KEY.npz`` or any other member, kept as raw bytes;
- ``00000.parquet``: one row per sample, *failures included* (``status``, ``error_message``);
- ``00000_stats.json``: counts (img2dataset's keys: ``count``, ``successes``, …);
- ``00000.done``: our completion marker, written last;

and the folder holds ``sizes.json`` (tar file name → number of samples in it), which
open_clip's trainer reads too. A *Parquet-only* shard (a side table, :func:`write_parquet_shard`)
has the same files but the tar; :func:`read_shard_stats` and :func:`shard_columns` take a
shard's tar or Parquet path.

Writes are atomic: every file is written under a hidden temporary name and renamed when
complete, parquet and stats before the tar, the marker last. A visible tar is therefore always
whole, and a re-run skips shards whose marker exists (:func:`is_complete`).

The uid helpers at the end convert DataComp's 32-hex uids to and from its subset ``.npy``
files (structured dtype ``[('f0','<u8'),('f1','<u8')]``, sorted).

Usage::

    with ShardWriter(out_dir, shard_id=0) as writer:
        writer.write(Sample(key="000000000", uid=uid, image=jpeg, text="a cat"))
    finalize_folder(out_dir)                     # writes sizes.json
    for sample in iter_samples(expand_shards(f"{out_dir}/{{00000..00000}}.tar")):
        ...
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import uuid as uuid_lib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SHARD_DIGITS = 5
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Members we decode into typed fields; everything else is kept verbatim in Sample.extras.
_TYPED_EXTS = set(IMAGE_EXTS) | {"txt", "json", "syn.json", "qcap.json"}
# A member larger than this is refused: no legitimate sample member is this big, and a
# hostile tar must not make us allocate unbounded memory.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
SIZES_FILE = "sizes.json"
UID_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])
_UID_RE = re.compile(r"^[0-9a-f]{32}$")
_SHARD_NAME_RE = re.compile(r"^(\d+)\.tar$")
_SHARD_FILE_RE = re.compile(r"^(\d+)(?:\.tar|\.parquet|_stats\.json)$")
_TEMPORARY_RE = re.compile(r"^\.\d+[._].*\.tmp-[0-9a-f]{12}$")  # what _tmp_name gives a shard's files
# Parquet columns that every shard's table carries, in this order, before the pool columns.
BASE_COLUMNS = ("key", "uid", "status", "error_message")


class ShardError(Exception):
    """A shard, shard list or uid file that breaks the contract; the message names the file."""


@dataclass(slots=True)
class Sample:
    """One sample as it lives in a shard.

    The real caption (``text``) and the synthetic captions (``syn_text``) are kept apart, as in
    Apple's DataCompDR; qcap's own provenance for the synthetic captions lives in
    ``syn_provenance`` (member ``KEY.qcap.json``) so Apple's keys stay untouched.
    """

    key: str  # webdataset key, unique within the shard (img2dataset: shard id + index)
    uid: str | None = None  # DataComp's 32-hex uid; the join key between stages
    image: bytes | None = None  # encoded image bytes, never decoded by the shard layer; None in caption-only shards
    image_ext: str = "jpg"  # member extension of the image: jpg, png or webp
    text: str | None = None  # the real (web) caption, member KEY.txt
    syn_text: list[str] | None = None  # synthetic captions, member KEY.syn.json
    syn_provenance: dict[str, Any] | None = None  # qcap's provenance, member KEY.qcap.json
    # Apple's multi-captioner syn.json: its other ``syn_text*`` keys (``syn_text_dfn_mscoco38k``: [...]),
    # carried intact through read and write; read them with base.multicaption.tagged_captions
    syn_keys: dict[str, list[str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # KEY.json: url, sizes, sha256, pool columns
    extras: dict[str, bytes] = field(default_factory=dict)  # other members by extension (npz, paug.json)
    status: str = "success"  # "success" or a failure reason; failures go to Parquet only
    error_message: str | None = None  # what went wrong, for failures

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def parquet_row(self) -> dict[str, Any]:
        """The sample's row in the shard's Parquet: base columns, then every meta field."""
        row: dict[str, Any] = {
            "key": self.key,
            "uid": self.uid,
            "status": self.status,
            "error_message": self.error_message,
        }
        for name, value in self.meta.items():
            if name not in row:
                row[name] = value
        if "caption" not in row:
            row["caption"] = self.text
        return row

    def members(self) -> dict[str, bytes]:
        """The tar members of a successful sample, extension → bytes.

        A sample without image bytes is allowed: caption-only shards (the captioning stage's
        output, Apple's DataCompDR caption shards) carry text members alone.
        """
        members: dict[str, bytes] = {self.image_ext: self.image} if self.image is not None else {}
        if self.text is not None:
            members["txt"] = self.text.encode("utf-8")
        meta = dict(self.meta)
        meta.setdefault("key", self.key)
        if self.uid is not None:
            meta["uid"] = self.uid
        meta.setdefault("status", self.status)
        members["json"] = _dumps(meta)
        if self.syn_text is not None or self.syn_keys:
            syn: dict[str, Any] = {} if self.syn_text is None else {"syn_text": list(self.syn_text)}
            syn.update((k, list(v)) for k, v in sorted((self.syn_keys or {}).items()))
            members["syn.json"] = _dumps(syn)
        if self.syn_provenance is not None:
            members["qcap.json"] = _dumps(self.syn_provenance)
        for ext, data in self.extras.items():
            if ext in members:
                raise ShardError(f"sample {self.key!r}: extra member .{ext} clashes with a typed field")
            members[ext] = data
        return members


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=_json_default).encode("utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------
# Names, markers, atomic files


def shard_name(shard_id: int) -> str:
    if shard_id < 0:
        raise ValueError(f"shard_id must be >= 0, got {shard_id}")
    return f"{shard_id:0{SHARD_DIGITS}d}"


def shard_id_of(path: str) -> int:
    """The shard id of ``.../00042.tar`` (42); a ShardError for other names."""
    match = _SHARD_NAME_RE.match(os.path.basename(path))
    if match is None:
        raise ShardError(f"{path}: not a shard name (expected digits followed by .tar)")
    return int(match.group(1))


def sibling(tar_path: str, suffix: str) -> str:
    """``dir/00007.tar`` → ``dir/00007{suffix}`` (suffix ``.parquet``, ``_stats.json``, ``.done``)."""
    if not tar_path.endswith(".tar"):
        raise ShardError(f"{tar_path}: not a .tar path")
    return tar_path[: -len(".tar")] + suffix


def is_complete(folder: str | os.PathLike, shard_id: int) -> bool:
    """True when shard ``shard_id`` in ``folder`` was finished by a writer (marker present)."""
    fs, root = _fs(str(folder))
    return fs.exists(f"{root}/{shard_name(shard_id)}.done")


def completed_shards(folder: str | os.PathLike) -> set[int]:
    """Ids of the shards in ``folder`` whose completion marker exists."""
    fs, root = _fs(str(folder))
    if not fs.exists(root):
        return set()
    done = set()
    for path in fs.ls(root, detail=False):
        name = os.path.basename(path)
        if name.endswith(".done") and name[: -len(".done")].isdigit():
            done.add(int(name[: -len(".done")]))
    return done


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return f"{head}/.{tail}.tmp-{uuid_lib.uuid4().hex[:12]}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (local or fsspec URL; its folder is created) so that readers
    see either nothing or the whole file."""
    fs, target = _fs(str(path))
    _atomic_write(fs, target, data)


def _atomic_write(fs, target: str, data: bytes) -> None:
    """:func:`atomic_write_bytes` on a path already resolved against ``fs`` (no protocol)."""
    fs.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = _tmp_name(target)
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
        if _is_local(fs):
            handle.flush()
            os.fsync(handle.fileno())
    _commit(fs, tmp, target)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode() + b"\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def _commit(fs, tmp: str, target: str) -> None:
    if _is_local(fs):
        os.replace(tmp, target)
    else:  # object stores: a copy then delete; the object appears whole at the end of the copy
        fs.mv(tmp, target)


# --------------------------------------------------------------------------------------------
# Moving and removing whole shards (a stage that rewrites a shard in place stages it elsewhere)

# A shard's files besides its marker, in the order a writer or a move makes them visible.
SHARD_FILE_SUFFIXES = (".parquet", "_stats.json", ".tar")


def move_shard(source: str | os.PathLike, folder: str | os.PathLike, shard_id: int) -> None:
    """Move complete shard ``shard_id`` of folder ``source`` over the one in ``folder``.

    Journal-style, so a kill at any moment is finished by calling it again: ``folder``'s
    marker is removed first (the shard there is "in flux" from then on), the Parquet, stats and
    tar are renamed over its own, each whole (a reader sees the old tar or the new, never a
    part), ``folder``'s marker is written, and last the source's marker is removed. Both
    folders must be on one filesystem. Raises ShardError when ``source`` holds no complete
    shard ``shard_id`` (nothing staged, or already moved).
    """
    fs, root = _fs(str(folder))
    _, staged = _fs(str(source))
    name = shard_name(shard_id)
    if not fs.exists(f"{staged}/{name}.done"):
        raise ShardError(f"{staged}/{name}: no complete shard to move")
    if fs.exists(f"{root}/{name}.done"):
        fs.rm(f"{root}/{name}.done")
    for suffix in SHARD_FILE_SUFFIXES:
        if fs.exists(f"{staged}/{name}{suffix}"):  # absent: moved before a kill
            _commit(fs, f"{staged}/{name}{suffix}", f"{root}/{name}{suffix}")
    _atomic_write(fs, f"{root}/{name}.done", b"")
    fs.rm(f"{staged}/{name}.done")


def remove_shard(folder: str | os.PathLike, shard_id: int) -> None:
    """Remove shard ``shard_id``'s files from ``folder``, its marker first."""
    fs, root = _fs(str(folder))
    name = shard_name(shard_id)
    for suffix in (".done", *SHARD_FILE_SUFFIXES):
        if fs.exists(f"{root}/{name}{suffix}"):
            fs.rm(f"{root}/{name}{suffix}")


def remove_unfinished(folder: str | os.PathLike) -> list[str]:
    """Remove what killed writers left in ``folder``: files of shards without a marker, and
    shards' hidden temporaries; other files are left alone. Only safe while no writer works
    in ``folder``. Returns the names removed."""
    fs, root = _fs(str(folder))
    if not fs.exists(root):
        return []
    names = [os.path.basename(p) for p in fs.ls(root, detail=False)]
    done = {n[: -len(".done")] for n in names if n.endswith(".done")}
    removed = []
    for name in names:
        shard_file, temporary = _SHARD_FILE_RE.match(name), _TEMPORARY_RE.match(name)
        if temporary or (shard_file and shard_file.group(1) not in done):
            fs.rm(f"{root}/{name}")
            removed.append(name)
    return removed


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(slots=True)
class ShardStats:
    """What one shard holds; img2dataset's ``_stats.json`` keys plus our per-status counts."""

    shard: str
    count: int = 0  # samples seen (rows in the parquet)
    successes: int = 0  # samples in the tar
    status_counts: dict[str, int] = field(default_factory=dict)

    def add(self, status: str) -> None:
        """Count one sample of ``status`` ("success" or a failure reason)."""
        self.count += 1
        self.successes += int(status == "success")
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def as_json(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        failures = self.count - self.successes
        out = {
            "shard": self.shard,
            "count": self.count,
            "successes": self.successes,
            "failed": failures,
            # img2dataset's names, so its tools (and ours) read either kind of folder
            "failed_to_download": failures,
            "failed_to_resize": 0,
            "status_dict": dict(sorted(self.status_counts.items())),
        }
        if extra:
            out.update(extra)
        return out


def _check_key_and_uid(where: str, key: Any, uid: Any, seen: set[str]) -> None:
    """A sample key is non-empty, free of '.' and '/', unique in its shard; a uid is None or DataComp's."""
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ShardError(f"{where}: sample key {key!r} must be non-empty, without '.' or '/'")
    if key in seen:
        raise ShardError(f"{where}: duplicate sample key {key!r}")
    seen.add(key)
    if uid is not None:
        check_uid(uid)


def _remove_stale_temporaries(fs, root: str, name: str) -> None:
    """A writer killed mid-shard leaves hidden temporaries; the next writer of the shard
    removes them (a visible file is never touched)."""
    for path in fs.glob(f"{root}/.{name}[._]*.tmp-*"):
        fs.rm(path)


def _write_table_and_stats(fs, root: str, name: str, table, stats: dict[str, Any]) -> None:
    """A shard's Parquet, then its stats, each written whole under a temporary name and renamed."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    _atomic_write(fs, f"{root}/{name}.parquet", sink.getvalue())
    _atomic_write(fs, f"{root}/{name}_stats.json", _json_bytes(stats))


class ShardWriter:
    """Write one shard atomically. Use as a context manager; an exception aborts the shard.

    ``columns`` (optional) fixes the Parquet schema; without it the schema is inferred from
    the rows, with columns that are null everywhere typed as strings.
    """

    def __init__(self, folder: str | os.PathLike, shard_id: int, *, schema=None) -> None:
        self.fs, self.root = _fs(str(folder))
        self.fs.makedirs(self.root, exist_ok=True)
        self.shard_id = shard_id
        self.name = shard_name(shard_id)
        self.tar_path = f"{self.root}/{self.name}.tar"
        _remove_stale_temporaries(self.fs, self.root, self.name)
        self._tmp_tar = _tmp_name(self.tar_path)
        self._handle = self.fs.open(self._tmp_tar, "wb")
        self._tar = tarfile.open(fileobj=self._handle, mode="w|", format=tarfile.PAX_FORMAT)
        self._rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._schema = schema
        self.stats = ShardStats(shard=f"{self.name}.tar")
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: Sample) -> None:
        """Add a sample: a success goes to the tar and the Parquet, a failure to the Parquet."""
        if self._closed:
            raise ShardError(f"{self.tar_path}: write after close")
        _check_key_and_uid(self.tar_path, sample.key, sample.uid, self._keys)
        if sample.ok:
            for ext, data in sample.members().items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size = len(data)
                info.mtime = 0  # deterministic bytes: the same samples give the same tar
                info.mode = 0o444
                info.uname = info.gname = "qcap"
                self._tar.addfile(info, io.BytesIO(data))
        self.stats.add(sample.status)
        self._rows.append(sample.parquet_row())

    def write_all(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            self.write(sample)

    def close(self, extra_stats: dict[str, Any] | None = None) -> ShardStats:
        """Finish the shard: parquet, stats, tar (renamed into place), then the marker."""
        if self._closed:
            return self.stats
        self._tar.close()
        if _is_local(self.fs):
            self._handle.flush()
            os.fsync(self._handle.fileno())
        self._handle.close()
        _write_table_and_stats(self.fs, self.root, self.name, rows_to_table(self._rows, self._schema),
                               self.stats.as_json(extra_stats))
        _commit(self.fs, self._tmp_tar, self.tar_path)
        _atomic_write(self.fs, f"{self.root}/{self.name}.done", b"")
        self._closed = True
        return self.stats

    def abort(self) -> None:
        """Drop everything written so far; nothing becomes visible."""
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()
        finally:
            self._handle.close()
            if self.fs.exists(self._tmp_tar):
                self.fs.rm(self._tmp_tar)


def write_parquet_shard(folder: str | os.PathLike, shard_id: int, rows: Sequence[dict[str, Any]], *, schema=None,
                        extra_stats: dict[str, Any] | None = None) -> ShardStats:
    """Write a Parquet-only shard: one row per sample, failures included, and no tar (a side
    table, e.g. ``qcap caption --format parquet``).

    The same rules as :class:`ShardWriter`: every row has a ``key`` (unique, without '.' or
    '/'), a ``status`` and a DataComp ``uid`` or None; a killed writer's temporaries are removed
    first; the Parquet and ``_stats.json`` (``shard`` names the Parquet) each appear whole, and
    the ``.done`` marker last, so :func:`is_complete` and :func:`remove_unfinished` treat it like
    any shard. ``schema`` (optional) fixes the Parquet's schema (see :func:`rows_to_table`).
    Nothing is written when a row breaks the rules (ShardError).
    """
    fs, root = _fs(str(folder))
    name = shard_name(shard_id)
    where = f"{root}/{name}.parquet"
    stats = ShardStats(shard=f"{name}.parquet")
    keys: set[str] = set()
    for row in rows:
        _check_key_and_uid(where, row.get("key"), row.get("uid"), keys)
        status = row.get("status")
        if not isinstance(status, str) or not status:
            raise ShardError(f"{where}: sample {row.get('key')!r} has no status (\"success\" or a failure reason)")
        stats.add(status)
    fs.makedirs(root, exist_ok=True)
    _remove_stale_temporaries(fs, root, name)
    _write_table_and_stats(fs, root, name, rows_to_table(list(rows), schema), stats.as_json(extra_stats))
    _atomic_write(fs, f"{root}/{name}.done", b"")
    return stats


def rows_to_table(rows: list[dict[str, Any]], schema=None):
    """Rows → a pyarrow Table with the base columns first; all-null columns typed as string."""
    import pyarrow as pa

    if schema is not None:
        return pa.Table.from_pylist(rows, schema=schema)
    names: list[str] = list(BASE_COLUMNS)
    for row in rows:
        for name in row:
            if name not in names:
                names.append(name)
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across rows: keep them as JSON
            array = pa.array([None if v is None else json.dumps(v, default=_json_default) for v in values])
        if pa.types.is_null(array.type):
            array = array.cast(pa.string())
        columns[name] = array
    return pa.table(columns)


def finalize_folder(folder: str | os.PathLike, *, check: bool = False) -> dict[str, int]:
    """Write ``sizes.json`` (tar name → successes) for every whole shard in ``folder``.

    Reads each shard's ``_stats.json`` (ours or img2dataset's); a tar without stats is counted
    from its Parquet. With ``check``, each count is also checked against the shard's Parquet
    (its ``success`` rows): stats that disagree are a ShardError naming the shard, never a
    sizes.json that lies (``qcap shards finalize`` checks; a stage that has just written the
    shards need not). Returns the sizes written.
    """
    fs, root = _fs(str(folder))
    if not fs.isdir(root):
        raise ShardError(f"{folder}: not a shard folder")
    sizes: dict[str, int] = {}
    for tar in sorted(p for p in fs.ls(root, detail=False) if _SHARD_NAME_RE.match(os.path.basename(p))):
        path = fs.unstrip_protocol(tar) if not _is_local(fs) else tar
        size = shard_size(path)
        if check and size != (counted := parquet_successes(path)):
            raise ShardError(f"{path}: its _stats.json counts {size} successes, its Parquet {counted}; "
                             "re-run the stage that wrote it (qcap shards verify lists what else is wrong)")
        sizes[os.path.basename(tar)] = size
    _atomic_write(fs, f"{root}/{SIZES_FILE}", _json_bytes(sizes))
    return sizes


def parquet_successes(tar_or_parquet: str) -> int:
    """Rows with status ``success`` in a shard's Parquet."""
    table = read_table(tar_or_parquet, columns=["status"], require_uid=False)
    return int(sum(1 for s in table.column("status").to_pylist() if s == "success"))


def shard_size(tar_path: str) -> int:
    """Number of successful samples in a shard, from its stats or else its Parquet."""
    stats = read_shard_stats(tar_path, missing_ok=True)
    if stats is not None and "successes" in stats:
        value = stats["successes"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ShardError(f"{_shard_file(tar_path, '_stats.json')}: 'successes' is {value!r}, not a count")
        return value
    return parquet_successes(tar_path)


# --------------------------------------------------------------------------------------------
# Reading


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list from a brace pattern, glob, folder, ``::``-joined list, or a list of those.

    ``dir/{00000..00009}.tar`` (open_clip's and webdataset's syntax), ``dir/*.tar``, ``dir``
    (every shard in it, by id), ``a.tar::b.tar``. Local paths or fsspec URLs. Raises
    :class:`ShardError` when the spec matches nothing, or a braced name does not exist.
    """
    import braceexpand

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for item in specs:
        for part in str(item).split("::"):
            if not part:
                continue
            for expanded in braceexpand.braceexpand(part):
                out.extend(_expand_one(expanded, original=part))
    if not out:
        raise ShardError(f"shard list {spec!r} matches no shard (.tar) files")
    return out


def _expand_one(path: str, original: str) -> list[str]:
    fs, stripped = _fs(path)
    local = _is_local(fs)

    def name(p: str) -> str:
        return p if local else fs.unstrip_protocol(p)

    if any(ch in stripped for ch in "*?["):
        found = sorted(p for p in fs.glob(stripped) if p.endswith(".tar"))
        return [name(p) for p in found]
    if fs.isdir(stripped):
        tars = [p for p in fs.ls(stripped, detail=False) if _SHARD_NAME_RE.match(os.path.basename(p))]
        if not tars:
            raise ShardError(f"{path}: folder holds no shard .tar files (from {original!r})")
        return [name(p) for p in sorted(tars, key=lambda p: (shard_id_of(p), p))]
    if not fs.exists(stripped):
        raise ShardError(f"{path}: no such shard (from {original!r})")
    return [name(stripped)]


def shard_folder(spec: str | os.PathLike | Sequence[str]) -> str:
    """The single folder that a shard spec's shards live in (ShardError if several)."""
    folders = {os.path.dirname(p) for p in expand_shards(spec)}
    if len(folders) != 1:
        raise ShardError(f"shard list {spec!r} spans several folders: {sorted(folders)}")
    return folders.pop()


def read_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """``sizes.json`` of a folder; computed from the shards' stats when the file is missing."""
    fs, root = _fs(str(folder))
    path = f"{root}/{SIZES_FILE}"
    if fs.exists(path):
        with fs.open(path, "rb") as handle:
            try:
                sizes = json.load(handle)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ShardError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(sizes, dict):
            raise ShardError(f"{path}: expected an object of shard name -> count")
        bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise ShardError(f"{path}: counts must be whole numbers >= 0; {bad[0]!r} has {sizes[bad[0]]!r}")
        return {str(k): v for k, v in sizes.items()}
    tars = expand_shards(str(folder))
    return {os.path.basename(t): shard_size(t) for t in tars}


def num_samples(spec: str | os.PathLike | Sequence[str]) -> int:
    """Total successful samples in a shard list, from each folder's ``sizes.json``."""
    total = 0
    by_folder: dict[str, dict[str, int]] = {}
    for tar in expand_shards(spec):
        folder = os.path.dirname(tar)
        if folder not in by_folder:
            by_folder[folder] = read_sizes(folder)
        sizes = by_folder[folder]
        base = os.path.basename(tar)
        if base not in sizes:
            raise ShardError(f"{folder}/{SIZES_FILE} has no entry for {base}; re-run finalize on that folder")
        total += sizes[base]
    return total


# Statuses the readers give a sample they cannot read whole. Such a sample is yielded (never
# raised), with ``error_message`` saying what is wrong, no image and no extras, and whatever
# else could be read safely (``text``; ``meta`` and ``uid`` when KEY.json is a JSON object).
BAD_JSON = "bad_json"  # KEY.json / KEY.syn.json / KEY.qcap.json not valid JSON, or not the expected shape
BAD_MEMBER = "bad_member"  # a member that breaks the rules: unsafe path, over the size bound, two of one
# extension, an image under a key with a dot (webdataset splits 'a.b.jpg' into key 'a', extension 'b.jpg')
DUPLICATE_KEY = "duplicate_key"  # a key seen earlier in the same tar (the first sample keeps it)
TRUNCATED = "truncated"  # the tar ends (or turns unreadable) inside this sample
READ_STATUSES = (BAD_JSON, BAD_MEMBER, DUPLICATE_KEY, TRUNCATED)
_BLOCK = tarfile.BLOCKSIZE


def _member_name(tar_path: str, info: tarfile.TarInfo, max_member_bytes: int) -> tuple[str | None, str, str | None]:
    """``(key, extension, problem)`` of a tar member: nothing for anything to skip (links,
    devices, directories, names without a key: ``(None, "", None)``); ``problem`` (a message)
    for an absolute or ``..`` name or a member over ``max_member_bytes`` — its data is never read."""
    if not info.isfile():
        return None, "", None
    name = info.name
    key, ext = split_member_name(name)
    if key is None:
        return None, "", None
    if name.startswith("/") or ".." in name.split("/"):
        return key, ext, f"member {name!r} has an unsafe path"
    if info.size > max_member_bytes:
        return key, ext, f"member {name!r} is {info.size} bytes, over the {max_member_bytes} limit"
    return key, ext, None


def _end_problem(tar_path: str, handle, offset: int) -> str | None:
    """Where a tar's headers stopped (``offset``): None when the end-of-archive block is there,
    else what is wrong. tarfile ends silently at a truncated or garbled header; this does not."""
    try:
        handle.seek(offset)
        block = handle.read(_BLOCK)
    except (OSError, ValueError) as err:
        return f"{tar_path}: unreadable at byte {offset} ({err})"
    if block == b"\0" * _BLOCK:
        return None
    if not block:
        return f"{tar_path}: truncated at byte {offset} (no end-of-archive blocks); the samples after it are lost"
    return f"{tar_path}: unreadable data at byte {offset} (not a tar header: truncated or corrupt); the samples after it are lost"


def _shard_problem(tar_path: str, message: str, problems: list[str] | None) -> None:
    """A problem with a tar as a whole: recorded in ``problems``, or raised without a list."""
    if problems is None:
        raise ShardError(message)
    problems.append(message)


def _skipped_kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "a folder"
    if info.issym():
        return f"a symbolic link to {info.linkname!r}"
    if info.islnk():
        return f"a hard link to {info.linkname!r}"
    if not info.isfile():
        return "not a regular file"
    return "a name without a key (webdataset needs KEY.EXTENSION)"


def _tar_events(tar_path: str, max_member_bytes: int, problems: list[str] | None,
                skipped: list[str] | None = None) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    """``(key, extension, data, problem)`` for every regular member of a tar, in order; a member
    with a problem has no data. A cut inside a member ends it with problem ``truncated``; every
    tar-level problem (missing, unreadable, truncated) goes to :func:`_shard_problem`."""
    import fsspec

    try:
        fs, stripped = _fs(tar_path)
        total = _known_size(fs, stripped)
        with fsspec.open(tar_path, "rb") as handle:
            try:
                tar = tarfile.open(fileobj=handle, mode="r|*")
            except (tarfile.TarError, EOFError, OSError, ValueError) as err:
                size = _safe_size(handle)
                what = "an empty file" if size == 0 else f"not a readable tar ({err})"
                _shard_problem(tar_path, f"{tar_path}: {what}; no sample can be read", problems)
                return
            with tar:
                try:
                    for info in tar:
                        key, ext, problem = _member_name(tar_path, info, max_member_bytes)
                        if total is not None and info.isfile() and info.offset_data + info.size > total:
                            # A header claiming more bytes than the file holds: the stream reader would
                            # skip it by reading block after block past the end (hours for 10**12 bytes).
                            message = (f"{tar_path}: member {info.name!r} claims {info.size} bytes, past the end of "
                                       f"the {total}-byte tar; the samples after it are lost")
                            yield key, ext, None, f"{TRUNCATED}: {message}"
                            _shard_problem(tar_path, message, problems)
                            return
                        if key is None:
                            if skipped is not None:
                                skipped.append(f"{info.name!r}: {_skipped_kind(info)}")
                            continue
                        if problem is not None:
                            yield key, ext, None, problem
                            continue
                        try:
                            data = tar.extractfile(info).read()
                        except (tarfile.TarError, EOFError, OSError) as err:
                            yield key, ext, None, f"{TRUNCATED}: member {info.name!r} is cut short ({err})"
                            _shard_problem(tar_path, f"{tar_path}: truncated inside member {info.name!r}; "
                                                     "the samples after it are lost", problems)
                            return
                        yield key, ext, data, None
                except (tarfile.TarError, EOFError, OSError, ValueError) as err:
                    message = f"{tar_path}: unreadable after byte {tar.offset} ({err}); the samples after it are lost"
                    yield None, "", None, message  # the last sample may have lost members too
                    _shard_problem(tar_path, message, problems)
                    return
                if getattr(tar.fileobj, "comptype", "tar") == "tar":
                    end = _end_problem(tar_path, handle, tar.offset)
                    if end is not None:
                        yield None, "", None, end  # the last sample may have lost members too
                        _shard_problem(tar_path, end, problems)
    except FileNotFoundError:
        _shard_problem(tar_path, f"{tar_path}: no such shard", problems)
    except OSError as err:
        _shard_problem(tar_path, f"{tar_path}: unreadable ({err})", problems)


def _known_size(fs, path: str) -> int | None:
    """A file's size from its filesystem, without touching an open stream (None if unknown)."""
    try:
        size = fs.size(path)
    except (OSError, ValueError):
        return None
    return int(size) if size is not None else None


def _safe_size(handle) -> int | None:
    try:
        handle.seek(0, os.SEEK_END)
        return handle.tell()
    except (OSError, ValueError):
        return None


def iter_members(tar_path: str, *, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, str, bytes]]:
    """Stream ``(key, extension, bytes)`` for every regular file in a tar, in order.

    Nothing is extracted to disk. Links, devices and directories are skipped; an absolute or
    ``..`` name, a member over ``max_member_bytes``, or a tar that cannot be read to its end
    raises ShardError (this low-level reader is strict; :func:`iter_samples` is not)."""
    for key, ext, data, problem in _tar_events(tar_path, max_member_bytes, None):
        if key is None:
            continue  # the end problem that follows is raised
        if problem is not None:
            raise ShardError(f"{tar_path}: {problem}")
        yield key, ext, data


def split_member_name(name: str) -> tuple[str | None, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    head, base = os.path.split(name)
    if base.startswith(".") or "." not in base:
        return None, ""
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


class _Group:
    """The members of one sample as a reader collects them: the first of each extension kept,
    the first problem remembered (a later duplicate never overwrites an earlier member)."""

    __slots__ = ("key", "members", "flaw")

    def __init__(self, key: str) -> None:
        self.key = key
        self.members: dict[str, bytes] = {}
        self.flaw: tuple[str, str] | None = None

    def flag(self, status: str, message: str) -> None:
        if self.flaw is None:
            self.flaw = (status, message)

    def add(self, ext: str, data: bytes | None, problem: str | None) -> None:
        if problem is not None:
            status, _, text = problem.partition(": ") if problem.startswith(f"{TRUNCATED}: ") else (BAD_MEMBER, "", problem)
            self.flag(status, text)
        elif ext in self.members:
            self.flag(BAD_MEMBER, f"two .{ext} members (the first is kept)")
        else:
            self.members[ext] = data


def iter_samples(
    shards: str | Sequence[str],
    *,
    with_image: bool = True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    problems: list[str] | None = None,
    skipped: list[str] | None = None,
) -> Iterator[Sample]:
    """Every sample of one or more shards, in tar order, as :class:`Sample` records.

    Hostile *samples* never stop a shard: each is yielded with a status from
    :data:`READ_STATUSES` (``bad_json``, ``bad_member``, ``duplicate_key``, ``truncated``), an
    ``error_message``, no image and no extras, so the caller counts it (``sample.ok`` is False).
    Captions are read robustly: bytes that are not UTF-8 become U+FFFD and NUL characters are
    dropped. A sample whose ``KEY.json`` records another status keeps it (and its members).

    Problems of a *tar* (missing, not a tar, truncated or garbled part-way) keep every sample
    before the cut (a sample cut in two is yielded as ``truncated``), then: with a ``problems``
    list, one message naming the tar is appended and the next shard is read; without one, a
    ShardError is raised. Samples the cut lost are found by comparing with the shard's Parquet
    (its ``success`` rows), which every stage that relies on them does.

    ``with_image=False`` skips the image bytes (cheaper when only captions matter).
    Members that are not sample files (folders, links, devices, names without a key) are
    skipped, never followed; ``skipped`` (a list) receives a line per such member.
    """
    paths = expand_shards(shards) if isinstance(shards, (str, os.PathLike)) else list(shards)
    for path in paths:
        path = str(path)
        seen: set[str] = set()
        group: _Group | None = None
        found: list[str] = []  # this tar's problems: raised (without a list) after its last sample
        for key, ext, data, problem in _tar_events(path, max_member_bytes, found, skipped):
            if key is None:  # the tar ends without its end-of-archive blocks, right after this group
                if group is not None:
                    group.flag(TRUNCATED, f"the tar ends after this sample's members ({problem}); it may lack some")
                continue
            if group is None or key != group.key:
                if group is not None:
                    yield _group_sample(path, group, with_image, seen)
                group = _Group(key)
            group.add(ext, data, problem)
        if group is not None:
            yield _group_sample(path, group, with_image, seen)
        for message in found:
            _shard_problem(path, message, problems)


def _group_sample(path: str, group: _Group, with_image: bool, seen: set[str]) -> Sample:
    if group.key in seen:
        group.flag(DUPLICATE_KEY, f"key {group.key!r} appears earlier in the tar (that sample keeps it)")
    seen.add(group.key)
    return _to_sample(path, group.key, group.members, with_image, group.flaw)


def _to_sample(path: str, key: str, members: dict[str, bytes], with_image: bool,
               flaw: tuple[str, str] | None = None) -> Sample:
    """A sample from its members; ``flaw`` ``(status, message)``: what the reader found wrong.
    Never raises: a member that does not parse gives the sample a status from READ_STATUSES."""
    problems: list[tuple[str, str]] = [flaw] if flaw else []
    meta: dict[str, Any] = {}
    if "json" in members:
        value, error = _parse_json(members["json"])
        if error is not None:
            problems.append((BAD_JSON, f"{key}.json is not valid JSON ({error})"))
        elif not isinstance(value, dict):
            problems.append((BAD_JSON, f"{key}.json is a JSON {type(value).__name__}, not an object"))
        else:
            meta = value
    uid = meta.get("uid")
    if uid is not None and not isinstance(uid, str):
        problems.append((BAD_JSON, f"{key}.json: uid {uid!r} is not a string"))
        uid = None
    syn_text = syn_keys = None
    if "syn.json" in members:
        value, error = _parse_json(members["syn.json"])
        others = ({k: v for k, v in value.items() if isinstance(k, str) and k.startswith("syn_text_")
                   and isinstance(v, list)} if error is None and isinstance(value, dict) else {})
        if error is not None:
            problems.append((BAD_JSON, f"{key}.syn.json is not valid JSON ({error})"))
        elif not isinstance(value, dict) or not (isinstance(value.get("syn_text"), list)
                                                 or ("syn_text" not in value and others)):
            problems.append((BAD_JSON, f"{key}.syn.json lacks the list 'syn_text'"))
        else:
            if "syn_text" in value:
                syn_text = [_clean_text(t) if isinstance(t, str) else str(t) for t in value["syn_text"]]
            # Apple's further captioners' keys (syn_text_<suffix>), kept as they are
            syn_keys = {k: [_clean_text(t) if isinstance(t, str) else str(t) for t in v]
                        for k, v in sorted(others.items())} or None
    provenance = None
    if "qcap.json" in members:
        value, error = _parse_json(members["qcap.json"])
        if error is not None:
            problems.append((BAD_JSON, f"{key}.qcap.json is not valid JSON ({error})"))
        elif not isinstance(value, dict):
            problems.append((BAD_JSON, f"{key}.qcap.json is a JSON {type(value).__name__}, not an object"))
        else:
            provenance = value
    text = _clean_text(members["txt"].decode("utf-8", errors="replace")) if "txt" in members else None
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    if image_ext is None:
        dotted = next((ext for ext in members if "." in ext and ext.rsplit(".", 1)[1] in IMAGE_EXTS), None)
        if dotted is not None:
            problems.append((BAD_MEMBER, f"image member {key}.{dotted}: its key has a dot, so webdataset reads key "
                                         f"{key!r} and extension {dotted!r} (no image)"))
    if problems:
        status, message = problems[0]
        return Sample(key=key, uid=uid, image=None, image_ext=image_ext or "jpg", text=text, syn_text=syn_text,
                      syn_provenance=provenance, syn_keys=syn_keys, meta=meta, status=status,
                      error_message=f"{path}: {message}")
    extras = {ext: data for ext, data in members.items() if ext not in _TYPED_EXTS}
    return Sample(
        key=key,
        uid=uid,
        image=members.get(image_ext) if (with_image and image_ext) else None,
        image_ext=image_ext or "jpg",
        text=text,
        syn_text=syn_text,
        syn_provenance=provenance,
        syn_keys=syn_keys,
        meta=meta,
        extras=extras,
        status=str(meta.get("status") or "success"),
        error_message=meta.get("error_message") if isinstance(meta.get("error_message"), str) else None,
    )


def _clean_text(text: str) -> str:
    return text.replace("\x00", "") if "\x00" in text else text


def _parse_json(data: bytes) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, why)`` for bytes that are not JSON (or not UTF-8)."""
    try:
        return json.loads(data), None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        return None, str(err)[:200]


# --------------------------------------------------------------------------------------------
# Byte spans: random access to one sample of a seekable tar (joins that are not co-sorted)


@dataclass(slots=True, frozen=True)
class SampleSpan:
    """Where one sample's members lie in a tar: bytes ``[start, start + length)`` hold their
    headers and data, so :func:`read_sample_span` can read the sample back alone.

    ``status`` is ``success`` or one of :data:`READ_STATUSES` (``meta`` is then ``{}`` when
    KEY.json was the problem), with ``error_message`` saying why."""

    key: str  # webdataset key
    meta: dict[str, Any]  # the parsed KEY.json ({} when the sample has none, or it is not a JSON object)
    start: int  # offset of the first member's header (its PAX header, if any)
    length: int  # bytes up to the end of the last member's padded data
    status: str = "success"
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "success"


def iter_sample_spans(tar_path: str, *, max_member_bytes: int = MAX_MEMBER_BYTES,
                      problems: list[str] | None = None) -> Iterator[SampleSpan]:
    """Every sample of a tar as a :class:`SampleSpan`, in order, reading only the headers and
    the ``KEY.json`` members: the other members' data is seeked over (a caption shard with
    teacher embeddings is indexed without reading them). A sample is a run of consecutive
    members with one key.

    As :func:`iter_samples`: a hostile sample is a span with a status (``bad_json`` for a
    KEY.json that is not a JSON object — the other JSON members are not read here, so their
    problems show when :func:`read_sample_span` reads the sample back — ``bad_member``, ``duplicate_key``, ``truncated`` for
    the sample the file ends in); a tar-level problem is appended to ``problems`` or, without
    that list, raised as ShardError after the spans before it."""
    import fsspec

    seen: set[str] = set()

    def finish(current: dict[str, Any], size: int | None) -> SampleSpan:
        status, message = current["flaw"] or (None, None)
        meta = current["meta"]
        if status is None and meta.get("uid") is not None and not isinstance(meta["uid"], str):
            status, message = BAD_JSON, f"{current['key']}.json: uid {meta['uid']!r} is not a string"
        exts = current["exts"]
        if status is None and not any(ext in exts for ext in IMAGE_EXTS):
            dotted = next((e for e in sorted(exts) if "." in e and e.rsplit(".", 1)[1] in IMAGE_EXTS), None)
            if dotted is not None:
                status, message = BAD_MEMBER, (f"image member {current['key']}.{dotted}: its key has a dot, so "
                                               f"webdataset reads key {current['key']!r} and extension {dotted!r}")
        if status is None and size is not None and current["end"] > size:
            status, message = TRUNCATED, f"the tar ends at byte {size}, inside this sample"
        if status is None and current["key"] in seen:
            status, message = DUPLICATE_KEY, f"key {current['key']!r} appears earlier in the tar"
        seen.add(current["key"])
        if status is None:
            return SampleSpan(current["key"], meta, current["start"], current["end"] - current["start"])
        return SampleSpan(current["key"], meta if status != BAD_JSON else {}, current["start"],
                          current["end"] - current["start"], status, f"{tar_path}: {message}")

    current: dict[str, Any] | None = None
    try:
        handle = fsspec.open(tar_path, "rb").open()
    except FileNotFoundError:
        _shard_problem(tar_path, f"{tar_path}: no such shard", problems)
        return
    except OSError as err:
        _shard_problem(tar_path, f"{tar_path}: unreadable ({err})", problems)
        return
    try:
        size = _safe_size(handle)
        handle.seek(0)
        try:
            tar = tarfile.open(fileobj=handle, mode="r:")
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            what = "an empty file" if size == 0 else f"not a readable tar ({err})"
            _shard_problem(tar_path, f"{tar_path}: {what}; no sample can be read", problems)
            return
        failure: str | None = None
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError, OSError, ValueError) as err:
                failure = f"{tar_path}: unreadable after byte {tar.offset} ({err}); the samples after it are lost"
                break
            if info is None:
                break
            tar.members.clear()  # TarFile keeps every header it read; an index pass needs none of them
            key, ext, problem = _member_name(tar_path, info, max_member_bytes)
            if key is None:
                continue
            end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
            if current is None or current["key"] != key:
                if current is not None:
                    yield finish(current, size)
                current = {"key": key, "meta": {}, "start": info.offset, "end": end, "flaw": None, "exts": set()}
            current["end"] = end
            if problem is not None:
                current["flaw"] = current["flaw"] or (BAD_MEMBER, problem)
                continue
            if ext in current["exts"]:
                current["flaw"] = current["flaw"] or (BAD_MEMBER, f"two .{ext} members")
                continue
            current["exts"].add(ext)
            if ext == "json":
                if size is not None and end > size:
                    continue  # cut short: finish() marks it truncated
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError) as err:
                    current["flaw"] = current["flaw"] or (TRUNCATED, f"member {info.name!r} is cut short ({err})")
                    continue
                value, error = _parse_json(data)
                if error is not None or not isinstance(value, dict):
                    why = error if error is not None else f"a JSON {type(value).__name__}, not an object"
                    current["flaw"] = current["flaw"] or (BAD_JSON, f"{key}.json: {why}")
                else:
                    current["meta"] = value
        if failure is None and current is not None and size is not None and current["end"] > size:
            failure = f"{tar_path}: truncated inside sample {current['key']!r}; the samples after it are lost"
        if failure is None:
            failure = _end_problem(tar_path, handle, tar.offset)
            if failure is not None and current is not None:  # the last sample may have lost members too
                current["flaw"] = current["flaw"] or (TRUNCATED, "the tar ends after this sample's members; "
                                                                 "it may lack some")
        if current is not None:
            yield finish(current, size)
        if failure is not None:
            _shard_problem(tar_path, failure, problems)
    finally:
        handle.close()


def read_sample_span(tar_path: str, start: int, length: int, *, handle=None,
                     max_member_bytes: int = MAX_MEMBER_BYTES) -> Sample:
    """The sample whose members lie in bytes ``[start, start + length)`` of a tar (a span from
    :func:`iter_sample_spans`). ``handle``: an open binary file of ``tar_path`` to reuse.

    Member-level problems (JSON that does not parse or is not an object, two members of one
    extension, unsafe or oversized members) give the Sample a status from READ_STATUSES, as
    :func:`iter_samples` does. A span that is not one sample of this tar (the tar changed since
    it was indexed) is a ShardError: that is a stale index, not a hostile sample."""
    import fsspec

    if length <= 0 or length > 8 * max_member_bytes:
        raise ShardError(f"{tar_path}: span of {length} bytes at {start} is not a sample span")
    try:
        if handle is None:
            with fsspec.open(tar_path, "rb") as own:
                own.seek(start)
                data = own.read(length)
        else:
            handle.seek(start)
            data = handle.read(length)
    except (OSError, ValueError) as err:
        raise ShardError(f"{tar_path}: cannot read {length} bytes at {start} ({err})") from err
    if len(data) != length:
        raise ShardError(f"{tar_path}: span at {start} runs past the end of the file; the shard changed since it was indexed")
    group: _Group | None = None
    stream = io.BytesIO(data + b"\0" * (2 * _BLOCK))  # end-of-archive blocks
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                member_key, ext, problem = _member_name(tar_path, info, max_member_bytes)
                if member_key is None:
                    continue
                if group is not None and member_key != group.key:
                    raise ShardError(f"{tar_path}: span at {start} holds two samples ({group.key!r}, {member_key!r})")
                group = group or _Group(member_key)
                group.add(ext, None if problem else tar.extractfile(info).read(), problem)
    except (tarfile.TarError, EOFError) as err:
        raise ShardError(f"{tar_path}: span at {start} is not a tar sample ({err}); the shard changed since it was indexed") from err
    if group is None:
        raise ShardError(f"{tar_path}: span at {start} holds no sample")
    return _to_sample(tar_path, group.key, group.members, True, group.flaw)


def _shard_file(tar_or_parquet: str | os.PathLike, suffix: str) -> str:
    """``dir/00007.tar`` or ``dir/00007.parquet`` → ``dir/00007{suffix}``."""
    path = str(tar_or_parquet)
    for own in (".tar", ".parquet"):
        if path.endswith(own):
            return path[: -len(own)] + suffix
    raise ShardError(f"{path}: not a shard's .tar or .parquet path")


def read_shard_stats(tar_or_parquet: str | os.PathLike, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """A shard's ``_stats.json`` (ours or img2dataset's: ``count``, ``successes``,
    ``status_dict``, and any keys the stage that wrote it added), as a dict.

    Accepts the tar's path or the Parquet's (a Parquet-only shard has no tar). A missing file is
    a ShardError, or None with ``missing_ok``; a file that is not a JSON object is a ShardError
    naming it.
    """
    path = _shard_file(tar_or_parquet, "_stats.json")
    fs, stripped = _fs(path)
    try:
        with fs.open(stripped, "rb") as handle:
            data = json.load(handle)
    except FileNotFoundError as err:
        if missing_ok:
            return None
        raise ShardError(f"{path}: missing (a finished shard has its stats; re-run the stage that wrote it)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from err
    except OSError as err:
        raise ShardError(f"{path}: unreadable ({err})") from err
    if not isinstance(data, dict):
        raise ShardError(f"{path}: expected a JSON object of counts, got {type(data).__name__}")
    return data


def _parquet_file(path: str):
    """``pyarrow.parquet.ParquetFile`` for a shard's Parquet, and whether to read it with threads.

    A local file is opened by path (pyarrow's own file I/O). Reading a *Python* file handle with
    pyarrow's thread pools (``read_schema(fh)``, ``seek(0)``, ``read_table(fh)``) aborted about one
    process in seven at interpreter exit ("terminate called without an active exception"): the
    pool's threads still held the Python file when the interpreter tore down. So a remote
    (fsspec) file is read through its handle on the calling thread only, without pre-buffering.
    The caller closes the returned file (``ParquetFile`` is a context manager).
    """
    import pyarrow.parquet as pq

    fs, stripped = _fs(path)
    if not fs.exists(stripped):
        raise ShardError(f"{path}: missing (every shard needs its Parquet of all samples)")
    if _is_local(fs):
        return pq.ParquetFile(stripped), True
    return pq.ParquetFile(fs.open(stripped, "rb"), pre_buffer=False), False


def shard_columns(tar_or_parquet: str | os.PathLike) -> list[str]:
    """Column names of a shard's Parquet, from its footer alone (no rows are read).

    Accepts the tar's path or the Parquet's; ShardError when the file is missing or unreadable.
    """
    import pyarrow as pa

    path = _shard_file(tar_or_parquet, ".parquet")
    try:
        parquet, _ = _parquet_file(path)
        with parquet:
            return list(parquet.schema_arrow.names)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from err


def read_table(tar_or_parquet: str, columns: Sequence[str] | None = None, *, require_uid: bool = True):
    """The Parquet beside a shard (all samples, failures included) as a pyarrow Table.

    Accepts the tar's path or the Parquet's. Raises ShardError when the file is missing or
    unreadable, or lacks ``uid`` (unless ``require_uid=False``) or a requested column.
    """
    import pyarrow as pa

    path = sibling(tar_or_parquet, ".parquet") if tar_or_parquet.endswith(".tar") else tar_or_parquet
    try:
        parquet, threads = _parquet_file(path)
        with parquet:
            names = set(parquet.schema_arrow.names)
            wanted = None if columns is None else list(columns)
            if require_uid and "uid" not in names:
                raise ShardError(f"{path}: has no 'uid' column (DataComp's 32-hex uid is required)")
            if wanted is not None:
                missing = [c for c in wanted if c not in names]
                if missing:
                    raise ShardError(f"{path}: missing column(s) {missing}; has {sorted(names)}")
            return parquet.read(columns=wanted, use_threads=threads)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from err


def read_tables(shards: str | Sequence[str], columns: Sequence[str] | None = None):
    """The Parquets of every shard in a list, concatenated (schemas unified)."""
    import pyarrow as pa

    tables = [read_table(p, columns) for p in expand_shards(shards)]
    return pa.concat_tables(tables, promote_options="permissive")


def open_pool(path: str | os.PathLike, columns: Sequence[str] = ()):
    """A DataComp pool (a Parquet file or a folder of Parquets) as a ``pyarrow.dataset``,
    checked: it exists, reads as Parquet and has ``uid``, ``url``, ``text`` and ``columns``.

    A folder's pool is its ``*.parquet`` files (recursively; names starting with ``.`` or ``_``
    skipped, as pyarrow does); other files beside them (DataComp's ``.npz`` embeddings, a
    README) are not part of it. Every problem is a ShardError naming the file."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    text = str(path)
    try:
        filesystem, root = pafs.FileSystem.from_uri(text if "://" in text else os.path.abspath(text))
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ShardError(f"{path}: no such pool file or folder")
        if info.type == pafs.FileType.Directory:
            found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
            files = sorted(f.path for f in found if f.is_file and f.path.endswith(".parquet")
                           and not any(part.startswith((".", "_")) for part in os.path.relpath(f.path, root).split("/")))
            if not files:
                others = sorted(os.path.basename(f.path) for f in found if f.is_file)[:3]
                raise ShardError(f"{path}: holds no Parquet files" + (f" (only {others})" if others else ""))
        else:
            files = [root]
        dataset = ds.dataset(files, filesystem=filesystem, format="parquet")
        names = set(dataset.schema.names)
    except FileNotFoundError as err:
        raise ShardError(f"{path}: no such pool file or folder") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{path}: not a readable Parquet pool ({err})") from err
    missing = sorted({"uid", "url", "text", *columns} - names)
    if missing:
        raise ShardError(f"{path}: pool is missing column(s) {missing} (DataComp schema: uid, url, text, …)")
    return dataset


def read_pool(path: str | os.PathLike, columns: Sequence[str] | None = None):
    """A DataComp pool (file or folder of Parquets) as a Table; see :func:`open_pool`."""
    import pyarrow as pa

    dataset = open_pool(path, columns or ())
    try:
        return dataset.to_table(columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
        raise ShardError(f"{path}: not a readable Parquet pool ({err})") from err


# --------------------------------------------------------------------------------------------
# Images


def decode_image(data: bytes, *, max_pixels: int = 89_478_485, mode: str = "RGB", draft: int | None = None):
    """Decode image bytes with PIL, refusing pixel counts over ``max_pixels`` before decoding.

    The bound is checked on the header, so a decompression bomb costs nothing. Raises
    ValueError (with a reason) for undecodable data or a too-large image. ``draft`` (pixels)
    lets a JPEG decode at a reduced DCT scale that keeps both sides at least that long
    (PIL's draft mode; several times faster when training at a small resolution).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # PIL's own check at open: past twice its pixel limit
        raise ValueError(f"image exceeds the pixel bound ({err})") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"undecodable image ({err})") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"image of {width}x{height} pixels exceeds the {max_pixels}-pixel bound")
    if draft is not None and image.format == "JPEG":
        image.draft(mode, (draft, draft))
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise ValueError(f"undecodable image ({err})") from err
    return image.convert(mode) if mode and image.mode != mode else image


# --------------------------------------------------------------------------------------------
# uids and DataComp subset files


def is_uid(value: Any) -> bool:
    """True for DataComp's uid: a string of 32 lowercase hex characters."""
    return isinstance(value, str) and bool(_UID_RE.match(value))


def check_uid(uid: str) -> str:
    if not is_uid(uid):
        raise ShardError(f"uid {uid!r} is not 32 lowercase hex characters (DataComp's uid)")
    return uid


def uid_halves(uids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid mask, high 64 bits, low 64 bits) of ``uids``, for vectorised work on many uids.

    ``hi``/``lo`` hold the valid ones only, in order (``len(hi) == valid.sum()``); None or a
    malformed uid is marked invalid, never an error — callers decide what that means."""
    valid = np.array([is_uid(u) for u in uids], dtype=bool)
    good = [u for u, ok in zip(uids, valid, strict=True) if ok]
    hi = np.array([int(u[:16], 16) for u in good], dtype=np.uint64)
    lo = np.array([int(u[16:], 16) for u in good], dtype=np.uint64)
    return valid, hi, lo


def uids_to_array(uids: Iterable[str], *, sort: bool = True) -> np.ndarray:
    """32-hex uids → DataComp's structured array (f0 = high 64 bits): sorted and de-duplicated,
    or with ``sort=False`` in the given order, repeats kept. A malformed uid is a ShardError."""
    uids = list(uids)
    valid, hi, lo = uid_halves(uids)
    if not valid.all():
        check_uid(uids[int(np.flatnonzero(~valid)[0])])  # raises, naming the uid
    array = np.empty(len(uids), dtype=UID_DTYPE)
    array["f0"], array["f1"] = hi, lo
    return np.unique(array) if sort else array  # np.unique sorts structured arrays field by field, as DataComp sorts


def array_to_uids(array: np.ndarray) -> list[str]:
    """DataComp's structured uid array → 32-hex uids, in array order."""
    if array.dtype != UID_DTYPE:
        raise ShardError(f"uid array has dtype {array.dtype}, expected {UID_DTYPE}")
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(array["f0"], array["f1"], strict=True)]


def save_uids(path: str | os.PathLike, uids: Iterable[str] | np.ndarray) -> int:
    """Write a DataComp subset file (sorted ``u8,u8`` .npy), atomically; returns its length."""
    if isinstance(uids, np.ndarray) and uids.dtype == UID_DTYPE:
        array = np.unique(uids)
    else:
        array = uids_to_array(uids)
    sink = io.BytesIO()
    np.save(sink, array)
    atomic_write_bytes(path, sink.getvalue())
    return len(array)


def load_uids(path: str | os.PathLike) -> np.ndarray:
    """Read a DataComp subset file; checks dtype, shape and order, as DataComp's resharder does."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except IsADirectoryError as err:
        raise ShardError(f"{path}: is a folder, not a .npy uid file") from err
    except OSError as err:
        raise ShardError(f"{path}: not a readable .npy uid file ({err.strerror or err})") from err
    if not magic:
        raise ShardError(f"{path}: empty file, not a .npy uid file (an interrupted write?)")
    if magic != b"\x93NUMPY":
        raise ShardError(f"{path}: not a .npy file (no NumPy header); expected DataComp's uid file")
    try:
        array = np.load(str(path), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError, SyntaxError) as err:
        raise ShardError(f"{path}: not a readable .npy uid file ({err})") from err
    if array.dtype != UID_DTYPE:
        raise ShardError(f"{path}: dtype {array.dtype}, expected DataComp's {UID_DTYPE} (two uint64 halves)")
    if array.ndim != 1:
        raise ShardError(f"{path}: expected a 1-D array, got shape {array.shape}")
    if len(array) > 1 and not np.all(_uid_le(array[:-1], array[1:])):
        raise ShardError(f"{path}: uids are not sorted; DataComp's resharder needs a sorted file")
    return np.asarray(array)


def _uid_le(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a["f0"] < b["f0"]) | ((a["f0"] == b["f0"]) & (a["f1"] <= b["f1"]))


def uid_membership(uids: Sequence[str], subset: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``uids`` are in the sorted subset array (vectorised search)."""
    if len(uids) == 0:
        return np.zeros(0, dtype=bool)
    query = uids_to_array(uids, sort=False)
    if len(subset) == 0:
        return np.zeros(len(query), dtype=bool)
    index = np.searchsorted(subset, query)
    index = np.clip(index, 0, len(subset) - 1)
    return subset[index] == query


# What every shard-writing stage writes in its --out, so all its --overwrite removes besides the
# files it names: NNNNN.tar/.parquet/_stats.json/.done and the hidden temporaries ShardWriter and
# atomic_write_* leave behind when killed.
SHARD_FILE_RE = re.compile(r"^(?:\d+(?:\.tar|\.parquet|_stats\.json|\.done)|\.\d+[._].*\.tmp-[0-9a-f]{12})$")


def remove_own_files(out: str | os.PathLike, own_files: tuple[str, ...]) -> list[str]:
    """Remove what a shard-writing stage wrote in ``out``: its shards, their markers and
    temporaries, and the files named in ``own_files`` (with their temporaries). Only plain
    files at the top of ``out``; every other file and every folder is left. Markers go first, so
    a kill half-way leaves no shard that reads as complete. Returns the names removed."""
    from pathlib import Path

    out = Path(out)
    if not out.is_dir():
        return []
    removed = []
    for path in sorted(out.iterdir(), key=lambda p: (not p.name.endswith(".done"), p.name)):
        name = path.name
        own = SHARD_FILE_RE.match(name) or name in own_files or any(
            name.startswith(f".{own}.tmp-") for own in own_files)
        if own and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed
