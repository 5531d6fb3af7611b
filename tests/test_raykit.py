"""base.raykit's task map on a real local Ray (--ray-address local): every task's result once, the driver running
tasks while the workers start (and never with driver_helps=False), and a task's error as its one line wherever the
task ran."""

from __future__ import annotations

import os
import sys
import time

import pytest

from base.shards import ShardError
from base.workers import Workers, in_order

DRIVER = os.getpid()


def pid_of(task: int) -> tuple[int, int]:
    time.sleep(0.05)
    return task, os.getpid()


def fails_at_three(task: int) -> int:
    if task == 3:
        raise ShardError(f"shard {task}: broken\nsecond line")
    return task


@pytest.fixture(scope="module")
def workers():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this test module
    with Workers(2, ray_address="local") as pool:
        yield pool


def test_a_new_local_ray_runs_every_task_once_and_the_driver_helps_while_it_starts(workers):
    from base.raykit import ray_map

    assert workers.where == "ray (local)"
    results = list(in_order(workers.imap(pid_of, list(range(12))), index=lambda r: r[0]))
    assert [task for task, _ in results] == list(range(12))
    # the workers take far longer than one 50 ms task to start: the driver ran the first ones
    assert DRIVER in {pid for _, pid in results}
    on_ray = sorted(ray_map(pid_of, list(range(6)), driver_helps=False))
    assert [task for task, _ in on_ray] == list(range(6))
    assert DRIVER not in {pid for _, pid in on_ray}


def test_a_task_error_is_its_one_line_wherever_the_task_ran(workers):
    from base.raykit import ray_map

    for helps in (True, False):
        with pytest.raises(ShardError) as err:
            list(ray_map(fails_at_three, list(range(8)), driver_helps=helps))
        assert str(err.value).startswith("shard 3: broken")
