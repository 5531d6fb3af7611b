"""``qcap download``: a DataComp-style pool → raw shards, dependable at scale.

Usage::

    qcap download --pool W/pool.parquet --out runs/raw                      # DataComp's defaults
    qcap download --pool pool.parquet --out raw --distributor ray --ray-address auto
    qcap download --pool pool.parquet --out raw --retry-failed              # resume, then retry
    qcap download --pool W/pool.parquet --out raw --allow-private-addresses --processes 2 --threads 16

What happens (each step is safe to interrupt; run the same command again to finish):

1. the pool is checked and planned into shards of ``--samples-per-shard`` rows
   (:mod:`~curate.download.plan`); the plan and the resolved config go to ``RAW/config.json``
   (a later run must use the same pool and output settings);
2. interrupted ``--retry-failed`` merges are finished (:func:`~curate.download.merge.recover`);
3. every shard without its ``.done`` marker becomes a job, run on local processes or Ray
   tasks with bounded in-flight work and shard retries (:mod:`~curate.download.distribute`);
   in each job img2dataset fetches and resizes, qcap guards and writes
   (:mod:`~curate.download.fetch`, :mod:`~curate.download.guard`);
4. with ``--retry-failed``, rounds of re-fetching retryable failures with backoff
   (:mod:`~curate.download.merge`);
5. ``sizes.json`` and ``manifest.json`` are written from the shards
   (:mod:`~curate.download.manifest`) and a one-screen summary is printed.

Exit status: 0 when every shard is complete, 1 when some shard still failed after its
retries (run again), 2 on bad input.

On a Ray cluster of several nodes, every node needs qcap installed (the tasks import
``curate.download``) and RAW must be a folder every node sees (a shared filesystem) or an
object-store URL. A cluster with token authentication needs ``RAY_AUTH_MODE=token`` and its
token in this process's environment (Ray's own rule for explicit addresses).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from base.cli import UsageError
from base.config import output_fields, parse_config
from base.shards import (
    SIZES_FILE,
    ShardError,
    finalize_folder,
    is_complete,
    read_table,
    shard_name,
)
from base.stage import CONFIG_FILE, write_run_records
from curate.download.config import DownloadConfig
from curate.download.distribute import BACKENDS, Backend, run_jobs
from curate.download.fetch import FetchSettings, ShardJob, ShardResult
from curate.download.manifest import MANIFEST_FILE, build_manifest, low_success_banner, summary_text
from curate.download.merge import RETRY_DIR, recover
from curate.download.plan import Plan, iter_job_tables, make_plan
from curate.download.status import RETRYABLE, SUCCESS

log = logging.getLogger("curate.download")

LOCK_FILE = ".qcap-download.lock"
EARLY_CHECK_SAMPLES = 1000  # the success rate is judged (and warned about) this early
_SHARD_FILE = re.compile(r"^\d+(\.tar|\.parquet|\.done|_stats\.json)$")


def main(argv: list[str], prog: str = "qcap download") -> int:
    cfg = parse_config(DownloadConfig, argv, prog=prog)
    manifest = download(cfg)
    print(summary_text(manifest))
    return 0 if manifest["complete"] else 1


def download(cfg: DownloadConfig) -> dict[str, Any]:
    """Run (or resume) a download; returns the manifest (also written to RAW/manifest.json)."""
    out = cfg.out.rstrip("/")
    fs, root = _fs(out)
    if fs.exists(root) and not fs.isdir(root):
        raise ShardError(f"--out {out}: is a file, not a folder; choose a folder for the raw shards")
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as err:
        raise ShardError(f"--out {out}: cannot be made a folder ({err.strerror or err})") from err
    with _exclusive(fs, root):
        if cfg.overwrite:
            _refuse_foreign(fs, root)
            _clear(fs, root)
        plan, _ = make_plan(cfg.pool, cfg.samples_per_shard)
        if cfg.verify_hash and "sha256" not in plan.pool_columns:
            raise UsageError(f"{cfg.pool}: --verify-hash needs a sha256 column in the pool")
        _check_compatible(fs, root, cfg, plan)
        recover(out)
        _save_config(out, cfg, plan)
        start = time.time()
        done_before = {s for s in range(plan.num_shards) if is_complete(out, s)}
        todo = [s for s in range(plan.num_shards) if s not in done_before]
        settings = FetchSettings.from_config(cfg)
        log.info(
            "%s: %d pool rows in %d shards; %d to download%s",
            out, plan.num_rows, plan.num_shards, len(todo),
            f" ({len(done_before)} already complete)" if done_before else "",
        )
        runner = _Runner(cfg)
        try:
            fetched = runner.download(plan, todo, out, settings)
            rounds = []
            if cfg.retry_failed and runner.failed:
                log.warning("--retry-failed skipped: %d shard(s) are not complete yet; run again", len(runner.failed))
            elif cfg.retry_failed:
                rounds = runner.retry(plan, out, settings)
        except BaseException:  # Ctrl-C or a broken contract: stop the workers now, then report
            runner.close(abort=True)
            raise
        runner.close()
        finalize_folder(out)
        seconds = time.time() - start
        fetched += sum(r["samples"] for r in rounds)
        extra = {
            "this_run": {
                "seconds": round(seconds, 3),
                "fetched": fetched,
                "samples_per_s": round(fetched / seconds, 3) if seconds > 0 else 0.0,
                "distributor": cfg.distributor + (f" ({cfg.ray_address})" if cfg.ray_address else ""),
                "shards_already_complete": len(done_before),
                "failed_shards": {str(k): v for k, v in runner.failed.items()},
            },
            "retry_rounds": rounds,
            "config": CONFIG_FILE,
        }
        manifest = build_manifest(out, plan, min_success_rate=cfg.min_success_rate, verify_hash=cfg.verify_hash, extra=extra)
        write_run_records(out, summary=manifest, summary_name=MANIFEST_FILE)
        if manifest["low_success"]:
            log.warning("\n%s", low_success_banner(manifest))
        return manifest


class _Runner:
    """Starts the backend on first use (no Ray start when there is nothing to do)."""

    def __init__(self, cfg: DownloadConfig) -> None:
        self.cfg = cfg
        self.backend: Backend | None = None
        self.failed: dict[int, str] = {}

    def _backend(self) -> Backend:
        if self.backend is None:
            cfg = self.cfg
            try:
                self.backend = BACKENDS[cfg.distributor](
                    processes=cfg.processes, ray_address=cfg.ray_address, shard_retries=cfg.shard_retries,
                    max_in_flight=cfg.in_flight,
                )
            except ConnectionError as err:
                raise UsageError(
                    f"cannot attach to the Ray cluster at {cfg.ray_address!r} ({err}); is it running (ray status)? "
                    "A cluster with token authentication needs RAY_AUTH_MODE=token and its token here"
                ) from err
        return self.backend

    def close(self, *, abort: bool = False) -> None:
        if self.backend is not None:
            self.backend.close(abort=abort)
            self.backend = None

    def _run(self, jobs: Iterator[ShardJob], tracker: _Tracker) -> None:
        def failure(job: ShardJob, err: BaseException) -> None:
            lines = str(err).strip().splitlines()
            self.failed[job.shard_id] = f"{type(err).__name__}: {lines[-1] if lines else ''}"[:500]
            log.error("shard %05d failed after %d retries: %s", job.shard_id, self.cfg.shard_retries, self.failed[job.shard_id])

        run_jobs(
            self._backend(), jobs, max_in_flight=self.cfg.in_flight, shard_retries=self.cfg.shard_retries,
            on_result=tracker.finish, on_failure=failure, on_progress=tracker.progress,
        )
        tracker.close()

    def download(self, plan: Plan, todo: list[int], out: str, settings: FetchSettings) -> int:
        if not todo:
            return 0
        total = sum(plan.shard_rows(s) for s in todo)
        tracker = _Tracker(total, self.cfg, desc="download")
        jobs = (ShardJob("download", s, table, out, settings) for s, table in iter_job_tables(plan, todo))
        self._run(jobs, tracker)
        return tracker.processed

    def retry(self, plan: Plan, out: str, settings: FetchSettings) -> list[dict[str, Any]]:
        rounds = []
        for number in range(1, self.cfg.retry_rounds + 1):
            targets = retryable_rows(out, plan)
            if not targets:
                break
            count = sum(t.num_rows for t in targets.values())
            wait = self.cfg.retry_backoff * 2 ** (number - 1)
            log.info("retry round %d: %d retryable failures in %d shards, after %g s backoff", number, count, len(targets), wait)
            time.sleep(wait)
            started = time.time()
            tracker = _Tracker(count, self.cfg, desc=f"retry {number}", judge=False)  # failures by selection
            self._run((ShardJob("retry", s, t, out, settings) for s, t in targets.items()), tracker)
            rounds.append({
                "round": number, "samples": count, "shards": len(targets), "backoff_s": wait,
                "recovered": tracker.ok, "seconds": round(time.time() - started, 3),
            })
            if self.failed:
                break
        _remove_empty_dirs(f"{out}/{RETRY_DIR}")
        return rounds


def retryable_rows(out: str, plan: Plan) -> dict[int, Any]:
    """shard id → job table of the rows whose failure is retryable (attempt number + 1)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    targets = {}
    wanted = pa.array(sorted(RETRYABLE))
    for shard_id in range(plan.num_shards):
        if not is_complete(out, shard_id):
            continue
        tar = f"{out}/{shard_name(shard_id)}.tar"
        statuses = read_table(tar, columns=["status"]).column("status")
        if not pc.any(pc.is_in(statuses, value_set=wanted)).as_py():
            continue
        table = read_table(tar)
        table = table.filter(pc.is_in(table.column("status"), value_set=wanted))
        columns = [*plan.pool_columns, "key"]
        missing = [c for c in columns + ["download_attempts"] if c not in table.column_names]
        if missing:
            raise ShardError(f"{tar}: lacks column(s) {missing}; was it written by qcap download?")
        attempts = pc.add(pc.fill_null(table.column("download_attempts"), 1), 1).cast(pa.int32())
        targets[shard_id] = table.select(columns).append_column("download_attempts", attempts)
    return targets


class _Tracker:
    """The progress bar (samples/s, success rate) and the early low-success warning."""

    def __init__(self, total: int, cfg: DownloadConfig, *, desc: str, judge: bool = True) -> None:
        from tqdm import tqdm

        self.total = total
        self.judge = judge
        self.min_success_rate = cfg.min_success_rate
        self.bar = tqdm(total=total, desc=desc, unit="sample", unit_scale=True, dynamic_ncols=True,
                        disable=not cfg.progress, smoothing=0.05, file=sys.stderr)
        self.runs: dict[int, list[Any]] = {}  # shard → [run id, ok, failed] of its latest attempt
        self.finished: set[int] = set()
        self.ok = self.failed = 0
        self.warned = False
        self.status_counts: dict[str, int] = {}

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    def _set(self, shard: int, run_id: str, ok: int, failed: int) -> None:
        entry = self.runs.get(shard)
        if entry is not None:
            self.ok -= entry[1]
            self.failed -= entry[2]
        self.runs[shard] = [run_id, ok, failed]
        self.ok += ok
        self.failed += failed
        self.bar.n = self.processed
        if self.processed:
            self.bar.set_postfix_str(f"ok {self.ok / self.processed:.1%}", refresh=False)
        self.bar.refresh()
        self._check()

    def progress(self, event: tuple[int, str, int, int]) -> None:
        shard, run_id, ok, failed = event
        if shard in self.finished:
            return
        entry = self.runs.get(shard)
        if entry is not None and entry[0] == run_id:
            ok, failed = entry[1] + ok, entry[2] + failed
        self._set(shard, run_id, ok, failed)

    def finish(self, result: ShardResult) -> None:
        self.finished.add(result.shard_id)
        for status, count in result.status_counts.items():
            self.status_counts[status] = self.status_counts.get(status, 0) + count
        self._set(result.shard_id, "final", result.successes, result.fetched - result.successes)

    def _check(self) -> None:
        if not self.judge or self.warned or self.processed < min(self.total, EARLY_CHECK_SAMPLES):
            return
        rate = self.ok / self.processed
        if rate < self.min_success_rate:
            self.warned = True
            worst = sorted(((n, s) for s, n in self.status_counts.items() if s != SUCCESS), reverse=True)[:4]
            self.bar.clear()
            log.warning(
                "\n%s\nLOW SUCCESS RATE so far: %.1f%% of %d samples (threshold %.0f%%). Low success is usually DNS "
                "trouble or rate limiting.%s\n%s",
                "!" * 78, 100 * rate, self.processed, 100 * self.min_success_rate,
                (" Failures so far: " + ", ".join(f"{s} {n}" for n, s in worst)) if worst else "", "!" * 78,
            )

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------
# RAW folder housekeeping


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


@contextlib.contextmanager
def _exclusive(fs, root: str):
    """One qcap download per RAW at a time (a local lock; the kernel drops it if we die)."""
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield  # object stores have no locks; one writer per RAW is the user's to ensure
        return
    import fcntl

    with open(os.path.join(root, LOCK_FILE), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise UsageError(f"{root}: another qcap download is running on this folder") from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_empty_dirs(folder: str) -> None:
    fs, root = _fs(folder)
    if not fs.exists(root):
        return
    for sub in fs.ls(root, detail=False):
        if fs.isdir(sub) and not fs.ls(sub, detail=False):
            fs.rmdir(sub)
    if not fs.ls(root, detail=False):
        fs.rmdir(root)


def _clear(fs, root: str) -> None:
    for path in fs.ls(root, detail=False):
        name = os.path.basename(path)
        if _SHARD_FILE.match(name) or name in (SIZES_FILE, MANIFEST_FILE, CONFIG_FILE) or (
            name.startswith(".") and ".tmp-" in name
        ):
            fs.rm(path)
        elif name == RETRY_DIR:
            fs.rm(path, recursive=True)


def _refuse_foreign(fs, root: str) -> None:
    """Shard files without a download's ``config.json`` are not download's: refused, ``--overwrite``
    included (it removes only what download wrote), as every stage does (:func:`base.stage.claim_output`)."""
    path = f"{root}/{CONFIG_FILE}"
    if fs.exists(path):
        try:
            with fs.open(path, "rb") as handle:
                stage = json.load(handle).get("stage", "download")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            stage = "download"  # download's own record, broken by a kill or by hand
        if stage != "download":
            raise UsageError(f"{path} was written by qcap {stage}, not qcap download; choose another --out")
        return
    leftovers = sorted(os.path.basename(p) for p in fs.ls(root, detail=False) if _SHARD_FILE.match(os.path.basename(p)))
    if leftovers:
        raise UsageError(f"{root} holds shard files ({leftovers[0]}, ...) but no {CONFIG_FILE}: qcap download did not "
                         "write them; choose another --out")


def _check_compatible(fs, root: str, cfg: DownloadConfig, plan: Plan) -> None:
    """A resumed or retried run must continue the same plan with the same output settings
    (declared on DownloadConfig); other ones are the stage kit's one refusal, naming the fields."""
    from base.stage import refuse_mismatch

    path = f"{root}/{CONFIG_FILE}"
    if not fs.exists(path):
        _refuse_foreign(fs, root)
        return
    try:
        with fs.open(path, "rb") as handle:
            saved = json.load(handle)
        before, recorded = Plan.from_dict(saved["plan"]), saved["config"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path}: unreadable ({err}); use --overwrite to start over") from err
    reason = before.same_pool(plan)
    if reason is not None:
        raise UsageError(f"{root} was downloaded from another pool or shard size ({reason}); use another --out or --overwrite")
    current = {name: getattr(cfg, name) for name in output_fields(cfg)}
    previous = {name: recorded.get(name) for name in current}
    if previous != current:  # shards would differ
        refuse_mismatch(root, "download", previous, current)


def _save_config(out: str, cfg: DownloadConfig, plan: Plan) -> None:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("img2dataset", "ray", "pyarrow", "webdataset"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    write_run_records(out, cfg, plan=plan.to_dict(), versions=versions)  # config.json, the stages' shared name
