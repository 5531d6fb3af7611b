"""Ray for every shard-parallel stage: one way to join or start a cluster, and task retries.

``ray_session(address, num_cpus)``: inside a running Ray (a notebook, a test) use it and leave it
up; ``address`` (``auto`` or ``HOST:PORT`` of an existing cluster, started with ``ray start``)
joins that cluster; else a local Ray starts with an explicit CPU count and no dashboard. The
driver disconnects when the stage ends. ``ray_map`` runs a module-level function over task
records as Ray tasks: at most ``max_in_flight`` submitted at once (backpressure: the driver holds
only that many pending results), each retried up to ``max_retries`` times when its worker or node
dies (a task's own exception is not retried: it is the same on every node, and reaches the user
as its original one line). Tasks must be idempotent — every qcap stage writes a shard atomically
and marks it done last — and their inputs and outputs must sit on storage every node sees (a
shared filesystem or an fsspec URL), as on any Ray cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_RETRIES = 3
RAY_ADDRESS_HELP = ("run on an existing Ray cluster: 'auto' (the cluster this node belongs to) or HOST:PORT of its "
                    "head; its nodes must see the input and output folders (shared storage)")


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Join ``address``, start a local Ray with an explicit CPU count, or reuse a running one."""
    import ray

    if ray.is_initialized():  # a caller owns Ray: use it, leave it up
        yield
        return
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _call(func: Callable[[Any], Any], task: Any) -> Any:
    return func(task)


def ray_map(func: Callable[[Any], Any], tasks: list[Any], *, max_in_flight: int | None = None,
            max_retries: int = DEFAULT_RETRIES, num_cpus: float = 1) -> Iterator[Any]:
    """``func(task)`` for every task as Ray tasks, yielded in completion order."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False)(_call)
    limit = max_in_flight or 2 * cluster_cpus()
    func_ref = ray.put(func)
    pending: list = []
    queue = iter(tasks)
    exhausted = False
    try:
        while pending or not exhausted:
            while not exhausted and len(pending) < limit:
                task = next(queue, None)
                if task is None:
                    exhausted = True
                    break
                pending.append(remote.remote(func_ref, task))
            if not pending:
                break
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        raise (cause.cause if getattr(cause, "cause", None) is not None else cause) from None
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
