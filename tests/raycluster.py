"""A real two-node Ray cluster on loopback for the scale-out tests: a head node and a worker node,
each a ``ray start --block`` with its own ``--num-cpus`` in its own session, so a test can kill
the worker node's raylet (SIGKILL) mid-run and stop both cleanly at the end."""

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

BIN = Path(sys.executable).parent
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_DISABLE_USAGE_STATS="1", OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """The running cluster: its address, and the worker node's processes."""

    def __init__(self, address: str, temp: Path, head: subprocess.Popen, worker: subprocess.Popen) -> None:
        self.address, self.temp, self.head, self.worker = address, temp, head, worker

    def worker_raylet(self):
        import psutil

        for child in psutil.Process(self.worker.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() == "raylet":
                    return child
        return None

    def worker_node_running(self, task_name: str) -> bool:
        """Whether a worker process of the worker node is running task ``task_name`` now (Ray names
        a busy worker ``ray::<task>``, an idle one ``ray::IDLE``)."""
        import psutil

        raylet = self.worker_raylet()
        if raylet is None:
            return False
        for child in raylet.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if " ".join(child.cmdline()).startswith(f"ray::{task_name}"):
                    return True
        return False

    def kill_worker_node(self) -> int:
        """SIGKILL the worker node's raylet (its workers die with it); returns the raylet's pid."""
        raylet = self.worker_raylet()
        assert raylet is not None, "the worker node has no raylet"
        raylet.send_signal(signal.SIGKILL)
        return raylet.pid

    def nodes_alive(self) -> int:
        done = subprocess.run([str(BIN / "ray"), "status", "--address", self.address], capture_output=True, text=True,
                              env=ENV, timeout=60)
        text = done.stdout
        active = text.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in text else ""
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))


def kill_worker_node_mid_run(cluster: Cluster, proc: subprocess.Popen, out: Path, timeout: float = 240) -> int:
    """Wait until ``proc`` (a stage run on ``cluster``) has finished a shard in ``out`` and a task of
    it runs on the worker node, then SIGKILL that node's raylet. Returns how many shards were
    done at the kill (fewer than all: the kill came mid-run)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not (list(out.glob("*.done")) and cluster.worker_node_running("_call")):
        assert time.monotonic() < deadline, "no task of the run reached the worker node"
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the kill: make the input larger"
    done_at_kill = len(list(out.glob("*.done")))
    raylet = cluster.worker_raylet()
    cluster.kill_worker_node()  # with a task of this run in flight there
    assert _dead(raylet), "the worker node's raylet survived SIGKILL"
    return done_at_kill


def _dead(process, timeout: float = 30) -> bool:
    """Whether ``process`` (a psutil.Process) is gone or a zombie within ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as sink:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], stdout=sink, stderr=subprocess.STDOUT,
                                env=ENV, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # ray start --block stops its own node's processes
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of that node's session still alive
    proc.wait(10)


@contextlib.contextmanager
def two_node_cluster(head_cpus: int = 1, worker_cpus: int = 1):
    """A head (``head_cpus``) and one worker node (``worker_cpus``) on 127.0.0.1; yields a Cluster."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="qr", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 bytes
    address = f"127.0.0.1:{port}"
    head = _start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(head_cpus),
                   "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats"], temp / "head.log")
    worker = None
    try:
        cluster = None
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, f"ray head exited: {(temp / 'head.log').read_text()[-3000:]}"
            if worker is None and (temp / "head.log").read_text().count("Ray runtime started"):
                worker = _start(["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus",
                                 str(worker_cpus), "--disable-usage-stats"], temp / "worker.log")
                cluster = Cluster(address, temp, head, worker)
            if cluster is not None:
                assert worker.poll() is None, f"ray worker exited: {(temp / 'worker.log').read_text()[-3000:]}"
                if cluster.nodes_alive() == 2:
                    break
            assert time.monotonic() < deadline, f"the cluster did not come up: {(temp / 'head.log').read_text()[-3000:]}"
            time.sleep(0.5)
        yield cluster
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)
