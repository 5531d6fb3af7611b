"""The pool that runs a shard-parallel stage's tasks: ``--num-workers`` local processes, or the
nodes of a Ray cluster (``--ray-address``, :mod:`base.raykit`).

``map`` runs a module-level function over task records, updating a progress bar as results come
back (``weight`` turns a result into bar units, e.g. the samples a shard wrote); ``parallel=False``
runs a step one task at a time in this process (a step whose tasks are each memory-bound). Local
processes are spawned (not forked): a stage may already hold threads (pyarrow, torch) when it
starts the pool. On Ray every task is retried when its worker or node dies; tasks write their
output atomically with a marker last, so a retry redoes a shard, never loses or doubles one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any


class Workers:
    """``num_workers`` processes (spawned once, reused by every ``map``), this process (one
    worker), or Ray tasks on the cluster at ``ray_address``."""

    def __init__(self, num_workers: int, ray_address: str | None = None, max_retries: int | None = None,
                 start_method: str = "spawn") -> None:
        self.num_workers = num_workers
        self.start_method = start_method  # "fork" for a stage whose driver holds no threads (world)
        self.ray_address = ray_address
        self.max_retries = max_retries
        self.pool = None
        self._stack = ExitStack()

    @property
    def where(self) -> str:
        """Where the tasks run, for the run record: ``local (N processes)`` or ``ray (ADDRESS)``."""
        if self.ray_address is not None:
            return f"ray ({self.ray_address})"
        return f"local ({self.num_workers} process{'es' if self.num_workers > 1 else ''})"

    def __enter__(self) -> Workers:
        if self.ray_address is not None:
            from base.raykit import ray_session

            # --ray-address local: a new Ray on this machine with --num-workers CPUs (0: all of them)
            cpus = self.num_workers if self.ray_address == "local" and self.num_workers > 0 else None
            self._stack.enter_context(ray_session(self.ray_address, cpus))
        elif self.num_workers > 1:
            import multiprocessing

            method = self.start_method if self.start_method in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(self.num_workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if exc[0] is not None:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
        self._stack.close()

    def imap(self, func: Callable[[Any], Any], tasks: list[Any], parallel: bool = True) -> Iterator[Any]:
        """``func`` over ``tasks``, each result as it is done (completion order)."""
        if self.ray_address is not None and parallel and tasks:
            from base.raykit import DEFAULT_RETRIES, ray_map

            yield from ray_map(func, tasks, max_retries=DEFAULT_RETRIES if self.max_retries is None else self.max_retries)
        elif self.pool is not None and parallel and len(tasks) > 1:
            yield from self.pool.imap_unordered(func, tasks)
        else:
            yield from (func(task) for task in tasks)

    def map(self, func: Callable[[Any], Any], tasks: list[Any], bar, weight: Callable[[Any], int] | None = None,
            parallel: bool = True) -> list:
        """``func`` over ``tasks`` (results in completion order), the bar advanced per result."""
        results = []
        for result in self.imap(func, tasks, parallel):
            results.append(result)
            bar.update(weight(result) if weight else 1)
        return results


def in_order(results: Iterable[Any], index: Callable[[Any], int]) -> Iterator[Any]:
    """Results that arrive in completion order, yielded in task order (``index(result)`` = 0, 1, …);
    only the ones that came early are held."""
    early: dict[int, Any] = {}
    upcoming = 0
    for result in results:
        early[index(result)] = result
        while upcoming in early:
            yield early.pop(upcoming)
            upcoming += 1
    if early:
        raise RuntimeError(f"results {sorted(early)[:5]} arrived without result {upcoming}")
