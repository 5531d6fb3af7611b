"""A local worker pool for shard-parallel stages: ``--num-workers`` spawned processes, reused by
every step of one run, or this process when there is one worker.

``map`` runs a module-level function over task records, updating a progress bar as results come
back (``weight`` turns a result into bar units, e.g. the samples a shard wrote); ``parallel=False``
runs a step one task at a time in this process (a step whose tasks are each memory-bound).
Spawned (not forked) processes: a stage may already hold threads (pyarrow, torch) when it starts
the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class Workers:
    """``num_workers`` processes (spawned once, reused by every ``map``), or this process."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.pool = None

    def __enter__(self) -> Workers:
        if self.num_workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if exc[0] is not None:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()

    def map(self, func: Callable[[Any], Any], tasks: list[Any], bar, weight: Callable[[Any], int] | None = None,
            parallel: bool = True) -> list:
        """``func`` over ``tasks`` (results in completion order), the bar advanced per result."""
        results = []
        outputs: Iterable[Any]
        if self.pool is not None and parallel and len(tasks) > 1:
            outputs = self.pool.imap_unordered(func, tasks)
        else:
            outputs = (func(task) for task in tasks)
        for result in outputs:
            results.append(result)
            bar.update(weight(result) if weight else 1)
        return results
