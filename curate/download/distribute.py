"""Run shard jobs on local processes or as Ray tasks: bounded in flight, failed shards retried.

img2dataset's Ray distributor submits every shard at once (no backpressure: a 1,280-shard
pool puts 1,280 tasks and their arguments in flight) and never retries a failed one; its
multiprocessing distributor retries shards, but only after all others. Here one loop
(:func:`run_jobs`) drives either backend from :data:`BACKENDS`:

- at most ``max_in_flight`` jobs are submitted at any time; the next is read from the pool
  only when one finishes, so memory stays flat whatever the pool size;
- a job that raises (or whose process dies) runs again, up to ``shard_retries`` times —
  Ray does it natively (``max_retries`` + ``retry_exceptions``, which also covers a lost
  worker or node), the process pool by resubmitting (and rebuilding the pool if a worker
  died); a job that still fails is reported, and the run says to re-run the command;
- workers stream progress events ``(shard, run id, successes, failures)`` back (a Ray actor,
  or a multiprocessing queue), so the driver's bar moves per sample, not per shard.

Process-pool workers are forked from a fork server that has img2dataset imported once (not
imported again by every worker), and die with the driver (Linux ``PR_SET_PDEATHSIG`` on their
parent, the fork server, which exits when the driver does): a SIGKILLed run leaves no orphan
writing into RAW while the re-run writes the same shard.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from curate.download.fetch import ProgressFn, ShardJob, ShardResult, fetch_into
from curate.download.merge import retry_shard

log = logging.getLogger(__name__)

ProgressEvent = tuple[int, str, int, int]
WAIT_SECONDS = 0.2  # how often the driver wakes to update progress


class Backend(Protocol):
    retries_natively: bool  # True: a reported failure has already used up its retries

    def submit(self, job: ShardJob) -> Any: ...
    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, ShardResult | BaseException]]: ...
    def progress_events(self) -> list[ProgressEvent]: ...
    def close(self, *, abort: bool = False) -> None: ...


def run_jobs(
    backend: Backend,
    jobs: Iterable[ShardJob],
    *,
    max_in_flight: int,
    shard_retries: int,
    on_result: Callable[[ShardResult], None],
    on_failure: Callable[[ShardJob, BaseException], None],
    on_progress: Callable[[ProgressEvent], None],
) -> None:
    """Submit ``jobs`` lazily with at most ``max_in_flight`` pending; retry failed ones."""
    source = iter(jobs)
    exhausted = False
    again: deque[tuple[ShardJob, int]] = deque()
    pending: dict[Any, tuple[ShardJob, int]] = {}
    while True:
        while len(pending) < max_in_flight:
            if again:
                job, attempt = again.popleft()
            elif not exhausted:
                job = next(source, None)
                if job is None:
                    exhausted = True
                    continue
                attempt = 0
            else:
                break
            pending[backend.submit(job)] = (job, attempt)
        if not pending:
            break
        for handle, outcome in backend.wait(list(pending), WAIT_SECONDS):
            job, attempt = pending.pop(handle)
            if not isinstance(outcome, BaseException):
                on_result(outcome)
            elif not backend.retries_natively and attempt < shard_retries:
                log.warning("shard %05d failed (%s); retrying (%d of %d)", job.shard_id, _short(outcome), attempt + 1, shard_retries)
                again.append((job, attempt + 1))
            else:
                on_failure(job, outcome)
        for event in backend.progress_events():
            on_progress(event)
    for event in backend.progress_events():
        on_progress(event)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


# --------------------------------------------------------------------------------------------
# multiprocessing


_QUEUE = None


def _die_with_driver(driver_pid: int) -> None:
    """Make sure this worker never outlives the driver.

    ``PR_SET_PDEATHSIG`` covers a worker whose parent is the driver (spawn). A fork-server
    worker's parent is the fork server, which outlives a killed driver as long as any of its
    workers holds the driver's liveness pipe; so a watcher thread also waits on the driver
    itself (a pidfd on Linux, else polling) and kills this process when the driver is gone.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    try:
        watch = os.pidfd_open(driver_pid)
    except (AttributeError, OSError):
        watch = None
    if not _alive(driver_pid):  # it died before we could ask
        os._exit(1)
    threading.Thread(target=_watch_driver, args=(driver_pid, watch), name="qcap-driver-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_driver(driver_pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        import select

        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll()  # blocks until the pidfd is readable: the driver has exited
    else:
        while _alive(driver_pid):
            time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)  # mid-shard: only hidden temporaries are left behind


def execute(job: ShardJob, progress: ProgressFn | None = None) -> ShardResult:
    """Run one job in this process (a pool worker or a Ray task): a download is fetched
    (:mod:`curate.download.fetch`), a retry re-fetched and merged in (:mod:`curate.download.merge`).
    The dispatcher lives here, with the distributor, so fetch and merge do not import each other."""
    if job.kind == "download":
        return fetch_into(job.table, job.out, job.shard_id, job.settings, progress)
    if job.kind == "retry":
        return retry_shard(job, progress)
    raise ValueError(f"unknown job kind {job.kind!r}")


def _mp_init(progress_queue, driver_pid: int) -> None:
    global _QUEUE
    _die_with_driver(driver_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _QUEUE = progress_queue


def _mp_execute(job: ShardJob) -> ShardResult:
    return execute(job, _QUEUE.put if _QUEUE is not None else None)


# Imported once by the fork server, so workers start as forks that already hold them
# (img2dataset pulls in torch through webdataset: seconds per worker if each imported it).
FORKSERVER_PRELOAD = ["curate.download.fetch", "curate.download.merge", "img2dataset.downloader", "img2dataset.resizer", "img2dataset.blurrer"]


def _context(multiprocessing):
    """A fork server with the heavy imports preloaded where there is one, else spawn.

    Never plain fork: the driver may hold threads (progress, Ray) that a fork would copy
    half-way.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before the fork server imports albumentations
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


class MultiprocessingBackend:
    """A process pool on this machine (fork server, or spawn where there is none)."""

    retries_natively = False

    def __init__(self, *, processes: int, **_ignored) -> None:
        import multiprocessing

        self.processes = processes
        self.context = _context(multiprocessing)
        self.queue = self.context.Queue()
        self.pool = self._new_pool()
        self._pool_of: dict[Any, Any] = {}

    def _new_pool(self):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(
            max_workers=self.processes, mp_context=self.context, initializer=_mp_init, initargs=(self.queue, os.getpid())
        )

    def submit(self, job: ShardJob):
        from concurrent.futures.process import BrokenProcessPool

        try:
            future = self.pool.submit(_mp_execute, job)
        except BrokenProcessPool:
            self._renew(self.pool)
            future = self.pool.submit(_mp_execute, job)
        self._pool_of[future] = self.pool
        return future

    def _renew(self, broken) -> None:
        if broken is self.pool:  # the futures of one dead pool all report it; renew once
            log.warning("a worker process died; starting a fresh pool")
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()

    def wait(self, handles, timeout):
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for future in done:
            outcome = future.exception() or future.result()
            pool = self._pool_of.pop(future, None)
            if isinstance(outcome, BrokenProcessPool):
                self._renew(pool)
            out.append((future, outcome))
        return out

    def progress_events(self) -> list[ProgressEvent]:
        events = []
        while True:
            try:
                events.append(self.queue.get_nowait())
            except queue.Empty:
                return events

    def close(self, *, abort: bool = False) -> None:
        if abort:  # Ctrl-C: stop now; a shard cut short leaves only hidden temporaries
            for process in list(getattr(self.pool, "_processes", {}).values()):  # no public terminate before 3.14
                process.terminate()
        self.pool.shutdown(wait=not abort, cancel_futures=True)
        self.queue.close()


# --------------------------------------------------------------------------------------------
# Ray


class _ProgressActor:
    """Collects workers' progress events until the driver takes them."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def add(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def take(self) -> list[ProgressEvent]:
        events, self.events = self.events, []
        return events


def _ray_execute(job: ShardJob, progress_actor) -> ShardResult:
    return execute(job, progress_actor.add.remote)


class RayBackend:
    """Shards as Ray tasks (one CPU each), on a local Ray or an existing cluster."""

    retries_natively = True

    def __init__(self, *, processes: int, ray_address: str | None, shard_retries: int, max_in_flight: int, **_ignored) -> None:
        import ray

        from base.raykit import ray_session

        self.ray = ray
        # joined, started (a local one: never attaching by surprise to a cluster someone else started), or reused
        self.session = ray_session(ray_address or None, processes,
                                   object_store_memory=max(256 << 20, max_in_flight * (32 << 20)))
        self.session.__enter__()
        self.task = ray.remote(_ray_execute).options(num_cpus=1, max_retries=shard_retries, retry_exceptions=True)
        self.actor = ray.remote(num_cpus=0)(_ProgressActor).remote()
        resources = ray.cluster_resources()
        log.info("Ray: %s CPUs in the cluster, %d nodes", resources.get("CPU", 0), len(ray.nodes()))

    def submit(self, job: ShardJob):
        return self.task.remote(job, self.actor)

    def wait(self, handles, timeout):
        ready, rest = self.ray.wait(handles, num_returns=1, timeout=timeout, fetch_local=False)
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
            ready += more
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref)))
            except self.ray.exceptions.RayError as err:  # the task failed after Ray's retries
                out.append((ref, err))
        return out

    def progress_events(self) -> list[ProgressEvent]:
        """Progress events since the last call. The actor only feeds the progress bar (every count
        that matters comes back in the shard results), so a dead one — a lost node, or an actor
        Ray cancelled before it started — is replaced with a warning instead of ending the run;
        events sent to the old one are lost to the bar alone."""
        try:
            return self.ray.get(self.actor.take.remote())
        except self.ray.exceptions.RayActorError as err:
            log.warning("Ray: the progress actor died (%s); starting a new one — the progress bar "
                        "undercounts the shards already running, the manifest does not", type(err).__name__)
            self.actor = self.ray.remote(num_cpus=0)(_ProgressActor).remote()
            return []

    def close(self, *, abort: bool = False) -> None:
        self.session.__exit__(None, None, None)  # Ray we started (or joined) ends: so do this job's tasks


BACKENDS: dict[str, Callable[..., Backend]] = {
    "multiprocessing": MultiprocessingBackend,
    "ray": RayBackend,
}
