"""The pool and its division into shards: read once, checked, fingerprinted, sliced on demand.

Shard ``s`` holds pool rows ``[s * samples_per_shard, (s + 1) * samples_per_shard)`` in file
order (files sorted by name, as img2dataset's reader sorts them). The plan is stored in
``RAW/config.json``; a later run (resume, ``--retry-failed``) must see the same pool — same
uids in the same order — and the same shard size, or it stops with an error.

Only the ``uid`` column is read up front (to check and fingerprint it); a shard's rows are
read from the Parquet row groups that cover it, so resuming the last shards of a large pool
does not re-read the whole pool.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from base.shards import ShardError, open_pool

# Columns qcap adds to every row; a pool that already has one of them would be overwritten.
ADDED_COLUMNS = (
    "key", "status", "error_message", "width", "height", "downloaded_width", "downloaded_height",
    "downloaded_sha256", "sha256_match", "download_attempts", "exif",
)
# Columns the driver adds to a shard's job table (dropped again from the pool columns).
JOB_COLUMNS = ("key", "download_attempts")
_UID_PATTERN = r"^[0-9a-f]{32}$"


@dataclass(slots=True)
class Plan:
    """What a RAW folder is made of: which pool, how many rows, how they are sharded."""

    pool: str  # the pool path as given
    files: list[str]  # its Parquet files, in shard order
    num_rows: int  # pool rows
    samples_per_shard: int  # rows per shard
    fingerprint: str  # sha256 over the uids in order
    pool_columns: list[str]  # every pool column, in order

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.samples_per_shard)

    def shard_rows(self, shard_id: int) -> int:
        start = shard_id * self.samples_per_shard
        return max(0, min(self.num_rows, start + self.samples_per_shard) - start)

    def key_digits(self) -> int:
        """Digits of a sample's index within a shard, as img2dataset computes them."""
        return len(str(self.samples_per_shard - 1)) if self.samples_per_shard > 1 else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**data)

    def same_pool(self, other: Plan) -> str | None:
        """Why ``other`` cannot continue this plan, or None."""
        for name in ("num_rows", "samples_per_shard", "fingerprint"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} was {getattr(self, name)!r}, now {getattr(other, name)!r}"
        return None


def sample_key(shard_id: int, index: int, key_digits: int, shard_digits: int = 5) -> str:
    """img2dataset's key: shard id and in-shard index, zero-padded (``compute_key``)."""
    return f"{shard_id * 10 ** key_digits + index:0{key_digits + shard_digits}d}"


def make_plan(pool: str | os.PathLike, samples_per_shard: int):
    """Check the pool and plan its shards. Returns ``(plan, pool_schema)``.

    Raises ShardError naming the file when the pool breaks the contract: missing columns,
    a column qcap would overwrite, a type that cannot go into KEY.json, a malformed,
    missing or repeated uid.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    filesystem, files = pool_files(pool)  # checks uid, url and text

    def read_schema(path: str):
        try:
            return pq.read_schema(path, filesystem=filesystem)
        except (pa.ArrowInvalid, OSError) as err:
            raise ShardError(f"{path}: not a readable Parquet file ({err})") from err

    schema = read_schema(files[0])
    for path in files[1:]:
        other = read_schema(path)
        if not other.equals(schema):
            raise ShardError(f"{path}: schema differs from {files[0]}'s; a pool's files must agree")
    clash = [c for c in schema.names if c in ADDED_COLUMNS]
    if clash:
        raise ShardError(f"{pool}: column(s) {clash} clash with what qcap download adds; rename them in the pool")
    for field in schema:
        if not _json_able(field.type):
            raise ShardError(
                f"{pool}: column {field.name!r} has type {field.type}, which KEY.json cannot hold; cast it to string first"
            )
    for name in ("uid", "url", "text"):
        if not (pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)):
            raise ShardError(f"{pool}: column {name!r} must be a string column, not {schema.field(name).type}")

    digest = hashlib.sha256()
    chunks = []
    for path in files:
        for batch in pq.ParquetFile(path, filesystem=filesystem).iter_batches(columns=["uid"], batch_size=1 << 16):
            uids = batch.column(0)
            bad = pc.invert(pc.fill_null(pc.match_substring_regex(uids, _UID_PATTERN), False))
            if pc.any(bad).as_py():
                example = uids.filter(bad)[0].as_py()
                raise ShardError(f"{path}: uid {example!r} is not 32 lowercase hex characters (DataComp's uid)")
            digest.update("\n".join(uids.to_pylist()).encode() + b"\n")
            chunks.append(uids)
    all_uids = pa.chunked_array(chunks, type=schema.field("uid").type)
    num_rows = len(all_uids)
    if num_rows == 0:
        raise ShardError(f"{pool}: the pool has no rows; nothing to download")
    distinct = pc.count_distinct(all_uids).as_py() if num_rows else 0
    if distinct != num_rows:
        counts = pc.value_counts(all_uids)
        repeated = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:3]
        raise ShardError(f"{pool}: {num_rows - distinct} repeated uid(s), e.g. {repeated}; a uid must be unique")
    plan = Plan(
        pool=str(pool), files=files, num_rows=num_rows, samples_per_shard=samples_per_shard,
        fingerprint=digest.hexdigest(), pool_columns=list(schema.names),
    )
    return plan, schema


def pool_files(pool: str | os.PathLike):
    """``(filesystem, sorted Parquet files)`` of a pool file or folder (local or arrow URL),
    checked by :func:`base.shards.open_pool`."""
    import pyarrow.fs as pafs

    dataset = open_pool(pool)
    local = isinstance(dataset.filesystem, pafs.LocalFileSystem)
    files = sorted(os.path.abspath(f) if local else f for f in dataset.files)  # a resume may start elsewhere
    return dataset.filesystem, files


def _json_able(tp) -> bool:
    import pyarrow as pa

    if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        return _json_able(tp.value_type)
    if pa.types.is_struct(tp):
        return all(_json_able(tp.field(i).type) for i in range(tp.num_fields))
    return any(
        check(tp)
        for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
                      pa.types.is_boolean, pa.types.is_null)
    )


class ShardReader:
    """Reads the pool rows of given shards from the row groups that cover them."""

    def __init__(self, plan: Plan) -> None:
        import pyarrow.parquet as pq

        self.plan = plan
        self.filesystem, files = pool_files(plan.pool)
        if files != plan.files:
            raise ShardError(f"{plan.pool}: its files changed since the plan was made")
        self._groups: list[tuple[str, int, int, int]] = []  # (file, group, first row, rows)
        start = 0
        for path in plan.files:
            meta = pq.ParquetFile(path, filesystem=self.filesystem).metadata
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                self._groups.append((path, group, start, rows))
                start += rows
        if start != plan.num_rows:
            raise ShardError(f"{plan.pool}: holds {start} rows now, {plan.num_rows} when planned; the pool changed")
        self._cache: tuple[tuple[str, int], Any] | None = None

    def _group(self, path: str, group: int):
        import pyarrow.parquet as pq

        if self._cache is None or self._cache[0] != (path, group):
            self._cache = ((path, group), pq.ParquetFile(path, filesystem=self.filesystem).read_row_group(group))
        return self._cache[1]

    def rows(self, start: int, stop: int):
        """Pool rows ``[start, stop)`` as one Table."""
        import pyarrow as pa

        parts = []
        for path, group, first, count in self._groups:
            if first + count <= start or first >= stop:
                continue
            table = self._group(path, group)
            lo = max(start, first) - first
            hi = min(stop, first + count) - first
            parts.append(table.slice(lo, hi - lo))
        if not parts:
            return None
        return pa.concat_tables(parts).combine_chunks()

    def shard(self, shard_id: int):
        start = shard_id * self.plan.samples_per_shard
        return self.rows(start, start + self.plan.shard_rows(shard_id))


def job_table(plan: Plan, shard_id: int, pool_rows):
    """A shard's pool rows plus the job columns: its sample keys and attempt number 1."""
    import pyarrow as pa

    digits = plan.key_digits()
    keys = [sample_key(shard_id, i, digits) for i in range(pool_rows.num_rows)]
    table = pool_rows.append_column("key", pa.array(keys, pa.string()))
    return table.append_column("download_attempts", pa.array([1] * pool_rows.num_rows, pa.int32()))


def iter_job_tables(plan: Plan, shard_ids: Iterable[int]) -> Iterator[tuple[int, Any]]:
    """(shard id, job table) for each requested shard, in the order given."""
    reader = ShardReader(plan)
    for shard_id in shard_ids:
        rows = reader.shard(shard_id)
        if rows is None:
            raise ShardError(f"{plan.pool}: shard {shard_id} is past the end of the pool")
        yield shard_id, job_table(plan, shard_id, rows)

