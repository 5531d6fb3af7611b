"""Ray for every shard-parallel stage: one way to join or start a cluster, and task retries.

``ray_session(address, num_cpus)``: inside a running Ray (a notebook, a test) use it and leave it
up; ``address`` (``auto`` or ``HOST:PORT`` of an existing cluster, started with ``ray start``)
joins that cluster; ``local`` or None starts a new local Ray with an explicit CPU count and no
dashboard. The driver disconnects when the stage ends. ``ray_map`` runs a module-level function
over task records as Ray tasks: at most ``max_in_flight`` submitted at once (backpressure: the
driver holds only that many pending results), each retried up to ``max_retries`` times when its
worker or node dies (a task's own exception is not retried: it is the same on every node, and
reaches the user as its original one line). Tasks must be idempotent — every qcap stage writes a
shard atomically and marks it done last — and their inputs and outputs must sit on storage every
node sees (a shared filesystem or an fsspec URL), as on any Ray cluster.

What a command pays for Ray is mostly Ray's own and fixed: the driver's ``import ray`` and
connection, and one new worker process per CPU for each command (Ray binds a worker to one job:
it starts, imports Ray, connects, then imports the stage's module). ``ray_map`` keeps its own
part small — the task function is exported once per process and travels inline with each task
(no object-store put) — and does not let the driver idle through the workers' start-up: until
the first Ray task returns, the driver runs tasks itself (``driver_helps``), the tasks it would
otherwise wait on, in this process as a one-worker pool runs them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from base.config import arg

DEFAULT_RETRIES = 3
RAY_ADDRESS_HELP = ("run on an existing Ray cluster: 'auto' (the cluster this node belongs to) or HOST:PORT of its "
                    "head (its nodes must see the input and output folders: shared storage); 'local': a new Ray "
                    "on this machine for this command")
INLINE_BYTES = 64 * 1024  # a task function pickled larger than this goes to the object store once, by reference


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None, *,
                object_store_memory: int | None = None) -> Iterator[None]:
    """Join ``address``, start a local Ray with an explicit CPU count, or reuse a running one.

    The one way every qcap stage starts Ray. Without ``address`` (or with ``"local"``) a new local instance starts
    (``address="local"``: never attaching by surprise to a cluster someone else started on this
    machine) with ``num_cpus`` (default: all) and no dashboard; the driver's logs stay quiet
    (``log_to_driver=False``, Ray's own at WARNING) so qcap's one-line errors and bars are what
    the user sees. Ray started here is shut down (a joined cluster: disconnected) at the end."""
    import ray

    if ray.is_initialized():  # a caller owns Ray: use it, leave it up
        yield
        return
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is not None and address != "local":
        check_reachable(address)
        ray.init(address=address, **options)
    else:
        if object_store_memory is not None:
            options["object_store_memory"] = object_store_memory
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **options)
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """One line, at once, for a ``HOST:PORT`` nobody answers at (Ray itself retries for minutes,
    printing its own warnings); ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    from base.cli import UsageError

    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--ray-address {address}: not HOST:PORT (the head's GCS port, 6379 by default) or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as err:
        raise UsageError(f"--ray-address {address}: no Ray head answers there ({err.strerror or err}); start one with "
                         "'ray start --head' or check the address") from None


def clean_error(err: BaseException) -> Exception | None:
    """The user-facing error inside a Ray failure, as one line: Ray re-raises a task's
    ShardError/ConfigError/UsageError as a class that is both RayTaskError and the original
    (its message the whole remote traceback, ~170 lines), and Ray Data wraps user code errors
    again. Returns a fresh error of the original class with the original message, or None when
    nothing in ``err``'s chain is such an error (a bug: let its traceback through)."""
    from base.cli import UsageError
    from base.config import ConfigError
    from base.shards import ShardError

    wanted = (ShardError, ConfigError, UsageError)
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError: the original exception object
        if isinstance(cause, BaseException):
            stack.append(cause)
        if isinstance(current, wanted) and not _is_ray_wrapper(current):
            message = " ".join(str(current).split())  # one line, whatever the original held
            for base in wanted:
                if isinstance(current, base):
                    return base(message)
        stack.extend([current.__cause__, current.__context__])
    return None


def _is_ray_wrapper(err: BaseException) -> bool:
    try:
        from ray.exceptions import RayError
    except ImportError:
        return False
    return isinstance(err, RayError)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _call(func: Callable[[Any], Any], task: Any, cwd: str) -> Any:
    """One task on a worker: in the driver's working folder when this node has it (a shared
    filesystem mounted at the same place), so relative paths mean what they meant to the user."""
    if os.getcwd() != cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    return func(task)


_REMOTE_CALL: Any = None
_WARM_JOB: Any = None  # the Ray job in which a task of ours has returned: its workers are up


def _remote_call(num_cpus: float, max_retries: int) -> Any:
    """``_call`` as a Ray remote function: made once per process (exported to the cluster once per job, not per
    ``ray_map``), its per-map settings as options."""
    global _REMOTE_CALL
    import ray

    if _REMOTE_CALL is None:
        _REMOTE_CALL = ray.remote(_call)
    return _REMOTE_CALL.options(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False)


def _task_function(func: Callable[[Any], Any]) -> Any:
    """What travels with each task: the function itself (a module-level function pickles as its name, a few
    bytes, inline in the task), or one object-store reference when it pickles large (a partial holding data)."""
    import ray
    from ray import cloudpickle

    try:
        size = len(cloudpickle.dumps(func))
    except Exception:  # noqa: BLE001 - let Ray report what cannot be pickled, as it always has
        return func
    return ray.put(func) if size > INLINE_BYTES else func


def ray_map(func: Callable[[Any], Any], tasks: list[Any], *, max_in_flight: int | None = None,
            max_retries: int = DEFAULT_RETRIES, num_cpus: float = 1, driver_helps: bool = True) -> Iterator[Any]:
    """``func(task)`` for every task as Ray tasks, yielded in completion order.

    ``driver_helps``: until the first Ray task of this job returns (the cluster's worker processes are starting),
    only one task per cluster CPU is submitted and the driver runs the next ones itself, in this process, checking
    between them; from the first result on, every task goes to Ray (later maps of the job too). The driver never waits on the start-up with tasks left
    it could run; a task the driver ran is one this process would have run with one worker (same function, same
    record, same output)."""
    import ray

    remote = _remote_call(num_cpus, max_retries)
    cpus = cluster_cpus()
    limit = max_in_flight or 2 * cpus
    started_limit = min(limit, max(1, int(cpus // max(num_cpus, 1e-9))))  # one task per CPU until workers are up
    fn = _task_function(func)
    cwd = os.getcwd()
    pending: list = []
    queue = iter(tasks)
    exhausted = False
    global _WARM_JOB
    context = ray.get_runtime_context()  # this job of this cluster (a job id repeats across clusters)
    job = (context.gcs_address, context.get_node_id(), context.get_job_id())
    warm = not driver_helps or job == _WARM_JOB  # a Ray task has returned: from then on the cluster runs every task
    try:
        while pending or not exhausted:
            while not exhausted and len(pending) < (limit if warm else started_limit):
                task = next(queue, None)
                if task is None:
                    exhausted = True
                    break
                pending.append(remote.remote(fn, task, cwd))
            if not pending:
                break
            if not warm and not exhausted:
                done, _ = ray.wait(pending, num_returns=1, timeout=0)
                if not done:  # the workers are still starting: the driver runs the next task itself
                    task = next(queue, None)
                    if task is None:
                        exhausted = True
                    else:
                        yield func(task)
                    continue
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])
            warm, _WARM_JOB = True, job
            yield result
    except ray.exceptions.RayTaskError as err:
        clean = clean_error(err)
        if clean is not None:
            raise clean from None
        cause = getattr(err, "cause", None)  # a bug in the task: its own exception, not Ray's wrapper
        raise (cause if isinstance(cause, BaseException) else err) from None
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


@dataclass(kw_only=True)
class ActorJobConfig:
    """The fields of a stage that runs one model set per Ray actor (caption, reinforce): how many
    actors, on which device, with what resources, on which cluster. None shapes the output."""

    num_workers: int = arg(0, shapes_output=False, help="Ray actors, one model set each (0: one per GPU, or CPUs - 1 on CPU)")
    device: Literal["auto", "cpu", "cuda"] = arg("auto", shapes_output=False, help="where the models run (auto: cuda when the cluster has GPUs)")
    gpus_per_worker: float = arg(1.0, shapes_output=False, help="GPUs per actor (cuda; 0.5 puts two actors on one GPU)")
    cpus_per_worker: float = arg(1.0, shapes_output=False, help="CPUs per actor (also its torch threads on cpu)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", shapes_output=False, help="autocast on GPU (auto: bf16 on cuda, fp32 on cpu)")
    ray_address: str | None = arg(None, shapes_output=False, help="join this Ray cluster: 'auto' or HOST:PORT (default: a local one, or the one already running)")

    def resolve_device(self) -> str:
        """``--device`` on the cluster joined: auto is cuda when it has GPUs; cuda without any is one line."""
        import ray

        from base.cli import UsageError

        gpus = ray.cluster_resources().get("GPU", 0)
        if self.device == "auto":
            return "cuda" if gpus > 0 else "cpu"
        if self.device == "cuda" and gpus <= 0:
            raise UsageError("--device cuda: the Ray cluster has no GPUs")
        return self.device

    def actor_count(self, device: str) -> int:
        """``--num-workers``, else one actor per GPU (cuda) or per CPU but one (cpu: the driver's)."""
        import ray

        if self.num_workers:
            return self.num_workers
        resources = ray.cluster_resources()
        if device == "cuda":
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int((resources.get("CPU", 1) - 1) // self.cpus_per_worker))

    def actor_resources(self, device: str) -> dict[str, float]:
        """What Ray reserves per actor."""
        resources = {"num_cpus": self.cpus_per_worker}
        if device == "cuda":
            resources["num_gpus"] = self.gpus_per_worker
        return resources
