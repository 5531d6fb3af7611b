"""``--retry-failed``: re-fetch a shard's retryable failures and merge them in, atomically.

A retry job for shard S carries S's rows whose status is retryable (timeouts, 5xx, 429,
connection and DNS failures — never 404 or a refused URL). It goes through three steps, each
of which survives a SIGKILL at any moment:

1. **patch** — the rows are fetched by img2dataset into ``RAW/.qcap-retry/patch/S.*`` (a
   complete shard of just those rows, with its ``.done``). A patch that is already complete
   is reused, not fetched again.
2. **merge** — a new shard S is written to ``RAW/.qcap-retry/merged/`` by streaming S's
   Parquet and tar once: each retried uid's row (and, if it now succeeded, its image) is taken
   from the patch, every other row and image is copied as it was. The uid set and the keys do
   not change, so no uid can appear twice. The merged shard gets its ``.done`` last.
3. **commit** — journal-style: ``RAW/S.done`` is removed, the merged Parquet, stats and tar
   are renamed over S's (whole files: a reader sees the old tar or the new, never a part),
   ``RAW/S.done`` is written, and then the staged marker and the patch are removed.

:func:`recover` runs at the start of every ``qcap download``: a staged merge with its
``.done`` is committed (step 3 is idempotent), anything staged without one is deleted. So a
kill between the first rename and the new marker is finished by the next run, and until then
S has no ``.done``, which says "in flux" to anyone who looks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from base.shards import (
    BASE_COLUMNS,
    Sample,
    ShardError,
    ShardWriter,
    completed_shards,
    is_complete,
    iter_samples,
    move_shard,
    read_table,
    remove_shard,
    remove_unfinished,
    shard_name,
)
from curate.download.fetch import (
    ProgressFn,
    ShardJob,
    ShardResult,
    fetch_into,
    img2dataset_counters,
)
from curate.download.status import RETRYABLE, SUCCESS

log = logging.getLogger(__name__)

RETRY_DIR = ".qcap-retry"


def patch_dir(out: str) -> str:
    return f"{out.rstrip('/')}/{RETRY_DIR}/patch"


def staged_dir(out: str) -> str:
    return f"{out.rstrip('/')}/{RETRY_DIR}/merged"


def retry_shard(job: ShardJob, progress: ProgressFn | None = None) -> ShardResult:
    """Patch, merge and commit one shard (runs in a worker)."""
    out, shard_id = job.out, job.shard_id
    patch = patch_dir(out)
    start = time.time()
    if not is_complete(patch, shard_id):
        fetch_into(job.table, patch, shard_id, job.settings, progress)
    merged = merge_shard(out, shard_id)
    commit_shard(out, shard_id)
    counts = merged["patch_status_counts"]
    return ShardResult(
        shard_id=shard_id, kind="retry", fetched=sum(counts.values()), successes=counts.get(SUCCESS, 0),
        status_counts=counts, seconds=time.time() - start,
        shard_rows=merged["count"], shard_successes=merged["successes"],
    )


def merge_shard(out: str, shard_id: int) -> dict[str, Any]:
    """Write the merged shard S (original + patch) into the staging folder; returns its counts
    and the patch's rows per status."""
    name = shard_name(shard_id)
    original_tar = f"{out.rstrip('/')}/{name}.tar"
    patch_tar = f"{patch_dir(out)}/{name}.tar"
    original = read_table(original_tar)
    patch = read_table(patch_tar)
    status_of = dict(zip(original.column("uid").to_pylist(), original.column("status").to_pylist(), strict=True))
    patched: dict[str, dict[str, Any]] = {}
    for row in patch.to_pylist():
        previous = status_of.get(row["uid"])
        if previous is None or previous not in RETRYABLE:
            remove_shard(patch_dir(out), shard_id)
            raise ShardError(
                f"{patch_tar}: uid {row['uid']} is not a retryable failure of {original_tar} "
                f"(status {previous!r}); the stale patch was removed, run again"
            )
        patched[row["uid"]] = row
    patch_images = {s.key: s for s in iter_samples([patch_tar])} if any(r["status"] == SUCCESS for r in patched.values()) else {}
    extra = sorted(set(patch.column_names) - set(original.column_names))
    if extra:
        raise ShardError(f"{patch_tar}: columns {extra} are not in {original_tar}; the patch is not from this download")
    schema = original.schema  # the shard's own types; patch rows are converted into them
    originals = iter_samples([original_tar])
    counts: dict[str, int] = {}
    retried = recovered = 0
    with ShardWriter(staged_dir(out), shard_id, schema=schema) as writer:
        for row in original.to_pylist():
            source, image = row, None
            if row["uid"] in patched:
                source = patched[row["uid"]]
                retried += 1
                if source["status"] == SUCCESS:
                    image = patch_images.get(source["key"])
                    recovered += 1
            elif row["status"] == SUCCESS:
                image = next(originals, None)
            if source["status"] == SUCCESS and (image is None or image.key != source["key"]):
                raise ShardError(f"{original_tar}: tar and Parquet disagree at key {source['key']!r}; re-download the shard")
            writer.write(_sample(source, image))
            counts[source["status"]] = counts.get(source["status"], 0) + 1
        stats = writer.close(extra_stats={**img2dataset_counters(counts), "retried": retried, "recovered": recovered})
    patch_counts: dict[str, int] = {}
    for row in patched.values():
        patch_counts[row["status"]] = patch_counts.get(row["status"], 0) + 1
    return {"count": stats.count, "successes": stats.successes, "retried": retried, "recovered": recovered,
            "patch_status_counts": patch_counts}


def _sample(row: dict[str, Any], image: Sample | None) -> Sample:
    meta = {k: v for k, v in row.items() if k not in BASE_COLUMNS}
    if image is None:
        return Sample(key=row["key"], uid=row["uid"], image=None, meta=meta, status=row["status"], error_message=row["error_message"])
    return Sample(
        key=row["key"], uid=row["uid"], image=image.image, image_ext=image.image_ext, text=image.text,
        syn_text=image.syn_text, syn_provenance=image.syn_provenance, meta=meta, extras=dict(image.extras),
        status=SUCCESS,
    )


def commit_shard(out: str, shard_id: int) -> None:
    """Move a complete staged shard over RAW's shard S, then drop its patch (idempotent; see
    the module doc and :func:`base.shards.move_shard`)."""
    move_shard(staged_dir(out), out, shard_id)
    remove_shard(patch_dir(out), shard_id)


def recover(out: str) -> list[int]:
    """Finish interrupted commits; drop unfinished merges and patches. Returns shards committed.

    Only called before any job runs (the driver holds RAW's lock), so no writer is active.
    """
    committed = sorted(completed_shards(staged_dir(out)))
    for shard_id in committed:
        commit_shard(out, shard_id)
    remove_unfinished(staged_dir(out))
    remove_unfinished(patch_dir(out))
    if committed:
        log.info("finished %d interrupted retry merge(s): shards %s", len(committed), committed[:10])
    return committed
