"""qcap download, the long end-to-end checks: a real Ray cluster, SIGKILL at any moment, a dead worker.

- Ray: the test starts its own head node on loopback (``ray start --head --block`` in a
  subprocess of its own session), runs ``qcap download --distributor ray --ray-address
  127.0.0.1:<port>`` against it, and compares the shards with a multiprocessing run. It stops
  the head by signalling the ``ray start`` process it started (``ray stop`` would stop every
  Ray on the machine, other people's included).
- Resume: ``qcap download`` in a real subprocess, SIGKILLed several times at different
  moments; each time every visible tar must be whole and nothing may keep writing; the
  finished folder must hold the same uids, shard by shard, as an uninterrupted run.
- Shard retry: one worker of the process pool SIGKILLed mid-download; the pool is renewed and
  its shards run again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_download import SMALL, make_world, run_cli, stale_pool, truth_of

from base.shards import iter_members, iter_samples, read_table, read_tables
from world.server import WorldServer

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2):
    """A Ray head node on loopback, ours alone; yields its address."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="qr", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    log_path = Path(temp) / "head.log"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_DISABLE_USAGE_STATS="1")
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--temp-dir", temp, "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log_path.read_text():
            assert head.poll() is None, f"ray start exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not come up: {log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block shuts its own processes down
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # our own session only
            head.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # anything of that session still alive
        shutil.rmtree(temp, ignore_errors=True)


def _by_shard(out: Path) -> dict[str, list[tuple[str, str]]]:
    return {tar.name: sorted(zip(*(read_table(str(tar), ["uid", "status"]).column(c).to_pylist() for c in ("uid", "status")), strict=True))
            for tar in sorted(out.glob("*.tar"))}


def test_ray_cluster_gives_the_same_shards_as_multiprocessing(tmp_path, monkeypatch):
    import json

    import ray

    world = make_world(tmp_path / "w")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head above runs without token auth
    with WorldServer(world, stall_seconds=30) as srv:
        pool = stale_pool(srv, tmp_path / "pool.parquet")
        common = ["--pool", str(pool), "--allow-private-addresses", *SMALL]
        assert run_cli([*common, "--out", str(tmp_path / "mp")]) == 0
        with ray_head() as address:
            started = time.time()
            assert run_cli([*common, "--out", str(tmp_path / "ray"), "--distributor", "ray", "--ray-address", address,
                            "--max-in-flight", "2"]) == 0
            seconds = time.time() - started
    assert not ray.is_initialized(), "the driver disconnects from the cluster when done"
    assert _by_shard(tmp_path / "ray") == _by_shard(tmp_path / "mp")
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["this_run"]["distributor"] == f"ray ({address})"
    assert manifest["reconciles"] and manifest["num_samples"] == len(truth_of(world))
    print(f"ray download of {manifest['num_samples']} samples: {seconds:.1f} s")


def _visible_state(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in out.iterdir()} if out.exists() else {}


def _check_visible_tars_whole(out: Path) -> int:
    """Every tar anyone can see reads to the end and matches its Parquet's successes."""
    count = 0
    for tar in out.glob("*.tar"):
        members = list(iter_members(str(tar)))
        table = read_table(str(tar), ["status"])
        assert len(members) == 3 * table.column("status").to_pylist().count("success"), f"{tar.name} is partial"
        count += 1
    return count


def test_sigkill_at_any_moment_then_resume_gives_the_same_shards(tmp_path):
    world = make_world(tmp_path / "w", num_samples=160)
    args = ["--allow-private-addresses", *SMALL, "--samples-per-shard", "10", "--threads", "4"]
    with WorldServer(world, stall_seconds=30) as srv:
        pool = stale_pool(srv, tmp_path / "pool.parquet")
        reference = tmp_path / "reference"
        assert run_cli(["--pool", str(pool), "--out", str(reference), *args]) == 0
        out = tmp_path / "raw"
        command = [str(BIN / "qcap"), "download", "--pool", str(pool), "--out", str(out), *args]
        kills = 0
        # kill points: while it starts up, after its first finished shard, a few shards later
        for kind, amount in (("seconds", 2.0), ("shards", 1), ("shards", 5)):
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started, done_before = time.monotonic(), len(list(out.glob("*.done")))
            while proc.poll() is None and time.monotonic() - started < 240:
                if kind == "seconds" and time.monotonic() - started >= amount:
                    break
                if kind == "shards" and len(list(out.glob("*.done"))) >= done_before + amount:
                    break
                time.sleep(0.05)
            if proc.poll() is not None:
                break  # it finished before the kill point: nothing left to interrupt
            proc.send_signal(signal.SIGKILL)  # the driver only: its workers must die with it
            proc.wait(30)
            kills += 1
            _check_visible_tars_whole(out)
            before = _visible_state(out)
            time.sleep(1.5)
            assert _visible_state(out) == before, "something kept writing into RAW after the driver was killed"
        assert kills >= 2
        final = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr[-3000:]
    assert _check_visible_tars_whole(out) == 16
    assert _by_shard(out) == _by_shard(reference)
    uids = [s.uid for s in iter_samples(str(out))]
    assert len(uids) == len(set(uids))
    assert sorted(read_tables(str(out)).column("uid").to_pylist()) == sorted(truth_of(world))
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # a process that ended while we looked
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_a_worker_killed_mid_shard_is_replaced_and_its_shard_retried(tmp_path, caplog):
    """SIGKILL one worker of the process pool while shards run: the pool is renewed, the
    shards it held run again, and the download completes with every uid exactly once."""
    import json
    import threading

    world = make_world(tmp_path / "w")
    with WorldServer(world, stall_seconds=30) as srv:
        pool = stale_pool(srv, tmp_path / "pool.parquet")
        out = tmp_path / "raw"
        result = {}
        runner = threading.Thread(target=lambda: result.setdefault("code", run_cli(
            ["--pool", str(pool), "--out", str(out), "--allow-private-addresses", *SMALL, "--threads", "2"])))
        runner.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and runner.is_alive() and time.monotonic() < deadline:
            workers = [w for server in _children(os.getpid()) for w in _children(server)]  # driver -> fork server -> workers
            if workers and not list(out.glob("*.done")):
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        runner.join(300)
    assert killed is not None, "no worker was running to kill"
    assert result["code"] == 0
    assert "a worker process died; starting a fresh pool" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["reconciles"] and manifest["this_run"]["failed_shards"] == {}
    assert sorted(read_tables(str(out)).column("uid").to_pylist()) == sorted(truth_of(world))
    _check_visible_tars_whole(out)


def test_a_dead_progress_actor_is_replaced_not_fatal(caplog):
    """The flake seen once on a fresh cluster ('the actor never ran - it was cancelled'): a dead
    progress actor only costs progress-bar events; the run goes on with a new actor."""
    import ray

    from curate.download.distribute import RayBackend

    backend = RayBackend(processes=1, ray_address=None, shard_retries=0, max_in_flight=1)
    try:
        old = backend.actor
        ray.kill(old, no_restart=True)
        with caplog.at_level("WARNING", logger="curate.download.distribute"):
            assert backend.progress_events() == []
        assert "progress actor died" in caplog.text
        assert backend.actor is not old
        ray.get(backend.actor.add.remote("event"))
        assert backend.progress_events() == ["event"]
    finally:
        backend.close()
    assert not ray.is_initialized()
